"""perturbkit: predict single-cell perturbation responses and benchmark them honestly.

``import perturbkit as pk`` is fast: torch, scanpy, POT and optuna load only when used.
"""

from importlib import import_module

from ._version import __version__

_SUBMODULES = ("data", "ondisk", "split", "models", "metrics", "pl", "errors", "pipeline", "tune", "record", "bench",
               "report")


def __getattr__(name):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name == "PerturbSpec":
        from .data import PerturbSpec

        return PerturbSpec
    raise AttributeError(f"module 'perturbkit' has no attribute {name!r}")


def __dir__():
    return sorted([*_SUBMODULES, "PerturbSpec", "__version__"])
