"""A bench config: ``CONFIG.toml`` -> a frozen :class:`BenchConfig`.

The tables shared with tune configs (``[data]``, ``[preprocessing]``, ``[training]``, ``[models.NAME]``,
``[evaluation]``, ``seeds``) are read by :mod:`perturbkit.config`; ``[scenarios.NAME]`` is a mapping over the
scenario registry (:data:`perturbkit.scenarios.SCENARIOS`), each table built into its scenario's ``Config``;
``[output]`` is bench's own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as C
from ..spec import Preprocessing
from ..errors import InputError, choices_text, suggest

HEADLINE_METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance")


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``."""

    save_predictions: bool = False  # every cell's predicted cells as cells/<id>/pred.h5ad
    save_weights: bool = False  # every cell's fitted model as cells/<id>/model/
    figures: bool = True
    figure_split: str | None = None  # context of the loco split drawn in the example figures (default: first)
    figure_metrics: tuple[str, ...] = HEADLINE_METRICS
    umap: bool = True
    max_figure_cells: int = 500  # cells per group drawn in PCA / UMAP / violins (seeded subsample)
    dpi: int = 110
    license: str = "https://creativecommons.org/licenses/by/4.0/"  # of the results, in the RO-Crate

    def __post_init__(self):
        from ..metrics import METRICS

        for m in self.figure_metrics:
            if m not in METRICS:
                raise InputError(f"output.figure_metrics: unknown metric {m!r}.{suggest(m, METRICS)}")


@dataclass(frozen=True)
class BenchConfig:
    """The whole benchmark. Build it with :func:`load_config` or :func:`config_from_dict`.

    ``scenarios`` maps every registered scenario's name to its table's config (None: it does not run).
    """

    name: str = "bench"
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    data: C.DataConfig = field(default_factory=C.DataConfig)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    scenarios: dict[str, Any] = field(default_factory=dict)
    models: tuple[C.ModelConfig, ...] = ()
    training: C.TrainingConfig = field(default_factory=C.TrainingConfig)
    evaluation: C.EvaluationConfig = field(default_factory=C.EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """The normalised config (every default filled in) as JSON-ready data; it identifies the run."""
        return json.loads(json.dumps(C.plain(self)))

    def active(self) -> list[tuple[Any, Any]]:
        """(scenario, its table's config) of every scenario that runs, in registry order."""
        from ..scenarios import SCENARIOS

        return [(SCENARIOS[name], conf) for name, conf in self.scenarios.items() if conf is not None]

    def model(self, label: str) -> C.ModelConfig:
        """The ``[models.LABEL]`` table of ``label``."""
        for m in self.models:
            if m.label == label:
                return m
        raise InputError(f"no model {label!r} in the config.{suggest(label, [m.label for m in self.models])}")


def load_config(path: str | Path) -> BenchConfig:
    """Read a TOML config; relative data paths are resolved against the config file's folder."""
    path = Path(path)
    return config_from_dict(C.read(path), base_dir=path.parent)


def load_scenarios(raw: Any, where: str = "scenarios") -> dict[str, Any]:
    """The ``[scenarios.NAME]`` tables: every registered scenario -> its built config, or None when absent."""
    from ..scenarios import SCENARIOS

    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected tables like [{where}.loco]; got {C.typename(raw)}.")
    for name in raw:
        if name not in SCENARIOS:
            raise InputError(f"{where}.{name}: unknown setting.{suggest(name, SCENARIOS)} Settings here: "
                             f"{choices_text(SCENARIOS, 30)}.")
    return {name: (C.build(scenario.Config, raw[name], f"{where}.{name}") if name in raw else None)
            for name, scenario in SCENARIOS.items()}


def config_from_dict(raw: dict[str, Any], *, base_dir: str | Path | None = None) -> BenchConfig:
    """Build and validate a :class:`BenchConfig` from parsed TOML (a nested dict)."""
    from .. import models as registry

    raw = dict(raw)
    shared = {key: raw.pop(key, None) for key in ("data", "preprocessing", "scenarios", "models")}
    cfg = C.build(BenchConfig, raw, "")
    models = C.model_tables(shared["models"])
    scenarios = load_scenarios(shared["scenarios"])
    from ..scenarios import SCENARIOS

    if cfg.evaluation.baselines:  # control and mean_shift, and those an active scenario needs (additive)
        wanted = [*registry.BASELINES, *(b for name, conf in scenarios.items() if conf is not None
                                         for b in SCENARIOS[name].baselines())]
        for base in dict.fromkeys(wanted):
            listed = (any(m.model == base and not m.params for m in models)
                      or base in {m.label for m in models})
            if not listed:
                models.append(C.ModelConfig(label=base, model=base, params={}))
    if not models:
        raise InputError("models: the config names no model; add e.g. [models.scgen].")
    if all(conf is None for conf in scenarios.values()):
        first, *others = SCENARIOS
        raise InputError(f"scenarios: the config names no scenario; add [scenarios.{first}] (or "
                         f"{', '.join(others)}).")
    cfg = C.replace(cfg, seeds=C.seeds(list(cfg.seeds)), models=tuple(models), scenarios=scenarios,
                    data=C.load_data(shared["data"], base_dir=base_dir),
                    preprocessing=C.load_preprocessing(shared["preprocessing"]))
    spec = cfg.data.spec
    for scenario, conf in cfg.active():
        if not spec.single and not scenario.SCREENS:
            screens = " or ".join(f"[scenarios.{n}]" for n, s in SCENARIOS.items() if s.SCREENS)
            raise InputError(f"scenarios.{scenario.name} predicts one perturbation, but data.perturbed = "
                             f"{json.dumps(C.plain(spec.perturbed))} asks for a screen. Set data.perturbed "
                             f"to one label (e.g. \"stimulated\"), or use {screens} for a screen.")
        scenario.check(conf, cfg)
    return cfg


def to_toml(cfg: BenchConfig | dict[str, Any]) -> str:
    """The normalised config (or its :meth:`BenchConfig.to_dict` form) as TOML (used when a config was given
    as an object, not a file)."""
    d = json.loads(json.dumps(cfg if isinstance(cfg, dict) else cfg.to_dict()))
    d["models"] = {m["label"]: {"model": m["model"], **m["params"]} for m in d["models"]}
    return C.to_toml(d, tables_last=("scenarios", "models"))


def same_run(old: Any, new: dict[str, Any]) -> bool:
    """Whether a run directory's ``config.json`` (``old``) is a run of the normalised config ``new``.

    True when they are equal, or when ``old`` was written by an earlier perturbkit and differs only by
    settings added since, at their default values: every key of ``old`` is in ``new`` with the same value
    (recursively), and ``old`` read by this version normalises to ``new``.
    """
    import tomllib

    if old == new:
        return True
    if not isinstance(old, dict) or not only_added(old, new):
        return False
    try:
        again = config_from_dict(tomllib.loads(to_toml(old)))
    except (InputError, KeyError, TypeError, ValueError):
        return False
    return again.to_dict() == new


def only_added(old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` with keys added (in tables at any depth, lists compared item by item)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return set(old) <= set(new) and all(only_added(v, new[k]) for k, v in old.items())
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(only_added(a, b) for a, b in zip(old, new))
    return old == new


def config_hash(config: dict[str, Any]) -> str:
    """The run's identity: sha256 (16 hex) of the normalised config (:meth:`BenchConfig.to_dict`)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
