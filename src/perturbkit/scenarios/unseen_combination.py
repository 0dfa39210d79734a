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
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import check_filter, positive
from ..errors import InputError, InputWarning, choices_text
from ._base import SplitDef, unique_slugs
from ._screen import ScreenScenario


@dataclass(frozen=True)
class UnseenCombinationConfig:
    """``[scenarios.unseen_combination]``: hold out each combination; train on the rest, singles included."""

    # "all": every requested combination whose singles have cells and that has >= min_cells cells
    combinations: tuple[str, ...] | Literal["all"] = "all"
    min_cells: int = 30
    filter: dict[str, Any] = field(default_factory=dict)  # the cells the tasks use, training included

    def __post_init__(self):
        positive("scenarios.unseen_combination.min_cells", self.min_cells, 3)
        check_filter("scenarios.unseen_combination.filter", self.filter)


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
        chosen = combos if conf.combinations == "all" else list(conf.combinations)
        if conf.combinations != "all":
            unknown = [c for c in chosen if c not in combos]
            if unknown:
                raise InputError(f"{where}.combinations: {unknown[0]!r} is not a requested combination "
                                 f"(after {where}.filter); combinations: {choices_text(combos) or 'none'}.")
            if len(set(chosen)) != len(chosen):
                raise InputError(f"{where}.combinations lists a combination twice.")
        kept, why, contexts = [], {}, {}
        for combo in chosen:
            try:
                s = holdout_combination(adata, spec, combo, min_cells=conf.min_cells)
            except InputError as exc:
                if conf.combinations != "all":
                    raise InputError(f"{where}.combinations: {exc}") from None
                why[combo] = str(exc)
                continue
            kept.append(combo)
            contexts[combo] = ", ".join(s.info["contexts"])
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
