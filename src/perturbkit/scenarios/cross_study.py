"""``[scenarios.cross_study]``: reference -> query transfer on a pseudo-study, with and without integration.

The input's donors are dealt (seeded) into a reference and a query; the query's raw counts get a technical
shift (:func:`perturbkit.transfer.pseudo_study`: binomial thinning to a lower depth, gene-wise log-normal
capture efficiencies, a share of its genes missing and the rest in another order). Each task is one query
context under one integration method: the models train on every reference cell, preprocessed its own way
(:func:`perturbkit.transfer.prepare`: the query normalised per cell and restricted to the reference's genes,
integrated or not), and predict the query's control cells of the context; its perturbed cells are the truth.
Runs without internet (docs/cross_study.md). Adds ``cross_study.csv``: per integration and model the mean over
seeds (each seed's mean over contexts) with its interval, the change from no integration, and the batch
mixing of each integration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..config import positive
from ..errors import InputError, choices_text
from ._base import Contexts, Scenario, SplitDef, Table, context_counts, require_donor_key, unique_slugs

#: prepared reference + query per (input, pseudo-study, integration), within one process
_PREPARED: dict[str, Any] = {}


@dataclass(frozen=True)
class CrossStudyConfig:
    """``[scenarios.cross_study]``: a pseudo-study from the input; predict its query with each integration."""

    contexts: Contexts = "all"  # query contexts to predict ("all": >= min_cells cells of each condition there)
    integrations: tuple[str, ...] = ("none", "combat")  # perturbkit.transfer.INTEGRATIONS
    query_donors: int = 0  # donors in the query (0: half, rounded down)
    donor_seed: int = 0  # which donors form the query
    depth: float = 0.5  # the query keeps this share of its counts on average (binomial thinning)
    capture_sd: float = 0.5  # sd of log gene-wise capture efficiencies (log-normal, median 1)
    missing_genes: float = 0.1  # share of genes the query does not measure (the rest reordered)
    shift_seed: int = 0  # the draws of the shift
    min_shared_genes: float = 0.5
    min_cells: int = 30  # per condition of a context in the query

    def __post_init__(self):
        from ..transfer import Shift, check_integration

        positive("scenarios.cross_study.min_cells", self.min_cells, 3)
        if not self.integrations or len(set(self.integrations)) != len(self.integrations):
            raise InputError("scenarios.cross_study.integrations must list each method once, e.g. "
                             "[\"none\", \"combat\"].")
        for m in self.integrations:
            try:
                check_integration(m)
            except InputError as exc:
                raise InputError(f"scenarios.cross_study.integrations: {exc}") from None
        Shift(self.depth, self.capture_sd, self.missing_genes).check("scenarios.cross_study")
        if self.query_donors < 0:
            raise InputError(f"scenarios.cross_study.query_donors must be >= 0 (0: half), got {self.query_donors}.")

    def shift(self):
        from ..transfer import Shift

        return Shift(self.depth, self.capture_sd, self.missing_genes)


class CrossStudy(Scenario):
    """Predict another (pseudo-)study's contexts, with and without integration."""

    name = "cross_study"
    Config = CrossStudyConfig
    TABLES = (Table("cross_study.csv", "Cross-study transfer: integration vs none",
                    "per integration and model: the mean over seeds of each seed's mean over the query contexts, "
                    "its 95 % Student-t interval, the change from no integration (paired by seed) and the batch "
                    "mixing (kNN batch entropy, 0-1) of reference and query in the space the models see",
                    left=2),)

    @classmethod
    def check(cls, conf: CrossStudyConfig, cfg) -> None:
        require_donor_key(cfg, cls.name, ", whose values are dealt into the reference and the query.")

    @classmethod
    def donors(cls, conf: CrossStudyConfig, adata, spec) -> tuple[list[str], list[str]]:
        from ..transfer import split_donors

        donors = adata.obs[spec.donor_key].astype(str).unique()
        return split_donors(donors, conf.query_donors or None, seed=conf.donor_seed)

    @classmethod
    def plan(cls, conf: CrossStudyConfig, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        spec = cfg.data.spec
        ref_donors, query_donors = cls.donors(conf, adata, spec)
        counts = {c: int(n) for c, n in context_counts(adata, spec, donors=query_donors).min(axis=1).items()}
        if conf.contexts == "all":
            contexts = [c for c, n in counts.items() if n >= conf.min_cells]
        else:
            contexts = list(conf.contexts)
            for c in contexts:
                if c not in counts:
                    raise InputError(f"scenarios.cross_study.contexts: {c!r} is not a value of "
                                     f"obs[{spec.context_key!r}]. Values: {choices_text(counts)}.")
                if counts[c] < conf.min_cells:
                    raise InputError(f"scenarios.cross_study.contexts: {c!r} has {counts[c]} cells of a condition "
                                     f"in the query donors {query_donors}, fewer than min_cells = "
                                     f"{conf.min_cells}; drop it or lower scenarios.cross_study.min_cells.")
        if not contexts:
            raise InputError(f"scenarios.cross_study: no context has >= {conf.min_cells} cells of each condition "
                             f"in the query donors {query_donors}; lower scenarios.cross_study.min_cells.")
        keys = unique_slugs(contexts)
        params = {"reference_donors": ref_donors, "query_donors": query_donors, "min_cells": conf.min_cells}
        # a context's integrations next to each other: a partial run compares them for the first contexts
        return [SplitDef(cls.name, f"{m}_{keys[c]}", f"{c} | {m}", c, m, {**params, "integration": m})
                for c in contexts for m in conf.integrations]

    @classmethod
    def task_data(cls, sd: SplitDef, ctx):
        """The reference and the shifted query of the pseudo-study, preprocessed and integrated by
        ``sd.variant`` (:func:`perturbkit.transfer.prepare`), made once per process."""
        from .. import transfer

        conf = ctx.cfg.scenarios[cls.name]
        key = json.dumps({"digest": ctx.digest, "conf": _plain(conf), "pp": _plain(ctx.cfg.preprocessing),
                          "integration": sd.variant, "donors": sd.params["query_donors"]}, sort_keys=True)
        if key not in _PREPARED:
            raw, _digest, _desc = ctx.cfg.data.load()
            spec = ctx.spec
            ref, query, info = transfer.pseudo_study(raw, spec.donor_key, sd.params["query_donors"], conf.shift(),
                                                     seed=conf.shift_seed)
            t = transfer.prepare(ref, query, spec, ctx.cfg.preprocessing, integrate=sd.variant,
                                 min_shared=conf.min_shared_genes, seed=conf.shift_seed, log=ctx.log)
            t.adata.uns["perturbkit_cross_study"] = json.dumps(
                {"pseudo_study": info, "integration": t.info["integration"],
                 "genes": {**t.info["genes"], "dropped": len(t.info["genes"]["dropped"])}},
                default=float)
            if len(_PREPARED) >= len(conf.integrations):  # one per integration at a time
                _PREPARED.clear()
            _PREPARED[key] = t.adata
        return _PREPARED[key]

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        from ..split import Split
        from ..transfer import query_split

        s = query_split(adata, spec, sd.context, min_cells=sd.params["min_cells"])
        if s is None or not s.info["scored"]:
            raise InputError(f"scenarios.cross_study: the query has too few cells of {sd.context!r} after the "
                             "shift; lower scenarios.cross_study.min_cells.")
        made = json.loads(adata.uns.get("perturbkit_cross_study", "{}"))
        return Split(train=s.train, source=s.source, target=s.target, name=f"cross_study:{sd.name}",
                     info={**s.info, "scenario": cls.name, "integration": sd.variant,
                           "reference_donors": sd.params["reference_donors"],
                           "query_donors": sd.params["query_donors"], **made})

    @classmethod
    def tables(cls, agg) -> dict[str, Any]:
        return {"cross_study.csv": cross_study_table(agg.scores, agg.results, cls.name)}


def _plain(obj):
    from ..config import plain

    return plain(obj)


def cross_study_table(scores, results: dict[str, dict], scenario: str = "cross_study"):
    """Per (integration, model, metric): mean over seeds of each seed's mean over contexts, its Student-t
    interval, the paired change from ``none`` and the integration's batch mixing (from the cells' split
    info)."""
    import math

    import pandas as pd

    from ..metrics.stats import t_interval

    mine = scores[(scores.scenario == scenario) & (scores.model != "ceiling")]
    if mine.empty:
        return None
    per_seed = mine.groupby(["variant", "model", "metric", "seed"], sort=False).value.mean()
    lookup = per_seed.sort_index()
    mixing = {}
    for res in results.values():
        info = res.get("split_info", {})
        if res.get("scenario") == scenario and "integration" in info and isinstance(info["integration"], dict):
            mixing[res["variant"]] = info["integration"].get("mixing_after", {}).get("score", math.nan)
    rows = []
    for (variant, model, metric), s in per_seed.groupby(level=["variant", "model", "metric"], sort=False):
        s = s.droplevel(["variant", "model", "metric"])
        mean, sd, lo, hi = t_interval(s.to_numpy())
        change = math.nan
        if variant != "none" and ("none", model, metric) in lookup.droplevel("seed").index:
            base = lookup.loc[("none", model, metric)]
            both = s.index.intersection(base.index)
            if len(both):
                change = float((s.loc[both] - base.loc[both]).mean())
        rows.append({"integration": variant, "model": model, "metric": metric, "n_seeds": int(s.notna().sum()),
                     "mean": mean, "ci_low": lo, "ci_high": hi, "change_vs_none": change,
                     "mixing": mixing.get(variant, math.nan)})
    return pd.DataFrame(rows)
