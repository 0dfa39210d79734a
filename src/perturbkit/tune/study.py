"""The Optuna side of tuning: validation tasks, storage, the study, the objective, the trial loop, its tables.

The objective only ever holds the real task's *training* cells: each validation task holds out, inside them,
the perturbed cells of another context (:func:`validation_tasks`), so the held-out target is not reachable
from a trial.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..spec import PerturbSpec
from ..errors import InputError, choices_text, suggest
from .config import TuneConfig

# ------------------------------------------------------------------------------------------ validation task


def validation_contexts(train, spec: PerturbSpec, cfg: TuneConfig) -> list[str]:
    """The validation contexts: the configured ones, or the training contexts with most perturbed cells."""
    import numpy as np

    v, holdout = cfg.tune.validation, cfg.tune.holdout
    cond = train.obs[spec.condition_key].astype(str).to_numpy()
    ctx = train.obs[spec.context_key].astype(str).to_numpy()
    perturbed = np.isin(cond, spec.perturbations(train))  # the requested perturbations (one, or a screen's)
    n_pert = {c: int(((ctx == c) & perturbed).sum()) for c in np.unique(ctx)}
    n_ctrl = {c: int(((ctx == c) & (cond == spec.control)).sum()) for c in np.unique(ctx)}
    if v.contexts:
        for c in v.contexts:
            if c not in n_pert:
                raise InputError(f"tune.validation.contexts: {c!r} is not a context of the training cells."
                                 f"{suggest(c, n_pert)} Contexts: {choices_text(n_pert)}.")
        return list(v.contexts)
    ok = [c for c in n_pert if c != holdout and min(n_pert[c], n_ctrl[c]) >= v.min_cells]
    ok.sort(key=lambda c: (-n_pert[c], c))
    # a validation task needs another context with both conditions to learn the response from
    ok = ok[:min(v.n_contexts, max(len([c for c in n_pert if n_pert[c] and n_ctrl[c]]) - 1, 0))]
    if not ok:
        raise InputError(
            f"No training context other than {holdout!r} has >= {v.min_cells} cells of both conditions to "
            "serve as validation task; lower tune.validation.min_cells or name tune.validation.contexts."
        )
    return ok


def validation_tasks(train, spec: PerturbSpec, cfg: TuneConfig):
    """``[(context, Split of train)]``: each context's perturbed cells held out inside the training cells."""
    import re
    import warnings

    from .. import split
    from ..errors import InputWarning

    with warnings.catch_warnings():  # the real held-out context has control cells only here, by construction
        only = rf"context\(s\) {re.escape(repr(cfg.tune.holdout))} \(\w+ only\) "
        warnings.filterwarnings("ignore", message=only, category=InputWarning)
        return [(c, split.holdout_context(train, spec, c)) for c in validation_contexts(train, spec, cfg)]


# ----------------------------------------------------------------------------------------------- storage


def storage_url(storage: str | None, out: Path) -> str:
    """The storage URL: ``storage`` as given, or an SQLite file ``study.db`` in the run directory."""
    if storage is None:
        return f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    if "://" not in storage:  # a plain path: an SQLite file
        return f"sqlite:///{Path(storage).resolve()}"
    return storage


def redact(url: str) -> str:
    """The URL without its password (for records and logs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: keep scheme and host only
        return url.split("@")[-1] if "@" in url else url


def is_race(exc: Exception) -> bool:
    """A concurrent worker created the same table, type or study first (SQLAlchemy IntegrityError & co.)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("integrityerror", "duplicate", "already exists", "unique constraint",
                                   "database is locked"))


def open_study(cfg: TuneConfig, url: str, name: str, data_sha256: str, *, worker: int = 0):
    """Create or join the study ``name`` in ``url``; refuse to join one made with another configuration."""
    import random

    import optuna

    engine_kwargs = ({"connect_args": {"timeout": 120}} if url.startswith("sqlite")
                     else {"pool_pre_ping": True})
    # Workers started together race to create the schema and the study (PostgreSQL: "duplicate key value
    # violates unique constraint" on CREATE TYPE / the study row): the losers retry, then find them made.
    jitter = random.Random(worker)
    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=30,
                                                 grace_period=120)
            optuna.create_study(storage=storage, study_name=name, direction=cfg.direction,
                                load_if_exists=True)
            break
        except ImportError as exc:
            raise InputError(f"--storage {redact(url)}: its database driver is not installed ({exc}). For "
                             "PostgreSQL: pip install psycopg2-binary.") from None
        except Exception as exc:
            if attempt == 5 or not is_race(exc):
                raise InputError(f"--storage {redact(url)} could not be opened: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            time.sleep(0.2 + jitter.random())
    s, p = cfg.tune.sampler, cfg.tune.pruner
    sampler = optuna.samplers.TPESampler(seed=cfg.tune.seed + worker, n_startup_trials=s.n_startup_trials,
                                         multivariate=s.multivariate, constant_liar=s.constant_liar)
    if p.kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials,
                                             n_warmup_steps=p.n_warmup_steps, interval_steps=p.interval_steps)
    else:
        pruner = optuna.pruners.NopPruner()
    study = optuna.load_study(storage=storage, sampler=sampler, pruner=pruner, study_name=name)
    key = cfg.study_key(data_sha256)
    stored = study.user_attrs.get("perturbkit")
    if stored is None:
        study.set_user_attr("perturbkit", key)
    elif stored != key:
        diff = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
        raise InputError(f"study {name!r} in {redact(url)} was made with another configuration (differs in: "
                         f"{', '.join(diff)}). Give another --study name, or the config it was made with.")
    if study.direction.name.lower() != cfg.direction:
        raise InputError(f"study {name!r} {study.direction.name.lower()}s but metric {cfg.tune.metric!r} "
                         f"needs {cfg.direction}; give another --study name.")
    return study


def counted(study) -> int:
    """Trials that count towards ``--trials``: finished, pruned or running (failed ones are replaced)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING)))


# ------------------------------------------------------------------------------------------- objective


class Objective:
    """The function Optuna calls: train on each validation task, return the mean validation score.

    It holds only the real task's training cells (``train``); the held-out target is not reachable from here.
    Models that train (``needs_torch``) report a validation score to the pruner after the deciding epochs of
    the first validation task; other models are scored once.
    """

    def __init__(self, cfg: TuneConfig, train, tasks, *, execution=None, worker: int = 0, log=print):
        from .. import engine

        self.cfg, self.log, self.execution, self.worker = cfg, log, execution, worker
        self.tasks = [(name, engine.task_perturbations(split, cfg.spec), *split.subsets(train))
                      for name, split in tasks]

    def score(self, vtarget, preds: dict, vsource) -> float:
        """The objective on one validation task: ``[tune] metric`` of each perturbation's prediction against
        its real cells, averaged over the task's perturbations (one, or a screen's)."""
        import numpy as np

        from ..metrics import score_one

        cond = vtarget.obs[self.cfg.spec.condition_key].astype(str).to_numpy()
        values = [score_one(self.cfg.tune.metric, vtarget if len(preds) == 1 else vtarget[cond == p], pred,
                            vsource, seed=self.cfg.tune.seed, execution=self.execution)
                  for p, pred in preds.items()]
        return float(np.mean(values))

    def decides(self, epoch: int, last: int | None) -> bool:
        """Whether the pruner can act after ``epoch`` (scores are computed only then; never after the
        last)."""
        w, step = self.cfg.tune.pruner.n_warmup_steps, max(self.cfg.tune.pruner.interval_steps, 1)
        return epoch >= w and (epoch - w) % step == 0 and (last is None or epoch < last)

    def pruning_callback(self, trial, model, perts, vsource, vtarget, t0: float):
        """``callback(epoch, history)`` for ``model.fit``: score, report, maybe prune after deciding
        epochs."""
        import optuna

        cfg, last = self.cfg, model.params.get("epochs")
        metric = cfg.tune.metric

        def callback(epoch, history):
            if not self.decides(epoch, last):
                return False
            value = self.score(vtarget, {p: model.predict(vsource, p) for p in perts}, vsource)
            if math.isfinite(value):
                trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: {metric} = {value:.4g}")
            return False

        return callback

    def __call__(self, trial) -> float:
        import numpy as np
        import optuna

        from .. import engine, models

        cfg = self.cfg
        metric = cfg.tune.metric
        trial.set_user_attr("worker", self.worker)  # which worker ran it (several share a study)
        sampled = {name: dim.suggest(trial, name) for name, dim in cfg.space.items()}
        params = {**cfg.params, **sampled}
        t0 = time.perf_counter()
        values, epochs = [], []
        try:
            for k, (name, perts, vtrain, vsource, vtarget) in enumerate(self.tasks):
                model = models.get(cfg.name, **params)
                prunes = k == 0 and cfg.tune.pruner.kind != "none" and model.needs_torch
                callback = self.pruning_callback(trial, model, perts, vsource, vtarget, t0) if prunes else None
                fitted = engine.fit_predict(model, vtrain, vsource, cfg.spec, perts, seed=cfg.tune.seed,
                                            execution=self.execution, callback=callback)
                if fitted.cannot:
                    raise InputError(f"validation task {name!r}: " + "; ".join(fitted.cannot.values()))
                value = self.score(vtarget, fitted.preds, vsource)
                values.append(value)
                history = getattr(model, "history", None)
                epochs.append(history.epochs_run if history is not None else None)
                trial.set_user_attr(f"value:{name}", value)
        except (optuna.TrialPruned, InputError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a diverging configuration fails its trial, not the study
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
            return float("nan")
        trial.set_user_attr("epochs_run", epochs[0])
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
        value = float(np.mean(values))
        if not math.isfinite(value):
            trial.set_user_attr("error", f"{metric} is undefined for this prediction (NaN)")
        return value


class Surplus(Exception):
    """A trial begun when the study already held its total (workers that read the same count at once)."""


def optimize(study, objective, n_total: int, *, log=print, progress: bool = True, max_failures: int = 3):
    """Run trials in this process until the study holds ``n_total`` counted trials; returns the trials run
    (number, state, value).

    Workers that read the count together may each begin a trial; the storage numbers trials one by one, so a
    trial with ``n_total`` counted trials numbered below it is surplus: it fails at once (``error``: surplus)
    without training, and the study ends with exactly ``n_total`` finished trials.
    """
    import optuna
    from optuna.trial import TrialState

    ran: list[dict[str, Any]] = []
    failures = 0

    def bounded(trial):
        earlier = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                           TrialState.RUNNING))
        if sum(1 for t in earlier if t.number < trial.number) >= n_total:
            trial.set_user_attr("error", f"surplus: the study held its {n_total} trials when this one began")
            raise Surplus()
        return objective(trial)

    def note(study_, frozen):
        ran.append({"number": frozen.number, "state": frozen.state.name, "value": frozen.value})
        value = "" if frozen.value is None else f"{frozen.value:.4f}"
        pruned = frozen.state == TrialState.PRUNED
        extra = frozen.user_attrs.get("error") or (
            f"pruned at epoch {frozen.user_attrs.get('pruned_at_epoch')}" if pruned else "")
        log(f"trial {frozen.number}: {frozen.state.name.lower()} {value} "
            f"({frozen.user_attrs.get('seconds', 0):.0f} s) {extra}".rstrip())

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total, initial=min(counted(study), n_total), desc="trials", unit="trial",
                   leave=False)
    try:
        while True:
            optuna.storages.fail_stale_trials(study)
            if counted(study) >= n_total:
                break
            study.optimize(bounded, n_trials=1, callbacks=[note], catch=(Surplus,))
            failures = failures + 1 if ran and ran[-1]["state"] == "FAIL" else 0
            if bar is not None:
                bar.n = min(counted(study), n_total)
                bar.refresh()
            if failures >= max_failures:
                log(f"stopping: {failures} trials in a row failed (see the error column of trials.csv)")
                break
    finally:
        if bar is not None:
            bar.close()
    return ran


# ------------------------------------------------------------------------------------ tables and analysis


def trials_table(study):
    """One row per trial: number, state, value, seconds, params_*, user attributes (tidy, sorted)."""
    import pandas as pd

    rows = []
    for tr in study.get_trials(deepcopy=False):
        row = {"number": tr.number, "state": tr.state.name, "value": tr.value,
               "datetime_start": tr.datetime_start, "datetime_complete": tr.datetime_complete,
               "duration_s": tr.duration.total_seconds() if tr.duration is not None else None}
        row.update({f"params_{k}": v for k, v in tr.params.items()})
        row.update({f"user_attrs_{k}": v for k, v in tr.user_attrs.items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("number").reset_index(drop=True) if len(df) else df


def intermediate_table(study):
    """The per-epoch validation scores Optuna recorded: trial, state, epoch, value."""
    import pandas as pd

    rows = [{"trial": tr.number, "state": tr.state.name, "epoch": step, "value": value}
            for tr in study.get_trials(deepcopy=False)
            for step, value in sorted(tr.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["trial", "state", "epoch", "value"])


def param_importance(study, *, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each parameter for the objective (normalised to sum to 1)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return {k: float(v) for k, v in imp.items()}
