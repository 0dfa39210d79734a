"""What a scenario is, and the small helpers every scenario shares.

A scenario is a class with class methods (the registry, :data:`perturbkit.scenarios.SCENARIOS`, maps its
``[scenarios.NAME]`` table name to it). The bench harness asks it, in this order:

1. ``Config``: the dataclass of its ``[scenarios.NAME]`` table (checks of single values in ``__post_init__``);
   :meth:`Scenario.check` checks it against the whole config (e.g. cross_donor needs ``data.donor_key``);
2. :meth:`Scenario.plan`: its held-out tasks (:class:`SplitDef`), from the config, the input's obs and the
   tasks of the scenarios planned before it;
3. :meth:`Scenario.split`: the train / source / target indices of one task;
4. :meth:`Scenario.runs`: whether a model gets cells on a task (a model that cannot predict an unseen
   combination gets none there); :meth:`Scenario.baselines`: baselines the scenario adds;
   :meth:`Scenario.keeps_prediction` / :meth:`Scenario.keeps_degs`: whether a cell (of any scenario) keeps its
   prediction for the figures, or its top DEGs for the scenario's tables;
5. :meth:`Scenario.tables` (declared in ``TABLES``, which the report renders) and :meth:`Scenario.figures`:
   what the scenario adds when the cells are aggregated.

A scenario handles one perturbation (``data.perturbed`` one label) unless it sets ``SCREENS = True``: then
its tasks may predict many perturbations each (``SplitDef.perturbations``), and ``filter`` in its table (when
its ``Config`` has one) restricts the cells its tasks use, training included.

Generic code never tests a scenario's name; everything specific to one lives in its own module.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..errors import InputError, choices_text, suggest

#: a scenario's ``contexts`` setting: a list of contexts, or "all" usable ones
Contexts = tuple[str, ...] | Literal["all"]


@dataclass(frozen=True)
class SplitDef:
    """One held-out task of a scenario (its indices are made by the scenario's :meth:`Scenario.split`)."""

    scenario: str
    key: str  # file-safe, unique within the scenario
    name: str  # human-readable: the context, "keep: <context>", "<context> | test 101+107", ...
    context: str
    variant: str = ""  # unbalanced: "keep" / "thin"; cross_donor: the fold
    params: dict[str, Any] = field(default_factory=dict)
    #: the perturbations the task predicts, as planned (empty: the spec's one perturbation)
    perturbations: tuple[str, ...] = ()

    def __hash__(self) -> int:
        return hash((self.scenario, self.key))


@dataclass(frozen=True)
class Table:
    """A table a scenario writes at aggregation (``DIR/<file>``) and how ``report.html`` shows it."""

    file: str  # e.g. "specificity.csv"
    title: str  # the report's heading
    caption: str = ""  # a note under the heading
    left: int = 1  # leading text columns (left-aligned, not formatted as numbers)
    headline_only: bool = True  # the report shows only the rows of the first two figure metrics
    strings: bool = False  # read every value as written (gene names such as "NA" stay text)
    level: int = 2  # heading level in the report


@dataclass
class Aggregation:
    """What a scenario's tables and figures are made from (given to :meth:`Scenario.tables` / ``figures``)."""

    cfg: Any  # the BenchConfig
    scores: Any  # tidy scores of the finished cells (scores.csv)
    summary: Any  # summary.csv
    results: dict[str, dict]  # cell id -> its result.json, finished cells only
    cells: list  # every planned cell (``.id``, ``.scenario``, ``.split``, ``.model``, ``.seed``)
    counts: Any  # contexts x (control, perturbed) cell counts of the preprocessed data
    spec: Any  # the PerturbSpec


class Scenario:
    """Base class of a scenario; subclasses set ``name`` and ``Config`` and implement :meth:`plan` and
    :meth:`split`."""

    name: ClassVar[str] = "scenario"
    #: the ``[scenarios.NAME]`` table's dataclass
    Config: ClassVar[type]
    #: the tables :meth:`tables` writes, in the order the report shows them
    TABLES: ClassVar[tuple[Table, ...]] = ()
    #: figure-name prefix -> the report's section title, for the figures :meth:`figures` draws
    FIGURES: ClassVar[dict[str, str]] = {}
    #: whether the generic figures include one dot per seed (``seeds_<name>_<metric>.png``, with >1 seed)
    SEED_FIGURES: ClassVar[bool] = False
    #: whether the scenario handles a screen (``data.perturbed`` a list or "all"); False: one perturbation
    SCREENS: ClassVar[bool] = False

    @classmethod
    def check(cls, conf, cfg) -> None:
        """Raise :class:`InputError` when the scenario's table ``conf`` does not fit the whole ``cfg``."""

    @classmethod
    def plan(cls, conf, cfg, adata, before: list[SplitDef]) -> list[SplitDef]:
        """The scenario's tasks, in a fixed order (``adata``: only its obs are read; ``before``: the tasks of
        the scenarios planned before this one)."""
        raise NotImplementedError

    @classmethod
    def split(cls, sd: SplitDef, adata, spec):
        """The :class:`perturbkit.split.Split` of the task ``sd``, as indices into ``adata``."""
        raise NotImplementedError

    @classmethod
    def task_data(cls, sd: SplitDef, ctx):
        """The AnnData the task ``sd`` is split from and run on: the run's one preprocessed input
        (``ctx.data()``), unless the scenario makes its own (cross_study: a reference and a shifted query,
        each preprocessed its own way)."""
        return ctx.data()

    @classmethod
    def baselines(cls) -> tuple[str, ...]:
        """Registry names of the baselines the scenario adds to the config's models (with
        ``evaluation.baselines``), beside ``control`` and ``mean_shift``."""
        return ()

    @classmethod
    def runs(cls, sd: SplitDef, model_cls, spec) -> bool:
        """Whether the model class ``model_cls`` gets cells on the task ``sd``: every model does, except that
        a combination baseline (:data:`perturbkit.models.COMBINATION_BASELINES`, which is ``mean_shift`` on
        single perturbations) runs only on tasks that predict a combination."""
        from ..models import COMBINATION_BASELINES

        return model_cls.name not in COMBINATION_BASELINES or any(spec.is_combination(p)
                                                                   for p in sd.perturbations)

    @classmethod
    def cells_filter(cls, conf) -> dict[str, Any]:
        """The ``filter`` of the scenario's table (obs column -> value(s)): the cells its tasks use; {}:
        all."""
        return dict(getattr(conf, "filter", None) or {})

    @classmethod
    def keeps_prediction(cls, cfg, cell, splits: list[SplitDef]) -> bool:
        """Whether ``cell`` (of any scenario) keeps its prediction for the example figures."""
        return False

    @classmethod
    def keeps_degs(cls, cfg, cell, splits: list[SplitDef]) -> bool:
        """Whether ``cell`` (of any scenario) records its real and predicted top DEGs in its result."""
        return False

    @classmethod
    def tables(cls, agg: Aggregation) -> dict[str, Any]:
        """file name (one of ``TABLES``) -> DataFrame (None or empty: not written)."""
        return {}

    @classmethod
    def figures(cls, agg: Aggregation, tables: dict[str, Any], metrics: list[str], save) -> None:
        """Draw the scenario's own figures: ``save(file_name, figure)`` for each (``metrics``: the figure
        metrics that were scored; ``tables``: what :meth:`tables` returned)."""


# ================================================================================================ helpers


def slug(text: str) -> str:
    """A lower-case, file-safe form of a label: runs of other characters become '_'."""
    out = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return out or "x"


def unique_slugs(names: list[str]) -> dict[str, str]:
    """name -> its :func:`slug`, made unique with a checksum where two names share one."""
    slugs = {n: slug(n) for n in names}
    seen: dict[str, int] = {}
    for s in slugs.values():
        seen[s] = seen.get(s, 0) + 1
    return {n: (s if seen[s] == 1 else f"{s}_{zlib.crc32(n.encode()):08x}") for n, s in slugs.items()}


def filtered_rows(adata, where: dict[str, Any], what: str):
    """Row positions (sorted integers) of the cells of ``adata`` whose obs match ``where``
    (:func:`perturbkit.data.apply_filter`; ``what`` names the setting in its errors)."""
    import anndata as ad
    import numpy as np

    from ..data import apply_filter

    col = "__perturbkit_row"
    obs = adata.obs.assign(**{col: np.arange(adata.n_obs)})
    return np.sort(apply_filter(ad.AnnData(obs=obs), where, what).obs[col].to_numpy())


def context_counts(adata, spec, donors=None) -> Any:
    """A contexts x conditions table of cell counts (control and perturbed columns); with ``donors``, of the
    cells of those donors (``spec.donor_key``) only, every context of ``adata`` still a row (0 where they have
    none)."""
    import pandas as pd

    obs = adata.obs
    ctx, cond = obs[spec.context_key].astype(str), obs[spec.condition_key].astype(str)
    if donors is None:
        tab = pd.crosstab(ctx, cond)
    else:
        mine = obs[spec.donor_key].astype(str).isin([str(d) for d in donors]).to_numpy()
        tab = pd.crosstab(ctx[mine], cond[mine]).reindex(sorted(set(ctx)), fill_value=0)
    for label in (spec.control, spec.perturbed):
        if label not in tab.columns:
            tab[label] = 0
    return tab[[spec.control, spec.perturbed]]


def require_donor_key(cfg, scenario: str, why: str) -> None:
    """Raise :class:`InputError` unless the config names the donor column (``data.donor_key``) that
    ``scenario`` deals into groups (``why``: the end of the message, what the donors are for)."""
    if cfg.data.spec.donor_key is None:
        raise InputError(f"scenarios.{scenario} needs data.donor_key: the obs column of the donor{why}")


def choose_contexts(chosen, counts, spec, min_cells: int, where: str) -> list[str]:
    """The contexts a scenario runs on: ``chosen`` (checked against the data) or, for ``"all"``, every context
    with at least ``min_cells`` cells of each condition (``where``: the table's path, for messages)."""
    usable = [c for c in counts.index
              if min(counts.loc[c, spec.control], counts.loc[c, spec.perturbed]) >= min_cells]
    if chosen == "all":
        if not usable:
            raise InputError(f"{where}.contexts = 'all' finds no context with >= {min_cells} cells of each "
                             f"condition; lower {where}.min_cells or list contexts.")
        return usable
    known = list(counts.index)
    for c in chosen:
        if c not in known:
            raise InputError(f"{where}.contexts: {c!r} is not a value of obs[{spec.context_key!r}]."
                             f"{suggest(c, known)} Values: {choices_text(known)}.")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"{where}.contexts lists a context twice.")
    return list(chosen)
