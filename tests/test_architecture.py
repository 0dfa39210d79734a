"""docs/architecture.md's three recipes, run as written: a toy model, a toy metric and a toy scenario registered
from outside the package and run through bench and tune, with no generic module edited."""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType

import pandas as pd
import pytest

import perturbkit as pk

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def recipe(tag: str) -> str:
    blocks = re.findall(rf"```python {re.escape(tag)}\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, f"docs/architecture.md has {len(blocks)} code blocks tagged {tag!r}"
    return blocks[0]


@pytest.fixture
def toys(monkeypatch):
    """The recipes' model, metric and scenario, registered for this test only."""
    ns: dict = {}
    for tag in ("recipe-model", "recipe-metric", "recipe-metric-entry", "recipe-scenario"):
        exec(compile(recipe(tag), f"docs/architecture.md:{tag}", "exec"), ns)
    monkeypatch.setitem(pk.models.MODELS, "scaled_shift", ns["ScaledShift"])
    registry = MappingProxyType({**pk.metrics.METRICS, "delta_mae": ns["DELTA_MAE"]})
    monkeypatch.setattr(pk.metrics.core, "METRICS", registry)  # where the registry lives
    monkeypatch.setattr(pk.metrics, "METRICS", registry)  # and its re-export
    monkeypatch.setitem(pk.scenarios.SCENARIOS, "holdout_one", ns["HoldoutOne"])
    return ns


DATA = """
[data]
source = "synthetic"

[data.synthetic]
n_contexts = 3
n_cells = 40
n_genes = 30

[preprocessing]
n_top_genes = 0
"""


def test_recipes_run_through_bench(tmp_path, toys):
    cfg = tmp_path / "bench.toml"
    cfg.write_text('seeds = [0, 1]\n' + DATA + """
[evaluation]
metrics = ["pearson_delta", "delta_mae"]
n_boot = 0

[output]
umap = false
figure_metrics = ["pearson_delta", "delta_mae"]

[scenarios.holdout_one]
context = "ctx1"

[models.scaled_shift]
scale = 0.5
""")
    out = tmp_path / "run"
    pk.bench.run(cfg, out, progress=False, log=lambda *a: None)
    summary = pd.read_csv(out / "summary.csv")
    mine = summary[(summary.split == "ctx1") & (summary.metric == "delta_mae")].set_index("model")["mean"]
    # the planted response is recovered: half the mean shift errs less than no change, more than all of it
    assert mine["mean_shift"] < mine["scaled_shift"] < mine["control"]
    table = pd.read_csv(out / "holdout_one.csv")
    assert set(table.model) >= {"scaled_shift", "mean_shift", "control"}
    assert "Held-out context" in (out / "report.html").read_text()
    assert pk.bench.list_cells(cfg)[0] == "holdout_one.ctx1.scaled_shift.s0"


def test_recipe_model_tunes(tmp_path, toys):
    cfg = tmp_path / "tune.toml"
    cfg.write_text('seeds = [0]\n' + DATA + """
[models.scaled_shift]

[evaluation]
metrics = ["delta_mae", "pearson_delta"]
n_boot = 0

[tune]
holdout = "ctx0"
metric = "delta_mae"
trials = 6
""")
    record = pk.tune(cfg, tmp_path / "tune", progress=False, log=lambda *a: None)
    assert record["best"]["metric"] == "delta_mae" and record["study"]["direction"] == "minimize"
    assert 0.25 <= record["best"]["sampled"]["scale"] <= 2.0
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    assert (trials.state == "COMPLETE").sum() == 6
    # with the shift planted whole, the best scale found is nearer 1 than the space's ends
    assert abs(record["best"]["sampled"]["scale"] - 1.0) < 0.75
