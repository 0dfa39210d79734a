"""The screen scenarios of the benchmark harness: context transfer and unseen combinations end to end on a
synthetic screen (configs/screens_smoke.toml), the per-perturbation tables, the filters, resuming, run
directories made before scores had a perturbation column, and the single-perturbation results unchanged."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SMOKE, bench_cli, check_results_file

import perturbkit as pk
from perturbkit import bench
from perturbkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SCREENS_SMOKE = ROOT / "configs" / "screens_smoke.toml"
#: configs/smoke.toml's summary.csv as written by perturbkit before scores had a perturbation column
SMOKE_BEFORE = Path(__file__).parent / "data" / "smoke_summary_before_perturbation.csv"
PERTS = ["A", "A+B", "B", "C", "C+D", "D"]


def screens_dict() -> dict:
    return tomllib.loads(SCREENS_SMOKE.read_text())


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"perturbation": str, "split": str})


@pytest.fixture(scope="module")
def screens_run(tmp_path_factory):
    """configs/screens_smoke.toml run once through the CLI."""
    out = tmp_path_factory.mktemp("screens") / "run"
    assert bench_cli(SCREENS_SMOKE, out) == 0
    return out


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("patch, needle", [
    ({"scenarios": {"loco": {}}}, "scenarios.loco predicts one perturbation, but data.perturbed = \"all\" asks for a "
                                  "screen"),
    ({"data": {"source": "synthetic_screen", "perturbed": "A"}, "scenarios": {"unseen_combination": {}}},
     "scenarios.unseen_combination predicts combinations of perturbations, but data.perturbed = 'A' is one label"),
    ({"scenarios": {"context_transfer": {"filter": {"dataset": {"a": 1}}}}},
     "scenarios.context_transfer.filter.dataset: expected a value or a non-empty list of values"),
    ({"data": {"source": "synthetic_screen", "perturbed": "all", "filter": {"cell_type": []}}},
     "data.filter.cell_type: expected a value or a non-empty list"),
    ({"scenarios": {"unseen_combination": {"min_cells": 2}}}, "scenarios.unseen_combination.min_cells must be >= 3"),
])
def test_screen_config_errors(patch, needle):
    d = screens_dict()
    for key, value in patch.items():
        d[key] = {**d.get(key, {}), **value} if key != "scenarios" else {**d["scenarios"], **value}
    with pytest.raises(InputError) as err:
        bench.config_from_dict(d)
    assert needle in str(err.value)


@pytest.mark.parametrize("scenarios, needle", [
    ({"context_transfer": {"contexts": ["ctx9"]}}, "scenarios.context_transfer.contexts: 'ctx9' is not a value"),
    ({"unseen_combination": {"combinations": ["A+C"]}}, "'A+C' is not a requested combination"),
    ({"context_transfer": {"filter": {"dataset": "x"}}}, "scenarios.context_transfer.filter: 'dataset' is not an obs "
                                                         "column"),
    ({"context_transfer": {"filter": {"cell_type": "ctx7"}}}, "no cell has cell_type = 'ctx7'"),
])
def test_screen_plan_errors(scenarios, needle):
    d = screens_dict()
    d["scenarios"] = scenarios
    with pytest.raises(InputError) as err:
        bench.list_cells(bench.config_from_dict(d))
    assert needle in str(err.value)


def test_cells_and_baselines_of_a_screen():
    cfg = bench.load_config(SCREENS_SMOKE)
    assert [m.label for m in cfg.models] == ["scgen", "scpram", "control", "mean_shift", "perturbed_mean", "linear",
                                             "additive"]
    cells = bench.list_cells(cfg, as_dicts=True)
    by = pd.DataFrame(cells).groupby(["scenario", "model"]).size()
    # 3 contexts x 2 seeds; 2 combinations x 2 seeds; mean_shift and linear cannot predict an unseen
    # combination: no cells; perturbed_mean predicts any perturbation
    assert by["context_transfer"].to_dict() == {"additive": 6, "control": 6, "linear": 6, "mean_shift": 6,
                                                "perturbed_mean": 6, "scgen": 6, "scpram": 6}
    assert by["unseen_combination"].to_dict() == {"additive": 4, "control": 4, "perturbed_mean": 4, "scgen": 4,
                                                  "scpram": 4}
    assert cells[0]["id"] == "context_transfer.ctx0.scgen.s0" and "unseen_combination.a_b.additive.s1" in \
        {c["id"] for c in cells}
    # the additive baseline runs only where a combination is predicted: a screen without one gives it no cells
    d = screens_dict()
    d["data"]["perturbed"] = ["A", "B", "C"]
    d["scenarios"] = {"context_transfer": d["scenarios"]["context_transfer"]}
    d["models"]["additive"] = {}
    cfg = bench.config_from_dict(d)
    assert "additive" in {m.label for m in cfg.models}
    assert {c.split(".")[2] for c in bench.list_cells(cfg)} == {"scgen", "scpram", "control", "mean_shift",
                                                           "perturbed_mean", "linear"}


def test_filters_choose_the_cells(tmp_path):
    d = screens_dict()
    d["data"]["filter"] = {"cell_type": ["ctx0", "ctx1"]}  # global: before preprocessing
    d["scenarios"] = {"context_transfer": {"min_cells": 20}}
    cfg = bench.config_from_dict(d)
    assert {c.split(".")[1] for c in bench.list_cells(cfg)} == {"ctx0", "ctx1"}
    d["data"].pop("filter")
    d["scenarios"] = {"context_transfer": {"min_cells": 20, "filter": {"cell_type": ["ctx1", "ctx2"]}}}
    cfg = bench.config_from_dict(d)
    ctx = bench.Context(cfg, tmp_path / "run", log=lambda *a: None)
    cells = bench.plan(cfg, ctx.planning_data())
    assert {c.split.context for c in cells} == {"ctx1", "ctx2"}
    s = ctx.split(cells[0].split)
    obs = ctx.data().obs.astype(str)
    assert set(obs.cell_type.iloc[s.train]) == {"ctx1", "ctx2"}  # the filter holds for training cells too
    assert set(obs.cell_type.iloc[s.target]) == {"ctx1"} and set(obs.condition.iloc[s.target]) == set(PERTS)
    assert s.info["filter"] == {"cell_type": ["ctx1", "ctx2"]} and s.info["perturbations"] == PERTS
    # the global filter is part of the data cache key; the scenario's filter is not (same preprocessed data)
    other = bench.Context(bench.config_from_dict({**d, "data": {**d["data"], "filter": {"cell_type": "ctx1"}}}),
                          tmp_path / "run")
    assert other.cache_file() != ctx.cache_file()


def test_context_transfer_of_one_perturbation_is_loco():
    d = tomllib.loads(SMOKE.read_text())
    d["scenarios"] = {"loco": {"contexts": ["ctx0", "ctx1"], "min_cells": 20},
                      "context_transfer": {"contexts": ["ctx0", "ctx1"], "min_cells": 20}}
    cfg = bench.config_from_dict(d)
    ctx = bench.Context(cfg, None, log=lambda *a: None)
    splits = bench.plan_splits(cfg, ctx.planning_data())
    loco = {s.context: ctx.split(s) for s in splits if s.scenario == "loco"}
    transfer = {s.context: ctx.split(s) for s in splits if s.scenario == "context_transfer"}
    assert {c: s.fingerprint() for c, s in loco.items()} == {c: s.fingerprint() for c, s in transfer.items()}
    assert [c for c in bench.list_cells(cfg) if c.startswith("loco.")][:2] == ["loco.ctx0.scgen.s0",
                                                                              "loco.ctx0.control.s0"]


# ------------------------------------------------------------------------------------------- a whole run


def test_screen_run_outputs(screens_run):
    out = screens_run
    for name in ("scores.csv", "summary.csv", "perturbations.csv", "screen_summary.csv", "effects.csv", "run.json",
                 "report.html", "ro-crate-metadata.json"):
        assert (out / name).is_file(), name
    scores = read(out / "scores.csv")
    assert list(scores.columns) == list(bench.SCORE_COLUMNS)
    ct = scores[scores.scenario == "context_transfer"]
    # every perturbation of every held-out context is scored, for each model and the ceiling
    per = ct[~ct.perturbation.isin(["mean", "mean_responsive", "all"])]
    assert set(per.perturbation) == set(PERTS)
    assert per.groupby(["split", "model", "seed"]).perturbation.nunique().eq(len(PERTS)).all()
    assert (per[per.perturbation == "A"].n_target == 40).all()
    assert {"mean", "mean_responsive", "all"} <= set(ct.perturbation)
    cross = set(ct[ct.perturbation == "all"].metric)
    assert {"discrimination_score", "pearson_delta_systema", "share_beats_mean_shift"} <= cross
    # the planted responses: mean_shift recovers the singles (and additive the combinations), control does not
    pd_mean = ct[(ct.perturbation == "mean") & (ct.metric == "pearson_delta")].groupby("model").value.mean()
    assert pd_mean["mean_shift"] > 0.75 and pd_mean["control"] == pytest.approx(0)
    assert not ct[ct.metric.str.endswith("_norm")].empty
    uc = scores[scores.scenario == "unseen_combination"]
    assert set(uc.model) == {"scgen", "scpram", "control", "perturbed_mean", "additive", "ceiling"}  # no mean_shift
    assert set(uc.perturbation) >= {"A+B", "C+D"}
    combo = uc[(uc.metric == "pearson_delta") & uc.perturbation.isin(["A+B", "C+D"])].groupby("model").value.mean()
    assert combo["additive"] > 0.95 and combo["additive"] > combo["control"] + 0.9  # the additive truth
    assert "share_beats_additive" in set(uc.metric)

    effects = read(out / "effects.csv")
    tests = effects[effects.scenario == "context_transfer"].groupby("perturbation").statistic.mean()
    assert tests["D"] < 0.1 * tests[["A", "B", "C"]].min()  # D: the null perturbation
    assert effects[effects.perturbation.isin(["A", "B", "C", "A+B", "C+D"])].responsive.all()

    table = read(out / "perturbations.csv")
    assert {"scenario", "split", "perturbation", "model", "metric", "mean", "ci_low", "ci_high", "responsive",
            "q_value"} <= set(table.columns)
    assert set(table.perturbation) == set(PERTS) and set(table.scenario) == {"context_transfer",
                                                                              "unseen_combination"}
    summary = read(out / "screen_summary.csv")
    base = summary.groupby("scenario").baseline.agg(lambda b: {x for x in b if isinstance(x, str) and x})
    assert base["context_transfer"] == {"mean_shift"} and base["unseen_combination"] == {"additive"}
    row = summary[(summary.scenario == "unseen_combination") & (summary.model == "control")
                  & (summary.metric == "pearson_delta") & (summary.over == "all")].iloc[0]
    assert row["diff"] < -0.9 and row.diff_ci_low <= row["diff"] <= row.diff_ci_high
    assert {"all", "responsive", "cross"} == set(summary.over)

    figs = {p.name for p in (out / "figures").iterdir()}
    for name in ("perturbations_context_transfer.png", "perturbations_unseen_combination.png",
                 "versus_context_transfer_mean_shift.png", "versus_unseen_combination_additive.png",
                 "reg_mean_unseen_combination_a_b.png", "heatmap_context_transfer_pearson_delta.png"):
        assert name in figs, name
    assert sum(f.startswith("reg_mean_context_transfer_") for f in figs) == 3  # the top 3 by effect size
    html = (out / "report.html").read_text()
    assert "Screens: per perturbation" in html and "Screens: models against the baseline" in html
    assert html.count('<img src="data:image/png;base64,') == len(figs)
    res = json.loads((out / "cells" / "context_transfer.ctx1.control.s0" / "result.json").read_text())
    assert {e["perturbation"] for e in res["effects"]} == set(PERTS) and res["perturbations"] == PERTS
    pred = pk.data.read_h5ad(out / "cells" / "context_transfer.ctx0.scgen.s0" / "pred.h5ad")
    assert set(pred.obs.condition.astype(str)) == set(PERTS) and pred.n_obs == 40 * len(PERTS)


def test_screen_run_resumes(screens_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(screens_run, out)
    gone = ["context_transfer.ctx2.scgen.s1", "unseen_combination.c_d.control.s0"]
    for cell in gone:
        (out / "cells" / cell / "result.json").unlink()
    capsys.readouterr()
    assert bench_cli(SCREENS_SMOKE, out) == 0
    err = capsys.readouterr().err
    assert "60 of 62 cells already finished" in err
    for name in ("scores.csv", "summary.csv", "perturbations.csv", "screen_summary.csv", "effects.csv"):
        assert (out / name).read_bytes() == (screens_run / name).read_bytes(), name


# ------------------------------------------------------------------------- one perturbation, old run dirs


def test_single_perturbation_results_unchanged(smoke_run):
    """configs/smoke.toml's summary.csv is the one perturbkit wrote before the perturbation column (the column
    aside) for the models it had then: baselines and ceiling to 1e-9, the scGen rows to 1e-4 (torch arithmetic
    may differ by platform); the ranks are left out (the baselines added since, perturbed_mean and linear, take
    places among them)."""
    now = read(smoke_run / "summary.csv")
    assert (now.perturbation == "stimulated").all()
    before = read(SMOKE_BEFORE)
    assert set(now.model) == set(before.model) | {"perturbed_mean", "linear"}
    now = now[now.model.isin(set(before.model))].drop(columns="perturbation").reset_index(drop=True)
    assert list(now.columns) == list(before.columns)
    keys = ["scenario", "split", "model", "metric"]
    assert now[keys].equals(before[keys])
    assert now["n_seeds"].equals(before["n_seeds"])
    exact = now.model != "scgen"
    for col in ("mean", "sd", "ci_low", "ci_high"):
        assert np.allclose(now[col][exact], before[col][exact], rtol=1e-9, atol=1e-12, equal_nan=True), col
        assert np.allclose(now[col][~exact], before[col][~exact], rtol=1e-4, atol=1e-4, equal_nan=True), col
    scores = read(smoke_run / "scores.csv")
    assert list(scores.columns) == list(bench.SCORE_COLUMNS) and (scores.perturbation == "stimulated").all()


def test_old_run_directory_resumes(smoke_run, tmp_path, capsys):
    """A run directory as perturbkit wrote it before (no perturbation column in the cells' scores.csv, a
    config.json without the settings added since): only the missing cells run, and the result is the same."""
    out = tmp_path / "old"
    shutil.copytree(smoke_run, out)
    for f in (out / "cells").glob("*/scores.csv"):
        t = pd.read_csv(f, dtype=str, keep_default_na=False)
        f.write_text(t.drop(columns="perturbation").to_csv(index=False, lineterminator="\n"))
    config = json.loads((out / "config.json").read_text())
    for key in ("filter", "synthetic_screen", "combo_delimiter"):
        del config["data"][key]
    for key in ("context_transfer", "unseen_combination"):
        del config["scenarios"][key]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in ("scores.csv", "summary.csv", "run.json"):
        (out / f).unlink()
    gone = ["loco.ctx0.scgen.s1", "unbalanced.thin_ctx1.control.s0", "cross_donor.ctx2_f1.mean_shift.s1"]
    for cell in gone:
        (out / "cells" / cell / "result.json").unlink()
    capsys.readouterr()
    assert bench_cli(SMOKE, out) == 0
    assert "57 of 60 cells already finished" in capsys.readouterr().err
    for name in ("scores.csv", "summary.csv", "specificity.csv", "unbalanced.csv"):
        assert (out / name).read_bytes() == (smoke_run / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == json.loads((smoke_run / "config.json").read_text())


def test_old_config_json_is_the_same_run_only_at_defaults():
    cfg = bench.load_config(SMOKE)
    new = cfg.to_dict()
    old = json.loads(json.dumps(new))
    del old["data"]["filter"], old["scenarios"]["context_transfer"], old["data"]["synthetic_screen"]
    assert bench.same_run(old, new)
    changed = json.loads(json.dumps(old))
    changed["training"]["epochs"] = 3
    assert not bench.same_run(changed, new)
    d = tomllib.loads(SMOKE.read_text())
    d["data"]["filter"] = {"donor": "d0"}  # a setting added since, not at its default: another run
    filtered = bench.config_from_dict(d).to_dict()
    assert not bench.same_run(old, filtered) and bench.same_run(filtered, filtered)


def test_results_file_of_a_screen(screens_run, tmp_path):
    """benchmarks/bench_tables.py on a screen run: scenario scores are each task's mean over its perturbations."""
    text = check_results_file(screens_run, tmp_path / "results.md")
    assert "\n## context_transfer (" in text and "\n## unseen_combination (" in text
