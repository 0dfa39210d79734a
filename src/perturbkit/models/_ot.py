"""scPRAM's optimal-transport pairing: the dense plan where it fits, bounded memory above it.

Each training control cell is paired with the perturbed cell that holds the largest share of its row of the
transport plan (uniform marginals, cost: squared Euclidean or Euclidean distance of the latents, divided by its
median).

- **Dense** (the cost matrix of ``n_control x n_perturbed`` float64 entries at most ``dense_max_gb``; default
  0.25 GiB, ~5,790 x 5,790 cells): the whole cost matrix and plan, POT's Sinkhorn (numpy, or torch tensors on the
  execution's device) or POT's network simplex (``method="exact"``). Kang's 4,140 x 4,343 training cells take
  this path, so their pairing is what it always was.
- **Bounded memory** (Sinkhorn above ``dense_max_gb``): Sinkhorn potentials learnt on a seeded subsample, each
  control cell's partner found by a tiled c-transform over all perturbed cells (:func:`ot_pairing_tiled`).
- **Out of memory**: a dense plan that cannot fit the memory there is (host memory, or the GPU's on a CUDA
  device) stops before allocating with an :class:`~perturbkit.errors.InputError` naming the bytes needed and
  available and the parameter that avoids it (``ot="sinkhorn"``, or a lower ``ot_dense_max_gb``).

Why potentials and a c-transform rather than mini-batch OT: with mini-batches of ``s`` cells a control cell can
only be paired inside its batch, with ``s / n_perturbed`` of the perturbed cells, and the batches' plans add a
bias that does not shrink with the data (Fatras et al. 2020). The entropic potentials are the quantity whose
estimate from a sample converges (Genevay et al. 2019; Pooladian & Niles-Weed 2021 use the same extension to
build an entropic map from samples), one Sinkhorn solve of a fixed size learns them, and extending them to every
cell is a soft-min over the subsample: each control cell still chooses its partner among all perturbed cells. The
tiles keep the memory at ``tile`` pairs whatever the number of cells; the time is that of the ``n x m`` distance
products (``max_candidates`` caps it at ``n x max_candidates`` for linear time).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from ..errors import InputError

OT_METHODS = ("sinkhorn", "exact")
OT_COSTS = ("sqeuclidean", "euclidean")
SINKHORN_MAX_ITER = 1000
EMD_MAX_ITER = 10_000_000
#: the largest float64 cost matrix (GiB) solved densely: ~5,790 x 5,790 cells; the dense Sinkhorn then peaks at
#: ~0.9 GiB (28 bytes per pair measured; 1.3 GiB at 40 with the log-domain fallback), under 4 GiB with room
#: for the model
DENSE_MAX_GB = 0.25
#: peak bytes per (control, perturbed) pair of the dense solves, measured on 1,500 x 1,650 points (tracemalloc
#: and ru_maxrss; docs/scpram.md "OT at scale") and rounded up: numpy Sinkhorn 28 (40 when the log-domain solver
#: takes over), POT's network simplex 42, the torch path (float64 cost, median by selection, kernel, plan) ~48
BYTES_PER_PAIR = {"sinkhorn": 40, "exact": 48, "torch": 56}
#: pairs per tile of the bounded-memory c-transform: 4M float64 entries, 32 MiB (each tile has ~3 such arrays)
TILE_PAIRS = 2**22


# ------------------------------------------------------------------------------------------- memory


def available_memory(device=None) -> int | None:
    """Bytes the process can still allocate where a dense plan on ``device`` would live: the free memory of a
    CUDA device, else the host's available memory (psutil, or ``MemAvailable`` of /proc/meminfo); None when it
    cannot be told."""
    if device is not None:
        import torch

        dev = torch.device(device)
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.1f} MiB"


def check_dense_fits(n: int, m: int, method: str, device=None, dense_max_gb: float = DENSE_MAX_GB) -> None:
    """Raise :class:`InputError` before a dense plan of ``n x m`` cells is allocated when it needs more memory
    than is available (:func:`available_memory`), naming the parameter that avoids it."""
    kind = "exact" if method == "exact" else ("torch" if device is not None else "sinkhorn")
    need = BYTES_PER_PAIR[kind] * n * m
    have = available_memory(device)
    if have is None or need <= have:
        return
    where = f"on {device}" if device is not None and str(device) != "cpu" else "of memory"
    if method == "exact":
        raise InputError(
            f"scpram: the exact transport plan (ot='exact') of {n:,} control x {m:,} perturbed cells needs about "
            f"{_gib(need)} {where} and {_gib(have)} are available; use ot='sinkhorn', which pairs in bounded "
            f"memory above ot_dense_max_gb ({dense_max_gb:g} GiB of cost matrix), or train on fewer cells.",
            params=("ot",))
    raise InputError(
        f"scpram: the dense Sinkhorn plan of {n:,} control x {m:,} perturbed cells needs about {_gib(need)} "
        f"{where} and {_gib(have)} are available; lower ot_dense_max_gb (now {dense_max_gb:g}; default "
        f"{DENSE_MAX_GB:g}) so that it pairs in bounded memory.", params=("ot_dense_max_gb",))


def dense_bytes(n: int, m: int) -> int:
    """Bytes of the float64 cost matrix of ``n x m`` cells: what ``dense_max_gb`` is compared with."""
    return 8 * int(n) * int(m)


# ------------------------------------------------------------------------------------------- pairing


def ot_pairing(zc: np.ndarray, zp: np.ndarray, *, method: str = "sinkhorn", reg: float = 0.05,
               max_iter: int | None = None, tol: float = 1e-3, cost: str = "sqeuclidean",
               return_plan: bool = False, device=None, dense_max_gb: float = DENSE_MAX_GB,
               max_candidates: int | None = None, seed: int = 0, tile: int = TILE_PAIRS) -> tuple:
    """Pair each row of ``zc`` with a row of ``zp`` by optimal transport with uniform marginals.

    Returns the partner index of every control row (the argmax of its row of the plan) and a dict describing
    the solve: method, cost, scale, regularisation, iterations, marginal errors (L1 distance of the plan's row
    and column sums to the uniform marginals), whether it converged, POT's warnings and, for ``"exact"``, POT's
    result code. With ``return_plan=True`` the transport plan (n_control x n_perturbed, numpy) comes third.

    ``device``: None solves with numpy and POT on the CPU (float32 matrix scaling, float64 log-domain fallback).
    A torch device (``"cpu"``, ``"cuda:0"``, ...) builds the cost matrix, runs POT's Sinkhorn on torch tensors
    (POT computes on their device) and takes the argmax partners there, in float64 (float32 on mps); see
    :func:`ot_pairing_torch`. ``"exact"`` (POT's network simplex) runs on the CPU either way.

    Size: Sinkhorn whose float64 cost matrix would exceed ``dense_max_gb`` GiB runs in bounded memory
    (:func:`ot_pairing_tiled`, with ``max_candidates``, ``seed`` and ``tile``; no plan to return). A dense plan
    (Sinkhorn under the limit, or ``"exact"`` at any size) that needs more memory than is available raises
    :class:`InputError` before anything large is allocated (:func:`check_dense_fits`).
    """
    if method not in OT_METHODS:
        raise InputError(f"ot={method!r} is not allowed; use one of {', '.join(map(repr, OT_METHODS))}.")
    n, m = len(zc), len(zp)
    if method == "sinkhorn" and dense_bytes(n, m) > dense_max_gb * 2**30:
        if return_plan:
            raise InputError(f"scpram: a transport plan of {n:,} x {m:,} cells is not built above "
                             f"ot_dense_max_gb={dense_max_gb:g}; raise it to get the plan.",
                             params=("ot_dense_max_gb",))
        return ot_pairing_tiled(zc, zp, reg=reg, max_iter=max_iter, tol=tol, cost=cost, device=device,
                                subsample_gb=dense_max_gb, max_candidates=max_candidates, seed=seed, tile=tile)
    check_dense_fits(n, m, method, device if method == "sinkhorn" else None, dense_max_gb)
    if device is not None and method == "sinkhorn":
        return ot_pairing_torch(zc, zp, reg=reg, max_iter=max_iter, tol=tol, cost=cost, return_plan=return_plan,
                                device=device)
    P, info, _ = _solve_numpy(zc, zp, method=method, reg=reg, max_iter=max_iter, tol=tol, cost=cost)
    partner = np.argmax(P, axis=1)
    return _finish(partner, info, P if return_plan else None, stacklevel=3)


def _finish(partner, info: dict, plan, stacklevel: int) -> tuple:
    info["seconds"] = time.perf_counter() - info.pop("_start")
    if not info["converged"]:
        warnings.warn(f"scpram: optimal transport ({info['method']}) did not converge: {info}", RuntimeWarning,
                      stacklevel=stacklevel)
    return (partner, info) if plan is None else (partner, info, plan)


def _solve_numpy(zc, zp, *, method: str, reg: float, max_iter, tol: float, cost: str) -> tuple:
    """The dense plan with numpy and POT: ``(P, info, log_u)``; ``log_u`` is the log of POT's row scaling
    (Sinkhorn only: ``P = diag(u) exp(-M / reg) diag(v)``)."""
    import ot

    t0 = time.perf_counter()
    n, m = len(zc), len(zp)
    a, b = np.full(n, 1.0 / n), np.full(m, 1.0 / m)
    M = cost_matrix(zc, zp, cost)
    scale = float(np.median(M))
    if not scale > 0:
        scale = float(M.max()) or 1.0
    M /= scale
    info: dict[str, Any] = {"method": method, "cost": cost, "cost_scale": "median", "cost_median": scale,
                            "n_control": n, "n_perturbed": m, "_start": t0}
    log_u = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if method == "sinkhorn":
            limit = SINKHORN_MAX_ITER if max_iter is None else int(max_iter)
            # POT stops when the L2 norm of the column-marginal error is below stopThr; L1 <= sqrt(m) * L2
            # the plain (matrix-scaling) solver is ~20x faster than the log-domain one; the log-domain solver
            # takes over when exp(-M / reg) underflows (a row or column of the kernel all zero, or a NaN plan)
            # float32 halves the memory traffic of the matrix-vector products that dominate the solve
            solver = "sinkhorn"
            with np.errstate(all="ignore"):
                P, log = ot.sinkhorn(a.astype(np.float32), b.astype(np.float32), M.astype(np.float32), reg,
                                     method=solver, numItermax=limit, stopThr=tol / math.sqrt(m), log=True)
            P = np.asarray(P, dtype=np.float64)
            if not (np.isfinite(P).all() and (P.sum(axis=1) > 0).all() and (P.sum(axis=0) > 0).all()):
                solver = "sinkhorn_log"
                caught.clear()
                P, log = ot.sinkhorn(a, b, M, reg, method=solver, numItermax=limit, stopThr=tol / math.sqrt(m),
                                     log=True)
                log_u = np.asarray(log["log_u"], dtype=np.float64)
            else:
                with np.errstate(divide="ignore"):
                    log_u = np.log(np.asarray(log["u"], dtype=np.float64))
            info.update(reg=float(reg), tol=float(tol), max_iter=limit, iterations=int(log.get("niter", -1)),
                        solver=f"ot.sinkhorn(method={solver!r})")
        else:
            limit = EMD_MAX_ITER if max_iter is None else int(max_iter)
            P, log = ot.emd(a, b, M, numItermax=limit, log=True)
            info.update(max_iter=limit, result_code=int(log["result_code"]), pot_warning=log.get("warning"),
                        cost_value=float(log["cost"]) * scale)
    P = np.asarray(P)
    err_rows = float(np.abs(P.sum(axis=1) - a).sum())
    err_cols = float(np.abs(P.sum(axis=0) - b).sum())
    info.update(marginal_error_control=err_rows, marginal_error_perturbed=err_cols,
                warnings=[str(w.message) for w in caught])
    if method == "sinkhorn":
        info["converged"] = bool(max(err_rows, err_cols) <= tol and np.isfinite(P).all())
    else:
        info["converged"] = bool(info["result_code"] == 1)
    return P, info, log_u


def ot_pairing_torch(zc: np.ndarray, zp: np.ndarray, *, reg: float = 0.05, max_iter: int | None = None,
                     tol: float = 1e-3, cost: str = "sqeuclidean", return_plan: bool = False, device="cpu") -> tuple:
    """:func:`ot_pairing` with ``method="sinkhorn"`` in torch on ``device``: the cost matrix, its median,
    POT's Sinkhorn (``ot.sinkhorn`` on torch tensors runs on their device; the log-domain solver takes over when
    the kernel underflows, as on the CPU), the marginal errors and the argmax partners, all on the device in
    float64 (float32 on mps); the partners come back to the CPU once. The result agrees with the numpy path up
    to rounding (tests/test_devices.py). Dense at any size: :func:`ot_pairing` chooses."""
    P, info, _ = _solve_torch(zc, zp, reg=reg, max_iter=max_iter, tol=tol, cost=cost, device=device)
    partner = P.argmax(dim=1).cpu().numpy()
    return _finish(partner, info, P.cpu().numpy() if return_plan else None, stacklevel=4)


def _solve_torch(zc, zp, *, reg: float, max_iter, tol: float, cost: str, device) -> tuple:
    """The dense Sinkhorn plan in torch on ``device``: ``(P, info, log_u)`` (tensors on the device)."""
    import ot
    import torch

    if cost not in OT_COSTS:
        raise InputError(f"ot_cost={cost!r} is not allowed; use one of {', '.join(map(repr, OT_COSTS))}.")
    t0 = time.perf_counter()
    from ._train import wide_float

    dev = torch.device(device)
    dtype = wide_float(dev)
    n, m = len(zc), len(zp)
    a = torch.full((n,), 1.0 / n, dtype=dtype, device=dev)
    b = torch.full((m,), 1.0 / m, dtype=dtype, device=dev)
    M = cost_matrix_torch(zc, zp, cost, device=dev)
    scale = _median_t(M)
    if not scale > 0:
        scale = float(M.max()) or 1.0
    M /= scale
    limit = SINKHORN_MAX_ITER if max_iter is None else int(max_iter)
    info: dict[str, Any] = {"method": "sinkhorn", "cost": cost, "cost_scale": "median", "cost_median": scale,
                            "n_control": n, "n_perturbed": m, "device": str(dev), "dtype": str(dtype)[6:],
                            "_start": t0}

    def degenerate(P) -> bool:
        return not bool(torch.isfinite(P).all() & (P.sum(dim=1) > 0).all() & (P.sum(dim=0) > 0).all())

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver = "sinkhorn"
        P, log = ot.sinkhorn(a, b, M, reg, method=solver, numItermax=limit, stopThr=tol / math.sqrt(m), log=True)
        if degenerate(P):
            solver = "sinkhorn_log"
            caught.clear()
            P, log = ot.sinkhorn(a, b, M, reg, method=solver, numItermax=limit, stopThr=tol / math.sqrt(m),
                                 log=True)
            log_u = log["log_u"]
        else:
            log_u = torch.log(log["u"])
        info.update(reg=float(reg), tol=float(tol), max_iter=limit, iterations=int(log.get("niter", -1)),
                    solver=f"ot.sinkhorn(method={solver!r}) on torch tensors")
    err_rows = float((P.sum(dim=1) - a).abs().sum())
    err_cols = float((P.sum(dim=0) - b).abs().sum())
    info.update(marginal_error_control=err_rows, marginal_error_perturbed=err_cols,
                warnings=[str(w.message) for w in caught])
    info["converged"] = bool(max(err_rows, err_cols) <= tol and bool(torch.isfinite(P).all()))
    return P, info, log_u


def ot_pairing_tiled(zc: np.ndarray, zp: np.ndarray, *, reg: float = 0.05, max_iter: int | None = None,
                     tol: float = 1e-3, cost: str = "sqeuclidean", device=None, subsample_gb: float = DENSE_MAX_GB,
                     max_candidates: int | None = None, seed: int = 0, tile: int = TILE_PAIRS) -> tuple:
    """Entropic OT pairing in bounded memory: Sinkhorn potentials on a seeded subsample, partners by a tiled
    c-transform over all perturbed cells. Returns ``(partner, info)`` as :func:`ot_pairing`.

    1. Draw (``numpy.random.default_rng(seed)``, without replacement) ``s_c`` control and ``s_p`` perturbed cells,
       the largest subsample whose float64 cost matrix fits ``subsample_gb`` GiB (every cell of a side that fits).
    2. Solve the dense Sinkhorn problem on it as :func:`ot_pairing` does (numpy, or torch on ``device``; the cost
       divided by the subsample's median, ``reg`` relative to it): row scalings ``u`` (log ``log_u``).
    3. Extend the perturbed-side potential to every perturbed cell ``y`` by the soft c-transform over the
       subsample controls: ``h(y) = reg * logsumexp_i(log_u_i - C(x_i, y) / reg)``, tiled over ``y``.
    4. Each control cell ``x`` is paired with ``argmin_y C(x, y) + h(y)``: the argmax of its row of the entropic
       plan ``u(x) exp(-C(x, y) / reg) v(y)`` with ``v(y) ~ exp(-h(y) / reg)``, tiled over ``x`` and ``y`` (for
       the squared Euclidean cost one matrix product per tile, ``|y|^2 / scale + h(y) - 2 x . y / scale``).

    With the subsample equal to all cells, steps 3-4 give the dense plan's argmax partners (to rounding; tested).
    Memory: the subsample's dense solve plus ``tile`` pairs at a time (float64; float32 on mps), whatever
    ``n_control x n_perturbed`` is. ``max_candidates``: the partners are searched among a seeded subsample of at
    most that many perturbed cells (None: all of them), which makes the time linear in the number of control
    cells. ``info`` records the scheme, the subsample sizes, the subsample solve (iterations, marginal errors,
    convergence) and the tiles.
    """
    import torch

    from ._train import wide_float

    if cost not in OT_COSTS:
        raise InputError(f"ot_cost={cost!r} is not allowed; use one of {', '.join(map(repr, OT_COSTS))}.")
    t0 = time.perf_counter()
    n, m = len(zc), len(zp)
    rng = np.random.default_rng(seed)
    s_c, s_p = subsample_sizes(n, m, subsample_gb)
    rows = np.sort(rng.choice(n, s_c, replace=False)) if s_c < n else np.arange(n)
    cols = np.sort(rng.choice(m, s_p, replace=False)) if s_p < m else np.arange(m)
    cand = (np.sort(rng.choice(m, int(max_candidates), replace=False))
            if max_candidates is not None and max_candidates < m else None)
    zc_s, zp_s = np.ascontiguousarray(zc[rows]), np.ascontiguousarray(zp[cols])
    if device is None:
        check_dense_fits(s_c, s_p, "sinkhorn", None, subsample_gb)
        P, sub, log_u = _solve_numpy(zc_s, zp_s, method="sinkhorn", reg=reg, max_iter=max_iter, tol=tol, cost=cost)
    else:
        check_dense_fits(s_c, s_p, "sinkhorn", device, subsample_gb)
        P, sub, log_u = _solve_torch(zc_s, zp_s, reg=reg, max_iter=max_iter, tol=tol, cost=cost, device=device)
    del P
    sub.pop("_start")
    dev = torch.device("cpu" if device is None else device)
    dtype = wide_float(dev)
    scale, eps = sub["cost_median"], float(reg)

    def to(x):
        return torch.as_tensor(np.ascontiguousarray(x)).to(dev, dtype)

    def block(x, y, y_sq):  # the scaled cost of the rows x against the rows y
        C = (x * x).sum(1)[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)
        C.clamp_(min=0.0)
        if cost == "euclidean":
            C.sqrt_()
        return C.div_(scale)

    ys = zp if cand is None else zp[cand]
    n_cand = len(ys)
    # off the CPU the candidates are copied to the device once (n_cand x d, not n x m) rather than per tile
    ys_dev = to(ys) if dev.type != "cpu" else None

    def cand_rows(j, step):
        return ys_dev[j:j + step] if ys_dev is not None else to(ys[j:j + step])
    xs_sub = to(zc_s)
    log_u = torch.as_tensor(log_u).to(dev, dtype)
    keep = torch.isfinite(log_u)  # a row scaling of 0 (underflow of the plain solver) drops that control
    xs_sub, log_u = xs_sub[keep], log_u[keep]
    step_p = max(1, tile // max(1, len(xs_sub)))
    h = torch.empty(n_cand, dtype=dtype, device=dev)
    y_sq = torch.empty(n_cand, dtype=dtype, device=dev)
    with torch.no_grad():
        for j in range(0, n_cand, step_p):
            y = cand_rows(j, step_p)
            y_sq[j:j + len(y)] = (y * y).sum(1)
            C = block(xs_sub, y, y_sq[j:j + len(y)])
            h[j:j + len(y)] = eps * torch.logsumexp(log_u[:, None] - C / eps, dim=0)
        del C
        step_c = max(1, min(n, int(math.isqrt(tile))))
        step_y = max(1, tile // step_c)
        partner = np.empty(n, dtype=np.int64)
        # squared Euclidean: argmin_y |x - y|^2 / scale + h(y) = argmin_y (|y|^2 / scale + h(y)) - x . (2 y / scale)
        # (|x|^2 is the same for every y of a row): one fused matrix product per tile
        offset = y_sq / scale + h if cost == "sqeuclidean" else None
        for i in range(0, n, step_c):
            x = to(zc[i:i + step_c])
            best = torch.full((len(x),), math.inf, dtype=dtype, device=dev)
            arg = torch.zeros(len(x), dtype=torch.int64, device=dev)
            for j in range(0, n_cand, step_y):
                y = cand_rows(j, step_y)
                if offset is None:
                    C = block(x, y, y_sq[j:j + len(y)]).add_(h[j:j + len(y)][None, :])
                else:
                    C = torch.addmm(offset[j:j + len(y)][None, :], x, y.T, alpha=-2.0 / scale)
                val, idx = C.min(dim=1)
                better = val < best  # strict: the first minimum wins, as the dense argmax
                best = torch.where(better, val, best)
                arg = torch.where(better, idx + j, arg)
            partner[i:i + len(x)] = arg.cpu().numpy()
    if cand is not None:
        partner = cand[partner]
    info: dict[str, Any] = {
        "method": "sinkhorn", "cost": cost, "cost_scale": "median of the subsample", "cost_median": scale,
        "n_control": n, "n_perturbed": m, "reg": eps, "tol": float(tol),
        "scheme": "Sinkhorn potentials on a seeded subsample, partners by a tiled c-transform",
        "subsample_control": int(s_c), "subsample_perturbed": int(s_p), "subsample_gb": float(subsample_gb),
        "seed": int(seed), "candidates": int(n_cand), "tile_pairs": int(tile),
        "solver": sub["solver"], "max_iter": sub["max_iter"], "iterations": sub["iterations"],
        "marginal_error_control": sub["marginal_error_control"],
        "marginal_error_perturbed": sub["marginal_error_perturbed"],
        "converged": sub["converged"], "warnings": sub["warnings"], "_start": t0,
    }
    if device is not None:
        info.update(device=str(dev), dtype=str(dtype)[6:])
    return _finish(partner, info, None, stacklevel=4)


def subsample_sizes(n: int, m: int, gb: float) -> tuple[int, int]:
    """The control and perturbed subsample sizes of :func:`ot_pairing_tiled`: the largest whose float64 cost
    matrix fits ``gb`` GiB, square where both sides are larger than that, all of a side that is smaller."""
    pairs = max(1, int(gb * 2**30) // 8)
    side = max(1, math.isqrt(pairs))
    if n <= side:
        s_c = n
    elif m <= side:
        s_c = min(n, max(1, pairs // m))
    else:
        s_c = side
    s_p = min(m, max(1, pairs // s_c))
    return s_c, s_p


# ------------------------------------------------------------------------------------------- costs


def _median_t(M) -> float:
    """The median of all entries of the tensor ``M`` (as ``np.median``: the mean of the two middle values of
    an even count), by selection on its device (numpy on the CPU where the device lacks ``kthvalue``)."""
    flat = M.reshape(-1)
    count = flat.numel()
    try:
        lo = flat.kthvalue((count + 1) // 2).values
        if count % 2:
            return float(lo)
        hi = flat.kthvalue(count // 2 + 1).values
        return float((lo + hi) / 2)
    except (RuntimeError, NotImplementedError):
        return float(np.median(flat.cpu().numpy()))


def cost_matrix_torch(zc: np.ndarray, zp: np.ndarray, cost: str = "sqeuclidean", *, device="cpu"):
    """:func:`cost_matrix` as a torch tensor on ``device`` (float64; float32 on mps)."""
    import torch

    from ._train import wide_float

    dev = torch.device(device)
    dtype = wide_float(dev)
    zc = torch.as_tensor(np.ascontiguousarray(zc)).to(dev, dtype)
    zp = torch.as_tensor(np.ascontiguousarray(zp)).to(dev, dtype)
    M = (zc * zc).sum(1)[:, None] + (zp * zp).sum(1)[None, :] - 2.0 * (zc @ zp.T)
    M.clamp_(min=0.0)
    if cost == "euclidean":
        M.sqrt_()
    elif cost != "sqeuclidean":
        raise InputError(f"ot_cost={cost!r} is not allowed; use one of {', '.join(map(repr, OT_COSTS))}.")
    return M


def cost_matrix(zc: np.ndarray, zp: np.ndarray, cost: str = "sqeuclidean") -> np.ndarray:
    """Pairwise squared Euclidean (or Euclidean) distances in float64, as ``ot.dist`` but by one matrix product."""
    zc, zp = np.asarray(zc, dtype=np.float64), np.asarray(zp, dtype=np.float64)
    M = (zc * zc).sum(1)[:, None] + (zp * zp).sum(1)[None, :] - 2.0 * (zc @ zp.T)
    np.maximum(M, 0.0, out=M)
    if cost == "euclidean":
        np.sqrt(M, out=M)
    elif cost != "sqeuclidean":
        raise InputError(f"ot_cost={cost!r} is not allowed; use one of {', '.join(map(repr, OT_COSTS))}.")
    return M
