"""``figures/``: per scenario a models x splits heatmap of each figure metric (and one dot per seed where the
scenario asks for it), each scenario's own figures, example predictions of the figure split, and the models'
own figures (copied from the cells that drew them)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import BenchConfig
from .data import Context
from .plan import keeps_prediction, splits_of
from .rundir import cell_dir


def make_figures(cfg: BenchConfig, out: Path, ctx: Context, agg, tables: dict[str, dict], *,
                 log=print) -> tuple[list[str], list[str]]:
    """Write ``figures/*.png``; returns (every figure's path relative to ``out``, those the models drew).

    ``agg``: the :class:`~perturbkit.scenarios.Aggregation`; ``tables``: scenario name -> its tables.
    """
    from .. import _io, metrics, pl, runner

    fdir = out / "figures"
    written: list[str] = []

    def save(name: str, fig) -> None:
        runner.write_png(fdir / name, fig, dpi=cfg.output.dpi)
        written.append(f"figures/{name}")

    scores = agg.scores
    hib = {name: m.higher_is_better for name, m in metrics.METRICS.items()}
    fmetrics = [m for m in cfg.output.figure_metrics if m in set(scores.metric)]
    models = [m.label for m in cfg.models]
    for scenario, _conf in cfg.active():
        scen = scenario.name
        sub = scores[(scores.scenario == scen) & (scores.model != "ceiling")]
        if sub.empty:
            continue
        for metric in fmetrics:
            m = sub[sub.metric == metric]
            wide = m.groupby(["model", "split"], sort=False).value.mean().unstack("split")
            wide = wide.reindex([x for x in models if x in wide.index])
            wide = wide[list(dict.fromkeys(m.split))]
            save(f"heatmap_{scen}_{metric}.png",
                 pl.metric_heatmap(wide, metric=metric, higher_is_better=hib[metric],
                                   title=f"{scen}: {metric} (mean over {len(cfg.seeds)} seed(s))"))
        if len(cfg.seeds) > 1 and scenario.SEED_FIGURES:
            for metric in fmetrics[:2]:
                save(f"seeds_{scen}_{metric}.png",
                     pl.seed_variability(sub, metric=metric, title=f"{scen}: {metric}, one dot per seed"))
    for scenario, _conf in cfg.active():
        scenario.figures(agg, tables.get(scenario.name, {}), fmetrics, save)
    example_figures(cfg, out, ctx, agg.cells, save)
    model_figures = []
    for cell in agg.cells:  # figures the models drew while in memory (scPRAM's attention): <name>_<label>.png
        for src in sorted(cell_dir(out, cell).glob("*.png")):
            name = f"{src.stem}_{cell.model}.png"
            _io.atomic_write_with(fdir / name, lambda p, s=src: shutil.copyfile(s, p))
            written.append(f"figures/{name}")
            model_figures.append(f"figures/{name}")
    return written, model_figures


def example_figures(cfg: BenchConfig, out: Path, ctx: Context, cells, save) -> None:
    """Per-gene regressions, PCA / UMAP and DEG violins of the figure split, from the kept predictions."""
    import anndata as ad

    from .. import metrics, pl

    splits = splits_of(cells)
    chosen = [c for c in cells
              if keeps_prediction(cfg, c, splits) and (cell_dir(out, c) / "pred.h5ad").exists()]
    if not chosen:
        return
    s = ctx.split(chosen[0].split)
    _train, source, target = s.subsets(ctx.data())
    top = metrics.top_degs(target, source, 100)
    preds = {c.model: ad.read_h5ad(cell_dir(out, c) / "pred.h5ad") for c in chosen}
    where = f"{chosen[0].split.context} (seed {chosen[0].seed})"
    for label, pred in preds.items():
        save(f"reg_mean_{label}.png",
             pl.reg_mean(target, pred, top_genes=top, title=f"{label}: means, {where}"))
        save(f"reg_var_{label}.png",
             pl.reg_var(target, pred, top_genes=top, title=f"{label}: variances, {where}"))
    groups = {"control": source, "real": target, **{k: v for k, v in preds.items() if k != "control"}}
    n = cfg.output.max_figure_cells
    save("pca.png", pl.cell_embedding(groups, basis="pca", max_cells=n, title=f"PCA: {where}"))
    if cfg.output.umap:
        save("umap.png", pl.cell_embedding(groups, basis="umap", max_cells=n, title=f"UMAP: {where}"))
    save("violins_top_degs.png",
         pl.deg_violins(groups, top[:6], max_cells=n, title=f"top 6 real DEGs: {where}"))
