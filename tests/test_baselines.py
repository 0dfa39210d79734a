"""The baselines the field trusts, each held to its exact definition on a hand-made example, and each above the
no-change baseline on a planted effect (perturbkit.models.baselines)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import perturbkit as pk
from perturbkit.errors import InputError
from perturbkit.models import get

from conftest import synthetic


def _adata(blocks):
    """AnnData from ``[(condition, context, rows), ...]``."""
    X = np.vstack([np.asarray(rows, dtype=np.float32) for _, _, rows in blocks])
    obs = pd.DataFrame({"condition": [c for c, _, rows in blocks for _ in rows],
                        "cell_type": [t for _, t, rows in blocks for _ in rows]})
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(X.shape[1])]))


def test_perturbed_mean_is_the_mean_of_every_perturbed_training_cell():
    train = _adata([("control", "a", [[0, 0, 0], [2, 2, 2]]),
                    ("A", "a", [[1, 2, 3]]),
                    ("B", "b", [[3, 2, 1], [5, 2, 5]]),
                    ("control", "b", [[9, 9, 9]])])
    spec = pk.PerturbSpec(perturbed=("A", "B"))
    model = get("perturbed_mean").fit(train, spec)
    source = _adata([("control", "c", [[7, 7, 7], [1, 1, 1]])])
    want = np.array([[3, 2, 3], [3, 2, 3]], dtype=np.float32)  # (1+3+5)/3, (2+2+2)/3, (3+1+5)/3
    for p in ("A", "B", "A+B"):  # any perturbation, even one never seen: the same mean
        assert model.can_predict(p)
        np.testing.assert_allclose(model.predict(source, p).X, want, rtol=0, atol=1e-6)
    assert not model.can_predict("control")


def _linear_world(n_contexts=7, genes=3, seed=0):
    """Contexts whose response is exactly ``b + M (x_c - m)`` of their control profile ``x_c``."""
    rng = np.random.default_rng(seed)
    M, b = rng.normal(size=(genes, genes)) * 0.5, rng.normal(size=genes)
    x = rng.uniform(4, 8, size=(n_contexts, genes))
    m = x[:-1].mean(axis=0)  # the training contexts' mean: the last context is held out
    blocks = []
    for c in range(n_contexts):
        noise = rng.normal(size=genes) * 0.1  # two cells per group, mean exactly the profile
        delta = b + M @ (x[c] - m)
        blocks.append(("control", f"t{c}", [x[c] + noise, x[c] - noise]))
        if c < n_contexts - 1:
            blocks.append(("stimulated", f"t{c}", [x[c] + delta - noise, x[c] + delta + noise]))
    return _adata(blocks), x[-1], b + M @ (x[-1] - m)


def test_linear_recovers_a_response_that_is_linear_in_the_control_profile():
    train, x_held, want = _linear_world()
    spec = pk.PerturbSpec()
    model = get("linear", n_components=3, alphas=[1e-9, float("inf")]).fit(train, spec, seed=0)
    assert model.fit_info["alpha"] == 1e-9 and model.fit_info["contexts"] == [f"t{c}" for c in range(6)]
    source = _adata([("control", "t6", [x_held + 0.3, x_held - 0.3])])
    pred = model.predict(source)
    np.testing.assert_allclose(np.asarray(pred.X).mean(0) - x_held, want, atol=1e-4)
    # a source of two contexts: each gets the shift of its own control mean
    two = _adata([("control", "t6", [x_held]), ("control", "t0", [np.asarray(train.X)[0]])])
    got = np.asarray(model.predict(two).X) - np.asarray(two.X)
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    assert not np.allclose(got[0], got[1])


def test_linear_with_an_infinite_penalty_or_too_few_contexts_is_the_mean_shift(syn):
    spec = pk.PerturbSpec()
    train, source, _ = pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)
    shift = get("mean_shift").fit(train, spec).predict(source).X
    flat = get("linear", alphas=[float("inf")]).fit(train, spec, seed=0)
    # bit for bit: a tie with mean_shift must stay a tie (share_beats_mean_shift), not float32 rounding noise
    np.testing.assert_array_equal(flat.predict(source).X, shift)
    two = synthetic(n_contexts=3)  # 2 training contexts: nothing to cross-validate
    train2, source2, _ = pk.split.holdout_cell_type(two, spec, "ctx1").subsets(two)
    model = get("linear").fit(train2, spec, seed=0)
    assert model.fit_info["alpha"] == "inf" and not np.any(model.weights)
    np.testing.assert_array_equal(model.predict(source2).X, get("mean_shift").fit(train2, spec).predict(source2).X)
    with pytest.raises(InputError, match="n_components"):
        get("linear", n_components=0).fit(train, spec)


@pytest.mark.parametrize("name", ["perturbed_mean", "linear"])
def test_each_new_baseline_beats_control_on_a_planted_effect(syn, name):
    spec = pk.PerturbSpec()
    train, source, target = pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)
    genes = slice(0, 10)  # the planted genes

    def error(model):
        pred = get(model).fit(train, spec, seed=0).predict(source)
        return float(np.abs(np.asarray(pred.X).mean(0) - np.asarray(target.X).mean(0))[genes].mean())

    assert error(name) < 0.5 * error("control")


def test_the_baselines_are_listed_and_flagged():
    from perturbkit.models import BASELINES, MODELS

    assert {"perturbed_mean", "linear"} <= set(BASELINES)
    assert all(MODELS[b].BASELINE for b in (*BASELINES, "additive"))
    assert not any(MODELS[m].BASELINE for m in ("scgen", "scpram", "cellot"))


@pytest.mark.parametrize("name", ["control", "mean_shift", "perturbed_mean", "linear"])
def test_predict_leaves_the_source_cells_alone(syn, name):
    spec = pk.PerturbSpec()
    train, source, _ = pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)
    before = np.array(source.X, copy=True)
    get(name).fit(train, spec, seed=0).predict(source)
    assert np.array_equal(np.asarray(source.X), before)


@pytest.mark.parametrize("name", ["mean_shift", "linear"])
def test_predict_in_pieces_checks_the_source_once_and_gives_the_whole_prediction(syn, name, monkeypatch):
    """Model.predict_chunks: the pieces are the rows of predict(source); the source is checked once, whole (a
    source on disk is not read once more per piece), and a bad source still stops with the check's error."""
    from perturbkit import data

    spec = pk.PerturbSpec()
    train, source, _ = pk.split.holdout_cell_type(syn, spec, "ctx1").subsets(syn)
    model = get(name).fit(train, spec, seed=0)
    whole = model.predict(source)
    calls = []
    check = data.check_matrix
    monkeypatch.setattr(data, "check_matrix", lambda a, what="data": (calls.append(a.n_obs), check(a, what))[1])
    pieces = list(model.predict_chunks(source, "stimulated", 7))
    assert calls == [source.n_obs] and source.n_obs > 14
    assert [start for start, _ in pieces] == list(range(0, source.n_obs, 7))
    np.testing.assert_array_equal(np.concatenate([p.X for _, p in pieces]), whole.X)
    assert pd.concat([p.obs for _, p in pieces]).equals(whole.obs)
    bad = source.copy()
    bad.X = np.asarray(bad.X, dtype=np.float32)
    bad.X[3, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        next(model.predict_chunks(bad, "stimulated", 7))
