"""Metric functions: array-level distances (pertpy's energy distance, RBF MMD, mean-variance KDE) and one
function per registered metric, each taking an :class:`~perturbkit.metrics.evaldata.EvalData` and
returning a float.

Importing this module loads numpy only; scipy.stats, scipy.spatial and scikit-learn load when a metric
needs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .evaldata import EvalData

#: RBF kernel width of ``mmd``: pertpy's ``MMD(kernel="rbf")`` hard-codes ``gamma=1.0``
MMD_GAMMA = 1.0


# ------------------------------------------------------------------------------- array-level distances


def _pair_mean(
    A: np.ndarray, B: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], chunk: int = 1024
) -> float:
    """Mean of ``fn(squared Euclidean distance)`` over all ``len(A) * len(B)`` pairs (self-pairs included)."""
    from scipy.spatial.distance import cdist

    total = 0.0
    for start in range(0, A.shape[0], chunk):
        total += float(fn(cdist(A[start : start + chunk], B, "sqeuclidean")).sum())
    return total / (A.shape[0] * B.shape[0])


def energy_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Energy distance as pertpy's ``Edistance``: ``2 E|x - y| - E|x - x'| - E|y - y'|``.

    ``|.|`` is the Euclidean (not squared) distance; each expectation is the plain mean over all pairs,
    the within-set means over all ``n * n`` ordered pairs *including* the zero self-pairs (a V-statistic).
    """
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    return 2 * _pair_mean(X, Y, np.sqrt) - _pair_mean(X, X, np.sqrt) - _pair_mean(Y, Y, np.sqrt)


def mmd_rbf(X: np.ndarray, Y: np.ndarray, gamma: float = MMD_GAMMA) -> float:
    """Squared MMD, RBF kernel, as pertpy's ``MMD(kernel="rbf")``: ``mean K_XX + mean K_YY - 2 mean K_XY``.

    ``K(x, y) = exp(-gamma * ||x - y||^2)`` with pertpy's fixed ``gamma = 1.0``; the means run over all pairs,
    diagonal included (the biased V-statistic estimate of MMD^2, no square root).
    """
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)

    def kernel(d2):
        return np.exp(-gamma * d2)

    return _pair_mean(X, X, kernel) + _pair_mean(Y, Y, kernel) - 2 * _pair_mean(X, Y, kernel)


def _log_mean_var(X: np.ndarray) -> np.ndarray:
    mean, var = X.mean(axis=0), X.var(axis=0)
    keep = (mean > 0) & (var > 0)
    if not keep.any():
        raise ValueError("no gene has a positive mean and variance; the mean-variance KDE is undefined")
    return np.column_stack([np.log(mean[keep]), np.log(var[keep])])


def _kde_grid(values: np.ndarray, n_points: int = 100) -> np.ndarray:
    lo, hi = values.min(), values.max()
    step = (hi - lo) / (n_points - 2)
    if not step > 0:
        raise ValueError("all genes have the same log mean (or log variance); the KDE grid is empty")
    return np.arange((lo - step) + 0.5 * step, hi + step, step)


def exp_kde(points: np.ndarray, grid: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Density of a 2-D exponential-kernel KDE with Silverman's bandwidth, as sklearn's ``KernelDensity``.

    Parameters
    ----------
    points
        ``(n, 2)`` sample the density is estimated from.
    grid
        ``(m, 2)`` points where the density is evaluated.
    chunk
        grid rows per distance block (bounds memory; does not change the result).

    Returns
    -------
    numpy.ndarray
        ``(m,)`` densities ``sum_i exp(-||g - p_i|| / h) / (2 pi h^2 n)``, bandwidth
        ``h = (n (d + 2) / 4) ** (-1 / (d + 4))``.
    """
    from scipy.spatial.distance import cdist

    n, d = points.shape
    h = (n * (d + 2) / 4) ** (-1 / (d + 4))  # sklearn's bandwidth="silverman" (data not rescaled)
    norm = 1.0 / (n * 2 * math.pi * h**2)  # exponential kernel in 2-D integrates to 2 pi h^2
    out = np.empty(grid.shape[0])
    for start in range(0, grid.shape[0], chunk):
        out[start : start + chunk] = (
            np.exp(-cdist(grid[start : start + chunk], points) / h).sum(axis=1) * norm
        )
    return out


def mean_var_kde_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """pertpy's ``mean_var_distribution`` distance between two cells x genes matrices.

    1. per gene: mean and variance over cells (``ddof=0``); keep genes with mean > 0; take ``log`` of both;
    2. a grid of 100 x 100 points: per axis, ``step = (max - min) / 98`` over both sets' values, points
       ``min - step/2, min + step/2, ..., < max + step``;
    3. per set a 2-D KDE of the (log mean, log var) points with an exponential kernel and sklearn's Silverman
       bandwidth ``h = n ** (-1/6)``: ``f(g) = sum_i exp(-||g - p_i|| / h) / (2 pi h^2 n)``;
    4. the distance is ``mean over grid points of (f_X(g) - f_Y(g)) ** 2``.

    One deviation: genes with mean > 0 but zero variance are dropped too (their ``log var`` is ``-inf``, on
    which pertpy fails); wherever pertpy returns a number, this returns the same number.
    """
    px = _log_mean_var(np.asarray(X, dtype=np.float64))
    py = _log_mean_var(np.asarray(Y, dtype=np.float64))
    both = np.vstack([px, py])
    gm, gv = _kde_grid(both[:, 0]), _kde_grid(both[:, 1])
    grid = np.stack(np.meshgrid(gm, gv, indexing="ij"), axis=-1).reshape(-1, 2)
    return float(np.mean((exp_kde(px, grid) - exp_kde(py, grid)) ** 2))


# --------------------------------------------------------------------------------------- metric functions


def _sq_pearson(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import linregress

    return float(linregress(x, y).rvalue ** 2)


def _r2score(true: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import r2_score

    return float(r2_score(true, pred))


def _pearson(x: np.ndarray, y: np.ndarray, *, constant_x: float | None = None) -> float:
    """Pearson r of x and y; ``constant_x`` (if given) is returned when x alone is constant."""
    xc, yc = x - x.mean(), y - y.mean()
    sx, sy = float(xc @ xc), float(yc @ yc)
    if sx == 0 and sy != 0 and constant_x is not None:
        return constant_x
    den = math.sqrt(sx * sy)
    if den == 0:
        raise ValueError("Pearson correlation is undefined: one of the two vectors is constant")
    return float(xc @ yc) / den


def r2_mean_all(d: EvalData) -> float:
    """``linregress(truth_mean, pred_mean).rvalue ** 2`` over all genes (squared Pearson; scGen, scPRAM)."""
    return _sq_pearson(d.truth_mean, d.pred_mean)


def r2_mean_top100(d: EvalData) -> float:
    """``linregress(truth_mean[top], pred_mean[top]).rvalue ** 2`` over the top real DEGs only."""
    return _sq_pearson(d.truth_mean[d.top_idx], d.pred_mean[d.top_idx])


def r2_var_all(d: EvalData) -> float:
    """``linregress(truth_var, pred_var).rvalue ** 2``; per-gene variances over cells with ``ddof=0``."""
    return _sq_pearson(d.truth_var, d.pred_var)


def r2_var_top100(d: EvalData) -> float:
    """``linregress(truth_var[top], pred_var[top]).rvalue ** 2`` (``ddof=0``) over the top real DEGs."""
    return _sq_pearson(d.truth_var[d.top_idx], d.pred_var[d.top_idx])


def r2score_mean_all(d: EvalData) -> float:
    """``sklearn.metrics.r2_score(truth_mean, pred_mean)`` = ``1 - SS_res / SS_tot`` over all genes."""
    return _r2score(d.truth_mean, d.pred_mean)


def r2score_mean_top100(d: EvalData) -> float:
    """``sklearn.metrics.r2_score(truth_mean[top], pred_mean[top])`` over the top real DEGs."""
    return _r2score(d.truth_mean[d.top_idx], d.pred_mean[d.top_idx])


def mse_mean(d: EvalData) -> float:
    """``mean_g (pred_mean_g - truth_mean_g) ** 2`` over all genes."""
    return float(np.mean((d.pred_mean - d.truth_mean) ** 2))


def mae_mean(d: EvalData) -> float:
    """``mean_g |pred_mean_g - truth_mean_g|`` over all genes."""
    return float(np.mean(np.abs(d.pred_mean - d.truth_mean)))


def pearson_delta(d: EvalData) -> float:
    """Pearson r of ``pred_mean - source_mean`` vs ``truth_mean - source_mean`` over all genes.

    A prediction whose change is the same for every gene (e.g. the ``control`` baseline: no change at all)
    has no correlation with the real change and scores 0 (Pearson r is undefined there; scipy returns NaN).
    """
    return _pearson(d.pred_mean - d.source_mean, d.truth_mean - d.source_mean, constant_x=0.0)


def pearson_delta_top100(d: EvalData) -> float:
    """Pearson r of ``pred_mean - source_mean`` vs ``truth_mean - source_mean`` over the top real DEGs."""
    i = d.top_idx
    return _pearson(d.pred_mean[i] - d.source_mean[i], d.truth_mean[i] - d.source_mean[i], constant_x=0.0)


def r2score_delta(d: EvalData) -> float:
    """``sklearn.metrics.r2_score(truth_mean - source_mean, pred_mean - source_mean)`` over all genes."""
    return _r2score(d.truth_mean - d.source_mean, d.pred_mean - d.source_mean)


def edistance(d: EvalData) -> float:
    """:func:`energy_distance` (pertpy's ``Edistance``) of truth vs pred cells on :attr:`EvalData.embedding`.

    ``2 mean_ij ||t_i - p_j|| - mean_ij ||t_i - t_j|| - mean_ij ||p_i - p_j||`` (Euclidean, self-pairs
    included), PCA with ``min(50, n_source + n_truth - 1, n_genes)`` components fitted on source + truth,
    pred projected into it.
    """
    emb = d.embedding
    return energy_distance(emb.truth, emb.pred)


def mmd(d: EvalData) -> float:
    """:func:`mmd_rbf` (pertpy's ``MMD(kernel="rbf")``, gamma 1.0) of truth vs pred on the PCA embedding.

    ``mean_ij k(t_i, t_j) + mean_ij k(p_i, p_j) - 2 mean_ij k(t_i, p_j)``, ``k(x, y) = exp(-||x - y||^2)``.
    """
    emb = d.embedding
    return mmd_rbf(emb.truth, emb.pred, gamma=MMD_GAMMA)


def kde_mean_var(d: EvalData) -> float:
    """:func:`mean_var_kde_distance` (pertpy's ``mean_var_distribution``) of truth vs pred expression."""
    return mean_var_kde_distance(d.truth_X, d.pred_X)


def deg_overlap_top100(d: EvalData) -> float:
    """``|real top DEGs ∩ predicted top DEGs| / n_top``; predicted DEGs = Wilcoxon of pred vs source."""
    return len(set(d.top_genes) & set(d.pred_top_genes)) / d.n_top


def deg_jaccard_top100(d: EvalData) -> float:
    """``|real & predicted| / |real | predicted|`` (intersection over union) of the two top-DEG sets."""
    real, predicted = set(d.top_genes), set(d.pred_top_genes)
    return len(real & predicted) / len(real | predicted)


def direction_agreement_top100(d: EvalData) -> float:
    """Share of real top DEGs whose predicted and real changes vs the source have the same sign.

    ``mean over g in top of [sign(pred_mean_g - source_mean_g) == sign(truth_mean_g - source_mean_g)]`` with
    ``numpy.sign``: an exact zero change has sign 0 and agrees only with a zero change.
    """
    i = d.top_idx
    return float(
        np.mean(np.sign(d.pred_mean[i] - d.source_mean[i]) == np.sign(d.truth_mean[i] - d.source_mean[i]))
    )
