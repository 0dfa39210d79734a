"""One task: fit -> predict -> score, with its timings, threads and versions. ``predict``, ``bench`` and ``tune``
all run their tasks through :func:`run_task` (or its two halves :func:`fit_predict` and :func:`score`).

Also here, once for the whole package: the output-directory guard (:func:`check_out`), library versions,
timestamps, the JSON encoder for records, the Student-t interval over seeds and the table / figure writers.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

SCORE_COLUMNS = ("model", "metric", "value", "ci_low", "ci_high", "higher_is_better", "error")
#: the libraries whose versions shape the numbers (recorded in every record)
LIBRARIES = ("numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "torch", "pot", "h5py", "matplotlib")

# ================================================================================================ task


@dataclass
class Fitted:
    """A fitted model, its prediction of the source cells and how long each half took."""

    model: Any
    pred: Any
    timings: dict[str, float] = field(default_factory=dict)
    threads: int | None = None


def fit_predict(model, train, source, spec, *, seed: int, threads: int | None = None, progress: bool = False,
                callback=None, fitted: bool = False) -> Fitted:
    """Fit ``model`` on ``train`` (unless ``fitted``) and predict ``source``; torch threads are set to ``threads``
    for models that train and restored afterwards."""
    check_threads(threads)
    timings: dict[str, float] = {}
    with torch_threads(threads if model.needs_torch else None, active=model.needs_torch) as used:
        t = time.perf_counter()
        if not fitted:
            model.fit(train, spec, seed=seed, progress=progress and model.needs_torch, callback=callback)
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pred = model.predict(source)
        timings["predict_s"] = time.perf_counter() - t
    return Fitted(model, pred, timings, used)


def score(target, source, preds: dict, metric_names=None, *, n_boot: int = 100, seed: int = 0,
          baseline: str = "control", ceiling: bool = True):
    """Score several models' predictions of one task; add the ceiling and baseline-normalised rows.

    ``preds`` maps model name -> predicted AnnData (it should hold ``baseline``). Returns the tidy table
    (columns :data:`SCORE_COLUMNS`; the ceiling's rows have model ``"ceiling"``, normalised rows a metric
    suffixed ``_norm``) and a dict describing the evaluation (embedding, notes) for the record.
    ``ceiling=False`` leaves out the ceiling and the normalised rows (``perturbkit bench`` scores the ceiling once
    per task and normalises when it aggregates).
    """
    import pandas as pd

    from . import metrics

    tables, notes, embedding = [], {}, None
    for name, pred in preds.items():
        tab = metrics.evaluate(target, pred, source, None, metric_names, n_boot=n_boot, seed=seed)
        tables.append(tab.assign(model=name))
        notes[name] = tab.attrs.get("notes", [])
        embedding = embedding or tab.attrs.get("embedding")
    if ceiling:
        tables.append(metrics.ceiling(target, source, seed=seed, metrics=metric_names).assign(model="ceiling"))
    scores = pd.concat(tables, ignore_index=True)
    if ceiling and baseline in preds:
        norm = metrics.normalise(scores, baseline=baseline, ceiling="ceiling")
        scores = pd.concat([scores, norm[norm.model != "ceiling"]], ignore_index=True)
    info = {"embedding": embedding, "notes": notes,
            "ceiling": "one random half of the real target cells scored against the other half",
            "normalised": f"(model - {baseline}) / (ceiling - {baseline}), rows with metric suffix _norm"}
    return scores[list(SCORE_COLUMNS)], info


def score_one(metric: str, target, pred, source, *, seed: int = 0) -> float:
    """One metric of one prediction, no bootstrap (NaN when the metric is undefined)."""
    from . import metrics

    table = metrics.evaluate(target, pred, source, None, [metric], n_boot=0, seed=seed)
    return float(table["value"].iloc[0])


@dataclass
class TaskResult:
    """What :func:`run_task` returns: the fits, the predictions, the scores and the evaluation notes."""

    fitted: dict[str, Fitted]
    scores: Any
    evaluation: dict[str, Any]
    timings: dict[str, float]

    @property
    def preds(self) -> dict[str, Any]:
        return {name: f.pred for name, f in self.fitted.items()}


def run_task(models: dict[str, Any], task, adata, spec, *, seed: int, metric_names=None, n_boot: int = 100,
             threads: int | None = None, progress: bool = False, ceiling: bool = True, baseline: str = "control",
             fitted: frozenset[str] = frozenset(), log: Callable | None = None) -> TaskResult:
    """Fit and predict every model of ``models`` (name -> unfitted model) on one split, then score them together.

    ``task`` is a :class:`perturbkit.split.Split` of ``adata``; ``fitted`` names models that are already fitted
    (e.g. loaded from disk). ``log(name, Fitted)`` is called after each model.
    """
    train, source, target = task.subsets(adata)
    out: dict[str, Fitted] = {}
    for name, model in models.items():
        out[name] = fit_predict(model, train, source, spec, seed=seed, threads=threads, progress=progress,
                                fitted=name in fitted)
        if log is not None:
            log(name, out[name])
    t = time.perf_counter()
    scores, info = score(target, source, {k: f.pred for k, f in out.items()}, metric_names, n_boot=n_boot,
                         seed=seed, baseline=baseline, ceiling=ceiling)
    return TaskResult(out, scores, info, {"evaluate_s": time.perf_counter() - t})


# ============================================================================================== threads


def check_threads(n, name: str = "threads") -> None:
    """Raise :class:`InputError` unless ``n`` is None (torch's default) or an integer >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"{name} must be >= 1, got {n!r}.", params=(name,))


@contextmanager
def torch_threads(n: int | None, *, active: bool = True, restore: bool = True):
    """Inside, torch uses ``n`` CPU threads (None: torch's default); yields the number in use (None when not
    ``active``, i.e. for models that do not use torch). The caller's setting is restored unless ``restore``."""
    check_threads(n)
    if not active:
        yield None
        return
    import torch

    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        if restore:
            torch.set_num_threads(previous)


# ======================================================================================= output directory


def check_out(out: Path, *, accepts: Callable[[Path, list[str]], bool], force: bool | None = None,
              what: str = "another run or tool") -> None:
    """The one output-directory guard: ``out`` must be new, empty, or a directory that ``accepts(out, entries)``
    (a previous run of the same configuration; ``entries``: its visible file names). ``force=True`` takes any
    directory; callers that offer no force leave it None (the message then does not offer it). A file, or a
    directory of anything else, raises :class:`InputError` naming the fix."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"out {str(out)!r} exists and is a file; give a directory.", params=("out",))
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not entries or force or accepts(out, entries):
        return
    fix = "Choose a new or empty directory" + (", or overwrite them with force." if force is not None else ".")
    raise InputError(f"out {str(out)!r} already holds other files ({', '.join(entries[:4])}) from {what}. {fix}",
                     params=("out", "force") if force is not None else ("out",))


# ================================================================================= versions, time, JSON

_VERSIONS: dict[str, str] = {}


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of Python, perturbkit and the libraries that shape the numbers (looked up once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    for dist in (*LIBRARIES, *extra):
        if dist not in _VERSIONS:
            try:
                _VERSIONS[dist] = version(dist)
            except PackageNotFoundError:
                _VERSIONS[dist] = "not installed"
    return {"python": platform.python_version(), "perturbkit": __version__,
            **{d: _VERSIONS[d] for d in (*LIBRARIES, *extra)}}


def platform_info() -> dict[str, str]:
    return {"system": platform.platform(), "machine": platform.machine(), "processor": platform.processor()}


def stamp(t: float | None = None) -> str:
    """A local ISO-8601 timestamp with offset (``time.time()`` when ``t`` is None)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if t is None else t))


def json_default(o):
    """``json.dumps(default=...)`` for records: numpy scalars and arrays, paths."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_json(obj, indent: int = 2) -> str:
    return json.dumps(obj, indent=indent, default=json_default) + "\n"


def t_interval(values, ci: float = 0.95) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high): the Student-t interval of the mean over seeds, NaNs dropped (NaN sd and
    interval with one value, all NaN with none)."""
    import numpy as np
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + ci / 2, len(v) - 1)) * sd / math.sqrt(len(v))
    return mean, sd, mean - half, mean + half


# ============================================================================================== writers


def write_csv(path: str | Path, table, *, float_format: str | None = "%.10g") -> None:
    """A table as CSV, atomically, in the one format every perturbkit table uses."""
    from . import _io

    _io.atomic_write_text(path, table.to_csv(index=False, float_format=float_format, lineterminator="\n"))


def write_png(path: str | Path, fig, dpi: int = 110) -> None:
    """A figure as PNG, atomically, without the software tag (so reruns give identical bytes)."""
    from . import _io

    _io.atomic_write_with(path, lambda p: fig.savefig(p, dpi=dpi, format="png", metadata={"Software": None}))
