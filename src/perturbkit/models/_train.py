"""One plain training loop: mini-batches densified one at a time, seeded, early stopping, progress bar, history."""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from ._vae import VAE


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
    it is float32 already). The values handed out are the same either way, so training on the sparse and on the
    dense form of the same data gives the same weights.
    """

    def __init__(self, X):
        if isinstance(X, Rows):
            X = X.X
        if isinstance(X, torch.Tensor):
            self.X = X if X.dtype == torch.float32 else X.float()
        elif sp.issparse(X):
            self.X = X.tocsr()
        else:
            self.X = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        self.shape = tuple(self.X.shape)

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
        return torch.from_numpy(self.X[rows].toarray().astype(np.float32, copy=False))

    def chunks(self, size: int):
        """Dense blocks of at most ``size`` consecutive rows, in order."""
        for i in range(0, len(self), size):
            yield self.slice(i, i + size)


#: validation sets up to this many cells are scored in one pass; larger ones chunk by chunk (bounded memory)
VAL_CHUNK = 16384


def _val_loss(module: VAE, rows: Rows, idx: torch.Tensor) -> float:
    """Mean validation loss (posterior means, no noise) of the rows ``idx``: one pass, or the cell-weighted mean
    over chunks of VAL_CHUNK cells for larger sets."""
    if len(idx) <= VAL_CHUNK:
        return module.loss(rows.take(idx), sample=False).loss.item()
    total = 0.0
    for i in range(0, len(idx), VAL_CHUNK):
        part = idx[i:i + VAL_CHUNK]
        total += module.loss(rows.take(part), sample=False).loss.item() * len(part)
    return total / len(idx)


def train_vae(module: VAE, X, cfg: TrainConfig, *, seed: int, progress: bool = True,
              desc: str = "training", callback=None) -> History:
    """Train ``module`` on the rows of ``X`` (a :class:`Rows`, or any matrix it takes) in place and return its
    history.

    All randomness (validation split, shuffling, dropout, reparameterisation noise) is drawn from torch's RNG
    inside ``torch.random.fork_rng`` seeded with ``seed``, so the caller's global RNG state is untouched and
    the same seed and thread count give the same weights.

    ``callback(epoch, history)``, if given, is called after every epoch (``epoch`` counts from 1) with the
    module in eval mode; returning True stops training (``history.stopped_early``), an exception propagates.
    It runs inside its own ``fork_rng``, so a callback never changes the training's random draws.
    """
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    rows = Rows(X)
    n = len(rows)
    hist = History(precision=resolve_precision(cfg.precision))
    cfg = TrainConfig(**{**cfg.to_dict(), "precision": hist.precision})
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        perm = torch.randperm(n)
        n_val = int(round(n * cfg.val_fraction)) if cfg.val_fraction > 0 and n >= 20 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        n_tr = len(tr_idx)
        hist.n_train, hist.n_val = n_tr, n_val
        hist.monitor = "validation loss" if n_val else "training loss"
        opt = _adam(module, cfg)
        bs = max(2, min(cfg.batch_size, n_tr))
        n_batches = n_tr // bs + (1 if n_tr % bs >= 2 else 0)  # a 1-cell batch breaks BN
        best, best_state, bad = math.inf, None, 0
        bar = _bar(cfg.epochs, desc, progress)
        for epoch in range(cfg.epochs):
            module.train()
            order = torch.randperm(n_tr)
            total, seen = 0.0, 0
            for b in range(n_batches):
                if cfg.max_steps is not None and hist.steps >= cfg.max_steps:
                    hist.stop_reason = "max_steps"
                    break
                xb = rows.take(tr_idx[order[b * bs:(b + 1) * bs]])
                with _autocast(cfg.precision):
                    out = module.loss(xb)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip, foreach=True)
                opt.step()
                hist.steps += 1
                total += out.loss.item() * xb.shape[0]
                seen += xb.shape[0]
            if not seen:  # max_steps reached at the end of the previous epoch
                break
            hist.train_loss.append(total / (seen if hist.stop_reason == "max_steps" else n_tr))
            hist.epochs_run = epoch + 1
            monitor = hist.train_loss[-1]
            if n_val:
                module.eval()
                with torch.no_grad():
                    monitor = _val_loss(module, rows, val_idx)
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
                with torch.random.fork_rng(devices=[]):
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
        if best_state is not None:
            module.load_state_dict(best_state)
    if hist.stop_reason in ("epochs", "max_steps"):
        hist.still_falling = still_falling(hist.val_loss if n_val else hist.train_loss)
    module.eval()
    hist.seconds = time.perf_counter() - t0
    return hist


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


def resolve_precision(precision: str) -> str:
    """``"auto"``: ``"bfloat16"`` where :func:`native_bf16`, else ``"float32"``; other values unchanged."""
    if precision == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return precision


def _autocast(precision: str):
    """bfloat16 autocast of the forward pass (weights, gradients and Adam state stay float32), or a no-op."""
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _adam(module: VAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam with the fused CPU kernel where torch has it (>= 2.4): 2-3x faster steps than the per-tensor loop."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    try:
        return torch.optim.Adam(module.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(module.parameters(), **kwargs)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="epoch", leave=False, dynamic_ncols=True)
