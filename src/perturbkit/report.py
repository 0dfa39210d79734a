"""``perturbkit report DIR``: one self-contained ``report.html`` of a bench run directory.

Everything is inside the file: figures as base64 PNG ``data:`` URIs, tables as HTML, the config as run and the
environment (library versions, platform). No script, stylesheet, font or image is fetched, so the report
opens offline and can be mailed or deposited as is.
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
    """A DataFrame as an HTML table; the first ``left`` columns left-aligned; ``best`` rows (bool column) bold."""
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


def _summary_tables(summary, metrics) -> str:
    parts = []
    for scen in dict.fromkeys(summary.scenario):
        sub = summary[(summary.scenario == scen) & (summary.split == "all") & summary.metric.isin(metrics)]
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

        parts.append(f"<h3>{_e(scen)}</h3>" + table_html(pd.DataFrame(rows), left=len(metrics) + 1))
    return "".join(parts)


def write_report(out: str | Path, path: str | Path | None = None) -> Path:
    """Write ``report.html`` (or ``path``) for the bench run directory ``out``; returns its path."""
    import pandas as pd

    from . import _io
    from .errors import InputError

    out = Path(out)
    if not (out / "run.json").exists():
        raise InputError(f"{str(out)!r} is not an aggregated bench run directory (no run.json); run "
                         "`perturbkit bench CONFIG --out DIR` (or --aggregate) first.")
    run = json.loads((out / "run.json").read_text())
    cfg = run["config"]
    path = Path(path) if path is not None else out / "report.html"
    summary = pd.read_csv(out / "summary.csv") if (out / "summary.csv").exists() else None
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
    body.append("<h2>Summary</h2><p class='note'>Mean over seeds of each scenario's splits, with the 95 % "
                "Student-t interval over seeds in brackets and the model's rank (#1 = best by the metric's "
                "direction). <code>_norm</code>: 0 = the no-change control baseline, 1 = the ceiling (one half of "
                "the real cells against the other).</p>")
    if summary is not None:
        body.append(_summary_tables(summary, metrics))
    present = sorted((out / "figures").glob("*.png")) if (out / "figures").exists() else []
    order = {name: i for i, name in enumerate(run.get("figures", []))}  # the order they were made in
    figs = sorted(present, key=lambda f: (order.get(f"figures/{f.name}", len(order)), f.name))
    groups = [("Models x contexts", "heatmap_"), ("Cell-type specificity", "specificity_"),
              ("Balanced vs unbalanced", "unbalanced_"), ("Seed variability", "seeds_"),
              ("Example predictions", ("reg_mean_", "reg_var_", "pca", "umap", "violins")),
              ("scPRAM attention", "attention_")]
    used = set()
    for title, prefix in groups:
        chosen = [f for f in figs if f.name.startswith(prefix) and f not in used]
        if not chosen:
            continue
        used.update(chosen)
        body.append(f"<h2>{_e(title)}</h2>" + "".join(_img(f, f.stem.replace("_", " ")) for f in chosen))
    rest = [f for f in figs if f not in used]
    if rest:
        body.append("<h2>Other figures</h2>" + "".join(_img(f, f.stem) for f in rest))
    if (out / "specificity.csv").exists():
        spec = pd.read_csv(out / "specificity.csv")
        spec = spec[spec.metric.isin(metrics[:2])]
        body.append("<h2>Cell-type specificity table</h2>" + table_html(spec, left=5))
    if (out / "unbalanced.csv").exists():
        ub = pd.read_csv(out / "unbalanced.csv")
        body.append("<h2>Balanced vs unbalanced table</h2>" + table_html(ub[ub.metric.isin(metrics[:2])], left=4))
    if (out / "unbalanced_degs.csv").exists():
        degs = pd.read_csv(out / "unbalanced_degs.csv", keep_default_na=False)
        body.append("<h3>How the top DEGs change</h3><p class='note'>Overlap of the top-100 DEGs (Wilcoxon vs "
                    "the source control cells) between the balanced and the unbalanced run, for the real cells "
                    "and each model's prediction.</p>" + table_html(degs, left=4))
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
    body.append(f"<p class='note'>Preprocessing: {_e('; '.join(run.get('preprocessing', {}).get('steps', [])))}. "
                "Every file of the run is listed with its sha256 in ro-crate-metadata.json.</p>")
    doc = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<title>perturbkit bench: {_e(run['name'])}</title><style>{CSS}</style></head><body>"
           + "\n".join(body) + "</body></html>\n")
    _io.atomic_write_text(path, doc)
    return path
