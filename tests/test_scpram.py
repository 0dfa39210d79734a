"""scPRAM: per-cell attention on hand-made latents, OT pairing and convergence, fit / predict / save on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import SMALL, SMALL_ARGS

import perturbkit as pk
from perturbkit.errors import InputError
from perturbkit.models import ScPRAM, get
from perturbkit.models.scpram import attention_weights, ot_pairing

# ------------------------------------------------------------------------------------- hand-made cells

KEYS = np.array([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.2, 1.0]], dtype=np.float32)  # two groups of controls
DELTAS = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]], dtype=np.float32)  # their paired deltas
QUERIES = np.array([[2.0, 0.1], [0.1, 2.0], [1.0, 0.9]], dtype=np.float32)
PERT = pk.PerturbSpec().perturbed


def _handmade(**params) -> ScPRAM:
    """A fitted-looking ScPRAM: only the latent transfer state, set by hand (the decoder is not needed)."""
    model = ScPRAM(ratio=0.5, **params)
    model._controls, model._pairs = KEYS, {PERT: (np.arange(len(KEYS)), DELTAS)}
    return model


def _expected_delta(q: np.ndarray, k: int) -> np.ndarray:
    """The published rule written out for one query: top-k cosine similarities, weights proportional to them."""
    sim = np.array([q @ key / np.linalg.norm(q) / np.linalg.norm(key) for key in KEYS])
    top = np.argsort(-sim)[:k]
    w = sim[top] / sim[top].sum()
    return w @ DELTAS[top]


def test_each_query_cell_gets_its_own_delta():
    model = _handmade()
    delta = model._transfer(QUERIES, PERT) - QUERIES
    for q, d in zip(QUERIES, delta):
        assert np.allclose(d, _expected_delta(q, 2), atol=1e-6)
    # the first query's neighbours are the first group, the second query's the second group
    assert delta[0, 1] == pytest.approx(0.0, abs=1e-6) and 1.0 < delta[0, 0] < 3.0
    assert delta[1, 0] == pytest.approx(0.0, abs=1e-6) and 2.0 < delta[1, 1] < 4.0
    assert not np.allclose(delta[0], delta[1])


def test_first_cell_attention_shares_the_first_cells_delta():
    delta = _handmade(attention="first_cell")._transfer(QUERIES, PERT) - QUERIES
    assert np.allclose(delta, _expected_delta(QUERIES[0], 2)[None, :], atol=1e-6)
    per_cell = _handmade()._transfer(QUERIES, PERT) - QUERIES
    assert np.allclose(delta[0], per_cell[0]) and not np.allclose(delta[1], per_cell[1])


def test_attention_matrix_is_sparse_row_stochastic():
    w = attention_weights(QUERIES, KEYS, 0.5)
    assert sp.isspmatrix_csr(w) and w.shape == (3, 4)
    assert np.allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0)
    assert (np.diff(w.indptr) == 2).all()
    assert set(w[0].indices) == {0, 1} and set(w[1].indices) == {2, 3}


def test_negative_similarities_get_no_weight():
    keys = np.array([[1.0, 0.0], [-1.0, 0.1], [-1.0, -0.1]])
    w = attention_weights(np.array([[1.0, 0.0]]), keys, 2 / 3).toarray()
    assert w[0, 0] == pytest.approx(1.0) and w[0, 1:].sum() == 0
    # every kept similarity negative: equal weights over the kept keys
    w = attention_weights(np.array([[-1.0, 0.0]]), np.array([[1.0, 0.0], [1.0, 0.1]]), 1.0).toarray()
    assert np.allclose(w, 0.5)


# ------------------------------------------------------------------------------------------------ OT


def _shifted_copy(n=40, d=5, seed=0):
    rng = np.random.default_rng(seed)
    zc = (3 * rng.normal(size=(n, d))).astype(np.float32)
    perm = rng.permutation(n)
    return zc, zc[perm] + 0.5, np.argsort(perm)  # zp[j] = zc[perm[j]] + shift; zc[i]'s partner is argsort(perm)[i]


@pytest.mark.parametrize("method", ["sinkhorn", "exact"])
def test_ot_pairs_a_shifted_copy_with_itself(method):
    zc, zp, truth = _shifted_copy()
    partner, info = ot_pairing(zc, zp, method=method, reg=0.01)
    assert info["converged"] and np.array_equal(partner, truth)


def test_sinkhorn_plan_marginals_are_uniform_and_convergence_is_reported():
    rng = np.random.default_rng(1)
    zc, zp = rng.normal(size=(40, 4)), rng.normal(1.0, 1.0, size=(55, 4))
    tol = 1e-4
    partner, info, plan = ot_pairing(zc, zp, reg=0.05, tol=tol, return_plan=True)
    assert plan.shape == (40, 55) and (plan >= 0).all()
    assert np.abs(plan.sum(axis=1) - 1 / 40).sum() <= tol
    assert np.abs(plan.sum(axis=0) - 1 / 55).sum() <= tol
    assert info["converged"] and 0 < info["iterations"] < info["max_iter"] and info["warnings"] == []
    assert max(info["marginal_error_control"], info["marginal_error_perturbed"]) <= tol
    assert np.array_equal(partner, plan.argmax(axis=1))


def test_ot_that_stops_early_says_so():
    rng = np.random.default_rng(2)
    zc, zp = rng.normal(size=(40, 5)), rng.normal(0.5, 2.0, size=(55, 5))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, info = ot_pairing(zc, zp, reg=0.001, tol=1e-9, max_iter=2)
    assert not info["converged"] and info["iterations"] <= 2
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, info = ot_pairing(zc, zp, method="exact", max_iter=3)
    assert not info["converged"] and info["result_code"] != 1 and info["pot_warning"]


# -------------------------------------------------------------------------------------- synthetic data

FAST = dict(SMALL, epochs=30, lr=2e-3)


def _task(syn, holdout="ctx1"):
    spec = pk.PerturbSpec()
    return spec, *pk.split.holdout_cell_type(syn, spec, holdout).subsets(syn)


@pytest.fixture(scope="module")
def fitted(syn):
    spec, train, source, target = _task(syn)
    return get("scpram", **FAST).fit(train, spec, seed=0), train, source, target


def _scores(pred, target, source):
    from scipy.stats import linregress

    pm, tm, sm = (np.asarray(a.X).mean(0) for a in (pred, target, source))
    return linregress(tm, pm).rvalue ** 2, np.corrcoef(pm - sm, tm - sm)[0, 1]


def test_scpram_beats_control_on_planted_effect(fitted):
    model, train, source, target = fitted
    r2, pdelta = _scores(model.predict(source), target, source)
    r2_control, _ = _scores(get("control").fit(train, pk.PerturbSpec()).predict(source), target, source)
    assert r2 > r2_control + 0.05 and pdelta > 0.8
    info = model.fit_info
    assert info["ot"]["converged"] and info["transfer"]["contexts_left_out"] == ["ctx1"]
    assert info["latent"] == "posterior mean"
    assert model.control_latent.shape == model.paired_delta.shape == (450, SMALL["n_latent"])


def test_attention_of_source_cells(fitted):
    model, _, source, _ = fitted
    w = model.attention(source)
    assert w.shape == (source.n_obs, 450) and np.allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0)
    assert (np.diff(w.indptr) == 23).all()  # ceil(0.05 * 450)
    assert set(model.control_context[np.unique(w.indices)]) <= {"ctx0", "ctx2", "ctx3"}


def test_attention_in_pieces_and_on_a_key_subsample(fitted, monkeypatch):
    """The prediction in pieces (attention held a few rows at a time, the source predicted 7 cells at a time)
    is the whole prediction; attention_max_keys attends within a seeded subsample of the training controls."""
    from perturbkit.models import scpram

    model, _, source, _ = fitted
    whole = model.predict(source).X
    monkeypatch.setattr(scpram, "ATTENTION_BYTES", 40_000)  # a few query rows at a time
    pieces = np.concatenate([p.X for _, p in model.predict_chunks(source, "stimulated", 7)])
    assert np.array_equal(pieces, whole)
    monkeypatch.undo()
    model.params["attention"] = "first_cell"  # each piece takes the source's first cell's delta, as whole
    try:
        first = model.predict(source).X
        pieces = np.concatenate([p.X for _, p in model.predict_chunks(source, "stimulated", 7)])
        assert np.array_equal(pieces, first) and not np.array_equal(first, whole)
        assert model._first_delta is None
    finally:
        model.params["attention"] = "cell"
    model.params["attention_max_keys"] = 450  # all of them: unchanged
    assert np.array_equal(model.predict(source).X, whole)
    model.params["attention_max_keys"] = 100
    try:
        w = model.attention(source)
        assert w.shape == (source.n_obs, 450) and np.allclose(np.asarray(w.sum(axis=1)).ravel(), 1.0)
        assert (np.diff(w.indptr) == 5).all() and len(np.unique(w.indices)) <= 100  # ceil(0.05 * 100)
        sub = model._attended_keys("stimulated", 450)
        assert set(np.unique(w.indices)) <= set(sub) and np.array_equal(sub, model._attended_keys("stimulated", 450))
        assert not np.array_equal(model.predict(source).X, whole)
    finally:
        model.params["attention_max_keys"] = None


def test_quadratic_steps_warn_with_the_option_that_makes_them_linear(monkeypatch):
    """Above QUADRATIC_PAIRS control x perturbed pairs, or QUADRATIC_KEYS training controls, fitting warns before
    the pairing that the step grows with the square of the cells and names the cap; a capped model is quiet."""
    import warnings

    from perturbkit.models import scpram

    monkeypatch.setattr(scpram, "QUADRATIC_PAIRS", 11)
    monkeypatch.setattr(scpram, "QUADRATIC_KEYS", 3)
    zc, zp = np.zeros((4, 2)), np.zeros((3, 2))  # 12 pairs, 4 keys
    model = ScPRAM()
    model.trained = [PERT]
    with pytest.warns(UserWarning) as caught:
        model._warn_quadratic(zc, zp, PERT)
    texts = [str(w.message) for w in caught]
    assert texts == [
        "scpram's OT pairing compares each of 4 training control cells with each of 3 perturbed cells (1.2e+01 "
        "pairs; its time grows with the square of the cells); ot_max_candidates=20000 makes it linear "
        "(docs/scpram.md, 'OT at scale').",
        "scpram's attention will compare every predicted cell with each of 4 training control cells (its time "
        "grows with the square of the cells); attention_max_keys=20000 makes it linear (docs/scpram.md, 'OT at "
        "scale')."]
    model.trained = [PERT, "other"]
    with pytest.warns(UserWarning) as caught:
        model._warn_quadratic(zc, zp, PERT)
    assert [str(w.message).split(" ", 4)[:4] for w in caught] == [
        ["perturbation", f"{PERT!r}:", "scpram's", "OT"], ["perturbation", f"{PERT!r}:", "scpram's", "attention"]]
    for quiet in (ScPRAM(ot_max_candidates=5, attention_max_keys=5), ScPRAM(ot="exact", attention="first_cell"),
                  ScPRAM(ot_within_context=True, attention_max_keys=5)):
        quiet.trained = [PERT]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet._warn_quadratic(zc, zp, PERT)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model._warn_quadratic(zc, zp, PERT)


def test_same_seed_same_prediction_and_save_load_round_trip(fitted, syn, tmp_path):
    model, train, source, _ = fitted
    pred = model.predict(source).X
    again = get("scpram", **FAST).fit(train, pk.PerturbSpec(), seed=0).predict(source).X
    assert np.array_equal(pred, again)
    loaded = pk.models.Model.load(model.save(tmp_path / "m"))
    assert isinstance(loaded, ScPRAM) and loaded.params == model.params
    assert np.array_equal(loaded.predict(source).X, pred)
    assert (loaded.attention(source) != model.attention(source)).nnz == 0
    assert np.array_equal(loaded.control_context, model.control_context)


def test_a_screen_of_one_perturbation_predicts_as_the_two_condition_case(syn, tmp_path):
    from safetensors.numpy import load_file

    spec, train, source, _ = _task(syn)
    params = dict(FAST, epochs=2)
    pair = get("scpram", **params).fit(train, spec, seed=0)
    screen = get("scpram", **params).fit(train, pk.PerturbSpec(perturbed=[spec.perturbed]), seed=0)
    assert screen.trained == pair.trained == [spec.perturbed]
    assert np.array_equal(screen.predict(source).X, pair.predict(source).X)
    for a, b in zip(screen.pairing(), (pair.control_latent, pair.paired_delta, pair.control_context)):
        assert np.array_equal(a, b)
    # a screen of one is the two-condition case: the same fit_info (the report of its one pairing at the top
    # level) and the same save layout (per perturbation; the older layout of one still loads)
    assert {"ot", "transfer"} <= set(pair.fit_info) and "perturbations" not in pair.fit_info
    assert screen.fit_info["ot"] == {**pair.fit_info["ot"], "seconds": screen.fit_info["ot"]["seconds"]}
    keys = {k for k in load_file(str(pair.save(tmp_path / "pair") / "weights.safetensors"))
            if k.startswith("transfer.")}
    assert keys == {"transfer.control_latent", "transfer.control_context_code", "transfer.p/stimulated/control_index",
                    "transfer.p/stimulated/paired_delta"}
    saved = load_file(str(screen.save(tmp_path / "s") / "weights.safetensors"))
    assert {k for k in saved if k.startswith("transfer.")} == keys


def test_latent_sampling_is_seeded(syn):
    spec, train, source, _ = _task(syn)
    params = dict(FAST, epochs=2, latent_sampling=True)
    a = get("scpram", **params).fit(train, spec, seed=3)
    b = get("scpram", **params).fit(train, spec, seed=3)
    assert np.array_equal(a.predict(source).X, b.predict(source).X)
    assert np.array_equal(a.predict(source).X, a.predict(source).X)
    assert "posterior draw" in a.fit_info["latent"]


def test_attention_heatmap_returns_a_figure(fitted):
    from matplotlib.figure import Figure

    model, _, source, _ = fitted
    fig = pk.pl.attention_heatmap(model, source, max_cells=20, max_controls=30)
    assert isinstance(fig, Figure)


# ------------------------------------------------------------------------------------ within-context OT


def _two_contexts(seed=0):
    """Context a's controls near x=0, b's near x=10; a's perturbed cells (5) near x=10, b's (15) near x=20. One
    OT over both (uniform marginals) must send half of a's controls to b's perturbed cells."""
    rng = np.random.default_rng(seed)
    x = lambda centre, n: np.c_[centre + rng.normal(0, 0.1, n), rng.normal(0, 0.1, n)]  # noqa: E731
    zc, zp = np.r_[x(0, 10), x(10, 10)], np.r_[x(10, 5), x(20, 15)]
    return zc, zp, np.repeat(["a", "b"], 10), np.repeat(["a", "b"], [5, 15])


def test_pairing_within_contexts_never_crosses_a_context():
    from perturbkit.models.scpram import pair_within_contexts

    zc, zp, ctx_c, ctx_p = _two_contexts()
    solve = lambda a, b: ot_pairing(a, b, method="exact")  # noqa: E731
    crossed = solve(zc, zp)[0]
    assert (ctx_p[crossed] != ctx_c).sum() == 5  # the global plan pairs 5 of a's controls with b's cells
    partner, info = pair_within_contexts(solve, zc, zp, ctx_c, ctx_p)
    assert (ctx_p[partner] == ctx_c).all()
    # inside each context the partner is that context's own OT solve
    for c in ("a", "b"):
        i, j = ctx_c == c, np.flatnonzero(ctx_p == c)
        assert np.array_equal(partner[i], j[solve(zc[i], zp[j])[0]])
    assert info["within_context"] and info["converged"] and set(info["by_context"]) == {"a", "b"}
    assert (info["n_control"], info["n_perturbed"]) == (20, 20)


def test_scpram_pairs_within_contexts_when_asked(syn):
    spec, train, _, _ = _task(syn)
    model = get("scpram", **dict(FAST, epochs=2), ot_within_context=True).fit(train, spec, seed=0)
    ot = model.fit_info["ot"]
    assert ot["within_context"] and ot["converged"] and set(ot["by_context"]) == {"ctx0", "ctx2", "ctx3"}
    assert model.fit_info["transfer"]["ot_within_context"] is True
    latent, delta, context = model.pairing()
    cond, ctx = train.obs["condition"].to_numpy(), train.obs["cell_type"].to_numpy()
    zp = model.latent(train)
    for c in ("ctx0", "ctx2", "ctx3"):  # every control cell lands on a perturbed cell of its own context
        mine, theirs = zp[(cond == spec.perturbed) & (ctx == c)], zp[(cond == spec.perturbed) & (ctx != c)]
        moved = latent[context == c] + delta[context == c]
        assert np.abs(moved[:, None, :] - mine[None]).sum(-1).min(1).max() < 1e-4
        assert np.abs(moved[:, None, :] - theirs[None]).sum(-1).min(1).min() > 1e-4
    default = get("scpram", **dict(FAST, epochs=2)).fit(train, spec, seed=0)
    assert default.fit_info["ot"]["within_context"] is False


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("key, value", [("ratio", 0), ("ratio", 1.5), ("ratio", "a"), ("ratio", True),
                                        ("ot", "emd"), ("attention", "first"), ("ot_reg", -1.0),
                                        ("ot_tol", 0), ("ot_max_iter", 0), ("ot_cost", "cosine"),
                                        ("latent_sampling", "yes"), ("precision", "float16"),
                                        ("ot_within_context", "yes"), ("attention_max_keys", 0)])
def test_bad_values_are_refused(key, value):
    with pytest.raises(InputError, match=key):
        ScPRAM(**{key: value})


def test_unknown_parameter_is_refused():
    with pytest.raises(InputError, match="unknown parameter 'ration'"):
        ScPRAM(ration=0.1)


def test_predict_cli_writes_attention_figure_and_records_the_flags(syn_path, tmp_path):
    import json

    from perturbkit.cli import main

    out = tmp_path / "scpram"
    args = ["predict", "--data", str(syn_path), "--model", "scpram", "--holdout", "ctx2", "--epochs", "2",
            "--seed", "0", "--out", str(out), *SMALL_ARGS, "--n-boot", "5", "--no-progress",
            "--ratio", "0.1", "--ot", "exact", "--attention", "first_cell"]
    assert main(args) == 0
    assert (out / "attention.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "record.json").read_text())
    params = record["models"]["scpram"]["params"]
    assert (params["ratio"], params["ot"], params["attention"]) == (0.1, "exact", "first_cell")
    assert record["config"]["params"]["ratio"] == 0.1 and "attention.png" in record["outputs"]
    ot_info = record["models"]["scpram"]["fit"]["ot"]
    assert ot_info["method"] == "exact" and ot_info["converged"] is True


def test_loaded_model_takes_prediction_time_flags_and_warns_about_the_rest(syn_path, tmp_path, capsys):
    import json

    from perturbkit.cli import main

    base = ["predict", "--data", str(syn_path), "--model", "scpram", "--holdout", "ctx2", "--seed", "0",
            "--n-boot", "5", "--no-progress", "--metrics", "r2_mean_all,pearson_delta"]
    small = ["--epochs", "2", *SMALL_ARGS]
    assert main(base + small + ["--out", str(tmp_path / "a"), "--save-model", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "b"), "--load-model", str(tmp_path / "m"), "--ratio", "0.2",
                        "--attention", "first_cell", "--param", "n_latent=4"]) == 0
    err = capsys.readouterr().err
    assert "warning: --load-model" in err and "n_latent cannot change a trained model" in err
    params = json.loads((tmp_path / "b" / "record.json").read_text())["models"]["scpram"]["params"]
    assert (params["ratio"], params["attention"], params["n_latent"]) == (0.2, "first_cell", 8)
    assert main(base + ["--out", str(tmp_path / "c"), "--load-model", str(tmp_path / "m"), "--ratio", "2"]) == 2
    assert "parameter 'ratio' must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_pairing_across_contexts_warns_and_is_recorded():
    """A context whose perturbed training cells are few gets most of its control cells paired with other
    contexts' perturbed cells by the one global OT: fitting records the share paired within each context and
    warns naming the context and ot_within_context; pairing within contexts is quiet."""
    import warnings

    from conftest import synthetic

    from perturbkit.models import scpram

    adata = synthetic()
    spec = pk.PerturbSpec()
    ctx, cond = adata.obs.cell_type.astype(str).to_numpy(), adata.obs.condition.astype(str).to_numpy()
    thin = np.flatnonzero((ctx == "ctx2") & (cond != spec.control))[8:]  # ctx2 keeps 8 of its 150 perturbed cells
    adata = adata[np.setdiff1d(np.arange(adata.n_obs), thin)].copy()
    train, _, _ = pk.split.holdout_cell_type(adata, spec, "ctx0").subsets(adata)
    with pytest.warns(UserWarning, match=r"most training control cells of ctx2 \(\d+% paired within; 8 perturbed "
                      r"for 150 control cells\) with perturbed cells of other contexts, .* ot_within_context=true "
                      r"pairs within each context"):
        model = ScPRAM(**SMALL, epochs=1).fit(train, spec, seed=0)
    shares = model.fit_info["ot"]["partner_own_context"]
    assert set(shares) == {"ctx1", "ctx2", "ctx3"} and shares["ctx2"] < scpram.CROSS_SHARE
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other contexts.*")
        ScPRAM(**SMALL, epochs=1, ot_within_context=True).fit(train, spec, seed=0)
    # the rule: a context with >= CROSS_MIN_CELLS control cells, a share below CROSS_SHARE, and few perturbed
    # cells (their share of all perturbed cells below CROSS_SHARE x its share of the control cells)
    ctx_c = np.array(["a"] * 40 + ["b"] * 40 + ["c"] * 10 + ["d"] * 40)
    ctx_p = np.array(["a"] * 40 + ["b"] * 5 + ["c"] * 1 + ["d"] * 40)
    with pytest.warns(UserWarning) as caught:
        scpram._warn_cross_context({"a": 0.9, "b": 0.2, "c": 0.0, "d": 0.3}, ctx_c, ctx_p)
    text = str(caught[0].message)
    assert "of b (20% paired within; 5 perturbed for 40 control cells) with" in text
    assert "c (" not in text and "d (" not in text  # c: too few control cells; d: balanced (an unsettled latent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scpram._warn_cross_context({"a": 0.3, "d": 0.3}, ctx_c, ctx_p)  # balanced contexts pairing across: quiet
    assert scpram.own_context_shares(np.array([0, 1, 1]), np.array(["a", "a", "b"]), np.array(["a", "b"])) == {
        "a": 0.5, "b": 1.0}
