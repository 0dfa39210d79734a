"""Prepared evaluation data: the input checks, :func:`prepare` and :class:`EvalData`, and the Wilcoxon DEGs.

:func:`prepare` validates truth / pred / source once and returns an :class:`EvalData` that caches the per-gene
moments, the top DEGs and the PCA embedding; :func:`top_degs` ranks genes with scanpy's Wilcoxon test.
Importing this module loads numpy, scipy.sparse and pandas only; scanpy, anndata and scikit-learn load when
used, and torch only for the PCA of an EvalData whose execution is on a CUDA device.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data import LOG_MAX, check_same_genes, examples
from ..errors import InputError, InputWarning, check_seed
from ..execution import CPU, Execution, check

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
    execution
        where the heavy pieces run (:mod:`perturbkit.execution`; default the CPU): on a CUDA device the PCA
        (scikit-learn's randomized PCA redone in torch, float64: :func:`_pca_torch`) and the pair sums of
        ``edistance`` and ``mmd`` (float64); everything else, and everything on the CPU or mps (no float64),
        is computed on the CPU exactly as without it.
    """

    def __init__(self, truth_X, pred_X, source_X, var_names, *, n_top: int = 100, seed: int = 0, notes=(),
                 execution: Execution = CPU):
        self.truth_X = truth_X
        self.pred_X = pred_X
        self.source_X = source_X
        self.var_names = var_names
        self.n_top = int(n_top)
        self.seed = int(seed)
        self.notes = list(notes)
        self.execution = execution
        #: part -> (mean offset, variance offset): the given moments of all cells less those of these cells
        #: (:func:`prepare`'s ``moments``); the bootstrap moves its replicates by them
        self.offsets: dict[str, tuple[np.ndarray, np.ndarray]] = {}

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
        fit_on = np.vstack([self.source_X, self.truth_X])
        n_comps = min(MAX_PCS, fit_on.shape[0] - 1, fit_on.shape[1])
        if getattr(self, "execution", CPU).is_cuda:
            return _pca_torch(fit_on, (self.truth_X, self.pred_X, self.source_X), n_comps,
                              self.execution.torch_device, self.seed)
        import sklearn
        from sklearn.decomposition import PCA

        # copy=False: fit_on is this function's own stack, centred in place (one copy fewer; the same arithmetic)
        pca = PCA(n_components=n_comps, svd_solver="randomized", random_state=self.seed, copy=False).fit(fit_on)
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

    def with_moments(self, **moments: np.ndarray) -> EvalData:
        """A cell-less copy whose per-gene moments are replaced (bootstrap replicates).

        Keeps the DEG set computed on the full data; anything needing cells raises AttributeError.
        """
        rep = object.__new__(EvalData)
        rep.var_names, rep.n_top, rep.seed, rep.notes = self.var_names, self.n_top, self.seed, self.notes
        rep.execution = getattr(self, "execution", CPU)
        for key in ("top_genes", "top_idx", "pred_top_genes"):
            if key in self.__dict__:
                rep.__dict__[key] = self.__dict__[key]
        rep.__dict__.update(moments)
        return rep

    def with_execution(self, execution: Execution | None) -> EvalData:
        """This data in ``execution`` (None: as it is): a shallow copy sharing the arrays and every piece
        computed so far (a PCA already made stays the one used)."""
        if execution is None or execution == getattr(self, "execution", CPU):
            return self
        check(execution)
        other = object.__new__(EvalData)
        other.__dict__.update(self.__dict__)
        other.execution = execution
        return other


def _pca_torch(fit_on: np.ndarray, parts, n_comps: int, device, seed: int) -> tuple[Embedding, dict[str, Any]]:
    """The PCA of :attr:`EvalData.embedding` in torch on ``device``, float64: scikit-learn's
    ``PCA(svd_solver="randomized", random_state=seed)`` step by step (``_randomized_svd``: the same Gaussian
    test matrix, drawn on the CPU from ``numpy.random.RandomState(seed)``; 10 oversamples; 7 power iterations
    when ``n_comps < 0.1 min(shape)``, else 4, each normalised by an LU factorisation with partial pivoting;
    the transpose of wide data; the QR basis, the small SVD, ``svd_flip(u_based_decision=False)``), then
    ``parts`` (truth, pred, source) projected as ``PCA.transform``. It equals the CPU's embedding to rounding;
    an exact SVD would not (the randomized SVD approximates the noise components, which moved an energy
    distance by 2.5% on a flat-spectrum test)."""
    import torch

    X = torch.as_tensor(fit_on, dtype=torch.float64, device=device)
    n_samples, n_features = X.shape
    mean = X.mean(dim=0)
    M = X - mean
    del X
    n_random = n_comps + 10
    n_iter = 7 if n_comps < 0.1 * min(M.shape) else 4
    transpose = n_samples < n_features
    A = M.T if transpose else M
    rng = np.random.RandomState(seed)
    Q = torch.as_tensor(rng.normal(size=(A.shape[1], n_random)), dtype=torch.float64, device=device)

    def lu(Y):  # scipy.linalg.lu(Y, permute_l=True)[0], without the dense rows x rows permutation matrix
        LU, pivots, _ = torch.linalg.lu_factor_ex(Y)  # a singular U is fine here, as in scipy
        k = LU.shape[1]
        L = LU.tril(-1)
        L.diagonal().fill_(1.0)
        rows = list(range(Y.shape[0]))
        for j, pv in enumerate(pivots.cpu().tolist()):  # LAPACK's row swaps, in order (1-based)
            rows[j], rows[pv - 1] = rows[pv - 1], rows[j]
        PL = torch.empty_like(L)
        PL[torch.as_tensor(rows, device=L.device)] = L  # L U = Y[rows]
        return PL[:, :k]

    for _ in range(n_iter):
        Q = lu(A @ Q)
        Q = lu(A.T @ Q)
    Q, _ = torch.linalg.qr(A @ Q, mode="reduced")
    Uhat, S, Vt = torch.linalg.svd(Q.T @ A, full_matrices=False)
    U = Q @ Uhat
    components = (U[:, :n_comps].T if transpose else Vt[:n_comps]).contiguous()
    S = S[:n_comps]
    rows = torch.arange(components.shape[0], device=components.device)
    components = components * torch.sign(components[rows, components.abs().argmax(dim=1)])[:, None]
    total_var = (M * M).sum() / (n_samples - 1)
    ratio = float(((S**2 / (n_samples - 1)) / total_var).sum().cpu())
    del M, A, Q, U
    offset = mean[None, :] @ components.T
    proj = [(torch.as_tensor(P, dtype=torch.float64, device=device) @ components.T - offset).cpu().numpy()
            for P in parts]
    info = {
        "method": "PCA",
        "library": f"torch {torch.__version__} on {device} (scikit-learn's randomized PCA, float64)",
        "svd_solver": "randomized",
        "random_state": int(seed),
        "n_comps": int(n_comps),
        "fit_on": "source + truth cells (real data only); values as given, centred, not scaled",
        "pred": "projected onto the fitted components (as PCA.transform)",
        "n_cells_fit": int(n_samples),
        "n_genes": int(n_features),
        "explained_variance_ratio": ratio,
    }
    return Embedding(*proj), info


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


def _count_scale(X: np.ndarray, peaks: np.ndarray) -> bool:
    """True when X looks like counts (non-negative integers above 20) or unlogged values (the median cell's
    largest value above LOG_MAX).

    Wider than :func:`perturbkit.data.looks_like_counts` (which asks only "raw counts?" of one input, on
    its first 2000 cells): this also flags non-integer data whose typical cell peaks above
    :data:`perturbkit.data.LOG_MAX` (CPM, TPM), since it decides whether truth, pred and source share one scale.
    The typical cell, not the largest value: a few extreme values of a model's prediction (a decoder that
    extrapolates) leave it on the log scale (:func:`_outliers` notes them). ``peaks``: each cell's largest value.
    """
    if not X.size:
        return False
    integer = bool(np.all(np.equal(np.mod(X[:2000], 1), 0)))
    if integer and float(peaks.max()) > 20 and float(X.min()) >= 0:
        return True
    return float(np.median(peaks)) > LOG_MAX


def _outliers(name: str, X: np.ndarray, peaks: np.ndarray) -> str | None:
    """A note when log-scale ``X`` holds values above LOG_MAX, which log1p of normalised counts rarely
    reaches: they are scored as given, and they weigh on every metric. ``peaks``: each cell's largest value."""
    if not X.size or float(peaks.max()) <= LOG_MAX:
        return None
    n = int((X > LOG_MAX).sum())
    return (f"{name} holds {n} value{'s' if n > 1 else ''} above {LOG_MAX:g} (max {float(peaks.max()):.3g}) in "
            f"{int((peaks > LOG_MAX).sum())} of {X.shape[0]} cells, beyond log-normalised expression (its median "
            f"cell peaks at {float(np.median(peaks)):.3g}); scored as given. From a model, this is an "
            "extrapolation.")


def _check_scale(arrays: dict[str, np.ndarray]) -> list[str]:
    """Refuse truth / pred / source on different scales (counts vs log); warn when all three are counts, and
    when a log-scale one holds values no log-normalised cell reaches."""
    peaks = {name: X.max(axis=1) if X.size else np.zeros(X.shape[0]) for name, X in arrays.items()}
    scale = {name: _count_scale(X, peaks[name]) for name, X in arrays.items()}
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
    notes = [n for n in (_outliers(name, X, peaks[name]) for name, X in arrays.items()) if n]
    for note in notes:
        warnings.warn(note, InputWarning, stacklevel=3)
    return notes


def prepare(truth, pred, source, *, n_top: int = 100, seed: int = 0,
            execution: Execution | None = None, moments=None) -> EvalData:
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
    execution
        where the PCA and the pair sums of ``edistance`` and ``mmd`` run (:attr:`EvalData.execution`; None:
        the CPU, as before).
    moments
        ``{"truth" | "pred" | "source": (mean, var)}``: per-gene means and variances (ddof=0) of all the cells
        these three AnnData objects are a sample of (summed while they were streamed: ``perturbkit predict`` on a
        held-out context larger than its ``eval_cells``). The moment metrics use them; the DEGs, the PCA and the
        distances use the cells given; the bootstrap resamples the cells given and moves each replicate by the
        difference between the given moments and the sample's (:attr:`EvalData.offsets`). None: the moments of
        the cells given.

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
                f"{name} has {len(dup)} duplicate gene names{examples(dup)}. "
                f"Fix: {name}.var_names_make_unique() (the same way in truth, pred and source)."
            )
    check_same_genes("pred", pred, "truth", truth.var_names)
    check_same_genes("source", source, "truth", truth.var_names)
    check_seed(seed, "seed")
    execution = check(execution)
    var_names = pd.Index(truth.var_names).astype(str)
    notes = _check_scale(arrays)
    n_genes = len(var_names)
    if n_top > n_genes:
        note = f"n_top={n_top} is more than the {n_genes} genes; using all {n_genes} genes as the top DEGs."
        warnings.warn(note, UserWarning, stacklevel=2)
        notes.append(note)
        n_top = n_genes
    data = EvalData(
        arrays["truth"], arrays["pred"], arrays["source"], var_names, n_top=n_top, seed=seed, notes=notes,
        execution=execution,
    )
    for part, (mean, var) in (moments or {}).items():
        if part not in objs:
            raise InputError(f"moments: unknown part {part!r}; use truth, pred or source.", params=("moments",))
        mean, var = (np.asarray(v, dtype=np.float64) for v in (mean, var))
        if mean.shape != (n_genes,) or var.shape != (n_genes,):
            raise InputError(f"moments[{part!r}]: a mean and a variance of {n_genes} genes each, got shapes "
                             f"{mean.shape} and {var.shape}.", params=("moments",))
        data.offsets[part] = (mean - getattr(data, f"{part}_mean"), var - getattr(data, f"{part}_var"))
        data.__dict__[f"{part}_mean"], data.__dict__[f"{part}_var"] = mean, var
    return data


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
    check_same_genes("source", source, "target", target.var_names)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive integer, got {n!r}.")
    return _wilcoxon_top(t, s, pd.Index(target.var_names).astype(str), min(int(n), t.shape[1]))


def ceiling_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction cells, truth cells) of :func:`perturbkit.metrics.ceiling`'s split of ``n`` real cells:
    ``order = default_rng(seed).permutation(n)``; the first ``n // 2`` predict the rest."""
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // 2], order[n // 2 :]
