"""Aggregation: the finished cells -> ``scores.csv``, ``summary.csv``, the scenarios' tables, ``figures/``,
``run.json``, ``report.html`` and ``ro-crate-metadata.json``."""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import BenchConfig, config_hash, load_config
from .data import Context
from .plan import Cell, control_label, plan
from .rundir import RUN_KIND, SCORE_COLUMNS, SUMMARY_COLUMNS, cell_dir, cell_result, prepare_dir


def collect(out: str | Path, cells: list[Cell], spec=None):
    """(scores of the finished cells, their results, the ids that have not finished).

    A cell written before scores had a ``perturbation`` column (a single-perturbation run) gets it from
    ``spec.perturbed``.
    """
    import pandas as pd

    out = Path(out)
    tables, results, missing = [], {}, []
    for cell in cells:
        res = cell_result(out, cell)
        if res is None:
            missing.append(cell.id)
            continue
        results[cell.id] = res
        table = pd.read_csv(cell_dir(out, cell) / "scores.csv", keep_default_na=False, na_values=[""],
                            dtype={"error": str, "variant": str, "context": str, "split": str,
                                   "perturbation": str})
        if "perturbation" not in table.columns:
            if spec is None or not spec.single:
                raise InputError(f"cell {cell.id}: its scores.csv has no perturbation column; rerun the cell "
                                 f"(delete {str(cell_dir(out, cell))!r}).")
            table["perturbation"] = spec.perturbed
        tables.append(table[list(SCORE_COLUMNS)])
    scores = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(SCORE_COLUMNS))
    for col in ("error", "variant"):
        scores[col] = scores[col].fillna("")
    return scores, results, missing


def tidy_scores(raw, control: str | None, *, screen: bool = False, responsive=None, references=None):
    """Every model's rows once, the ceiling once per (scenario, split, perturbation, seed), then the
    normalised rows (per perturbation) and, in a screen, the rows over perturbations (:mod:`.screen`:
    ``responsive`` from :func:`.screen.responsive_sets`, ``references`` baseline name -> label)."""
    import pandas as pd

    from ..metrics import normalise
    from ..scenarios.screen_rows import per_perturbation, screen_rows

    is_ceiling = raw.model == "ceiling"
    ceiling = raw[is_ceiling].drop_duplicates(["scenario", "split", "perturbation", "seed", "metric"])
    scores = pd.concat([raw[~is_ceiling], ceiling], ignore_index=True)
    if control is not None and (scores.model == control).any():
        norm = normalise(per_perturbation(scores), baseline=control, ceiling="ceiling",
                         by=["scenario", "split", "perturbation", "seed"])
        scores = pd.concat([scores, norm[norm.model != "ceiling"]], ignore_index=True)
    if screen:
        extra = screen_rows(scores, responsive or {}, references or {})
        scores = pd.concat([scores, extra], ignore_index=True)
    return scores[list(SCORE_COLUMNS)].reset_index(drop=True)


def summarise(scores):
    """Mean and 95 % interval over seeds per (scenario, split, model, perturbation, metric), and per scenario
    (split "all").

    The "all" rows average each seed's scores over the scenario's splits first, then take the interval over
    seeds. ``rank`` orders the models (not the ceiling) within (scenario, split, perturbation, metric): 1 =
    best, by the metric's direction (ties share the best rank).
    """
    import pandas as pd

    from ..metrics.stats import t_interval

    rows = []
    hib = scores.groupby("metric")["higher_is_better"].first().to_dict()
    by_split = ["scenario", "split", "model", "perturbation", "metric"]
    for (scen, split, model, pert, metric), g in scores.groupby(by_split, sort=False):
        mean, sd, lo, hi = t_interval(g.value.to_numpy())
        rows.append((scen, split, model, pert, metric, int(g.value.notna().sum()), mean, sd, lo, hi))
    by_scenario = ["scenario", "model", "perturbation", "metric"]
    for (scen, model, pert, metric), g in scores.groupby(by_scenario, sort=False):
        per_seed = g.groupby("seed").value.mean()
        mean, sd, lo, hi = t_interval(per_seed.to_numpy())
        rows.append((scen, "all", model, pert, metric, int(per_seed.notna().sum()), mean, sd, lo, hi))
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS[:-2]))
    summary["higher_is_better"] = summary.metric.map(hib).astype(bool)
    summary["rank"] = math.nan
    models = summary.model != "ceiling"
    for _key, g in summary[models].groupby(["scenario", "split", "perturbation", "metric"], sort=False):
        asc = not bool(g.higher_is_better.iloc[0])
        summary.loc[g.index, "rank"] = g["mean"].rank(ascending=asc, method="min")
    return summary[list(SUMMARY_COLUMNS)]


def aggregate(config: BenchConfig | str | Path, out: str | Path, *, partial: bool = False,
              ctx: Context | None = None, log=print) -> dict[str, Any]:
    """Build ``scores.csv``, ``summary.csv``, the scenario tables, figures, ``run.json``, the report and the
    crate.

    Refuses (InputError) while cells are unfinished, unless ``partial``.
    """
    import pandas as pd

    from .. import _io, report
    from ..scenarios import Aggregation, context_counts
    from .figures import make_figures
    from ..scenarios.screen_rows import reference_labels, responsive_sets

    cfg = config if isinstance(config, BenchConfig) else load_config(config)
    out = prepare_dir(cfg, out)
    ctx = ctx or Context(cfg, out, log=log)
    cells = plan(cfg, ctx.planning_data())
    raw, results, missing = collect(out, cells, ctx.spec)
    if missing and not partial:
        raise InputError(f"{len(missing)} of {len(cells)} cells have not finished (e.g. {missing[0]}); run "
                         "them first (perturbkit bench CONFIG --out DIR, or --cell ID), or pass --partial.")
    if not results:
        raise InputError("no cell has finished yet; nothing to aggregate.")
    shas = {r["data_sha256"] for r in results.values()}
    if len(shas) > 1:
        raise InputError(f"the finished cells were computed from different input data (sha256 "
                         f"{sorted(shas)}); start a new run directory.")
    t0 = time.perf_counter()
    scores = tidy_scores(raw, control_label(cfg), screen=len(ctx.perturbations()) > 1,  # none for a screen of one
                         responsive=responsive_sets(results), references=reference_labels(cfg))
    summary = summarise(scores)
    written = []

    def write_table(name, table):
        if table is not None and not table.empty:
            _io.write_csv(out / name, table)
            written.append(name)

    write_table("scores.csv", scores)
    write_table("summary.csv", summary)
    agg = Aggregation(cfg=cfg, scores=scores, summary=summary, results=results, cells=cells,
                      counts=context_counts(ctx.data(), ctx.spec), spec=ctx.spec)
    tables, merged = {}, {}
    for scenario, _conf in cfg.active():
        tables[scenario.name] = scenario.tables(agg)
        for name, table in tables[scenario.name].items():
            if table is not None and not table.empty:  # several scenarios' rows of one table: one file
                merged.setdefault(name, []).append(table)
    for name, parts in merged.items():
        write_table(name, parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True))
    figures, model_figures = ([], [])
    if cfg.output.figures:
        figures, model_figures = make_figures(cfg, out, ctx, agg, tables, log=log)
    record = run_record(cfg, ctx, cells, results, missing, written, figures, model_figures)
    _io.atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=_io.json_default) + "\n")
    report.write_report(out)
    write_crate(out)
    log(f"aggregated {len(results)} cells into {out}: scores.csv, summary.csv, {len(figures)} figures, "
        f"report.html, ro-crate-metadata.json ({time.perf_counter() - t0:.1f} s)")
    return record


def aggregate_is_current(cfg: BenchConfig, out: Path, cells: list[Cell]) -> bool:
    """Whether run.json already aggregates every cell of this config (a rerun need not redo the figures)."""
    from .._io import read_json

    run = read_json(out / "run.json")
    if not isinstance(run, dict):
        return False
    listed = run.get("cells", {})
    return (run.get("config_sha") == config_hash(cfg.to_dict()) and not run.get("missing")
            and set(listed) == {c.id for c in cells}
            and all(listed[c.id].get("ended") == (cell_result(out, c) or {}).get("ended") for c in cells)
            and all((out / name).exists() for name in ("scores.csv", "summary.csv", "report.html",
                                                        "ro-crate-metadata.json", *run.get("figures", []))))


def run_record(cfg: BenchConfig, ctx: Context, cells, results, missing, tables, figures,
               model_figures=()) -> dict:
    """``run.json``: what was run, on what, with which software, when, and how long each cell took
    (``model_figures``: those of ``figures`` that the models drew themselves)."""
    from .. import record as rec
    from ..config import plain
    from ..data import DATASETS

    src = cfg.data.source
    starts = sorted(r["started"] for r in results.values())
    ends = sorted(r["ended"] for r in results.values())
    adata = ctx.data()
    splits = {}
    notes = {cid: cell_notes(r) for cid, r in results.items()}
    for c in cells:
        if c.id in results and f"{c.scenario}.{c.split.key}" not in splits:
            splits[f"{c.scenario}.{c.split.key}"] = results[c.id]["split_info"]
    ds = DATASETS.get(src)
    return {
        "kind": RUN_KIND,
        "name": cfg.name,
        "description": cfg.description,
        "config": cfg.to_dict(),
        "config_sha": config_hash(cfg.to_dict()),
        "started": starts[0],
        "ended": max(ends[-1], rec.stamp()),
        "aggregated": rec.stamp(),
        "versions": rec.versions(),
        "platform": {**rec.platform_info(), "python": platform.python_implementation()},
        "data": {
            "source": src,
            "dataset": src if ds else None,
            "file": ds.file if ds else Path(src).name,
            **({src: cfg.data.synthetic_params} if cfg.data.synthetic_params is not None else {}),
            **({"filter": plain(cfg.data.filter)} if cfg.data.filter else {}),
            "sha256": ctx.digest,
            "reference": ds.reference if ds else None,
            "doi": ds.doi if ds else None,
            "accession": ds.accession if ds else None,
            "n_cells": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
        },
        "spec": ctx.spec.to_dict(),
        "preprocessing": ctx.preprocessing_info(),
        "models": [{"label": m.label, "model": m.model, "params": effective_params(cfg, m.label)}
                   for m in cfg.models],
        "splits": splits,
        "cells": {c.id: {"scenario": c.scenario, "split": c.split.name, "model": c.model, "seed": c.seed,
                         "status": "finished" if c.id in results else "missing",
                         **({"started": results[c.id]["started"], "ended": results[c.id]["ended"],
                             "timings": results[c.id]["timings"]} if c.id in results else {}),
                         **({"notes": notes[c.id]} if notes.get(c.id) else {})}
                  for c in cells},
        "missing": missing,
        "tables": tables,
        "figures": list(figures),
        "model_figures": list(model_figures),
        "timing_totals_s": timing_totals(cells, results),
    }


#: the note of a data set with fewer genes than the top DEGs: the same in every cell, so not warned per cell
#: (``execute.run_cell``) and not listed among a run's cell notes; each cell's result.json keeps it
N_TOP_NOTE = r"n_top=\d+ is more than"


def cell_notes(result: dict) -> list[str]:
    """What was noted about a finished cell (``result.json``): perturbkit's warnings while the model was fitted
    and predicted (e.g. CellOT's map sending cells outside the training latents), then the evaluation's notes
    (e.g. a prediction scored as given although it holds values no log-normalised cell reaches; every model's
    and a screen's). Once each."""
    import re

    ev = result.get("evaluation") or {}
    notes = ev.get("notes") or {}
    out = [n for v in (notes.values() if isinstance(notes, dict) else [notes]) for n in v]
    every = [*(result.get("warnings") or []), *out, *(ev.get("screen_notes") or [])]
    return [n for n in dict.fromkeys(every) if not re.search(N_TOP_NOTE, n)]


def effective_params(cfg: BenchConfig, label: str) -> dict[str, Any]:
    """Every parameter a model runs with: its defaults, the config's table and training.epochs."""
    from .. import models

    m = cfg.model(label)
    return dict(models.get(m.model, **m.build_params(cfg.training)).params)


def timing_totals(cells, results) -> dict[str, float]:
    """Seconds spent per ``scenario/model`` over the finished cells."""
    tot: dict[str, float] = {}
    for c in cells:
        if c.id in results:
            key = f"{c.scenario}/{c.model}"
            tot[key] = tot.get(key, 0.0) + float(results[c.id]["timings"]["total_s"])
    return {k: round(v, 2) for k, v in tot.items()}


def write_crate(out: str | Path) -> Path:
    """``ro-crate-metadata.json`` of a bench run directory, from its ``run.json``
    (:mod:`perturbkit.record`)."""
    from .. import record

    out = Path(out)
    run = json.loads((out / "run.json").read_text())
    cfg = run["config"]
    scen = ", ".join(k for k, v in cfg["scenarios"].items() if v)
    labels = ", ".join(m["label"] for m in cfg["models"])
    desc = run.get("description") or (
        f"Benchmark of single-cell perturbation response models ({labels}) on {run['data']['file']}: "
        f"scenarios {scen}; seeds {cfg['seeds']}; run with perturbkit {run['versions']['perturbkit']}.")
    # the crate lists every parameter each model ran with (defaults included), not only the config's overrides
    crate_record = {**run, "config": {**cfg, "models": run.get("models", cfg["models"])}}
    path = record.write_crate(out, crate_record, name=f"perturbkit bench: {run['name']}", description=desc,
                              license=cfg["output"]["license"])
    record.link_workflow(out)  # run by workflow/Snakefile: its crate in OUT/workflow is the main entity
    return path


def headline(out: str | Path, metrics=("r2_mean_top100", "pearson_delta", "edistance")) -> str:
    """A short text table of summary.csv: each scenario's mean over splits and seeds, with the interval."""
    import pandas as pd

    from ..scenarios.screen_rows import overall

    s = pd.read_csv(Path(out) / "summary.csv", keep_default_na=False, na_values=[""],
                    dtype={"perturbation": str})
    s = overall(s)
    s = s[s.metric.isin(metrics)].copy()
    s["cell"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo else f"{m:.3f}"
                 for m, lo, hi in zip(s["mean"], s.ci_low, s.ci_high)]
    wide = s.pivot_table(index=["scenario", "model"], columns="metric", values="cell", aggfunc="first",
                         sort=False)
    return wide[[m for m in metrics if m in wide.columns]].to_string()
