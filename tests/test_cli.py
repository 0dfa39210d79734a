"""The CLI contract: predict writes four complete files, reruns are byte-identical, bad input exits 2."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_ARGS

from perturbkit.cli import main

FAST = [*SMALL_ARGS, "--n-boot", "10", "--no-progress"]


def predict(syn_path, out, *extra):
    return main(["predict", "--data", str(syn_path), "--model", "scgen", "--holdout", "ctx2", "--epochs", "3",
                 "--seed", "0", "--device", "cpu", "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def run_dir(syn_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert predict(syn_path, out) == 0
    return out


def test_predict_writes_contract_files(run_dir, syn_path):
    assert sorted(p.name for p in run_dir.iterdir()) == ["effects.csv", "pred.h5ad", "record.json", "reg_mean.png",
                                                         "scores.csv"]
    scores = pd.read_csv(run_dir / "scores.csv")
    assert list(scores.columns[:4]) == ["model", "perturbation", "metric", "value"]  # issue 16: + perturbation
    assert set(scores.perturbation) == {"stimulated"}
    assert {"scgen", "control", "mean_shift", "ceiling"} <= set(scores.model)
    for model in ("scgen", "control", "mean_shift"):
        got = set(scores[scores.model == model].metric)
        assert {"r2_mean_all", "r2_mean_top100", "pearson_delta", "r2_mean_all_norm"} <= got
    top = scores[(scores.model == "scgen") & (scores.metric == "r2_mean_all")].iloc[0]
    assert top.ci_low <= top.ci_high
    record = json.loads((run_dir / "record.json").read_text())
    assert record["config"]["seed"] == 0 and record["config"]["epochs"] == 3
    assert record["data"]["sha256"] and record["versions"]["torch"]
    assert record["execution"]["device"] == "cpu" and record["execution"]["device_name"]  # --device cpu
    assert record["execution"]["guarantee"].startswith("byte-identical")
    effects = pd.read_csv(run_dir / "effects.csv")  # one perturbation: one row of the effect test
    assert list(effects.perturbation) == ["stimulated"] and effects.responsive.all()
    assert record["preprocessing"]["input"] == "log-normalised"
    assert record["split"]["n_target"] == 150 and record["timings"]["fit_s"]["scgen"] > 0
    assert record["models"]["scgen"]["fit"]["history"]["epochs_run"] == 3
    pred = ad.read_h5ad(run_dir / "pred.h5ad")
    assert pred.n_obs == 150 and (pred.obs["condition"] == "stimulated").all()
    assert (run_dir / "reg_mean.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_same_seed_is_byte_identical(run_dir, syn_path):
    before = (run_dir / "scores.csv").read_bytes()
    X_before = ad.read_h5ad(run_dir / "pred.h5ad").X.copy()
    assert predict(syn_path, run_dir) == 0  # same config into the same directory: allowed
    assert (run_dir / "scores.csv").read_bytes() == before
    assert np.array_equal(ad.read_h5ad(run_dir / "pred.h5ad").X, X_before)


def test_out_dir_of_another_run_is_refused(run_dir, syn_path, capsys):
    assert predict(syn_path, run_dir, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--force" in err and "Traceback" not in err


@pytest.mark.parametrize("args, needle", [
    (["--data", "missing.h5ad"], "does not exist"),
    (["--model", "scgne"], "scgen"),
    (["--holdout", "ctx9"], "ctx9"),
    (["--control", "ctrl"], "--control 'ctrl'"),
    (["--context-key", "celltype"], "cell_type"),
    (["--metrics", "r2_mean"], "r2_mean_all"),
    (["--param", "n_latnt=4"], "n_latent"),
    (["--epochs", "0"], "--epochs"),
])
def test_bad_input_exits_2_with_one_clear_line(syn_path, tmp_path, capsys, args, needle):
    base = {"--data": str(syn_path), "--model": "scgen", "--holdout": "ctx2"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["predict", *[x for kv in base.items() for x in kv], "--out", str(tmp_path / "o"), *FAST]
    argv += [a for a in args if a not in base and a not in base.values()]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert not (tmp_path / "o" / "scores.csv").exists()


def test_evaluate_command_scores_any_prediction(run_dir, syn_path, tmp_path, capsys):
    syn = ad.read_h5ad(syn_path)
    ctx, cond = syn.obs["cell_type"], syn.obs["condition"]
    syn[(ctx == "ctx2") & (cond == "stimulated")].write_h5ad(tmp_path / "truth.h5ad")
    syn[(ctx == "ctx2") & (cond == "control")].write_h5ad(tmp_path / "source.h5ad")
    out = tmp_path / "scores.csv"
    assert main(["evaluate", "--truth", str(tmp_path / "truth.h5ad"), "--pred", str(run_dir / "pred.h5ad"),
                 "--source", str(tmp_path / "source.h5ad"), "--n-boot", "10", "--out", str(out)]) == 0
    mine = pd.read_csv(out).set_index("metric").value
    theirs = pd.read_csv(run_dir / "scores.csv").query("model == 'scgen'").set_index("metric").value
    assert mine["r2_mean_all"] == pytest.approx(theirs["r2_mean_all"], abs=1e-9)


def test_list_metrics_and_entry_point():
    out = subprocess.run([sys.executable, "-m", "perturbkit", "list", "metrics"], capture_output=True, text=True)
    assert out.returncode == 0 and "r2_mean_top100" in out.stdout and "higher" in out.stdout
    out = subprocess.run([sys.executable, "-m", "perturbkit", "predict", "--data", "nope", "--holdout", "x",
                          "--out", "/tmp/never"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "kang2018" in out.stderr
