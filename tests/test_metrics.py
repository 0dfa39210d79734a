"""Metrics: each equals its reference, satisfies its axioms, and fails loudly on bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from types import MappingProxyType

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import linregress
from sklearn.metrics import pairwise_distances, r2_score
from sklearn.metrics.pairwise import rbf_kernel

from perturbkit import metrics as M
from perturbkit.errors import InputError
from perturbkit.metrics.functions import exp_kde

NAMES = [
    "r2_mean_all", "r2_mean_top100", "r2_var_all", "r2_var_top100", "r2score_mean_all", "r2score_mean_top100",
    "mse_mean", "mae_mean", "pearson_delta", "pearson_delta_top100", "r2score_delta", "edistance", "mmd",
    "kde_mean_var", "deg_overlap_top100", "deg_jaccard_top100", "direction_agreement_top100",
]  # fmt: skip
LOWER_IS_BETTER = {"mse_mean", "mae_mean", "edistance", "mmd", "kde_mean_var"}


def make(X, genes, prefix="c"):
    return ad.AnnData(
        X=np.asarray(X, dtype=np.float64) if not sp.issparse(X) else X,
        obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(X.shape[0])]),
        var=pd.DataFrame(index=list(genes)),
    )


def synthetic(seed=0, n_genes=150, n_source=60, n_truth=70, n_pred=50, effect=1.5, pred_effect=1.0):
    """log1p Poisson counts; genes 0-29 go up and 30-39 go down in truth; pred gets a weaker, noisy effect."""
    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    base = rng.gamma(2.0, 1.0, n_genes)
    shift = np.zeros(n_genes)
    shift[:30], shift[30:40] = effect, -effect
    pred_shift = pred_effect * shift + rng.normal(0, 0.3, n_genes)

    def cells(n, s, prefix):
        return make(np.log1p(rng.poisson(base * np.exp(s), (n, n_genes))), genes, prefix)

    return cells(n_truth, shift, "t"), cells(n_pred, pred_shift, "p"), cells(n_source, 0 * shift, "s")


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def prepared(data):
    return M.prepare(*data)


def scanpy_top(target_X, source_X, genes, n=100):
    """Independent reference: scGen's convention (two groups, reference 'rest', first n names)."""
    import scanpy as sc

    X = np.vstack([target_X, source_X])
    obs = pd.DataFrame(
        {"condition": ["stim"] * len(target_X) + ["ctrl"] * len(source_X)},
        index=[str(i) for i in range(len(X))],
    )
    obs["condition"] = obs["condition"].astype("category")
    tmp = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    sc.tl.rank_genes_groups(tmp, groupby="condition", method="wilcoxon", n_genes=n)
    return list(tmp.uns["rank_genes_groups"]["names"]["stim"][:n])


# ----------------------------------------------------------------------------------------- registry


def test_registry_is_read_only_and_complete():
    assert isinstance(M.METRICS, MappingProxyType)
    assert list(M.METRICS) == NAMES
    with pytest.raises(TypeError):
        M.METRICS["new"] = M.METRICS["mse_mean"]
    for name, metric in M.METRICS.items():
        assert metric.name == name
        assert metric.higher_is_better == (name not in LOWER_IS_BETTER)
        assert metric.definition and "\n" not in metric.definition
        assert metric.fn.__doc__, f"{name} needs a docstring with its formula"
        with pytest.raises(AttributeError):
            metric.name = "x"
    boot = {n for n, m in M.METRICS.items() if m.bootstrap}
    assert boot == {n for n in NAMES if n.startswith(("r2", "mse", "mae", "pearson", "direction"))}


def test_list_metrics():
    table = M.list_metrics()
    assert list(table.columns) == ["name", "higher_is_better", "definition"]
    assert list(table.name) == NAMES


def test_import_is_light():
    code = (
        "import sys, perturbkit.metrics; "
        "bad = [m for m in ('torch', 'scanpy', 'sklearn') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------- equality with references


def test_mean_metrics_equal_references(data, prepared):
    truth = data[0]
    t, p, s = (np.asarray(a.X) for a in data)
    tm, pm, sm = t.mean(0), p.mean(0), s.mean(0)
    tv, pv = np.var(t, axis=0), np.var(p, axis=0)
    top = np.array([list(truth.var_names).index(g) for g in scanpy_top(t, s, truth.var_names)])
    dt, dp = tm - sm, pm - sm
    expected = {
        "r2_mean_all": linregress(tm, pm).rvalue ** 2,
        "r2_mean_top100": linregress(tm[top], pm[top]).rvalue ** 2,
        "r2_var_all": linregress(tv, pv).rvalue ** 2,
        "r2_var_top100": linregress(tv[top], pv[top]).rvalue ** 2,
        "r2score_mean_all": r2_score(tm, pm),
        "r2score_mean_top100": r2_score(tm[top], pm[top]),
        "mse_mean": np.mean((pm - tm) ** 2),
        "mae_mean": np.mean(np.abs(pm - tm)),
        "pearson_delta": np.corrcoef(dp, dt)[0, 1],
        "pearson_delta_top100": np.corrcoef(dp[top], dt[top])[0, 1],
        "r2score_delta": r2_score(dt, dp),
        "direction_agreement_top100": np.mean(np.sign(dp[top]) == np.sign(dt[top])),
    }
    pred_top = set(scanpy_top(p, s, truth.var_names))
    real_top = set(truth.var_names[top])
    expected["deg_overlap_top100"] = len(real_top & pred_top) / 100
    expected["deg_jaccard_top100"] = len(real_top & pred_top) / len(real_top | pred_top)
    assert list(prepared.top_genes) == list(truth.var_names[top])
    for name, value in expected.items():
        assert M.METRICS[name].fn(prepared) == pytest.approx(value, abs=1e-6), name


def test_top_degs_finds_planted_genes(data):
    truth, _, source = data
    top = M.top_degs(truth, source, n=30)
    assert set(top) == {f"g{i}" for i in range(30)}  # the up-regulated genes, highest scores first
    assert M.top_degs(truth, source, n=10) == top[:10]
    assert "rank_genes_groups" not in truth.uns and "rank_genes_groups" not in source.uns


def test_embedding_is_pca_fitted_on_source_and_truth(data, prepared):
    from sklearn.decomposition import PCA

    truth, pred, source = (np.asarray(a.X) for a in data)
    k = min(50, len(truth) + len(source) - 1, truth.shape[1])
    pca = PCA(n_components=k, svd_solver="randomized", random_state=0).fit(np.vstack([source, truth]))
    emb = prepared.embedding
    np.testing.assert_allclose(emb.truth, pca.transform(truth), atol=1e-8)
    np.testing.assert_allclose(emb.pred, pca.transform(pred), atol=1e-8)
    info = prepared.embedding_info
    assert info["n_comps"] == k == 50 and info["random_state"] == 0 and "source + truth" in info["fit_on"]


def pertpy_edistance(X, Y):
    """pertpy's Edistance written out: Euclidean pairwise distances, plain means (diagonal included)."""
    return (
        2 * pairwise_distances(X, Y, metric="euclidean").mean()
        - pairwise_distances(X, X, metric="euclidean").mean()
        - pairwise_distances(Y, Y, metric="euclidean").mean()
    )


def pertpy_mmd_rbf(X, Y):
    """pertpy's MMD(kernel='rbf') written out: gamma 1.0, plain means of the three kernel matrices."""
    return (
        rbf_kernel(X, X, gamma=1.0).mean()
        + rbf_kernel(Y, Y, gamma=1.0).mean()
        - 2 * rbf_kernel(X, Y, gamma=1.0).mean()
    )


def loop_edistance(X, Y):
    def mean_dist(A, B):
        return sum(math.dist(a, b) for a in A for b in B) / (len(A) * len(B))

    return 2 * mean_dist(X, Y) - mean_dist(X, X) - mean_dist(Y, Y)


def loop_mmd(X, Y, gamma=1.0):
    def mean_k(A, B):
        return sum(math.exp(-gamma * math.dist(a, b) ** 2) for a in A for b in B) / (len(A) * len(B))

    return mean_k(X, X) + mean_k(Y, Y) - 2 * mean_k(X, Y)


def test_edistance_hand_case():
    # within {0,1,2}: 8/9; within {0,3}: 6/4; across: 9/6  ->  2 * 3/2 - 8/9 - 3/2 = 11/18
    X, Y = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [3.0]])
    assert M.energy_distance(X, Y) == pytest.approx(11 / 18, abs=1e-12)
    assert pertpy_edistance(X, Y) == pytest.approx(11 / 18, abs=1e-12)


def test_mmd_hand_case():
    # K_XX mean = (2 + 2/e) / 4, K_YY = 1, K_XY mean = (1 + 1/e) / 2  ->  (1 - 1/e) / 2
    X, Y = np.array([[0.0], [1.0]]), np.array([[0.0]])
    assert M.mmd_rbf(X, Y) == pytest.approx((1 - math.exp(-1)) / 2, abs=1e-12)
    assert pertpy_mmd_rbf(X, Y) == pytest.approx((1 - math.exp(-1)) / 2, abs=1e-12)


def test_distances_equal_pertpy_formulas_and_loops():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(23, 4)), rng.normal(0.5, 0.7, size=(17, 4))
    for ours, pertpy, loop in (
        (M.energy_distance, pertpy_edistance, loop_edistance),
        (M.mmd_rbf, pertpy_mmd_rbf, loop_mmd),
    ):
        assert ours(X, Y) == pytest.approx(pertpy(X, Y), abs=1e-9)
        assert ours(X, Y) == pytest.approx(loop(X.tolist(), Y.tolist()), abs=1e-9)


def test_distance_metrics_use_the_embedding(prepared):
    emb = prepared.embedding
    assert M.edistance(prepared) == pytest.approx(pertpy_edistance(emb.truth, emb.pred), abs=1e-6)
    assert M.mmd(prepared) == pytest.approx(pertpy_mmd_rbf(emb.truth, emb.pred), abs=1e-9)


def pertpy_mean_var_kde(X, Y):
    """pertpy's mean_var_distribution written out with sklearn's KernelDensity."""
    from sklearn.neighbors import KernelDensity

    def log_mean_var(A):
        mean, var = A.mean(0), A.var(0)
        keep = mean > 0
        return np.log(mean[keep]), np.log(var[keep])

    def grid(v, n=100):
        step = (v.max() - v.min()) / (n - 2)
        lo, hi = v.min() - step, v.max() + step
        return np.arange(lo + 0.5 * step, hi, step)

    mx, vx = log_mean_var(X)
    my, vy = log_mean_var(Y)
    g = np.array(np.meshgrid(grid(np.concatenate([mx, my])), grid(np.concatenate([vx, vy])))).T.reshape(-1, 2)
    fx = KernelDensity(bandwidth="silverman", kernel="exponential").fit(np.c_[mx, vx]).score_samples(g)
    fy = KernelDensity(bandwidth="silverman", kernel="exponential").fit(np.c_[my, vy]).score_samples(g)
    return np.mean((np.exp(fx) - np.exp(fy)) ** 2)


def loop_exp_kde(points, g):
    """2-D exponential-kernel density by hand: sum_i exp(-|g - p_i| / h) / (2 pi h^2 n), h = n^(-1/6)."""
    n = len(points)
    h = n ** (-1 / 6)
    return sum(math.exp(-math.dist(g, p) / h) for p in points) / (2 * math.pi * h * h * n)


def test_kde_mean_var_equals_pertpy_formula():
    rng = np.random.default_rng(2)
    X = np.log1p(rng.poisson(rng.gamma(1.0, 2.0, 40), (30, 40)))
    Y = np.log1p(rng.poisson(rng.gamma(1.0, 2.0, 40), (25, 40)))
    X[:, 0] = 0.0  # a gene with mean 0 is dropped, as in pertpy
    ours = M.mean_var_kde_distance(X, Y)
    assert ours > 0
    assert ours == pytest.approx(pertpy_mean_var_kde(X, Y), rel=1e-6, abs=1e-12)
    assert ours == pytest.approx(M.mean_var_kde_distance(Y, X), rel=1e-12)


def test_exp_kde_equals_hand_density_and_integrates_to_one():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(12, 2))
    grid = rng.normal(size=(20, 2))
    ours = exp_kde(pts, grid)
    assert ours == pytest.approx([loop_exp_kde(pts.tolist(), g) for g in grid.tolist()], rel=1e-12)
    axis = np.linspace(-30, 30, 601)
    fine = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    assert exp_kde(pts, fine).sum() * (axis[1] - axis[0]) ** 2 == pytest.approx(1.0, abs=2e-3)


def test_kde_metric_uses_expression(prepared):
    assert M.kde_mean_var(prepared) == pytest.approx(
        pertpy_mean_var_kde(prepared.truth_X, prepared.pred_X), rel=1e-6
    )


# ------------------------------------------------------------------------------------------- axioms


def test_perfect_prediction_scores_best_everywhere(data):
    truth, _, source = data
    table = M.evaluate(truth, truth.copy(), source, n_boot=0).set_index("metric")
    assert (table.error == "").all(), table.error
    for name, row in table.iterrows():
        best = 0.0 if name in LOWER_IS_BETTER else 1.0
        assert row.value == pytest.approx(best, abs=1e-9), name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), m=st.integers(1, 12), dim=st.integers(1, 5))
def test_distances_non_negative_and_symmetric(seed, n, m, dim):
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(n, dim)), rng.normal(rng.normal(), 2.0, size=(m, dim))
    for fn in (M.energy_distance, M.mmd_rbf):
        assert fn(X, Y) >= -1e-12
        assert fn(X, Y) == pytest.approx(fn(Y, X), abs=1e-12)
        assert fn(X, X) == pytest.approx(0.0, abs=1e-12)


def test_kde_non_negative_symmetric_zero_on_self():
    rng = np.random.default_rng(4)
    X, Y = rng.gamma(1.0, 1.0, (20, 30)), rng.gamma(2.0, 1.0, (15, 30))
    assert M.mean_var_kde_distance(X, Y) > 0
    assert M.mean_var_kde_distance(X, Y) == pytest.approx(M.mean_var_kde_distance(Y, X), rel=1e-12)
    assert M.mean_var_kde_distance(X, X) == 0.0


def test_failing_metric_becomes_an_error_row(data):
    _, pred, source = data
    constant = make(np.ones((20, pred.n_vars)), pred.var_names, "k")  # all truth means equal
    table = M.evaluate(constant, pred, source, metrics=["r2_mean_all", "kde_mean_var", "mse_mean"], n_boot=10)
    rows = table.set_index("metric")
    assert list(table.metric) == ["r2_mean_all", "kde_mean_var", "mse_mean"]
    assert math.isnan(rows.loc["r2_mean_all", "value"]) and "identical" in rows.loc["r2_mean_all", "error"]
    assert math.isnan(rows.loc["kde_mean_var", "value"]) and "ValueError" in rows.loc["kde_mean_var", "error"]
    assert rows.loc["mse_mean", "error"] == "" and rows.loc["mse_mean", "value"] > 0
    assert np.isfinite(rows.loc["mse_mean", ["ci_low", "ci_high"]].astype(float)).all()


def test_unknown_metric_suggests_close_name(data):
    with pytest.raises(InputError, match="Did you mean 'r2_mean_all'"):
        M.evaluate(*data, metrics=["r2_mean_al"])
    with pytest.raises(InputError, match="Unknown metric"):
        M.evaluate(*data, metrics="nonsense")


def test_gene_mismatch_raises(data):
    truth, pred, source = data
    shuffled = pred[:, pred.var_names[::-1]].copy()
    with pytest.raises(InputError, match=r"different order.*pred = pred\[:, truth.var_names\].copy\(\)"):
        M.prepare(truth, shuffled, source)
    with pytest.raises(
        InputError, match="source and truth have different genes: 1 of truth's 150 genes are missing"
    ):
        M.prepare(truth, pred, source[:, 1:].copy())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: make(np.where(np.arange(a.n_vars) == 3, np.nan, a.X), a.var_names, "x"), "NaN/inf"),
        (lambda a: a[:1].copy(), "at least 2 cells"),
        (lambda a: a[:0].copy(), "empty"),
        (lambda a: np.asarray(a.X), "must be an AnnData"),
    ],
)
def test_bad_input_raises(data, change, message):
    truth, pred, source = data
    with pytest.raises(InputError, match=message):
        M.prepare(truth, change(pred), source)


def test_n_top_clamped_with_note():
    truth, pred, source = synthetic(n_genes=60)
    with pytest.warns(UserWarning, match="n_top=100"):
        d = M.prepare(truth, pred, source)
    assert d.n_top == 60 and d.notes
    assert M.r2_mean_top100(d) == pytest.approx(M.r2_mean_all(d))


def test_sparse_equals_dense_and_inputs_untouched(data):
    truth, pred, source = data
    before = (truth.copy(), pred.copy(), source.copy())
    sparse_truth = make(sp.csr_matrix(truth.X), truth.var_names, "t")
    names = ["r2_mean_all", "mse_mean", "deg_overlap_top100"]
    dense = M.evaluate(truth, pred, source, metrics=names, n_boot=0)
    sparse = M.evaluate(sparse_truth, pred, source, metrics=names, n_boot=0)
    np.testing.assert_allclose(dense.value, sparse.value, atol=1e-12)
    for a, b in zip(before, (truth, pred, source), strict=True):
        np.testing.assert_array_equal(a.X, b.X)
        assert list(a.obs.columns) == list(b.obs.columns) and set(a.uns) == set(b.uns)


def test_evaluate_table_shape(data):
    table = M.evaluate(*data, metrics=["mse_mean", "edistance", "mse_mean"], n_boot=5)
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high", "higher_is_better", "error"]
    assert list(table.metric) == ["mse_mean", "edistance"]
    assert table.set_index("metric").loc["edistance", ["ci_low", "ci_high"]].isna().all()
    assert table.attrs["embedding"]["method"] == "PCA"


# ----------------------------------------------------------------------------------------- bootstrap


def test_r2_mean_top100_uses_only_the_degs():
    """Perfect on the top-100 DEGs, wrong elsewhere: top100 is 1, all genes is not (tutorials mixed these)."""
    truth, _, source = synthetic(n_genes=300, n_truth=80, n_source=80)
    top = M.top_degs(truth, source, n=100)
    X = np.array(truth.X, copy=True)
    rest = ~truth.var_names.isin(top)
    X[:, rest] += np.random.default_rng(5).uniform(0, 3, rest.sum())  # shift the other genes' means
    pred = make(X, truth.var_names, "p")
    d = M.prepare(truth, pred, source)
    assert set(d.top_genes) == set(top)
    assert M.r2_mean_top100(d) == pytest.approx(1.0, abs=1e-12)
    assert M.r2_mean_all(d) < 0.9


def test_bootstrap_replicates_are_explicit_resamples(prepared):
    rng = np.random.default_rng(7)
    W = M.core._boot_weights(rng, prepared.truth_X.shape[0], 3)
    means, var = M.core._boot_moments(prepared.truth_X, W)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, prepared.truth_X.shape[0], size=(3, prepared.truth_X.shape[0]))
    for b in range(3):
        np.testing.assert_allclose(means[b], prepared.truth_X[idx[b]].mean(0), atol=1e-10)
        np.testing.assert_allclose(var[b], prepared.truth_X[idx[b]].var(0), atol=1e-10)


def test_bootstrap_reproducible_and_contains_estimate():
    # a model with a clear systematic error: small noise relative to the error, so the percentile interval is
    # centred near the estimate
    truth, pred, source = synthetic(n_truth=400, n_pred=400, n_source=300, n_genes=120, pred_effect=0.4)
    names = ["r2_mean_all", "r2score_mean_all", "mse_mean", "mae_mean", "pearson_delta", "r2score_delta"]
    a = M.evaluate(truth, pred, source, metrics=names, n_boot=200, seed=3)
    b = M.evaluate(truth, pred, source, metrics=names, n_boot=200, seed=3)
    c = M.evaluate(truth, pred, source, metrics=names, n_boot=200, seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.ci_low, c.ci_low)
    assert (a.ci_low < a.ci_high).all()
    assert ((a.ci_low <= a.value) & (a.value <= a.ci_high)).all(), a


# ------------------------------------------------------------------------------- ceiling and normalise


def test_ceiling(data):
    truth, _, source = data
    table = M.ceiling(truth, source, metrics=["r2_mean_all", "mse_mean"], seed=1)
    again = M.ceiling(truth, source, metrics=["r2_mean_all", "mse_mean"], seed=1)
    pd.testing.assert_frame_equal(table, again)
    assert list(table.columns) == list(M.COLUMNS)
    assert 0.5 < table.value[0] < 1 and table.value[1] > 0
    with pytest.raises(InputError, match="at least 4"):
        M.ceiling(truth[:3].copy(), source)


def test_normalise():
    rows = [
        ("control", "r2", 0.2), ("ceiling", "r2", 0.8), ("scgen", "r2", 0.5),
        ("control", "mse", 4.0), ("ceiling", "mse", 1.0), ("scgen", "mse", 2.0),
        ("control", "flat", 1.0), ("ceiling", "flat", 1.0), ("scgen", "flat", 3.0),
    ]  # fmt: skip
    table = pd.DataFrame(rows, columns=["model", "metric", "value"])
    table["ci_low"], table["ci_high"] = table.value - 0.1, table.value + 0.1
    out = M.normalise(table).set_index(["model", "metric"])
    assert list(M.normalise(table).columns) == list(table.columns)
    assert out.loc[("scgen", "r2_norm"), "value"] == pytest.approx(0.5)
    assert out.loc[("scgen", "mse_norm"), "value"] == pytest.approx(
        2 / 3
    )  # lower-is-better flips: 1 = ceiling
    assert out.loc[("control", "mse_norm"), "value"] == 0 and out.loc[("ceiling", "mse_norm"), "value"] == 1
    assert math.isnan(out.loc[("scgen", "flat_norm"), "value"])
    lo, hi = out.loc[("scgen", "mse_norm"), ["ci_low", "ci_high"]]
    assert lo == pytest.approx((2.1 - 4) / -3) and hi == pytest.approx((1.9 - 4) / -3) and lo < hi
    with pytest.raises(InputError, match="no rows with model == 'ctrl'"):
        M.normalise(table, baseline="ctrl")


def test_normalise_by_group():
    table = pd.DataFrame(
        [(ct, model, "r2", v) for ct, vals in (("B", (0.0, 1.0, 0.25)), ("T", (0.5, 1.0, 1.0)))
         for model, v in zip(("control", "ceiling", "scgen"), vals, strict=True)],
        columns=["cell_type", "model", "metric", "value"],
    )  # fmt: skip
    with pytest.raises(InputError, match="several baseline rows"):
        M.normalise(table)
    out = M.normalise(table, by=["cell_type"]).set_index(["cell_type", "model"])
    assert out.loc[("B", "scgen"), "value"] == pytest.approx(0.25)
    assert out.loc[("T", "scgen"), "value"] == pytest.approx(1.0)


def test_pearson_delta_of_no_change_is_zero():
    """The control baseline (pred == source) has dp = 0 for every gene: scored 0, not undefined."""
    rng = np.random.default_rng(3)
    genes = [f"g{i}" for i in range(30)]
    source = make(rng.gamma(2, 1, size=(40, 30)), genes, "s")
    truth = make(rng.gamma(2, 1, size=(40, 30)) + np.linspace(0, 2, 30), genes, "t")
    pred = make(np.asarray(source.X), genes, "p")
    table = M.evaluate(truth, pred, source, metrics=["pearson_delta", "pearson_delta_top100"], n_boot=0)
    assert table.value.tolist() == [0.0, 0.0] and (table.error == "").all()
