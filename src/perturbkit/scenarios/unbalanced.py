"""``[scenarios.unbalanced]``: the loco tasks on seeded, deliberately unbalanced copies of the data, set
beside the balanced loco run of the same target cells. Adds ``unbalanced.csv`` (scores side by side) and
``unbalanced_degs.csv`` (how the top DEGs change)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, suggest
from ._base import (Aggregation, Contexts, Scenario, SplitDef, Table, choose_contexts, context_counts,
                    unique_slugs)
from .loco import Loco, LocoConfig


@dataclass(frozen=True)
class UnbalancedConfig:
    """``[scenarios.unbalanced]``: the loco tasks on seeded, deliberately unbalanced copies of the data.

    Variant ``keep``: every context keeps ``keep_fraction`` of its perturbed cells. Variant ``thin``: only
    ``thin_contexts`` keep ``thin_fraction`` of theirs (skipped when ``thin_contexts`` is empty). The held-out
    context's perturbed cells (the evaluation target) are kept whole unless ``thin_target``, so the scores sit
    side by side with the balanced loco run on the same target cells.
    """

    contexts: Contexts = "all"  # held-out tasks; each must also be a loco context (the balanced run)
    keep_fraction: float = 0.2
    thin_contexts: tuple[str, ...] = ()
    thin_fraction: float = 0.1
    thin_target: bool = False
    data_seed: int = 0

    def __post_init__(self):
        for key in ("keep_fraction", "thin_fraction"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise InputError(f"scenarios.unbalanced.{key} must be in (0, 1], got {value}.")


DEGS_CAPTION = ("Overlap of the top-100 DEGs (Wilcoxon vs the source control cells) between the balanced and "
                "the unbalanced run, for the real cells and each model's prediction.")


class Unbalanced(Scenario):
    """The loco tasks on unbalanced training data."""

    name = "unbalanced"
    Config = UnbalancedConfig
    TABLES = (
        Table("unbalanced.csv", "Balanced vs unbalanced table", left=4,
              caption="Each model's mean score on the balanced loco run and on each unbalanced variant, for "
                      "the same target cells."),
        Table("unbalanced_degs.csv", "How the top DEGs change", caption=DEGS_CAPTION, left=4,
              headline_only=False, strings=True, level=3),
    )
    FIGURES = {"unbalanced_": "Balanced vs unbalanced"}

    @classmethod
    def plan(cls, conf: UnbalancedConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        spec = cfg.data.spec
        counts = context_counts(adata, spec)
        loco = cfg.scenarios.get(Loco.name)
        min_cells = loco.min_cells if loco is not None else LocoConfig().min_cells
        contexts = choose_contexts(conf.contexts, counts, spec, min_cells, f"scenarios.{cls.name}")
        balanced = [s.context for s in before if s.scenario == Loco.name]
        missing = [c for c in contexts if c not in balanced]
        if missing:
            raise InputError(f"scenarios.unbalanced.contexts {missing} must also be loco contexts: the "
                             "balanced loco run is what the unbalanced scores are set beside. Add them to "
                             "scenarios.loco.contexts (or add a [scenarios.loco] table).")
        for c in conf.thin_contexts:
            if c not in counts.index:
                raise InputError(f"scenarios.unbalanced.thin_contexts: {c!r} is not a value of "
                                 f"obs[{spec.context_key!r}].{suggest(c, counts.index)}")
        keys = unique_slugs(contexts)
        variants = [("keep", {"keep_fraction": conf.keep_fraction, "thin_contexts": "all"})]
        if conf.thin_contexts:
            variants.append(("thin", {"keep_fraction": conf.thin_fraction,
                                      "thin_contexts": list(conf.thin_contexts)}))
        return [SplitDef(cls.name, f"{variant}_{keys[c]}", f"{variant}: {c}", c, variant,
                         {**params, "thin_target": conf.thin_target, "data_seed": conf.data_seed})
                for variant, params in variants for c in contexts]

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        from .. import split

        p = sd.params
        keep = split.unbalanced(adata, spec, p["keep_fraction"],
                                contexts=None if p["thin_contexts"] == "all" else p["thin_contexts"],
                                seed=p["data_seed"], protect=None if p["thin_target"] else sd.context)
        s = split.holdout_cell_type(adata[keep], spec, sd.context)
        info = {**s.info, "scenario": cls.name, "variant": sd.variant, **p,
                "n_cells_kept": int(len(keep)), "n_cells_dropped": int(adata.n_obs - len(keep))}
        return split.Split(train=keep[s.train], source=keep[s.source], target=keep[s.target],
                           name=f"{cls.name}:{sd.name}", info=info)

    @classmethod
    def keeps_degs(cls, cfg, cell, splits: list[SplitDef]) -> bool:
        """Unbalanced cells and their balanced loco twins keep their top DEGs (for unbalanced_degs.csv)."""
        if cell.scenario == cls.name:
            return True
        return cell.scenario == Loco.name and any(s.scenario == cls.name and s.context == cell.split.context
                                                  for s in splits)

    @classmethod
    def tables(cls, agg: Aggregation) -> dict:
        side, degs = unbalanced_tables(agg.scores, agg.results, agg.cells, cls.name)
        return {"unbalanced.csv": side, "unbalanced_degs.csv": degs}

    @classmethod
    def figures(cls, agg: Aggregation, tables: dict, metrics: list[str], save) -> None:
        from .. import pl

        side = tables.get("unbalanced.csv")
        if side is None or side.empty:
            return
        for metric in metrics:
            t = side[(side.metric == metric) & (side.model != "ceiling")]
            if not t.empty:
                save(f"unbalanced_{metric}.png", pl.unbalanced_comparison(
                    t, metric=metric, title=f"{metric}: balanced vs unbalanced training data"))


def unbalanced_tables(scores, results: dict[str, dict], cells: list, scenario: str = "unbalanced"):
    """(scores side by side: balanced loco vs each unbalanced variant; top-DEG overlap, balanced vs not)."""
    import pandas as pd

    from ..models import MODELS

    ub = scores[scores.scenario == scenario]
    if ub.empty:
        return None, None
    bal = scores[scores.scenario == Loco.name]
    keys = ["context", "model", "metric"]
    bal_m = bal.groupby(keys).value.agg(["mean", "count"])
    bal_m = bal_m.rename(columns={"mean": "balanced", "count": "n_bal"})
    ub_m = ub.groupby(["variant", *keys]).value.mean().rename("unbalanced").reset_index()
    side = ub_m.join(bal_m, on=keys)
    side["change"] = side.unbalanced - side.balanced
    side = side[["context", "variant", "model", "metric", "balanced", "unbalanced", "change"]]
    rows = []
    by_key = {(c.scenario, c.split.context, c.model, c.seed): c for c in cells}
    for cell in cells:
        if cell.scenario != scenario or cell.id not in results:
            continue
        if MODELS[results[cell.id]["registry_model"]].NO_CHANGE:
            continue  # the control baseline's "prediction" is the source cells: it has no DEGs of its own
        twin = by_key.get((Loco.name, cell.split.context, cell.model, cell.seed))
        mine, theirs = results[cell.id].get("degs"), results.get(twin.id, {}).get("degs") if twin else None
        if not mine or not theirs:
            continue
        for what, label in (("real", "real cells"), ("pred", cell.model)):
            a, b = theirs[what], mine[what]
            k = deg_k(len(a), results[cell.id].get("n_genes"))
            rows.append({"context": cell.split.context, "variant": cell.split.variant, "model": label,
                         "seed": cell.seed, "k": k, "top_k_overlap": len(set(a[:k]) & set(b[:k])) / max(k, 1),
                         "balanced_top10": " ".join(a[:10]), "unbalanced_top10": " ".join(b[:10]),
                         "new_in_top10": " ".join(g for g in b[:10] if g not in set(a[:10]))})
    degs = pd.DataFrame(rows)
    if not degs.empty:
        degs = degs.drop_duplicates(["context", "variant", "model", "seed"])
    return side, degs


def deg_k(n_listed: int, n_genes: int | None) -> int:
    """How many top DEGs to compare: 100, or a quarter of the genes when there are fewer than 400."""
    n_genes = n_genes or n_listed
    return max(1, min(n_listed, 100, n_genes // 4 if n_genes < 400 else 100))
