"""Evaluation metrics: one read-only registry, one exact definition per name.

"R^2" means three different things in this field, so each gets its own name here:

* ``r2_mean_*`` / ``r2_var_*``: squared Pearson correlation of per-gene means (variances), as scGen and
  scPRAM report it (``scipy.stats.linregress(...).rvalue ** 2``).
* ``r2score_*``: the coefficient of determination ``sklearn.metrics.r2_score(truth, pred)`` (as CPA).
* pertpy's ``r2_distance`` (``1 - r2_score``) is not offered: it is ``1 - r2score_mean_all``.

Use :func:`prepare` once to validate three AnnData objects (real target cells, predicted cells, source
cells) and :func:`score` / :func:`evaluate` to get a tidy table. Expensive pieces (DEGs, the PCA embedding)
are computed lazily and cached on the :class:`EvalData` object.

Importing this module loads numpy, scipy.sparse and pandas only; scanpy, scikit-learn and scipy.stats load
when a metric needs them. torch is imported only when an execution context on a GPU is given
(:mod:`perturbkit.execution`): the PCA and the distance tiles then run there.

Layout: :mod:`perturbkit.metrics.evaldata` (input checks, :func:`prepare`, :class:`EvalData`, DEGs),
:mod:`perturbkit.metrics.functions` (array distances and the per-metric functions), :mod:`perturbkit.metrics.core`
(the registry, :func:`score` / :func:`evaluate` with the bootstrap, :func:`ceiling`, :func:`normalise`,
:func:`score_models` for several models of one task), :mod:`perturbkit.metrics.screen` (screens: every
perturbation, cross-perturbation metrics, the effect test), :mod:`perturbkit.metrics.stats` (the Student-t
interval). This module only re-exports them.
"""

from __future__ import annotations

from .core import (
    COLUMNS,
    METRICS,
    SCORE_COLUMNS,
    Metric,
    ceiling,
    evaluate,
    list_metrics,
    normalise,
    resolve,
    score,
    score_models,
    score_one,
)
from .evaldata import MAX_PCS, Embedding, EvalData, ceiling_split, prepare, top_degs
from .functions import (
    MMD_GAMMA,
    deg_jaccard_top100,
    deg_overlap_top100,
    direction_agreement_top100,
    edistance,
    energy_distance,
    kde_mean_var,
    knn_batch_entropy,
    mae_mean,
    mean_var_kde_distance,
    mmd,
    mmd_rbf,
    mse_mean,
    pearson_delta,
    pearson_delta_top100,
    r2_mean_all,
    r2_mean_top100,
    r2_var_all,
    r2_var_top100,
    r2score_delta,
    r2score_mean_all,
    r2score_mean_top100,
)
from .screen import (
    EffectTest,
    discrimination_score,
    effect_table,
    effect_test,
    evaluate_screen,
    pearson_delta_systema,
)

__all__ = [
    "COLUMNS",
    "SCORE_COLUMNS",
    "ceiling_split",
    "MAX_PCS",
    "METRICS",
    "MMD_GAMMA",
    "EffectTest",
    "Embedding",
    "EvalData",
    "Metric",
    "ceiling",
    "discrimination_score",
    "effect_table",
    "effect_test",
    "energy_distance",
    "knn_batch_entropy",
    "evaluate",
    "evaluate_screen",
    "list_metrics",
    "mean_var_kde_distance",
    "mmd_rbf",
    "normalise",
    "pearson_delta_systema",
    "prepare",
    "resolve",
    "score",
    "score_models",
    "score_one",
    "top_degs",
]
