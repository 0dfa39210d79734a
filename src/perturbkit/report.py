"""``perturbkit report DIR``: one self-contained ``report.html`` of a bench run directory.

Everything is inside the file: figures as base64 PNG ``data:`` URIs, tables as HTML, the config as run and the
environment (library versions, platform). No script, stylesheet, font or image is fetched, so the report
opens offline and can be mailed or deposited as is.

The report reads only the run directory and the scenario registry (:data:`perturbkit.scenarios.SCENARIOS`):
each scenario's ``TABLES`` (file, title, caption) and ``FIGURES`` (figure-name prefix, section title) say what
it shows; the figures the models drew themselves are those ``run.json`` lists as ``model_figures``.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2.2rem; }
table { border-collapse: collapse; font-size: .82rem; margin: .6rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .2rem .45rem; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
td.best { font-weight: bold; background: #eef7ee; }
figure { display: inline-block; margin: .4rem; vertical-align: top; max-width: 48%; }
figure.wide { max-width: 98%; }
figure img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: .8rem; color: #555; }
pre { background: #f7f7f7; padding: .8rem; overflow-x: auto; font-size: .8rem; }
.note { color: #555; font-size: .85rem; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    if f != f:
        return "–"
    return f"{f:.3g}" if abs(f) < 1000 else f"{f:.0f}"


def table_html(df, *, left: int = 1, best: str | None = None) -> str:
    """A DataFrame as an HTML table; the first ``left`` columns left-aligned; ``best`` rows (bool column)
    bold."""
    cols = [c for c in df.columns if c != best]
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(c)}</th>' for i, c in enumerate(cols))
    rows = []
    for _, row in df.iterrows():
        mark = best is not None and bool(row[best])
        cells = "".join(
            f'<td class="{"l" if i < left else ("best" if mark else "")}">'
            f'{_e(row[c]) if i < left else _fmt(row[c])}</td>' for i, c in enumerate(cols))
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _png_width(data: bytes) -> int:
    return int.from_bytes(data[16:20], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _img(path: Path, caption: str) -> str:
    raw = path.read_bytes()
    wide = ' class="wide"' if _png_width(raw) > 900 else ""
    data = base64.b64encode(raw).decode()
    return (f'<figure{wide}><img src="data:image/png;base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


#: models that are not contenders: the ceiling (real cells)
NOT_COMPARED = ("ceiling",)
CEILING = "ceiling"


def baseline_names() -> set[str]:
    """The registry names of the baselines (the models whose class says ``BASELINE``)."""
    from .models import MODELS

    return {name for name, cls in MODELS.items() if cls.BASELINE}


def best_baselines(rows, value: str = "value") -> dict[str, str]:
    """Per metric, the baseline with the best ``value`` in ``rows`` (the first listed on a tie)."""
    names = baseline_names()
    base = rows[rows.model.isin(names)]
    best = {}
    for metric, sub in base.groupby("metric", sort=False):
        sub = sub[sub[value] == sub[value]]  # NaN: not a candidate
        if not sub.empty:
            hib = bool(sub.higher_is_better.iloc[0])
            best[metric] = sub.sort_values(value, ascending=not hib, kind="stable").iloc[0]["model"]
    return best


def _compare(lo, hi, blo, bhi, higher_is_better) -> str:
    if any(v != v for v in (lo, hi, blo, bhi)):  # NaN
        return "no interval"
    if lo > bhi or hi < blo:
        return "better" if (lo > bhi) == bool(higher_is_better) else "worse"
    return "overlaps"


def versus_baseline(rows, baseline: str | None = None, value: str = "value"):
    """Each model's score against a baseline's, per metric, from their intervals.

    ``rows``: one row per (model, metric) with columns ``model, metric, ci_low, ci_high, higher_is_better`` and
    ``value`` (a ``scores.csv``, or a bench summary with ``value="mean"``). ``baseline``: a model label, or None
    (default) for the best baseline of each metric (:func:`best_baselines`; then the baselines themselves are
    not compared). Returns ``model, metric, value, baseline, verdict`` for every compared model (never the
    ceiling), ``verdict`` being ``"better"`` (the intervals do not overlap and the model's lies on the better
    side, whatever the metric's direction), ``"worse"``, ``"overlaps"``, or ``"no interval"`` (either interval
    missing, e.g. ``n_boot = 0`` or one seed). Metrics without the baseline are left out.
    """
    import pandas as pd

    columns = ["model", "metric", "value", "baseline", "verdict"]
    if baseline is None:
        chosen, skip = best_baselines(rows, value), baseline_names()
    else:
        chosen, skip = {m: baseline for m in set(rows.metric)}, {baseline}
    out = []
    for r in rows[~rows.model.isin((*skip, *NOT_COMPARED))].itertuples(index=False):
        if r.metric not in chosen:
            continue
        b = rows[(rows.model == chosen[r.metric]) & (rows.metric == r.metric)]
        if b.empty:
            continue
        b = b.iloc[0]
        out.append({"model": r.model, "metric": r.metric, "value": getattr(r, value),
                    "baseline": chosen[r.metric],
                    "verdict": _compare(r.ci_low, r.ci_high, b.ci_low, b.ci_high, r.higher_is_better)})
    return pd.DataFrame(out, columns=columns)


def at_ceiling(rows, model: str, metric: str) -> bool:
    """Whether ``model``'s interval of ``metric`` reaches the ceiling's (both present): it overlaps it, or lies
    wholly on its better side (a small or nearly unperturbed target, where half of the real cells against the
    other half is a noisier estimate than the baseline; e.g. ``control``'s ``r2_mean_all`` in the screens
    benchmark's context transfer). On such data no model can be shown to do better than ``model``."""
    mine = rows[(rows.model == model) & (rows.metric == metric)]
    top = rows[(rows.model == CEILING) & (rows.metric == metric)]
    if mine.empty or top.empty:
        return False
    a, c = mine.iloc[0], top.iloc[0]
    return _compare(a.ci_low, a.ci_high, c.ci_low, c.ci_high, a.higher_is_better) in ("overlaps", "better")


def verdict_lines(rows, metrics, baseline: str | None = None, value: str = "value") -> list[str]:
    """One plain sentence per metric: the best model (by ``value``, the ceiling left out), the best baseline
    (or ``baseline``), which models beat it with non-overlapping intervals (and by how much), or that none
    does; and, where the baseline's interval reaches the ceiling's (:func:`at_ceiling`), that no model can be
    shown to beat it on this data."""
    vs = versus_baseline(rows, baseline, value)
    bests = best_baselines(rows, value) if baseline is None else {m: baseline for m in metrics}
    lines = []
    for metric in metrics:
        mine = rows[(rows.metric == metric) & ~rows.model.isin(NOT_COMPARED)]
        base = bests.get(metric)
        if mine.empty or base is None or base not in set(mine.model):
            continue
        hib = bool(mine.higher_is_better.iloc[0])
        best = mine.sort_values(value, ascending=not hib, kind="stable").iloc[0]
        base_value = float(mine[mine.model == base][value].iloc[0])
        which = f"best baseline {base} ({base_value:.3f})" if baseline is None else base
        mv = vs[vs.metric == metric]
        winners = mv[mv.verdict == "better"]
        if mv.empty:
            beat = "only baselines were scored"
        elif len(winners):
            by = ", ".join(f"{w.model} (by {abs(float(w.value) - base_value):.3f})"
                           for w in winners.itertuples(index=False))
            beat = f"{by} {'beats' if len(winners) == 1 else 'beat'} it"
        elif mv.verdict.eq("no interval").all():
            beat = "no intervals to compare with it"
        else:
            beat = "no model beats it"
        line = (f"{metric} ({'higher' if hib else 'lower'} is better): best {best['model']} "
                f"({best[value]:.3f}); {which}: {beat}")
        if at_ceiling(rows, base, metric):
            line += f"; {base} reaches the ceiling's interval: no model can be shown to beat it on this data"
        lines.append(line)
    return lines


def cell_notes(run: dict) -> list[tuple[str, str]]:
    """(cell id, note) for every note of a run's cells (``run.json`` ``cells.<id>.notes``), in cell order."""
    return [(cid, note) for cid, c in run["cells"].items() for note in c.get("notes", [])]


def _summary_tables(summary, metrics) -> str:
    from .scenarios.screen_rows import overall

    parts = []
    headline = overall(summary)
    for scen in dict.fromkeys(summary.scenario):
        sub = headline[(headline.scenario == scen) & headline.metric.isin(metrics)]
        if sub.empty:
            continue
        rows = []
        for model in dict.fromkeys(sub.model):
            row = {"model": model, **{m: "–" for m in metrics}}
            for metric in metrics:
                r = sub[(sub.model == model) & (sub.metric == metric)]
                if r.empty:
                    continue
                r = r.iloc[0]
                ci = "" if r.ci_low != r.ci_low else f" [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]"
                rank = "" if r["rank"] != r["rank"] else f" (#{int(r['rank'])})"
                row[metric] = f"{_fmt(r['mean'])}{ci}{rank}"
            rows.append(row)
        import pandas as pd

        lines = verdict_lines(sub, [m for m in metrics if not m.endswith("_norm")], value="mean")
        verdicts = "".join(f"<li>{_e(line)}</li>" for line in lines)
        parts.append(f"<h3>{_e(scen)}</h3>" + table_html(pd.DataFrame(rows), left=len(metrics) + 1)
                     + (f'<ul class="note">{verdicts}</ul>' if verdicts else ""))
    return "".join(parts)


def _figure_section(title: str, figures: list[Path], *, captions: bool = True) -> str:
    if not figures:
        return ""
    images = (_img(f, f.stem.replace("_", " ") if captions else f.stem) for f in figures)
    return f"<h2>{_e(title)}</h2>" + "".join(images)


def scenario_table(out: Path, table, metrics: list[str]) -> str:
    """A scenario's table (a :class:`~perturbkit.scenarios.Table`) as HTML, '' when the run has none; with
    ``table.headline_only`` only the rows of ``metrics``."""
    import pandas as pd

    path = out / table.file
    if not path.exists():
        return ""
    df = pd.read_csv(path, keep_default_na=False) if table.strings else pd.read_csv(path)
    if table.headline_only and "metric" in df.columns:
        df = df[df.metric.isin(metrics)]
    note = f"<p class='note'>{_e(table.caption)}</p>" if table.caption else ""
    return f"<h{table.level}>{_e(table.title)}</h{table.level}>{note}" + table_html(df, left=table.left)


def write_report(out: str | Path, path: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``path``) for the bench run directory ``out``; returns its path."""
    import pandas as pd

    from . import _io
    from .errors import InputError
    from .scenarios import SCENARIOS

    out = Path(out)
    if not (out / "run.json").exists():
        raise InputError(f"{str(out)!r} is not an aggregated bench run directory (no run.json); run "
                         "`perturbkit bench CONFIG --out DIR` (or --aggregate) first.")
    run = json.loads((out / "run.json").read_text())
    cfg = run["config"]
    path = Path(path) if path is not None else out / "report.html"
    summary = (pd.read_csv(out / "summary.csv", keep_default_na=False, na_values=[""],
                           dtype={"perturbation": str}) if (out / "summary.csv").exists() else None)
    metrics = [m for m in cfg["output"]["figure_metrics"]]
    if summary is not None:
        metrics = [m for m in metrics if m in set(summary.metric)]
        metrics += [f"{m}_norm" for m in metrics if f"{m}_norm" in set(summary.metric)][:2]
    n_done = sum(1 for c in run["cells"].values() if c["status"] == "finished")
    d = run["data"]
    body = [f"<h1>perturbkit bench: {_e(run['name'])}</h1>"]
    if run.get("description"):
        body.append(f"<p>{_e(run['description'])}</p>")
    body.append(
        "<table>" + "".join(f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>' for k, v in [
            ("data", f"{d['file']} ({d['n_cells']} cells x {d['n_genes']} genes after preprocessing)"),
            ("data sha256", d["sha256"]),
            ("reference", d.get("reference") or "–"),
            ("models", ", ".join(m["label"] for m in cfg["models"])),
            ("scenarios", ", ".join(k for k, v in cfg["scenarios"].items() if v)),
            ("seeds", ", ".join(map(str, cfg["seeds"]))),
            ("cells", f"{n_done} of {len(run['cells'])} finished"),
            ("started / ended", f"{run['started']} / {run['ended']}"),
            ("perturbkit", run["versions"].get("perturbkit")),
        ]) + "</table>")
    if run.get("missing"):
        body.append(f"<p class='note'><b>Partial run:</b> {len(run['missing'])} cells have not finished; the "
                    "tables below hold the finished ones only.</p>")
    body.append("<h2>Summary</h2><p class='note'>Mean over seeds of each scenario's splits (in a screen: of "
                "each split's mean over its perturbations), with the 95 % "
                "Student-t interval over seeds in brackets and the model's rank (#1 = best by the metric's "
                "direction). <code>_norm</code>: 0 = the no-change control baseline, 1 = the ceiling (one "
                "half of the real cells against the other).</p>")
    if summary is not None:
        body.append(_summary_tables(summary, metrics))
    present = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    order = {name: i for i, name in enumerate(run.get("figures", []))}  # the order they were made in
    figs = sorted(present, key=lambda f: (order.get(f"figures/{f.name}", len(order)), f.name))
    model_figs = set(run.get("model_figures", []))
    declared = dict.fromkeys((title, prefix) for s in SCENARIOS.values()
                             for prefix, title in s.FIGURES.items())
    groups = [("Models x contexts", "heatmap_"), *declared,
              ("Seed variability", "seeds_"),
              ("Example predictions", ("reg_mean_", "reg_var_", "pca", "umap", "violins"))]
    used = set()
    for title, prefix in groups:
        chosen = [f for f in figs if f.name.startswith(prefix) and f not in used
                  and f"figures/{f.name}" not in model_figs]
        used.update(chosen)
        body.append(_figure_section(title, chosen))
    chosen = [f for f in figs if f"figures/{f.name}" in model_figs]
    used.update(chosen)
    body.append(_figure_section("Model figures", chosen))
    body.append(_figure_section("Other figures", [f for f in figs if f not in used], captions=False))
    shown = set()  # a table several scenarios declare (the screen tables) is one file, shown once
    for scenario in SCENARIOS.values():
        for table in scenario.TABLES:
            if table.file not in shown:
                shown.add(table.file)
                body.append(scenario_table(out, table, metrics[:2]))
    noted = cell_notes(run)
    if noted:
        body.append("<h2>Notes from the cells</h2><p class='note'>perturbkit's warnings while a cell's model was "
                    "fitted and predicted, and what the evaluation noted about its prediction; each such cell is "
                    "scored as given and is in the tables above.</p>"
                    + table_html(pd.DataFrame(noted, columns=["cell", "note"]), left=2))
    timing = run.get("timing_totals_s", {})
    if timing:
        body.append("<h2>Time spent</h2>" + table_html(pd.DataFrame(
            [{"scenario / model": k, "seconds": v} for k, v in timing.items()]), left=1))
    body.append("<h2>Config as run</h2>")
    toml = out / "config.toml"
    body.append(f"<pre>{_e(toml.read_text() if toml.exists() else json.dumps(cfg, indent=2))}</pre>")
    body.append("<h2>Environment</h2>" + "<table>" + "".join(
        f'<tr><th class="l">{_e(k)}</th><td class="l">{_e(v)}</td></tr>'
        for k, v in [*run["versions"].items(), *run.get("platform", {}).items()]) + "</table>")
    steps = "; ".join(run.get("preprocessing", {}).get("steps", []))
    body.append(f"<p class='note'>Preprocessing: {_e(steps)}. "
                "Every file of the run is listed with its sha256 in ro-crate-metadata.json.</p>")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>perturbkit bench: {_e(run['name'])}</title><style>{CSS}</style></head><body>"
           + "\n".join(part for part in body if part) + "</body></html>\n")
    _io.atomic_write_text(path, doc)
    return path
