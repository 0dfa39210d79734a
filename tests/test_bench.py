"""The benchmark harness: config errors, the cross-donor and unbalanced splits, a whole smoke run, the cell
interface a workflow engine uses, resuming after a kill, the RO-Crate (roc-validator) and the HTML report in a
real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMOKE, bench_cli, benchmark_script, check_results_file, skip_without

import perturbkit as pk
from perturbkit import bench, scenarios
from perturbkit.cli import main
from perturbkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def smoke_dict() -> dict:
    return tomllib.loads(SMOKE.read_text())


def write_config(path: Path, d: dict) -> Path:
    cfg = bench.config_from_dict(d)
    path.write_text(bench.to_toml(cfg))
    return path


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 9-cell cut of the smoke config (one seed, loco on ctx0, cross_donor on ctx2, no figures), run plainly."""
    base = tmp_path_factory.mktemp("small")
    out = base / "run"
    assert bench_cli(small_config(base), out) == 0
    return out


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("patch, needle", [
    ({"training": {"epoch": 3}}, "training.epoch: unknown setting. Did you mean 'epochs'"),
    ({"seeds": "0"}, "seeds: expected a list of integers, got '0'"),
    ({"seeds": [0, "1"]}, "seeds[1]: expected an integer"),
    ({"evaluation": {"n_boot": 1.5}}, "evaluation.n_boot: expected an integer"),
    ({"scenarios": {"loko": {}}}, "scenarios.loko: unknown setting. Did you mean 'loco'"),
    ({"scenarios": {"loco": {"min_cell": 3}}}, "scenarios.loco.min_cell: unknown setting. Did you mean 'min_cells'"),
    ({"scenarios": {"unbalanced": {"keep_fraction": 1.5}}}, "scenarios.unbalanced.keep_fraction must be in (0, 1]"),
    ({"models": {"scgne": {}}}, "models.scgne: unknown model 'scgne'. Did you mean 'scgen'"),
    ({"models": {"scgen": {"n_latnt": 4}}}, "models.scgen: scgen: unknown parameter 'n_latnt'. Did you mean 'n_latent'"),
    ({"evaluation": {"metrics": ["r2_mean"]}}, "evaluation.metrics: Unknown metric 'r2_mean'"),
    ({"data": {"sorce": "x"}}, "data.sorce: unknown setting. Did you mean 'source'"),
    ({"output": {"figures": "yes"}}, "output.figures: expected true or false, got 'yes'"),
])
def test_config_errors_name_the_setting(patch, needle):
    d = smoke_dict()
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(d.get(key), dict) and key != "models":
            for k2, v2 in value.items():
                if isinstance(v2, dict) and isinstance(d[key].get(k2), dict):
                    d[key][k2].update(v2)
                else:
                    d[key][k2] = v2
        elif key == "models":
            d["models"] = {**{k: v for k, v in d["models"].items() if k != "scgen"}, **value}
        else:
            d[key] = value
    with pytest.raises(InputError) as err:
        bench.config_from_dict(d)
    assert needle in str(err.value)


def test_config_defaults_and_roundtrip(tmp_path):
    cfg = bench.load_config(SMOKE)
    assert [m.label for m in cfg.models] == ["scgen", "control", "mean_shift", "perturbed_mean", "linear"]
    params = {label: cfg.model(label).build_params(cfg.training) for label in ("scgen", "control")}
    assert params["scgen"]["epochs"] == 2 and "epochs" not in params["control"]
    again = bench.config_from_dict(tomllib.loads(bench.to_toml(cfg)))
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(AttributeError):
        cfg.seeds = (1,)
    kang = bench.load_config(ROOT / "configs" / "kang.toml")  # the shipped config is valid
    assert kang.data.spec.donor_key == "donor" and kang.training.epochs == 10 and len(kang.seeds) == 3
    assert {m.label for m in kang.models} >= {"scgen", "control", "mean_shift"}
    for path in sorted((ROOT / "configs").glob("*.toml")):  # every shipped bench config is valid
        if not path.name.startswith("tune_"):
            assert bench.load_config(path).name == path.stem, path.name


# ------------------------------------------------------------------------------------------------ splits


def test_cross_donor_split(syn):
    spec = pk.PerturbSpec(donor_key="donor")
    s = pk.split.cross_donor(syn, spec, "ctx1", ["d1"])
    obs = syn.obs.astype(str)
    tgt, src, tr = obs.iloc[s.target], obs.iloc[s.source], obs.iloc[s.train]
    assert (tgt.cell_type == "ctx1").all() and (tgt.condition == "stimulated").all() and (tgt.donor == "d1").all()
    assert (src.cell_type == "ctx1").all() and (src.condition == "control").all() and (src.donor == "d1").all()
    assert len(tgt) == 75 and len(src) == 75
    assert not set(s.target) & set(s.train)  # the held-out cells are never trained on
    assert set(s.source) <= set(s.train)  # test donors' controls are training cells (scGen cross-study)
    assert not ((tr.donor == "d1") & (tr.condition == "stimulated")).any()  # no test-donor perturbed cell
    assert ((tr.donor == "d0") & (tr.cell_type == "ctx1") & (tr.condition == "stimulated")).sum() == 75
    assert s.info["test_donors"] == ["d1"] and s.info["train_donors"] == ["d0"]
    unseen = pk.split.cross_donor(syn, spec, "ctx1", ["d1"], context_seen=False, test_controls_in_train=False)
    tr2 = obs.iloc[unseen.train]
    assert not ((tr2.cell_type == "ctx1") & (tr2.condition == "stimulated")).any()
    assert (tr2.donor == "d0").all()
    assert unseen.fingerprint() != s.fingerprint()


@pytest.mark.parametrize("kwargs, needle", [
    ({"test_donors": ["d9"]}, "'d9'"),
    ({"test_donors": ["d1"], "train_donors": ["d1"]}, "both test_donors and train_donors"),
    ({"test_donors": []}, "test_donors is empty"),
])
def test_cross_donor_errors(syn, kwargs, needle):
    with pytest.raises(InputError, match=needle):
        pk.split.cross_donor(syn, pk.PerturbSpec(donor_key="donor"), "ctx1", **kwargs)
    with pytest.raises(InputError, match="donor_key"):
        pk.split.cross_donor(syn, pk.PerturbSpec(), "ctx1", ["d1"])


def test_donor_folds_partition_the_donors(syn):
    spec = pk.PerturbSpec(donor_key="donor")
    folds = pk.split.donor_folds(syn, spec, 2, seed=3)
    assert sorted(d for f in folds for d in f) == ["d0", "d1"]
    assert folds == pk.split.donor_folds(syn, spec, 2, seed=3)
    with pytest.raises(InputError, match="folds"):
        pk.split.donor_folds(syn, spec, 5)


def test_unbalanced_keeps_a_seeded_fraction(syn):
    spec = pk.PerturbSpec()
    keep = pk.split.unbalanced(syn, spec, 0.2, seed=1)
    obs = syn.obs.iloc[keep].astype(str)
    counts = pd.crosstab(obs.cell_type, obs.condition)
    assert (counts["control"] == 150).all() and (counts["stimulated"] == 30).all()
    assert np.array_equal(keep, pk.split.unbalanced(syn, spec, 0.2, seed=1))
    assert not np.array_equal(keep, pk.split.unbalanced(syn, spec, 0.2, seed=2))
    thin = pk.split.unbalanced(syn, spec, 0.1, contexts=["ctx0"], seed=1, protect="ctx1")
    c2 = pd.crosstab(syn.obs.iloc[thin].cell_type.astype(str), syn.obs.iloc[thin].condition.astype(str))
    assert c2.loc["ctx0", "stimulated"] == 15 and c2.loc["ctx1", "stimulated"] == 150
    # a context's draw does not depend on which other contexts are thinned
    both = pk.split.unbalanced(syn, spec, 0.1, contexts=["ctx0", "ctx2"], seed=1)
    ctx0 = lambda idx: set(idx[syn.obs.cell_type.iloc[idx].astype(str).to_numpy() == "ctx0"])  # noqa: E731
    assert ctx0(thin) == ctx0(both)
    with pytest.raises(InputError, match="keep_fraction"):
        pk.split.unbalanced(syn, spec, 0)


# ------------------------------------------------------------------------------------------- a whole run


def test_smoke_run_outputs(smoke_run):
    out = smoke_run
    for name in ("config.toml", "config.json", "scores.csv", "summary.csv", "specificity.csv", "unbalanced.csv",
                 "unbalanced_degs.csv", "run.json", "report.html", "ro-crate-metadata.json"):
        assert (out / name).is_file(), name
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns[:8]) == ["scenario", "split", "model", "seed", "metric", "value", "ci_low", "ci_high"]
    assert set(scores.scenario) == {"loco", "unbalanced", "cross_donor"}
    assert set(scores.model) == {"scgen", "control", "mean_shift", "perturbed_mean", "linear", "ceiling"}
    # one ceiling per (scenario, split, seed, metric); normalised rows: control 0, the planted shift near 1
    ceil = scores[scores.model == "ceiling"]
    assert not ceil.duplicated(["scenario", "split", "seed", "metric"]).any()
    norm = scores[scores.metric == "pearson_delta_norm"].groupby("model").value.mean()
    assert norm["control"] == pytest.approx(0) and norm["mean_shift"] > 0.9
    n_cells = len(bench.list_cells(bench.load_config(SMOKE)))
    assert n_cells == 60 and len(list((out / "cells").iterdir())) == n_cells
    summary = pd.read_csv(out / "summary.csv")
    assert {"mean", "ci_low", "ci_high", "rank", "n_seeds"} <= set(summary.columns)
    pd_all = summary[(summary.scenario == "loco") & (summary.split == "all") & (summary.metric == "pearson_delta")]
    assert pd_all.set_index("model").loc["mean_shift", "rank"] == 1 and (pd_all.n_seeds[pd_all.model != "x"] == 2).all()
    r = pd_all.set_index("model").loc["scgen"]
    assert r.ci_low <= r["mean"] <= r.ci_high
    spec = pd.read_csv(out / "specificity.csv")
    assert set(spec.context) == {"ctx0", "ctx1"} and (spec.n_perturbed == 60).all()
    ub = pd.read_csv(out / "unbalanced.csv")
    # every score has its balanced twin; perturbed_mean predicts one profile for every cell: its variance metrics
    # (r2_var_*, kde_mean_var) are undefined, NaN rows with the reason in scores.csv
    defined = ~ub.metric.str.endswith("_norm") & ~((ub.model == "perturbed_mean") & ub.metric.str.contains("var"))
    assert set(ub.variant) == {"keep", "thin"} and ub[defined].balanced.notna().all()
    degs = pd.read_csv(out / "unbalanced_degs.csv")
    assert {"real cells", "scgen", "mean_shift"} <= set(degs.model) and degs.top_k_overlap.between(0, 1).all()
    figs = {p.name for p in (out / "figures").iterdir()}
    for name in ("heatmap_loco_pearson_delta.png", "seeds_loco_pearson_delta.png", "specificity_pearson_delta.png",
                 "unbalanced_pearson_delta.png", "reg_mean_scgen.png", "reg_var_scgen.png", "pca.png",
                 "violins_top_degs.png"):
        assert name in figs, name
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["sha256"] and run["versions"]["perturbkit"] and not run["missing"]
    assert all(c["status"] == "finished" for c in run["cells"].values())
    res = json.loads((out / "cells" / "cross_donor.ctx2_f0.scgen.s0" / "result.json").read_text())
    assert res["split_info"]["test_donors"] == ["d0"] and res["timings"]["fit_s"] > 0


def test_results_file(smoke_run, small_run, tmp_path):
    """benchmarks/bench_tables.py: the answer table agrees with summary.csv and scores.csv (conftest), every
    scenario has its section, the verdict lines of the report are in it, and --versus sets each trained model's
    scenario score beside another run's (small_run: one seed, other tasks)."""
    text = check_results_file(smoke_run, tmp_path / "results.md", tasks=["ctx0"],
                              extra=["--versus", str(small_run), "one seed"])
    for scenario in ("loco", "unbalanced", "cross_donor"):
        assert f"\n## {scenario} (" in text
    assert "best baseline" in text and "Made by `perturbkit bench X --out Y`" in text
    here, there = (pd.read_csv(r / "summary.csv") for r in (smoke_run, small_run))
    section = text.split("Trained models, one seed")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| scenario")]
    assert {(r[0], r[1]) for r in rows} == {("loco", "scgen"), ("cross_donor", "scgen")}  # small_run's scenarios
    for scenario, model, *cells in rows:
        for metric, cell in zip(["r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance"], cells):
            old, new = (float(cell.split()[i]) for i in (0, 2))
            for table, value in ((there, old), (here, new)):
                want = table[(table.scenario == scenario) & (table.split == "all") & (table.model == model)
                             & (table.metric == metric)]["mean"].iloc[0]
                assert value == pytest.approx(want, abs=5e-4)


def test_results_file_lists_the_cells_notes(smoke_run, tmp_path):
    """benchmarks/bench_tables.py lists run.json's cell notes under their own heading, after the answer."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.csv", "scores.csv"):
        shutil.copy(smoke_run / name, run / name)
    record = json.loads((smoke_run / "run.json").read_text())
    cell = next(iter(record["cells"]))
    record["cells"][cell]["notes"] = ["pred holds 1 value above 30 (planted)"]
    (run / "run.json").write_text(json.dumps(record))
    mod = benchmark_script("bench_tables")
    assert mod.main([str(run), "--command", "perturbkit bench X --out Y", "--out", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "## Notes from the cells\n\nWhat a cell's fit" in text
    assert f"- `{cell}`: pred holds 1 value above 30 (planted)\n" in text
    assert text.index("## The answer") < text.index("## Notes from the cells") < text.index("\n## loco (")
    assert mod.main([str(smoke_run), "--command", "c", "--out", str(tmp_path / "plain.md")]) == 0
    noted = any(c.get("notes") for c in json.loads((smoke_run / "run.json").read_text())["cells"].values())
    assert ("## Notes from the cells" in (tmp_path / "plain.md").read_text()) == noted


def test_crate_lists_every_file(smoke_run):
    crate = json.loads((smoke_run / "ro-crate-metadata.json").read_text())
    graph = {e["@id"]: e for e in crate["@graph"]}
    root = graph["./"]
    files = {p.relative_to(smoke_run).as_posix() for p in smoke_run.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(smoke_run).parts)}
    files.discard("ro-crate-metadata.json")
    listed = {part["@id"] for part in root["hasPart"]}
    assert files <= listed
    action = graph["#bench-run"]
    assert action["startTime"] and action["endTime"] and action["instrument"] == {"@id": "config.toml"}
    assert {"@id": "scores.csv"} in action["result"]
    assert graph["scores.csv"]["sha256"] == pk.data.sha256(smoke_run / "scores.csv")
    params = {e["name"]: e["value"] for e in crate["@graph"] if e.get("@type") == "PropertyValue"}
    assert params["training.epochs"] == 2 and params["models.scgen.n_hidden"] == 32
    data = [e for e in crate["@graph"] if str(e["@id"]).startswith("ni:///sha-256;")]
    assert len(data) == 1 and data[0]["sha256"] == json.loads((smoke_run / "run.json").read_text())["data"]["sha256"]
    assert graph["#perturbkit"]["softwareVersion"] == pk.__version__



def test_crate_validates_with_roc_validator(small_run, offline_rocv):
    for profile in ("ro-crate-1.1", "workflow-run-crate"):
        ok, issues = offline_rocv(small_run, profile, "REQUIRED")
        assert ok, (profile, issues)


def test_report_is_self_contained(smoke_run):
    html = (smoke_run / "report.html").read_text()
    assert html.count('<img src="data:image/png;base64,') == len(list((smoke_run / "figures").iterdir()))
    for external in ('src="http', "<link", "<script", "url(http", "@import"):
        assert external not in html
    assert "Config as run" in html and "Environment" in html and "scgen" in html


def test_report_renders_in_headless_chromium(smoke_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        skip_without("Debian's chromium is not installed (apt-get install -y chromium); .ci/run installs it")
    page = tmp_path / "report.html"
    marker = ('<script>window.addEventListener("load", function () { var im = Array.from(document.images); '
              'var ok = im.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length; '
              'document.body.setAttribute("data-images", im.length + "/" + ok); });</script></body>')
    page.write_text((smoke_run / "report.html").read_text().replace("</body>", marker))
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    n = len(list((smoke_run / "figures").iterdir()))
    assert f'data-images="{n}/{n}"' in dom, dom[-500:]


# ------------------------------------------------------------------------------------- a new scenario


@dataclass(frozen=True)
class ToyConfig:
    """``[scenarios.toy]``: hold out one context, as loco does."""

    context: str = "ctx0"


class Toy(scenarios.Scenario):
    """A scenario defined here, outside perturbkit: one held-out context and a table of its own."""

    name = "toy"
    Config = ToyConfig
    TABLES = (scenarios.Table("toy.csv", "Toy scenario table", caption="Each model's mean on the toy task.",
                              left=3),)

    @classmethod
    def plan(cls, conf, cfg, adata, before):
        return [scenarios.SplitDef(cls.name, scenarios.slug(conf.context), conf.context, conf.context)]

    @classmethod
    def split(cls, sd, adata, spec):
        return pk.split.holdout_cell_type(adata, spec, sd.context)

    @classmethod
    def tables(cls, agg):
        s = agg.summary[(agg.summary.scenario == cls.name) & (agg.summary.split != "all")]
        return {"toy.csv": s[["split", "model", "metric", "mean"]]}


def test_toy_scenario_touches_no_generic_module(tmp_path, monkeypatch):
    monkeypatch.setitem(scenarios.SCENARIOS, "toy", Toy)
    d = smoke_dict()
    d["seeds"] = [0]
    d["models"] = {"mean_shift": {}}
    d["scenarios"] = {"toy": {"context": "ctx1"}}
    bad = {**d, "scenarios": {"toy": {"contxt": "ctx1"}}}
    with pytest.raises(InputError, match=r"scenarios.toy.contxt: unknown setting. Did you mean 'context'"):
        bench.config_from_dict(bad)
    cfg = bench.config_from_dict(d)
    assert cfg.to_dict()["scenarios"] == {"loco": None, "unbalanced": None, "cross_donor": None,
                                          "context_transfer": None, "unseen_combination": None,
                                          "cross_study": None, "toy": {"context": "ctx1"}}
    out = tmp_path / "toy"
    done = bench.run(cfg, out, progress=False, log=lambda *a: None)
    assert done["ran"] == ["toy.ctx1.mean_shift.s0", "toy.ctx1.control.s0", "toy.ctx1.perturbed_mean.s0",
                          "toy.ctx1.linear.s0"] and not done["failed"]
    res = json.loads((out / "cells" / "toy.ctx1.mean_shift.s0" / "result.json").read_text())
    assert res["split_info"]["n_target"] == 60 and res["context"] == "ctx1"
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores.scenario) == {"toy"} and set(scores.split) == {"ctx1"}
    toy = pd.read_csv(out / "toy.csv")
    assert set(toy.model) == {"mean_shift", "control", "perturbed_mean", "linear", "ceiling"}
    assert toy[toy.metric == "pearson_delta"].set_index("model")["mean"]["mean_shift"] > 0.9
    assert "toy.csv" in json.loads((out / "run.json").read_text())["tables"]
    assert (out / "figures" / "heatmap_toy_pearson_delta.png").is_file()
    html = (out / "report.html").read_text()
    assert "<h2>Toy scenario table</h2>" in html and "Each model&#x27;s mean on the toy task." in html
    assert "ro-crate-metadata.json" in {p.name for p in out.iterdir()}


# --------------------------------------------------------------------------------- cells, resume, kill


def small_config(tmp_path: Path, **training) -> Path:
    """smoke.toml cut down: one seed, loco on ctx0 and cross_donor on ctx2, no figures (15 cells: 3 tasks x scGen and 4 baselines)."""
    d = smoke_dict()
    d["seeds"] = [0]
    d["scenarios"] = {"loco": {"contexts": ["ctx0"], "min_cells": 20},
                      "cross_donor": {"contexts": ["ctx2"], "folds": 2, "min_cells": 10}}
    d["output"]["figures"] = False
    d["training"].update(training)
    return write_config(tmp_path / "small.toml", d)


def test_a_worker_goes_on_after_a_cells_input_error(tmp_path, monkeypatch):
    """--keep-going (each worker of --jobs runs with it): one cell's InputError (a prediction the metrics
    refuse) is that cell's failure, reported, and the worker's other cells still run; without it the error
    stops the run at once."""
    from perturbkit.bench import execute

    config = small_config(tmp_path)
    bad, good = "loco.ctx0.control.s0", "loco.ctx0.mean_shift.s0"
    real = execute.run_cell

    def run_cell(cfg, out, cell, ctx, **kw):
        if cell.id == bad:
            raise InputError("pred looks like raw counts (planted)")
        return real(cfg, out, cell, ctx, **kw)

    monkeypatch.setattr(execute, "run_cell", run_cell)
    out = tmp_path / "run"
    with pytest.raises(InputError, match="planted"):
        execute.run(config, out, cells=[bad, good], do_aggregate=False, progress=False, log=lambda *a: None)
    assert bench.rundir.cell_result(out, good) is None
    with pytest.raises(execute.CellsFailed, match=rf"1 cell\(s\) failed: {bad}: InputError: pred looks like raw"):
        execute.run(config, out, cells=[bad, good], do_aggregate=False, progress=False, keep_going=True,
                    log=lambda *a: None)
    assert bench.rundir.cell_result(out, good) is not None and bench.rundir.cell_result(out, bad) is None


def test_cells_one_by_one_equal_the_plain_run(small_run, tmp_path, capsys):
    config, plain, out = small_run / "config.toml", small_run, tmp_path / "fanout"
    assert main(["bench", str(config), "--list-cells"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 15 and ids[0] == "loco.ctx0.scgen.s0"
    assert main(["bench", str(config), "--out", str(out), "--aggregate"]) == 2  # nothing finished yet
    assert "have not finished" in capsys.readouterr().err
    for cell in reversed(ids):  # any order, as a workflow engine may run them
        assert bench_cli(config, out, "--cell", cell) == 0
    assert not (out / "scores.csv").exists()  # --cell does not aggregate
    assert main(["bench", str(config), "--out", str(out), "--aggregate"]) == 0
    for name in ("scores.csv", "summary.csv"):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    capsys.readouterr()
    assert main(["bench", str(config), "--list-cells", "--json", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(r["finished"] for r in rows) and rows[0]["context"] == "ctx0"
    assert main(["bench", str(config), "--out", str(out), "--cell", "loco.ctx9.scgen.s0"]) == 2
    assert "is not a cell of this config" in capsys.readouterr().err


def test_parallel_workers_equal_the_plain_run(small_run, tmp_path, capfd):
    config, plain, out = small_run / "config.toml", small_run, tmp_path / "jobs"
    assert bench_cli(config, out, "--jobs", "2") == 0
    err = capfd.readouterr().err
    assert "15 cells in 2 worker processes" in err
    ran = re.findall(r"^\[\d+/15\] (\S+): fit", err, flags=re.M)  # the workers' lines: one per cell run
    assert sorted(ran) == sorted(p.name for p in (out / "cells").iterdir()) and len(ran) == 15
    assert not list((out / bench.CACHE_DIR).glob("claims-*"))  # the shared queue is removed after the run
    for name in ("scores.csv", "summary.csv"):
        assert (out / name).read_bytes() == (plain / name).read_bytes(), name
    assert main(["bench", str(config), "--out", str(out), "--jobs", "0"]) == 2


def test_cell_notes_reach_run_json_and_the_report(small_run, tmp_path):
    """What the evaluation noted about one cell (here planted: a prediction with values above 30) is listed
    in run.json and in report.html, not only in that cell's result.json."""
    out = tmp_path / "noted"
    shutil.copytree(small_run, out)
    cell = "loco.ctx0.scgen.s0"
    path = out / "cells" / cell / "result.json"
    result = json.loads(path.read_text())
    note = "pred holds 6 values above 30 (max 46.9) in 6 of 80 cells (planted)"
    result["evaluation"]["notes"] = {"scgen": [note]}
    path.write_text(json.dumps(result))
    assert main(["bench", str(out / "config.toml"), "--out", str(out), "--aggregate"]) == 0
    cells = json.loads((out / "run.json").read_text())["cells"]
    assert cells[cell]["notes"] == [note] and not any("notes" in c for k, c in cells.items() if k != cell)
    html = (out / "report.html").read_text()
    assert "Notes from the cells" in html and note in html and cell in html
    assert "Notes from the cells" not in (small_run / "report.html").read_text()


def test_a_cells_warnings_are_recorded_and_still_shown(tmp_path, monkeypatch):
    """perturbkit's warnings while a cell's model is fitted and predicts go into its result.json (and so into
    run.json's notes and the report), and are still warned, once each."""
    from perturbkit import engine
    from perturbkit.bench import execute
    from perturbkit.bench.aggregate import cell_notes
    from perturbkit.errors import InputWarning

    real = engine.fit_predict
    text = "cellot: 19 of 2219 cells transported by the map land far away (planted)"

    def fit_predict(*args, **kw):
        for _ in range(3):
            warnings.warn(InputWarning(text), stacklevel=1)
        return real(*args, **kw)

    monkeypatch.setattr(engine, "fit_predict", fit_predict)
    out, cell = tmp_path / "run", "loco.ctx0.mean_shift.s0"
    with pytest.warns(InputWarning, match="planted") as shown:
        execute.run(small_config(tmp_path), out, cells=[cell], do_aggregate=False, progress=False,
                    log=lambda *a: None)
    assert sum(text in str(w.message) for w in shown) == 1
    result = bench.rundir.cell_result(out, cell)
    assert result["warnings"] == [text] and cell_notes(result) == [text]


def test_workers_share_one_queue(tmp_path):
    """A worker runs only the cells it claims first (so a worker that dies loses one cell, not a share)."""
    from perturbkit.bench import execute

    config, claims = small_config(tmp_path), tmp_path / "claims"
    claims.mkdir()
    taken, mine = "loco.ctx0.control.s0", "loco.ctx0.mean_shift.s0"
    assert execute.claim(claims, taken) and not execute.claim(claims, taken)  # another worker has it now
    out = tmp_path / "run"
    summary = execute.run(config, out, cells=[taken, mine], do_aggregate=False, progress=False, keep_going=True,
                          claims=claims, jobs=2, log=lambda *a: None)
    assert summary["ran"] == [mine] and bench.rundir.cell_result(out, taken) is None
    assert sorted(p.name for p in claims.iterdir()) == sorted([taken, mine])
    with pytest.raises(InputError, match="claims .* is not a folder"):
        execute.run(config, out, cells=[mine], claims=tmp_path / "none", log=lambda *a: None)


def test_rerun_skips_and_other_config_is_refused(smoke_run, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in (smoke_run / "cells").glob("*/result.json")}
    assert bench_cli(SMOKE, smoke_run) == 0
    err = capsys.readouterr().err
    assert "60 of 60 cells already finished" in err and "up to date" in err
    assert {p: p.stat().st_mtime_ns for p in (smoke_run / "cells").glob("*/result.json")} == before
    d = smoke_dict()
    d["training"]["epochs"] = 3
    other = write_config(tmp_path / "other.toml", d)
    assert main(["bench", str(other), "--out", str(smoke_run)]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "training.epochs: 2 there, 3 now" in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["bench", str(SMOKE), "--out", str(foreign)]) == 2
    assert "not a perturbkit bench run" in capsys.readouterr().err


def test_killed_run_resumes_without_recomputing(tmp_path):
    config = small_config(tmp_path, epochs=20)  # slower cells, so that the kill lands in the middle of the run
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "perturbkit", "bench", str(config), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("cells/*/result.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-800:]  # as a shell reports a SIGTERM exit
    finished = {p: (p.stat().st_mtime_ns, p.read_text()) for p in out.glob("cells/*/result.json")}
    assert 3 <= len(finished) < 9
    assert not list(out.rglob(".*.tmp*"))  # the write in progress was removed
    for res in finished:
        json.loads(res.read_text())  # complete
        pd.read_csv(res.parent / "scores.csv")
    assert not (out / "scores.csv").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-800:]
    assert f"{len(finished)} of 15 cells already finished" in rerun.stderr
    for res, (mtime, text) in finished.items():  # not recomputed, not rewritten
        assert res.stat().st_mtime_ns == mtime and res.read_text() == text
    assert len(list(out.glob("cells/*/result.json"))) == 15
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores.scenario) == {"loco", "cross_donor"} and scores.value.notna().any()
