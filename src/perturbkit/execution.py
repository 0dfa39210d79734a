"""The execution context: where and how the numbers are computed (device, CPU threads, precision, determinism).

It is resolved once per run (:func:`resolve`: ``"auto"`` -> cuda, then mps, then cpu) and passed down to the
models, the OT step and the metrics; nothing reads a device or a thread count from global state.

- ``device``: ``"auto"``, ``"cpu"``, ``"cuda"`` (the current CUDA device), ``"cuda:N"`` or ``"mps"``.
- ``threads``: torch's CPU threads while a model trains and predicts (None: torch's default). Torch keeps them
  in process state, so :meth:`Execution.activate` sets them on entry and restores the caller's on exit.
- ``precision``: None (each model's own ``precision`` parameter), ``"float32"`` or ``"bfloat16"`` (autocast of
  the training steps; weights, gradients and optimizer state stay float32). Metrics accumulate in float64 on
  every device.
- ``deterministic``: on CUDA, ``torch.use_deterministic_algorithms(True)`` inside :meth:`activate` (slower; an
  operation without a deterministic kernel then raises). On the CPU every kernel perturbkit uses is
  deterministic already.
- ``graphs``: on CUDA, capture the training step in a CUDA graph where its shapes are fixed (None: on for CUDA).

Importing this module loads no torch; :func:`resolve` loads it to look for a device.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = ("float32", "bfloat16")
#: what holds where, for record.json
GUARANTEES = {
    "cpu": "byte-identical: the same inputs, seed, thread count, library versions and CPU give the same bytes",
    "cuda": "seeded: every random draw comes from the CPU and CUDA generators seeded inside one "
            "torch.random.fork_rng; results agree with the CPU's within the tolerance of "
            "benchmarks/results/gpu.md but are not byte-identical, and reruns may differ in the last bits",
    "cuda-deterministic": "seeded and deterministic kernels (torch.use_deterministic_algorithms): reruns on the "
                          "same GPU, driver and library versions give the same bytes",
    "mps": "seeded: every random draw comes from generators seeded inside one torch.random.fork_rng; Metal "
           "kernels are not guaranteed deterministic",
}
#: the operations of perturbkit's CUDA path that are not deterministic unless ``deterministic=True``
NONDETERMINISTIC_CUDA = (
    "cuBLAS matrix products may split the reduction differently from run to run (split-K)",
    "index_add_ / scatter_add_ and the backward pass of indexing accumulate with atomics",
    "the order of float additions inside fused Adam and batch-norm reductions follows the launch grid",
)


@dataclass(frozen=True)
class Execution:
    """A resolved execution context (see the module docstring). Build one with :func:`resolve`."""

    device: str = "cpu"
    threads: int | None = None
    precision: str | None = None
    deterministic: bool = False
    graphs: bool = False

    # ------------------------------------------------------------------------------------------ facts
    @property
    def kind(self) -> str:
        """``"cpu"``, ``"cuda"`` or ``"mps"``."""
        return self.device.split(":", 1)[0]

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    @property
    def pin_memory(self) -> bool:
        """Whether host batches are pinned before they are copied (CUDA only)."""
        return self.is_cuda

    def fork_devices(self) -> list[int]:
        """The CUDA devices whose generators :func:`torch.random.fork_rng` forks (none off CUDA)."""
        return [int(self.device.split(":", 1)[1])] if self.is_cuda else []

    def name(self) -> str:
        """What the device is: the GPU's name, or the CPU's model name."""
        if self.is_cuda:
            import torch

            return torch.cuda.get_device_name(self.torch_device)
        if self.kind == "mps":
            return "Apple Metal (mps)"
        return cpu_name()

    @property
    def guarantee(self) -> str:
        if self.is_cuda:
            return GUARANTEES["cuda-deterministic" if self.deterministic else "cuda"]
        return GUARANTEES[self.kind]

    def precision_for(self, model_precision: str) -> str:
        """The precision a model trains with: this context's, or else the model's own setting."""
        return self.precision if self.precision is not None else model_precision

    def describe(self) -> dict[str, Any]:
        """What record.json says of the execution: the device used, its name, threads, precision and the
        determinism guarantee that holds there."""
        d = {"device": self.device, "device_name": self.name(), "threads": self.threads,
             "precision": self.precision or "each model's own", "deterministic": self.deterministic,
             "cuda_graphs": self.graphs, "guarantee": self.guarantee}
        if self.is_cuda and not self.deterministic:
            d["not_deterministic"] = list(NONDETERMINISTIC_CUDA)
        return d

    # ------------------------------------------------------------------------------------------ use
    @contextlib.contextmanager
    def activate(self, *, torch_used: bool = True):
        """Inside, torch uses this context's CPU threads (and deterministic CUDA kernels when asked); the
        caller's settings are restored on exit. Yields the thread count in use (None when ``torch_used`` is
        False: a model that does not use torch)."""
        if not torch_used:
            yield None
            return
        import torch

        previous = torch.get_num_threads()
        previous_det = torch.are_deterministic_algorithms_enabled()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if self.is_cuda and self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        try:
            yield torch.get_num_threads()
        finally:
            torch.set_num_threads(previous)
            if self.is_cuda and self.deterministic:
                torch.use_deterministic_algorithms(previous_det)

    @contextlib.contextmanager
    def seeded(self, seed: int):
        """torch's CPU generator, and the device's where it has one, forked and seeded with ``seed``: the draws
        inside depend on the seed only, and the caller's generators are untouched."""
        import torch

        with torch.random.fork_rng(devices=self.fork_devices()):
            torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
            if self.kind == "mps":
                torch.mps.manual_seed(seed)
            yield


#: the context of code that is given none: the CPU, torch's default threads
CPU = Execution()


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what :mod:`platform` says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def available() -> list[str]:
    """The devices this machine offers torch, in the order ``"auto"`` tries them (the CPU last)."""
    import torch

    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def check_threads(n, name: str = "threads") -> None:
    """Raise :class:`InputError` unless ``n`` is None (torch's default) or an integer >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"{name} must be >= 1, got {n!r}.", params=(name,))


def check_device(device) -> str:
    """``device`` as written, checked for its form only (no torch): one of :data:`DEVICES`."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device.strip().lower()):
        raise InputError(f"device must be one of {', '.join(map(repr, DEVICES))} (N a GPU index), got "
                         f"{device!r}.", params=("device",))
    return device.strip().lower()


def check(execution, *, default: Execution | None = CPU) -> Execution:
    """``execution`` as given, ``default`` for None (the CPU; ``default=None``: None is refused); anything else
    raises :class:`InputError`."""
    if execution is None and default is not None:
        return default
    if not isinstance(execution, Execution):
        raise InputError(f"execution must be a perturbkit.execution.Execution (from execution.resolve), got "
                         f"{type(execution).__name__}.", params=("execution",))
    return execution


def resolve(device: str | Execution | None = "auto", *, threads: int | None = None, precision: str | None = None,
            deterministic: bool = False, graphs: bool | None = None) -> Execution:
    """The execution context for ``device`` (``"auto"``: the first of cuda, mps, cpu that is there).

    A device that is asked for by name but not there raises :class:`InputError` naming the devices that are.
    An :class:`Execution` is returned as it is.
    """
    if isinstance(device, Execution):
        return device
    device = check_device("auto" if device is None else device)
    check_threads(threads)
    if precision is not None and precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(map(repr, PRECISIONS))} or unset (each model's "
                         f"own), got {precision!r}.", params=("precision",))
    if not isinstance(deterministic, bool):
        raise InputError(f"deterministic must be true or false, got {deterministic!r}.", params=("deterministic",))
    if device == "cpu":
        found = "cpu"
    else:
        here = available()
        if device == "auto":
            found = here[0]
        elif device == "cuda":
            found = next((d for d in here if d.startswith("cuda:")), None)
            if found is not None:
                import torch

                found = f"cuda:{torch.cuda.current_device()}"
        else:
            found = device if device in here else None
        if found is None:
            raise InputError(f"device {device!r} is not available on this machine (torch "
                             f"{_torch_version()} sees: {', '.join(here)}); choose one of those, or 'auto'.",
                             params=("device",))
    is_cuda = found.startswith("cuda")
    return Execution(device=found, threads=threads, precision=precision, deterministic=deterministic,
                     graphs=is_cuda if graphs is None else bool(graphs and is_cuda))


def _torch_version() -> str:
    import torch

    return torch.__version__
