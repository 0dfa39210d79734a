"""Plots. Every function returns a matplotlib Figure and never calls ``show()``; save it with ``fig.savefig``."""

from __future__ import annotations

import numpy as np


def _figure(ax, size=(5.0, 5.0)):
    """The figure and axes to draw on: ``ax``'s, or a new pyplot-free Figure (no GUI backend needed)."""
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _mean(X) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(X.mean(axis=0)).ravel() if sp.issparse(X) else np.asarray(X, dtype=np.float64).mean(axis=0)


def reg_mean(truth, pred, *, top_genes=None, n_labels: int = 10, title: str | None = None, ax=None):
    """scGen's regression plot: per-gene mean of the real target cells (x) vs the prediction (y).

    ``top_genes`` (e.g. :func:`perturbkit.metrics.top_degs` of truth vs source) are highlighted and the first
    ``n_labels`` of them named. The legend gives ``r2_mean_all`` and ``r2_mean_top100`` exactly as the metrics
    define them (``linregress(truth_means, pred_means).rvalue ** 2``).
    """
    from .data import check_same_genes

    check_same_genes("pred", pred, "truth", truth.var_names, where="reg_mean")
    return _regression(_mean(truth.X), _mean(pred.X), list(truth.var_names), top_genes, n_labels, ax,
                       what="mean expression (log)", title=title or "per-gene means: real vs predicted")


def _r2(x, y) -> float:
    """``linregress(x, y).rvalue ** 2``, NaN where either side is constant (or fewer than 2 genes)."""
    from scipy.stats import linregress

    ok = len(x) > 1 and np.ptp(x) > 0 and np.ptp(y) > 0
    return linregress(x, y).rvalue ** 2 if ok else float("nan")


def _regression(x, y, names, top_genes, n_labels, ax, *, what: str, title: str):
    """Scatter of a per-gene statistic, real (x) vs predicted (y), with the top genes highlighted and R² shown."""
    fig, ax = _figure(ax)
    ax.scatter(x, y, s=6, c="0.6", alpha=0.6, linewidths=0, label=f"all {len(x)} genes: R² = {_r2(x, y):.3f}")
    if top_genes is not None and len(top_genes):
        pos = {g: i for i, g in enumerate(names)}
        idx = np.array([pos[g] for g in top_genes if g in pos])
        ax.scatter(x[idx], y[idx], s=12, c="tab:red", linewidths=0,
                   label=f"top {len(idx)} DEGs: R² = {_r2(x[idx], y[idx]):.3f}")
        for i in idx[:n_labels]:
            ax.annotate(names[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", c="k", lw=0.8)
    ax.set_xlabel(f"real {what}")
    ax.set_ylabel(f"predicted {what}")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig


# ------------------------------------------------------------------------------------------------ tuning


def optimization_history(trials, intermediate=None, *, metric: str = "objective", direction: str = "maximize",
                         ax=None):
    """Validation score of each trial (dots), pruned trials at their last reported score (crosses), and the
    best score so far (line). ``trials`` is :func:`perturbkit.tune.trials_table`'s DataFrame (``number``,
    ``state``, ``value``); pruned trials' last scores come from ``intermediate`` (``trial, epoch, value``)."""
    fig, ax = _figure(ax, (6.0, 4.0))
    done = trials[(trials["state"] == "COMPLETE") & trials["value"].notna()] if len(trials) else trials
    if len(done):
        ax.scatter(done["number"], done["value"], s=18, c="tab:blue", label="finished trial", zorder=3)
        vals = done["value"].to_numpy(dtype=float)
        best = np.maximum.accumulate(vals) if direction == "maximize" else np.minimum.accumulate(vals)
        ax.step(done["number"], best, where="post", c="tab:red", lw=1.2, label="best so far")
    pruned = trials[trials["state"] == "PRUNED"] if len(trials) else trials
    if len(pruned) and intermediate is not None and len(intermediate):
        last = intermediate.sort_values("epoch").groupby("trial")["value"].last()
        last = last[last.index.isin(pruned["number"])]
        ax.scatter(last.index, last.to_numpy(), marker="x", c="0.5", label=f"pruned ({len(pruned)}), last score")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("optimisation history")
    ax.legend(fontsize=8, frameon=False)
    return fig


def intermediate_values(intermediate, *, metric: str = "objective", ax=None):
    """Per-epoch validation score of every trial (``trial, state, epoch, value`` rows); pruned trials grey."""
    fig, ax = _figure(ax, (6.0, 4.0))
    for (trial, state), g in intermediate.groupby(["trial", "state"], sort=True):
        pruned = state == "PRUNED"
        ax.plot(g["epoch"], g["value"], marker="o", ms=2.5, lw=0.9, alpha=0.5 if pruned else 0.9,
                c="0.6" if pruned else None, ls="--" if pruned else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title("per-epoch validation scores (dashed grey: pruned)")
    if not len(intermediate):
        ax.text(0.5, 0.5, "no per-epoch scores (pruning off)", ha="center", va="center", transform=ax.transAxes)
    return fig


def param_importance(importance, *, ax=None):
    """Horizontal bars of parameter importances (a mapping name -> importance, e.g. fANOVA's)."""
    fig, ax = _figure(ax, (5.5, 0.4 * max(len(importance), 3) + 1.2))
    items = sorted(importance.items(), key=lambda kv: kv[1])
    if items:
        ax.barh([k for k, _ in items], [v for _, v in items], color="tab:blue")
    else:
        ax.text(0.5, 0.5, "importance not available", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("importance (fANOVA, share of variance)")
    ax.set_title("hyperparameter importance")
    return fig


def seed_comparison(scores, *, metrics=None, models=None):
    """One panel per metric: each model's value per seed (dots) and its mean over seeds (bar).

    ``scores``: a tidy table with ``model, seed, metric, value`` (e.g. tuning's ``final_scores.csv``).
    """
    from matplotlib.figure import Figure

    metrics = list(metrics) if metrics is not None else list(dict.fromkeys(scores["metric"]))
    models = list(models) if models is not None else [m for m in dict.fromkeys(scores["model"])]
    fig = Figure(figsize=(3.2 * max(len(metrics), 1), 3.6), layout="constrained")
    axes = fig.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        sub = scores[scores["metric"] == metric]
        for i, model in enumerate(models):
            v = sub.loc[sub["model"] == model, "value"].to_numpy(dtype=float)
            if not len(v):
                continue
            ax.bar(i, np.nanmean(v), color="0.85", width=0.7)
            ax.scatter(np.full(len(v), i), v, s=14, c="tab:blue", zorder=3)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=45, ha="right", fontsize=8)
        ax.set_title(metric, fontsize=9)
    return fig


# --------------------------------------------------------------------------------------------- benchmark


def reg_var(truth, pred, *, top_genes=None, n_labels: int = 10, title: str | None = None, ax=None):
    """Per-gene variance of the real target cells (x) vs the prediction (y), as scGen's ``reg_var_plot``.

    The legend gives ``r2_var_all`` and ``r2_var_top100`` as the metrics define them (squared Pearson of the
    per-gene variances, ddof=0); ``top_genes`` are highlighted and the first ``n_labels`` named.
    """
    import scipy.sparse as sp

    from .data import check_same_genes

    check_same_genes("pred", pred, "truth", truth.var_names, where="reg_var")

    def var(X):
        X = X.toarray() if sp.issparse(X) else X
        return np.asarray(X, dtype=np.float64).var(axis=0)

    return _regression(var(truth.X), var(pred.X), list(truth.var_names), top_genes, n_labels, ax,
                       what="variance (log expression)", title=title or "per-gene variances: real vs predicted")


def _subsample(groups, max_cells: int, seed: int):
    """Dense float arrays of at most ``max_cells`` cells per group (seeded, without replacement)."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    out = {}
    for label, a in groups.items():
        idx = np.arange(a.n_obs)
        if a.n_obs > max_cells:
            idx = np.sort(rng.choice(a.n_obs, size=max_cells, replace=False))
        X = a.X[idx]
        out[label] = np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)
    return out


_GROUP_COLOURS = ("0.55", "k", "tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown",
                  "tab:pink", "tab:olive", "tab:cyan")


def cell_embedding(groups, *, basis: str = "pca", seed: int = 0, max_cells: int = 500, title: str | None = None,
                   ax=None):
    """Control, real and predicted cells in one PCA or UMAP (scanpy), one colour per group.

    ``groups`` maps a label (e.g. ``"control"``, ``"real"``, ``"scgen"``) to an AnnData; all share genes. At most
    ``max_cells`` cells per group are drawn (seeded). The PCA is fitted on all drawn cells together; the UMAP
    runs on 30 of its components (``sc.pp.neighbors`` + ``sc.tl.umap`` with ``random_state=seed``).
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    if basis not in ("pca", "umap"):
        from .errors import InputError

        raise InputError(f"cell_embedding: basis must be 'pca' or 'umap', got {basis!r}.")
    arrays = _subsample(groups, max_cells, seed)
    labels = list(arrays)
    X = np.vstack([arrays[k] for k in labels])
    obs = pd.DataFrame({"group": pd.Categorical(np.repeat(labels, [len(arrays[k]) for k in labels]),
                                                categories=labels)}, index=[str(i) for i in range(len(X))])
    tmp = ad.AnnData(X=X, obs=obs)
    n_comps = max(2, min(30, X.shape[0] - 1, X.shape[1] - 1))
    sc.pp.pca(tmp, n_comps=n_comps, random_state=seed)
    if basis == "umap":
        sc.pp.neighbors(tmp, n_neighbors=min(15, X.shape[0] - 1), random_state=seed)
        sc.tl.umap(tmp, random_state=seed)
        coords, axis = tmp.obsm["X_umap"], ("UMAP 1", "UMAP 2")
    else:
        coords = tmp.obsm["X_pca"][:, :2]
        ratio = tmp.uns["pca"]["variance_ratio"]
        axis = (f"PC1 ({100 * ratio[0]:.0f} %)", f"PC2 ({100 * ratio[1]:.0f} %)")
    fig, ax = _figure(ax, (5.5, 5.0))
    for i, label in enumerate(labels):
        m = (obs.group == label).to_numpy()
        ax.scatter(coords[m, 0], coords[m, 1], s=5, alpha=0.6, linewidths=0,
                   c=_GROUP_COLOURS[i % len(_GROUP_COLOURS)], label=f"{label} ({m.sum()})")
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    ax.set_title(title or f"{basis.upper()} of control, real and predicted cells")
    ax.legend(fontsize=7, frameon=False, markerscale=2)
    return fig


def deg_violins(groups, genes, *, max_cells: int = 500, seed: int = 0, title: str | None = None):
    """Violins of the expression of ``genes`` (e.g. the top real DEGs) in each group (control, real, models)."""
    from matplotlib.figure import Figure

    genes = list(genes)
    arrays = _subsample(groups, max_cells, seed)
    labels = list(arrays)
    first = next(iter(groups.values()))
    pos = {g: i for i, g in enumerate(map(str, first.var_names))}
    genes = [g for g in genes if g in pos]
    ncol = min(3, max(len(genes), 1))
    nrow = max(1, -(-len(genes) // ncol))
    fig = Figure(figsize=(3.6 * ncol, 2.8 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, gene in zip(axes, genes):
        data = [arrays[k][:, pos[gene]] for k in labels]
        parts = ax.violinplot(data, showmedians=True, widths=0.8)
        for i, body in enumerate(parts["bodies"]):
            body.set_facecolor(_GROUP_COLOURS[i % len(_GROUP_COLOURS)])
            body.set_alpha(0.55)
        ax.set_xticks(range(1, len(labels) + 1))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(gene, fontsize=9)
    for ax in axes[len(genes):]:
        ax.set_visible(False)
    axes[0].set_ylabel("log expression")
    fig.suptitle(title or "top DEGs: control, real and predicted cells", fontsize=10)
    return fig


def metric_heatmap(table, *, metric: str, higher_is_better: bool = True, title: str | None = None, ax=None):
    """A models (rows) x contexts/splits (columns) heatmap of one metric; values printed in the cells.

    ``table`` is a DataFrame (index: models, columns: splits), e.g. the seed means of ``summary.csv``. The
    colour map runs from worse (light) to better (dark) by the metric's direction.
    """
    vals = table.to_numpy(dtype=float)
    fig, ax = _figure(ax, (1.1 * max(table.shape[1], 3) + 2.5, 0.5 * max(table.shape[0], 2) + 1.8))
    cmap = "viridis" if higher_is_better else "viridis_r"
    finite = vals[np.isfinite(vals)]
    im = ax.imshow(vals, cmap=cmap, aspect="auto", vmin=finite.min() if finite.size else 0,
                   vmax=finite.max() if finite.size else 1)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            if np.isfinite(vals[i, j]):
                mid = (finite.min() + finite.max()) / 2 if finite.size else 0
                light = (vals[i, j] < mid) == higher_is_better
                ax.text(j, i, f"{vals[i, j]:.3g}", ha="center", va="center", fontsize=7,
                        color="w" if light else "k")
    ax.set_xticks(range(table.shape[1]))
    ax.set_xticklabels([str(c) for c in table.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]))
    ax.set_yticklabels([str(i) for i in table.index], fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
    ax.set_title(title or metric)
    return fig


def seed_variability(scores, *, metric: str, title: str | None = None, ax=None):
    """Each model's score on each split, one dot per seed and a bar for the seeds' range.

    ``scores``: a tidy table with ``split, model, seed, metric, value`` (e.g. one scenario of ``scores.csv``).
    """
    sub = scores[scores["metric"] == metric]
    splits = list(dict.fromkeys(sub["split"]))
    models = list(dict.fromkeys(sub["model"]))
    fig, ax = _figure(ax, (max(5.0, 1.0 * len(splits) + 3), 4.2))
    width = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        colour = _GROUP_COLOURS[(k + 2) % len(_GROUP_COLOURS)]
        for j, split in enumerate(splits):
            v = sub.loc[(sub["model"] == model) & (sub["split"] == split), "value"].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if not len(v):
                continue
            x = j - 0.4 + width * (k + 0.5)
            ax.plot([x, x], [v.min(), v.max()], c=colour, lw=3, alpha=0.35, solid_capstyle="butt")
            ax.scatter(np.full(len(v), x), v, s=12, c=colour, zorder=3, label=model if j == 0 else None)
    ax.set_xticks(range(len(splits)))
    ax.set_xticklabels(splits, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric}: one dot per seed")
    ax.legend(fontsize=7, frameon=False)
    return fig


def context_scores(table, counts, *, metric: str, title: str | None = None):
    """Cell-type specificity: each model's score per context (mean and interval over seeds) above the
    context's cell count, contexts ordered from most to fewest cells.

    ``table``: rows ``context, model, mean, ci_low, ci_high`` for one metric; ``counts``: context -> cells.
    """
    from matplotlib.figure import Figure

    order = [c for c in counts.sort_values(ascending=False).index if c in set(table["context"])]
    models = list(dict.fromkeys(table["model"]))
    fig = Figure(figsize=(max(5.5, 0.9 * len(order) + 3), 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    width = 0.8 / max(len(models), 1)
    for k, model in enumerate(models):
        sub = table[table["model"] == model].set_index("context").reindex(order)
        x = np.arange(len(order)) - 0.4 + width * (k + 0.5)
        mean = sub["mean"].to_numpy(dtype=float)
        lo = mean - sub["ci_low"].to_numpy(dtype=float)
        hi = sub["ci_high"].to_numpy(dtype=float) - mean
        err = np.vstack([np.nan_to_num(lo), np.nan_to_num(hi)])
        top.errorbar(x, mean, yerr=err, fmt="o", ms=4, capsize=2, c=_GROUP_COLOURS[(k + 2) % len(_GROUP_COLOURS)],
                     label=model)
    top.set_ylabel(metric)
    top.set_title(title or f"{metric} per held-out context\n(mean and 95 % interval over seeds)", fontsize=10)
    top.legend(fontsize=7, frameon=False)
    bottom.bar(np.arange(len(order)), counts.reindex(order).to_numpy(), color="0.7")
    bottom.set_ylabel("cells")
    bottom.set_xticks(range(len(order)))
    bottom.set_xticklabels(order, rotation=45, ha="right", fontsize=8)
    return fig


def unbalanced_comparison(table, *, metric: str, title: str | None = None):
    """Balanced vs unbalanced training data: one panel per variant, each model's score per context.

    ``table``: rows ``context, variant, model, balanced, unbalanced`` for one metric (``unbalanced.csv``).
    Hollow markers are the balanced (loco) run, filled the unbalanced one, joined by a line.
    """
    from matplotlib.figure import Figure

    variants = list(dict.fromkeys(table["variant"]))
    fig = Figure(figsize=(5.0 * max(len(variants), 1), 4.2), layout="constrained")
    axes = fig.subplots(1, max(len(variants), 1), squeeze=False)[0]
    for ax, variant in zip(axes, variants):
        sub = table[table["variant"] == variant]
        contexts = list(dict.fromkeys(sub["context"]))
        models = list(dict.fromkeys(sub["model"]))
        width = 0.8 / max(len(models), 1)
        for k, model in enumerate(models):
            s = sub[sub["model"] == model].set_index("context").reindex(contexts)
            x = np.arange(len(contexts)) - 0.4 + width * (k + 0.5)
            colour = _GROUP_COLOURS[(k + 2) % len(_GROUP_COLOURS)]
            ax.scatter(x, s["balanced"], facecolors="none", edgecolors=colour, s=22)
            ax.scatter(x, s["unbalanced"], c=colour, s=22, label=model)
            for xi, b, u in zip(x, s["balanced"], s["unbalanced"]):
                ax.plot([xi, xi], [b, u], c=colour, lw=1)
        ax.set_xticks(range(len(contexts)))
        ax.set_xticklabels(contexts, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{variant}: balanced (hollow) vs unbalanced (filled)", fontsize=9)
        ax.legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def attention_heatmap(model, source, max_cells: int = 50, max_controls: int = 100, ax=None, *,
                      perturbation: str | None = None):
    """scPRAM's attention scores: query cells (rows) x the training control cells they attend to most (columns).

    Like the "attention score" figure of the scPRAM tutorial. ``model`` is a fitted
    :class:`~perturbkit.models.ScPRAM`, ``source`` the query (control) cells. At most ``max_cells`` query cells are
    drawn (evenly spaced through ``source``, so the figure is deterministic) and the ``max_controls`` control cells
    with the largest total attention from them; rows are ordered by the column each attends to most, columns by
    cell type and then by total attention. A strip above the heatmap gives each control cell's cell type. With
    ``attention="first_cell"`` every row is the same (the ``scpram`` package's shared delta).
    ``perturbation``: whose attention, for a model of several perturbations (named in the title).
    """
    from matplotlib.patches import Patch

    n_q = source.n_obs
    rows = np.unique(np.linspace(0, n_q - 1, min(max_cells, n_q)).round().astype(int))
    sub = model.attention(source[rows], perturbation)  # only the rows drawn: each row's weights are its own
    n_c = sub.shape[1]
    total = np.asarray(sub.sum(axis=0)).ravel()
    cols = np.argsort(-total, kind="stable")[:max_controls]
    cols = cols[total[cols] > 0]
    contexts = model.pairing(perturbation).control_context
    if contexts is not None:
        every = np.asarray(contexts)
        cols = cols[np.lexsort((-total[cols], every[cols]))]
        contexts = every[cols]
    mat = sub[:, cols].toarray()
    mat = mat[np.lexsort((-mat.max(axis=1), mat.argmax(axis=1)))]
    fig, ax = _figure(ax, size=(7.5, 5.0))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    fig.colorbar(im, ax=ax, label="attention score", shrink=0.8)
    ax.set_xlabel(f"training control cells: the {len(cols)} most attended of {n_c}")
    ax.set_ylabel(f"query cells ({len(rows)} of {n_q})")
    ax.set_xticks([])
    ax.set_yticks([])
    k = int(np.diff(sub.indptr).max()) if n_q else 0
    which = "" if perturbation is None else f" for {perturbation!r}"
    ax.set_title(f"scPRAM attention{which} ({model.params.get('attention', 'cell')}): each cell attends to "
                 f"{k} of {n_c}",
                 fontsize=9, pad=18 if contexts is not None else 6)
    if contexts is not None and len(cols):
        names = sorted(set(contexts.tolist()))
        code = np.array([names.index(c) for c in contexts])[None, :]
        strip = ax.inset_axes([0.0, 1.005, 1.0, 0.035])
        cmap = "tab20" if len(names) > 10 else "tab10"
        strip.imshow(code, aspect="auto", cmap=cmap, vmin=0, vmax=(19 if len(names) > 10 else 9),
                     interpolation="nearest")
        strip.set_axis_off()
        from matplotlib import colormaps

        colors = colormaps[cmap]
        ax.legend(handles=[Patch(color=colors(i), label=n) for i, n in enumerate(names)], fontsize=7,
                  frameon=False, loc="upper left", bbox_to_anchor=(1.25, 1.0), title="control cell type",
                  title_fontsize=7)
    return fig


# ----------------------------------------------------------------------------------------------- screens


def perturbation_heatmap(scores, *, metrics=None, models=None, perturbations=None, title: str | None = None,
                         ax=None):
    """A screen's scores: one panel per model, perturbations (rows) x metrics (columns), values printed.

    ``scores``: the per-perturbation rows of a tidy table with ``model, perturbation, metric, value,
    higher_is_better`` (e.g. ``scores.csv`` of ``perturbkit predict`` without its ``mean`` / ``all`` rows).
    Each metric is coloured on its own scale, shared by all panels, from worse (light) to better (dark) by the
    metric's direction. ``metrics`` / ``models`` / ``perturbations`` choose and order them (default: all
    metrics without ``_norm``, every model, every perturbation, in order of appearance). ``ax``: a sequence of
    Axes, one per model (default: a new Figure).
    """
    from matplotlib.figure import Figure

    from .errors import InputError

    metrics = list(metrics) if metrics is not None else \
        [m for m in dict.fromkeys(scores["metric"]) if not str(m).endswith("_norm")]
    metrics = [m for m in metrics if (scores["metric"] == m).any()]
    models = list(models) if models is not None else list(dict.fromkeys(scores["model"]))
    perts = list(perturbations) if perturbations is not None else list(dict.fromkeys(scores["perturbation"]))
    if not metrics or not models or not perts:
        raise InputError("perturbation_heatmap: scores hold no rows of the requested metrics, models and "
                         "perturbations.")
    if ax is None:
        fig = Figure(figsize=(0.6 * len(metrics) * len(models) + 0.9 * len(models) + 1.2,
                              0.32 * len(perts) + 1.8), layout="constrained")
        axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    else:
        axes = list(ax)
        if len(axes) != len(models):
            raise InputError(f"perturbation_heatmap: ax holds {len(axes)} Axes for {len(models)} models; "
                             "give one per model.")
        fig = axes[0].figure
    cube = np.full((len(models), len(perts), len(metrics)), np.nan)
    higher = []
    for k, metric in enumerate(metrics):
        sub = scores[scores["metric"] == metric]
        higher.append(bool(sub["higher_is_better"].iloc[0]) if "higher_is_better" in sub else True)
        wide = sub.pivot_table(index="perturbation", columns="model", values="value", aggfunc="first")
        for i, model in enumerate(models):
            for j, p in enumerate(perts):
                if p in wide.index and model in wide.columns:
                    cube[i, j, k] = wide.loc[p, model]
    shade = np.full_like(cube, np.nan)
    for k in range(len(metrics)):
        v = cube[..., k]
        finite = v[np.isfinite(v)]
        if finite.size:
            lo, hi = finite.min(), finite.max()
            scaled = (v - lo) / (hi - lo) if hi > lo else np.full_like(v, 0.5)
            shade[..., k] = scaled if higher[k] else 1 - scaled
    for i, (a, model) in enumerate(zip(axes, models)):
        a.imshow(shade[i], cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for j in range(len(perts)):
            for k in range(len(metrics)):
                if np.isfinite(cube[i, j, k]):
                    a.text(k, j, f"{cube[i, j, k]:.2f}", ha="center", va="center", fontsize=6,
                           color="w" if shade[i, j, k] < 0.5 else "k")
        a.set_xticks(range(len(metrics)))
        a.set_xticklabels(metrics, rotation=45, ha="right", fontsize=7)
        a.set_yticks(range(len(perts)))
        a.set_yticklabels(perts, fontsize=7)
        a.set_title(model, fontsize=9)
    fig.suptitle(title or "per perturbation (colour per metric: dark = better)", fontsize=10)
    return fig


def versus_baseline(scores, *, metric: str = "pearson_delta", baseline: str = "mean_shift", models=None,
                    n_labels: int = 8, title: str | None = None, ax=None):
    """Per perturbation, each model's ``metric`` (y) against the ``baseline`` model's (x), with the diagonal.

    ``scores``: per-perturbation rows with ``model, perturbation, metric, value`` (as
    :func:`perturbation_heatmap`). ``models`` default: every model but the baseline and ``ceiling``. The
    legend counts the perturbations on the better side of the diagonal; the ``n_labels`` perturbations
    farthest from it are named (first model).
    """
    from .errors import InputError, choices_text

    sub = scores[scores["metric"] == metric]
    known = list(dict.fromkeys(sub["model"]))
    if baseline not in known:
        raise InputError(f"versus_baseline: no {metric!r} rows of the baseline {baseline!r}; models: "
                         f"{choices_text(known)}.")
    models = list(models) if models is not None else [m for m in known if m not in (baseline, "ceiling")]
    higher = bool(sub["higher_is_better"].iloc[0]) if "higher_is_better" in sub else True
    wide = sub.pivot_table(index="perturbation", columns="model", values="value", aggfunc="first")
    wide = wide.loc[[p for p in dict.fromkeys(sub["perturbation"]) if p in wide.index]]
    x = wide[baseline].to_numpy(dtype=float)
    fig, ax = _figure(ax, (5.2, 5.0))
    values = [x]
    for k, model in enumerate(models):
        if model not in wide.columns:
            continue
        y = wide[model].to_numpy(dtype=float)
        values.append(y)
        ok = np.isfinite(x) & np.isfinite(y)
        better = int(((y > x) if higher else (y < x))[ok].sum())
        colour = _GROUP_COLOURS[(k + 2) % len(_GROUP_COLOURS)]
        ax.scatter(x, y, s=18, c=colour, zorder=3, label=f"{model}: better in {better} of {int(ok.sum())}")
        if k == 0 and n_labels:
            far = np.argsort(-np.where(ok, np.abs(y - x), -np.inf), kind="stable")[:n_labels]
            for i in far[ok[far]]:
                ax.annotate(str(wide.index[i]), (x[i], y[i]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    finite = np.concatenate([v[np.isfinite(v)] for v in values])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", c="k", lw=0.8)
    ax.set_xlabel(f"{baseline}: {metric}")
    ax.set_ylabel(f"model: {metric}")
    ax.set_title(title or f"{metric} per perturbation vs {baseline}", fontsize=10)
    ax.legend(fontsize=7, framealpha=0.8, loc="best")
    return fig
