"""``[scenarios.loco]``: leave one context out: train on every cell except the held-out context's perturbed
cells, predict them from its control cells (the scGen / scPRAM protocol). Adds ``specificity.csv``:
per-context scores beside each context's cell counts."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import positive
from ._base import (Aggregation, Contexts, Scenario, SplitDef, Table, choose_contexts, context_counts,
                    unique_slugs)


@dataclass(frozen=True)
class LocoConfig:
    """``[scenarios.loco]``: leave one context out: train on everything but its perturbed cells."""

    contexts: Contexts = "all"  # "all": every context with >= min_cells cells of each condition
    min_cells: int = 30

    def __post_init__(self):
        positive("scenarios.loco.min_cells", self.min_cells, 3)


class Loco(Scenario):
    """Leave one context out."""

    name = "loco"
    Config = LocoConfig
    TABLES = (Table("specificity.csv", "Cell-type specificity table", left=5,
                    caption="Each held-out context's scores beside its cell counts: do methods favour "
                            "abundant types?"),)
    FIGURES = {"specificity_": "Cell-type specificity"}
    SEED_FIGURES = True

    @classmethod
    def plan(cls, conf: LocoConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        spec = cfg.data.spec
        contexts = choose_contexts(conf.contexts, context_counts(adata, spec), spec, conf.min_cells,
                                   f"scenarios.{cls.name}")
        keys = unique_slugs(contexts)
        return [SplitDef(cls.name, keys[c], c, c) for c in contexts]

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        from ..split import holdout_cell_type

        return holdout_cell_type(adata, spec, sd.context)

    @classmethod
    def keeps_prediction(cls, cfg, cell, splits: list[SplitDef]) -> bool:
        """The figure split (``output.figure_split``, default: the first loco context) at the first seed."""
        mine = [s for s in splits if s.scenario == cls.name]
        if not mine or cell.scenario != cls.name or cell.seed != cfg.seeds[0]:
            return False
        return cell.split.context == (cfg.output.figure_split or mine[0].context)

    @classmethod
    def tables(cls, agg: Aggregation) -> dict:
        return {"specificity.csv": specificity_table(agg.summary, agg.counts, agg.spec, cls.name)}

    @classmethod
    def figures(cls, agg: Aggregation, tables: dict, metrics: list[str], save) -> None:
        from .. import pl

        table = tables.get("specificity.csv")
        if table is None or table.empty:
            return
        n_cells = agg.counts.sum(axis=1)
        for metric in metrics:
            t = table[(table.metric == metric) & (table.model != "ceiling")]
            if not t.empty:
                save(f"specificity_{metric}.png", pl.context_scores(t, n_cells, metric=metric))


def specificity_table(summary, counts, spec, scenario: str = "loco"):
    """Per-context (loco) scores with each context's cell counts: do methods favour abundant types?"""
    loco = summary[(summary.scenario == scenario) & (summary.split != "all")].copy()
    loco = loco.rename(columns={"split": "context"})
    loco["n_control"] = loco.context.map(counts[spec.control]).astype("Int64")
    loco["n_perturbed"] = loco.context.map(counts[spec.perturbed]).astype("Int64")
    cols = ["context", "n_control", "n_perturbed", "model", "metric", "n_seeds", "mean", "ci_low", "ci_high",
            "rank"]
    return loco[cols].sort_values(["metric", "n_perturbed", "model"], ascending=[True, False, True])
