"""The registry and the scoring: :data:`METRICS`, :func:`score` / :func:`evaluate` with the bootstrap,
:func:`ceiling`, :func:`normalise`, and :func:`score_models` (several models' predictions of one task)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pandas as pd

from ..errors import InputError, check_seed, choices_text, suggest
from .evaldata import EvalData, ceiling_split, prepare
from .functions import (
    deg_jaccard_top100,
    deg_overlap_top100,
    direction_agreement_top100,
    edistance,
    kde_mean_var,
    mae_mean,
    mmd,
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

#: columns of the table :func:`evaluate` returns, in order
COLUMNS = ("metric", "value", "ci_low", "ci_high", "higher_is_better", "error")


# ------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Metric:
    """One metric: its name, function, direction, one-line definition and whether it gets bootstrap CIs."""

    name: str
    fn: Callable[[EvalData], float]
    higher_is_better: bool
    definition: str
    bootstrap: bool


METRICS: MappingProxyType[str, Metric] = MappingProxyType(
    {
        "r2_mean_all": Metric(
            "r2_mean_all", r2_mean_all, True,
            "squared Pearson r (linregress rvalue^2) of per-gene means, pred vs truth, all genes", True,
        ),
        "r2_mean_top100": Metric(
            "r2_mean_top100", r2_mean_top100, True,
            "squared Pearson r of per-gene means, pred vs truth, top-100 real DEGs only", True,
        ),
        "r2_var_all": Metric(
            "r2_var_all", r2_var_all, True,
            "squared Pearson r of per-gene variances (ddof=0), pred vs truth, all genes", True,
        ),
        "r2_var_top100": Metric(
            "r2_var_top100", r2_var_top100, True,
            "squared Pearson r of per-gene variances (ddof=0), pred vs truth, top-100 real DEGs", True,
        ),
        "r2score_mean_all": Metric(
            "r2score_mean_all", r2score_mean_all, True,
            "sklearn r2_score(truth means, pred means), all genes", True,
        ),
        "r2score_mean_top100": Metric(
            "r2score_mean_top100", r2score_mean_top100, True,
            "sklearn r2_score(truth means, pred means), top-100 real DEGs", True,
        ),
        "mse_mean": Metric(
            "mse_mean", mse_mean, False, "mean squared error of per-gene means, all genes", True,
        ),
        "mae_mean": Metric(
            "mae_mean", mae_mean, False, "mean absolute error of per-gene means, all genes", True,
        ),
        "pearson_delta": Metric(
            "pearson_delta", pearson_delta, True,
            "Pearson r of (pred mean - source mean) vs (truth mean - source mean), all genes; 0 if pred "
            "changes every gene equally", True,
        ),
        "pearson_delta_top100": Metric(
            "pearson_delta_top100", pearson_delta_top100, True,
            "Pearson r of (pred mean - source mean) vs (truth mean - source mean), top-100 real DEGs; 0 if "
            "pred changes them equally", True,
        ),
        "r2score_delta": Metric(
            "r2score_delta", r2score_delta, True,
            "sklearn r2_score(truth mean - source mean, pred mean - source mean), all genes", True,
        ),
        "edistance": Metric(
            "edistance", edistance, False,
            "pertpy energy distance (Euclidean, self-pairs included) of truth vs pred cells in a 50-PC PCA "
            "fitted on source + truth",
            False,
        ),
        "mmd": Metric(
            "mmd", mmd, False,
            "pertpy RBF MMD^2 (gamma=1, biased, diagonal included) of truth vs pred cells in the same PCA",
            False,
        ),
        "kde_mean_var": Metric(
            "kde_mean_var", kde_mean_var, False,
            "pertpy mean_var_distribution: mean squared difference of 2-D KDEs of gene (log mean, log var)",
            False,
        ),
        "deg_overlap_top100": Metric(
            "deg_overlap_top100", deg_overlap_top100, True,
            "|real top-100 DEGs ∩ predicted top-100 DEGs| / 100 (Wilcoxon vs source cells)", False,
        ),
        "deg_jaccard_top100": Metric(
            "deg_jaccard_top100", deg_jaccard_top100, True,
            "Jaccard index of real and predicted top-100 DEG sets", False,
        ),
        "direction_agreement_top100": Metric(
            "direction_agreement_top100", direction_agreement_top100, True,
            "share of real top-100 DEGs whose predicted change vs source has the real change's sign", True,
        ),
    }
)  # fmt: skip


def list_metrics() -> pd.DataFrame:
    """The registered metrics as a table ``name, higher_is_better, definition`` (for ``list metrics``)."""
    return pd.DataFrame(
        [(m.name, m.higher_is_better, m.definition) for m in METRICS.values()],
        columns=["name", "higher_is_better", "definition"],
    )


def resolve(metrics: str | Iterable[str] | None) -> list[str]:
    """The metric names to compute: every registered metric for None; unknown names raise :class:`InputError`."""
    if metrics is None:
        return list(METRICS)
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    for name in names:
        if name not in METRICS:
            raise InputError(
                f"Unknown metric {name!r}.{suggest(name, METRICS)} "
                f"Known metrics: {choices_text(METRICS, 30)}."
            )
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------ scoring


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _boot_weights(rng: np.random.Generator, n_cells: int, n_boot: int) -> np.ndarray:
    """(n_boot, n_cells) weights: how often each cell is drawn (with replacement), divided by n_cells."""
    idx = rng.integers(0, n_cells, size=(n_boot, n_cells))
    idx += np.arange(n_boot)[:, None] * n_cells
    counts = np.bincount(idx.ravel(), minlength=n_boot * n_cells).reshape(n_boot, n_cells)
    return counts / n_cells


def _boot_moments(X: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-replicate per-gene means and variances (ddof=0) of the resampled cells, vectorised."""
    centre = X.mean(axis=0)
    Xc = X - centre
    mean_c = W @ Xc
    var = np.maximum(W @ (Xc * Xc) - mean_c**2, 0.0)
    return mean_c + centre, var


def _bootstrap(d: EvalData, names: Sequence[str], n_boot: int, ci: float, seed: int) -> dict[str, tuple]:
    """``{name: (ci_low, ci_high, n_dropped)}``; n_dropped = replicates on which the metric was undefined."""
    rng = np.random.default_rng(seed)
    moments = {}
    for part in ("truth", "pred", "source"):
        X = getattr(d, f"{part}_X")
        mean, var = _boot_moments(X, _boot_weights(rng, X.shape[0], n_boot))
        if part in getattr(d, "offsets", {}):  # a sample of more cells: centred on all cells' moments
            dm, dv = d.offsets[part]
            mean, var = mean + dm, np.maximum(var + dv, 0.0)
        moments[part] = (mean, var)
    values = {name: np.full(n_boot, np.nan) for name in names}
    for b in range(n_boot):
        rep = d.with_moments(
            **{f"{part}_mean": m[0][b] for part, m in moments.items()},
            **{f"{part}_var": m[1][b] for part, m in moments.items()},
        )
        for name in names:
            # an undefined replicate (e.g. a constant vector) stays NaN and is dropped from the interval
            with contextlib.suppress(Exception):
                values[name][b] = METRICS[name].fn(rep)
    alpha = (1 - ci) / 2
    out = {}
    for name, vals in values.items():
        ok = vals[np.isfinite(vals)]
        low, high = np.quantile(ok, [alpha, 1 - alpha]) if len(ok) else (np.nan, np.nan)
        out[name] = (float(low), float(high), int(n_boot - len(ok)))
    return out


def score(
    data: EvalData,
    metrics: str | Iterable[str] | None = None,
    *,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
    execution=None,
) -> pd.DataFrame:
    """Score a prepared :class:`EvalData`; see :func:`evaluate` for the table and the bootstrap.

    ``execution`` (None: the data's own, :attr:`EvalData.execution`) is where its PCA and distances run."""
    data = data.with_execution(execution)
    names = resolve(metrics)
    check_seed(seed, "seed")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise InputError(f"n_boot must be a non-negative integer, got {n_boot!r}.")
    if not (isinstance(ci, (int, float)) and 0 < ci < 1):
        raise InputError(f"ci must be a number between 0 and 1 (e.g. 0.95), got {ci!r}.")
    rows = []
    for name in names:
        metric = METRICS[name]
        try:
            value, error = float(metric.fn(data)), ""
            if not math.isfinite(value):
                error = f"the metric returned {value}"
                value = math.nan
        except Exception as exc:  # recorded in the row, never swallowed
            value, error = math.nan, _error_text(exc)
        rows.append({"metric": name, "value": value, "ci_low": math.nan, "ci_high": math.nan,
                     "higher_is_better": metric.higher_is_better, "error": error})  # fmt: skip
    boot = [r["metric"] for r in rows if METRICS[r["metric"]].bootstrap and not r["error"]]
    notes = list(data.notes)
    if boot and n_boot > 0:
        intervals = _bootstrap(data, boot, int(n_boot), float(ci), seed)
        for row in rows:
            if row["metric"] in intervals:
                row["ci_low"], row["ci_high"], dropped = intervals[row["metric"]]
                if dropped:
                    notes.append(
                        f"{row['metric']}: {dropped} of {n_boot} bootstrap replicates were undefined and "
                        "left out of the interval."
                    )
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table.attrs["notes"] = notes
    if data.has_embedding:
        table.attrs["embedding"] = data.embedding_info
    return table


def evaluate(
    truth,
    pred,
    source,
    spec=None,
    metrics: str | Iterable[str] | None = None,
    *,
    n_boot: int = 100,
    ci: float = 0.95,
    seed: int = 0,
    execution=None,
    moments=None,
) -> pd.DataFrame:
    """Score a prediction against the real target cells; one row per metric.

    Parameters
    ----------
    truth, pred, source
        AnnData objects of the real target cells, the predicted cells and the source (control) cells;
        identical ``var_names`` in the same order. X may be dense or sparse. They are not modified.
    spec
        the :class:`~perturbkit.data.PerturbSpec` of the data; accepted for future use, currently unused.
    metrics
        names from :data:`METRICS` (in the order wanted), or ``None`` for all of them.
    n_boot
        bootstrap replicates for the metrics with ``bootstrap=True``; 0 skips the intervals.
    ci
        coverage of the percentile interval.
    seed
        seeds the bootstrap (one ``numpy.random.Generator``) and the PCA.
    execution
        a :class:`perturbkit.execution.Execution` (None: the CPU). On a CUDA device the PCA and the pair sums
        of ``edistance`` and ``mmd`` run there in float64 (the rest, and the bootstrap, which computes no
        distance, on the CPU); on the CPU the table is byte-identical to one without it.
    moments
        the per-gene moments of all the cells that truth, pred and source are samples of
        (:func:`perturbkit.metrics.prepare`); None: those of the cells given.

    Returns
    -------
    pandas.DataFrame
        columns ``metric, value, ci_low, ci_high, higher_is_better, error``. A metric that raises gets
        ``value = NaN`` and its exception in ``error`` (empty string otherwise); metrics without bootstrap get
        NaN intervals. ``table.attrs`` holds ``notes`` and, if a PCA was computed, ``embedding`` (its
        description).

    Notes
    -----
    Bootstrap: the cells of truth, pred and source are resampled independently with replacement (each to its
    own size), the per-gene means and variances recomputed, and each metric recomputed; the interval is the
    ``(1 - ci) / 2`` and ``(1 + ci) / 2`` quantiles of the replicates (percentile interval). The top-100 DEG
    set is computed once on the full data and kept fixed across replicates, so the intervals leave out the
    uncertainty of DEG selection. Replicates on which a metric is undefined are dropped from its interval
    and counted in ``table.attrs["notes"]``.

    These plug-in metrics are biased by sampling noise and resampling adds that noise once more, so when the
    prediction is very close to the truth the whole interval can lie on the worse side of the estimate (see
    docs/metrics.md). Read it as the spread due to finite cells, not as a bias-corrected interval.
    """
    del spec  # reserved
    names = resolve(metrics)
    return score(prepare(truth, pred, source, seed=seed, execution=execution, moments=moments), names,
                 n_boot=n_boot, ci=ci, seed=seed)


def ceiling(
    truth,
    source,
    *,
    seed: int = 0,
    metrics: str | Iterable[str] | None = None,
    n_boot: int = 0,
    ci: float = 0.95,
    execution=None,
) -> pd.DataFrame:
    """What a perfect model could score: one random half of the real target cells scored against the other.

    The cells of ``truth`` are shuffled with ``numpy.random.default_rng(seed)``; the first ``n // 2`` act as
    the prediction and the rest as the truth, with the same ``source`` cells. Returns an
    :func:`evaluate`-shaped table.
    Each half has half the cells, so DEGs and moments are noisier than on the full data; the ceiling is an
    estimate of the replicate-to-replicate agreement, not an upper bound in the strict sense.
    """
    if not hasattr(truth, "n_obs"):
        raise InputError(f"truth must be an AnnData object, got {type(truth).__name__}.")
    n = truth.n_obs
    if n < 4:
        raise InputError(f"ceiling needs at least 4 truth cells (2 per half), got {n}.")
    pred_cells, truth_cells = ceiling_split(n, seed)
    return evaluate(truth[truth_cells], truth[pred_cells], source, metrics=metrics, n_boot=n_boot, ci=ci, seed=seed,
                    execution=execution)


def normalise(
    table: pd.DataFrame,
    *,
    model_col: str = "model",
    baseline: str = "control",
    ceiling: str = "ceiling",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Baseline-normalised scores: ``(model - baseline) / (ceiling - baseline)`` per metric.

    Parameters
    ----------
    table
        tidy table with columns ``model_col``, ``metric`` and ``value`` holding several models, including rows
        whose model is ``baseline`` and ``ceiling`` (e.g. the concatenation of :func:`evaluate` tables with a
        model column added, plus :func:`ceiling`'s table).
    by
        further columns that identify a comparison (e.g. ``"cell_type"``); the baseline and ceiling are
        looked up per ``(metric, *by)``.

    Returns
    -------
    pandas.DataFrame
        the same columns and rows, with ``metric`` suffixed ``_norm`` and ``value`` (and ``ci_low`` /
        ``ci_high`` if present, re-ordered so low <= high) normalised. 0 = the baseline, 1 = the ceiling,
        whatever the metric's direction, so ``higher_is_better`` (if present) becomes True. NaN where
        ``ceiling - baseline`` is 0 or missing.
    """
    keys = ["metric", *by]
    need = [model_col, *keys, "value"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise InputError(f"normalise: table lacks column(s) {missing}; it needs {need}.")
    refs = {}
    for label, name in (("baseline", baseline), ("ceiling", ceiling)):
        rows = table[table[model_col] == name]
        if rows.empty:
            models = table[model_col].astype(str).unique()
            raise InputError(
                f"normalise: no rows with {model_col} == {name!r} ({label}).{suggest(name, models)} "
                f"Models in the table: {choices_text(models)}."
            )
        if rows.duplicated(keys).any():
            raise InputError(
                f"normalise: several {label} rows ({model_col} == {name!r}) per {keys}; add the columns that "
                "tell them apart to by=."
            )
        refs[label] = rows.set_index(keys)["value"].rename(f"__{label}")
    out = table.join(refs["baseline"], on=keys).join(refs["ceiling"], on=keys)
    base, denom = out["__baseline"], out["__ceiling"] - out["__baseline"]
    denom = denom.where(denom != 0)
    result = table.copy()
    result["value"] = ((out["value"] - base) / denom).to_numpy()
    if "ci_low" in table.columns and "ci_high" in table.columns:
        lo, hi = (out["ci_low"] - base) / denom, (out["ci_high"] - base) / denom
        result["ci_low"], result["ci_high"] = np.fmin(lo, hi).to_numpy(), np.fmax(lo, hi).to_numpy()
    if "higher_is_better" in table.columns:
        result["higher_is_better"] = True
    result["metric"] = table["metric"].astype(str) + "_norm"
    return result


# ------------------------------------------------------------------------------------- one task, several models

_ceiling = ceiling  # score_models' own parameter ``ceiling`` (a flag) hides the function

#: columns of :func:`score_models`' table
SCORE_COLUMNS = ("model", *COLUMNS)


def score_models(target, source, preds: dict, metric_names=None, *, n_boot: int = 100, seed: int = 0,
                 baseline: str = "control", ceiling: bool = True, execution=None, moments=None):
    """Score several models' predictions of one task; add the ceiling and baseline-normalised rows.

    ``preds`` maps model name -> predicted AnnData (it should hold ``baseline``). Returns the tidy table
    (columns :data:`SCORE_COLUMNS`; the ceiling's rows have model ``"ceiling"``, normalised rows a metric
    suffixed ``_norm``) and a dict describing the evaluation (embedding, notes) for the record.
    ``ceiling=False`` leaves out the ceiling and the normalised rows (``perturbkit bench`` scores the ceiling once
    per task and normalises when it aggregates).
    ``moments``: ``{"truth": (mean, var), "source": (mean, var), "pred": {model: (mean, var)}}`` of all the cells
    target, source and each prediction are samples of (:func:`evaluate`); the ceiling splits the cells given.
    """
    tables, notes, embedding = [], {}, None
    for name, pred in preds.items():
        given = None if moments is None else {"truth": moments["truth"], "source": moments["source"],
                                              "pred": moments["pred"][name]}
        tab = evaluate(target, pred, source, None, metric_names, n_boot=n_boot, seed=seed,
                       execution=execution, moments=given)
        tables.append(tab.assign(model=name))
        notes[name] = tab.attrs.get("notes", [])
        embedding = embedding or tab.attrs.get("embedding")
    if ceiling:
        tables.append(_ceiling(target, source, seed=seed, metrics=metric_names, execution=execution)
                      .assign(model="ceiling"))
    scores = pd.concat(tables, ignore_index=True)
    if ceiling and baseline in preds:
        norm = normalise(scores, baseline=baseline, ceiling="ceiling")
        scores = pd.concat([scores, norm[norm.model != "ceiling"]], ignore_index=True)
    info = {"embedding": embedding, "notes": notes,
            "ceiling": "one random half of the real target cells scored against the other half",
            "normalised": f"(model - {baseline}) / (ceiling - {baseline}), rows with metric suffix _norm"}
    return scores[list(SCORE_COLUMNS)], info


def score_one(metric: str, target, pred, source, *, seed: int = 0, execution=None) -> float:
    """One metric of one prediction, no bootstrap (NaN when the metric is undefined)."""
    table = evaluate(target, pred, source, None, [metric], n_boot=0, seed=seed, execution=execution)
    return float(table["value"].iloc[0])


