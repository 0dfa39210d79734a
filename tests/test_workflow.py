"""workflow/Snakefile: one job per benchmark cell with --cores 2 gives the scores of plain `perturbkit bench`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import snakemake  # noqa: F401  (in the `workflow` and `test` extras: pip install -e '.[test]')

from conftest import SMALL_TOML

from perturbkit.cli import main


SNAKEFILE = Path(__file__).resolve().parents[1] / "workflow" / "Snakefile"

SMALL = """
name = "workflow-test"
description = "Small benchmark for the Snakemake test."
seeds = [0]

[data]
source = "synthetic"

[data.synthetic]
n_contexts = 3
n_cells = 50
n_genes = 30
seed = 0

[preprocessing]
n_top_genes = 0

[training]
epochs = 2
threads = 1

[evaluation]
metrics = ["r2_mean_all", "r2_mean_top100", "pearson_delta"]
n_boot = 10

[output]
figures = false
umap = false

[scenarios.loco]
contexts = ["ctx0"]
min_cells = 20

[models.scgen]
""" + SMALL_TOML


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(workdir),
                           *args], capture_output=True, text=True, timeout=400)


def test_snakemake_bench_equals_plain_bench(tmp_path, capsys):
    cfg = tmp_path / "small.toml"
    cfg.write_text(SMALL)
    res = snakemake(tmp_path, "--cores", "2", "--config", f"bench={cfg}", f"out={tmp_path / 'wf'}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert main(["bench", str(cfg), "--out", str(tmp_path / "plain"), "--no-progress"]) == 0
    capsys.readouterr()

    cells = sorted(p.name for p in (tmp_path / "plain" / "cells").iterdir())
    assert len(cells) == 5  # 1 context x (scgen and the four baselines) x 1 seed
    jobs = sorted(p.name[:-len(".done")] for p in (tmp_path / "wf" / ".jobs").iterdir())
    assert jobs == cells  # one job per cell
    key = ["scenario", "split", "model", "seed", "metric"]
    wf = pd.read_csv(tmp_path / "wf" / "scores.csv").sort_values(key).reset_index(drop=True)
    plain = pd.read_csv(tmp_path / "plain" / "scores.csv").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(wf, plain)
    for name in ("summary.csv", "ro-crate-metadata.json", "report.html"):
        assert (tmp_path / "wf" / name).is_file(), name

    again = snakemake(tmp_path, "--cores", "2", "--config", f"bench={cfg}", f"out={tmp_path / 'wf'}", "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_snakemake_plans_tuning_workers_then_results(tmp_path):
    cfg = tmp_path / "tune.toml"
    cfg.write_text('[models.scgen]\n')
    res = snakemake(tmp_path, "-n", "-p", "tune", "--config", f"tune={cfg}", f"tune_out={tmp_path / 't'}",
                    "tune_workers=3", "tune_trials=12", "tune_storage=postgresql://u@db.example/optuna")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert re.search(r"tune_worker\s+3\n", out) and re.search(r"tune_results\s+1\n", out)
    for i in range(3):
        assert f"--storage postgresql://u@db.example/optuna --worker {i} --worker-only" in out
