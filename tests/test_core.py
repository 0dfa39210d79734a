"""Package shape, data, spec and split, scGen and the baselines on seeded synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import SMALL
from scipy.stats import linregress

import perturbkit as pk
from perturbkit.errors import InputError
from perturbkit.models import get


def test_import_is_light():
    code = ("import sys, perturbkit as pk; pk.PerturbSpec; "
            "heavy = [m for m in ('torch', 'scanpy', 'ot', 'sklearn', 'anndata') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_spec_is_frozen():
    spec = pk.PerturbSpec()
    with pytest.raises(AttributeError):
        spec.control = "x"
    assert spec.to_dict()["perturbed"] == "stimulated"


def test_kang_loads_harmonised_and_verified():
    a = pk.data.load("kang2018")
    assert a.shape == (13576, 14053)
    assert set(a.obs["condition"].unique()) == {"control", "stimulated"}
    assert "CD4 T cells" in set(a.obs["cell_type"])
    assert "cell_type_seurat" in a.obs and a.obs["donor"].nunique() == 8
    assert pk.data.looks_like_counts(a.X)


def test_kang_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    import shutil

    src = pk.data.dataset_path("kang2018")
    bad = tmp_path / src.name
    shutil.copy(src, bad)
    with open(bad, "r+b") as fh:
        fh.seek(-10, 2)
        fh.write(b"0123456789")
    monkeypatch.setenv("PERTURBKIT_DATA", str(tmp_path))
    with pytest.raises(InputError, match="sha256"):
        pk.data.load("kang2018")


def test_preprocess_detects_counts_and_log(syn):
    rng = np.random.default_rng(0)
    counts = syn.copy()
    counts.X = rng.poisson(20, size=syn.shape).astype(np.float32)
    out, info = pk.data.preprocess(counts, pk.data.Preprocessing(n_top_genes=30), log=lambda *a: None)
    assert info["input"] == "raw counts" and out.n_vars == 30
    assert "log1p" in info["steps"] and counts.X.max() > 20  # the input is not modified
    out, info = pk.data.preprocess(syn, log=lambda *a: None)
    assert info["input"] == "log-normalised" and np.array_equal(out.X, syn.X)


def test_holdout_split_is_the_scgen_protocol(syn):
    spec = pk.PerturbSpec()
    s = pk.split.holdout_cell_type(syn, spec, "ctx1")
    obs = syn.obs
    tgt, src, tr = obs.iloc[s.target], obs.iloc[s.source], obs.iloc[s.train]
    assert (tgt.cell_type == "ctx1").all() and (tgt.condition == "stimulated").all() and len(tgt) == 150
    assert (src.cell_type == "ctx1").all() and (src.condition == "control").all()
    assert not set(s.target) & set(s.train) and set(s.source) <= set(s.train)
    assert len(tr) == syn.n_obs - 150
    assert s.fingerprint() == pk.split.holdout_cell_type(syn, spec, "ctx1").fingerprint()


def _task(syn, holdout="ctx1"):
    spec = pk.PerturbSpec()
    return spec, *pk.split.holdout_cell_type(syn, spec, holdout).subsets(syn)


def _scores(pred, target, source):
    pm, tm, sm = (np.asarray(a.X).mean(0) for a in (pred, target, source))
    return linregress(tm, pm).rvalue ** 2, np.corrcoef(pm - sm, tm - sm)[0, 1]


def test_scgen_beats_control_on_planted_effect(syn):
    spec, train, source, target = _task(syn)
    model = get("scgen", epochs=40, **SMALL).fit(train, spec, seed=0)
    r2, pdelta = _scores(model.predict(source), target, source)
    r2_control, _ = _scores(get("control").fit(train, spec).predict(source), target, source)
    assert r2 > r2_control + 0.05
    assert pdelta > 0.8
    # the planted genes go up, the others stay put
    delta = np.asarray(model.predict(source).X).mean(0) - np.asarray(source.X).mean(0)
    assert delta[:10].mean() > 0.8 and abs(delta[10:]).mean() < 0.3


def test_mean_shift_recovers_planted_shift(syn):
    spec, train, source, target = _task(syn)
    pred = get("mean_shift").fit(train, spec).predict(source)
    r2, pdelta = _scores(pred, target, source)
    assert r2 > 0.95 and pdelta > 0.95
    control = get("control").fit(train, spec).predict(source)
    assert np.array_equal(control.X, np.asarray(source.X, dtype=np.float32))
    assert control.obs["condition"].eq("stimulated").all() and control.obs["perturbkit_predicted"].all()


def test_scgen_same_seed_same_prediction_and_rng_untouched(syn):
    import torch

    spec, train, source, _ = _task(syn)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.random.get_rng_state().clone()
    a = get("scgen", epochs=3, **SMALL).fit(train, spec, seed=7).predict(source)
    b = get("scgen", epochs=3, **SMALL).fit(train, spec, seed=7).predict(source)
    c = get("scgen", epochs=3, **SMALL).fit(train, spec, seed=8).predict(source)
    assert np.array_equal(a.X, b.X) and not np.array_equal(a.X, c.X)
    assert np.array_equal(np_state, np.random.get_state()[1])
    assert torch.equal(torch_state, torch.random.get_rng_state())


def test_fit_does_not_modify_input(syn):
    spec, train, source, _ = _task(syn)
    before_obs, before_X = train.obs.copy(), np.array(train.X)
    get("scgen", epochs=1, **SMALL).fit(train, spec)
    assert train.obs.equals(before_obs) and np.array_equal(train.X, before_X) and not train.uns


def test_early_stopping_and_history(syn):
    spec, train, _, _ = _task(syn)
    model = get("scgen", epochs=50, patience=2, lr=5e-2, **SMALL).fit(train, spec)
    h = model.history
    assert h.n_val == round(train.n_obs * 0.1) and len(h.val_loss) == h.epochs_run
    assert h.stopped_early and h.epochs_run < 50 and h.best_epoch <= h.epochs_run


@pytest.mark.parametrize("name", ["scgen", "mean_shift", "control", "perturbed_mean", "linear"])
def test_save_load_roundtrip(syn, tmp_path, name):
    spec, train, source, _ = _task(syn)
    params = dict(epochs=2, **SMALL) if name == "scgen" else {}
    model = get(name, **params).fit(train, spec, seed=0)
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "params.json").read_text())
    assert meta["model"] == name and meta["var_names"] == list(syn.var_names)
    loaded = pk.models.Model.load(tmp_path / "m")
    assert np.array_equal(loaded.predict(source).X, model.predict(source).X)
    with pytest.raises(InputError, match="source has the same genes as the model but in a different order"):
        loaded.predict(source[:, ::-1].copy())


def test_unknown_model_and_param_suggest():
    with pytest.raises(InputError, match="scgen"):
        get("scgne")
    with pytest.raises(InputError, match="n_latent"):
        get("scgen", n_latnt=5)
