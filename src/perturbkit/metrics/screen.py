"""Screens: metrics across perturbations (:func:`discrimination_score`, cell-eval's;
:func:`pearson_delta_systema`, Systema's), scPerturb's effect test (:func:`effect_test`, :func:`effect_table`:
which perturbations have a measurable effect) and :func:`evaluate_screen` (every registered metric per
(model, perturbation) through :func:`perturbkit.metrics.score_models`, means over perturbations, cross-perturbation
rows). Nothing here is registered in ``METRICS``, so single-pair scoring is unchanged. Importing this module
loads numpy only; pandas, scipy, scikit-learn and the scoring core load when used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from ..errors import InputError, check_seed, choices_text, suggest
from .evaldata import ceiling_split
from .functions import pearson_delta

#: cell-eval's ``discrimination_score_l1`` / ``_l2`` / ``_cosine`` (names for ``sklearn`` pairwise_distances)
DISCRIMINATION_DISTANCES = ("l1", "l2", "cosine")

#: one-line definitions of the rows :func:`evaluate_screen` adds (also returned in its info dict)
DEFINITIONS = {
    "discrimination_score": (
        "cell-eval discrimination_score_l1: for each perturbation p, r_p = 0-based rank of p's real delta "
        "(truth mean - source mean) among all perturbations' real deltas, by L1 distance to p's predicted "
        "delta (pred mean - source mean), the gene named p left out; score 1 - r_p / P; exact ties in "
        "sorted-label order; row = mean over perturbations, Student-t 95 % interval over them"),
    "pearson_delta_systema": (
        "Systema: Pearson r of (pred mean - c) vs (truth mean - c) over all genes, c = mean over the "
        "screen's perturbations of their real target means (each perturbation weighted equally); 0 if "
        "pred mean - c is constant; no bootstrap interval"),
    "share_beats": (
        "share_beats_<reference>: share of perturbations where the model's pearson_delta is strictly above "
        "the reference model's (perturbations where either is undefined are left out and named in error)"),
    "mean": "mean over all perturbations of the per-perturbation values; Student-t 95 % interval over them",
    "mean_responsive": "the same mean over the responsive perturbations only",
}


# ------------------------------------------------------------------------------------------- checks


def _matrix(name: str, X, *, rows: str = "rows") -> np.ndarray:
    import scipy.sparse as sp

    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    if X.ndim != 2 or 0 in X.shape:
        raise InputError(f"{name} must be a non-empty 2-D array ({rows} x genes), got shape {X.shape}.",
                         params=(name,))
    X = np.ascontiguousarray(X, dtype=np.float64)
    if not np.isfinite(X).all():
        raise InputError(f"{name} has {int((~np.isfinite(X)).sum())} NaN/inf values; give finite numbers.",
                         params=(name,))
    return X


def _pair(truth_means, pred_means) -> tuple[np.ndarray, np.ndarray]:
    T = _matrix("truth_means", truth_means, rows="perturbations")
    P = _matrix("pred_means", pred_means, rows="perturbations")
    if P.shape != T.shape:
        raise InputError(f"pred_means has shape {P.shape} but truth_means has {T.shape}; give one row per "
                         "perturbation and one column per gene, in the same order.",
                         params=("pred_means", "truth_means"))
    return T, P


def _vector(name: str, v, n: int) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if v.shape != (n,) or not np.isfinite(v).all():
        raise InputError(f"{name} must be {n} finite values (one per gene), got shape {v.shape}.",
                         params=(name,))
    return v


def _count(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise InputError(f"{name} must be an integer >= {least}, got {value!r}.", params=(name,))
    return int(value)


def _labels(adata, key: str, name: str) -> np.ndarray:
    if not hasattr(adata, "obs"):
        raise InputError(f"{name} must be an AnnData object, got {type(adata).__name__}.")
    if key not in adata.obs.columns:
        raise InputError(f"condition_key {key!r} is not a column of {name}.obs."
                         f"{suggest(key, adata.obs.columns)} Columns: {choices_text(adata.obs.columns)}.",
                         params=("condition_key",))
    return adata.obs[key].astype(str).to_numpy()


# -------------------------------------------------------------------------------- discrimination score


def discrimination_score(truth_means, pred_means, control_mean, *, pred_control_mean=None, labels=None,
                         var_names=None, metric: str = "l1", exclude_target_gene: bool = True) -> np.ndarray:
    """cell-eval's discrimination score: how well each predicted perturbation picks out its own real one.

    Parameters
    ----------
    truth_means, pred_means
        ``(P, G)`` pseudobulk (per-gene mean) profiles of the real and the predicted cells, one row per
        perturbation in the same order, ``P >= 2``.
    control_mean
        ``(G,)`` mean of the real control (source) cells.
    pred_control_mean
        ``(G,)`` control mean subtracted from the predictions; default ``control_mean`` (predictions made
        from the source cells share its controls).
    labels
        the ``P`` perturbation labels: they order exact ties (sorted, as cell-eval's ``np.union1d``) and name
        the target gene to leave out; default row order and no gene left out.
    var_names
        the ``G`` gene names (needed to leave out the target gene).
    metric
        ``"l1"`` (cell-eval's default, the Virtual Cell Challenge's), ``"l2"`` or ``"cosine"``, computed with
        ``sklearn.metrics.pairwise_distances`` as cell-eval does.
    exclude_target_gene
        for perturbation ``p``, leave out the gene whose name equals ``p``'s label (cell-eval's default; a
        combination label such as ``"A+B"`` names no gene, so nothing is left out for it).

    Returns
    -------
    numpy.ndarray
        ``(P,)`` scores ``1 - r_p / P`` in ``[1/P, 1]``; 1: p's prediction is nearest to p's own profile.

    Notes
    -----
    Matches ``cell_eval.metrics.discrimination_score`` (ArcInstitute/cell-eval, ``metrics/_anndata.py``,
    checked against it at commit cb70876; docs/metrics.md). Real effects ``e_q = truth_q - control`` and
    predicted effects ``f_p = pred_p - pred_control`` (deltas, not raw means); for each p the distances
    ``d_q = dist(e_q, f_p)`` over the kept genes to every q (p included) and ``r_p`` = p's 0-based position
    when the q are sorted by ``d_q``. cell-eval sorts with ``np.argsort``'s default kind, which is not stable,
    so its result on exact ties depends on the platform; here ties keep the sorted-label order, which is
    cell-eval's result whenever its sort keeps them in order: ``r_p = #{q: d_q < d_p} + #{q sorted before p:
    d_q = d_p}``.
    """
    from sklearn.metrics import pairwise_distances

    T, Pm = _pair(truth_means, pred_means)
    n, g = T.shape
    if n < 2:
        raise InputError(f"discrimination_score needs at least 2 perturbations, got {n}.",
                         params=("truth_means",))
    if metric not in DISCRIMINATION_DISTANCES:
        raise InputError(f"metric must be one of {choices_text(DISCRIMINATION_DISTANCES)}, got {metric!r}."
                         f"{suggest(metric, DISCRIMINATION_DISTANCES)}", params=("metric",))
    control = _vector("control_mean", control_mean, g)
    pred_control = control if pred_control_mean is None else _vector("pred_control_mean",
                                                                     pred_control_mean, g)
    names = [str(i) for i in range(n)] if labels is None else [str(x) for x in labels]
    if len(names) != n or len(set(names)) != n:
        raise InputError(f"labels must be {n} distinct perturbation labels (one per row), got {len(names)} "
                         f"({len(set(names))} distinct).", params=("labels",))
    genes = None
    if exclude_target_gene and labels is not None and var_names is not None:
        genes = np.asarray([str(x) for x in var_names])
        if genes.shape != (g,):
            raise InputError(f"var_names must hold {g} gene names, got {genes.shape[0]}.",
                             params=("var_names",))
    real, pred = T - control, Pm - pred_control
    position = np.empty(n, dtype=int)  # place in cell-eval's order (sorted labels), used on exact ties only
    position[np.argsort(np.asarray(names), kind="stable")] = np.arange(n)
    scores = np.empty(n)
    for p in range(n):
        keep = slice(None) if genes is None else genes != names[p]
        d = pairwise_distances(real[:, keep], pred[p : p + 1, keep], metric=metric).ravel()
        rank = int((d < d[p]).sum() + ((d == d[p]) & (position < position[p])).sum())
        scores[p] = 1.0 - rank / n
    return scores


# ------------------------------------------------------------------------------------------ Systema


def _delta_r(truth_mean, pred_mean, reference, nan: bool = False) -> float:
    """``pearson_delta`` with ``reference`` in the source's place (the same Pearson r, the same 0 for a
    constant predicted change); where the real change is constant: ValueError, or NaN if ``nan``."""
    try:
        return pearson_delta(SimpleNamespace(truth_mean=truth_mean, pred_mean=pred_mean,
                                             source_mean=reference))
    except ValueError:
        if not nan:
            raise
        return math.nan


def perturbed_centroid(truth_means) -> np.ndarray:
    """Systema's perturbed reference: the mean over perturbations of their real mean profiles, each counted
    once whatever its number of cells (Systema's ``average_of_perturbation_centroids``)."""
    return _matrix("truth_means", truth_means, rows="perturbations").mean(axis=0)


def pearson_delta_systema(truth_means, pred_means, centroid=None) -> np.ndarray:
    """Delta correlation against the perturbed centroid instead of the controls (Systema).

    Parameters
    ----------
    truth_means, pred_means
        ``(P, G)`` real and predicted mean profiles, one row per perturbation in the same order.
    centroid
        ``(G,)`` reference; default :func:`perturbed_centroid` of ``truth_means`` (needs ``P >= 2``).

    Returns
    -------
    numpy.ndarray
        ``(P,)`` values ``pearson(pred_p - c, truth_p - c)`` over all genes; 0 where ``pred_p - c`` is
        constant (as ``pearson_delta``), NaN where ``truth_p - c`` is constant (undefined).

    Notes
    -----
    Viñas Torné et al., "Systema: a framework for evaluating genetic perturbation response prediction beyond
    systematic variation", Nat Biotechnol 2025 (mlbio-epfl/systema, ``evaluation/
    pearson_delta_reference_metrics.py``, metric ``corr_all_allpert``). Systema's reference is
    ``average_of_perturbation_centroids`` of the *training* split's perturbed cells (its test perturbations
    are unseen, its cell line the same). In a context transfer the training cells lie in other contexts,
    whose offset would come back into every delta, so :func:`evaluate_screen` uses the centroid of the
    held-out context's real perturbed cells over all evaluated perturbations (equal weights, as Systema's
    function). Pass ``centroid`` for another reference, e.g. Systema's own.
    """
    T, Pm = _pair(truth_means, pred_means)
    if centroid is None:
        if T.shape[0] < 2:
            raise InputError(f"pearson_delta_systema needs at least 2 perturbations (got {T.shape[0]}) for "
                             "the perturbed centroid, or a centroid.", params=("truth_means", "centroid"))
        c = perturbed_centroid(T)
    else:
        c = _vector("centroid", centroid, T.shape[1])
    return np.array([_delta_r(T[p], Pm[p], c, nan=True) for p in range(T.shape[0])])


# --------------------------------------------------------------------------------------- effect test


class EffectTest(NamedTuple):
    """Result of :func:`effect_test`: scPerturb's E-distance, its permutation p-value, the permutations."""

    statistic: float
    p_value: float
    n_perm: int


def _etest_stats(sX: np.ndarray, rX: np.ndarray, n_x: int, S: np.ndarray, R: float, n: int) -> np.ndarray:
    """E-distances of groups of ``n_x`` of the ``n`` centred cells, from their coordinate sums ``sX``
    ``(k, d)`` and squared-norm sums ``rX`` ``(k,)``; ``S``, ``R``: the same sums over all cells."""
    n_y = n - n_x
    sY, rY = S - sX, R - rX
    delta = rX / n_x + rY / n_y - 2 * np.einsum("ij,ij->i", sX, sY) / (n_x * n_y)
    sigma_x = 2 * (rX - np.einsum("ij,ij->i", sX, sX) / n_x) / (n_x - 1)
    sigma_y = 2 * (rY - np.einsum("ij,ij->i", sY, sY) / n_y) / (n_y - 1)
    return 2 * delta - sigma_x - sigma_y


def _etest(A: np.ndarray, B: np.ndarray, n_perm: int, rng: np.random.Generator) -> tuple[float, int]:
    """(observed statistic, number of permutations whose statistic is >= it); A = the perturbed cells."""
    n_a = A.shape[0]
    if n_a < 2 or B.shape[0] < 2:
        raise InputError(f"the effect test needs at least 2 cells on each side, got {n_a} perturbed and "
                         f"{B.shape[0]} control cells.")
    Z = np.vstack([A, B])
    Z -= Z.mean(axis=0)  # the statistic is translation-invariant; centring keeps the sums well conditioned
    n = Z.shape[0]
    r = np.einsum("ij,ij->i", Z, Z)
    S, R = Z.sum(axis=0), float(r.sum())
    W = np.zeros((1, n))
    W[0, :n_a] = 1.0
    observed = float(_etest_stats(W @ Z, W @ r, n_a, S, R, n)[0])
    block = max(1, min(n_perm, (1 << 22) // n))  # at most ~4M membership weights (32 MB) at a time
    exceed = 0
    for start in range(0, n_perm, block):
        W = np.zeros((min(block, n_perm - start), n))
        for k in range(W.shape[0]):  # a random relabelling: which n_a of the pooled cells form the group
            W[k, rng.permutation(n)[:n_a]] = 1.0
        exceed += int((_etest_stats(W @ Z, W @ r, n_a, S, R, n) >= observed).sum())
    return observed, exceed


def etest_statistic(X, Y) -> float:
    """scPerturb's E-distance ``2 delta - sigma_X - sigma_Y`` with squared Euclidean distances.

    ``delta = mean_ij ||x_i - y_j||^2`` over all pairs, ``sigma_X = sum_{i != j} ||x_i - x_j||^2 / (N (N-1))``
    (``sample_correct=True``: self-pairs left out), likewise ``sigma_Y``. With squared distances this equals
    ``2 (||mean_X - mean_Y||^2 - tr(C_X) / N - tr(C_Y) / M)`` (C: covariance, ``ddof=1``), so it is computed
    from sums in O((N + M) d) memory, without the pairwise matrix.
    """
    X, Y = _matrix("X", X, rows="cells"), _matrix("Y", Y, rows="cells")
    return _etest(X, Y, 0, np.random.default_rng(0))[0]  # no permutations: the statistic only


def _embed(parts: Sequence[np.ndarray], n_pcs: int | None, seed: int) -> list[np.ndarray]:
    if n_pcs is None:
        return list(parts)
    from sklearn.decomposition import PCA

    pooled = np.vstack(parts)
    k = min(n_pcs, pooled.shape[0] - 1, pooled.shape[1])
    Z = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit_transform(pooled)
    return np.split(Z, np.cumsum([p.shape[0] for p in parts])[:-1])


def _test_args(n_perm, n_pcs, seed) -> tuple[int, int | None]:
    check_seed(seed, "seed")
    return _count("n_perm", n_perm, 1), None if n_pcs is None else _count("n_pcs", n_pcs, 1)


def effect_test(target_X, source_X, *, n_perm: int = 1000, n_pcs: int | None = 50,
                seed: int = 0) -> EffectTest:
    """scPerturb's E-test: do a perturbation's cells differ in distribution from the control cells?

    Parameters
    ----------
    target_X, source_X
        cells x genes arrays (dense or sparse) of the perturbed and the control cells, same genes, at least 2
        cells each.
    n_perm
        permutations (scPerturb's ``runs``); the smallest possible p-value is ``1 / n_perm``.
    n_pcs
        principal components of the space the test runs in (scPerturb tests in ``X_pca``, scanpy's 50 PCs):
        ``PCA(min(n_pcs, n_cells - 1, n_genes), svd_solver="randomized", random_state=seed)`` fitted on the
        pooled cells; ``None`` tests the given coordinates as they are (e.g. an embedding).
    seed
        seeds the PCA and ``numpy.random.default_rng(seed)``, which draws the permutations.

    Returns
    -------
    EffectTest
        ``statistic`` (:func:`etest_statistic` of target vs source), ``p_value``, ``n_perm``.

    Notes
    -----
    Peidli et al., "scPerturb: harmonized single-cell perturbation data", Nat Methods 2024;
    ``scperturb.etest`` (sanderlab/scPerturb, ``package/src/scperturb/etest.py``, its defaults
    ``dist="sqeuclidean"``, ``sample_correct=True``). Each permutation relabels the pooled cells at random,
    keeping the group sizes, and recomputes the statistic; ``p = max(#{permutations with statistic >=
    observed}, 1) / n_perm``, scPerturb's rule (the Phipson-Smyth ``(b + 1) / (n_perm + 1)`` differs by less
    than ``1 / n_perm``). The PCA sees the pooled cells without their labels, so the test stays exact.
    pertpy's ``DistanceTest("edistance")`` differs: Euclidean distances, self-pairs kept, strict ``>``.
    """
    n_perm, n_pcs = _test_args(n_perm, n_pcs, seed)
    A, B = _matrix("target_X", target_X, rows="cells"), _matrix("source_X", source_X, rows="cells")
    if A.shape[1] != B.shape[1]:
        raise InputError(f"target_X has {A.shape[1]} genes but source_X has {B.shape[1]}; give the same "
                         "genes.", params=("target_X", "source_X"))
    A, B = _embed([A, B], n_pcs, seed)
    statistic, exceed = _etest(A, B, n_perm, np.random.default_rng(seed))
    return EffectTest(statistic, max(exceed, 1) / n_perm, n_perm)


def effect_table(target, source, *, condition_key: str, n_perm: int = 1000, n_pcs: int | None = 50,
                 alpha: float = 0.05, seed: int = 0):
    """Per perturbation of a screen: is there a measurable effect against the controls?

    Parameters
    ----------
    target
        AnnData of the real perturbed cells; ``obs[condition_key]`` holds each cell's perturbation.
    source
        AnnData of the control cells, same genes.
    n_perm, n_pcs, seed
        as :func:`effect_test`. One PCA is fitted on all target and source cells together (scPerturb runs its
        test in the PCA of the whole data set); each perturbation is then tested as
        ``effect_test(its cells, the source cells, n_pcs=None, seed=seed)`` in that space.
    alpha
        false discovery rate: ``responsive = q_value < alpha``.

    Returns
    -------
    pandas.DataFrame
        one row per perturbation, in order of first appearance: ``perturbation, n_cells, statistic, p_value,
        q_value, responsive``; ``q_value`` = Benjamini-Hochberg adjusted p-values across the screen's
        perturbations (``scipy.stats.false_discovery_control(method="bh")``; scPerturb's default correction,
        Holm-Sidak, controls the family-wise error instead).
    """
    import pandas as pd
    from scipy.stats import false_discovery_control

    n_perm, n_pcs = _test_args(n_perm, n_pcs, seed)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise InputError(f"alpha must be a number between 0 and 1 (e.g. 0.05), got {alpha!r}.",
                         params=("alpha",))
    labels = _labels(target, condition_key, "target")
    T, S = _matrix("target.X", target.X, rows="cells"), _matrix("source.X", source.X, rows="cells")
    if T.shape[1] != S.shape[1]:
        raise InputError(f"target has {T.shape[1]} genes but source has {S.shape[1]}; give the same genes.")
    emb_t, emb_s = _embed([T, S], n_pcs, seed)
    rows = []
    for p in pd.unique(labels):
        try:
            statistic, exceed = _etest(emb_t[labels == p], emb_s, n_perm, np.random.default_rng(seed))
        except InputError as exc:
            raise InputError(f"perturbation {p!r}: {exc}") from exc
        rows.append((p, int((labels == p).sum()), statistic, max(exceed, 1) / n_perm))
    table = pd.DataFrame(rows, columns=["perturbation", "n_cells", "statistic", "p_value"])
    table["q_value"] = false_discovery_control(table["p_value"].to_numpy(), method="bh")
    table["responsive"] = table["q_value"] < alpha
    return table


# ------------------------------------------------------------------------------------ evaluate_screen


def _mean(adata, rows) -> np.ndarray:
    import scipy.sparse as sp

    X = adata.X[rows]
    return np.ascontiguousarray(X.toarray() if sp.issparse(X) else X, dtype=np.float64).mean(axis=0)


def _row(model, pert, metric, value, lo=math.nan, hi=math.nan, error="", better=True) -> dict:
    return {"model": model, "perturbation": pert, "metric": metric, "value": value, "ci_low": lo,
            "ci_high": hi, "higher_is_better": better, "error": error}


def _t_row(model, pert, metric, values, names, better=True) -> dict:
    """A row holding the Student-t mean of ``values`` (one per perturbation in ``names``)."""
    from .stats import t_interval

    values = np.asarray(values, dtype=float)
    mean, _sd, lo, hi = t_interval(values)
    bad = [str(p) for p, v in zip(names, values) if not np.isfinite(v)]
    error = (f"mean over {len(values) - len(bad)} of {len(values)} perturbations; undefined for "
             f"{', '.join(bad)}" if bad else "")
    return _row(model, pert, metric, mean, lo, hi, error, better)


def _summary(per_pert, label: str, perts: list[str]) -> list[dict]:
    """``label`` rows: per (model, metric), the Student-t mean over the perturbations ``perts``."""
    part = per_pert[per_pert["perturbation"].isin(perts)]
    return [_t_row(model, label, metric, g["value"], g["perturbation"], bool(g["higher_is_better"].iloc[0]))
            for (model, metric), g in part.groupby(["model", "metric"], sort=False)]


def _check_screen(target, preds, condition_key, responsive):
    """(target labels, its perturbations, each model's labels, responsive labels or None, notes)."""
    import pandas as pd

    if not isinstance(preds, Mapping) or not preds:
        raise InputError("preds must map model names to predicted AnnData objects (at least one), got "
                         f"{type(preds).__name__}{'' if preds else ' (empty)'}.", params=("preds",))
    labels = _labels(target, condition_key, "target")
    perts = list(pd.unique(labels))
    clash = sorted({"mean", "mean_responsive", "all"} & set(perts))
    if clash and len(perts) > 1:
        raise InputError(f"perturbation label(s) {choices_text(clash)} are the labels of evaluate_screen's "
                         "summary rows; rename them in target and preds.", params=("condition_key",))
    pred_labels = {name: _labels(pred, condition_key, f"preds[{name!r}]") for name, pred in preds.items()}
    notes = []
    for name, lab in pred_labels.items():
        missing, extra = [p for p in perts if p not in set(lab)], set(lab) - set(perts)
        if missing:
            raise InputError(f"model {name!r} predicts no cells of perturbation(s) {choices_text(missing)} "
                             "that the target holds; every model must predict every perturbation of the "
                             "target.", params=("preds",))
        if extra:
            notes.append(f"{name}: predicted perturbation(s) {choices_text(extra)} are not in the target; "
                         "not scored.")
    chosen = None
    if responsive is not None:
        chosen = {str(x) for x in ([responsive] if isinstance(responsive, str) else responsive)}
        unknown = sorted(chosen - set(perts))
        if unknown:
            raise InputError(f"responsive names perturbation(s) {choices_text(unknown)} that the target does "
                             f"not hold.{suggest(unknown[0], perts)} Target perturbations: "
                             f"{choices_text(perts)}.", params=("responsive",))
        chosen = [p for p in perts if p in chosen]
        if not chosen:
            notes.append("responsive holds no perturbation: no mean_responsive rows.")
    return labels, perts, pred_labels, chosen, notes


def evaluate_screen(target, preds: Mapping, source, *, condition_key: str, metric_names=None,
                    n_boot: int = 100, seed: int = 0, baseline: str = "control",
                    reference: str = "mean_shift", ceiling: bool = True,
                    responsive: Iterable[str] | None = None, execution=None, moments=None):
    """Score every model on every perturbation of a screen, with means over perturbations and the
    cross-perturbation metrics (docs/metrics.md, "Screens").

    Parameters
    ----------
    target
        AnnData of the real perturbed cells; ``obs[condition_key]`` holds each cell's perturbation.
    preds
        model name -> predicted AnnData with the same ``obs[condition_key]`` column and every perturbation of
        ``target`` (the baselines are among the models); labels not in ``target`` are ignored, with a note.
    source
        AnnData of the control cells every prediction started from.
    metric_names, n_boot, seed, baseline, ceiling, execution
        as :func:`perturbkit.metrics.score_models`, which scores each perturbation's cells.
    reference
        the model the ``share_beats_<reference>`` rows compare with (no such rows, and a note, if absent).
    responsive
        labels of the perturbations with a measurable effect (e.g. from :func:`effect_table`); adds
        ``mean_responsive`` rows. Labels not in ``target`` raise :class:`InputError`.
    moments
        None, or the per-gene (mean, variance) of all the cells that target, source and the predictions are
        samples of: ``{"truth": {perturbation: mv}, "source": mv, "pred": {model: {perturbation: mv}}}``
        (``perturbkit predict`` streams them over a held-out context larger than its ``eval_cells``). Every
        moment metric and the cross-perturbation rows use them; the DEGs, distances and the ceiling use the
        cells given (:func:`perturbkit.metrics.prepare`).

    Returns
    -------
    (pandas.DataFrame, dict)
        The tidy table ``model, perturbation, metric, value, ci_low, ci_high, higher_is_better, error``:

        * per perturbation, in order of first appearance: exactly ``score_models``'s rows for its cells
          (models, ``ceiling``, ``*_norm``); with >= 2 perturbations also ``pearson_delta_systema`` (and its
          ``_norm`` when ``score_models`` normalises) for each model and the ceiling;
        * with >= 2 perturbations: ``perturbation = "mean"``, per (model, metric) the mean over perturbations
          with a Student-t 95 % interval over them (:func:`perturbkit.stats.t_interval`);
          ``"mean_responsive"``, the same over ``responsive``; ``"all"``: ``discrimination_score``,
          ``pearson_delta_systema`` (equal to its ``mean`` row) and ``share_beats_<reference>`` per model.

        The ceiling's cross-perturbation rows use :func:`ceiling_split`, the halves of ``score_models``'s
        ceiling. With one perturbation: ``score_models``'s table plus the ``perturbation`` column (after
        ``model``) and its dict. Otherwise the dict also holds ``perturbations``, ``embeddings`` (per
        perturbation), ``responsive``, ``definitions`` (:data:`DEFINITIONS`) and ``screen_notes``, and each
        model's ``notes`` start with their perturbation.
    """
    import pandas as pd

    from .core import SCORE_COLUMNS, normalise, score_models

    labels, perts, pred_labels, chosen, screen_notes = _check_screen(target, preds, condition_key, responsive)

    def cells(adata, lab, p):
        mask = lab == p
        return adata if mask.all() else adata[mask]

    blocks, infos = [], {}
    for p in perts:
        preds_p = {name: cells(pred, pred_labels[name], p) for name, pred in preds.items()}
        given = None if moments is None else {
            "truth": moments["truth"][p], "source": moments["source"],
            "pred": {name: moments["pred"][name][p] for name in preds}}
        try:
            tab, infos[p] = score_models(cells(target, labels, p), source, preds_p, metric_names, n_boot=n_boot,
                                         seed=seed, baseline=baseline, ceiling=ceiling, execution=execution,
                                         moments=given)
        except InputError as exc:
            raise InputError(f"perturbation {p!r}: {exc}", params=exc.params) from exc
        tab.insert(1, "perturbation", p)
        blocks.append(tab)
    if len(perts) == 1:
        return blocks[0], infos[perts[0]]

    # cross-perturbation metrics, from per-perturbation means; each model is scored against ``truth[model]``
    rows_of = [np.flatnonzero(labels == p) for p in perts]
    if moments is None:
        source_mean = _mean(source, slice(None))
        means = {name: np.vstack([_mean(pred, pred_labels[name] == p) for p in perts])
                 for name, pred in preds.items()}
        truth = dict.fromkeys(means, np.vstack([_mean(target, r) for r in rows_of]))
    else:  # the means of every cell, not of the sample given
        source_mean = np.asarray(moments["source"][0], dtype=np.float64)
        means = {name: np.vstack([moments["pred"][name][p][0] for p in perts]) for name in preds}
        truth = dict.fromkeys(means, np.vstack([moments["truth"][p][0] for p in perts]))
    centroid = perturbed_centroid(truth[next(iter(means))])
    if ceiling:
        halves = [(r[a], r[b]) for r in rows_of for a, b in [ceiling_split(len(r), seed)]]
        means["ceiling"] = np.vstack([_mean(target, a) for a, _ in halves])
        truth["ceiling"] = np.vstack([_mean(target, b) for _, b in halves])

    systema = pd.DataFrame([_row(m, p, "pearson_delta_systema",
                                 _delta_r(truth[m][i], M[i], centroid, nan=True))
                            for m, M in means.items() for i, p in enumerate(perts)])
    systema.loc[systema.value.isna(), "error"] = "undefined: the real change against the centroid is constant"
    all_rows = [_t_row(m, "all", "pearson_delta_systema", systema.value[systema.model == m], perts)
                for m in means]
    if ceiling and baseline in preds:
        norm = normalise(systema, baseline=baseline, ceiling="ceiling", by=["perturbation"])
        systema = pd.concat([systema, norm[norm.model != "ceiling"]], ignore_index=True)
    per_pert = pd.concat([pd.concat([b, systema[systema.perturbation == p]], ignore_index=True)
                          for b, p in zip(blocks, perts)], ignore_index=True)
    summary = _summary(per_pert, "mean", perts)
    summary += _summary(per_pert, "mean_responsive", chosen) if chosen else []

    var_names = pd.Index(target.var_names).astype(str)
    all_rows[:0] = [_t_row(m, "all", "discrimination_score", discrimination_score(
        truth[m], M, source_mean, labels=perts, var_names=var_names), perts) for m, M in means.items()]
    if reference in preds:
        r = {m: np.array([_delta_r(truth[m][i], M[i], source_mean, nan=True) for i in range(len(perts))])
             for m, M in means.items()}
        for model in means:
            if model == reference:
                continue
            ok = np.isfinite(r[model]) & np.isfinite(r[reference])
            skipped = ", ".join(p for p, good in zip(perts, ok) if not good)
            all_rows.append(_row(model, "all", f"share_beats_{reference}",
                                 float(np.mean(r[model][ok] > r[reference][ok])) if ok.any() else math.nan,
                                 error=f"pearson_delta undefined for {skipped}; left out" if skipped else ""))
    else:
        screen_notes.append(f"reference {reference!r} is not among the models ({choices_text(preds)}): no "
                            f"share_beats_{reference} rows.")

    table = pd.concat([per_pert, pd.DataFrame(summary + all_rows)], ignore_index=True)
    columns = [SCORE_COLUMNS[0], "perturbation", *SCORE_COLUMNS[1:]]
    info = {**infos[perts[0]],
            "embedding": next((infos[p]["embedding"] for p in perts if infos[p]["embedding"]), None),
            "notes": {name: [f"{p}: {note}" for p in perts for note in infos[p]["notes"].get(name, [])]
                      for name in preds},
            "perturbations": perts, "embeddings": {p: infos[p]["embedding"] for p in perts},
            "responsive": chosen, "definitions": dict(DEFINITIONS), "screen_notes": screen_notes}
    return table[columns], info
