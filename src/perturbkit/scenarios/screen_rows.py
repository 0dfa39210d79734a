"""The screen rows of a run's scores: what aggregation adds to the cells' per-perturbation rows once every
model of a task is in, for runs whose ``data.perturbed`` is a list or ``"all"`` (a screen).

Each cell scores every perturbation of its task (:func:`perturbkit.metrics.screen.evaluate_screen`): one row
per (perturbation, metric), and the cross-perturbation rows (``perturbation = "all"``:
``discrimination_score``, ``pearson_delta_systema``). Here, per (scenario, split, seed):

* ``perturbation = "mean"``: per (model, metric) the mean over the task's perturbations, with the Student-t
  95 % interval over them (:func:`perturbkit.stats.t_interval`), ``_norm`` metrics included;
* ``"mean_responsive"``: the same over the perturbations the effect test flagged (``effects`` of the task's
  ceiling cell, :func:`perturbkit.metrics.screen.effect_table`);
* ``"all"`` / ``share_beats_<baseline>``: per model, the share of the task's perturbations where its
  ``pearson_delta`` is strictly above the baseline's (``mean_shift``; ``additive`` where combinations are
  predicted), perturbations where either is undefined left out and named in ``error``.

Single-perturbation runs (``data.perturbed`` one label, e.g. Kang) get none of these rows.
"""

from __future__ import annotations

import math
from typing import Any

MEAN, RESPONSIVE, ALL = "mean", "mean_responsive", "all"
#: the ``perturbation`` values of rows that summarise several perturbations
LABELS = (MEAN, RESPONSIVE, ALL)
#: the metric the ``share_beats_<baseline>`` rows compare
SHARE_METRIC = "pearson_delta"
#: task columns every row of a cell shares
TASK_COLUMNS = ("scenario", "split", "seed", "context", "variant", "n_train", "n_source")


def references() -> tuple[str, ...]:
    """Registry names of the baselines the ``share_beats_<name>`` rows compare with, where they ran."""
    from ..models import COMBINATION_BASELINES

    return ("mean_shift", *COMBINATION_BASELINES)


def reference_labels(cfg) -> dict[str, str]:
    """Baseline registry name -> the label of its plain model (no parameters) in the config, for the
    baselines of :func:`references`."""
    out = {}
    for name in references():
        label = next((m.label for m in cfg.models if m.model == name and not m.params), None)
        if label is not None:
            out[name] = label
    return out


def per_perturbation(scores):
    """The rows of single perturbations (not the summarising ``mean`` / ``mean_responsive`` / ``all``
    rows)."""
    return scores[~scores.perturbation.isin(LABELS)]


def responsive_sets(results: dict[str, dict]) -> dict[tuple[str, str, int], set[str]]:
    """(scenario, split, seed) -> the perturbations its effect test flagged responsive (tasks with a test)."""
    out: dict[tuple[str, str, int], set[str]] = {}
    for res in results.values():
        if res.get("effects") is not None:
            key = (res["scenario"], res["split"], int(res["seed"]))
            out[key] = {str(r["perturbation"]) for r in res["effects"] if r["responsive"]}
    return out


def effects_table(results: dict[str, dict]):
    """Every task's effect test, one row per (scenario, split, seed, perturbation)."""
    import pandas as pd

    rows = [{"scenario": res["scenario"], "split": res["split"], "seed": int(res["seed"]), **r}
            for res in results.values() if res.get("effects") is not None for r in res["effects"]]
    cols = ["scenario", "split", "seed", "perturbation", "n_cells", "statistic", "p_value", "q_value",
            "responsive"]
    return pd.DataFrame(rows, columns=cols)


def screen_rows(scores, responsive: dict[tuple[str, str, int], set[str]], labels: dict[str, str]):
    """The ``mean``, ``mean_responsive`` and ``share_beats_<baseline>`` rows of tidy ``scores`` (those of the
    cells plus the ``_norm`` rows), in the columns of ``scores``.

    ``labels``: baseline registry name -> its model label in the run (:func:`reference_labels`).
    """
    import numpy as np
    import pandas as pd

    from ..metrics.stats import t_interval

    per = per_perturbation(scores)
    rows: list[dict[str, Any]] = []
    keys = ["scenario", "split", "seed", "model", "metric"]
    for (scen, split, seed, model, metric), g in per.groupby(keys, sort=False):
        chosen = {MEAN: g}
        picked = responsive.get((scen, split, int(seed)))
        if picked is not None:
            sub = g[g.perturbation.isin(picked)]
            if not sub.empty:
                chosen[RESPONSIVE] = sub
        for label, part in chosen.items():
            values = part.value.to_numpy(dtype=float)
            mean, _sd, lo, hi = t_interval(values)
            bad = part.perturbation[~np.isfinite(values)].tolist()
            error = ""
            if len(bad) == len(part):
                error = f"undefined for every one of the {len(part)} perturbations"
            elif bad:
                error = (f"mean over {len(part) - len(bad)} of {len(part)} perturbations; undefined for "
                         f"{', '.join(bad)}")
            rows.append({**task(part), "model": model, "metric": metric, "perturbation": label, "value": mean,
                         "ci_low": lo, "ci_high": hi, "higher_is_better": bool(part.higher_is_better.iloc[0]),
                         "error": error, "n_target": int(part.n_target.sum())})
    pd_rows = per[per.metric == SHARE_METRIC]
    for (_scen, _split, _seed), g in pd_rows.groupby(["scenario", "split", "seed"], sort=False):
        wide = g.pivot_table(index="perturbation", columns="model", values="value", aggfunc="first",
                             dropna=False)
        for name in references():
            ref = labels.get(name)
            if ref is None or ref not in wide.columns:
                continue
            for model in dict.fromkeys(g.model):
                if model in (ref, "ceiling"):
                    continue
                own, base = wide[model].to_numpy(dtype=float), wide[ref].to_numpy(dtype=float)
                ok = np.isfinite(own) & np.isfinite(base)
                skipped = wide.index[~ok].tolist()
                value = float((own[ok] > base[ok]).mean()) if ok.any() else math.nan
                error = f"{SHARE_METRIC} undefined for {', '.join(skipped)}; left out" if skipped else ""
                rows.append({**task(g), "model": model, "metric": f"share_beats_{name}", "perturbation": ALL,
                             "value": value, "ci_low": math.nan, "ci_high": math.nan,
                             "higher_is_better": True, "error": error,
                             "n_target": int(g[g.model == model].n_target.sum())})
    return pd.DataFrame(rows, columns=list(scores.columns))


def task(part) -> dict[str, Any]:
    """The task columns of a group of one task's rows."""
    first = part.iloc[0]
    return {c: first[c] for c in TASK_COLUMNS}


def overall(summary, split: str = "all"):
    """Each scenario's headline rows of ``summary.csv``: split ``all`` (or one task's, ``split``) and, in a
    screen scenario, the mean over perturbations (``perturbation = "mean"``); elsewhere its one perturbation."""
    rows = summary[summary.split == split]
    screens = set(rows.scenario[rows.perturbation == MEAN])
    return rows[rows.perturbation.eq(MEAN) | ~rows.scenario.isin(screens)]
