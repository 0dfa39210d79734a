"""``[scenarios.unseen_combination]``: hold out each combination ``A+B`` whose singles were measured: its
cells in every context it occurs are never trained on, its singles and every other requested perturbation
train, and it is predicted from the control cells of its contexts
(:func:`perturbkit.split.holdout_combination`).

Only models that compose an unseen combination from its singles (``COMBINES``: scgen, scpram, additive,
control) get cells here; ``mean_shift`` learns one shift per perturbation it saw and has none for the
combination, so it gets no cells (the ``additive`` baseline, added with ``evaluation.baselines``, is the
reference instead). Adds the screen tables and figures (:mod:`perturbkit.scenarios._screen`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from ..errors import InputError, InputWarning, choices_text
from ._base import SplitDef, unique_slugs
from ._screen import ScreenScenario, ScreenTaskConfig, choose_labels, splits_of


@dataclass(frozen=True)
class UnseenCombinationConfig(ScreenTaskConfig):
    """``[scenarios.unseen_combination]``: hold out each combination; train on the rest, singles included."""

    TABLE = "unseen_combination"
    # "all": every requested combination whose singles have cells and that has >= min_cells cells
    combinations: tuple[str, ...] | Literal["all"] = "all"


class UnseenCombination(ScreenScenario):
    """Hold out one combination of perturbations; predict it from its singles."""

    name = "unseen_combination"
    Config = UnseenCombinationConfig

    @classmethod
    def check(cls, conf: UnseenCombinationConfig, cfg) -> None:
        if cfg.data.spec.single:
            raise InputError(f"scenarios.{cls.name} predicts combinations of perturbations, but "
                             f"data.perturbed = {cfg.data.spec.perturbed!r} is one label; set "
                             "data.perturbed = \"all\" (or a list with the combinations and their singles).")

    @classmethod
    def baselines(cls) -> tuple[str, ...]:
        from ..models import COMBINATION_BASELINES

        return COMBINATION_BASELINES

    @classmethod
    def runs(cls, sd: SplitDef, model_cls, spec) -> bool:
        """Only models that compose an unseen combination from its singles (``COMBINES``)."""
        return bool(model_cls.COMBINES)

    @classmethod
    def plan(cls, conf: UnseenCombinationConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        from ..split import holdout_combination

        spec = cfg.data.spec
        where = f"scenarios.{cls.name}"
        requested = spec.perturbations(adata)
        combos = [p for p in requested if spec.is_combination(p)]
        chosen = choose_labels(conf.combinations, combos, where, "combinations", "a requested combination")
        splits, why = splits_of(chosen, conf.combinations == "all", where, "combinations",
                                lambda c: holdout_combination(adata, spec, c, min_cells=conf.min_cells))
        kept = list(splits)
        contexts = {c: ", ".join(s.info["contexts"]) for c, s in splits.items()}
        if not kept:
            raise InputError(f"{where}: no combination can be held out"
                             + (": " + "; ".join(why.values()) if why else
                                f" (data.perturbed holds none with {spec.combo_delimiter!r})") + ".")
        if why:  # name them; listing one in combinations raises the full reason
            warnings.warn(f"{where}: {len(why)} combination(s) not held out (a single without cells, or "
                          f"fewer than min_cells = {conf.min_cells} cells): {choices_text(why, 20)}. List "
                          f"one in {where}.combinations to see why.", InputWarning, stacklevel=2)
        keys = unique_slugs(kept)
        return [SplitDef(cls.name, keys[c], c, contexts[c], params={"min_cells": conf.min_cells},
                         perturbations=(c,)) for c in kept]

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        from ..split import holdout_combination

        return holdout_combination(adata, spec, sd.perturbations[0], min_cells=sd.params["min_cells"])

    @classmethod
    def keeps_prediction(cls, cfg, cell, splits: list[SplitDef]) -> bool:
        """Every task at the first seed: the combinations with the largest effects are drawn."""
        return cell.scenario == cls.name and cell.seed == cfg.seeds[0]
