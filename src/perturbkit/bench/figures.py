"""``figures/``: per scenario a models x splits heatmap of each figure metric (and one dot per seed where the
scenario asks for it), each scenario's own figures, example predictions of the figure split, and the models'
own figures (copied from the cells that drew them)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import BenchConfig

#: how many perturbations of each screen scenario get example regressions (the largest effects first)
TOP_PERTURBATIONS = 3
from .data import Context
from .plan import keeps_prediction, splits_of
from .rundir import cell_dir


def make_figures(cfg: BenchConfig, out: Path, ctx: Context, agg, tables: dict[str, dict], *,
                 log=print) -> tuple[list[str], list[str]]:
    """Write ``figures/*.png``; returns (every figure's path relative to ``out``, those the models drew).

    ``agg``: the :class:`~perturbkit.scenarios.Aggregation`; ``tables``: scenario name -> its tables.
    """
    from .. import _io, metrics, pl
    from ..scenarios.screen_rows import per_perturbation

    fdir = out / "figures"
    written: list[str] = []

    def save(name: str, fig) -> None:
        _io.write_png(fdir / name, fig, dpi=cfg.output.dpi)
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
        for metric in fmetrics:  # a screen task's cell: the mean over its perturbations and the seeds
            m = per_perturbation(sub[sub.metric == metric])
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
    if len(ctx.perturbations()) == 1:
        example_figures(cfg, out, ctx, agg.cells, save)
    else:
        screen_examples(cfg, out, ctx, agg, save)
    model_figures = []
    drawn = [(cell, src) for cell in agg.cells for src in sorted(cell_dir(out, cell).glob("*.png"))]
    count: dict[tuple[str, str], int] = {}
    for cell, src in drawn:
        count[(src.stem, cell.model)] = count.get((src.stem, cell.model), 0) + 1
    # figures the models drew while in memory (scPRAM's attention): <name>_<label>.png, or
    # <name>_<scenario>_<split key>_<label>.png where one model drew it in several cells
    for cell, src in drawn:
        name = (f"{src.stem}_{cell.model}.png" if count[(src.stem, cell.model)] == 1
                else f"{src.stem}_{cell.scenario}_{cell.split.key}_{cell.model}.png")
        _io.atomic_write_with(fdir / name, lambda p, s=src: shutil.copyfile(s, p))
        written.append(f"figures/{name}")
        model_figures.append(f"figures/{name}")
    return written, model_figures


def screen_examples(cfg: BenchConfig, out: Path, ctx: Context, agg, save) -> None:
    """Per screen scenario, per-gene mean regressions (a panel per model) of the :data:`TOP_PERTURBATIONS`
    perturbations with the largest effect (energy distance to the controls) among the tasks whose cells kept
    their predictions: ``reg_mean_<scenario>_<perturbation>.png``."""
    import anndata as ad
    from matplotlib.figure import Figure

    from .. import metrics, pl
    from ..scenarios import slug

    splits = splits_of(agg.cells)
    kept = [c for c in agg.cells
            if keeps_prediction(cfg, c, splits) and (cell_dir(out, c) / "pred.h5ad").exists()]
    key = ctx.spec.condition_key
    for scenario, _conf in cfg.active():
        mine = [c for c in kept if c.scenario == scenario.name]
        effects = {}
        for c in mine:  # the effect test of each kept task, from its ceiling cell at the kept seed
            for res in agg.results.values():
                if (res["scenario"], res["split"], res["seed"]) == (c.scenario, c.split.name, c.seed) \
                        and res.get("effects"):
                    effects.update({(c.split, r["perturbation"]): r["statistic"] for r in res["effects"]})
        top = sorted(effects, key=lambda k: -effects[k])[:TOP_PERTURBATIONS]
        for sd, p in top:
            cells = [c for c in mine if c.split == sd and c.model != "control"]
            if not cells:
                continue
            s = ctx.split(sd)
            _train, source, target = s.subsets(ctx.data())
            target = target[target.obs[key].astype(str) == p].copy()
            top_genes = metrics.top_degs(target, source, 100)
            fig = Figure(figsize=(4.6 * len(cells), 4.6), layout="constrained")
            axes = fig.subplots(1, len(cells), squeeze=False)[0]
            for ax, c in zip(axes, cells):
                pred = ad.read_h5ad(cell_dir(out, c) / "pred.h5ad")
                pred = pred[pred.obs[key].astype(str) == p].copy()
                pl.reg_mean(target, pred, top_genes=top_genes, ax=ax, title=f"{c.model}")
            where = "" if sd.name == p else f" in {sd.context}"
            fig.suptitle(f"{scenario.name}: {p}{where}, mean per gene (seed {cells[0].seed})", fontsize=10)
            save(f"reg_mean_{scenario.name}_{slug(p)}.png", fig)


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
