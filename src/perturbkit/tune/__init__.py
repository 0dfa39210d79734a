"""Hyperparameter tuning with Optuna, scored on a validation task that never sees the held-out target.

``perturbkit tune CONFIG.toml --out DIR`` (or ``pk.tune(config, out=DIR)``, the same as ``pk.tune.run``):

1. read the config (:mod:`.config`): bench's shared tables (``seeds``, ``[data]``, ``[preprocessing]``,
   ``[training]``, one ``[models.NAME]``, ``[evaluation]``) and ``[tune]``; the search space starts from the
   model class's ``SEARCH_SPACE``;
2. load and preprocess the data, make the real task (``[tune] holdout`` context's perturbed cells held out);
3. keep only the real task's *training* cells and carve validation tasks from them: hold out the perturbed
   cells of another context (chosen in ``[tune.validation]``, or the training contexts with most perturbed
   cells) (:func:`.study.validation_tasks`);
4. an Optuna study (:mod:`.study`: TPE sampler, seeded; median pruner on per-epoch validation scores of
   models that train) samples the model's parameters from the space; each trial fits on the validation task's
   training cells (:func:`perturbkit.engine.fit_predict`) and is scored with ``[tune] metric`` on the
   validation context's perturbed cells;
5. the best parameters and the default parameters (the model's own with its table's applied) are both
   retrained on the real task for every seed of ``seeds`` and scored on the real held-out target with the
   baselines and the ceiling (:mod:`.final`);
6. the run directory gets ``trials.csv``, ``intermediate.csv``, ``best_params.json``, ``final_scores.csv``,
   ``final_summary.csv``, ``importance.csv`` (fANOVA), figures, ``record.json`` and
   ``ro-crate-metadata.json``.

The study lives in an SQLite file (``DIR/study.db``) by default; any SQLAlchemy URL (PostgreSQL, MySQL) given
as ``storage`` lets several worker processes or machines run trials of one study (``worker_only=True``), after
which one plain run with the same config, storage and study does steps 5 and 6. See docs/tune.md.

A new model is tunable once its class sets ``SEARCH_SPACE`` (and ``DEFAULTS``); nothing here names a model.
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import (ALIASES, OLD_KEYS, RECORD_KIND, Dim, PrunerConfig, SamplerConfig, TuneConfig,
                     TuneSettings, ValidationConfig, config_from_dict, default_space, load_config, parse_dim)

__all__ = ["ALIASES", "OLD_KEYS", "RECORD_KIND", "Dim", "PrunerConfig", "SamplerConfig", "TuneConfig",
           "TuneSettings", "ValidationConfig", "config_from_dict", "default_space", "load_config",
           "parse_dim", "run"]


def run(config: TuneConfig | str | Path, out: str | Path, *, trials: int | None = None,
        storage: str | None = None, study: str | None = None, worker: int = 0, worker_only: bool = False,
        threads: int | None = None, device: str | None = None, progress: bool = True, log=print,
        command: str | None = None,
        config_text: str | None = None) -> dict[str, Any]:
    """Run (or continue) a study and, unless ``worker_only``, evaluate its best parameters; return the
    record.

    Parameters
    ----------
    config
        a :class:`TuneConfig` or the path of its TOML file.
    out
        the run directory (new, empty, or a tuning run of the same model).
    trials
        the study's total number of trials (finished, pruned or running; default ``[tune] trials``); trials
        already in the storage count, so rerunning continues an interrupted study.
    storage, study
        the Optuna storage (SQLAlchemy URL or SQLite file; default ``out/study.db``) and study name (default
        from the model and a hash of the study key). Several processes given the same ``storage`` and
        ``study`` share the work.
    worker
        this process's number: it offsets the sampler's seed (give each concurrent process its own).
    worker_only
        only run trials and return the worker's summary (also written to ``out/workers/worker-N.json``).
    threads
        torch CPU threads (default ``[training] threads``, else torch's).
    device
        where the models train and predict (default ``[training] device``, else ``"auto"``; see
        :func:`perturbkit.execution.resolve`).
    progress, log
        a progress bar; where progress lines go.
    command
        the command line, for the record.
    config_text
        the TOML as written, kept as ``out/config.toml`` (read from ``config`` when it is a path).
    """
    import warnings

    with warnings.catch_warnings():
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeat, fail_stale_trials
        return _run(config, out, trials=trials, storage=storage, study=study, worker=worker,
                    worker_only=worker_only, threads=threads, device=device, progress=progress, log=log,
                    command=command,
                    config_text=config_text)


def _run(config, out, *, trials, storage, study, worker, worker_only, threads, device, progress, log, command,
         config_text):
    import numpy as np
    import optuna

    from .. import _io, data, execution, models, split
    from .. import record as rec
    from .._io import atomic_write_text
    from ..config import plain
    from . import final
    from .study import Objective, counted, open_study, optimize, redact, storage_url, validation_tasks

    if not isinstance(config, TuneConfig) and config_text is None:
        config_text = Path(config).read_text() if Path(config).is_file() else None
    cfg = config if isinstance(config, TuneConfig) else load_config(config)
    n_total = cfg.tune.trials if trials is None else trials
    if isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < 0:
        raise InputError(f"--trials must be an integer >= 0, got {n_total!r}.")
    if isinstance(worker, bool) or not isinstance(worker, int) or worker < 0:
        raise InputError(f"--worker must be an integer >= 0, got {worker!r}.")
    execution.check_threads(threads, "--threads")
    ex = cfg.training.execution(threads=threads, device=device)  # a device that is not there: the error now
    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(out)
    _io.check_out(out, accepts=final.accepts_out(cfg))
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage, out)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    t = time.perf_counter()
    adata, digest, source_desc = cfg.data.load()
    data.validate(adata, cfg.spec, holdout=cfg.tune.holdout)
    adata, pp_info = data.preprocess(adata, cfg.preprocessing, log=log)
    task = split.holdout_context(adata, cfg.spec, cfg.tune.holdout)
    train = adata[task.train].copy()
    tasks = validation_tasks(train, cfg.spec, cfg)
    for vname, vsplit in tasks:  # true by construction; checked because it is the promise of this module
        seen = task.train[np.concatenate([vsplit.train, vsplit.source, vsplit.target])]
        if np.isin(seen, task.target).any():
            raise RuntimeError(f"validation task {vname!r} holds held-out target cells; please report this "
                               "bug")
    timings["prepare_s"] = time.perf_counter() - t
    log(f"real task {task.name}: {len(task.train)} training cells, {len(task.target)} held-out target cells "
        f"(never seen while tuning); validation: " + ", ".join(
            f"{v} ({len(s.target)} perturbed cells held out)" for v, s in tasks))

    name = study or cfg.default_study_name(digest)
    st = open_study(cfg, url, name, digest, worker=worker)
    log(f"study {name!r} in {redact(url)}: {counted(st)} trials so far, running to {n_total} "
        f"({cfg.direction} {cfg.tune.metric})")
    with ex.activate(torch_used=models.MODELS[cfg.name].needs_torch) as n_threads:
        t = time.perf_counter()
        ran = optimize(st, Objective(cfg, train, tasks, execution=ex, worker=worker, log=log), n_total, log=log,
                       progress=progress)
        timings["trials_s"] = time.perf_counter() - t
        worker_info = {"worker": worker, "study": name, "storage": redact(url), "trials": ran,
                       "seconds": timings["trials_s"], "sampler_seed": cfg.tune.seed + worker}
        if worker_only or ran:  # a results-only run (no trial left to run) must not replace a worker's record
            atomic_write_text(out / "workers" / f"worker-{worker}.json", _io.to_json(worker_info))
        if worker_only:
            return worker_info
        parts = final.results(cfg, st, out, adata, task, execution=ex, timings=timings, log=log,
                              progress=progress)

    if config_text is not None:
        atomic_write_text(out / "config.toml", config_text)
    timings["total_s"] = time.time() - t_start
    ts = cfg.tune
    record = {
        "kind": RECORD_KIND,
        "config": cfg.to_dict(),
        "command": command,
        "started": rec.stamp(t_start),
        "ended": rec.stamp(),
        "versions": rec.versions(extra=("optuna", "sqlalchemy")),
        "determinism": {
            "seed": ts.seed, "torch_threads": n_threads, "execution": ex.describe(),
            "note": "one worker: the same config, seed, thread count and library versions give the same "
                    "trials. Several workers: the order in which trials finish depends on timing, so the "
                    "study differs between runs; each worker's sampler is seeded with seed + worker.",
        },
        "data": {**source_desc, "sha256": digest, "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)},
        "spec": cfg.spec.to_dict(),
        "preprocessing": pp_info,
        "split": task.to_dict(adata.obs_names),
        "validation": {
            "note": "trials see only the real task's training cells; each validation task holds out the "
                    "perturbed cells of another context inside them",
            "tasks": [{"context": v, **s.to_dict(train.obs_names)} for v, s in tasks],
        },
        "study": {"name": name, "storage": redact(url), "direction": cfg.direction, "metric": ts.metric,
                  "trials_requested": n_total, "states": parts["states"],
                  "sampler": {"name": "TPESampler", **plain(ts.sampler), "seed": ts.seed},
                  "pruner": plain(ts.pruner)},
        "best": parts["best"],
        "importance": parts["importance"],
        "final": parts["final"],
        "timings": timings,
        "outputs": {o: data.sha256(out / o) for o in parts["outputs"]},
    }
    atomic_write_text(out / "record.json", _io.to_json(record))
    final.write_crate(out, record)
    return record


# ------------------------------------------------------------------------------------ pk.tune(...) alias


class _CallableModule(types.ModuleType):
    """Lets ``pk.tune(config, out=...)`` call :func:`run` while ``pk.tune.run`` and the rest stay
    reachable."""

    def __call__(self, *args, **kwargs):
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
