"""Screens: discrimination score, Systema's delta correlation, scPerturb's E-test and evaluate_screen."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbkit import metrics
from perturbkit.metrics import stats
from perturbkit.errors import InputError
from perturbkit.metrics import (
    METRICS,
    discrimination_score,
    effect_table,
    effect_test,
    evaluate_screen,
    pearson_delta_systema,
)
from perturbkit.metrics.screen import ceiling_split, etest_statistic, perturbed_centroid

N_GENES = 40
PERTS = ["g0", "g1", "g2", "g3"]  # knock-downs named after genes, so the target-gene rule is exercised
FEW = ["pearson_delta", "r2_mean_all", "mse_mean", "edistance"]
pytestmark = pytest.mark.filterwarnings("ignore:n_top=100 is more than")


def _adata(X, labels, prefix):
    obs = pd.DataFrame({"condition": labels}, index=[f"{prefix}{i}" for i in range(len(labels))])
    return ad.AnnData(X=np.asarray(X, dtype=np.float64), obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)]))


def _effect(k: int) -> np.ndarray:
    """Perturbation k: +2 on its own five genes, plus +1.5 on ten genes that every perturbation moves (the
    systematic variation that Systema's reference removes)."""
    e = np.zeros(N_GENES)
    e[5 * k + 5 : 5 * k + 10] = 2.0
    e[30:40] = 1.5
    return e


def _cells(rng, n, shift):
    return 2.0 + shift + 0.5 * rng.standard_normal((n, N_GENES))


@pytest.fixture(scope="module")
def screen():
    """A synthetic screen: 4 perturbations x 40 cells, 60 control cells, and five models:
    ``oracle`` (fresh cells of the true distributions), ``control`` (the source cells, no change),
    ``mean_shift`` (source + the average effect, estimated on separate cells, for every perturbation) and
    ``swapped`` (oracle predictions of the wrong perturbation) and ``mixed`` (oracle for g0 and g1, no change
    for g2 and g3)."""
    rng = np.random.default_rng(0)
    n = 40
    source = _adata(_cells(rng, 60, 0.0), ["ctrl"] * 60, "s")
    target = _adata(np.vstack([_cells(rng, n, _effect(k)) for k in range(4)]),
                    [p for p in PERTS for _ in range(n)], "t")
    labels = [p for p in PERTS for _ in range(60)]
    avg = np.mean([_cells(rng, 200, _effect(k)).mean(0) for k in range(4)], axis=0)
    avg -= _cells(rng, 200, 0).mean(0)
    preds = {
        "control": _adata(np.vstack([source.X] * 4), labels, "c"),
        "mean_shift": _adata(np.vstack([source.X + avg] * 4), labels, "m"),
        "oracle": _adata(np.vstack([_cells(rng, 60, _effect(k)) for k in range(4)]), labels, "o"),
        "swapped": _adata(np.vstack([_cells(rng, 60, _effect((k + 1) % 4)) for k in range(4)]), labels, "w"),
        "mixed": _adata(np.vstack([_cells(rng, 60, _effect(0)), _cells(rng, 60, _effect(1)), source.X,
                                   source.X]), labels, "x"),
    }
    return target, preds, source


@pytest.fixture(scope="module")
def scored(screen):
    target, preds, source = screen
    return evaluate_screen(target, preds, source, condition_key="condition", metric_names=FEW, n_boot=5,
                           seed=0, responsive=["g0", "g2"])


def _value(table, model, pert, metric):
    row = table[(table.model == model) & (table.perturbation == pert) & (table.metric == metric)]
    assert len(row) == 1, (model, pert, metric, len(row))
    return float(row["value"].iloc[0])


# ----------------------------------------------------------------------------------- discrimination


def test_discrimination_hand_made_example():
    # real effects a, b, c are one-hot; the predictions of b and c are nearest to another perturbation
    truth = np.eye(3)
    pred = np.array([[0.9, 0, 0], [1.0, 0, 0], [0, 1.0, 0.1]])
    # a: distances (L1) 0.1, 1.9, 1.9 -> rank 0 -> 1
    # b: distances 0, 2, 2 (tie between b and c, broken by label order: b first) -> rank 1 -> 2/3
    # c: distances 2.1, 0.1, 1.9 -> rank 1 -> 2/3
    got = discrimination_score(truth, pred, np.zeros(3), labels=["a", "b", "c"])
    np.testing.assert_allclose(got, [1, 2 / 3, 2 / 3])
    # the same tie broken the other way when b's label sorts after c's (cell-eval orders them by label)
    got = discrimination_score(truth, pred, np.zeros(3), labels=["a", "z", "c"])
    np.testing.assert_allclose(got, [1, 1 / 3, 2 / 3])
    # deltas, not raw means: adding the same control to truth and pred changes nothing
    shifted = discrimination_score(truth + 5, pred + 5, np.full(3, 5.0), labels=["a", "b", "c"])
    np.testing.assert_allclose(shifted, [1, 2 / 3, 2 / 3])


def test_discrimination_leaves_out_the_target_gene():
    # genes a, b, c; perturbation a's prediction gets its own target gene right and the rest like b
    truth = np.array([[5.0, 0, 1], [0, 0, 0.1], [0, 0, 5]])
    pred = np.array([[5.0, 0, 0.1], [0, 0, 0.1], [0, 0, 5]])
    kw = dict(labels=["a", "b", "c"], var_names=["a", "b", "c"])
    assert discrimination_score(truth, pred, np.zeros(3), exclude_target_gene=False, **kw)[0] == 1.0
    assert discrimination_score(truth, pred, np.zeros(3), **kw)[0] == pytest.approx(2 / 3)


def test_discrimination_identity_is_perfect_and_shuffled_is_not():
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(8, 30)) * 3
    control = rng.normal(size=30)
    for metric in ("l1", "l2", "cosine"):
        assert (discrimination_score(truth, truth, control, metric=metric) == 1).all()
    shuffled = discrimination_score(truth, truth[np.roll(np.arange(8), 1)], control)
    assert (shuffled < 1).all() and shuffled.mean() < 0.75


def test_discrimination_bad_input():
    with pytest.raises(InputError, match="at least 2 perturbations"):
        discrimination_score(np.ones((1, 3)), np.ones((1, 3)), np.zeros(3))
    with pytest.raises(InputError, match="metric must be one of"):
        discrimination_score(np.eye(3), np.eye(3), np.zeros(3), metric="l3")
    with pytest.raises(InputError, match="shape"):
        discrimination_score(np.eye(3), np.eye(2), np.zeros(3))


# ------------------------------------------------------------------------------------------ Systema


def test_pearson_delta_systema_definition():
    rng = np.random.default_rng(1)
    truth, pred = rng.normal(size=(5, 20)), rng.normal(size=(5, 20))
    c = truth.mean(axis=0)
    np.testing.assert_allclose(perturbed_centroid(truth), c)
    expected = [np.corrcoef(pred[i] - c, truth[i] - c)[0, 1] for i in range(5)]
    np.testing.assert_allclose(pearson_delta_systema(truth, pred), expected)
    other = rng.normal(size=20)
    np.testing.assert_allclose(pearson_delta_systema(truth, pred, centroid=other),
                               [np.corrcoef(pred[i] - other, truth[i] - other)[0, 1] for i in range(5)])
    # predicting the centroid plus a constant is no change against it: 0, as pearson_delta (integer data, so
    # that pred - c is exactly constant)
    whole = rng.integers(-4, 5, size=(4, 20)).astype(float)
    assert (pearson_delta_systema(whole, np.tile(whole.mean(axis=0) + 1.0, (4, 1))) == 0).all()
    np.testing.assert_allclose(pearson_delta_systema(truth, truth), 1.0)


# ---------------------------------------------------------------------------------------- effect test


def test_etest_statistic_is_scperturbs_sample_corrected_squared_form():
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(30, 6)) + 0.3, rng.normal(size=(45, 6))
    n, m = len(X), len(Y)
    expected = (2 * cdist(X, Y, "sqeuclidean").mean() - cdist(X, X, "sqeuclidean").sum() / (n * (n - 1))
                - cdist(Y, Y, "sqeuclidean").sum() / (m * (m - 1)))
    assert etest_statistic(X, Y) == pytest.approx(expected, rel=1e-10)
    assert etest_statistic(X + 100.0, Y + 100.0) == pytest.approx(expected, rel=1e-8)


def test_effect_test_flags_a_planted_effect_and_not_a_null():
    rng = np.random.default_rng(4)
    control = _cells(rng, 80, 0.0)
    strong = effect_test(_cells(rng, 50, _effect(0)), control, n_perm=200, seed=0)
    null = effect_test(_cells(rng, 50, 0.0), control, n_perm=200, seed=0)
    assert strong.p_value == 1 / 200 and strong.n_perm == 200 and strong.statistic > 1
    assert null.p_value > 0.05
    again = effect_test(_cells(np.random.default_rng(4), 80, 0.0)[:50], control, n_perm=200, seed=0)
    assert again == effect_test(_cells(np.random.default_rng(4), 80, 0.0)[:50], control, n_perm=200, seed=0)


def test_effect_table_responsive_and_bh():
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(5)
    shifts = {"strong": _effect(0), "null": np.zeros(N_GENES), "other": _effect(2)}
    target = _adata(np.vstack([_cells(rng, 40, s) for s in shifts.values()]),
                    [p for p in shifts for _ in range(40)], "t")
    source = _adata(_cells(rng, 60, 0.0), ["ctrl"] * 60, "s")
    tab = effect_table(target, source, condition_key="condition", n_perm=200, seed=0)
    assert list(tab.columns) == ["perturbation", "n_cells", "statistic", "p_value", "q_value", "responsive"]
    assert tab.perturbation.tolist() == list(shifts)
    flags = tab.set_index("perturbation").responsive.to_dict()
    assert flags == {"strong": True, "null": False, "other": True}
    np.testing.assert_allclose(tab.q_value, false_discovery_control(tab.p_value, method="bh"))
    # without the PCA each row is effect_test of that perturbation's cells, same seed
    raw = effect_table(target, source, condition_key="condition", n_perm=50, n_pcs=None, seed=1)
    for i, p in enumerate(shifts):
        one = effect_test(target.X[target.obs.condition == p], source.X, n_perm=50, n_pcs=None, seed=1)
        assert (raw.statistic[i], raw.p_value[i]) == (one.statistic, one.p_value)
    with pytest.raises(InputError, match="alpha"):
        effect_table(target, source, condition_key="condition", alpha=1.5)
    with pytest.raises(InputError, match="n_perm"):
        effect_test(target.X, source.X, n_perm=0)


# ------------------------------------------------------------------------------------ evaluate_screen


def test_single_perturbation_is_score_models_plus_the_column():
    rng = np.random.default_rng(6)
    source = _adata(_cells(rng, 50, 0.0), ["control"] * 50, "s")
    target = _adata(_cells(rng, 40, _effect(1)), ["stimulated"] * 40, "t")
    preds = {"model": _adata(_cells(rng, 50, 0.8 * _effect(1)), ["stimulated"] * 50, "p"),
             "control": _adata(source.X, ["stimulated"] * 50, "c"),
             "mean_shift": _adata(source.X + _effect(1) * 0.5, ["stimulated"] * 50, "m")}
    got, info = evaluate_screen(target, preds, source, condition_key="condition", n_boot=5, seed=3)
    want, want_info = metrics.score_models(target, source, preds, None, n_boot=5, seed=3)
    want.insert(1, "perturbation", "stimulated")
    pd.testing.assert_frame_equal(got, want)
    assert info == want_info


def test_per_perturbation_rows_are_score_models_of_its_cells(screen, scored):
    target, preds, source = screen
    table, info = scored
    assert table.perturbation.unique().tolist() == [*PERTS, "mean", "mean_responsive", "all"]
    for p in ("g0", "g3"):
        cells = (target.obs.condition == p).to_numpy()
        sub = {k: v[(v.obs.condition == p).to_numpy()] for k, v in preds.items()}
        want, _ = metrics.score_models(target[cells], source, sub, FEW, n_boot=5, seed=0)
        got = table[(table.perturbation == p) & ~table.metric.str.startswith("pearson_delta_systema")]
        pd.testing.assert_frame_equal(got.drop(columns="perturbation").reset_index(drop=True), want)
    assert info["perturbations"] == PERTS and info["responsive"] == ["g0", "g2"]
    assert set(info["embeddings"]) == set(PERTS) and "discrimination_score" in info["definitions"]
    assert not set(METRICS) & {"discrimination_score", "pearson_delta_systema"} and len(METRICS) == 17


def test_summary_rows_are_the_means_over_perturbations(scored):
    table, _ = scored
    per = table[table.perturbation.isin(PERTS)]
    for label, perts in (("mean", PERTS), ("mean_responsive", ["g0", "g2"])):
        summary = table[table.perturbation == label]
        assert len(summary) == len(per.groupby(["model", "metric"]))
        for row in summary.itertuples():
            values = per[(per.model == row.model) & (per.metric == row.metric) & per.perturbation.isin(perts)]
            mean, _sd, lo, hi = stats.t_interval(values.value.to_numpy())
            assert row.value == pytest.approx(mean) and (row.ci_low, row.ci_high) == pytest.approx((lo, hi))
            assert row.higher_is_better == values.higher_is_better.iloc[0]
    # the "all" systema row is its mean over perturbations
    for model in ("oracle", "mean_shift", "ceiling"):
        assert _value(table, model, "all", "pearson_delta_systema") == pytest.approx(
            _value(table, model, "mean", "pearson_delta_systema"))


def test_average_effect_model_discriminates_poorly_but_correlates(scored):
    table, _ = scored
    disc = {m: _value(table, m, "all", "discrimination_score") for m in ("oracle", "mean_shift", "swapped")}
    assert disc["oracle"] == 1.0 and disc["swapped"] <= 0.75  # no perturbation ranked first
    # the same prediction for every perturbation ranks each one by its real delta alone: about (P + 1) / 2P
    assert disc["mean_shift"] <= 0.75
    # ... while its delta correlation against the controls looks fine (the shared shift), and Systema's is ~0
    assert _value(table, "mean_shift", "mean", "pearson_delta") > 0.5
    assert abs(_value(table, "mean_shift", "mean", "pearson_delta_systema")) < 0.3
    assert _value(table, "oracle", "mean", "pearson_delta_systema") > 0.9
    assert _value(table, "control", "mean", "pearson_delta") == 0.0
    # share of perturbations where each model's pearson_delta is above mean_shift's
    assert _value(table, "oracle", "all", "share_beats_mean_shift") == 1.0
    assert _value(table, "control", "all", "share_beats_mean_shift") == 0.0
    assert not (table.metric == "share_beats_mean_shift").loc[table.model == "mean_shift"].any()
    # the shares are those of the pearson_delta rows metrics.score_models reports
    per = table[table.perturbation.isin(PERTS) & (table.metric == "pearson_delta")].pivot(
        index="perturbation", columns="model", values="value")
    assert _value(table, "mixed", "all", "share_beats_mean_shift") == 0.5
    for model in ("oracle", "control", "swapped", "mixed", "ceiling"):
        share = float((per[model] > per["mean_shift"]).mean())
        assert _value(table, model, "all", "share_beats_mean_shift") == share
    assert {"pearson_delta_systema_norm", "discrimination_score"} <= set(table.metric)


def test_cross_perturbation_ceiling_uses_score_models_split(screen, scored):
    target, _preds, source = screen
    table, _ = scored
    for p in PERTS:
        t_p = target[(target.obs.condition == p).to_numpy()]
        pred_idx, truth_idx = ceiling_split(t_p.n_obs, 0)
        halves = metrics.evaluate(t_p[truth_idx], t_p[pred_idx], source, metrics=["pearson_delta"], n_boot=0)
        assert halves.value.iloc[0] == _value(table, "ceiling", p, "pearson_delta")


def test_evaluate_screen_bad_input(screen):
    target, preds, source = screen
    short = {**preds, "partial": preds["oracle"][(preds["oracle"].obs.condition != "g2").to_numpy()]}
    with pytest.raises(InputError, match=r"'partial' predicts no cells of perturbation\(s\) 'g2'"):
        evaluate_screen(target, short, source, condition_key="condition", metric_names=FEW, n_boot=0)
    with pytest.raises(InputError, match="responsive names perturbation"):
        evaluate_screen(target, preds, source, condition_key="condition", responsive=["g9"])
    renamed = target.copy()
    renamed.obs["condition"] = renamed.obs.condition.replace({"g0": "all"})
    with pytest.raises(InputError, match="labels of evaluate_screen's summary rows"):
        evaluate_screen(renamed, preds, source, condition_key="condition")
    with pytest.raises(InputError, match="condition_key 'cond' is not a column"):
        evaluate_screen(target, preds, source, condition_key="cond")
    no_ref, info = evaluate_screen(target, {"oracle": preds["oracle"], "control": preds["control"]}, source,
                                   condition_key="condition", metric_names=["pearson_delta"], n_boot=0)
    assert not no_ref.metric.str.startswith("share_beats").any()
    assert any("'mean_shift' is not among the models" in n for n in info["screen_notes"])
    assert np.isfinite(no_ref[no_ref.metric == "discrimination_score"].ci_low).all()
