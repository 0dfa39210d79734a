"""Issue 7: bad input fails up front with one clear message; interrupted runs leave nothing half-written; reruns
are byte-identical. docs/errors.md lists every case below with the message it prints.

Every case runs on tiny seeded synthetic data; nothing here trains for more than a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import perturbkit as pk
from conftest import SMALL, SMALL_ARGS, synthetic

from perturbkit import _io
from perturbkit.cli import main
from perturbkit.errors import InputError, InputWarning, Interrupted
from perturbkit.models import get

SPEC = pk.PerturbSpec()
TINY_VAE = SMALL_ARGS


def tiny(**kw):
    """3 contexts x 2 conditions x 30 cells, 20 genes, log-scale values (ctx0, ctx1, ctx2)."""
    return synthetic(**{"n_contexts": 3, "n_cells": 30, "n_genes": 20, "n_responsive": 5, **kw})


@pytest.fixture(scope="module")
def base():
    return tiny()


def counts_of(a):
    out = a.copy()
    out.X = np.random.default_rng(0).poisson(np.expm1(np.clip(a.X, 0, None)) * 5).astype(np.float32)
    return out


def drop(a, mask):
    return a[~np.asarray(mask)].copy()


def is_(a, ctx=None, cond=None):
    m = np.ones(a.n_obs, bool)
    if ctx is not None:
        m &= (a.obs["cell_type"] == ctx).to_numpy()
    if cond is not None:
        m &= (a.obs["condition"] == cond).to_numpy()
    return m


# ------------------------------------------------------------------------------ file makers (path -> None)


def _h5ad(transform):
    def make(path: Path, a):
        transform(a).write_h5ad(path)
    return make


def _set_X(value_fn):
    def t(a):
        a = a.copy()
        a.X = value_fn(a)
        return a
    return t


def _inject(value):
    def f(X_or_adata):
        X = np.array(getattr(X_or_adata, "X", X_or_adata))
        X[3, 4] = value
        return X
    return f


def _dup_genes(a):
    a = a.copy()
    a.var_names = [f"g{i % 10}" for i in range(a.n_vars)]
    return a


def _dup_cells(a):
    a = a.copy()
    a.obs_names = ["c"] * 2 + list(a.obs_names[2:])
    return a


def _x_none(a):
    a = a.copy()
    a.layers["counts"] = a.X.copy()
    a.X = None
    return a


def _text_file(path, a):
    path.write_text("cell,gene1\nc1,3\n")


def _truncated(path, a):
    a.write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path, a):
    a.write_h5ad(path)
    data = path.read_bytes()
    path.write_bytes(data[:8] + bytes(len(data) - 8))


def _plain_hdf5(path, a):
    with h5py.File(path, "w") as fh:
        fh["matrix"] = np.zeros((3, 3))


def _directory(path, a):
    path.mkdir()


# ------------------------------------------------------------------------------------------- CLI cases
# (id, what the user did, file maker or None, argv overrides / extra args, substring of the message)
PREDICT_CASES = [
    ("missing_file", "--data names a file that does not exist", None, {"--data": "nope/missing.h5ad"},
     "does not exist"),
    ("not_h5ad", "--data is a CSV text file named .h5ad", _text_file, {}, "not an HDF5/.h5ad file"),
    ("truncated", "--data is an .h5ad cut in half (interrupted copy)", _truncated, {}, "truncated or corrupt"),
    ("corrupt", "--data has its HDF5 body overwritten with zeros", _corrupt, {}, "truncated or corrupt"),
    ("plain_hdf5", "--data is an HDF5 file that is not AnnData", _plain_hdf5, {}, "not an AnnData .h5ad"),
    ("directory", "--data is a directory (e.g. a .zarr store)", _directory, {}, "is a directory"),
    ("unknown_dataset", "--data is neither a bundled name nor a file", None, {"--data": "kang2019"},
     "Did you mean 'kang2018'"),
    ("no_condition_key", "--condition-key not an obs column", "base", {"--condition-key": "conditon"},
     "Did you mean 'condition'"),
    ("no_context_key", "--context-key not an obs column", "base", {"--context-key": "celltype"},
     "Did you mean 'cell_type'"),
    ("no_control", "--control label absent from the condition column", "base", {"--control": "ctrl"},
     "Did you mean 'control'"),
    ("no_perturbed", "--perturbed label absent", "base", {"--perturbed": "stimulatd"},
     "Did you mean 'stimulated'"),
    ("same_labels", "--control equals --perturbed", "base", {"--perturbed": "control"}, "must differ"),
    ("same_keys", "--context-key equals --condition-key", "base", {"--context-key": "condition"},
     "must be a different obs column"),
    ("no_holdout", "--holdout not a value of the context column", "base", {"--holdout": "CTX1"},
     "Did you mean 'ctx1'"),
    ("holdout_no_control", "held-out context has no control cells",
     _h5ad(lambda a: drop(a, is_(a, "ctx1", "control"))), {}, "has 0 control cells"),
    ("holdout_too_few", "held-out context has 2 perturbed cells",
     _h5ad(lambda a: drop(a, is_(a, "ctx1", "stimulated") & (np.cumsum(is_(a, "ctx1", "stimulated")) > 2))), {},
     "has 2 perturbed cells"),
    ("no_training_response", "no other context has perturbed cells (nothing to learn from)",
     _h5ad(lambda a: drop(a, ~is_(a, "ctx1") & is_(a, cond="stimulated"))), {}, "holds 0 perturbed cells"),
    ("dup_genes", "duplicated gene names", _h5ad(_dup_genes), {}, "duplicated var_names"),
    ("dup_cells", "duplicated cell names", _h5ad(_dup_cells), {}, "duplicated obs_names"),
    ("nan", "a NaN in X", _h5ad(_set_X(_inject(np.nan))), {}, "NaN or infinite"),
    ("inf", "an infinite value in X", _h5ad(_set_X(_inject(np.inf))), {}, "NaN or infinite"),
    ("negative", "negative values (scaled / z-scored data)", _h5ad(_set_X(lambda a: a.X - 1.0)), {},
     "negative values"),
    ("x_none", "h5ad with X = None (matrix only in a layer)", _h5ad(_x_none), {}, "adata.layers['counts']"),
    ("all_zero", "X all zeros", _h5ad(_set_X(lambda a: np.zeros_like(a.X))), {}, "all zeros"),
    ("too_large", "values beyond float32 range", _h5ad(_set_X(lambda a: _inject(1e300)(a.X.astype(np.float64)))),
     {}, "beyond float32"),
    ("hvg_fails", "--n-top-genes on data where every gene is constant", _h5ad(_set_X(lambda a: np.ones_like(a.X))),
     {"--n-top-genes": "5"}, "--n-top-genes 0"),
    ("unknown_model", "--model misspelt", "base", {"--model": "scgne"}, "Did you mean 'scgen'"),
    ("unknown_metric", "--metrics names an unknown metric", "base", {"--metrics": "r2_mean"}, "r2_mean_all"),
    ("unknown_param", "--param misspelt", "base", {"extra": ["--param", "n_latnt=4"]}, "Did you mean 'n_latent'"),
    ("param_type", "--param with the wrong type", "base", {"extra": ["--param", "n_hidden=big"]},
     "must be an int"),
    ("param_range", "--param out of range", "base", {"extra": ["--param", "dropout_rate=1.5"]}, "in [0, 1)"),
    ("param_baseline", "--param given to a model without parameters", "base",
     {"--model": "mean_shift", "extra": ["--param", "n_latent=4"]}, "takes no parameters"),
    ("param_syntax", "--param without =", "base", {"extra": ["--param", "n_latent"]}, "KEY=VALUE"),
    ("epochs_0", "--epochs 0", "base", {"--epochs": "0"}, "--epochs must be >= 1"),
    ("seed_negative", "--seed -1", "base", {"--seed": "-1"}, "--seed must be an integer from 0"),
    ("threads_0", "--threads 0", "base", {"extra": ["--threads", "0"]}, "--threads must be >= 1"),
    ("n_top_negative", "--n-top-genes -1", "base", {"--n-top-genes": "-1"}, "--n-top-genes must be >= 0"),
    ("n_boot_negative", "--n-boot -1", "base", {"--n-boot": "-1"}, "--n-boot must be >= 0"),
    ("out_foreign", "--out holds another tool's files", "base", {"out": "foreign"}, "already holds other files"),
    ("out_is_file", "--out is an existing file", "base", {"out": "file"}, "exists and is a file"),
    ("load_missing", "--load-model folder missing", "base", {"extra": ["--load-model", "{tmp}/nomodel"]},
     "is missing"),
]


def _predict_argv(tmp: Path, data: str, over: dict) -> list[str]:
    args = {"--data": data, "--model": "scgen", "--holdout": "ctx1", "--epochs": "1", "--seed": "0",
            "--n-boot": "5", "--n-top-genes": "0", "--out": str(tmp / "out")}
    args.update({k: v for k, v in over.items() if k.startswith("--")})
    argv = ["predict", *[x for kv in args.items() for x in kv], "--no-progress"]
    if args["--model"] == "scgen":
        argv += TINY_VAE
    return argv + [a.replace("{tmp}", str(tmp)) for a in over.get("extra", [])]


def setup_predict_case(tmp: Path, base, maker, over) -> list[str]:
    data = tmp / "data.h5ad"
    if maker == "base":
        base.write_h5ad(data)
    elif maker is not None:
        maker(data, base.copy())
    argv = _predict_argv(tmp, str(data), over)
    if over.get("out") == "foreign":
        (tmp / "out").mkdir()
        (tmp / "out" / "notes.txt").write_text("my analysis")
    elif over.get("out") == "file":
        (tmp / "out").write_text("x")
    return argv


def run_cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("case", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_bad_input_exits_2_with_one_clear_line(case, base, tmp_path, capsys):
    _, _, maker, over, needle = case
    argv = setup_predict_case(tmp_path, base, maker, over)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        rc, out, err = run_cli(argv, capsys)
    assert rc == 2, (out, err)
    assert err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "scores.csv").exists() and not (tmp_path / "out" / "pred.h5ad").exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        main(["--debug", *_predict_argv(tmp_path, str(tmp_path / "missing.h5ad"), {})])


# ------------------------------------------------------------------------------------ saved models (CLI)


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """A tiny scGen saved with --save-model, with the data it was trained on (20 genes, all kept)."""
    tmp = tmp_path_factory.mktemp("saved")
    base.write_h5ad(tmp / "data.h5ad")
    model = get("scgen", epochs=1, **SMALL).fit(base, SPEC, seed=0)
    model.save(tmp / "model")
    return tmp


def _copy_model(saved, tmp):
    import shutil

    shutil.copytree(saved / "model", tmp / "m")
    return tmp / "m"


def _load_argv(tmp, data, model_dir, *extra):
    return ["predict", "--data", str(data), "--holdout", "ctx1", "--n-top-genes", "0", "--n-boot", "5",
            "--no-progress", "--out", str(tmp / "out"), "--load-model", str(model_dir), *extra]


def test_load_model_with_other_genes_is_refused(saved, base, tmp_path, capsys):
    other = base.copy()
    other.var_names = [f"GENE{i}" for i in range(other.n_vars)]
    other.write_h5ad(tmp_path / "other.h5ad")
    rc, _, err = run_cli(_load_argv(tmp_path, tmp_path / "other.h5ad", saved / "model"), capsys)
    assert rc == 2 and err.startswith("error: --load-model") and "and the model have different genes" in err
    rc, _, err = run_cli(_load_argv(tmp_path, saved / "data.h5ad", saved / "model", "--n-top-genes", "10"), capsys)
    assert rc == 2 and "and the model have different genes" in err and "--n-top-genes" in err


def test_load_model_corrupt_weights(saved, tmp_path, capsys):
    m = _copy_model(saved, tmp_path)
    (m / "weights.safetensors").write_bytes(b"garbage")
    rc, _, err = run_cli(_load_argv(tmp_path, saved / "data.h5ad", m), capsys)
    assert rc == 2 and "is not a readable saved model" in err


def test_load_model_params_not_matching_weights(saved, tmp_path, capsys):
    m = _copy_model(saved, tmp_path)
    meta = json.loads((m / "params.json").read_text())
    meta["params"]["n_hidden"] = 64
    (m / "params.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(_load_argv(tmp_path, saved / "data.h5ad", m), capsys)
    assert rc == 2 and "do not match its params.json" in err and len(err.splitlines()) == 1


def test_load_model_params_json_incomplete(saved, tmp_path, capsys):
    m = _copy_model(saved, tmp_path)
    meta = json.loads((m / "params.json").read_text())
    del meta["var_names"]
    (m / "params.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(_load_argv(tmp_path, saved / "data.h5ad", m), capsys)
    assert rc == 2 and "lacks ['var_names']" in err


def test_load_model_of_another_kind(saved, tmp_path, capsys):
    rc, _, err = run_cli(_load_argv(tmp_path, saved / "data.h5ad", saved / "model", "--model", "mean_shift"),
                         capsys)
    assert rc == 2 and "pass --model scgen" in err


# ------------------------------------------------------------------------------------------ evaluate CLI


@pytest.fixture(scope="module")
def eval_files(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    truth = base[is_(base, "ctx1", "stimulated")].copy()
    source = base[is_(base, "ctx1", "control")].copy()
    pred = get("mean_shift").fit(base[~is_(base, "ctx1", "stimulated")].copy(), SPEC).predict(source)
    for name, a in (("truth", truth), ("source", source), ("pred", pred)):
        a.write_h5ad(tmp / f"{name}.h5ad")
    return tmp, truth, pred, source


def _eval_argv(tmp, files, **paths):
    p = {k: str(files / f"{k}.h5ad") for k in ("truth", "pred", "source")}
    p.update({k: str(v) for k, v in paths.items()})
    return ["evaluate", "--truth", p["truth"], "--pred", p["pred"], "--source", p["source"], "--n-boot", "5",
            "--metrics", p.get("metrics", "r2_mean_all,pearson_delta"), "--seed", p.get("seed", "0"),
            "--out", p.get("out", str(tmp / "scores.csv"))]


def _eval_variant(name, fn):
    def make(tmp, truth, pred, source):
        objs = {"truth": truth, "pred": pred, "source": source}
        for key, a in fn(objs).items():
            a.write_h5ad(tmp / f"{key}.h5ad")
        return {key: tmp / f"{key}.h5ad" for key in fn(objs)}
    make.__name__ = name
    return make


def _with_counts(objs, which):
    return {k: counts_of(objs[k]) for k in which}


EVAL_CASES = [
    ("eval_missing_truth", "--truth file missing", lambda tmp, t, p, s: {"truth": tmp / "none.h5ad"},
     "--truth: file"),
    ("eval_pred_not_h5ad", "--pred is a text file", lambda tmp, t, p, s: (tmp.joinpath("p.h5ad").write_text("x"),
                                                                             {"pred": tmp / "p.h5ad"})[1],
     "--pred: "),
    ("eval_gene_order", "pred genes in another order",
     _eval_variant("order", lambda o: {"pred": o["pred"][:, ::-1].copy()}), "in a different order"),
    ("eval_other_genes", "pred with different genes",
     _eval_variant("genes", lambda o: {"pred": o["pred"][:, :15].copy()}), "have different genes"),
    ("eval_source_genes", "source with different genes",
     _eval_variant("sgenes", lambda o: {"source": o["source"][:, 5:].copy()}), "source and truth have different"),
    ("eval_counts_vs_log", "truth as counts, pred and source log-normalised",
     _eval_variant("cvl", lambda o: _with_counts(o, ["truth"])), "look log-normalised"),
    ("eval_empty", "truth empty after filtering (0 cells)",
     _eval_variant("empty", lambda o: {"truth": o["truth"][o["truth"].obs["condition"] == "nope"].copy()}),
     "truth is empty"),
    ("eval_one_cell", "pred has a single cell", _eval_variant("one", lambda o: {"pred": o["pred"][:1].copy()}),
     "at least 2 cells"),
    ("eval_nan", "pred with NaN",
     _eval_variant("nan", lambda o: {"pred": o["pred"].copy()}),  # X patched below
     "NaN/inf"),
    ("eval_unknown_metric", "--metrics misspelt", lambda tmp, t, p, s: {"metrics": "pearson_delat"},
     "Did you mean 'pearson_delta'"),
    ("eval_seed", "--seed -1", lambda tmp, t, p, s: {"seed": "-1"}, "seed must be an integer from 0"),
    ("eval_out_dir", "--out is a directory", lambda tmp, t, p, s: (tmp.joinpath("d").mkdir(), {"out": tmp / "d"})[1],
     "is a directory"),
]


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_evaluate_bad_input_exits_2(case, eval_files, tmp_path, capsys):
    files, truth, pred, source = eval_files
    cid, _, make, needle = case
    if cid == "eval_nan":
        bad = pred.copy()
        bad.X[0, 0] = np.nan
        bad.write_h5ad(tmp_path / "pred.h5ad")
        paths = {"pred": tmp_path / "pred.h5ad"}
    else:
        paths = make(tmp_path, truth, pred, source)
    rc, _, err = run_cli(_eval_argv(tmp_path, files, **paths), capsys)
    assert rc == 2 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err and not (tmp_path / "scores.csv").exists()


# ------------------------------------------------------------------- warnings: usable but probably wrong


def test_normalize_no_on_counts_warns(base, tmp_path, capsys):
    counts_of(base).write_h5ad(tmp_path / "c.h5ad")
    argv = _predict_argv(tmp_path, str(tmp_path / "c.h5ad"), {"--model": "mean_shift", "--metrics": "r2_mean_all"})
    rc, out, err = run_cli(argv + ["--normalize", "no"], capsys)
    assert rc == 0 and re.search(r"warning: (--)?normalize is off, but the input looks like raw counts", err)


def test_normalize_yes_on_log_data_warns(base, tmp_path, capsys):
    base.write_h5ad(tmp_path / "l.h5ad")
    argv = _predict_argv(tmp_path, str(tmp_path / "l.h5ad"), {"--model": "mean_shift", "--metrics": "r2_mean_all"})
    rc, out, err = run_cli(argv + ["--normalize", "yes"], capsys)
    assert rc == 0 and re.search(r"warning: (--)?normalize is on, but the input does not look like raw "
                                 r"counts", err)


def test_unlogged_values_warn(base):
    a = base.copy()
    a.X = (np.expm1(a.X) * 13.7).astype(np.float32)  # CPM-like: large, non-integer
    with pytest.warns(InputWarning, match="may be unlogged"):
        pk.data.preprocess(a, pk.data.Preprocessing(n_top_genes=0), log=lambda *a: None)


def test_context_with_one_condition_warns_and_runs(base, tmp_path, capsys):
    """Decision: a training context with one condition is kept (scGen keeps it too) with a warning."""
    a = drop(base, is_(base, "ctx2", "stimulated"))
    with pytest.warns(InputWarning, match=r"'ctx2' \(control only\)"):
        s = pk.split.holdout_cell_type(a, SPEC, "ctx1")
    assert len(s.target) == 30
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)  # fitting on the training cells does not warn again
        get("mean_shift").fit(a[s.train].copy(), SPEC)
    a.write_h5ad(tmp_path / "one.h5ad")
    argv = _predict_argv(tmp_path, str(tmp_path / "one.h5ad"), {"--model": "mean_shift", "--metrics": "r2_mean_all"})
    rc, out, err = run_cli(argv, capsys)
    assert rc == 0 and "warning: context(s) 'ctx2' (control only)" in err and "Traceback" not in err


def test_evaluate_counts_warns_and_scores(eval_files, tmp_path, capsys):
    files, truth, pred, source = eval_files
    paths = {}
    for name, a in (("truth", truth), ("pred", pred), ("source", source)):
        counts_of(a).write_h5ad(tmp_path / f"{name}.h5ad")
        paths[name] = tmp_path / f"{name}.h5ad"
    rc, out, err = run_cli(_eval_argv(tmp_path, files, **paths), capsys)
    assert rc == 0 and "warning: truth, pred and source look like raw counts" in err
    with pytest.warns(InputWarning, match="raw counts"):
        table = pk.metrics.evaluate(*(counts_of(x) for x in (truth, pred, source)), metrics="r2_mean_all",
                                    n_boot=0)
    assert "raw counts" in " ".join(table.attrs["notes"])


def test_evaluate_scores_a_prediction_with_outliers_and_notes_them(eval_files):
    """A few extreme values in a log-scale prediction (a decoder that extrapolates: CellOT on Kang CD4 T
    reached 46.9) are scored as given, with a note; unlogged values throughout are refused."""
    _, truth, pred, source = eval_files
    wild = pred.copy()
    wild.X = np.asarray(wild.X, dtype=np.float32).copy()
    wild.X[:2, :3] = 46.9
    with pytest.warns(InputWarning, match=r"pred holds 6 values above 30 \(max 46.9\) in 2 of"):
        table = pk.metrics.evaluate(truth, wild, source, metrics="r2_mean_all", n_boot=0)
    clean = pk.metrics.evaluate(truth, pred, source, metrics="r2_mean_all", n_boot=0)
    assert np.isfinite(table["value"]).all() and float(table["value"][0]) < float(clean["value"][0])
    assert any("pred holds 6 values above 30" in n for n in table.attrs["notes"])
    one = pred.copy()
    one.X = np.asarray(one.X, dtype=np.float32).copy()
    one.X[0, 0] = 37.2
    with pytest.warns(InputWarning, match=r"pred holds 1 value above 30 \(max 37.2\) in 1 of"):
        pk.metrics.evaluate(truth, one, source, metrics="r2_mean_all", n_boot=0)
    unlogged = pred.copy()
    unlogged.X = np.expm1(np.asarray(pred.X, dtype=np.float64)) * 100.5 + 40.25
    with pytest.raises(InputError, match=r"pred looks like raw counts or unlogged values .* truth and source look "
                                         "log-normalised"):
        pk.metrics.evaluate(truth, unlogged, source, metrics="r2_mean_all", n_boot=0)


def test_list_unknown_choice_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["list", "modles"])
    assert exc.value.code == 2 and "invalid choice: 'modles'" in capsys.readouterr().err


# ------------------------------------------------------------------------------- bench configs (CLI)
# (the kill-and-resume test of ``perturbkit bench`` is tests/test_bench.py::test_killed_run_resumes_without_recomputing)

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
BENCH_CASES = [
    ("bench_unknown_scenario", "unknown scenario name", ("[scenarios.loco]", "[scenarios.lococo]"),
     "scenarios.lococo: unknown setting. Did you mean 'loco'?"),
    ("bench_unknown_field", "mistyped setting name", ("epochs = 2", "epocs = 2"),
     "training.epocs: unknown setting. Did you mean 'epochs'?"),
    ("bench_wrong_type", "setting of the wrong type", ("epochs = 2", 'epochs = "two"'),
     "training.epochs: expected an integer"),
    ("bench_unknown_model", "unknown model in the config", ("[models.scgen]", "[models.scgne]"),
     "Did you mean 'scgen'?"),
    ("bench_unknown_metric", "unknown metric in the config", ('"pearson_delta"', '"pearson_delat"'),
     "evaluation.metrics: Unknown metric 'pearson_delat'. Did you mean 'pearson_delta'"),
    ("bench_bad_toml", "config is not valid TOML", ("[data]", "[data"), "is not valid TOML"),
    ("bench_unknown_context", "scenario names a context absent from the data",
     ('contexts = ["ctx0", "ctx1"]', 'contexts = ["ctx9"]'), "'ctx9' is not a value of obs['cell_type']"),
    ("bench_missing_config", "config file does not exist", None, "does not exist"),
    ("bench_foreign_out", "--out holds another tool's files", "foreign", "not a perturbkit bench run"),
]


@pytest.mark.parametrize("case", BENCH_CASES, ids=[c[0] for c in BENCH_CASES])
def test_bench_bad_config_exits_2(case, tmp_path, capsys):
    _, _, change, needle = case
    config, out = tmp_path / "c.toml", tmp_path / "run"
    text = SMOKE.read_text()
    if isinstance(change, tuple):
        assert change[0] in text
        text = text.replace(change[0], change[1], 1)
    if change != None:  # noqa: E711
        config.write_text(text)
    if change == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    rc, _, err = run_cli(["bench", str(config), "--out", str(out), "--no-progress"], capsys)
    assert rc == 2 and err.startswith("error: ") and needle in err, err
    assert "Traceback" not in err and not (out / "scores.csv").exists()


# ----------------------------------------------------------------------------------------- Python API


def test_api_not_anndata_and_bad_spec(base):
    with pytest.raises(InputError, match="expected an AnnData object, got ndarray"):
        pk.data.validate(np.zeros((3, 3)), SPEC)
    with pytest.raises(InputError, match="spec must be a PerturbSpec"):
        pk.data.validate(base, {"condition_key": "condition"})
    with pytest.raises(InputError, match="must be a string, got int 1"):
        pk.data.validate(base, pk.PerturbSpec(perturbed=1))
    with pytest.raises(InputError, match="source: expected an AnnData"):
        get("control").fit(base, SPEC).predict(np.zeros((3, 20)))
    with pytest.raises(InputError, match="must be an AnnData object"):
        pk.metrics.evaluate(np.zeros((3, 3)), base, base)


def test_api_model_fit_predict_save_load(base, tmp_path):
    with pytest.raises(InputError, match="not fitted yet"):
        get("mean_shift").predict(base)
    with pytest.raises(InputError, match="^seed must be an integer"):
        get("mean_shift").fit(base, SPEC, seed=-3)
    model = get("mean_shift").fit(base, SPEC)
    nan = base.copy()
    nan.X[0, 0] = np.nan
    with pytest.raises(InputError, match="source: X holds 1 NaN"):
        model.predict(nan)
    with pytest.raises(InputError, match="source: the AnnData is empty"):
        model.predict(base[:0].copy())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file; give a folder"):
        model.save(tmp_path / "afile")
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "params.json").read_text())
    (tmp_path / "m" / "params.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(InputError, match="format_version 99"):
        pk.models.Model.load(tmp_path / "m")
    (tmp_path / "m" / "params.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="does not hold a JSON object"):
        pk.models.Model.load(tmp_path / "m")
    with pytest.raises(InputError, match="must be an int"):
        get("scgen", epochs=2.5)


def test_api_non_numeric_X_and_empty_selection(base):
    a = base.copy()
    a.X = a.X.astype(str).astype(object)
    with pytest.raises(InputError, match="expected numbers"):
        pk.data.validate(a, SPEC)
    empty = base[base.obs["condition"] == "treated"].copy()
    with pytest.raises(InputError, match=r"the AnnData is empty \(0 cells x 20 genes\)"):
        pk.data.validate(empty, SPEC)
    with pytest.raises(InputError, match="pred is empty"):
        pk.metrics.evaluate(base[:5], empty, base[:5])


def test_api_preprocess_options(base):
    with pytest.raises(InputError, match="^n_top_genes must be >= 0") as err:
        pk.data.preprocess(base, pk.data.Preprocessing(n_top_genes=-5))
    assert "--" not in str(err.value) and err.value.params == ("n_top_genes",)
    with pytest.raises(InputError, match="^normalize must be 'auto'"):
        pk.data.preprocess(base, pk.data.Preprocessing(normalize="yes"))


def test_api_errors_name_the_parameter_not_a_flag(base, tmp_path):
    """A Python user is told the parameter (n_top_genes, seed, holdout, load_model), never a command-line
    flag; the CLI writes the same message with its flags (see also
    test_predict_bad_input_exits_2_with_one_clear_line)."""
    from perturbkit.cli import with_flags

    const = np.ones_like(base.X)
    flat = base.copy()
    flat.X = const
    cases = [
        (lambda: pk.data.preprocess(base, pk.data.Preprocessing(n_top_genes=-1)), "n_top_genes"),
        (lambda: pk.data.preprocess(flat, pk.data.Preprocessing(n_top_genes=5), log=lambda *a: None),
         "n_top_genes"),
        (lambda: get("mean_shift").fit(base, SPEC, seed=-1), "seed"),
        (lambda: pk.data.validate(base, SPEC, holdout="CTX1"), "holdout"),
        (lambda: pk.data.validate(base, pk.PerturbSpec(control="ctrl")), "control"),
        (lambda: pk.models.Model.load(tmp_path / "nomodel"), "load_model"),
        (lambda: get("scgne"), "model"),
    ]
    for call, name in cases:
        with pytest.raises(InputError) as err:
            call()
        text = str(err.value)
        assert re.match(rf"{name}\b", text) and "--" not in text and name in err.value.params, text
        cli = with_flags(err.value)
        assert cli.startswith("--" + name.replace("_", "-")) and cli != text, cli
    with pytest.raises(InputError) as err:
        pk.data.preprocess(flat, pk.data.Preprocessing(n_top_genes=5), log=lambda *a: None)
    assert "pass n_top_genes=0" in str(err.value).lower()
    assert "pass --n-top-genes 0" in with_flags(err.value).lower()


def test_library_strings_name_no_flags():
    """No string constant in the library modules (cli.py aside) spells a command-line flag like ``--seed``."""
    import ast

    root = Path(pk.__file__).parent
    owned = ["data.py", "split.py", "pl.py", "errors.py", "_io.py", "models/__init__.py", "models/_base.py",
             "models/_vaemodel.py", "models/_vae.py", "models/_train.py", "models/scgen.py",
             "models/scpram.py", "models/baselines.py"]
    found = []
    for rel in owned:
        tree = ast.parse((root / rel).read_text(), filename=rel)
        scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, scopes) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings \
                    and re.search(r"--[a-z]", node.value):
                found.append(f"{rel}:{node.lineno}: {node.value[:60]!r}")
    assert not found, found


def test_atomic_write_onto_directory(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        _io.atomic_write_text(tmp_path / "d", "x")


def test_atomic_write_gives_the_mode_a_plain_write_gives(tmp_path):
    """Result files are shared (a lab's group reads a run): not mkstemp's owner-only 0o600."""
    (tmp_path / "plain.txt").write_text("x")
    _io.atomic_write_text(tmp_path / "atomic.txt", "x")
    _io.atomic_write_with(tmp_path / "with.csv", lambda p: Path(p).write_text("x"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["atomic.txt"] == modes["with.csv"] == modes["plain.txt"] == 0o666 & ~_io._UMASK, modes


# --------------------------------------------------------------- equivalent inputs give the same answer


def _fit_predict(a):
    s = pk.split.holdout_cell_type(a, SPEC, "ctx1")
    train, source, _ = s.subsets(a)
    return s, get("mean_shift").fit(train, SPEC).predict(source).X


def test_sparse_and_dense_give_the_same_result(base):
    dense_split, dense_pred = _fit_predict(base)
    for fmt in (sp.csr_matrix, sp.csc_matrix):
        a = base.copy()
        a.X = fmt(a.X)
        s, pred = _fit_predict(a)
        assert s.fingerprint() == dense_split.fingerprint()
        np.testing.assert_allclose(pred, dense_pred, rtol=1e-6)
        out, _ = pk.data.preprocess(a, pk.data.Preprocessing(n_top_genes=10), log=lambda *x: None)
        ref, _ = pk.data.preprocess(base, pk.data.Preprocessing(n_top_genes=10), log=lambda *x: None)
        assert list(out.var_names) == list(ref.var_names)


def test_integer_X_is_counts(base):
    c = counts_of(base)
    c.X = c.X.astype(np.int32)
    out, info = pk.data.preprocess(c, pk.data.Preprocessing(n_top_genes=0), log=lambda *x: None)
    assert info["input"] == "raw counts" and out.X.dtype == np.float32 and np.isfinite(out.X).all()
    pk.split.holdout_cell_type(c, SPEC, "ctx1")


def test_categorical_string_and_integer_labels_agree(base):
    ref = pk.split.holdout_cell_type(base, SPEC, "ctx1").fingerprint()
    s = base.copy()
    s.obs["condition"] = s.obs["condition"].astype(str)
    s.obs["cell_type"] = s.obs["cell_type"].astype(str)
    assert pk.split.holdout_cell_type(s, SPEC, "ctx1").fingerprint() == ref
    n = base.copy()
    n.obs["condition"] = (n.obs["condition"] == "stimulated").astype(int)
    n.obs["cell_type"] = n.obs["cell_type"].str[3:].astype(int)
    spec = pk.PerturbSpec(control="0", perturbed="1")
    assert pk.split.holdout_cell_type(n, spec, "1").fingerprint() == ref
    u = base.copy()  # an unused category is not a label
    u.obs["condition"] = u.obs["condition"].cat.add_categories(["treated"])
    with pytest.raises(InputError, match="Values: 'control', 'stimulated'"):
        pk.data.validate(u, pk.PerturbSpec(perturbed="treated"))


def test_raw_is_ignored_and_suggested_for_scaled_X(base):
    a = base.copy()
    a.raw = a.copy()
    assert pk.split.holdout_cell_type(a, SPEC, "ctx1").fingerprint() == \
        pk.split.holdout_cell_type(base, SPEC, "ctx1").fingerprint()
    a.X = a.X - a.X.mean(0)
    with pytest.raises(InputError, match=r"use the unscaled matrix \(e.g. adata.raw\)"):
        pk.data.validate(a, SPEC)


# -------------------------------------------------------------------------------- property-based tests

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: fixed examples in CI (derandomize); PK_HYPOTHESIS_EXAMPLES=2000 PK_HYPOTHESIS_RANDOM=1 for a longer random hunt
PROPERTY = settings(max_examples=int(os.environ.get("PK_HYPOTHESIS_EXAMPLES", 60)), deadline=None, database=None,
                    derandomize=not os.environ.get("PK_HYPOTHESIS_RANDOM"), suppress_health_check=list(HealthCheck))


DEFECTS = ("nan", "inf", "negative", "huge", "dup_cells", "dup_genes", "drop_condition", "drop_context",
           "rename_control", "other_label", "no_genes", "no_cells", "string_X")


@st.composite
def messy_adata(draw):
    """Plausible data (contexts a, b, c x control / stimulated, 0-6 cells each) with 0-2 random defects."""
    defects = draw(st.lists(st.sampled_from(DEFECTS), max_size=2)) if draw(st.booleans()) else []
    n_vars = 0 if "no_genes" in defects else draw(st.integers(1, 6))
    conds, ctxs = [], []
    for ctx in draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True)):
        for cond in ("control", "stimulated"):
            n = 0 if "no_cells" in defects else draw(st.integers(0, 6))
            conds += [cond] * n
            ctxs += [ctx] * n
    if "other_label" in defects and conds:
        conds[draw(st.integers(0, len(conds) - 1))] = "other"
    n_obs = len(conds)
    if draw(st.booleans()):
        X = np.asarray(draw(st.lists(st.integers(0, 60), min_size=n_obs * n_vars, max_size=n_obs * n_vars)),
                       dtype=draw(st.sampled_from([np.int32, np.int64, np.float32]))).reshape(n_obs, n_vars)
    else:
        X = np.asarray(draw(st.lists(st.floats(0, 12, width=32), min_size=n_obs * n_vars,
                                     max_size=n_obs * n_vars)), dtype=np.float32).reshape(n_obs, n_vars)
    bad = {"nan": np.nan, "inf": np.inf, "negative": -1.0, "huge": 1e40}
    for d in defects:
        if d in bad and X.size:
            X = X.astype(np.float64)
            X.flat[draw(st.integers(0, X.size - 1))] = bad[d]
    if "string_X" in defects:
        X = X.astype(str).astype(object)
    elif draw(st.booleans()):
        X = sp.csr_matrix(X)
    obs = pd.DataFrame({"condition": conds, "cell_type": ctxs}, index=[f"c{i}" for i in range(n_obs)])
    if "rename_control" in defects:
        obs["condition"] = obs["condition"].replace("control", "ctrl")
    if draw(st.booleans()):
        obs = obs.astype("category")
    for key in ("condition", "context"):
        if f"drop_{key}" in defects:
            obs = obs.drop(columns=["cell_type" if key == "context" else key])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(n_vars)]))
    if "dup_cells" in defects and n_obs > 1:
        a.obs_names = ["dup"] * 2 + list(a.obs_names[2:])
    if "dup_genes" in defects and n_vars > 1:
        a.var_names = ["g"] * 2 + list(a.var_names[2:])
    return a


HOLDOUT = st.sampled_from([None, "a", "a", "b", "z"])
CUT = st.integers(0, 30)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(*args, **kw)
        except InputError as exc:
            assert str(exc) and "\n" not in str(exc)
            return None


@PROPERTY
@given(a=messy_adata(), holdout=HOLDOUT, min_cells=st.integers(1, 3))
def test_property_validate_and_split(a, holdout, min_cells):
    _quiet(pk.data.validate, a, SPEC, holdout=holdout, min_cells=min_cells)
    if holdout is not None:
        s = _quiet(pk.split.holdout_cell_type, a, SPEC, holdout, min_cells=min_cells)
        if s is not None:
            assert len(s.target) >= min_cells and len(s.source) >= min_cells
            assert not set(s.target) & set(s.train)


@PROPERTY
@given(a=messy_adata(), normalize=st.sampled_from([None, True, False]), n_top=st.sampled_from([0, 2, 5]))
def test_property_preprocess(a, normalize, n_top):
    res = _quiet(pk.data.preprocess, a, pk.data.Preprocessing(normalize=normalize, n_top_genes=n_top or None),
                 log=lambda *x: None)
    if res is not None:
        out, _ = res
        X = out.X.toarray() if sp.issparse(out.X) else out.X
        assert np.isfinite(X).all() and out.n_obs == a.n_obs and 0 < out.n_vars <= a.n_vars


@PROPERTY
@given(a=messy_adata(), b=messy_adata(), cut=CUT, own_pred=st.booleans())
def test_property_metrics_prepare(a, b, cut, own_pred):
    pred = a[::-1] if own_pred else b  # the same genes as truth and source, or anything
    res = _quiet(pk.metrics.prepare, a[:cut], pred, a[cut:], n_top=3)
    if res is not None:
        assert res.truth_X.shape[1] == res.pred_X.shape[1] == res.source_X.shape[1]
        assert np.isfinite(res.truth_X).all() and np.isfinite(res.pred_X).all()


# ----------------------------------------------------------------------------- interruption and resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_inside_atomic_write_leaves_no_file(sig, tmp_path):
    target = tmp_path / "pred.h5ad"

    def writer(tmp):
        tmp.write_bytes(b"half a file")
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the signal arrives first

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt) as exc, _io.signals_as_interrupt():
        _io.atomic_write_with(target, writer)
    if sig == signal.SIGTERM:
        assert isinstance(exc.value, Interrupted) and exc.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def test_interrupt_while_writing_outputs_then_rerun(base, tmp_path, capsys, monkeypatch):
    """Ctrl-C after pred.h5ad and scores.csv are written: no temp file, and the same command completes after."""
    base.write_h5ad(tmp_path / "d.h5ad")
    argv = _predict_argv(tmp_path, str(tmp_path / "d.h5ad"), {"--model": "mean_shift", "--metrics": "r2_mean_all"})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pk.pl, "reg_mean", boom)
    rc, _, err = run_cli(argv, capsys)
    out = tmp_path / "out"
    assert rc == 130 and "interrupted" in err
    assert {p.name for p in out.iterdir()} == {"pred.h5ad", "scores.csv", "effects.csv", ".perturbkit-pending.json"}
    assert ad.read_h5ad(out / "pred.h5ad").n_obs == 30 and len(pd.read_csv(out / "scores.csv"))
    monkeypatch.undo()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process of this host that has exited
    (out / f".scores.csv.pk{dead}@{_io._host()}.abc123.tmp.csv").write_text("left by a SIGKILL")
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["effects.csv", "pred.h5ad", "record.json", "reg_mean.png",
                                                   "scores.csv"]


def _env():
    # every epoch drawn on the progress bar (tqdm's TQDM_* defaults): on an idle machine a small model's epochs
    # take less than tqdm's 0.1 s redraw interval, and the bar could skip the epoch the kill tests wait for
    # (and none inherited that turns the bar off: a TQDM_DISABLE left by an earlier test once hid it)
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return {**env, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore", "TQDM_MININTERVAL": "0", "TQDM_MINITERS": "1"}


def _start_and_kill(argv, sig, started, timeout=120):
    """Start ``argv``, wait until ``started(stderr_so_far)`` is true, send ``sig``; return (rc, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: [chunks.append(c) for c in iter(lambda: proc.stderr.read(64), b"")],
                              daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not started(b"".join(chunks).decode(errors="replace")):
        assert proc.poll() is None, "finished before it could be interrupted: " + b"".join(chunks).decode()
        assert time.time() < deadline, "never started"
        time.sleep(0.05)
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    reader.join(timeout=5)
    return rc, b"".join(chunks).decode(errors="replace")


def _epochs_done(n):
    return lambda err: any(int(m) >= n for m in re.findall(r"(\d+)/\d+ \[", err))


def test_kill_predict_mid_training_then_rerun(base, tmp_path):
    """SIGTERM (what a batch system or ``kill`` sends) two epochs into training; SIGINT is Ctrl-C, covered above."""
    sig = signal.SIGTERM
    base.write_h5ad(tmp_path / "d.h5ad")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "perturbkit", "predict", "--data", str(tmp_path / "d.h5ad"), "--holdout",
            "ctx1", "--epochs", "40", *SMALL_ARGS,
            "--n-top-genes", "0", "--n-boot", "5", "--metrics", "r2_mean_all,pearson_delta", "--threads", "1",
            "--out", str(out), "--save-model", str(tmp_path / "model")]
    rc, err = _start_and_kill(argv, sig, _epochs_done(2))
    assert rc == 128 + sig and "interrupted; finished files are complete" in err and "Traceback" not in err
    for folder in (out, tmp_path / "model"):  # nothing written yet, or only complete files
        assert not folder.exists() or not _io.temp_files(folder)
    assert not out.exists() or not (out / "record.json").exists()
    # the same command completes after the interruption
    done = subprocess.run(argv + ["--no-progress"], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["effects.csv", "pred.h5ad", "record.json", "reg_mean.png",
                                                   "scores.csv"]
    assert json.loads((out / "record.json").read_text())["models"]["scgen"]["fit"]["history"]["epochs_run"] > 2
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["params.json", "weights.safetensors"]


# ---------------------------------------------------------------------------------------- determinism


def test_two_predict_runs_are_byte_identical(base, tmp_path):
    """Two separate processes (run side by side), same data, seed and thread count."""
    base.write_h5ad(tmp_path / "d.h5ad")
    procs = []
    for run in ("a", "b"):
        argv = [sys.executable, "-m", "perturbkit", "predict", "--data", str(tmp_path / "d.h5ad"), "--holdout",
                "ctx1", "--epochs", "3", *TINY_VAE, "--n-top-genes", "0", "--n-boot", "5", "--threads", "1",
                "--seed", "7", "--no-progress", "--out", str(tmp_path / run)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                      env=_env()))
        time.sleep(1.1)  # so that any timestamp written into a file would differ
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        proc.stderr.close()
    records = [json.loads((tmp_path / run / "record.json").read_text()) for run in ("a", "b")]
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "scores.csv").read_bytes() == (b / "scores.csv").read_bytes()
    assert np.array_equal(ad.read_h5ad(a / "pred.h5ad").X, ad.read_h5ad(b / "pred.h5ad").X)
    assert (a / "pred.h5ad").read_bytes() == (b / "pred.h5ad").read_bytes()  # no HDF5 timestamps either
    assert records[0]["outputs"] == records[1]["outputs"]  # sha256 of every output, the PNG included
    rec = records[0]
    assert rec["determinism"]["seed"] == 7 and rec["determinism"]["torch_threads"] == 1
    assert rec["config"]["seed"] == 7 and rec["config"]["threads"] == 1
    for lib in ("python", "perturbkit", "numpy", "torch", "anndata", "scanpy", "scikit-learn", "h5py"):
        assert rec["versions"][lib] not in ("", None, "not installed")
    assert rec["data"]["sha256"] == pk.data.sha256(tmp_path / "d.h5ad") and rec["platform"]["machine"]


def test_stale_temp_cleanup_spares_writes_in_progress(tmp_path):
    """A rerun removes temporary files of dead writers only: never a concurrent worker's write in progress."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        host = _io._host()
        files = {name: tmp_path / name for name in (
            f".a.csv.pk{dead}@{host}.x.tmp.csv",       # this host, writer gone: stale
            f".b.csv.pk{alive.pid}@{host}.x.tmp.csv",  # this host, writer running: kept
            ".c.csv.pk1@otherhost.x.tmp.csv",          # another machine, recent: kept
            ".d.csv.x.tmp.csv",                        # no mark, recent: kept
        )}
        for f in files.values():
            f.write_text("partial")
        old = tmp_path / ".e.csv.pk1@otherhost.x.tmp.csv"  # another machine, a day old: stale
        old.write_text("partial")
        os.utime(old, (time.time() - 2 * _io.STALE_AFTER_S,) * 2)
        removed = {p.name for p in _io.remove_stale_temps(tmp_path)}
        assert removed == {f".a.csv.pk{dead}@{host}.x.tmp.csv", old.name}
        with _io.atomic_path(tmp_path / "z.csv") as tmp:  # our own write in progress is never stale
            assert not _io.is_stale(tmp) and f"pk{os.getpid()}@" in tmp.name
    finally:
        alive.kill()
        alive.wait()
