"""Hyperparameter tuning with Optuna, scored on a validation task that never sees the held-out target.

``perturbkit tune CONFIG.toml --out DIR`` (or ``pk.tune(config, out=DIR)``, the same as ``pk.tune.run``):

1. load and preprocess the data, make the real task (``holdout`` context's perturbed cells held out);
2. keep only the real task's *training* cells and carve validation tasks from them: hold out the perturbed
   cells of another context (chosen in the config, or the training contexts with most perturbed cells);
3. an Optuna study (TPE sampler, seeded; median pruner on per-epoch validation scores) samples the model's
   parameters from the search space; each trial trains on the validation task's training cells and is scored
   with the config's metric on the validation context's perturbed cells;
4. the best parameters and the model's default parameters are both retrained on the real task over several
   seeds and scored on the real held-out target (with the baselines and the ceiling on the same split);
5. the run directory gets ``trials.csv``, ``intermediate.csv``, ``best_params.json``, ``final_scores.csv``,
   ``final_summary.csv``, ``importance.csv`` (fANOVA), figures, ``record.json`` and ``ro-crate-metadata.json``.

The study lives in an SQLite file (``DIR/study.db``) by default; any SQLAlchemy URL (PostgreSQL, MySQL) given as
``storage`` lets several worker processes or machines run trials of one study (``worker_only=True``), after
which one plain run with the same config, storage and study does step 4 and 5. See docs/tune.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import types
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import PerturbSpec, Preprocessing
from .errors import InputError, choices_text, suggest

RECORD_KIND = "perturbkit.tune"
DIM_TYPES = ("int", "float", "categorical")

#: the tutorial's knobs, per model: table form as written in a config's ``[space]`` section
DEFAULT_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "scgen": {
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "n_latent": {"type": "categorical", "choices": [10, 25, 50, 100]},
        "n_hidden": {"type": "categorical", "choices": [128, 256, 512, 800]},
        "dropout_rate": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
        "input_noise": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "kl_weight": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
        "epochs": {"type": "int", "low": 10, "high": 100, "step": 10},
    },
    "scpram": {
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "n_latent": {"type": "categorical", "choices": [10, 25, 50, 100]},
        "n_hidden": {"type": "categorical", "choices": [128, 256, 512, 1000]},
        "dropout_rate": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
        "input_noise": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
        "ratio": {"type": "float", "low": 0.005, "high": 0.2, "log": True},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "kl_weight": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
        "epochs": {"type": "int", "low": 10, "high": 100, "step": 10},
    },
}

#: names other tools use for a knob -> perturbkit's name (for error messages)
ALIASES = {"noise_rate": "input_noise", "latent_dim": "n_latent", "hidden_dim": "n_hidden",
           "learning_rate": "lr", "dropout": "dropout_rate", "kl": "kl_weight", "alpha": "kl_weight"}


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class Dim:
    """One dimension of a search space: ``int`` / ``float`` between ``low`` and ``high`` (optionally ``log`` or
    with a ``step``), or ``categorical`` over ``choices``."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial, name: str):
        if self.type == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        d = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass(frozen=True)
class ValidationConfig:
    """Which training contexts serve as validation tasks (their perturbed cells held out inside the training
    cells). ``contexts = []``: the ``n_contexts`` training contexts with most perturbed cells."""

    contexts: tuple[str, ...] = ()
    n_contexts: int = 1
    min_cells: int = 30


@dataclass(frozen=True)
class SamplerConfig:
    """Optuna's TPE sampler (seeded with the config's seed plus the worker number)."""

    n_startup_trials: int = 10
    multivariate: bool = True
    constant_liar: bool = True


@dataclass(frozen=True)
class PrunerConfig:
    """``kind = "median"``: stop a trial whose validation score after an epoch is worse than the median of
    earlier trials at that epoch (Optuna's MedianPruner); ``"none"`` switches pruning off.

    Steps are epochs (counted from 1): the first pruning decision is after epoch ``n_warmup_steps``, then every
    ``interval_steps`` epochs, never after the last epoch. Validation scores are computed only at those epochs.
    """

    kind: str = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 1
    interval_steps: int = 1


@dataclass(frozen=True)
class FinalConfig:
    """The retraining of the best and the default parameters on the real task."""

    seeds: tuple[int, ...] = (0, 1, 2)
    metrics: tuple[str, ...] | None = None  # None: every metric
    n_boot: int = 100


@dataclass(frozen=True)
class TuneConfig:
    """Everything that defines a tuning run; read from TOML with :func:`load_config`."""

    model: str = "scgen"
    data: str = "kang2018"
    holdout: str = "CD4 T cells"
    metric: str = "pearson_delta"
    trials: int = 20
    seed: int = 0
    threads: int | None = None
    spec: PerturbSpec = field(default_factory=PerturbSpec)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    params: dict[str, Any] = field(default_factory=dict)  # fixed for every trial and for the default config
    space: dict[str, Dim] = field(default_factory=dict)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    final: FinalConfig = field(default_factory=FinalConfig)

    @property
    def direction(self) -> str:
        from .metrics import METRICS

        return "maximize" if METRICS[self.metric].higher_is_better else "minimize"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["space"] = {k: v.to_dict() for k, v in self.space.items()}
        return json.loads(json.dumps(d))

    def study_key(self, data_sha256: str) -> dict[str, Any]:
        """What shapes a trial's value (the data by its sha256, not its path, so that workers on other machines
        agree): a study may only be continued with the same key."""
        d = self.to_dict()
        key = {k: d[k] for k in ("model", "holdout", "metric", "seed", "spec", "preprocessing", "params", "space",
                                 "validation")}
        return {**key, "data_sha256": data_sha256}

    def default_study_name(self, data_sha256: str) -> str:
        digest = hashlib.sha256(json.dumps(self.study_key(data_sha256), sort_keys=True).encode()).hexdigest()
        return f"perturbkit-{self.model}-{digest[:10]}"


def _unknown(where: str, key: str, known) -> InputError:
    hint = suggest(key, known)
    return InputError(f"{where}: unknown key {key!r}.{hint} Known keys: {choices_text(known, 30)}.")


def _build(cls, table: dict, where: str, convert=None):
    if not isinstance(table, dict):
        raise InputError(f"{where} must be a table ([{where}] or {{ ... }}), got {table!r}.")
    known = [f.name for f in fields(cls)]
    for key in table:
        if key not in known:
            raise _unknown(where, key, known)
    for f in fields(cls):
        if f.name in table:
            _check_type(f"{where}.{f.name}", table[f.name], f.default)
    kwargs = dict(table)
    for key, fn in (convert or {}).items():
        if key in kwargs:
            kwargs[key] = fn(kwargs[key])
    return cls(**kwargs)


def _check_type(where: str, value: Any, default: Any) -> None:
    """Refuse a value whose type differs from the field default's (an int is fine where a float is expected)."""
    if default is None or default is MISSING or value is None:
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
        ok, want = isinstance(value, (list, tuple)), "a list"
    else:
        return
    if not ok:
        raise InputError(f"{where} must be {want} (like its default {default!r}), got {value!r}.")


def parse_dim(name: str, spec: Any) -> Dim:
    """A search-space entry from its TOML table; raise :class:`InputError` naming the fix when malformed."""
    where = f"space.{name}"
    if not isinstance(spec, dict):
        raise InputError(f"{where}: expected a table like {{ type = \"float\", low = 0.0, high = 0.5 }}, got "
                         f"{spec!r} (a fixed value belongs in [params]).")
    for key in spec:
        if key not in ("type", "low", "high", "log", "step", "choices"):
            raise _unknown(where, key, ("type", "low", "high", "log", "step", "choices"))
    kind = spec.get("type")
    if kind is None:
        kind = "categorical" if "choices" in spec else ("int" if all(isinstance(spec.get(k), int)
                                                                  for k in ("low", "high")) else "float")
    if kind not in DIM_TYPES:
        raise InputError(f"{where}: type {kind!r} is unknown.{suggest(str(kind), DIM_TYPES)} "
                         f"Types: {choices_text(DIM_TYPES)}.")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{where}: a categorical dimension needs a non-empty list `choices = [...]`.")
        if any(k in spec for k in ("low", "high", "log", "step")):
            raise InputError(f"{where}: a categorical dimension takes `choices` only, not low/high/log/step.")
        return Dim("categorical", choices=tuple(choices))
    if "choices" in spec:
        raise InputError(f"{where}: `choices` is only for type = \"categorical\".")
    if "low" not in spec or "high" not in spec:
        raise InputError(f"{where}: a {kind} dimension needs `low` and `high`.")
    low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{where}: {key} must be a number, got {value!r}.")
        if kind == "int" and value is not None and value != int(value):
            raise InputError(f"{where}: {key} of an int dimension must be a whole number, got {value!r}.")
    if not low < high:
        raise InputError(f"{where}: low ({low}) must be below high ({high}).")
    if log and low <= 0:
        raise InputError(f"{where}: a log-scaled dimension needs low > 0, got {low}.")
    if log and step is not None:
        raise InputError(f"{where}: `log` and `step` cannot be combined (Optuna's rule); drop one.")
    if step is not None and step <= 0:
        raise InputError(f"{where}: step must be > 0, got {step}.")
    if kind == "int":
        return Dim("int", int(low), int(high), log, int(step) if step is not None else None)
    return Dim("float", float(low), float(high), log, float(step) if step is not None else None)


def default_space(model: str) -> dict[str, Dim]:
    """The default search space of ``model`` (the tutorial's knobs the model has)."""
    from . import models

    cls = models.MODELS.get(model)
    known = set(getattr(cls, "DEFAULTS", {}))
    table = DEFAULT_SPACES.get(model)
    if table is None:  # a model registered later: the shared VAE knobs it has
        table = {k: v for k, v in DEFAULT_SPACES["scgen"].items() if k in known}
    return {k: parse_dim(k, v) for k, v in table.items() if k in known}


def _check_param_names(model: str, names, where: str) -> None:
    from . import models

    cls = models.MODELS[model]
    known = getattr(cls, "DEFAULTS", None)
    if not known:
        raise InputError(f"model {model!r} has no parameters to tune (it does not train); tune scgen or scpram.")
    for name in names:
        if name not in known:
            alias = f" perturbkit calls it {ALIASES[name]!r}." if name in ALIASES else suggest(name, known)
            raise InputError(f"{where}: {model} has no parameter {name!r}.{alias} Known: "
                             f"{choices_text(known, 40)}.")


def config_from_dict(raw: dict[str, Any], *, where: str = "config") -> TuneConfig:
    """A validated :class:`TuneConfig` from a parsed TOML document."""
    from . import metrics, models
    from .data import DATASETS

    top = [f.name for f in fields(TuneConfig)]
    for key in raw:
        if key not in top:
            raise _unknown(where, key, top)
    kw: dict[str, Any] = {k: raw[k] for k in ("model", "data", "holdout", "metric", "trials", "seed", "threads")
                          if k in raw}
    model = kw.get("model", TuneConfig.model)
    if model not in models.MODELS:
        raise InputError(f"{where}: model {model!r} is unknown.{suggest(model, models.MODELS)} "
                         f"Models: {choices_text(models.MODELS)}.")
    metric = kw.get("metric", TuneConfig.metric)
    if metric not in metrics.METRICS:
        raise InputError(f"{where}: metric {metric!r} is unknown.{suggest(metric, metrics.METRICS)} "
                         f"Metrics: {choices_text(metrics.METRICS, 30)}.")
    for key in ("trials", "seed"):
        if key in kw and (not isinstance(kw[key], int) or isinstance(kw[key], bool) or kw[key] < 0):
            raise InputError(f"{where}: {key} must be a whole number >= 0, got {kw[key]!r}.")
    if "threads" in kw and kw["threads"] is not None and (not isinstance(kw["threads"], int) or kw["threads"] < 1):
        raise InputError(f"{where}: threads must be a whole number >= 1, got {kw['threads']!r}.")
    data = kw.get("data", TuneConfig.data)
    if "spec" in raw:
        kw["spec"] = _build(PerturbSpec, raw["spec"], "spec")
    elif data in DATASETS:
        kw["spec"] = DATASETS[data].spec
    if "preprocessing" in raw:
        pp = dict(raw["preprocessing"]) if isinstance(raw["preprocessing"], dict) else raw["preprocessing"]
        if isinstance(pp, dict) and pp.get("normalize") == "auto":
            pp["normalize"] = None
        if isinstance(pp, dict) and pp.get("n_top_genes") == 0:
            pp["n_top_genes"] = None
        kw["preprocessing"] = _build(Preprocessing, pp, "preprocessing")
    params = raw.get("params", {})
    if not isinstance(params, dict):
        raise InputError(f"params must be a table of fixed model parameters, got {params!r}.")
    _check_param_names(model, params, "params")
    kw["params"] = dict(params)
    space_raw = dict(raw.get("space", {}))
    use_defaults = space_raw.pop("use_defaults", True)
    if not isinstance(use_defaults, bool):
        raise InputError(f"space.use_defaults must be true or false, got {use_defaults!r}.")
    _check_param_names(model, space_raw, "space")
    space = default_space(model) if use_defaults else {}
    space.update({k: parse_dim(k, v) for k, v in space_raw.items()})
    for name in params:  # a fixed parameter is not searched
        space.pop(name, None)
    if not space:
        raise InputError("space: the search space is empty; add dimensions under [space] (or use_defaults = true).")
    kw["space"] = space
    kw["validation"] = _build(ValidationConfig, raw.get("validation", {}), "validation",
                              {"contexts": lambda v: tuple(str(x) for x in v)})
    kw["sampler"] = _build(SamplerConfig, raw.get("sampler", {}), "sampler")
    kw["pruner"] = _build(PrunerConfig, raw.get("pruner", {}), "pruner")
    kw["final"] = _build(FinalConfig, raw.get("final", {}), "final",
                         {"seeds": lambda v: tuple(int(x) for x in v),
                          "metrics": lambda v: tuple(v) if v is not None else None})
    cfg = TuneConfig(**kw)
    if cfg.pruner.kind not in ("median", "none"):
        raise InputError(f"pruner.kind {cfg.pruner.kind!r} is unknown; use \"median\" or \"none\".")
    if cfg.validation.n_contexts < 1:
        raise InputError(f"validation.n_contexts must be >= 1, got {cfg.validation.n_contexts}.")
    if cfg.holdout in cfg.validation.contexts:
        raise InputError(f"validation.contexts holds the held-out context {cfg.holdout!r}: the objective must "
                         "never see the held-out target. Choose other contexts.")
    if not cfg.final.seeds:
        raise InputError("final.seeds is empty; give at least one seed, e.g. seeds = [0, 1, 2].")
    if cfg.final.metrics is not None:
        metrics._resolve(cfg.final.metrics)
    return cfg


def load_config(path: str | Path) -> TuneConfig:
    """Read a tuning config from TOML (see docs/tune.md and configs/tune_*.toml)."""
    from ._io import read_toml
    from .data import DATASETS

    path = Path(path)
    raw = read_toml(path)

    data = raw.get("data")
    if isinstance(data, str) and data not in DATASETS and not Path(data).is_absolute():
        raw = {**raw, "data": str((path.parent / data).resolve())}  # a relative path is relative to the config
    return config_from_dict(raw, where=str(path))


# ------------------------------------------------------------------------------------------ validation task


def validation_contexts(train, spec: PerturbSpec, cfg: TuneConfig) -> list[str]:
    """The validation contexts: the configured ones, or the training contexts with most perturbed cells."""
    import numpy as np

    cond = train.obs[spec.condition_key].astype(str).to_numpy()
    ctx = train.obs[spec.context_key].astype(str).to_numpy()
    n_pert = {c: int(((ctx == c) & (cond == spec.perturbed)).sum()) for c in np.unique(ctx)}
    n_ctrl = {c: int(((ctx == c) & (cond == spec.control)).sum()) for c in np.unique(ctx)}
    if cfg.validation.contexts:
        for c in cfg.validation.contexts:
            if c not in n_pert:
                raise InputError(f"validation.contexts: {c!r} is not a context of the training cells."
                                 f"{suggest(c, n_pert)} Contexts: {choices_text(n_pert)}.")
        return list(cfg.validation.contexts)
    ok = [c for c in n_pert if c != cfg.holdout and min(n_pert[c], n_ctrl[c]) >= cfg.validation.min_cells]
    ok.sort(key=lambda c: (-n_pert[c], c))
    # a validation task needs another context with both conditions to learn the response from
    ok = ok[:min(cfg.validation.n_contexts, max(len([c for c in n_pert if n_pert[c] and n_ctrl[c]]) - 1, 0))]
    if not ok:
        raise InputError(
            f"No training context other than {cfg.holdout!r} has >= {cfg.validation.min_cells} cells of both "
            "conditions to serve as validation task; lower validation.min_cells or name validation.contexts."
        )
    return ok


def validation_tasks(train, spec: PerturbSpec, cfg: TuneConfig):
    """``[(context, Split into train)]``: each context's perturbed cells held out inside the training cells."""
    import re
    import warnings

    from . import split

    with warnings.catch_warnings():  # the real held-out context has control cells only here, by construction
        try:
            from .errors import InputWarning

            warnings.filterwarnings("ignore", message=rf"context\(s\) {re.escape(repr(cfg.holdout))} \(\w+ only\) ",
                                    category=InputWarning)
        except ImportError:
            pass
        return [(c, split.holdout_cell_type(train, spec, c)) for c in validation_contexts(train, spec, cfg)]


# ----------------------------------------------------------------------------------------------- study


def storage_url(storage: str | None, out: Path) -> str:
    """The storage URL: ``storage`` as given, or an SQLite file ``study.db`` in the run directory."""
    if storage is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
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


def open_study(cfg: TuneConfig, url: str, name: str, data_sha256: str, *, worker: int = 0):
    """Create or join the study ``name`` in ``url``; refuse to join one made with another configuration."""
    import optuna

    import random
    import time

    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    # Workers started together race to create the schema and the study (PostgreSQL: "duplicate key value
    # violates unique constraint" on CREATE TYPE / the study row): the losers retry, then find them made.
    jitter = random.Random(worker)
    for attempt in range(6):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=30,
                                                 grace_period=120)
            study = optuna.create_study(storage=storage, study_name=name, direction=cfg.direction,
                                        load_if_exists=True)
            break
        except ImportError as exc:
            raise InputError(f"--storage {redact(url)}: its database driver is not installed ({exc}). For "
                             "PostgreSQL: pip install psycopg2-binary.") from None
        except Exception as exc:
            if attempt == 5 or not _is_race(exc):
                raise InputError(f"--storage {redact(url)} could not be opened: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
            time.sleep(0.2 + jitter.random())
    sampler = optuna.samplers.TPESampler(
        seed=cfg.seed + worker, n_startup_trials=cfg.sampler.n_startup_trials,
        multivariate=cfg.sampler.multivariate, constant_liar=cfg.sampler.constant_liar,
    )
    if cfg.pruner.kind == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner.n_startup_trials,
                                             n_warmup_steps=cfg.pruner.n_warmup_steps,
                                             interval_steps=cfg.pruner.interval_steps)
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
        raise InputError(f"study {name!r} {study.direction.name.lower()}s but metric {cfg.metric!r} needs "
                         f"{cfg.direction}; give another --study name.")
    return study


def _is_race(exc: Exception) -> bool:
    """A concurrent worker created the same table, type or study first (SQLAlchemy IntegrityError & co.)."""
    text = f"{type(exc).__name__} {exc}".lower()
    return any(k in text for k in ("integrityerror", "duplicate", "already exists", "unique constraint",
                                   "database is locked"))


def _counted(study) -> int:
    """Trials that count towards ``--trials``: finished, pruned or running (failed ones are replaced)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING)))


# ------------------------------------------------------------------------------------------- objective


def score(metric: str, target, pred, source, *, seed: int = 0) -> float:
    """One metric of one prediction, no bootstrap (NaN when the metric is undefined)."""
    from . import metrics

    table = metrics.evaluate(target, pred, source, None, [metric], n_boot=0, seed=seed)
    return float(table["value"].iloc[0])


class Objective:
    """The function Optuna calls: train on each validation task, return the mean validation score.

    It holds only the real task's training cells (``train``); the held-out target is not reachable from here.
    """

    def __init__(self, cfg: TuneConfig, train, tasks, *, log=print):
        self.cfg, self.log = cfg, log
        self.tasks = [(name, *split.subsets(train)) for name, split in tasks]

    def decides(self, epoch: int, last: int | None) -> bool:
        """Whether the pruner can act after ``epoch`` (scores are computed only then; never after the last)."""
        w, step = self.cfg.pruner.n_warmup_steps, max(self.cfg.pruner.interval_steps, 1)
        return epoch >= w and (epoch - w) % step == 0 and (last is None or epoch < last)

    def __call__(self, trial) -> float:
        import numpy as np
        import optuna

        from . import models

        cfg = self.cfg
        sampled = {name: dim.suggest(trial, name) for name, dim in cfg.space.items()}
        params = {**cfg.params, **sampled}
        t0 = time.perf_counter()
        values, epochs = [], []
        try:
            for k, (name, vtrain, vsource, vtarget) in enumerate(self.tasks):
                model = models.get(cfg.model, **params)
                callback = None
                if k == 0 and cfg.pruner.kind != "none":
                    last = model.params.get("epochs")

                    def callback(epoch, history, model=model, vsource=vsource, vtarget=vtarget):
                        if not self.decides(epoch, last):
                            return False
                        value = score(cfg.metric, vtarget, model.predict(vsource), vsource, seed=cfg.seed)
                        if math.isfinite(value):
                            trial.report(value, epoch)
                        if trial.should_prune():
                            trial.set_user_attr("pruned_at_epoch", epoch)
                            trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
                            raise optuna.TrialPruned(f"pruned at epoch {epoch}: {cfg.metric} = {value:.4g}")
                        return False
                model.fit(vtrain, cfg.spec, seed=cfg.seed, progress=False, callback=callback)
                value = score(cfg.metric, vtarget, model.predict(vsource), vsource, seed=cfg.seed)
                values.append(value)
                epochs.append(model.history.epochs_run if getattr(model, "history", None) else None)
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
            trial.set_user_attr("error", f"{cfg.metric} is undefined for this prediction (NaN)")
        return value


def _optimize(study, objective, n_total: int, *, log=print, progress: bool = True, max_failures: int = 3):
    """Run trials in this process until the study holds ``n_total`` counted trials; returns their numbers."""
    import optuna
    from optuna.trial import TrialState

    ran: list[dict[str, Any]] = []
    failures = 0

    def note(study_, frozen):
        ran.append({"number": frozen.number, "state": frozen.state.name, "value": frozen.value})
        value = "" if frozen.value is None else f"{frozen.value:.4f}"
        extra = frozen.user_attrs.get("error") or (f"pruned at epoch {frozen.user_attrs.get('pruned_at_epoch')}"
                                                   if frozen.state == TrialState.PRUNED else "")
        log(f"trial {frozen.number}: {frozen.state.name.lower()} {value} "
            f"({frozen.user_attrs.get('seconds', 0):.0f} s) {extra}".rstrip())

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_total, initial=min(_counted(study), n_total), desc="trials", unit="trial", leave=False)
    try:
        while True:
            optuna.storages.fail_stale_trials(study)
            if _counted(study) >= n_total:
                break
            study.optimize(objective, n_trials=1, callbacks=[note])
            failures = failures + 1 if ran and ran[-1]["state"] == "FAIL" else 0
            if bar is not None:
                bar.n = min(_counted(study), n_total)
                bar.refresh()
            if failures >= max_failures:
                log(f"stopping: {failures} trials in a row failed (see the error column of trials.csv)")
                break
    finally:
        if bar is not None:
            bar.close()
    return ran


# ----------------------------------------------------------------------------------------------- run


def run(config: TuneConfig | str | Path, out: str | Path, *, trials: int | None = None, storage: str | None = None,
        study: str | None = None, worker: int = 0, worker_only: bool = False, threads: int | None = None,
        progress: bool = True, log=print, command: str | None = None,
        config_text: str | None = None) -> dict[str, Any]:
    """Run (or continue) a study and, unless ``worker_only``, evaluate its best parameters; returns the record.

    ``trials``: the study's total number of trials (finished, pruned or running); trials already in the
    storage count, so rerunning continues an interrupted study. Several processes given the same ``storage``
    and ``study`` share the work (give each its own ``worker`` number: it offsets the sampler's seed).
    With ``worker_only`` only trials are run and the worker's summary (``DIR/workers/worker-N.json``) returned.
    ``config_text``: the TOML as written, kept as ``DIR/config.toml`` (read from ``config`` when it is a path).
    """
    import warnings

    with warnings.catch_warnings():
        from optuna.exceptions import ExperimentalWarning

        warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeat, fail_stale_trials
        return _run(config, out, trials=trials, storage=storage, study=study, worker=worker,
                    worker_only=worker_only, threads=threads, progress=progress, log=log, command=command,
                    config_text=config_text)


def _run(config, out, *, trials, storage, study, worker, worker_only, threads, progress, log, command, config_text):
    import numpy as np

    from . import _io, data, models, pipeline, split

    if not isinstance(config, TuneConfig) and config_text is None:
        config_text = Path(config).read_text() if Path(config).is_file() else None
    cfg = config if isinstance(config, TuneConfig) else load_config(config)
    n_total = cfg.trials if trials is None else trials
    if n_total < 0:
        raise InputError(f"--trials must be >= 0, got {n_total}.")
    if worker < 0:
        raise InputError(f"--worker must be >= 0, got {worker}.")
    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(out)
    _check_out(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    url = storage_url(storage, out)
    n_threads = pipeline._threads(threads if threads is not None else cfg.threads)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    t = time.perf_counter()
    adata, digest, source_desc = data.load_any(cfg.data)
    cfg.spec.validate(adata, holdout=cfg.holdout)
    adata, pp_info = data.preprocess(adata, cfg.preprocessing, log=log)
    task = split.holdout_cell_type(adata, cfg.spec, cfg.holdout)
    train = adata[task.train].copy()
    tasks = validation_tasks(train, cfg.spec, cfg)
    for vname, vsplit in tasks:  # true by construction; checked because it is the promise of this module
        if np.isin(task.train[np.concatenate([vsplit.train, vsplit.source, vsplit.target])], task.target).any():
            raise RuntimeError(f"validation task {vname!r} holds held-out target cells; please report this bug")
    timings["prepare_s"] = time.perf_counter() - t
    log(f"real task {task.name}: {len(task.train)} training cells, {len(task.target)} held-out target cells "
        f"(never seen while tuning); validation: " + ", ".join(
            f"{v} ({len(s.target)} perturbed cells held out)" for v, s in tasks))

    name = study or cfg.default_study_name(digest)
    st = open_study(cfg, url, name, digest, worker=worker)
    log(f"study {name!r} in {redact(url)}: {_counted(st)} trials so far, running to {n_total} "
        f"({cfg.direction} {cfg.metric})")
    t = time.perf_counter()
    ran = _optimize(st, Objective(cfg, train, tasks, log=log), n_total, log=log, progress=progress)
    timings["trials_s"] = time.perf_counter() - t
    worker_info = {"worker": worker, "study": name, "storage": redact(url), "trials": ran,
                   "seconds": timings["trials_s"], "sampler_seed": cfg.seed + worker}
    if worker_only or ran:  # a results-only run (no trial left to run) must not replace a worker's record
        _io.atomic_write_text(out / "workers" / f"worker-{worker}.json", json.dumps(worker_info, indent=2) + "\n")
    if worker_only:
        return worker_info

    # ------------------------------------------------------------------ results of the study
    from optuna.trial import TrialState

    states = {s.name: len(st.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    if states["RUNNING"]:
        log(f"warning: {states['RUNNING']} trials are still running in other workers; results use the "
            "finished ones")
    complete = st.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    complete = [tr for tr in complete if tr.value is not None and math.isfinite(tr.value)]
    trials_df, inter_df = trials_table(st), intermediate_table(st)
    _io.atomic_write_text(out / "trials.csv", trials_df.to_csv(index=False, lineterminator="\n"))
    _io.atomic_write_text(out / "intermediate.csv", inter_df.to_csv(index=False, lineterminator="\n"))
    if not complete:
        raise InputError(f"study {name!r} has no completed trial ({states}); see the error column of "
                         f"{out / 'trials.csv'}.")
    best = st.best_trial
    best_params = {**cfg.params, **best.params}
    default_params = dict(cfg.params)
    best_doc = {"model": cfg.model, "metric": cfg.metric, "direction": cfg.direction,
                "validation_value": best.value, "trial": best.number, "sampled": best.params,
                "params": best_params, "full_params": models.get(cfg.model, **best_params).params,
                "default_params": models.get(cfg.model, **default_params).params}
    _io.atomic_write_text(out / "best_params.json", json.dumps(best_doc, indent=2, default=_jd) + "\n")
    log(f"best trial {best.number}: {cfg.metric} = {best.value:.4f} with {best.params}")

    importance, importance_error = {}, None
    t = time.perf_counter()
    try:
        importance = param_importance(st, seed=cfg.seed)
    except Exception as exc:  # e.g. too few completed trials or a constant parameter
        importance_error = f"{type(exc).__name__}: {exc}"
        log(f"note: no parameter importance ({importance_error})")
    timings["importance_s"] = time.perf_counter() - t
    import pandas as pd

    imp_df = pd.DataFrame({"param": list(importance), "importance": list(importance.values())})
    _io.atomic_write_text(out / "importance.csv", imp_df.to_csv(index=False, lineterminator="\n"))

    # ------------------------------------------------------------------ the real task, several seeds
    t = time.perf_counter()
    final, fit_info = evaluate_configs(adata, task, cfg, {"tuned": best_params, "default": default_params},
                                       log=log, progress=progress)
    timings["final_s"] = time.perf_counter() - t
    summ = summarise_seeds(final)
    _io.atomic_write_text(out / "final_scores.csv", final.to_csv(index=False, float_format="%.10g",
                                                                 lineterminator="\n"))
    _io.atomic_write_text(out / "final_summary.csv", summ.to_csv(index=False, float_format="%.10g",
                                                                 lineterminator="\n"))

    figures = write_figures(out, trials_df, inter_df, imp_df, final, cfg)
    if config_text is not None:
        _io.atomic_write_text(out / "config.toml", config_text)
    outputs = ["trials.csv", "intermediate.csv", "best_params.json", "importance.csv", "final_scores.csv",
               "final_summary.csv", *figures]
    timings["total_s"] = time.time() - t_start
    record = {
        "kind": RECORD_KIND,
        "config": cfg.to_dict(),
        "command": command,
        "started": _stamp(t_start),
        "ended": _stamp(time.time()),
        "versions": {**pipeline.versions(), **_extra_versions()},
        "determinism": {
            "seed": cfg.seed, "torch_threads": n_threads,
            "note": "one worker: the same config, seed, thread count and library versions give the same trials. "
                    "Several workers: the order in which trials finish depends on timing, so the study differs "
                    "between runs; each worker's sampler is seeded with seed + worker.",
        },
        "data": {**source_desc, "sha256": digest, "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)},
        "spec": cfg.spec.to_dict(),
        "preprocessing": pp_info,
        "split": task.to_dict(adata.obs_names),
        "validation": {
            "note": "trials see only the real task's training cells; each validation task holds out the perturbed "
                    "cells of another context inside them",
            "tasks": [{"context": v, **s.to_dict(train.obs_names)} for v, s in tasks],
        },
        "study": {"name": name, "storage": redact(url), "direction": cfg.direction, "metric": cfg.metric,
                  "trials_requested": n_total, "states": states,
                  "sampler": {"name": "TPESampler", **asdict(cfg.sampler), "seed": cfg.seed},
                  "pruner": asdict(cfg.pruner)},
        "best": best_doc,
        "importance": {"method": "fANOVA (optuna FanovaImportanceEvaluator, seed = config seed)",
                       "values": importance, "error": importance_error},
        "final": {"seeds": list(cfg.final.seeds), "n_boot": cfg.final.n_boot, "fits": fit_info,
                  "note": "tuned = best trial's parameters; default = the model's defaults with [params] applied; "
                          "both retrained on the real task's training cells and scored on its held-out target"},
        "timings": timings,
        "outputs": {o: data.sha256(out / o) for o in outputs},
    }
    _io.atomic_write_text(out / "record.json", json.dumps(record, indent=2, default=_jd) + "\n")
    write_crate(out, record)
    return record


def _check_out(out: Path, cfg: TuneConfig) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is a file; give a directory.")
    rec = out / "record.json"
    if rec.exists():
        from ._io import read_json

        old = read_json(rec, {})
        if old.get("kind") != RECORD_KIND:
            raise InputError(f"--out {str(out)!r} holds another tool's run ({old.get('kind')}); choose a new "
                             "directory.")
        if old.get("config", {}).get("model") != cfg.model:
            raise InputError(f"--out {str(out)!r} holds a tuning run of model {old['config'].get('model')!r}; "
                             "choose a new directory.")


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _jd(o):
    from .pipeline import _json_default

    return _json_default(o)


def _extra_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("optuna", "sqlalchemy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


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
            for tr in study.get_trials(deepcopy=False) for step, value in sorted(tr.intermediate_values.items())]
    return pd.DataFrame(rows, columns=["trial", "state", "epoch", "value"])


def param_importance(study, *, seed: int = 0) -> dict[str, float]:
    """fANOVA importance of each parameter for the objective (normalised to sum to 1)."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    imp = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed))
    return {k: float(v) for k, v in imp.items()}


def evaluate_configs(adata, task, cfg: TuneConfig, configs: dict[str, dict], *, log=print, progress=True):
    """Retrain each parameter set on the real task for every final seed; score with baselines and ceiling.

    Returns the tidy table (``model, config, seed, metric, value, ci_low, ci_high, higher_is_better, error``;
    ``model`` is e.g. ``scgen:tuned``) and fit details per (config, seed).
    """
    import pandas as pd

    from . import metrics, models
    from .pipeline import score_predictions

    train, source, target = task.subsets(adata)
    names = metrics._resolve(cfg.final.metrics)
    base_preds = {b: models.get(b).fit(train, cfg.spec).predict(source) for b in models.BASELINES}
    tables, fits = [], {}
    for seed in cfg.final.seeds:
        preds = {}
        for label, params in configs.items():
            t = time.perf_counter()
            model = models.get(cfg.model, **params).fit(train, cfg.spec, seed=seed, progress=progress)
            preds[f"{cfg.model}:{label}"] = model.predict(source)
            fits[f"{label}:seed{seed}"] = {"seconds": round(time.perf_counter() - t, 3),
                                           "epochs_run": model.history.epochs_run if model.history else None}
            log(f"final {label} seed {seed}: fit {time.perf_counter() - t:.0f} s")
        preds.update(base_preds)
        tab, _ = score_predictions(target, source, preds, names, n_boot=cfg.final.n_boot, seed=seed)
        tab.insert(1, "seed", seed)
        tables.append(tab)
    out = pd.concat(tables, ignore_index=True)
    out.insert(1, "config", out["model"].str.split(":").str[-1])
    return out, fits


def summarise_seeds(scores, *, ci: float = 0.95):
    """Mean over seeds with a t-interval (and the mean bootstrap interval of single runs) per model x metric."""
    import numpy as np
    import pandas as pd
    from scipy import stats

    rows = []
    for (model, metric), g in scores.groupby(["model", "metric"], sort=False):
        v = g["value"].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        n = len(v)
        mean = float(v.mean()) if n else float("nan")
        sd = float(v.std(ddof=1)) if n > 1 else float("nan")
        half = float(stats.t.ppf(0.5 + ci / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else float("nan")
        rows.append({"model": model, "metric": metric, "n_seeds": n, "mean": mean, "sd": sd,
                     "ci_low": mean - half, "ci_high": mean + half,
                     "boot_ci_low": float(g["ci_low"].mean()), "boot_ci_high": float(g["ci_high"].mean()),
                     "higher_is_better": bool(g["higher_is_better"].iloc[0])})
    return pd.DataFrame(rows)


def write_figures(out: Path, trials_df, inter_df, imp_df, final, cfg: TuneConfig) -> list[str]:
    """history.png, intermediate.png, importance.png, final.png; returns the names written."""
    from . import _io, pl

    figs = {
        "history.png": pl.optimization_history(trials_df, inter_df, metric=cfg.metric, direction=cfg.direction),
        "intermediate.png": pl.intermediate_values(inter_df, metric=cfg.metric),
        "importance.png": pl.param_importance(dict(zip(imp_df["param"], imp_df["importance"]))),
        "final.png": pl.seed_comparison(final, metrics=_headline(cfg)),
    }
    for fname, fig in figs.items():
        _io.atomic_write_with(out / fname, lambda p, fig=fig: fig.savefig(p, dpi=110, format="png",
                                                                          metadata={"Software": None}))
    return list(figs)


def _headline(cfg: TuneConfig) -> list[str]:
    from . import metrics

    names = metrics._resolve(cfg.final.metrics)
    pick = [cfg.metric] + [m for m in ("r2_mean_top100", "pearson_delta", "edistance") if m != cfg.metric]
    return [m for m in pick if m in names][:4]


# ------------------------------------------------------------------------------------------- RO-Crate


def write_crate(out: Path, record: dict[str, Any]) -> Path:
    """``ro-crate-metadata.json`` of the run directory (the shared crate writer of :mod:`perturbkit.record`)."""
    from . import record as rec

    return rec.write_crate(out, record, name=f"perturbkit tune: {record['config']['model']} on "
                           f"{record['config']['data']}, {record['config']['holdout']} held out",
                           description="Optuna study of the model's hyperparameters on a validation task carved "
                                       "from the training cells, and the tuned vs default parameters on the real "
                                       "held-out target over several seeds.")


# ------------------------------------------------------------------------------------ pk.tune(...) alias


class _CallableModule(types.ModuleType):
    """Lets ``pk.tune(config, out=...)`` call :func:`run` while ``pk.tune.run`` and the rest stay reachable."""

    def __call__(self, *args, **kwargs):
        return run(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
