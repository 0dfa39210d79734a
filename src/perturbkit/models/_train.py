"""One plain training loop: mini-batches densified one at a time, seeded, early stopping, progress bar, history.

The loop runs on the device of an execution context (:mod:`perturbkit.execution`; the CPU by default). On the
CPU it is the plain loop it always was (byte-identical results for the same seed and thread count). On a GPU:

- the whole training matrix lives on the device when it is dense and fits (``RESIDENT_FRACTION`` of the free
  memory), and batches are gathered there; otherwise (sparse or too large) a background thread densifies each
  host batch, pins it (CUDA) and the step copies it without blocking (``non_blocking=True``);
- the training loss is summed on the device (float64; float32 on mps, which has no float64) and read once per
  epoch, the validation loss once per epoch: no ``.item()`` inside the step loop;
- on CUDA with ``execution.graphs``, full batches replay the training step (forward, backward, gradient
  clipping, Adam with ``capturable=True``) from a captured CUDA graph after ``GRAPH_WARMUP`` eager steps on a
  side stream; the last, partial batch of an epoch runs eagerly. ``History.cuda_graphs`` says whether a graph
  was used.
"""

from __future__ import annotations

import contextlib
import copy
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ..execution import check as _execution  # the context given, or the CPU's for None
from ._vae import VAE

#: a dense training matrix moves to a CUDA device when it takes at most this share of the free device memory
RESIDENT_FRACTION = 0.5
#: ... and to an mps device when it takes at most this many bytes (memory shared with the host)
RESIDENT_MPS_BYTES = 2**30
#: host batches the prefetch thread prepares ahead of the step
PREFETCH_DEPTH = 4
#: bytes (as dense float32) of the rows read from disk at once: training batches are read in groups this large
READ_BYTES = 32 << 20
#: groups of batches (or chunks) read from disk ahead of the step
DISK_PREFETCH = 2
#: eager steps (on the capture's side stream) before the training step is captured in a CUDA graph
GRAPH_WARMUP = 3


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-6
    adam_eps: float = 1e-2  # scvi-tools' TrainingPlan default, which the scGen reference trains with
    val_fraction: float = 0.1
    patience: int | None = 25  # epochs without validation improvement before stopping (scGen tutorial: 25)
    min_delta: float = 0.0
    restore_best: bool = True
    grad_clip: float | None = None  # max global L2 norm of the gradients per step (None: no clipping)
    precision: str = "float32"  # "float32" | "bfloat16" (autocast of the training steps) | "auto" (see resolve_precision)
    max_steps: int | None = None  # stop after this many optimizer steps, whatever the epoch (None: epochs decide)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class History:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    epochs_run: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    seconds: float = 0.0
    precision: str = "float32"
    n_train: int = 0
    n_val: int = 0
    steps: int = 0  # optimizer steps taken
    #: why training ended: "epochs" (all ran), "max_steps", "early stopping" (patience ran out) or "callback"
    stop_reason: str = "epochs"
    monitor: str = "training loss"  # the loss early stopping and the still-falling rule watch
    #: True when training ran out of epochs or steps while the monitored loss was still falling (still_falling)
    still_falling: bool = False
    device: str = "cpu"  # the execution context's device the module trained on
    #: where the training batches came from: "host" (the CPU: each batch cut from the matrix in the loop),
    #: "device" (the whole matrix resident on the device), "prefetch" (host batches prepared on a thread) or
    #: "disk" (read from a matrix on disk in groups of sorted reads, on a thread: Rows.batches)
    batches: str = "host"
    cuda_graphs: bool = False  # whether full batches replayed a captured CUDA graph of the training step
    subnormal_zeroed: int = 0  # subnormal weights set to 0 after training (zero_subnormal)

    def to_dict(self) -> dict:
        return asdict(self)


#: the still-falling rule (docs/training.md): the best monitored loss of the last ``FALLING_WINDOW`` share of the
#: epochs (at least 2 epochs) is more than ``FALLING_TOL`` (relative) below the best of the epochs before
FALLING_WINDOW, FALLING_TOL = 0.1, 0.005


def still_falling(losses: list[float]) -> bool:
    """Whether a loss curve that ended without early stopping was still falling at its end (see FALLING_TOL).

    Curves of fewer than 3 epochs cannot be judged and count as not falling.
    """
    w = max(2, math.ceil(FALLING_WINDOW * len(losses)))
    if len(losses) < w + 1:
        return False
    before, last = min(losses[:-w]), min(losses[-w:])
    return bool(last < before - FALLING_TOL * abs(before))


class Rows:
    """The rows (cells) of a cells x genes matrix, handed out as dense float32 tensors a block at a time.

    A sparse matrix stays sparse (CSR): each mini-batch, validation chunk or encoding chunk is densified on its
    own, so no dense copy of the whole matrix is ever made. A dense array or tensor is used as is (no copy when
    it is float32 already). A matrix on disk (:class:`perturbkit.ondisk.DiskMatrix`, e.g. the training cells of
    a split of a file opened with :class:`~perturbkit.ondisk.OnDisk`) stays there: every block is read when it is
    wanted, its rows in sorted order (``DiskMatrix.take``), on a background thread (:meth:`batches`,
    :meth:`chunks`). The values handed out are the same in every form, so training on the sparse, the dense
    and the on-disk form of the same data gives the same weights.
    """

    def __init__(self, X):
        if isinstance(X, Rows):
            X = X.X
        if isinstance(X, torch.Tensor):
            self.X = X if X.dtype == torch.float32 else X.float()
        elif sp.issparse(X):
            self.X = X.tocsr()
        elif on_disk(X):
            self.X = X
        else:
            self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.shape = tuple(self.X.shape)
        self.on_disk = on_disk(self.X)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows ``idx`` (in that order) as a dense float32 tensor."""
        return self._dense(idx if isinstance(self.X, torch.Tensor) else idx.numpy())

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a dense float32 tensor."""
        return self._dense(slice(start, stop))

    def _dense(self, rows) -> torch.Tensor:
        if isinstance(self.X, torch.Tensor):
            return self.X[rows]
        if self.on_disk:
            return _tensor(self.X.rows(rows.start, min(rows.stop, len(self))) if isinstance(rows, slice)
                           else self.X.take(rows))
        return _tensor(self.X[rows])

    def read_rows(self) -> int:
        """Rows per read of an on-disk matrix: ``READ_BYTES`` of them as dense float32."""
        return max(1, READ_BYTES // (4 * max(self.shape[1], 1)))

    def batches(self, parts: list[torch.Tensor], execution=None):
        """The rows of each index tensor of ``parts`` (in order) as dense blocks on the device of ``execution``.

        On disk, the batches are read a group at a time (as many as hold :meth:`read_rows` rows: one sorted read
        of all their rows, then cut in the order asked) on a background thread, ``DISK_PREFETCH`` groups ahead of
        the caller; in memory each is cut when it is wanted (the plain loop), or on the thread off the CPU."""
        ex = _execution(execution)
        if not self.on_disk:
            if ex.kind == "cpu":
                for part in parts:
                    yield self.take(part)
                return
            with contextlib.closing(prefetched(lambda b: self.take(parts[b]), range(len(parts)), ex)) as blocks:
                yield from blocks
            return
        size = max(1, self.read_rows() // max(max((len(p) for p in parts), default=1), 1))

        def group(g: int) -> list[torch.Tensor]:
            some = parts[g * size:(g + 1) * size]
            block = self.X.take(torch.cat(some).numpy())  # the rows of the group, in the order asked
            out, at = [], 0
            for part in some:
                out.append(_tensor(block[at:at + len(part)]))
                at += len(part)
            return out

        with contextlib.closing(prefetched(group, range(-(-len(parts) // size)), ex, depth=DISK_PREFETCH)) as blocks:
            yield from blocks

    def chunks(self, size: int):
        """Dense blocks of at most ``size`` consecutive rows, in order (on disk: read on a background thread while
        the caller works on the previous block)."""
        if self.on_disk:
            yield from self.device_chunks(size)
            return
        for i in range(0, len(self), size):
            yield self.slice(i, i + size)

    def device_chunks(self, size: int, execution=None):
        """:meth:`chunks` on the device of ``execution`` (None: the CPU, where this is :meth:`chunks` itself).

        Off the CPU (and from disk) each block is densified on a background thread (pinned on CUDA) while the
        caller works on the previous one, and copied without blocking."""
        ex = _execution(execution)
        if ex.kind == "cpu" and not self.on_disk:
            yield from self.chunks(size)
            return
        with contextlib.closing(prefetched(lambda i: self.slice(i, i + size), range(0, len(self), size),
                                           ex, depth=DISK_PREFETCH if self.on_disk else PREFETCH_DEPTH)) as blocks:
            yield from blocks


def on_disk(X) -> bool:
    """Whether ``X`` is a matrix left on disk (:class:`perturbkit.ondisk.DiskMatrix`)."""
    from ..ondisk import DiskMatrix

    return isinstance(X, DiskMatrix)


def _tensor(block) -> torch.Tensor:
    """A CSR or numpy block as a dense float32 tensor."""
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return torch.from_numpy(np.ascontiguousarray(block.astype(np.float32, copy=False)))


def wide_float(device) -> torch.dtype:
    """float64 on every torch device that has it; float32 on mps (Metal has no float64)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def accumulator_dtype(execution) -> torch.dtype:
    """The dtype losses are summed in on the device of ``execution`` (:func:`wide_float`)."""
    return wide_float(_execution(execution).torch_device)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Prefetcher:
    """``make(key)`` for each key, computed on a background thread at most ``depth`` ahead of the consumer (and
    pinned when ``pin``). Iterating yields them in order; :meth:`close` stops the thread early."""

    _END = object()

    def __init__(self, make, keys, *, pin: bool, depth: int = PREFETCH_DEPTH):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make, keys, pin), daemon=True,
                                        name="perturbkit-prefetch")
        self._thread.start()

    def _run(self, make, keys, pin: bool) -> None:
        try:
            for key in keys:
                if self._stop.is_set():
                    return
                x = make(key)
                if pin:
                    x = [t.pin_memory() for t in x] if isinstance(x, list) else x.pin_memory()
                self._put(x)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failed(exc))
            return
        self._put(self._END)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def prefetched(make, keys, execution, *, depth: int = PREFETCH_DEPTH):
    """The tensors ``make(key)`` (host tensors, or lists of them, handed out one by one) for each key, on the
    device of ``execution``: made on a background thread at most ``depth`` keys ahead, pinned on CUDA and copied
    with ``non_blocking=True``, so the caller's device work never waits for the host. A generator: close it
    (``contextlib.closing``) when leaving it early."""
    ex = _execution(execution)
    dev = ex.torch_device
    pre = _Prefetcher(make, keys, pin=ex.pin_memory, depth=depth)
    try:
        for made in pre:
            for host in made if isinstance(made, list) else (made,):
                yield host if ex.kind == "cpu" else host.to(dev, non_blocking=ex.pin_memory)
    finally:
        pre.close()


def to_device(x: torch.Tensor, execution) -> torch.Tensor:
    """``x`` on the device of ``execution`` (the same tensor where it is there already)."""
    ex = _execution(execution)
    if ex.kind == "cpu" and x.device.type == "cpu":
        return x
    if ex.pin_memory and x.device.type == "cpu":
        return x.pin_memory().to(ex.torch_device, non_blocking=True)
    return x.to(ex.torch_device)


def resident(rows: Rows, execution) -> torch.Tensor | None:
    """The whole matrix of ``rows`` on the device of ``execution`` when it is dense and fits (see
    ``RESIDENT_FRACTION``, ``RESIDENT_MPS_BYTES``); None on the CPU, for sparse data, or when it does not fit."""
    ex = _execution(execution)
    if ex.kind == "cpu" or not isinstance(rows.X, torch.Tensor):
        return None
    if rows.X.device == ex.torch_device:  # handed over on the device already
        return rows.X
    nbytes = rows.X.numel() * rows.X.element_size()
    if ex.is_cuda:
        free, _ = torch.cuda.mem_get_info(ex.torch_device)
        fits = nbytes <= RESIDENT_FRACTION * free
    else:
        fits = nbytes <= RESIDENT_MPS_BYTES
    return rows.X.to(ex.torch_device) if fits else None


#: validation sets up to this many cells are scored in one pass; larger ones chunk by chunk (bounded memory)
VAL_CHUNK = 16384


def _val_loss(module: VAE, rows: Rows, idx: torch.Tensor, execution=None, *, on_device=None,
              cached: torch.Tensor | None = None) -> float:
    """Mean validation loss (posterior means, no noise) of the rows ``idx``: one pass, or the cell-weighted mean
    over chunks of VAL_CHUNK cells for larger sets (summed on the device, read once).

    ``on_device``: the whole matrix resident on the device (:func:`resident`), else rows are densified on the
    host and copied; ``cached``: the rows ``idx`` already on the device (one pass only)."""
    ex = _execution(execution)

    def block(part):
        if on_device is not None:
            return on_device.index_select(0, to_device(part, ex))
        return to_device(rows.take(part), ex)

    if len(idx) <= VAL_CHUNK:
        return module.loss(cached if cached is not None else block(idx), sample=False).loss.item()
    total = torch.zeros((), dtype=accumulator_dtype(ex), device=ex.torch_device)
    for i in range(0, len(idx), VAL_CHUNK):
        part = idx[i:i + VAL_CHUNK]
        total += module.loss(block(part), sample=False).loss.detach().to(total.dtype) * len(part)
    return total.item() / len(idx)


class _Stepper:
    """One training step of ``module`` on a device batch: eager, or (CUDA with graphs) replayed from a captured
    CUDA graph for full batches. The loss of every step, times its batch size, is added to ``acc`` on the
    device."""

    def __init__(self, module: VAE, opt, cfg: TrainConfig, ex, acc: torch.Tensor, *, graphs: bool, batch: int):
        self.module, self.opt, self.cfg, self.ex, self.acc = module, opt, cfg, ex, acc
        self.graphs, self.batch = graphs, batch
        self.graph = None
        self.static_x = None
        self.warm = 0
        self._keep: list = []
        self.stream = torch.cuda.Stream(device=ex.torch_device) if graphs else None
        self.device_type = ex.torch_device.type
        self.foreach = True if self.device_type in ("cpu", "cuda") else None  # None: torch's choice (mps)

    def _body(self, xb: torch.Tensor, *, zero_grad: bool) -> None:
        with _autocast(self.cfg.precision, self.device_type, cache=not self.graphs):
            out = self.module.loss(xb)
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip, foreach=self.foreach)
        self.opt.step()
        self.acc += out.loss.detach().to(self.acc.dtype) * xb.shape[0]

    def __call__(self, xb: torch.Tensor) -> None:
        if not self.graphs or xb.shape[0] != self.batch:
            self._body(xb, zero_grad=True)
        elif self.graph is not None:
            self.static_x.copy_(xb, non_blocking=True)
            self.graph.replay()
        elif self.warm < GRAPH_WARMUP:  # eager steps on the capture stream (PyTorch's CUDA graphs notes)
            current = torch.cuda.current_stream(self.ex.torch_device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                self._body(xb, zero_grad=True)
            current.wait_stream(self.stream)
            self.warm += 1
        else:
            self._capture(xb)
            self.graph.replay()  # capturing runs nothing: this replay is the step of this batch

    def _capture(self, xb: torch.Tensor) -> None:
        self.static_x = torch.empty_like(xb)
        self.static_x.copy_(xb)
        self.opt.zero_grad(set_to_none=True)  # backward inside the capture allocates .grad in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            self._body(self.static_x, zero_grad=False)
        self.graph = graph
        # the replays write these gradients; keep them referenced while eager steps set .grad anew
        self._keep = [p.grad for p in self.module.parameters()]

    def close(self) -> None:
        self.graph, self.static_x, self._keep = None, None, []


def train_vae(module: VAE, X, cfg: TrainConfig, *, seed: int, progress: bool = True,
              desc: str = "training", callback=None, execution=None) -> History:
    """Train ``module`` on the rows of ``X`` (a :class:`Rows`, or any matrix it takes) in place and return its
    history.

    ``execution``: the :class:`~perturbkit.execution.Execution` to train in (None: the CPU). The module is moved
    to its device; the precision is ``execution.precision_for(cfg.precision)`` resolved by
    :func:`resolve_precision` for that device.

    All randomness (validation split, shuffling, dropout, reparameterisation noise) is drawn from torch's RNGs
    inside ``execution.seeded(seed)`` (one ``torch.random.fork_rng`` over the CPU's and the device's generators),
    so the caller's RNG state is untouched and the same seed and thread count give the same weights on the CPU.
    The split and the shuffles come from the CPU generator on every device.

    ``callback(epoch, history)``, if given, is called after every epoch (``epoch`` counts from 1) with the
    module in eval mode; returning True stops training (``history.stopped_early``), an exception propagates.
    It runs inside its own ``fork_rng``, so a callback never changes the training's random draws.
    """
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    ex = _execution(execution)
    dev = ex.torch_device
    on_cpu = ex.kind == "cpu"
    rows = Rows(X)
    n = len(rows)
    hist = History(precision=resolve_precision(ex.precision_for(cfg.precision), ex), device=ex.device)
    cfg = TrainConfig(**{**cfg.to_dict(), "precision": hist.precision})
    t0 = time.perf_counter()
    module.to(dev)
    stepper = None
    with ex.seeded(seed):
        perm = torch.randperm(n)
        n_val = int(round(n * cfg.val_fraction)) if cfg.val_fraction > 0 and n >= 20 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        n_tr = len(tr_idx)
        hist.n_train, hist.n_val = n_tr, n_val
        hist.monitor = "validation loss" if n_val else "training loss"
        bs = max(2, min(cfg.batch_size, n_tr))
        n_batches = n_tr // bs + (1 if n_tr % bs >= 2 else 0)  # a 1-cell batch breaks BN
        graphs = bool(ex.is_cuda and ex.graphs and n_tr >= bs)
        opt = _adam(module, cfg, capturable=graphs)
        on_device = resident(rows, ex)
        hist.batches = ("disk" if rows.on_disk else "host" if on_cpu else "device" if on_device is not None
                        else "prefetch")
        val_x = None
        if n_val and not on_cpu and n_val <= VAL_CHUNK:  # the validation cells copied once
            val_x = (on_device.index_select(0, to_device(val_idx, ex)) if on_device is not None
                     else to_device(rows.take(val_idx), ex))
        acc = torch.zeros((), dtype=accumulator_dtype(ex), device=dev)
        stepper = _Stepper(module, opt, cfg, ex, acc, graphs=graphs, batch=bs)
        best, best_state, bad = math.inf, None, 0
        bar = _bar(cfg.epochs, desc, progress)
        for epoch in range(cfg.epochs):
            module.train()
            order = torch.randperm(n_tr)
            acc.zero_()
            seen = 0
            with contextlib.closing(_batches(rows, tr_idx, order, bs, n_batches, ex, on_device)) as batches:
                for _ in range(n_batches):
                    if cfg.max_steps is not None and hist.steps >= cfg.max_steps:
                        hist.stop_reason = "max_steps"
                        break
                    xb = next(batches)
                    stepper(xb)
                    hist.steps += 1
                    seen += xb.shape[0]
            if not seen:  # max_steps reached at the end of the previous epoch
                break
            hist.train_loss.append(acc.item() / (seen if hist.stop_reason == "max_steps" else n_tr))
            hist.epochs_run = epoch + 1
            monitor = hist.train_loss[-1]
            if n_val:
                module.eval()
                with torch.no_grad():
                    monitor = _val_loss(module, rows, val_idx, ex, on_device=on_device, cached=val_x)
                hist.val_loss.append(monitor)
            if monitor < best - cfg.min_delta:
                best, bad, hist.best_epoch = monitor, 0, epoch + 1
                if cfg.restore_best:
                    best_state = copy.deepcopy(module.state_dict())
            else:
                bad += 1
            if bar is not None:
                bar.set_postfix(loss=f"{hist.train_loss[-1]:.3f}", val=f"{monitor:.3f}")
                bar.update(1)
            if callback is not None:
                module.eval()
                with torch.random.fork_rng(devices=ex.fork_devices()):
                    if callback(epoch + 1, hist):
                        hist.stopped_early, hist.stop_reason = True, "callback"
                        break
            if cfg.patience is not None and bad >= cfg.patience:
                hist.stopped_early, hist.stop_reason = True, "early stopping"
                break
            if hist.stop_reason == "max_steps":
                break
        if bar is not None:
            bar.close()
        hist.cuda_graphs = stepper.graph is not None
        stepper.close()  # the graph is released inside the fork of the RNGs it advanced
        if best_state is not None:
            module.load_state_dict(best_state)
    hist.subnormal_zeroed = zero_subnormal(module)
    if hist.stop_reason in ("epochs", "max_steps"):
        hist.still_falling = still_falling(hist.val_loss if n_val else hist.train_loss)
    module.eval()
    hist.seconds = time.perf_counter() - t0
    return hist


def zero_subnormal(module) -> int:
    """Set to 0 every parameter of ``module`` whose magnitude is below its dtype's smallest normal number (a
    subnormal, under 1.2e-38 in float32); returns how many.

    Weights that training drives towards 0 pass through the subnormal range, and every CPU product with a
    subnormal operand takes a slow path: after one epoch of 788,330 cells (the 1M-cell scale benchmark) scPRAM
    held 30,029 subnormal weights in its output layer and 1,269 in its first, and decoding took 3.9 s per
    16,384 cells instead of 1.0 s with them set to 0 (docs/ondisk.md). A subnormal weight's products with
    activations of ordinary size are below float32's rounding of any output of ordinary size, so the
    predictions do not change (the README demo prints the same scores).
    """
    n = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.dtype.is_floating_point:
                tiny = (p != 0) & (p.abs() < torch.finfo(p.dtype).tiny)
                k = int(tiny.sum())
                if k:
                    p.masked_fill_(tiny, 0.0)
                    n += k
    return n


def _batches(rows: Rows, tr_idx: torch.Tensor, order: torch.Tensor, bs: int, n_batches: int, ex, on_device):
    """The training batches of one epoch (``tr_idx[order]`` cut in ``bs`` rows) on the device of ``ex``: on the
    CPU from memory the plain loop (each batch cut when the step wants it); gathered on the device when the
    matrix is resident there; else prepared on a background thread (:meth:`Rows.batches`; from disk in groups
    of sorted reads)."""
    epoch_idx = tr_idx[order]
    if on_device is not None:  # one copy of the epoch's indices; batches gathered on the device
        ids = to_device(epoch_idx, ex)
        for b in range(n_batches):
            yield on_device.index_select(0, ids[b * bs:(b + 1) * bs])
        return
    with contextlib.closing(rows.batches([epoch_idx[b * bs:(b + 1) * bs] for b in range(n_batches)], ex)) as blocks:
        yield from blocks


PRECISIONS = ("float32", "bfloat16", "auto")


def native_bf16() -> bool:
    """True on CPUs with bfloat16 matrix instructions (x86 AMX-BF16 or AVX512-BF16), where autocast pays off.

    Elsewhere bfloat16 matmuls are emulated and slower than float32.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, execution=None) -> str:
    """``"auto"``: on CUDA ``"bfloat16"`` where ``torch.cuda.is_bf16_supported()``, on mps ``"float32"``, on the
    CPU ``"bfloat16"`` where :func:`native_bf16`; else ``"float32"``. Other values unchanged."""
    if precision == "auto":
        ex = _execution(execution)
        if ex.is_cuda:
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
        if ex.kind == "mps":
            return "float32"
        return "bfloat16" if native_bf16() else "float32"
    return precision


def _autocast(precision: str, device_type: str = "cpu", *, cache: bool = True):
    """bfloat16 autocast of the forward pass on ``device_type`` (weights, gradients and Adam state stay float32),
    or a no-op. ``cache=False`` inside a CUDA graph capture (autocast's cast cache must not outlive it)."""
    if precision == "bfloat16":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _adam(module: VAE, cfg: TrainConfig, *, capturable: bool = False) -> torch.optim.Adam:
    """Adam with the fused kernel where torch has it (>= 2.4 on the CPU): 2-3x faster steps than the per-tensor
    loop. ``capturable=True`` keeps its step counts on the device, for a step captured in a CUDA graph."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    if capturable:
        kwargs["capturable"] = True
    try:
        return torch.optim.Adam(module.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(module.parameters(), **kwargs)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)
