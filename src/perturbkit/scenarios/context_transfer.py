"""``[scenarios.context_transfer]``: hold out each context (cell line, cell type, donor) in turn: train on
every other cell plus the held-out context's control cells, predict every requested perturbation in it from
those controls, with one model fit per context and seed (:func:`perturbkit.split.holdout_context`). With one
perturbation (``data.perturbed`` one label) a task is the loco split of the same context. Adds the screen
tables and figures (:mod:`perturbkit.scenarios._screen`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import InputError, InputWarning
from ._base import Contexts, SplitDef, unique_slugs
from ._screen import ScreenScenario, ScreenTaskConfig, choose_labels, splits_of


@dataclass(frozen=True)
class ContextTransferConfig(ScreenTaskConfig):
    """``[scenarios.context_transfer]``: hold out each context in turn; predict every perturbation in it."""

    TABLE = "context_transfer"
    # "all": every context with >= min_cells control cells and a perturbation it can be scored on
    contexts: Contexts = "all"


class ContextTransfer(ScreenScenario):
    """Hold out one context; predict each perturbation in it."""

    name = "context_transfer"
    Config = ContextTransferConfig

    @classmethod
    def plan(cls, conf: ContextTransferConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        contexts, perts = screen_contexts(conf, adata, cfg.data.spec, f"scenarios.{cls.name}")
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
    chosen = choose_labels(conf.contexts, known, where, "contexts", f"a value of obs[{spec.context_key!r}]")
    with warnings.catch_warnings():  # skipped perturbations: in the task's split record, not per plan
        warnings.simplefilter("ignore", InputWarning)
        splits, why = splits_of(chosen, conf.contexts == "all", where, "contexts",
                                lambda c: holdout_context(adata, spec, c, min_cells=conf.min_cells))
    contexts = list(splits)
    perts = {c: tuple(s.info["perturbations"]) for c, s in splits.items()}
    if not contexts:
        raise InputError(f"{where}.contexts = 'all' finds no context to hold out: "
                         + "; ".join(why.values()) + f" Lower {where}.min_cells or check data.perturbed.")
    if why:
        warnings.warn(f"{where}: context(s) not held out: " + "; ".join(why.values()), InputWarning,
                      stacklevel=2)
    return contexts, perts
