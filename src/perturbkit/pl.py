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
    from scipy.stats import linregress

    if list(truth.var_names) != list(pred.var_names):
        from .errors import InputError

        raise InputError("reg_mean: truth and pred must have the same genes in the same order.")
    x, y = _mean(truth.X), _mean(pred.X)
    fig, ax = _figure(ax)
    r2_all = linregress(x, y).rvalue ** 2
    ax.scatter(x, y, s=6, c="0.6", alpha=0.6, linewidths=0, label=f"all {len(x)} genes: R² = {r2_all:.3f}")
    if top_genes is not None and len(top_genes):
        names = list(truth.var_names)
        pos = {g: i for i, g in enumerate(names)}
        idx = np.array([pos[g] for g in top_genes if g in pos])
        r2_top = linregress(x[idx], y[idx]).rvalue ** 2
        ax.scatter(x[idx], y[idx], s=12, c="tab:red", linewidths=0,
                   label=f"top {len(idx)} DEGs: R² = {r2_top:.3f}")
        for i in idx[:n_labels]:
            ax.annotate(names[i], (x[i], y[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", c="k", lw=0.8)
    ax.set_xlabel("real mean expression (log)")
    ax.set_ylabel("predicted mean expression (log)")
    ax.set_title(title or "per-gene means: real vs predicted")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig
