"""``[scenarios.context_transfer]``: hold out each context (cell line, cell type, donor) in turn: train on
every other cell plus the held-out context's control cells, predict every requested perturbation in it from
those controls, with one model fit per context and seed (:func:`perturbkit.split.holdout_context`). With one
perturbation (``data.perturbed`` one label) a task is the loco split of the same context. Adds the screen
tables and figures (:mod:`perturbkit.scenarios._screen`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from ..config import check_filter, positive
from ..errors import InputError, InputWarning, choices_text
from ._base import Contexts, SplitDef, choose_contexts, context_counts, unique_slugs
from ._screen import ScreenScenario


@dataclass(frozen=True)
class ContextTransferConfig:
    """``[scenarios.context_transfer]``: hold out each context in turn; predict every perturbation in it."""

    # "all": every context with >= min_cells control cells and a perturbation it can be scored on
    contexts: Contexts = "all"
    min_cells: int = 30  # cells a perturbation needs in the held-out context (fewer: skipped, with why)
    filter: dict[str, Any] = field(default_factory=dict)  # the cells the tasks use, training included

    def __post_init__(self):
        positive("scenarios.context_transfer.min_cells", self.min_cells, 3)
        check_filter("scenarios.context_transfer.filter", self.filter)


class ContextTransfer(ScreenScenario):
    """Hold out one context; predict each perturbation in it."""

    name = "context_transfer"
    Config = ContextTransferConfig

    @classmethod
    def plan(cls, conf: ContextTransferConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        spec = cfg.data.spec
        where = f"scenarios.{cls.name}"
        if spec.single:  # one perturbation: the loco contexts
            counts = context_counts(adata, spec)
            contexts = choose_contexts(conf.contexts, counts, spec, conf.min_cells, where)
            perts = {c: (spec.perturbed,) for c in contexts}
        else:
            contexts, perts = screen_contexts(conf, adata, spec, where)
        keys = unique_slugs(contexts)
        return [SplitDef(cls.name, keys[c], c, c, params={"min_cells": conf.min_cells},
                         perturbations=perts[c]) for c in contexts]

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        from ..split import holdout_context

        return holdout_context(adata, spec, sd.context, min_cells=sd.params["min_cells"])

    @classmethod
    def keeps_prediction(cls, cfg, cell, splits: list[SplitDef]) -> bool:
        """The figure context (``output.figure_split`` when it is one of this scenario's contexts, else the
        first) at the first seed: its top perturbations by effect size are drawn."""
        mine = [s.context for s in splits if s.scenario == cls.name]
        if not mine or cell.scenario != cls.name or cell.seed != cfg.seeds[0]:
            return False
        return cell.split.context == (cfg.output.figure_split if cfg.output.figure_split in mine else mine[0])


def screen_contexts(conf: ContextTransferConfig, adata, spec, where: str):
    """(the contexts to hold out, context -> the perturbations predicted there) for a screen: a context is
    usable when :func:`perturbkit.split.holdout_context` finds something to predict in it."""
    from ..split import holdout_context

    known = sorted(set(adata.obs[spec.context_key].astype(str)))
    chosen = known if conf.contexts == "all" else list(conf.contexts)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise InputError(f"{where}.contexts: {unknown[0]!r} is not a value of obs[{spec.context_key!r}] "
                         f"(after {where}.filter). Values: {choices_text(known)}.")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"{where}.contexts lists a context twice.")
    contexts, perts, why = [], {}, {}
    for c in chosen:
        try:
            with warnings.catch_warnings():  # skipped perturbations: in the task's split record, not per plan
                warnings.simplefilter("ignore", InputWarning)
                s = holdout_context(adata, spec, c, min_cells=conf.min_cells)
        except InputError as exc:
            if conf.contexts != "all":
                raise InputError(f"{where}.contexts: {exc}") from None
            why[c] = str(exc)
            continue
        contexts.append(c)
        perts[c] = tuple(s.info["perturbations"])
    if not contexts:
        raise InputError(f"{where}.contexts = 'all' finds no context to hold out: "
                         + "; ".join(why.values()) + f" Lower {where}.min_cells or check data.perturbed.")
    if why:
        warnings.warn(f"{where}: context(s) not held out: " + "; ".join(why.values()), InputWarning,
                      stacklevel=2)
    return contexts, perts
