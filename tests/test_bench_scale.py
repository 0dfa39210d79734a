"""benchmarks/bench_scale.py at a tiny size: the table's shape and that its numbers are positive and consistent.
No timing assertions (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scale.py"
CELLS = 1500


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    out = folder / "scale.md"
    cmd = [sys.executable, str(SCRIPT), "--cells", str(CELLS), "--dir", str(folder), "--out", str(out),
           "--threads", "1", "--n-boot", "2", "--metrics", "pearson_delta,r2_mean_all"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return folder, out, json.loads(out.with_suffix(".json").read_text()), res.stdout


def _table(text: str, heading: str) -> list[list[str]]:
    part = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]  # below header and rule


def test_tables_have_a_row_per_model_with_every_stage(run):
    _folder, out, _results, _stdout = run
    text = out.read_text()
    seconds = _table(text, "Seconds per stage")
    peaks = _table(text, "Peak RSS per stage (MB)")
    assert [r[1] for r in seconds] == ["scgen", "scpram"]
    assert [r[1] for r in peaks] == ["scgen", "scpram"]
    for row in seconds:
        assert row[0] == f"{CELLS:,}"
        assert all(float(v) >= 0 for v in row[3:12]), row  # load .. process: every stage timed (0.0: < 0.05 s)
        assert float(row[10]) > 0 and float(row[11]) > 0  # other (imports at least) and the process
        assert row[12] == "0"  # exit status
    for row in peaks:
        assert all(float(v.strip("*")) > 0 for v in row[2:10]), row  # load .. peak: every stage placed
    assert "`uptime` before:" in text and "load average" in text
    assert "needs the 1,000,000-cell run" in text


def test_numbers_are_consistent(run):
    folder, _out, results, _stdout = run
    size = results["sizes"][str(CELLS)]
    data = size["data"]
    assert Path(data["path"]).exists() and data["cells"] == CELLS and data["genes"] == 2000
    assert data["peak_mb"] > 0 and data["file_mb"] > 0 and data["seconds"] > 0
    assert size["load"]["seconds"] > 0 and size["load"]["peak_mb"] > 0
    for model in ("scgen", "scpram"):
        r = size["models"][model]
        assert r["rc"] == 0
        sec = r["seconds"]
        assert all(sec[k] > 0 for k in ("preprocess", "fit", "predict", "metrics", "write"))
        # the stages the product timed lie within the process the script timed
        assert sum(v for v in sec.values() if v) < r["process_s"]
        # every stage's peak is at most the process's, the process's at least its own VmHWM
        assert all(0 < v <= r["peak_mb"] + 1e-9 for v in r["peak_stage_mb"].values())
        assert r["peak_mb"] >= r["child_hwm_mb"] - 1e-9 and r["peak_mb"] >= r["tree_sampled_mb"] - 1e-9
        assert 0 < r["train_cells"] < CELLS and r["threads"] == 1
        assert set(r["scores"]) == {"pearson_delta", "r2_mean_all"}
        assert (folder / f"out_{CELLS}_{model}" / "record.json").exists()


def test_the_data_file_is_reused_and_never_dense(run):
    folder, out, results, _stdout = run
    data = results["sizes"][str(CELLS)]["data"]
    import h5py

    with h5py.File(data["path"], "r") as fh:
        assert fh["X"].attrs["encoding-type"] == "csr_matrix"
        assert tuple(fh["X"].attrs["shape"]) == (CELLS, 2000)
        assert set(fh["obs"].keys()) >= {"condition", "cell_type", "donor"}
    # the cached file is reused (not written again) by a later run of the same parameters
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    messages = []
    again = mod.ensure_data(folder, CELLS, argparse.Namespace(keep=0.8, seed=0, interval=0.1), messages.append)
    assert again["cached"] and again["path"] == data["path"] and "(cached;" in messages[0]
    # a size too small for a held-out context: a clear error, the results left as they were
    res = subprocess.run([sys.executable, str(SCRIPT), "--cells", "900", "--dir", str(folder), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "--cells must be at least 1000" in res.stderr
    assert json.loads(out.with_suffix(".json").read_text()) == results


def test_acceptance_lines_follow_the_issue_rules():
    """The acceptance block (rendering only, on made-up rows): peak under 4e9 bytes, every stage <= 12x."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def size(peak, fit_s):
        row = {"rc": 0, "peak_mb": peak, "seconds": {"preprocess": 10.0, "fit": fit_s, "predict": 1.0,
                                                     "baselines": 1.0, "metrics": 5.0, "write": 1.0}}
        return {"load": {"seconds": 2.0}, "models": {"scgen": row, "scpram": dict(row, rc=2)}}

    assert "needs the 1,000,000-cell run" in mod.acceptance({"sizes": {"100000": size(900, 10.0)}})[-1]
    lines = mod.acceptance({"sizes": {"100000": size(900, 10.0), "1000000": size(3800, 130.0)}})
    text = "\n".join(lines)
    assert "scgen at 1,000,000 cells: exit 0, peak 3800 MB (under 4 GB = 3815 MB)" in text
    assert "scpram at 1,000,000 cells: exit 2, peak 3800 MB (NOT under" in text
    assert "largest fit 13.0x (OVER 12x)" in text  # 130 s / 10 s
    assert "scpram, time" not in text  # a failed run has no growth
