"""Metric functions: array-level distances (pertpy's energy distance, RBF MMD, mean-variance KDE) and one
function per registered metric, each taking an :class:`~perturbkit.metrics.evaldata.EvalData` and
returning a float.

Importing this module loads numpy only; scipy.stats, scipy.spatial, scikit-learn and threadpoolctl load when
a metric needs them, and torch only when a distance is asked for on a device other than the CPU (``device=``).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .evaldata import EvalData

#: RBF kernel width of ``mmd``: pertpy's ``MMD(kernel="rbf")`` hard-codes ``gamma=1.0``
MMD_GAMMA = 1.0


# ------------------------------------------------------------------------------- array-level distances

#: rows and columns of one tile of the pairwise sums in :func:`energy_distance` and :func:`mmd_rbf`:
#: a 512 x 512 float64 tile is 2 MiB, one per worker thread, whatever the number of cells
PAIR_BLOCK = 512

#: a pair whose squared distance from the matrix-product form is below this share of ``|a|^2 + |b|^2`` (both
#: centred) is recomputed from its coordinate differences: the product form's rounding error is about
#: ``k eps (|a|^2 + |b|^2)``, so every other pair keeps a relative error below ``k eps / _NEAR`` (~1e-9)
_NEAR = 1e-5


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _pairs_args(X, Y, block) -> tuple[np.ndarray, np.ndarray, int]:
    X, Y = np.asarray(X, dtype=np.float64), np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[1] != Y.shape[1]:
        raise ValueError(
            f"X and Y must be 2-D arrays (cells x dimensions) with the same number of columns, "
            f"got shapes {X.shape} and {Y.shape}"
        )
    if X.shape[0] == 0 or Y.shape[0] == 0:
        raise ValueError(f"X and Y must hold at least one cell each, got shapes {X.shape} and {Y.shape}")
    if block is None:
        block = PAIR_BLOCK
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer (rows per tile), got {block!r}")
    return X, Y, int(block)


class _PairSum:
    """``sum_ij f(||a_i - b_j||^2)`` over all rows ``a_i`` of ``A`` and ``b_j`` of ``B`` in square tiles.

    Both sets are shifted by ``centre`` first (the distances do not change; the norms shrink, which keeps the
    product form accurate). A tile's squared distances come from one matrix product of the augmented rows
    ``[a, |a|^2, 1] . [-2 b, 1, |b|^2]`` in float64; pairs the product form cannot resolve (squared distance
    below ``_NEAR`` of the squared norms: duplicates, near-identical cells, rounding below 0) are recomputed
    from the coordinate differences. With ``symmetric`` (``B`` is ``A``), only tiles on and above the diagonal
    are computed, those above counted twice, and the self-pairs are exactly 0. Tile sums are float64 and added
    with :func:`math.fsum` in tile order, so the result does not depend on the number of threads.
    """

    def __init__(self, A: np.ndarray, B: np.ndarray, centre: np.ndarray, *, symmetric: bool, block: int):
        k = A.shape[1]
        self.symmetric, self.block, self.k = symmetric, block, k
        self.L = np.empty((A.shape[0], k + 2))  # [a, |a|^2, 1]
        np.subtract(A, centre, out=self.L[:, :k])
        self.na = np.einsum("ij,ij->i", self.L[:, :k], self.L[:, :k])
        self.L[:, k], self.L[:, k + 1] = self.na, 1.0
        self.R = np.empty((B.shape[0], k + 2))  # [-2 b, 1, |b|^2]
        np.subtract(B, centre, out=self.R[:, :k])
        self.nb = self.na if symmetric else np.einsum("ij,ij->i", self.R[:, :k], self.R[:, :k])
        self.R[:, :k] *= -2.0  # exact: b is recovered as R[:, :k] * -0.5
        self.R[:, k], self.R[:, k + 1] = 1.0, self.nb
        rows, cols = range(0, A.shape[0], block), range(0, B.shape[0], block)
        self.tiles = [(i, j) for i in rows for j in cols if not symmetric or j >= i]
        self.tile_size = min(block, A.shape[0]) * min(block, B.shape[0])  # entries of the largest tile

    def _exact(self, D: np.ndarray, i0: int, j0: int) -> None:
        """Recompute, in place, the entries of tile ``D`` that the product form cannot resolve."""
        r, c = D.shape
        near = D < _NEAR * np.add.outer(self.na[i0 : i0 + r], self.nb[j0 : j0 + c])
        ii, jj = np.nonzero(near)
        a, b = self.L[i0 : i0 + r, : self.k], self.R[j0 : j0 + c, : self.k]
        step = max(1, r * c // max(self.k, 1))  # one tile's worth of differences at a time
        for s in range(0, len(ii), step):
            diff = a[ii[s : s + step]] + 0.5 * b[jj[s : s + step]]  # a - b_centred, b_centred = -0.5 * R
            D[ii[s : s + step], jj[s : s + step]] = np.einsum("ij,ij->i", diff, diff)

    def tile(self, t: int, f: Callable[[np.ndarray], float], buf: np.ndarray) -> float:
        """``f`` of tile ``t``'s squared distances (``f`` may overwrite its argument), times its weight."""
        i0, j0 = self.tiles[t]
        r, c = min(self.block, self.L.shape[0] - i0), min(self.block, self.R.shape[0] - j0)
        D = buf[: r * c].reshape(r, c)
        np.matmul(self.L[i0 : i0 + r], self.R[j0 : j0 + c].T, out=D)
        diagonal = self.symmetric and i0 == j0
        if diagonal:
            np.fill_diagonal(D, np.inf)  # self-pairs: set to exactly 0 below
        if D.min() < _NEAR * (self.na[i0 : i0 + r].max() + self.nb[j0 : j0 + c].max()):
            self._exact(D, i0, j0)
        if diagonal:
            np.fill_diagonal(D, 0.0)
        return f(D) * (2.0 if self.symmetric and j0 > i0 else 1.0)


#: held while BLAS is limited to one thread, so that concurrent callers do not restore each other's limit
_BLAS_LIMIT = threading.Lock()
_controller = (
    None  # threadpoolctl.ThreadpoolController, made on first use (finding the libraries takes ~1 ms)
)


def _one_blas_thread():
    """Context manager: BLAS (numpy's OpenBLAS, MKL, ...) on one thread inside. A threaded BLAS is slower
    here (an 8 MiB product with two threads on two busy CPUs: 20 ms instead of 1 ms), and the tiles bring
    their own threads."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def _tile_sums(pairs: _PairSum, f: Callable[[np.ndarray], float], workers: int, pool) -> float:
    """Sum of ``f`` over the tiles of ``pairs`` on ``workers`` threads of ``pool`` (None: this thread)."""
    results = [0.0] * len(pairs.tiles)
    lock, todo = threading.Lock(), iter(range(len(pairs.tiles)))

    def worker() -> None:
        buf = np.empty(pairs.tile_size)
        while True:
            with lock:
                t = next(todo, None)
            if t is None:
                return
            results[t] = pairs.tile(t, f, buf)

    if pool is None:
        worker()
    else:
        for future in [pool.submit(worker) for _ in range(workers)]:
            future.result()
    return math.fsum(results)  # in tile order: the same whatever the number of threads


def _pair_sums(
    jobs: list[tuple[Callable[[], _PairSum], Callable[[np.ndarray], float]]], n_jobs: int | None
) -> list[float]:
    """The sum of each job ``(make pairs, f)`` over all its tiles, one job after the other (so only one job's
    augmented rows are held at a time), the tiles shared by ``n_jobs`` threads (None: every CPU of the
    process), BLAS limited to one thread meanwhile (one matrix product per tile and thread)."""
    if n_jobs is not None and (
        isinstance(n_jobs, bool) or not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1
    ):
        raise ValueError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
    workers = _cpus() if n_jobs is None else int(n_jobs)
    sums = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(_BLAS_LIMIT)
        stack.enter_context(_one_blas_thread())
        pool = None
        for make, f in jobs:
            pairs = make()
            threads = min(workers, len(pairs.tiles))
            if threads > 1 and pool is None:
                from concurrent.futures import ThreadPoolExecutor

                pool = stack.enter_context(ThreadPoolExecutor(workers))
            sums.append(_tile_sums(pairs, f, threads, pool if threads > 1 else None))
            del pairs
    return sums


# ------------------------------------------------------------------- the same tiled sums in torch (GPU)

#: rows and columns of one tile on a CUDA device: a 8192 x 8192 float64 tile is 512 MiB, few enough tiles
#: that the per-tile launches and the one synchronisation per tile (the near-pair check) stay negligible
GPU_PAIR_BLOCK = 8192


def _device_kind(device) -> str:
    """``"cpu"``, ``"cuda"`` or ``"mps"`` of ``device`` (None, a string, a ``torch.device`` or an
    :class:`~perturbkit.execution.Execution`), without importing torch."""
    if device is None:
        return "cpu"
    device = getattr(device, "device", device)  # an Execution
    text = device if isinstance(device, str) else getattr(device, "type", None)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}")
    kind = text.strip().lower().split(":", 1)[0]
    if kind == "mps":
        raise ValueError(
            "device 'mps': Apple's Metal has no float64, and the distances accumulate in float64 (float32 "
            "changes the third digit of an energy distance); compute them on the CPU (device=None)."
        )
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be None, 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}")
    return kind


def _torch_pair_sum(A, B, centre: np.ndarray, f: str, gamma: float, *, symmetric: bool, block: int, device) -> float:
    """:class:`_PairSum` summed over all its tiles in torch on ``device``, float64: the same augmented rows,
    the same product form, the same recomputation of the pairs it cannot resolve (``_NEAR``), the same tile
    weights; tile sums stay on the device and are added with :func:`math.fsum` in tile order at the end.

    ``A`` and ``B`` are float64 tensors on ``device`` (``B`` is ``A`` when ``symmetric``); ``f`` is ``"sqrt"``
    (energy distance) or ``"rbf"`` (``exp(-gamma d2)``).
    """
    import torch

    k = A.shape[1]
    c = torch.as_tensor(centre, dtype=torch.float64, device=device)
    L = torch.empty((A.shape[0], k + 2), dtype=torch.float64, device=device)  # [a, |a|^2, 1]
    torch.sub(A, c, out=L[:, :k])
    na = (L[:, :k] * L[:, :k]).sum(dim=1)
    L[:, k], L[:, k + 1] = na, 1.0
    if symmetric:
        R, nb = torch.empty_like(L), na
        R[:, :k] = L[:, :k]
    else:
        R = torch.empty((B.shape[0], k + 2), dtype=torch.float64, device=device)
        torch.sub(B, c, out=R[:, :k])
        nb = (R[:, :k] * R[:, :k]).sum(dim=1)
    R[:, :k] *= -2.0  # exact: b is recovered as R[:, :k] * -0.5
    R[:, k], R[:, k + 1] = 1.0, nb
    n, m = L.shape[0], R.shape[0]
    sums = []
    for i0 in range(0, n, block):
        r = min(block, n - i0)
        for j0 in range(i0 if symmetric else 0, m, block):
            cc = min(block, m - j0)
            D = L[i0 : i0 + r] @ R[j0 : j0 + cc].T
            diagonal = symmetric and i0 == j0
            if diagonal:
                D.fill_diagonal_(math.inf)  # self-pairs: set to exactly 0 below
            na_t, nb_t = na[i0 : i0 + r], nb[j0 : j0 + cc]
            if bool(D.amin() < _NEAR * (na_t.amax() + nb_t.amax())):  # one synchronisation per tile
                ii, jj = torch.nonzero(D < _NEAR * (na_t[:, None] + nb_t[None, :]), as_tuple=True)
                a, b = L[i0 : i0 + r, :k], R[j0 : j0 + cc, :k]
                step = max(1, r * cc // max(k, 1))
                for s in range(0, len(ii), step):
                    diff = a[ii[s : s + step]] + 0.5 * b[jj[s : s + step]]
                    D[ii[s : s + step], jj[s : s + step]] = (diff * diff).sum(dim=1)
            if diagonal:
                D.fill_diagonal_(0.0)
            if f == "sqrt":
                D.sqrt_()
            else:
                D.mul_(-gamma).exp_()
            sums.append(D.sum() * (2.0 if symmetric and j0 > i0 else 1.0))
            del D
    return math.fsum(torch.stack(sums).cpu().tolist())  # in tile order, as the numpy path


def _torch_three_means(X, Y, f: str, gamma: float, block, device) -> tuple[float, float, float]:
    """:func:`_three_means` in torch on ``device`` (a ``torch.device``, the CPU included: the tests compare
    it there with the numpy path), float64."""
    import torch

    device = torch.device(device)
    X, Y, block = _pairs_args(X, Y, block if block is not None else
                              (GPU_PAIR_BLOCK if device.type == "cuda" else PAIR_BLOCK))
    n, m = X.shape[0], Y.shape[0]
    pooled = (X.sum(axis=0) + Y.sum(axis=0)) / (n + m)
    Xt = torch.as_tensor(X, dtype=torch.float64, device=device)
    Yt = torch.as_tensor(Y, dtype=torch.float64, device=device)
    xy = _torch_pair_sum(Xt, Yt, pooled, f, gamma, symmetric=False, block=block, device=device)
    xx = _torch_pair_sum(Xt, Xt, X.mean(axis=0), f, gamma, symmetric=True, block=block, device=device)
    yy = _torch_pair_sum(Yt, Yt, Y.mean(axis=0), f, gamma, symmetric=True, block=block, device=device)
    return xy / (n * m), xx / (n * n), yy / (m * m)


def _sqrt_sum(D: np.ndarray) -> float:
    np.sqrt(D, out=D)
    return float(D.sum())


def _three_means(X, Y, f, block, n_jobs) -> tuple[float, float, float]:
    """``(mean f over X x Y, mean over X x X, mean over Y x Y)`` of ``f(squared distance)``, all ordered
    pairs, self-pairs included (squared distance exactly 0)."""
    X, Y, block = _pairs_args(X, Y, block)
    n, m = X.shape[0], Y.shape[0]
    pooled = (X.sum(axis=0) + Y.sum(axis=0)) / (n + m)
    xy, xx, yy = _pair_sums(
        [
            (lambda: _PairSum(X, Y, pooled, symmetric=False, block=block), f),
            (lambda: _PairSum(X, X, X.mean(axis=0), symmetric=True, block=block), f),
            (lambda: _PairSum(Y, Y, Y.mean(axis=0), symmetric=True, block=block), f),
        ],
        n_jobs,
    )
    return xy / (n * m), xx / (n * n), yy / (m * m)


def energy_distance(
    X: np.ndarray, Y: np.ndarray, *, block: int | None = None, n_jobs: int | None = None, device=None
) -> float:
    """Energy distance as pertpy's ``Edistance``: ``2 E|x - y| - E|x - x'| - E|y - y'|``.

    ``|.|`` is the Euclidean (not squared) distance; each expectation is the plain mean over all pairs,
    the within-set means over all ``n * n`` ordered pairs *including* the zero self-pairs (a V-statistic).

    Parameters
    ----------
    X, Y
        ``(n, d)`` and ``(m, d)`` arrays of cells (any float dtype; computed in float64).
    block
        rows and columns per tile (default ``PAIR_BLOCK`` = 512): memory is ``O((n + m) d)`` plus a few times
        ``8 * block**2`` bytes per thread, never ``O(n * m)``. Does not change the result beyond rounding.
    n_jobs
        threads over the tiles (default: all CPUs of the process); the result does not depend on it.
    device
        where the tiles are summed: None or ``"cpu"`` (numpy, the code above), or a CUDA device (``"cuda"``,
        ``"cuda:N"``, a ``torch.device`` or an :class:`~perturbkit.execution.Execution`): the same tiled sums in
        torch, float64, tiles of ``GPU_PAIR_BLOCK`` rows unless ``block`` is given (``n_jobs`` unused).
        ``"mps"`` is refused: Metal has no float64.

    Returns
    -------
    float
        the energy distance.

    Notes
    -----
    The pairs are summed tile by tile in float64 (squared distances from one matrix product per tile, pairs
    closer than that product form resolves recomputed from coordinate differences), so it equals the all-pairs
    computation to rounding (``tests/test_distances.py`` keeps that computation as the reference).
    """
    if _device_kind(device) == "cuda":
        xy, xx, yy = _torch_three_means(X, Y, "sqrt", 0.0, block, getattr(device, "device", device))
    else:
        xy, xx, yy = _three_means(X, Y, _sqrt_sum, block, n_jobs)
    return 2 * xy - xx - yy


def mmd_rbf(
    X: np.ndarray,
    Y: np.ndarray,
    gamma: float = MMD_GAMMA,
    *,
    block: int | None = None,
    n_jobs: int | None = None,
    device=None,
) -> float:
    """Squared MMD, RBF kernel, as pertpy's ``MMD(kernel="rbf")``: ``mean K_XX + mean K_YY - 2 mean K_XY``.

    ``K(x, y) = exp(-gamma * ||x - y||^2)`` with pertpy's fixed ``gamma = 1.0``; the means run over all pairs,
    diagonal included (the biased V-statistic estimate of MMD^2, no square root). ``block`` and ``n_jobs``
    as :func:`energy_distance` (tiled float64 sums; memory bounded by the tile size, not ``n * m``), and
    ``device`` too (a CUDA device: the same sums in torch, float64).
    """
    gamma = float(gamma)
    if _device_kind(device) == "cuda":
        xy, xx, yy = _torch_three_means(X, Y, "rbf", gamma, block, getattr(device, "device", device))
        return xx + yy - 2 * xy

    def kernel_sum(D: np.ndarray) -> float:
        np.multiply(D, -gamma, out=D)
        np.exp(D, out=D)
        return float(D.sum())

    xy, xx, yy = _three_means(X, Y, kernel_sum, block, n_jobs)
    return xx + yy - 2 * xy


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


def _distance_device(d: EvalData) -> str | None:
    """Where ``edistance`` and ``mmd`` sum their pairs: the EvalData's CUDA device, else the CPU (None; on mps
    too, which has no float64)."""
    ex = getattr(d, "execution", None)
    return ex.device if ex is not None and ex.is_cuda else None


def edistance(d: EvalData) -> float:
    """:func:`energy_distance` (pertpy's ``Edistance``) of truth vs pred cells on :attr:`EvalData.embedding`.

    ``2 mean_ij ||t_i - p_j|| - mean_ij ||t_i - t_j|| - mean_ij ||p_i - p_j||`` (Euclidean, self-pairs
    included), PCA with ``min(50, n_source + n_truth - 1, n_genes)`` components fitted on source + truth,
    pred projected into it. On the EvalData's CUDA device when it has one (float64), else on the CPU.
    """
    emb = d.embedding
    return energy_distance(emb.truth, emb.pred, device=_distance_device(d))


def mmd(d: EvalData) -> float:
    """:func:`mmd_rbf` (pertpy's ``MMD(kernel="rbf")``, gamma 1.0) of truth vs pred on the PCA embedding.

    ``mean_ij k(t_i, t_j) + mean_ij k(p_i, p_j) - 2 mean_ij k(t_i, p_j)``, ``k(x, y) = exp(-||x - y||^2)``.
    """
    emb = d.embedding
    return mmd_rbf(emb.truth, emb.pred, gamma=MMD_GAMMA, device=_distance_device(d))


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


def knn_batch_entropy(embedding: np.ndarray, batch, k: int = 30) -> float:
    """Batch mixing of an integration: the mean over cells of the Shannon entropy of the batch labels of each
    cell's ``k`` nearest neighbours (Euclidean, the cell itself excluded), divided by ``log(n_batches)``.

    0: no neighbourhood holds another batch; 1: every neighbourhood holds the batches in equal parts (the
    kNN batch entropy of Haghverdi et al. 2018, normalised). With one batch it is 0. Neighbours from
    :class:`sklearn.neighbors.NearestNeighbors` (ties broken by its order).
    """
    from sklearn.neighbors import NearestNeighbors

    X = np.asarray(embedding, dtype=np.float64)
    labels = np.asarray(batch).astype(str)
    if X.ndim != 2 or X.shape[0] != labels.shape[0]:
        raise ValueError(f"embedding must be cells x dims with one batch label per cell, got {X.shape} and "
                         f"{labels.shape[0]} labels")
    names, codes = np.unique(labels, return_inverse=True)
    if len(names) < 2:
        return 0.0
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k < X.shape[0]:
        raise ValueError(f"k must be from 1 to the number of cells - 1 ({X.shape[0] - 1}), got {k!r}")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(X).kneighbors(X)
    # drop each cell itself (the first neighbour, or wherever a duplicate point put it)
    rows = np.arange(X.shape[0])[:, None]
    self_pos = np.where((idx == rows).any(axis=1), np.argmax(idx == rows, axis=1), k)
    keep = np.ones_like(idx, dtype=bool)
    keep[np.arange(X.shape[0]), self_pos] = False
    neigh = idx[keep].reshape(X.shape[0], k)
    counts = np.zeros((X.shape[0], len(names)))
    np.add.at(counts, (np.repeat(np.arange(X.shape[0]), k), codes[neigh].ravel()), 1.0)
    p = counts / k
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(ent.mean() / np.log(len(names)))
