"""Evaluation metrics: one read-only registry, one exact definition per name.

"R^2" means three different things in this field, so each gets its own name here:

* ``r2_mean_*`` / ``r2_var_*``: squared Pearson correlation of per-gene means (variances), as scGen and
  scPRAM report it (``scipy.stats.linregress(...).rvalue ** 2``).
* ``r2score_*``: the coefficient of determination ``sklearn.metrics.r2_score(truth, pred)`` (as CPA).
* pertpy's ``r2_distance`` (``1 - r2_score``) is not offered: it is ``1 - r2score_mean_all``.

Use :func:`prepare` once to validate three AnnData objects (real target cells, predicted cells, source
cells) and :func:`score` / :func:`evaluate` to get a tidy table. Expensive pieces (DEGs, the PCA embedding)
are computed lazily and cached on the :class:`EvalData` object.

Importing this module loads numpy, scipy.sparse and pandas only; scanpy, scikit-learn and scipy.stats load
when a metric needs them. torch is never imported.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, check_seed, choices_text, suggest

__all__ = [
    "METRICS",
    "EvalData",
    "Metric",
    "ceiling",
    "energy_distance",
    "evaluate",
    "list_metrics",
    "mean_var_kde_distance",
    "mmd_rbf",
    "normalise",
    "prepare",
    "score",
    "top_degs",
]

#: columns of the table :func:`evaluate` returns, in order
COLUMNS = ("metric", "value", "ci_low", "ci_high", "higher_is_better", "error")

#: RBF kernel width of ``mmd``: pertpy's ``MMD(kernel="rbf")`` hard-codes ``gamma=1.0``
MMD_GAMMA = 1.0
#: most principal components of the embedding used by ``edistance`` and ``mmd``
MAX_PCS = 50


# --------------------------------------------------------------------------------------- prepared data


class Embedding(NamedTuple):
    """PCA coordinates of the three cell sets (rows are cells)."""

    truth: np.ndarray
    pred: np.ndarray
    source: np.ndarray


class EvalData:
    """Validated, dense float64 copies of truth / pred / source, with lazily cached derived pieces.

    Build it with :func:`prepare`. Every metric function takes one ``EvalData`` and returns a float.

    Attributes
    ----------
    truth_X, pred_X, source_X
        cells x genes float64 arrays of the real target cells, the predicted cells and the source cells.
    var_names
        the shared gene names (a ``pandas.Index``).
    n_top
        number of top DEGs used by the ``*_top100`` metrics (100 unless there are fewer genes).
    seed
        seed of the PCA (and of nothing else; DEGs are deterministic).
    notes
        human-readable notes about choices made while preparing (e.g. ``n_top`` clamped).
    """

    def __init__(self, truth_X, pred_X, source_X, var_names, *, n_top: int = 100, seed: int = 0, notes=()):
        self.truth_X = truth_X
        self.pred_X = pred_X
        self.source_X = source_X
        self.var_names = var_names
        self.n_top = int(n_top)
        self.seed = int(seed)
        self.notes = list(notes)

    def __repr__(self) -> str:
        return (
            f"EvalData(truth={self.truth_X.shape[0]} cells, pred={self.pred_X.shape[0]} cells, "
            f"source={self.source_X.shape[0]} cells, genes={len(self.var_names)}, n_top={self.n_top})"
        )

    # per-gene moments (ddof=0, as numpy's default and scGen's reg_var_plot)
    @cached_property
    def truth_mean(self) -> np.ndarray:
        return self.truth_X.mean(axis=0)

    @cached_property
    def pred_mean(self) -> np.ndarray:
        return self.pred_X.mean(axis=0)

    @cached_property
    def source_mean(self) -> np.ndarray:
        return self.source_X.mean(axis=0)

    @cached_property
    def truth_var(self) -> np.ndarray:
        return self.truth_X.var(axis=0)

    @cached_property
    def pred_var(self) -> np.ndarray:
        return self.pred_X.var(axis=0)

    @cached_property
    def source_var(self) -> np.ndarray:
        return self.source_X.var(axis=0)

    # DEGs (Wilcoxon, scanpy), in rank order
    @cached_property
    def top_genes(self) -> list[str]:
        """The ``n_top`` real DEGs: Wilcoxon of truth vs source cells, highest scores first."""
        return _wilcoxon_top(self.truth_X, self.source_X, self.var_names, self.n_top)

    @cached_property
    def top_idx(self) -> np.ndarray:
        return self.var_names.get_indexer(self.top_genes)

    @cached_property
    def pred_top_genes(self) -> list[str]:
        """The ``n_top`` predicted DEGs: Wilcoxon of pred vs the same source cells."""
        return _wilcoxon_top(self.pred_X, self.source_X, self.var_names, self.n_top)

    # PCA embedding of edistance / mmd
    @cached_property
    def _pca(self) -> tuple[Embedding, dict[str, Any]]:
        import sklearn
        from sklearn.decomposition import PCA

        fit_on = np.vstack([self.source_X, self.truth_X])
        n_comps = min(MAX_PCS, fit_on.shape[0] - 1, fit_on.shape[1])
        pca = PCA(n_components=n_comps, svd_solver="randomized", random_state=self.seed).fit(fit_on)
        emb = Embedding(
            truth=pca.transform(self.truth_X),
            pred=pca.transform(self.pred_X),
            source=pca.transform(self.source_X),
        )
        info = {
            "method": "PCA",
            "library": f"scikit-learn {sklearn.__version__}",
            "svd_solver": "randomized",
            "random_state": self.seed,
            "n_comps": int(n_comps),
            "fit_on": "source + truth cells (real data only); values as given, centred, not scaled",
            "pred": "projected with the fitted PCA (PCA.transform)",
            "n_cells_fit": int(fit_on.shape[0]),
            "n_genes": int(fit_on.shape[1]),
            "explained_variance_ratio": float(pca.explained_variance_ratio_.sum()),
        }
        return emb, info

    @property
    def embedding(self) -> Embedding:
        """PCA coordinates used by ``edistance`` and ``mmd`` (computed on first use, then cached)."""
        return self._pca[0]

    @property
    def embedding_info(self) -> dict[str, Any]:
        """How :attr:`embedding` was made (for run records). Computes the PCA if it has not run yet."""
        return dict(self._pca[1])

    @property
    def has_embedding(self) -> bool:
        """Whether the PCA has been computed (so :attr:`embedding_info` costs nothing)."""
        return "_pca" in self.__dict__

    def _with_moments(self, **moments: np.ndarray) -> EvalData:
        """A cell-less copy whose per-gene moments are replaced (bootstrap replicates).

        Keeps the DEG set computed on the full data; anything needing cells raises AttributeError.
        """
        rep = object.__new__(EvalData)
        rep.var_names, rep.n_top, rep.seed, rep.notes = self.var_names, self.n_top, self.seed, self.notes
        for key in ("top_genes", "top_idx", "pred_top_genes"):
            if key in self.__dict__:
                rep.__dict__[key] = self.__dict__[key]
        rep.__dict__.update(moments)
        return rep


def _dense(name: str, adata) -> np.ndarray:
    if not (hasattr(adata, "X") and hasattr(adata, "var_names") and hasattr(adata, "obs_names")):
        raise InputError(f"{name} must be an AnnData object, got {type(adata).__name__}.")
    X = adata.X
    if X is None:
        raise InputError(f"{name}.X is empty (None). Put the expression matrix in {name}.X.")
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = np.ascontiguousarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InputError(f"{name}.X must be 2-dimensional (cells x genes), got shape {X.shape}.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(
            f"{name} is empty ({X.shape[0]} cells x {X.shape[1]} genes); metrics need cells and genes."
        )
    if X.shape[0] < 2:
        raise InputError(
            f"{name} has {X.shape[0]} cell; metrics need at least 2 cells in each of truth, pred and source "
            "(variances and Wilcoxon tests are undefined for one cell)."
        )
    bad = ~np.isfinite(X)
    if bad.any():
        cell, gene = np.argwhere(bad)[0]
        raise InputError(
            f"{name}.X has {int(bad.sum())} NaN/inf values (first at cell {adata.obs_names[cell]!r}, gene "
            f"{adata.var_names[gene]!r}); metrics need finite numbers. Fix the model output or drop those "
            f"cells, e.g. {name} = {name}[np.isfinite({name}.X).all(axis=1)].copy() for a dense X."
        )
    return X


def _check_genes(name: str, adata, ref_name: str, ref) -> None:
    genes, ref_genes = pd.Index(adata.var_names), pd.Index(ref.var_names)
    if genes.equals(ref_genes):
        return
    missing, extra = ref_genes.difference(genes), genes.difference(ref_genes)
    if len(missing) == 0 and len(extra) == 0:
        raise InputError(
            f"{name} has the same genes as {ref_name} but in a different order. "
            f"Fix: {name} = {name}[:, {ref_name}.var_names].copy()"
        )
    if len(missing) == 0:
        fix = f"{name} = {name}[:, {ref_name}.var_names].copy()"
    else:
        fix = (
            f"keep the shared genes in the same order everywhere, e.g. genes = "
            f"{ref_name}.var_names.intersection({name}.var_names); then subset truth, pred and source with "
            "[:, genes].copy()"
        )
    raise InputError(
        f"{name} and {ref_name} have different genes: {len(missing)} of {ref_name}'s {len(ref_genes)} genes "
        f"are missing from {name}{_examples(missing)}, and {len(extra)} of {name}'s genes are not in "
        f"{ref_name}{_examples(extra)}. Fix: {fix}"
    )


#: largest value expected in log-normalised expression (log1p of counts normalised to 1e4 is about 9.2)
LOG_MAX = 30.0


def _count_scale(X: np.ndarray) -> bool:
    """True when X looks like counts (non-negative integers above 20) or unlogged values (above LOG_MAX)."""
    top = float(X.max()) if X.size else 0.0
    integer = bool(np.all(np.equal(np.mod(X[:2000], 1), 0)))
    return top > LOG_MAX or (integer and top > 20 and float(X.min()) >= 0)


def _check_scale(arrays: dict[str, np.ndarray]) -> list[str]:
    """Refuse truth / pred / source on different scales (counts vs log); warn when all three are counts."""
    from .errors import InputWarning

    scale = {name: _count_scale(X) for name, X in arrays.items()}
    counts = [name for name, c in scale.items() if c]
    if counts and len(counts) < len(scale):
        logs = [name for name in scale if name not in counts]
        raise InputError(
            f"{' and '.join(counts)} look{'s' if len(counts) == 1 else ''} like raw counts or unlogged values "
            f"(max {max(float(arrays[n].max()) for n in counts):.3g}) but {' and '.join(logs)} look"
            f"{'s' if len(logs) == 1 else ''} log-normalised (max {max(float(arrays[n].max()) for n in logs):.3g}); "
            "comparing them is meaningless. Put all three on the same scale, e.g. sc.pp.normalize_total(a, "
            "target_sum=1e4); sc.pp.log1p(a) on the count objects."
        )
    if counts:
        note = ("truth, pred and source look like raw counts or unlogged values; the metrics are defined on "
                "log-normalised expression (scGen, scPRAM) and on counts they are dominated by the most expressed "
                "genes. Scored as given; normalise (normalize_total + log1p) for comparable numbers.")
        warnings.warn(note, InputWarning, stacklevel=3)
        return [note]
    return []


def _examples(index, k: int = 3) -> str:
    return f" (e.g. {', '.join(repr(str(g)) for g in index[:k])})" if len(index) else ""


def prepare(truth, pred, source, *, n_top: int = 100, seed: int = 0) -> EvalData:
    """Validate truth / pred / source once and return an :class:`EvalData` for the metric functions.

    Parameters
    ----------
    truth
        AnnData of the real target cells (perturbed cells of the held-out context).
    pred
        AnnData of the predicted target cells.
    source
        AnnData of the source cells the prediction started from (control cells of the same context).
    n_top
        number of top DEGs for the ``*_top100`` metrics. If there are fewer genes, it is clamped to the number
        of genes (so ``*_top100`` equals ``*_all``) and a note is added to ``EvalData.notes`` and warned.
    seed
        random state of the PCA behind ``edistance`` and ``mmd``.

    Raises
    ------
    InputError
        if an object is not an AnnData, is empty, has fewer than 2 cells or non-finite values, has duplicate
        gene names, or if the three objects do not have identical ``var_names`` in the same order.
    """
    if isinstance(n_top, bool) or not isinstance(n_top, (int, np.integer)) or n_top < 1:
        raise InputError(f"n_top must be a positive integer, got {n_top!r}.")
    objs = {"truth": truth, "pred": pred, "source": source}
    arrays = {name: _dense(name, obj) for name, obj in objs.items()}
    for name, obj in objs.items():
        if not pd.Index(obj.var_names).is_unique:
            dup = pd.Index(obj.var_names)[pd.Index(obj.var_names).duplicated()].unique()
            raise InputError(
                f"{name} has {len(dup)} duplicate gene names{_examples(dup)}. "
                f"Fix: {name}.var_names_make_unique() (the same way in truth, pred and source)."
            )
    _check_genes("pred", pred, "truth", truth)
    _check_genes("source", source, "truth", truth)
    check_seed(seed, "seed")
    var_names = pd.Index(truth.var_names).astype(str)
    notes = _check_scale(arrays)
    n_genes = len(var_names)
    if n_top > n_genes:
        note = f"n_top={n_top} is more than the {n_genes} genes; using all {n_genes} genes as the top DEGs."
        warnings.warn(note, UserWarning, stacklevel=2)
        notes.append(note)
        n_top = n_genes
    return EvalData(
        arrays["truth"], arrays["pred"], arrays["source"], var_names, n_top=n_top, seed=seed, notes=notes
    )


# ---------------------------------------------------------------------------------------------- DEGs


def _wilcoxon_top(target_X: np.ndarray, source_X: np.ndarray, var_names: pd.Index, n: int) -> list[str]:
    import anndata as ad
    import scanpy as sc

    n_t, n_s = target_X.shape[0], source_X.shape[0]
    group = pd.Categorical(["target"] * n_t + ["source"] * n_s, categories=["target", "source"])
    tmp = ad.AnnData(
        X=np.vstack([target_X, source_X]),
        obs=pd.DataFrame({"group": group}, index=pd.RangeIndex(n_t + n_s).astype(str)),
        var=pd.DataFrame(index=pd.Index(var_names).astype(str)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(
            tmp,
            "group",
            groups=["target"],
            reference="source",
            method="wilcoxon",
            n_genes=int(n),
            use_raw=False,
        )
    return [str(g) for g in tmp.uns["rank_genes_groups"]["names"]["target"][: int(n)]]


def top_degs(target, source, n: int = 100) -> list[str]:
    """The top ``n`` DEGs of ``target`` vs ``source`` cells, in rank order.

    ``scanpy.tl.rank_genes_groups(method="wilcoxon")`` on a new AnnData holding the target and source cells
    with a group column (the inputs are not modified); the first ``n`` names of the target group, i.e. the
    genes with the highest Wilcoxon z-scores (most up-regulated first). ``n`` is clamped to the number of
    genes.
    """
    t, s = _dense("target", target), _dense("source", source)
    _check_genes("source", source, "target", target)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}.")
    return _wilcoxon_top(t, s, pd.Index(target.var_names).astype(str), min(int(n), t.shape[1]))


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


def _exp_kde(points: np.ndarray, grid: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Density of a 2-D exponential-kernel KDE with Silverman's bandwidth, as sklearn's ``KernelDensity``."""
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
    return float(np.mean((_exp_kde(px, grid) - _exp_kde(py, grid)) ** 2))


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


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Metric:
    """One metric: its name, function, direction, one-line definition and whether it gets bootstrap CIs."""

    name: str
    fn: Callable[[EvalData], float]
    higher_is_better: bool
    definition: str
    bootstrap: bool


METRICS: MappingProxyType[str, Metric] = MappingProxyType(
    {
        "r2_mean_all": Metric(
            "r2_mean_all", r2_mean_all, True,
            "squared Pearson r (linregress rvalue^2) of per-gene means, pred vs truth, all genes", True,
        ),
        "r2_mean_top100": Metric(
            "r2_mean_top100", r2_mean_top100, True,
            "squared Pearson r of per-gene means, pred vs truth, top-100 real DEGs only", True,
        ),
        "r2_var_all": Metric(
            "r2_var_all", r2_var_all, True,
            "squared Pearson r of per-gene variances (ddof=0), pred vs truth, all genes", True,
        ),
        "r2_var_top100": Metric(
            "r2_var_top100", r2_var_top100, True,
            "squared Pearson r of per-gene variances (ddof=0), pred vs truth, top-100 real DEGs", True,
        ),
        "r2score_mean_all": Metric(
            "r2score_mean_all", r2score_mean_all, True,
            "sklearn r2_score(truth means, pred means), all genes", True,
        ),
        "r2score_mean_top100": Metric(
            "r2score_mean_top100", r2score_mean_top100, True,
            "sklearn r2_score(truth means, pred means), top-100 real DEGs", True,
        ),
        "mse_mean": Metric(
            "mse_mean", mse_mean, False, "mean squared error of per-gene means, all genes", True,
        ),
        "mae_mean": Metric(
            "mae_mean", mae_mean, False, "mean absolute error of per-gene means, all genes", True,
        ),
        "pearson_delta": Metric(
            "pearson_delta", pearson_delta, True,
            "Pearson r of (pred mean - source mean) vs (truth mean - source mean), all genes; 0 if pred "
            "changes every gene equally", True,
        ),
        "pearson_delta_top100": Metric(
            "pearson_delta_top100", pearson_delta_top100, True,
            "Pearson r of (pred mean - source mean) vs (truth mean - source mean), top-100 real DEGs; 0 if "
            "pred changes them equally", True,
        ),
        "r2score_delta": Metric(
            "r2score_delta", r2score_delta, True,
            "sklearn r2_score(truth mean - source mean, pred mean - source mean), all genes", True,
        ),
        "edistance": Metric(
            "edistance", edistance, False,
            "pertpy energy distance (Euclidean, self-pairs included) of truth vs pred cells in a 50-PC PCA "
            "fitted on source + truth",
            False,
        ),
        "mmd": Metric(
            "mmd", mmd, False,
            "pertpy RBF MMD^2 (gamma=1, biased, diagonal included) of truth vs pred cells in the same PCA",
            False,
        ),
        "kde_mean_var": Metric(
            "kde_mean_var", kde_mean_var, False,
            "pertpy mean_var_distribution: mean squared difference of 2-D KDEs of gene (log mean, log var)",
            False,
        ),
        "deg_overlap_top100": Metric(
            "deg_overlap_top100", deg_overlap_top100, True,
            "|real top-100 DEGs ∩ predicted top-100 DEGs| / 100 (Wilcoxon vs source cells)", False,
        ),
        "deg_jaccard_top100": Metric(
            "deg_jaccard_top100", deg_jaccard_top100, True,
            "Jaccard index of real and predicted top-100 DEG sets", False,
        ),
        "direction_agreement_top100": Metric(
            "direction_agreement_top100", direction_agreement_top100, True,
            "share of real top-100 DEGs whose predicted change vs source has the real change's sign", True,
        ),
    }
)  # fmt: skip


def list_metrics() -> pd.DataFrame:
    """The registered metrics as a table ``name, higher_is_better, definition`` (for ``list metrics``)."""
    return pd.DataFrame(
        [(m.name, m.higher_is_better, m.definition) for m in METRICS.values()],
        columns=["name", "higher_is_better", "definition"],
    )


def resolve(metrics: str | Iterable[str] | None) -> list[str]:
    """The metric names to compute: every registered metric for None; unknown names raise :class:`InputError`."""
    if metrics is None:
        return list(METRICS)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    for name in names:
        if name not in METRICS:
            raise InputError(
                f"Unknown metric {name!r}.{suggest(name, METRICS)} "
                f"Known metrics: {choices_text(METRICS, 30)}."
            )
    return list(dict.fromkeys(names))


_resolve = resolve  # TEMPORARY alias while callers move to `resolve`; removed once none uses it


# ------------------------------------------------------------------------------------------ scoring


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _boot_weights(rng: np.random.Generator, n_cells: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_cells) weights: how often each cell is drawn (with replacement), divided by n_cells."""
    idx = rng.integers(0, n_cells, size=(n_boot, n_cells))
    idx += np.arange(n_boot)[:, None] * n_cells
    counts = np.bincount(idx.ravel(), minlength=n_boot * n_cells).reshape(n_boot, n_cells)
    return counts / n_cells


def _boot_moments(X: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-replicate per-gene means and variances (ddof=0) of the resampled cells, vectorised."""
    centre = X.mean(axis=0)
    Xc = X - centre
    mean_c = W @ Xc
    var = np.maximum(W @ (Xc * Xc) - mean_c**2, 0.0)
    return mean_c + centre, var


def _bootstrap(d: EvalData, names: Sequence[str], n_boot: int, ci: float, seed: int) -> dict[str, tuple]:
    """``{name: (ci_low, ci_high, n_dropped)}``; n_dropped = replicates on which the metric was undefined."""
    rng = np.random.default_rng(seed)
    moments = {}
    for part in ("truth", "pred", "source"):
        X = getattr(d, f"{part}_X")
        moments[part] = _boot_moments(X, _boot_weights(rng, X.shape[0], n_boot))
    values = {name: np.full(n_boot, np.nan) for name in names}
    for b in range(n_boot):
        rep = d._with_moments(
            **{f"{part}_mean": m[0][b] for part, m in moments.items()},
            **{f"{part}_var": m[1][b] for part, m in moments.items()},
        )
        for name in names:
            # an undefined replicate (e.g. a constant vector) stays NaN and is dropped from the interval
            with contextlib.suppress(Exception):
                values[name][b] = METRICS[name].fn(rep)
    alpha = (1 - ci) / 2
    out = {}
    for name, vals in values.items():
        ok = vals[np.isfinite(vals)]
        low, high = np.quantile(ok, [alpha, 1 - alpha]) if len(ok) else (np.nan, np.nan)
        out[name] = (float(low), float(high), int(n_boot - len(ok)))
    return out


def score(
    data: EvalData,
    metrics: str | Iterable[str] | None = None,
    *,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Score a prepared :class:`EvalData`; see :func:`evaluate` for the table and the bootstrap."""
    names = resolve(metrics)
    check_seed(seed, "seed")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise InputError(f"n_boot must be a non-negative integer, got {n_boot!r}.")
    if not (isinstance(ci, (int, float)) and 0 < ci < 1):
        raise InputError(f"ci must be a number between 0 and 1 (e.g. 0.95), got {ci!r}.")
    rows = []
    for name in names:
        metric = METRICS[name]
        try:
            value, error = float(metric.fn(data)), ""
            if not math.isfinite(value):
                error = f"the metric returned {value}"
                value = math.nan
        except Exception as exc:  # recorded in the row, never swallowed
            value, error = math.nan, _error_text(exc)
        rows.append({"metric": name, "value": value, "ci_low": math.nan, "ci_high": math.nan,
                     "higher_is_better": metric.higher_is_better, "error": error})  # fmt: skip
    boot = [r["metric"] for r in rows if METRICS[r["metric"]].bootstrap and not r["error"]]
    notes = list(data.notes)
    if boot and n_boot > 0:
        intervals = _bootstrap(data, boot, int(n_boot), float(ci), seed)
        for row in rows:
            if row["metric"] in intervals:
                row["ci_low"], row["ci_high"], dropped = intervals[row["metric"]]
                if dropped:
                    notes.append(
                        f"{row['metric']}: {dropped} of {n_boot} bootstrap replicates were undefined and "
                        "left out of the interval."
                    )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs["notes"] = notes
    if data.has_embedding:
        table.attrs["embedding"] = data.embedding_info
    return table


def evaluate(
    truth,
    pred,
    source,
    spec=None,
    metrics: str | Iterable[str] | None = None,
    *,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
) -> pd.DataFrame:
    """Score a prediction against the real target cells; one row per metric.

    Parameters
    ----------
    truth, pred, source
        AnnData objects of the real target cells, the predicted cells and the source (control) cells;
        identical ``var_names`` in the same order. X may be dense or sparse. They are not modified.
    spec
        the :class:`~perturbkit.data.PerturbSpec` of the data; accepted for future use, currently unused.
    metrics
        names from :data:`METRICS` (in the order wanted), or ``None`` for all of them.
    n_boot
        bootstrap replicates for the metrics with ``bootstrap=True``; 0 skips the intervals.
    ci
        coverage of the percentile interval.
    seed
        seeds the bootstrap (one ``numpy.random.Generator``) and the PCA.

    Returns
    -------
    pandas.DataFrame
        columns ``metric, value, ci_low, ci_high, higher_is_better, error``. A metric that raises gets
        ``value = NaN`` and its exception in ``error`` (empty string otherwise); metrics without bootstrap get
        NaN intervals. ``table.attrs`` holds ``notes`` and, if a PCA was computed, ``embedding`` (its
        description).

    Notes
    -----
    Bootstrap: the cells of truth, pred and source are resampled independently with replacement (each to its
    own size), the per-gene means and variances recomputed, and each metric recomputed; the interval is the
    ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of the replicates (percentile interval). The top-100 DEG
    set is computed once on the full data and kept fixed across replicates, so the intervals leave out the
    uncertainty of DEG selection. Replicates on which a metric is undefined are dropped from its interval
    and counted in ``table.attrs["notes"]``.

    These plug-in metrics are biased by sampling noise and resampling adds that noise once more, so when the
    prediction is very close to the truth the whole interval can lie on the worse side of the estimate (see
    docs/metrics.md). Read it as the spread due to finite cells, not as a bias-corrected interval.
    """
    del spec  # reserved
    names = resolve(metrics)
    return score(prepare(truth, pred, source, seed=seed), names, n_boot=n_boot, ci=ci, seed=seed)


def ceiling(
    truth,
    source,
    *,
    seed: int = 0,
    metrics: str | Iterable[str] | None = None,
    n_boot: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """What a perfect model could score: one random half of the real target cells scored against the other.

    The cells of ``truth`` are shuffled with ``numpy.random.default_rng(seed)``; the first ``n // 2`` act as
    the prediction and the rest as the truth, with the same ``source`` cells. Returns an
    :func:`evaluate`-shaped table.
    Each half has half the cells, so DEGs and moments are noisier than on the full data; the ceiling is an
    estimate of the replicate-to-replicate agreement, not an upper bound in the strict sense.
    """
    if not hasattr(truth, "n_obs"):
        raise InputError(f"truth must be an AnnData object, got {type(truth).__name__}.")
    n = truth.n_obs
    if n < 4:
        raise InputError(f"ceiling needs at least 4 truth cells (2 per half), got {n}.")
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return evaluate(
        truth[order[half:]], truth[order[:half]], source, metrics=metrics, n_boot=n_boot, ci=ci, seed=seed
    )


def normalise(
    table: pd.DataFrame,
    *,
    model_col: str = "model",
    baseline: str = "control",
    ceiling: str = "ceiling",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Baseline-normalised scores: ``(model - baseline) / (ceiling - baseline)`` per metric.

    Parameters
    ----------
    table
        tidy table with columns ``model_col``, ``metric`` and ``value`` holding several models, including rows
        whose model is ``baseline`` and ``ceiling`` (e.g. the concatenation of :func:`evaluate` tables with a
        model column added, plus :func:`ceiling`'s table).
    by
        further columns that identify a comparison (e.g. ``"cell_type"``); the baseline and ceiling are
        looked up per ``(metric, *by)``.

    Returns
    -------
    pandas.DataFrame
        the same columns and rows, with ``metric`` suffixed ``_norm`` and ``value`` (and ``ci_low`` /
        ``ci_high`` if present, re-ordered so low <= high) normalised. 0 = the baseline, 1 = the ceiling,
        whatever the metric's direction, so ``higher_is_better`` (if present) becomes True. NaN where
        ``ceiling - baseline`` is 0 or missing.
    """
    keys = ["metric", *by]
    need = [model_col, *keys, "value"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise InputError(f"normalise: table lacks column(s) {missing}; it needs {need}.")
    refs = {}
    for label, name in (("baseline", baseline), ("ceiling", ceiling)):
        rows = table[table[model_col] == name]
        if rows.empty:
            models = table[model_col].astype(str).unique()
            raise InputError(
                f"normalise: no rows with {model_col} == {name!r} ({label}).{suggest(name, models)} "
                f"Models in the table: {choices_text(models)}."
            )
        if rows.duplicated(keys).any():
            raise InputError(
                f"normalise: several {label} rows ({model_col} == {name!r}) per {keys}; add the columns that "
                "tell them apart to by=."
            )
        refs[label] = rows.set_index(keys)["value"].rename(f"__{label}")
    out = table.join(refs["baseline"], on=keys).join(refs["ceiling"], on=keys)
    base, denom = out["__baseline"], out["__ceiling"] - out["__baseline"]
    denom = denom.where(denom != 0)
    result = table.copy()
    result["value"] = ((out["value"] - base) / denom).to_numpy()
    if "ci_low" in table.columns and "ci_high" in table.columns:
        lo, hi = (out["ci_low"] - base) / denom, (out["ci_high"] - base) / denom
        result["ci_low"], result["ci_high"] = np.fmin(lo, hi).to_numpy(), np.fmax(lo, hi).to_numpy()
    if "higher_is_better" in table.columns:
        result["higher_is_better"] = True
    result["metric"] = table["metric"].astype(str) + "_norm"
    return result
