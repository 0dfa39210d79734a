"""The tuning config: bench's shared tables plus a ``[tune]`` table, read from TOML into :class:`TuneConfig`.

A tune config is written with the same tables as a bench config (:mod:`perturbkit.config`): ``seeds``,
``[data]``, ``[preprocessing]``, ``[training]``, exactly one ``[models.NAME]`` (its parameters are fixed for
every trial and for the default configuration) and ``[evaluation]`` (of the final retraining). What only
tuning has is in ``[tune]``: ``holdout``, ``metric``, ``trials``, ``seed`` and the tables ``[tune.space]``,
``[tune.validation]``, ``[tune.sampler]`` and ``[tune.pruner]``. A setting of the old tune schema (top-level
``model``, ``params``, ``[final]``, ...) is refused naming where it went (:data:`OLD_KEYS`).

The default search space is the model class's ``SEARCH_SPACE`` (:func:`default_space`); a model with none does
not train and cannot be tuned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import (DataConfig, EvaluationConfig, ModelConfig, TrainingConfig, build, load_data,
                      load_preprocessing, model_tables, plain, positive, read, replace, seeds)
from ..spec import PerturbSpec, Preprocessing
from ..errors import InputError, check_seed, choices_text, suggest

RECORD_KIND = "perturbkit.tune"
DIM_TYPES = ("int", "float", "categorical")
DIM_KEYS = ("type", "low", "high", "log", "step", "choices")
#: the top-level keys of a tune config
TOP_KEYS = ("description", "seeds", "data", "preprocessing", "training", "models", "evaluation", "tune")

#: names other tools use for a knob -> perturbkit's name (for error messages)
ALIASES = {"noise_rate": "input_noise", "latent_dim": "n_latent", "hidden_dim": "n_hidden",
           "learning_rate": "lr", "dropout": "dropout_rate", "kl": "kl_weight", "alpha": "kl_weight"}

#: top-level keys of the old tune schema -> where the setting is written now
OLD_KEYS = {
    "model": "model = {model_value} -> [models.{model}]: the model to tune is now its own table (the table "
             "bench configs use)",
    "data": "data = {data} -> [data] source = {data} (bench's [data] table)",
    "holdout": "holdout -> [tune] holdout",
    "metric": "metric -> [tune] metric",
    "trials": "trials -> [tune] trials",
    "seed": "seed -> [tune] seed (the sampler's and the validation fits' seed; the final retraining's seeds "
            "are the top-level seeds = [...])",
    "threads": "threads -> [training] threads",
    "params": "[params]: fixed model parameters now go in the model's table [models.{model}] (the table "
              "bench configs use)",
    "space": "[space] -> [tune.space]",
    "spec": "[spec] -> [data]: the spec keys (condition_key, control, perturbed, context_key, donor_key) now "
            "go in the [data] table itself, as in bench configs",
    "final": "[final] is gone: {final}",
    "validation": "[validation] -> [tune.validation]",
    "sampler": "[sampler] -> [tune.sampler]",
    "pruner": "[pruner] -> [tune.pruner]",
}
OLD_FINAL = {"seeds": "final.seeds -> seeds (top level)", "metrics": "final.metrics -> [evaluation] metrics",
             "n_boot": "final.n_boot -> [evaluation] n_boot"}


# ============================================================================================ the space


@dataclass(frozen=True)
class Dim:
    """One dimension of a search space: ``int`` / ``float`` between ``low`` and ``high`` (optionally ``log``
    or with a ``step``), or ``categorical`` over ``choices``."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial, name: str):
        """The value Optuna's ``trial`` samples for the parameter ``name``."""
        if self.type == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1),
                                     log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_plain(self) -> dict[str, Any]:
        """The dimension as its TOML table."""
        if self.type == "categorical":
            return {"type": "categorical", "choices": list(self.choices)}
        d = {"type": self.type, "low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d

    to_dict = to_plain


def parse_dim(name: str, spec: Any, *, where: str = "tune.space", fixed_in: str = "[models.NAME]") -> Dim:
    """A search-space entry from its TOML table; raise :class:`InputError` naming the fix when malformed.

    Parameters
    ----------
    name
        the model parameter the dimension samples.
    spec
        its table, e.g. ``{"type": "float", "low": 0.0, "high": 0.5}``.
    where
        the table holding it (for messages).
    fixed_in
        the table where a fixed value belongs (for the message when ``spec`` is a plain value).
    """
    where = f"{where}.{name}"
    if not isinstance(spec, dict):
        raise InputError(f"{where}: expected a table like {{ type = \"float\", low = 0.0, high = 0.5 }}, got "
                         f"{spec!r} (a fixed value belongs in the model's table {fixed_in}).")
    for key in spec:
        if key not in DIM_KEYS:
            raise InputError(f"{where}.{key}: unknown setting.{suggest(key, DIM_KEYS)} Settings here: "
                             f"{choices_text(DIM_KEYS)}.")
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
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise InputError(f"{where}: log must be true or false, got {log!r}.")
    for key, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
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


def tunable_models() -> list[str]:
    """The registry models that have a search space (the models that train)."""
    from .. import models

    return [name for name, cls in models.MODELS.items() if cls.SEARCH_SPACE]


def model_class(model: str, where: str = "models"):
    """The registry class of ``model``, refused unless it has a search space."""
    from .. import models

    if model not in models.MODELS:
        raise InputError(f"{where}: model {model!r} is unknown.{suggest(model, models.MODELS)} "
                         f"Models: {choices_text(models.MODELS)}.")
    cls = models.MODELS[model]
    if not cls.SEARCH_SPACE:
        raise InputError(f"{where}: model {model!r} has no parameters to tune (it does not train: its class "
                         f"has no SEARCH_SPACE); tune one of {choices_text(tunable_models())}.")
    return cls


def check_param_names(model: str, names, where: str) -> None:
    """Raise :class:`InputError` for a name that is not a parameter of ``model`` (hinting at other tools'
    names)."""
    cls = model_class(model, where)
    known = cls.DEFAULTS or {}
    for name in names:
        if not cls.takes(name):
            alias = f" perturbkit calls it {ALIASES[name]!r}." if name in ALIASES else suggest(name, known)
            raise InputError(f"{where}: {model} has no parameter {name!r}.{alias} Known: "
                             f"{choices_text(known, 40)}.")


def default_space(model: str) -> dict[str, Dim]:
    """The default search space of ``model``: its class's ``SEARCH_SPACE``, parsed."""
    cls = model_class(model)
    check_param_names(model, cls.SEARCH_SPACE, f"{cls.__name__}.SEARCH_SPACE")
    return {k: parse_dim(k, v, where=f"{cls.__name__}.SEARCH_SPACE") for k, v in cls.SEARCH_SPACE.items()}


# ============================================================================================ [tune]


@dataclass(frozen=True)
class ValidationConfig:
    """``[tune.validation]``: which training contexts serve as validation tasks (their perturbed cells held
    out inside the training cells). ``contexts = []``: the ``n_contexts`` training contexts with most
    perturbed cells."""

    contexts: tuple[str, ...] = ()
    n_contexts: int = 1
    min_cells: int = 30

    def __post_init__(self):
        positive("tune.validation.n_contexts", self.n_contexts, 1)
        positive("tune.validation.min_cells", self.min_cells, 0)


@dataclass(frozen=True)
class SamplerConfig:
    """``[tune.sampler]``: Optuna's TPE sampler (seeded with ``[tune] seed`` plus the worker number)."""

    n_startup_trials: int = 10
    multivariate: bool = True
    constant_liar: bool = True

    def __post_init__(self):
        positive("tune.sampler.n_startup_trials", self.n_startup_trials, 0)


@dataclass(frozen=True)
class PrunerConfig:
    """``[tune.pruner]``: ``kind = "median"``: stop a trial whose validation score after an epoch is worse
    than the median of earlier trials at that epoch (Optuna's MedianPruner); ``"none"`` switches pruning
    off.

    Steps are epochs (counted from 1): the first pruning decision is after epoch ``n_warmup_steps``, then
    every ``interval_steps`` epochs, never after the last epoch. Validation scores are computed only at those
    epochs. Only models that train are pruned.
    """

    kind: Literal["median", "none"] = "median"
    n_startup_trials: int = 5
    n_warmup_steps: int = 1
    interval_steps: int = 1

    def __post_init__(self):
        positive("tune.pruner.n_startup_trials", self.n_startup_trials, 0)
        positive("tune.pruner.n_warmup_steps", self.n_warmup_steps, 0)
        positive("tune.pruner.interval_steps", self.interval_steps, 1)


@dataclass(frozen=True)
class TuneSettings:
    """``[tune]``: what only tuning has. ``space`` holds the effective search space (name -> :class:`Dim`)
    once :func:`config_from_dict` has resolved ``[tune.space]`` against the model's default space."""

    holdout: str = "CD4 T cells"
    metric: str = "pearson_delta"
    trials: int = 20
    seed: int = 0
    space: dict[str, Any] = field(default_factory=dict)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)

    def __post_init__(self):
        from ..metrics import METRICS

        if self.metric not in METRICS:
            raise InputError(f"tune.metric: metric {self.metric!r} is unknown."
                             f"{suggest(self.metric, METRICS)} Metrics: {choices_text(METRICS, 30)}.")
        positive("tune.trials", self.trials, 0)
        check_seed(self.seed, "tune.seed")
        if self.holdout in self.validation.contexts:
            raise InputError(f"tune.validation.contexts holds the held-out context {self.holdout!r}: the "
                             "objective must never see the held-out target. Choose other contexts.")


# ============================================================================================ the config


@dataclass(frozen=True)
class TuneConfig:
    """Everything that defines a tuning run; read from TOML with :func:`load_config`."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tune: TuneSettings = field(default_factory=TuneSettings)
    seeds: tuple[int, ...] = (0, 1, 2)
    description: str = ""

    @property
    def spec(self) -> PerturbSpec:
        return self.data.spec

    @property
    def name(self) -> str:
        """The registry name of the model tuned."""
        return self.model.model

    @property
    def label(self) -> str:
        """The model's label (its table's name): final scores name ``LABEL:tuned`` and ``LABEL:default``."""
        return self.model.label

    @property
    def params(self) -> dict[str, Any]:
        """The fixed parameters: the model's table with ``[training] epochs`` where it trains."""
        return self.model.build_params(self.training)

    @property
    def space(self) -> dict[str, Dim]:
        return self.tune.space

    @property
    def direction(self) -> str:
        from ..metrics import METRICS

        return "maximize" if METRICS[self.tune.metric].higher_is_better else "minimize"

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, in the form of its TOML (the space written out in full)."""
        tune = plain(self.tune)
        tune["space"] = {"use_defaults": False, **tune["space"]}
        return json.loads(json.dumps({
            "description": self.description, "seeds": list(self.seeds), "data": plain(self.data),
            "preprocessing": plain(self.preprocessing), "training": plain(self.training),
            "models": {self.label: {"model": self.name, **dict(sorted(self.model.params.items()))}},
            "evaluation": plain(self.evaluation), "tune": tune}))

    def study_key(self, data_sha256: str) -> dict[str, Any]:
        """What shapes a trial's value (the data by its sha256, not its path, so that workers on other
        machines agree): a study may only be continued with the same key."""
        t = self.tune
        key = {"model": self.name, "holdout": t.holdout, "metric": t.metric, "seed": t.seed,
               "spec": self.spec.to_dict(), "preprocessing": plain(self.preprocessing),
               "params": dict(sorted(self.params.items())),
               "space": {k: v.to_plain() for k, v in t.space.items()}, "validation": plain(t.validation)}
        return json.loads(json.dumps({**key, "data_sha256": data_sha256}))

    def default_study_name(self, data_sha256: str) -> str:
        digest = hashlib.sha256(json.dumps(self.study_key(data_sha256), sort_keys=True).encode()).hexdigest()
        return f"perturbkit-{self.name}-{digest[:10]}"


def old_keys_error(raw: dict[str, Any], where: str) -> InputError | None:
    """The error for settings of the old tune schema in ``raw`` (each named with its new place), or None."""
    model = raw.get("model") if isinstance(raw.get("model"), str) else "NAME"
    final = raw.get("final") if isinstance(raw.get("final"), dict) else {}
    moves = [t for k, t in OLD_FINAL.items() if k in final] or list(OLD_FINAL.values())
    values = {"model": model, "model_value": json.dumps(raw.get("model")),
              "data": json.dumps(raw.get("data")), "final": ", ".join(moves)}
    found = [text.format(**values) for key, text in OLD_KEYS.items()
             if key in raw and not (key == "data" and not isinstance(raw[key], str))]
    if not found:
        return None
    if len(found) == 1:
        return InputError(f"{where}: {found[0]}.")
    return InputError(f"{where} is written in the old tune schema (docs/tune.md has the new one): "
                      + "; ".join(found) + ".")


def resolve_space(model: ModelConfig, raw: dict[str, Any], fixed: dict[str, Any]) -> dict[str, Dim]:
    """The search space: the model's default space (unless ``use_defaults = false``) with the dimensions of
    ``[tune.space]`` added or replaced, less the fixed parameters."""
    raw = dict(raw)
    use_defaults = raw.pop("use_defaults", True)
    if not isinstance(use_defaults, bool):
        raise InputError(f"tune.space.use_defaults must be true or false, got {use_defaults!r}.")
    check_param_names(model.model, raw, "tune.space")
    space = default_space(model.model) if use_defaults else {}
    space.update({k: parse_dim(k, v, fixed_in=f"[models.{model.label}]") for k, v in raw.items()})
    for name in fixed:  # a fixed parameter is not searched
        space.pop(name, None)
    if not space:
        raise InputError("tune.space: the search space is empty (every dimension is fixed in "
                         f"[models.{model.label}] or [training]); add dimensions under [tune.space] "
                         "(or use_defaults = true).")
    return space


def config_from_dict(raw: dict[str, Any], *, where: str = "config",
                     base_dir: str | Path | None = None) -> TuneConfig:
    """A validated :class:`TuneConfig` from a parsed TOML document.

    Parameters
    ----------
    raw
        the document.
    where
        what to call it in messages (the file's path).
    base_dir
        the folder a relative ``[data] source`` path is relative to (the config file's).
    """
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected a table, got {raw!r}.")
    old = old_keys_error(raw, where)
    if old is not None:
        raise old
    for key in raw:
        if key not in TOP_KEYS:
            raise InputError(f"{where}: unknown setting {key!r}.{suggest(key, TOP_KEYS)} Settings here: "
                             f"{choices_text(TOP_KEYS)}.")
    tables = model_tables(raw.get("models"))
    if len(tables) != 1:
        have = ", ".join(f"[models.{m.label}]" for m in tables) or "none"
        raise InputError(f"models: a tune config names exactly one model to tune as its table, e.g. "
                         f"[models.scgen]; this one has {have}.")
    model = tables[0]
    check_param_names(model.model, model.params, f"models.{model.label}")
    training = build(TrainingConfig, raw.get("training", {}), "training")
    tune_raw = raw.get("tune", {})
    settings = build(TuneSettings, tune_raw, "tune")
    space = resolve_space(model, settings.space, model.build_params(training))
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise InputError(f"description: expected a string, got {description!r}.")
    return TuneConfig(
        model=model,
        data=load_data(raw.get("data"), base_dir=base_dir),
        preprocessing=load_preprocessing(raw.get("preprocessing")),
        training=training,
        evaluation=build(EvaluationConfig, raw.get("evaluation", {}), "evaluation"),
        tune=replace(settings, space=space),
        seeds=seeds(raw["seeds"]) if "seeds" in raw else TuneConfig.seeds,
        description=description,
    )


def load_config(path: str | Path) -> TuneConfig:
    """Read a tuning config from TOML (see docs/tune.md and configs/tune_*.toml); a relative ``[data] source``
    path is relative to the config file."""
    path = Path(path)
    return config_from_dict(read(path), where=str(path), base_dir=path.parent)
