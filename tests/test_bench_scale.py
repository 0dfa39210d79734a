"""benchmarks/bench_scale.py at a tiny size: the table's shape and that its numbers are positive and consistent.
No timing assertions (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_scale.py"
CELLS = 1500
#: the row names of a default run: scPRAM with the caps bench_scale passes (DEFAULT_PARAMS)
ROWS = ["scgen", "scpram (ot_max_candidates=20000, attention_max_keys=20000)"]


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
    assert [r[1] for r in seconds] == ROWS
    assert [r[1] for r in peaks] == ROWS
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
    assert list(size["models"]) == ROWS
    for name, r in size["models"].items():
        model = r["model"]
        assert name.split(" ")[0] == model and r["rc"] == 0
        assert r["params"] == ({} if model == "scgen" else {"ot_max_candidates": 20000, "attention_max_keys": 20000})
        # the parameters reached the product: its record lists them among the model's
        assert Path(r["out"]).parent == folder
        record = json.loads((Path(r["out"]) / "record.json").read_text())
        assert all(record["models"][model]["params"][k] == v for k, v in r["params"].items())
        sec = r["seconds"]
        assert all(sec[k] > 0 for k in ("preprocess", "fit", "predict", "metrics", "write"))
        # the stages the product timed lie within the process the script timed
        assert sum(v for v in sec.values() if v) < r["process_s"]
        # every stage's peak is at most the process's, the process's at least its own VmHWM
        assert all(0 < v <= r["peak_mb"] + 1e-9 for v in r["peak_stage_mb"].values())
        assert r["peak_mb"] >= r["child_hwm_mb"] - 1e-9 and r["peak_mb"] >= r["tree_sampled_mb"] - 1e-9
        assert 0 < r["train_cells"] < CELLS and r["threads"] == 1
        assert set(r["scores"]) == {"pearson_delta", "r2_mean_all"}
        assert r["commit"] and r["started"] and "bench_scale.py --cells 1500" in r["bench_command"]


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

    mod = benchmark_script("bench_scale")
    messages = []
    again = mod.ensure_data(folder, CELLS, argparse.Namespace(keep=0.8, seed=0, interval=0.1), messages.append)
    assert again["cached"] and again["path"] == data["path"] and "(cached;" in messages[0]
    # a size too small for a held-out context: a clear error, the results left as they were
    res = subprocess.run([sys.executable, str(SCRIPT), "--cells", "900", "--dir", str(folder), "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0 and "--cells must be at least 1000" in res.stderr
    assert json.loads(out.with_suffix(".json").read_text()) == results


def test_acceptance_lines_follow_the_issue_rules():
    """The acceptance block (rendering only, on made-up rows): peak under 4e9 bytes, every stage <= 12x, a model
    met when one of its rows (with the same parameters at both sizes) is."""
    mod = benchmark_script("bench_scale")

    def size(peak, fit_s, capped_fit_s=None):
        row = {"model": "scgen", "rc": 0, "peak_mb": peak,
               "seconds": {"preprocess": 10.0, "fit": fit_s, "predict": 1.0, "baselines": 1.0, "metrics": 5.0,
                           "write": 1.0}}
        models = {"scgen": row, "scpram": dict(row, model="scpram", rc=2)}
        if capped_fit_s is not None:
            models["scpram (k=1)"] = dict(row, model="scpram", seconds=dict(row["seconds"], fit=capped_fit_s))
        return {"load": {"seconds": 2.0}, "models": models}

    assert "needs the 1,000,000-cell run" in mod.acceptance({"sizes": {"100000": size(900, 10.0)}})[-1]
    lines = mod.acceptance({"sizes": {"100000": size(900, 10.0, 10.0), "1000000": size(3800, 130.0, 100.0)}})
    text = "\n".join(lines)
    assert "- scgen at 1,000,000 cells: exit 0, peak 3800 MB (under 4 GB = 3815 MB)" in text
    assert "largest fit 13.0x (OVER 12x)" in text  # 130 s / 10 s
    assert "- scpram at 1,000,000 cells: exit 2, peak 3800 MB (NOT under 4 GB = 3815 MB); time 100k -> 1M: not " \
           "comparable" in text  # a failed run has no growth
    assert "- scpram (k=1) at 1,000,000 cells: exit 0, peak 3800 MB (under" in text
    assert "largest fit 10.0x (within 12x)" in text
    assert "- **scgen: NOT met**" in text and "- **scpram: met** by scpram (k=1)" in text
    no_small = mod.acceptance({"sizes": {"100000": size(900, 10.0), "1000000": size(3800, 100.0, 100.0)}})
    assert any("scpram (k=1)" in line and "no 100k run with these parameters" in line for line in no_small)


def test_params_name_rows_and_a_rerun_keeps_the_other_rows():
    mod = benchmark_script("bench_scale")
    p = mod.parse_params(["scpram:ot_max_candidates=none", "scpram:ratio=0.1"], ["scgen", "scpram"])
    assert p == {"scgen": {}, "scpram": {"attention_max_keys": 20000, "ratio": "0.1"}}
    assert mod.row_name("scpram", p["scpram"]) == "scpram (attention_max_keys=20000, ratio=0.1)"
    assert mod.row_name("scgen", {}) == "scgen"
    for bad, says in (("scpram=1", "MODEL:KEY=VALUE"), ("cellot:x=1", "which --models does not run")):
        with pytest.raises(SystemExit, match=says):
            mod.parse_params([bad], ["scgen", "scpram"])
    results = {"sizes": {"10": {"cells": 10, "models": {"scgen": {"v": 1}, "scpram": {"v": 1}}}}}
    mod.merge(results, {"cells": 10, "models": {"scpram": {"v": 2}, "scpram (k=1)": {"v": 2}}})
    assert results["sizes"]["10"]["models"] == {"scgen": {"v": 1}, "scpram": {"v": 2}, "scpram (k=1)": {"v": 2}}
    old = {"sizes": {"10": {"cells": 10, "command": "c", "started": "s", "commit": "h", "uptime": "u",
                            "machine": "m", "models": {"scpram": {}}}}}
    row = mod.upgrade(old)["sizes"]["10"]["models"]["scpram"]
    assert row == {"model": "scpram", "params": {}, "bench_command": "c", "started": "s", "commit": "h",
                   "uptime": "u", "machine": "m"}
