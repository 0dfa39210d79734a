"""What the screen scenarios (``context_transfer``, ``unseen_combination``) share: their tables and figures.

Both declare the same tables; each returns its own rows (with a ``scenario`` column) and the harness writes
one file per table name from the rows of every scenario that returns it:

* ``perturbations.csv``: per (scenario, split, perturbation, model, metric) the mean over seeds with the 95 %
  interval and rank (from ``summary.csv``), beside the perturbation's effect test (``responsive``: flagged in
  every seed; ``q_value``: the largest over seeds; split ``all``: over every task holding the perturbation);
* ``screen_summary.csv``: the models against the baseline (``mean_shift``; ``additive`` where combinations are
  predicted): per (scenario, model, metric) the mean over perturbations (``over = all`` or ``responsive``) and
  the cross-perturbation metrics (``over = cross``), mean over seeds and interval, the baseline's mean and the
  difference with its interval over seeds (paired by seed);
* ``effects.csv``: each task's effect test per perturbation, per seed.

Figures: ``perturbations_<scenario>.png`` (perturbations x metrics, a panel per model,
:func:`perturbkit.pl.perturbation_heatmap`) and ``versus_<scenario>_<baseline>.png`` (each model's per-task
``pearson_delta`` against the baseline's, with the diagonal, :func:`perturbkit.pl.versus_baseline`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ._base import Aggregation, Scenario, Table


@dataclass(frozen=True)
class ScreenTaskConfig:
    """The settings every screen scenario's table has (its own come after them)."""

    TABLE: ClassVar[str] = ""
    min_cells: int = 30  # cells a perturbation needs in the task (fewer: skipped, with why)
    filter: dict[str, Any] = field(default_factory=dict)  # the cells the tasks use, training included

    def __post_init__(self):
        from ..config import check_filter, positive

        positive(f"scenarios.{self.TABLE}.min_cells", self.min_cells, 3)
        check_filter(f"scenarios.{self.TABLE}.filter", self.filter)

#: the cross-perturbation metrics of screen_summary.csv (``share_beats_<baseline>`` rows are added to them)
CROSS_METRICS = ("discrimination_score", "pearson_delta_systema")

TABLES = (
    Table("screen_summary.csv", "Screens: models against the baseline, mean over perturbations", left=5,
          headline_only=False,
          caption="Mean over seeds [95 % interval] of each seed's mean over the perturbations of every task "
                  "(over = all), of the responsive ones only (responsive: the energy-distance test flags an "
                  "effect, BH q < 0.05), and the cross-perturbation metrics (cross); the baseline's mean and "
                  "the difference model - baseline with its interval over seeds (paired by seed)."),
    Table("perturbations.csv", "Screens: per perturbation", left=4,
          caption="Mean over seeds [95 % interval] per task and perturbation, with the effect test "
                  "(responsive in every seed; the largest q-value over seeds)."),
    Table("effects.csv", "Screens: effect test per perturbation", left=4, headline_only=False, level=3,
          caption="scPerturb's energy-distance permutation test of each perturbation's real cells against "
                  "the task's control cells (1000 permutations, 50 PCs), Benjamini-Hochberg q-values per "
                  "task."),
)
FIGURES = {"perturbations_": "Screens: perturbation x metric", "versus_": "Screens: against the baseline"}


def choose_labels(chosen, known: list[str], where: str, key: str, what: str) -> list[str]:
    """``known`` for ``chosen = "all"``, else ``chosen`` checked against ``known``: an unknown or repeated label
    raises :class:`InputError` naming ``where.key`` (``what``: the kind of label, for the message)."""
    from ..errors import InputError, choices_text

    if chosen == "all":
        return list(known)
    chosen = list(chosen)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise InputError(f"{where}.{key}: {unknown[0]!r} is not {what} (after {where}.filter); "
                         f"values: {choices_text(known) or 'none'}.")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"{where}.{key} lists a value twice.")
    return chosen


def splits_of(chosen: list[str], every: bool, where: str, key: str, make_split) -> tuple[dict, dict]:
    """(label -> its Split, label -> why it has none) for the labels ``make_split(label)`` can split; a label
    the user listed (``every`` False) that cannot be split raises its InputError, prefixed ``where.key``."""
    from ..errors import InputError

    kept, why = {}, {}
    for label in chosen:
        try:
            kept[label] = make_split(label)
        except InputError as exc:
            if not every:
                raise InputError(f"{where}.{key}: {exc}") from None
            why[label] = str(exc)
    return kept, why


class ScreenScenario(Scenario):
    """Base of the scenarios whose tasks predict many perturbations: their tables and figures."""

    SCREENS = True
    TABLES = TABLES
    FIGURES = FIGURES

    @classmethod
    def tables(cls, agg: Aggregation) -> dict[str, Any]:
        from .screen_rows import effects_table

        effects = effects_table(agg.results)
        effects = effects[effects.scenario == cls.name]
        return {"screen_summary.csv": screen_summary(agg, cls.name),
                "perturbations.csv": perturbation_table(agg.summary, effects, cls.name),
                "effects.csv": effects.reset_index(drop=True)}

    @classmethod
    def figures(cls, agg: Aggregation, tables: dict[str, Any], metrics: list[str], save) -> None:
        from .. import pl
        from .screen_rows import per_perturbation

        s = agg.summary
        mine = per_perturbation(s[(s.scenario == cls.name) & (s.model != "ceiling")])
        if mine.empty:
            return
        overall = mine[mine.split == "all"].rename(columns={"mean": "value"})
        chosen = [m for m in (*metrics, "pearson_delta_systema") if m in set(overall.metric)]
        if chosen:
            save(f"perturbations_{cls.name}.png", pl.perturbation_heatmap(
                overall, metrics=chosen, title=f"{cls.name}: per perturbation, mean over tasks and seeds"))
        tasks = mine[mine.split != "all"].rename(columns={"mean": "value"})
        several = tasks.split.nunique() > 1 and tasks.perturbation.nunique() < len(tasks.drop_duplicates(
            ["split", "perturbation"]))
        if several:  # a perturbation in several tasks: one point per (task, perturbation)
            tasks = tasks.assign(perturbation=tasks.split + ": " + tasks.perturbation)
        for name, label in baseline_labels(agg.cfg, tasks.model).items():
            if (tasks.model != label).any() and (tasks.metric == "pearson_delta").any():
                save(f"versus_{cls.name}_{name}.png", pl.versus_baseline(
                    tasks, metric="pearson_delta", baseline=label,
                    title=f"{cls.name}: pearson_delta per perturbation, mean over seeds"))


def baseline_labels(cfg, present) -> dict[str, str]:
    """:func:`perturbkit.scenarios.screen_rows.reference_labels` of the baselines among the labels ``present``."""
    from .screen_rows import reference_labels

    present = set(present)
    return {name: label for name, label in reference_labels(cfg).items() if label in present}


def perturbation_table(summary, effects, scenario: str):
    """``perturbations.csv`` rows of one scenario (see the module docstring)."""
    from .screen_rows import per_perturbation

    rows = per_perturbation(summary[summary.scenario == scenario]).copy()
    if rows.empty:
        return None
    agg = {"responsive": ("responsive", "all"), "q_value": ("q_value", "max")}
    flags = effects.groupby(["split", "perturbation"]).agg(**agg)
    rows = rows.join(flags, on=["split", "perturbation"])
    every = rows.split == "all"  # over every task that holds the perturbation
    overall = effects.groupby("perturbation").agg(**agg).reindex(rows.perturbation[every])
    rows.loc[every, "responsive"] = overall.responsive.to_numpy()
    rows.loc[every, "q_value"] = overall.q_value.to_numpy()
    cols = ["scenario", "split", "perturbation", "model", "metric", "n_seeds", "mean", "ci_low", "ci_high",
            "rank", "responsive", "q_value"]
    return rows[cols].reset_index(drop=True)


def screen_summary(agg: Aggregation, scenario: str):
    """``screen_summary.csv`` rows of one scenario (see the module docstring)."""
    import numpy as np
    import pandas as pd

    from .screen_rows import ALL, MEAN, RESPONSIVE
    from ..metrics.stats import t_interval

    sc = agg.scores[agg.scores.scenario == scenario]
    if sc.empty:
        return None
    metrics = [*agg.cfg.output.figure_metrics, *(f"{m}_norm" for m in agg.cfg.output.figure_metrics)]
    over = {MEAN: "all", RESPONSIVE: "responsive", ALL: "cross"}
    keep = (sc.perturbation.isin([MEAN, RESPONSIVE]) & sc.metric.isin(metrics)) | (
        (sc.perturbation == ALL) & (sc.metric.isin(CROSS_METRICS) | sc.metric.str.startswith("share_beats_")))
    sc = sc[keep]
    # each seed's mean over the scenario's tasks (as summary.csv's split "all" rows)
    means = sc.groupby(["model", "perturbation", "metric", "seed"], sort=False).value.mean()
    per_seed = {key: g.droplevel([0, 1, 2]) for key, g in means.groupby(level=[0, 1, 2], sort=False)}
    refs = baseline_labels(agg.cfg, sc.model)
    ref_name, ref = next(iter(refs.items()), (None, None))
    rows = []
    for (model, pert, metric), values in per_seed.items():
        mean, _sd, lo, hi = t_interval(values.to_numpy())
        share = metric.startswith("share_beats_")  # already a comparison with the baseline its name gives
        row = {"scenario": scenario, "model": model, "over": over[pert], "metric": metric,
               "n_seeds": int(values.notna().sum()), "mean": mean, "ci_low": lo, "ci_high": hi,
               "baseline": "" if share else (ref_name or ""), "baseline_mean": np.nan, "diff": np.nan,
               "diff_ci_low": np.nan, "diff_ci_high": np.nan}
        base = None if share or ref is None else per_seed.get((ref, pert, metric))
        if base is not None:
            row["baseline_mean"] = t_interval(base.to_numpy())[0]
            if model != ref:
                diff = (values - base).dropna()  # paired by seed
                row["diff"], _sd, row["diff_ci_low"], row["diff_ci_high"] = t_interval(diff.to_numpy())
        rows.append(row)
    table = pd.DataFrame(rows)
    order = {"all": 0, "responsive": 1, "cross": 2}
    models = {m.label: i for i, m in enumerate(agg.cfg.models)}
    table["_o"] = table.over.map(order)
    table["_m"] = table.model.map(models).fillna(len(models))
    table["_k"] = table.metric.map({m: i for i, m in enumerate(dict.fromkeys(table.metric))})
    return table.sort_values(["_o", "_k", "_m"], kind="stable").drop(columns=["_o", "_m", "_k"]).reset_index(
        drop=True)
