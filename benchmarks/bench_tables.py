"""The results file of a finished ``perturbkit bench`` run: every table and sentence of
``benchmarks/results/kang_bench.md``, ``kang_converged_bench.md``, ``screens_bench.md`` and ``cellot_iters.md``
comes from here.

It reads the run directory's ``summary.csv``, ``scores.csv`` and ``run.json`` (nothing is recomputed) and writes:

- **the answer**: per scenario and metric, the best model overall, the best of the trained models, the best
  baseline, the trained model's margin over that baseline (its mean minus the baseline's, with the 95 % t-interval
  of the per-seed differences, paired by seed) and whether their two intervals over seeds separate (the test of
  ``perturbkit report``'s verdict lines); and whether the best baseline's interval reaches the split-half
  ceiling's, in which case no model can be shown to beat it on that data;
- per scenario, every model's mean [95 % interval] over seeds of its mean over the scenario's tasks (in a screen,
  of each task's mean over its perturbations) and the verdict lines of ``perturbkit report``;
- per scenario, the per-task means of the headline metrics;
- with ``--versus RUN LABEL``, the trained models' scenario scores beside another run's of the same tasks (the
  converged Kang run beside the 10-epoch one);
- the notes of the cells (``run.json`` ``cells.<id>.notes``: what a fit or an evaluation warned of), if any.

Run::

    .venv/bin/python benchmarks/bench_tables.py runs/kang --command "perturbkit bench configs/kang.toml \\
        --out runs/kang --jobs 2" --out benchmarks/results/kang_bench.md

"Trained models" are the models that are not baselines (``Model.BASELINE``) and not the ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance")


def load(run: Path):
    import pandas as pd

    read = {"keep_default_na": False, "na_values": [""], "dtype": {"perturbation": str, "split": str}}
    return (pd.read_csv(run / "summary.csv", **read), pd.read_csv(run / "scores.csv", **read),
            json.loads((run / "run.json").read_text()))


def per_seed(scores, scenario: str, model: str, metric: str, split: str = "all"):
    """The seed -> value series that a row of summary.csv averages: for split "all", the scenario's per-seed
    means over its tasks; else that task's per-seed scores."""
    from perturbkit.scenarios.screen_rows import MEAN

    rows = scores[(scores.scenario == scenario) & (scores.model == model) & (scores.metric == metric)]
    if split != "all":
        rows = rows[rows.split == split]
    if (rows.perturbation == MEAN).any():  # a screen: each task's mean over its perturbations
        rows = rows[rows.perturbation == MEAN]
    return rows.groupby("seed").value.mean()


def fmt(v: float, lo: float = math.nan, hi: float = math.nan) -> str:
    if math.isnan(v):
        return "–"
    return f"{v:.3f}" if math.isnan(lo) else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def answer_rows(summary, scores, metrics, split: str = "all"):
    """One dict per (scenario, metric) of ``split`` ("all": each scenario as a whole): see the module
    docstring."""
    from perturbkit import report
    from perturbkit.metrics.stats import t_interval
    from perturbkit.scenarios.screen_rows import overall

    top = overall(summary, split)
    bases = report.baseline_names()
    out = []
    for scenario in top.scenario.unique():
        rows = top[top.scenario == scenario]
        for metric in metrics:
            m = rows[rows.metric == metric]
            if m.empty:
                continue
            hib = bool(m.higher_is_better.iloc[0])
            contenders = m[~m.model.isin(report.NOT_COMPARED)].sort_values("mean", ascending=not hib,
                                                                             kind="stable")
            trained = contenders[~contenders.model.isin(bases)]
            base = contenders[contenders.model.isin(bases)]
            if trained.empty or base.empty:
                continue
            t, b = trained.iloc[0], base.iloc[0]
            diff = (per_seed(scores, scenario, t.model, metric, split)
                    - per_seed(scores, scenario, b.model, metric, split))
            d, _, lo, hi = t_interval(diff.dropna().to_numpy())
            verdict = report._compare(t.ci_low, t.ci_high, b.ci_low, b.ci_high, hib)
            out.append({
                "scenario": scenario, "metric": metric, "higher_is_better": hib,
                "best": contenders.iloc[0].model, "trained": t.model, "trained_value": t["mean"],
                "baseline": b.model, "baseline_value": b["mean"], "margin": d, "margin_low": lo,
                "margin_high": hi, "verdict": verdict, "at_ceiling": report.at_ceiling(m, b.model, metric),
                "n_seeds": int(min(t.n_seeds, b.n_seeds)),
            })
    return out


def answer_table(rows) -> list[str]:
    if not rows:
        return ["No baseline and trained model side by side in this run: nothing to answer."]
    say = {"better": "yes: the model is better", "worse": "yes: the baseline is better",
           "overlaps": "no", "no interval": "no interval"}
    lines = ["| scenario | metric | best overall | best trained model | best baseline | trained - baseline "
             "[95 % interval, paired by seed] | intervals separate | baseline reaches the ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "higher" if r["higher_is_better"] else "lower"
        lines.append(
            f"| {r['scenario']} | {r['metric']} ({arrow} is better) | {r['best']} | {r['trained']} "
            f"{r['trained_value']:.3f} | {r['baseline']} {r['baseline_value']:.3f} | "
            f"{fmt(r['margin'], r['margin_low'], r['margin_high'])} | {say[r['verdict']]} | "
            f"{'yes' if r['at_ceiling'] else 'no'} |")
    return lines


def scenario_table(rows, metrics) -> list[str]:
    models = list(dict.fromkeys(rows.model))
    models = [m for m in models if m != "ceiling"] + [m for m in models if m == "ceiling"]
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for model in models:
        cells = []
        for metric in metrics:
            r = rows[(rows.model == model) & (rows.metric == metric)]
            cells.append(fmt(*r.iloc[0][["mean", "ci_low", "ci_high"]]) if len(r) else "–")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def split_table(summary, scenario: str, metric: str) -> list[str]:
    from perturbkit.scenarios.screen_rows import MEAN

    rows = summary[(summary.scenario == scenario) & (summary.split != "all") & (summary.metric == metric)]
    if (rows.perturbation == MEAN).any():
        rows = rows[rows.perturbation == MEAN]
    models = [m for m in dict.fromkeys(rows.model) if m != "ceiling"] + ["ceiling"] * ("ceiling" in set(rows.model))
    lines = ["| task | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for split in dict.fromkeys(rows.split):
        s = rows[rows.split == split]
        vals = []
        for model in models:
            r = s[s.model == model]
            vals.append(fmt(float(r["mean"].iloc[0])) if len(r) else "–")
        lines.append(f"| {split.replace('|', '/')} | " + " | ".join(vals) + " |")
    return lines


def screen_tables(run: Path, summary, scenario: str, metrics) -> list[str]:
    """A screen scenario's extra tables: the scores over the responsive perturbations only (the effect test's,
    BH q < 0.05, per task and seed), the cross-perturbation metrics, and how many perturbations were responsive
    (effects.csv). Nothing for a scenario of one perturbation."""
    import pandas as pd

    from perturbkit.scenarios.screen_rows import ALL, RESPONSIVE

    rows = summary[(summary.scenario == scenario) & (summary.split == "all")]
    if not (rows.perturbation == RESPONSIVE).any():
        return []
    out = ["", "The same over the responsive perturbations only (each task's mean over the perturbations its effect "
           "test flags, BH q < 0.05, in that seed):", ""]
    out += scenario_table(rows[rows.perturbation == RESPONSIVE], list(metrics))
    cross = rows[rows.perturbation == ALL]
    if len(cross):
        out += ["", "Cross-perturbation metrics (docs/metrics.md), mean over seeds [95 % interval]:", ""]
        out += scenario_table(cross, list(dict.fromkeys(cross.metric)))
    if (run / "effects.csv").is_file():
        e = pd.read_csv(run / "effects.csv", keep_default_na=False, na_values=[""], dtype={"perturbation": str})
        e = e[e.scenario == scenario]
        counts = e.groupby(["split", "seed"], sort=False).agg(n=("perturbation", "size"), r=("responsive", "sum"))
        out += ["", "Responsive perturbations per task and seed: " + "; ".join(
            f"{split} s{seed}: {int(c.r)} of {int(c.n)}" for (split, seed), c in counts.iterrows())]
    return out


def versus_table(summary, other, label: str, metrics) -> list[str]:
    """The trained models' scenario scores here beside those of another run of the same tasks (``other``, a
    summary.csv; e.g. the same models at another training length): ``other -> here (change)`` per metric, for
    the (scenario, model) pairs both runs have."""
    from perturbkit import report
    from perturbkit.scenarios.screen_rows import overall

    here, there = overall(summary), overall(other)
    skip = {*report.baseline_names(), *report.NOT_COMPARED}
    lines = [f"| scenario | model | {' | '.join(metrics)} |", "|---" * (len(metrics) + 2) + "|"]
    for scenario in here.scenario.unique():
        for model in dict.fromkeys(here[here.scenario == scenario].model):
            if model in skip:
                continue
            cells = []
            for metric in metrics:
                a = there[(there.scenario == scenario) & (there.model == model) & (there.metric == metric)]
                b = here[(here.scenario == scenario) & (here.model == model) & (here.metric == metric)]
                if a.empty or b.empty:
                    cells.append("–")
                    continue
                x, y = float(a["mean"].iloc[0]), float(b["mean"].iloc[0])
                cells.append(f"{x:.3f} -> {y:.3f} ({y - x:+.3f})")
            if any(c != "–" for c in cells):
                lines.append(f"| {scenario} | {model} | " + " | ".join(cells) + " |")
    return [f"Trained models, {label} -> this run (change), mean over seeds of the mean over the tasks:", "",
            *lines]


def document(run: Path, command: str, title: str, metrics=METRICS, tasks=(), versus=None) -> str:
    from perturbkit import report
    from perturbkit.scenarios.screen_rows import overall

    summary, scores, record = load(run)
    cfg = record["config"]
    cells = record["cells"]
    n_cells = len(cells)
    missing = [c for c, r in cells.items() if r["status"] != "finished"]
    total_h = sum(record.get("timing_totals_s", {}).values()) / 3600
    v = record["versions"]
    out = [f"# {title}", "",
           f"Made by `{command}` (resumable: the same command finishes an interrupted run), then "
           f"`python benchmarks/bench_tables.py {run} --command ...` for this file (every number below is "
           f"read from the run's summary.csv, scores.csv and run.json).", "",
           f"Config `{cfg['name']}` (sha {record['config_sha']}): {cfg['description']}", "",
           f"Run: {n_cells} cells" + (f", **{len(missing)} not finished**" if missing else "")
           + f"; first cell started {record['started']}, aggregated {record['aggregated']}; sum of the cells' "
           f"times {total_h:.1f} h (each cell's total_s; cells that ran side by side count in full; "
           f"training.threads = {cfg['training'].get('threads')} per cell). perturbkit "
           f"{v['perturbkit']}, torch {v['torch']}, Python {v['python']}, {record['platform']['system']}.", "",
           "Intervals: 95 % Student-t intervals over the seeds of each model's per-seed score (a scenario's "
           "score for one seed = its mean over the scenario's tasks; in a screen, over each task's "
           "perturbations first). The baselines are deterministic: their intervals come only from the "
           "seeded steps of the evaluation (the PCA of edistance). `ceiling`: half of the real perturbed "
           "cells scored against the other half.", "",
           "## The answer", "",
           "Per scenario and metric: the best model overall (the ceiling left out), the best trained model and "
           "the best baseline, the trained model's margin over that baseline, and whether their intervals over "
           "seeds separate. Where the best baseline's interval reaches the ceiling's, no model can be shown to "
           "beat it on that data.", ""]
    out += answer_table(answer_rows(summary, scores, metrics))
    for task in tasks:
        out += ["", f"The same for one task, {task}:", ""] + answer_table(answer_rows(summary, scores, metrics, task))
    if versus is not None:
        other_run, label = versus
        out += ["", *versus_table(summary, load(other_run)[0], f"{label} (`{other_run}`)", list(metrics))]
    notes = report.cell_notes(record)
    if notes:
        out += ["", "## Notes from the cells", "",
                "What a cell's fit or evaluation warned of (`run.json`, `cells.<id>.notes`):", ""]
        out += [f"- `{cell}`: {note}" for cell, note in notes]
    top = overall(summary)
    for scenario in top.scenario.unique():
        rows = top[top.scenario == scenario]
        n_tasks = summary[(summary.scenario == scenario) & (summary.split != "all")].split.nunique()
        out += ["", f"## {scenario} ({n_tasks} task{'s' if n_tasks != 1 else ''})", "",
                "Mean over seeds [95 % interval] of the mean over the tasks:", ""]
        out += scenario_table(rows, [m for m in metrics if m in set(rows.metric)])
        out += [""] + [f"- {line}" for line in report.verdict_lines(rows, list(metrics), value="mean")]
        out += screen_tables(run, summary, scenario, metrics)
        for metric in metrics[:1] + metrics[2:3]:
            out += ["", f"`{metric}` per task (mean over seeds):", ""] + split_table(summary, scenario, metric)
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="an aggregated bench run directory")
    p.add_argument("--command", required=True, help="the bench command that made the run (printed)")
    p.add_argument("--title", default=None, help="the document's title")
    p.add_argument("--out", type=Path, default=None, help="write here (default: print)")
    p.add_argument("--task", action="append", default=[], help="also the answer for this task (a split of "
                   "summary.csv, e.g. \"CD4 T cells\"); repeatable")
    p.add_argument("--versus", nargs=2, metavar=("RUN", "LABEL"), default=None,
                   help="also the trained models' scores beside those of another aggregated run of the same "
                   "tasks, e.g. --versus runs/kang \"10 epochs\"")
    a = p.parse_args(argv)
    import pandas as pd

    if not (a.run / "summary.csv").is_file():
        p.error(f"{a.run}: no summary.csv; aggregate the run first (perturbkit bench CONFIG --out {a.run})")
    if missing := sorted(set(a.task) - set(pd.read_csv(a.run / "summary.csv", usecols=["split"]).split)):
        p.error(f"--task {missing[0]!r} is not a task of {a.run} (see the split column of its summary.csv)")
    versus = None
    if a.versus:
        if not (Path(a.versus[0]) / "summary.csv").is_file():
            p.error(f"--versus {a.versus[0]}: no summary.csv; aggregate that run first")
        versus = (Path(a.versus[0]), a.versus[1])
    text = document(a.run, a.command, a.title or f"Benchmark {a.run.name}: measured results", tasks=a.task,
                    versus=versus)
    if a.out is None:
        sys.stdout.write(text)
    else:
        from perturbkit import _io

        _io.atomic_write_text(a.out, text)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
