"""Models: a literal registry of name -> class. Baselines need no torch; VAE models import it on use."""

from ._base import Model
from .baselines import Additive, Control, Linear, MeanShift, PerturbedMean
from .cellot import CellOT
from .scgen import ScGen
from .scpram import ScPRAM

MODELS: dict[str, type[Model]] = {
    "scgen": ScGen,
    "scpram": ScPRAM,
    "cellot": CellOT,
    "control": Control,
    "mean_shift": MeanShift,
    "additive": Additive,
    "perturbed_mean": PerturbedMean,
    "linear": Linear,
}

Model.registry = MODELS  # what Model.load looks saved models up in (the same dict: registering here is enough)

BASELINES = ("control", "mean_shift", "perturbed_mean", "linear")
#: the baselines added where combinations are predicted
COMBINATION_BASELINES = ("additive",)


def get(name: str, **params) -> Model:
    """A new, unfitted model by registry name."""
    from ..errors import InputError, choices_text, suggest

    if name not in MODELS:
        raise InputError(f"model {name!r} is unknown.{suggest(name, MODELS)} Models: {choices_text(MODELS)}.",
                         params=("model",))
    return MODELS[name](**params)


__all__ = ["MODELS", "BASELINES", "COMBINATION_BASELINES", "Model", "ScGen", "ScPRAM", "CellOT", "Additive",
           "Control", "Linear", "MeanShift", "PerturbedMean", "get"]
