"""The benchmark harness: one TOML config -> one run directory of scores, summaries, figures and an RO-Crate.

Read it top to bottom:

1. :func:`load_config` turns ``CONFIG.toml`` into a frozen :class:`BenchConfig` (unknown or mistyped settings
   are refused with the setting's full name and a close-match suggestion).
2. :func:`plan` expands the scenarios into *cells*: one (scenario, split, model, seed) each. Baselines
   (``control``, ``mean_shift``) are models like any other and get cells on every split.
3. :func:`run_cell` runs one cell: preprocessed data (once per run directory, cached in ``DIR/.cache``) ->
   split indices -> ``fit`` -> ``predict`` -> :func:`perturbkit.pipeline.score_predictions` -> the files of
   ``DIR/cells/<cell id>/`` (every file written to a temporary name and renamed; ``result.json`` last, so a
   cell with a ``result.json`` is finished and complete).
4. :func:`aggregate` reads the finished cells and writes ``scores.csv``, ``summary.csv``, the scenario tables,
   ``figures/``, ``run.json``, ``report.html`` and ``ro-crate-metadata.json``.
5. :func:`run` = ``check the directory -> every unfinished cell -> aggregate``; a rerun of the same config
   into the same directory skips the finished cells.

The command line exposes every step separately (``--list-cells``, ``--cell ID``, ``--aggregate``) so that a
workflow engine can run the cells as parallel jobs; see docs/bench.md.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
import types
import typing
import warnings
import zlib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import InputError, choices_text, suggest

RUN_KIND = "perturbkit.bench"
CELLS_DIR = "cells"
CACHE_DIR = ".cache"
SCENARIOS = ("loco", "unbalanced", "cross_donor")
HEADLINE_METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance")
SCORE_COLUMNS = ("scenario", "split", "model", "seed", "metric", "value", "ci_low", "ci_high",
                 "higher_is_better", "error", "context", "variant", "n_train", "n_source", "n_target")
SUMMARY_COLUMNS = ("scenario", "split", "model", "metric", "n_seeds", "mean", "sd", "ci_low", "ci_high", "rank",
                   "higher_is_better")


# =============================================================================================== config


@dataclass(frozen=True)
class SyntheticConfig:
    """``[data.synthetic]``: parameters of :func:`perturbkit.data.synthetic` when ``source = "synthetic"``."""

    n_contexts: int = 4
    n_cells: int = 150
    n_genes: int = 60
    n_responsive: int = 10
    effect: float = 1.5
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the input and the obs keys (see :class:`perturbkit.data.PerturbSpec`)."""

    source: str = "kang2018"  # bundled dataset name, "synthetic", or an .h5ad path (relative: to the config)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    condition_key: str = "condition"
    control: str = "control"
    perturbed: str = "stimulated"
    context_key: str = "cell_type"
    donor_key: str | None = None  # needed by cross_donor; kang2018 defaults to "donor"

    def spec(self):
        from .data import PerturbSpec

        return PerturbSpec(condition_key=self.condition_key, control=self.control, perturbed=self.perturbed,
                           context_key=self.context_key, donor_key=self.donor_key)


@dataclass(frozen=True)
class PreprocessConfig:
    """``[preprocessing]``: done once on the whole input; every scenario uses the same genes."""

    normalize: bool | Literal["auto"] = "auto"  # auto: normalise + log1p only raw counts
    target_sum: float = 1e4
    n_top_genes: int = 2000  # 0 keeps every gene
    hvg_flavor: str = "seurat"

    def __post_init__(self):
        if self.n_top_genes < 0:
            raise InputError(f"preprocessing.n_top_genes must be >= 0 (0 keeps all genes), got {self.n_top_genes}.")
        if self.target_sum <= 0:
            raise InputError(f"preprocessing.target_sum must be > 0, got {self.target_sum}.")

    def to_preprocessing(self):
        from .data import Preprocessing

        return Preprocessing(normalize=None if self.normalize == "auto" else self.normalize,
                             target_sum=self.target_sum, n_top_genes=self.n_top_genes or None,
                             hvg_flavor=self.hvg_flavor)


Contexts = tuple[str, ...] | Literal["all"]


@dataclass(frozen=True)
class LocoConfig:
    """``[scenarios.loco]``: leave one context out: train on everything but its perturbed cells."""

    contexts: Contexts = "all"  # "all": every context with >= min_cells cells of each condition
    min_cells: int = 30

    def __post_init__(self):
        _positive("scenarios.loco.min_cells", self.min_cells, 3)


@dataclass(frozen=True)
class UnbalancedConfig:
    """``[scenarios.unbalanced]``: the loco tasks on seeded, deliberately unbalanced copies of the data.

    Variant ``keep``: every context keeps ``keep_fraction`` of its perturbed cells. Variant ``thin``: only
    ``thin_contexts`` keep ``thin_fraction`` of theirs (skipped when ``thin_contexts`` is empty). The held-out
    context's perturbed cells (the evaluation target) are kept whole unless ``thin_target``, so the scores sit
    side by side with the balanced loco run on the same target cells.
    """

    contexts: Contexts = "all"  # held-out tasks; each must also be a loco context (the balanced run)
    keep_fraction: float = 0.2
    thin_contexts: tuple[str, ...] = ()
    thin_fraction: float = 0.1
    thin_target: bool = False
    data_seed: int = 0

    def __post_init__(self):
        for key in ("keep_fraction", "thin_fraction"):
            value = getattr(self, key)
            if not 0 < value <= 1:
                raise InputError(f"scenarios.unbalanced.{key} must be in (0, 1], got {value}.")


@dataclass(frozen=True)
class CrossDonorConfig:
    """``[scenarios.cross_donor]``: train on some donors, predict a context's perturbed cells in the others."""

    contexts: Contexts = "all"
    folds: int = 2  # donors dealt into this many seeded groups; each group is the test donors once
    test_donors: tuple[tuple[str, ...], ...] = ()  # explicit test groups instead of folds
    donor_seed: int = 0
    context_seen: bool = True  # False: the training donors' perturbed cells of the context are left out too
    test_controls_in_train: bool = True  # the test donors' control cells are training cells (scGen cross-study)
    min_cells: int = 10  # per condition in the test donors' context

    def __post_init__(self):
        _positive("scenarios.cross_donor.min_cells", self.min_cells, 3)
        _positive("scenarios.cross_donor.folds", self.folds, 2)


@dataclass(frozen=True)
class ScenariosConfig:
    """``[scenarios.*]``: a table present = the scenario runs."""

    loco: LocoConfig | None = None
    unbalanced: UnbalancedConfig | None = None
    cross_donor: CrossDonorConfig | None = None


@dataclass(frozen=True)
class ModelConfig:
    """``[models.LABEL]``: a registry model (``model``, default: LABEL) and its parameters."""

    label: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    """``[training]``: settings every trained model shares (a model's own table may set its own ``epochs``)."""

    epochs: int | None = None  # None: each model's default
    threads: int | None = None  # torch CPU threads (None: torch's default)

    def __post_init__(self):
        if self.epochs is not None:
            _positive("training.epochs", self.epochs, 1)
        if self.threads is not None:
            _positive("training.threads", self.threads, 1)


@dataclass(frozen=True)
class EvaluationConfig:
    """``[evaluation]``."""

    metrics: tuple[str, ...] | Literal["all"] = "all"
    n_boot: int = 100  # bootstrap replicates of each score's interval (over cells); 0: none
    baselines: bool = True  # add the control and mean_shift baselines when [models] does not list them

    def __post_init__(self):
        if self.n_boot < 0:
            raise InputError(f"evaluation.n_boot must be >= 0, got {self.n_boot}.")
        if self.metrics != "all":
            from .metrics import _resolve

            try:
                _resolve(self.metrics)
            except InputError as exc:
                raise InputError(f"evaluation.metrics: {exc}") from None


@dataclass(frozen=True)
class OutputConfig:
    """``[output]``."""

    save_predictions: bool = False  # every cell's predicted cells as cells/<id>/pred.h5ad
    save_weights: bool = False  # every cell's fitted model as cells/<id>/model/
    figures: bool = True
    figure_split: str | None = None  # context of the loco split drawn in the per-cell figures (default: first)
    figure_metrics: tuple[str, ...] = HEADLINE_METRICS
    umap: bool = True
    max_figure_cells: int = 500  # cells per group drawn in PCA / UMAP / violins (seeded subsample)
    dpi: int = 110
    license: str = "https://creativecommons.org/licenses/by/4.0/"  # of the results, in the RO-Crate


@dataclass(frozen=True)
class BenchConfig:
    """The whole benchmark. Build it with :func:`load_config` or :func:`config_from_dict`."""

    name: str = "bench"
    description: str = ""
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = field(default_factory=DataConfig)
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    scenarios: ScenariosConfig = field(default_factory=ScenariosConfig)
    models: tuple[ModelConfig, ...] = ()
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """The normalised config (every default filled in) as JSON-ready data; it identifies the run."""
        return json.loads(json.dumps(_plain(self)))

    def metric_names(self) -> list[str]:
        from .metrics import _resolve

        return _resolve(None if self.evaluation.metrics == "all" else self.evaluation.metrics)

    def model(self, label: str) -> ModelConfig:
        for m in self.models:
            if m.label == label:
                return m
        raise InputError(f"no model {label!r} in the config.{suggest(label, [m.label for m in self.models])}")

    def model_params(self, label: str) -> dict[str, Any]:
        """The parameters a model is built with: its table, with ``training.epochs`` where it trains."""
        from . import models

        m = self.model(label)
        params = dict(m.params)
        if self.training.epochs is not None and "epochs" in getattr(models.MODELS[m.model], "DEFAULTS", {}):
            params.setdefault("epochs", self.training.epochs)
        return params


def _positive(name: str, value: int, least: int) -> None:
    if value < least:
        raise InputError(f"{name} must be >= {least}, got {value}.")


def _plain(obj):
    if is_dataclass(obj):
        if isinstance(obj, ModelConfig):
            return {"label": obj.label, "model": obj.model, "params": dict(sorted(obj.params.items()))}
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    return obj


_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def load_config(path: str | Path) -> BenchConfig:
    """Read a TOML config; relative data paths are resolved against the config file's folder."""
    from ._io import read_toml

    path = Path(path)
    return config_from_dict(read_toml(path), base_dir=path.parent)


def config_from_dict(raw: dict[str, Any], *, base_dir: str | Path | None = None) -> BenchConfig:
    """Build and validate a :class:`BenchConfig` from parsed TOML (a nested dict)."""
    from . import models as model_registry
    from .data import DATASETS

    raw = dict(raw)
    model_tables = raw.pop("models", {})
    cfg = _build(BenchConfig, raw, "")
    if not isinstance(model_tables, dict):
        raise InputError("models: expected tables like [models.scgen]; got " + _typename(model_tables) + ".")
    mcfgs = []
    for label, table in model_tables.items():
        where = f"models.{label}"
        if not _LABEL.match(label):
            raise InputError(f"{where}: a model label must start with a letter and hold only letters, digits and "
                             "'_' (it names files and cell ids).")
        if not isinstance(table, dict):
            raise InputError(f"{where}: expected a table [models.{label}], got {_typename(table)}.")
        params = dict(table)
        name = params.pop("model", label)
        if not isinstance(name, str) or name not in model_registry.MODELS:
            raise InputError(f"{where}: unknown model {name!r}.{suggest(str(name), model_registry.MODELS)} Models: "
                             f"{choices_text(model_registry.MODELS)} (a custom label names one with model = '...').")
        try:
            model_registry.get(name, **params)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        except TypeError as exc:
            raise InputError(f"{where}: {exc}") from None
        mcfgs.append(ModelConfig(label=label, model=name, params=params))
    if cfg.evaluation.baselines:
        for base in model_registry.BASELINES:
            if not any(m.model == base and not m.params for m in mcfgs) and base not in {m.label for m in mcfgs}:
                mcfgs.append(ModelConfig(label=base, model=base, params={}))
    if not mcfgs:
        raise InputError("models: the config names no model; add e.g. [models.scgen].")
    if not cfg.seeds:
        raise InputError("seeds: give at least one seed, e.g. seeds = [0].")
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise InputError(f"seeds: {list(cfg.seeds)} repeats a seed.")
    if all(getattr(cfg.scenarios, s) is None for s in SCENARIOS):
        raise InputError("scenarios: the config names no scenario; add [scenarios.loco] (or unbalanced, "
                         "cross_donor).")
    data = cfg.data
    if data.source in DATASETS:
        if data.donor_key is None and "donor_key" not in raw.get("data", {}):
            data = _replace(data, donor_key=DATASETS[data.source].spec.donor_key)
    elif data.source != "synthetic" and base_dir is not None and not Path(data.source).is_absolute():
        cand = Path(base_dir) / data.source
        if cand.exists():
            data = _replace(data, source=str(cand.resolve()))
    if cfg.scenarios.cross_donor is not None and data.donor_key is None:
        raise InputError("scenarios.cross_donor needs data.donor_key: the obs column of the donor (or batch).")
    figure_metrics = tuple(m for m in cfg.output.figure_metrics)
    from .metrics import METRICS

    for m in figure_metrics:
        if m not in METRICS:
            raise InputError(f"output.figure_metrics: unknown metric {m!r}.{suggest(m, METRICS)}")
    return _replace(cfg, data=data, models=tuple(mcfgs))


def _replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)


def _typename(value) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if is_dataclass(tp):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    """A value does not have the type asked for (turned into an InputError naming the setting)."""


def _convert(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, f"{where}.")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list):
            raise _Mismatch
        item = typing.get_args(tp)[0]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item, f"{where}[{i}]"))
            except _Mismatch:
                raise InputError(f"{where}[{i}]: expected {_describe(item)}, got {v!r} ({_typename(v)}).") from None
        return tuple(out)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - a bug in this module


def _build(cls, raw: dict[str, Any], prefix: str):
    """``cls(**raw)`` with every key checked: unknown keys and wrong types raise InputError naming them."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise InputError(f"{where}: unknown setting.{suggest(key, names)} Settings here: "
                             f"{choices_text(names, 30)}.")
        try:
            kwargs[key] = _convert(value, hints[key], where)
        except _Mismatch:
            raise InputError(f"{where}: expected {_describe(hints[key])}, got {value!r} ({_typename(value)}).") \
                from None
    return cls(**kwargs)


# ================================================================================================ plan


@dataclass(frozen=True)
class SplitDef:
    """One held-out task of a scenario (indices are made by :meth:`Context.split`)."""

    scenario: str
    key: str  # file-safe, unique within the scenario
    name: str  # human-readable: the context, "keep: <context>", "<context> | test 101+107", ...
    context: str
    variant: str = ""  # unbalanced: "keep" / "thin"; cross_donor: the fold
    params: dict[str, Any] = field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.scenario, self.key))


@dataclass(frozen=True)
class Cell:
    """One (scenario, split, model, seed) unit of work; ``id`` names its folder ``cells/<id>``."""

    split: SplitDef
    model: str  # the model label
    seed: int

    @property
    def scenario(self) -> str:
        return self.split.scenario

    @property
    def id(self) -> str:
        return f"{self.split.scenario}.{self.split.key}.{self.model}.s{self.seed}"


def slug(text: str) -> str:
    """A lower-case, file-safe form of a label: runs of other characters become '_'."""
    out = re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")
    return out or "x"


def _unique_slugs(names: list[str]) -> dict[str, str]:
    slugs = {n: slug(n) for n in names}
    seen: dict[str, int] = {}
    for s in slugs.values():
        seen[s] = seen.get(s, 0) + 1
    return {n: (s if seen[s] == 1 else f"{s}_{zlib.crc32(n.encode()):08x}") for n, s in slugs.items()}


def context_counts(adata, spec) -> Any:
    """A contexts x conditions table of cell counts (control and perturbed columns)."""
    import pandas as pd

    obs = adata.obs
    tab = pd.crosstab(obs[spec.context_key].astype(str), obs[spec.condition_key].astype(str))
    for label in (spec.control, spec.perturbed):
        if label not in tab.columns:
            tab[label] = 0
    return tab[[spec.control, spec.perturbed]]


def _contexts(chosen, counts, spec, min_cells: int, where: str) -> list[str]:
    usable = [c for c in counts.index if min(counts.loc[c, spec.control], counts.loc[c, spec.perturbed]) >= min_cells]
    if chosen == "all":
        if not usable:
            raise InputError(f"{where}.contexts = 'all' finds no context with >= {min_cells} cells of each "
                             f"condition; lower {where}.min_cells or list contexts.")
        return usable
    known = list(counts.index)
    for c in chosen:
        if c not in known:
            raise InputError(f"{where}.contexts: {c!r} is not a value of obs[{spec.context_key!r}]."
                             f"{suggest(c, known)} Values: {choices_text(known)}.")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"{where}.contexts lists a context twice.")
    return list(chosen)


def plan_splits(cfg: BenchConfig, adata) -> list[SplitDef]:
    """Every held-out task of the configured scenarios, in a fixed order (needs only ``adata.obs``)."""
    spec = cfg.data.spec()
    counts = context_counts(adata, spec)
    sc = cfg.scenarios
    out: list[SplitDef] = []
    loco_ctx: list[str] = []
    if sc.loco is not None:
        loco_ctx = _contexts(sc.loco.contexts, counts, spec, sc.loco.min_cells, "scenarios.loco")
        keys = _unique_slugs(loco_ctx)
        out += [SplitDef("loco", keys[c], c, c) for c in loco_ctx]
    if sc.unbalanced is not None:
        ub = sc.unbalanced
        min_cells = sc.loco.min_cells if sc.loco is not None else LocoConfig().min_cells
        ctxs = _contexts(ub.contexts, counts, spec, min_cells, "scenarios.unbalanced")
        missing = [c for c in ctxs if c not in loco_ctx]
        if missing:
            raise InputError(f"scenarios.unbalanced.contexts {missing} must also be loco contexts: the balanced loco "
                             "run is what the unbalanced scores are set beside. Add them to scenarios.loco.contexts "
                             "(or add a [scenarios.loco] table).")
        for c in ub.thin_contexts:
            if c not in counts.index:
                raise InputError(f"scenarios.unbalanced.thin_contexts: {c!r} is not a value of "
                                 f"obs[{spec.context_key!r}].{suggest(c, counts.index)}")
        keys = _unique_slugs(ctxs)
        variants = [("keep", {"keep_fraction": ub.keep_fraction, "thin_contexts": "all"})]
        if ub.thin_contexts:
            variants.append(("thin", {"keep_fraction": ub.thin_fraction, "thin_contexts": list(ub.thin_contexts)}))
        for variant, params in variants:
            for c in ctxs:
                out.append(SplitDef("unbalanced", f"{variant}_{keys[c]}", f"{variant}: {c}", c, variant,
                                    {**params, "thin_target": ub.thin_target, "data_seed": ub.data_seed}))
    if sc.cross_donor is not None:
        from .split import donor_folds

        cd = sc.cross_donor
        ctxs = _contexts(cd.contexts, counts, spec, cd.min_cells, "scenarios.cross_donor")
        if cd.test_donors:
            groups = [tuple(str(d) for d in g) for g in cd.test_donors]
        else:
            groups = donor_folds(adata, spec, cd.folds, seed=cd.donor_seed)
        keys = _unique_slugs(ctxs)
        donor = adata.obs[spec.donor_key].astype(str).to_numpy()
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        import numpy as np

        for c in ctxs:
            for k, group in enumerate(groups):
                in_test = np.isin(donor, group) & (ctx == c)
                n = min(int((in_test & (cond == spec.control)).sum()), int((in_test & (cond == spec.perturbed)).sum()))
                if n < cd.min_cells:
                    continue  # too few cells of this context in these donors: no such split (--list-cells shows the rest)
                out.append(SplitDef("cross_donor", f"{keys[c]}_f{k}", f"{c} | test donors {'+'.join(group)}", c,
                                    f"fold{k}", {"test_donors": list(group), "context_seen": cd.context_seen,
                                                 "test_controls_in_train": cd.test_controls_in_train}))
        if not any(s.scenario == "cross_donor" for s in out):
            raise InputError(f"scenarios.cross_donor: no context has >= {cd.min_cells} cells of each condition in the "
                             "test donors of any fold; lower scenarios.cross_donor.min_cells or use fewer folds.")
    return out


def plan(cfg: BenchConfig, adata) -> list[Cell]:
    """Every cell of the benchmark: splits x models x seeds, in run order (split, then seed, then model)."""
    return [Cell(s, m.label, seed) for s in plan_splits(cfg, adata) for seed in cfg.seeds for m in cfg.models]


# ============================================================================================ data


class Context:
    """What the cells of one run share: the preprocessed data (made once, cached in ``DIR/.cache``) and splits.

    The preprocessed AnnData is written to ``DIR/.cache/data-<key>.h5ad`` (key: the input's sha256, the
    preprocessing settings and the spec) by the first process that needs it and read back by every cell, so
    cells run in one process or as separate jobs see byte-identical input.
    """

    def __init__(self, cfg: BenchConfig, out: Path, *, log=print):
        self.cfg, self.out, self.log = cfg, Path(out), log
        self.spec = cfg.data.spec()
        self._data = None
        self._digest: str | None = None
        self._splits: dict[tuple[str, str], Any] = {}

    @property
    def digest(self) -> str:
        from .data import DATASETS, sha256

        if self._digest is None:
            src = self.cfg.data.source
            if src == "synthetic":
                self._digest = self.load_raw()[1]
            else:
                self._digest = DATASETS[src].sha256 if src in DATASETS else sha256(self._path())
        return self._digest

    def _path(self) -> Path:
        path = Path(self.cfg.data.source)
        if not path.exists():
            from .data import load_any

            load_any(self.cfg.data.source)  # raises the InputError that names the problem
        return path

    def load_raw(self):
        """(input AnnData, sha256, description): a bundled dataset, a file, or seeded synthetic data."""
        from . import data

        if self.cfg.data.source != "synthetic":
            return data.load_any(self.cfg.data.source)
        import hashlib

        params = _plain(self.cfg.data.synthetic)
        adata = data.synthetic(**params)
        h = hashlib.sha256(adata.X.tobytes())
        for col in adata.obs.columns:
            h.update("\n".join(adata.obs[col].astype(str)).encode())
        return adata, h.hexdigest(), {"dataset": None, "file": "synthetic", "synthetic": params}

    def cache_file(self) -> Path:
        import hashlib

        key = json.dumps({"sha256": self.digest, "preprocessing": _plain(self.cfg.preprocessing),
                          "spec": self.spec.to_dict()}, sort_keys=True)
        return self.out / CACHE_DIR / f"data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.h5ad"

    def data(self):
        """The preprocessed AnnData (shared; never modified)."""
        if self._data is None:
            import anndata as ad

            from . import _io, data

            path = self.cache_file()
            if not path.exists():
                raw, digest, _desc = self.load_raw()
                if digest != self.digest:
                    raise InputError(f"data.source {self.cfg.data.source!r} changed while the run was planned "
                                     f"(sha256 {digest[:12]}..., expected {self.digest[:12]}...).")
                self.spec.validate(raw)
                pp, info = data.preprocess(raw, self.cfg.preprocessing.to_preprocessing(), log=self.log)
                pp.uns["perturbkit_bench_preprocessing"] = json.dumps(info)
                _io.atomic_write_with(path, lambda p: pp.write_h5ad(p))
            try:
                self._data = ad.read_h5ad(path)
            except Exception as exc:  # a corrupt cache (disk full, foreign file): say how to recover
                raise InputError(f"cannot read the cached preprocessed data {str(path)!r} ({exc}); delete it and "
                                 "rerun (it is rebuilt from the input).") from None
        return self._data

    def preprocessing_info(self) -> dict[str, Any]:
        return json.loads(self.data().uns.get("perturbkit_bench_preprocessing", "{}"))

    def split(self, sd: SplitDef):
        """The :class:`perturbkit.split.Split` of a task, as indices into :meth:`data`."""
        key = (sd.scenario, sd.key)
        if key not in self._splits:
            self._splits[key] = self._make_split(sd)
        return self._splits[key]

    def _make_split(self, sd: SplitDef):
        from . import split

        adata, spec = self.data(), self.spec
        if sd.scenario == "loco":
            return split.holdout_cell_type(adata, spec, sd.context)
        if sd.scenario == "unbalanced":
            p = sd.params
            keep = split.unbalanced(adata, spec, p["keep_fraction"],
                                    contexts=None if p["thin_contexts"] == "all" else p["thin_contexts"],
                                    seed=p["data_seed"], protect=None if p["thin_target"] else sd.context)
            s = split.holdout_cell_type(adata[keep], spec, sd.context)
            info = {**s.info, "scenario": "unbalanced", "variant": sd.variant, **p,
                    "n_cells_kept": int(len(keep)), "n_cells_dropped": int(adata.n_obs - len(keep))}
            return split.Split(train=keep[s.train], source=keep[s.source], target=keep[s.target],
                               name=f"unbalanced:{sd.name}", info=info)
        if sd.scenario == "cross_donor":
            p = sd.params
            return split.cross_donor(adata, spec, sd.context, p["test_donors"], context_seen=p["context_seen"],
                                     test_controls_in_train=p["test_controls_in_train"])
        raise InputError(f"unknown scenario {sd.scenario!r}")  # pragma: no cover


def _obs_only(cfg: BenchConfig, ctx: Context):
    """The data to plan with: the cached preprocessed data when present, else the input (obs is the same)."""
    if ctx.cache_file().exists() or ctx._data is not None:
        return ctx.data()
    adata, _digest, _desc = ctx.load_raw()
    ctx.spec.validate(adata)
    return adata


# ======================================================================================== run directory


def config_hash(config: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def prepare_dir(cfg: BenchConfig, out: str | Path, *, config_text: str | None = None) -> Path:
    """Make ``out`` the run directory of ``cfg``, or refuse: it must be new, empty, or a run of the same config.

    Writes ``config.json`` (the normalised config: the run's identity) and ``config.toml`` (the config as
    given, or rendered from ``cfg``). Safe to call from several processes at once (same content, atomic).
    """
    from . import _io

    out = Path(out)
    config = cfg.to_dict()
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is a file; give a directory.")
    if out.exists():
        entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        cfile = out / "config.json"
        if cfile.exists():
            old = _io.read_json(cfile)
            if old != config:
                diff = _first_difference(old, config) if isinstance(old, dict) else "config.json is unreadable"
                raise InputError(f"--out {str(out)!r} holds a bench run of a different config ({diff}). Use a new "
                                 "directory for a changed config, or rerun the same config to resume.")
        elif entries:
            raise InputError(f"--out {str(out)!r} already holds files that are not a perturbkit bench run "
                             f"({', '.join(sorted(entries)[:4])}). Choose a new or empty directory.")
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(config, indent=2) + "\n"
    if not (out / "config.json").exists() or (out / "config.json").read_text() != text:
        _io.atomic_write_text(out / "config.json", text)
    if not (out / "config.toml").exists():
        _io.atomic_write_text(out / "config.toml", config_text if config_text is not None else to_toml(cfg))
    return out


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new or old[key] != new[key]:
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    return f"{path or 'config'}: {json.dumps(old)} there, {json.dumps(new)} now"


def to_toml(cfg: BenchConfig) -> str:
    """The normalised config as TOML (used when a config was given as an object, not a file)."""
    d = cfg.to_dict()
    models = d.pop("models")
    lines: list[str] = []

    def table(name: str, values: dict) -> None:
        lines.extend(["", f"[{name}]"] if name else [])
        subs = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None and k not in subs)
        for k, v in subs.items():
            table(f"{name}.{k}" if name else k, v)

    scenarios = {k: v for k, v in d.pop("scenarios").items() if v is not None}
    table("", d)
    for name, values in scenarios.items():
        table(f"scenarios.{name}", values)
    for m in models:
        table(f"models.{m['label']}", {"model": m["model"], **m["params"]})
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def cell_dir(out: Path, cell: Cell | str) -> Path:
    return Path(out) / CELLS_DIR / (cell if isinstance(cell, str) else cell.id)


def cell_result(out: Path, cell: Cell | str) -> dict[str, Any] | None:
    """The finished cell's ``result.json``, or None when the cell has not finished."""
    from ._io import read_json

    return read_json(cell_dir(out, cell) / "result.json")


# ================================================================================================= cells


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def figure_cell(cfg: BenchConfig, cell: Cell, splits: list[SplitDef]) -> bool:
    """Whether a cell keeps its prediction for the figures: the figure split (a loco context) at the first seed."""
    loco = [s for s in splits if s.scenario == "loco"]
    if not cfg.output.figures or not loco or cell.scenario != "loco" or cell.seed != cfg.seeds[0]:
        return False
    chosen = cfg.output.figure_split or loco[0].context
    return cell.split.context == chosen


def ceiling_model(cfg: BenchConfig) -> str:
    """The model whose cells also score the ceiling: the control baseline, else the first model."""
    return next((m.label for m in cfg.models if m.model == "control" and not m.params), cfg.models[0].label)


def _wants_degs(cfg: BenchConfig, cell: Cell, splits: list[SplitDef]) -> bool:
    """Unbalanced cells and their balanced loco twins keep their top DEGs (for unbalanced_degs.csv)."""
    if cell.scenario == "unbalanced":
        return True
    return cell.scenario == "loco" and any(s.scenario == "unbalanced" and s.context == cell.split.context
                                           for s in splits)


def run_cell(cfg: BenchConfig, out: str | Path, cell: Cell, ctx: Context, *, keep_pred: bool = False,
             degs: bool = False, progress: bool = False, log=print) -> dict[str, Any]:
    """Fit, predict and score one cell; write ``cells/<id>/``; return its result (``result.json``)."""
    import pandas as pd

    from . import _io, metrics, models, pl
    from .data import sha256
    from .pipeline import _json_default, score_predictions

    out = Path(out)
    cdir = cell_dir(out, cell)
    done = cell_result(out, cell)
    if done is not None:
        return done
    started, t_start = _now(), time.perf_counter()
    timings: dict[str, float] = {}
    adata = ctx.data()
    s = ctx.split(cell.split)
    train, source, target = s.subsets(adata)
    mc = cfg.model(cell.model)
    params = cfg.model_params(cell.model)
    model = models.get(mc.model, **params)
    threads = previous = None
    if model.needs_torch:
        import torch

        previous = torch.get_num_threads()
        if cfg.training.threads is not None:
            torch.set_num_threads(cfg.training.threads)
        threads = torch.get_num_threads()
    try:
        t = time.perf_counter()
        model.fit(train, ctx.spec, seed=cell.seed, progress=progress and model.needs_torch)
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        pred = model.predict(source)
        timings["predict_s"] = time.perf_counter() - t
    finally:
        if previous is not None:
            torch.set_num_threads(previous)  # the caller's setting is theirs
    t = time.perf_counter()
    with_ceiling = cell.model == ceiling_model(cfg)  # the ceiling is scored once per (split, seed)
    with warnings.catch_warnings():  # fewer genes than top DEGs: noted in the scores' notes, not warned per cell
        warnings.filterwarnings("ignore", message=r"n_top=\d+ is more than", category=UserWarning)
        scores, eval_info = score_predictions(target, source, {cell.model: pred}, cfg.metric_names(),
                                              n_boot=cfg.evaluation.n_boot, seed=cell.seed, ceiling=with_ceiling)
    scores = scores[~scores.metric.str.endswith("_norm")]  # normalised once all models are in: aggregate()
    timings["evaluate_s"] = time.perf_counter() - t
    if degs:
        t = time.perf_counter()
        degs = {"real": metrics.top_degs(target, source, 100), "pred": metrics.top_degs(pred, source, 100)}
        timings["degs_s"] = time.perf_counter() - t
    else:
        degs = None
    scores = scores.assign(scenario=cell.scenario, split=cell.split.name, seed=cell.seed,
                           context=cell.split.context, variant=cell.split.variant, n_train=len(s.train),
                           n_source=len(s.source), n_target=len(s.target))
    scores = scores[list(SCORE_COLUMNS)]

    t = time.perf_counter()
    files = {}
    _io.atomic_write_text(cdir / "scores.csv", scores.to_csv(index=False, float_format="%.10g", lineterminator="\n"))
    files["scores.csv"] = sha256(cdir / "scores.csv")
    if cfg.output.save_predictions or keep_pred:
        pred.uns["perturbkit"] = {"cell": cell.id, "model": cell.model, "seed": cell.seed}
        _io.atomic_write_with(cdir / "pred.h5ad", lambda p: pred.write_h5ad(p))
        files["pred.h5ad"] = sha256(cdir / "pred.h5ad")
    if cfg.output.save_weights and hasattr(model, "save"):
        try:
            model.save(cdir / "model")
            for f in sorted((cdir / "model").iterdir()):
                files[f"model/{f.name}"] = sha256(f)
        except NotImplementedError:
            pass
    if keep_pred and hasattr(model, "attention"):
        fig = pl.attention_heatmap(model, source)
        fig.axes[0].set_title(f"{cell.model} attention: {cell.split.context} (seed {cell.seed})", fontsize=9,
                              pad=18)
        _io.atomic_write_with(cdir / "attention.png", lambda p: _save_png(fig, p))
        files["attention.png"] = sha256(cdir / "attention.png")
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start
    result = {
        "kind": RUN_KIND + ".cell",
        "cell": cell.id,
        "scenario": cell.scenario,
        "split": cell.split.name,
        "split_key": cell.split.key,
        "context": cell.split.context,
        "variant": cell.split.variant,
        "model": cell.model,
        "registry_model": mc.model,
        "seed": cell.seed,
        "n_genes": int(adata.n_vars),
        "config_sha": config_hash(cfg.to_dict()),
        "data_sha256": ctx.digest,
        "started": started,
        "ended": _now(),
        "timings": timings,
        "torch_threads": threads,
        "split_info": s.to_dict(adata.obs_names),
        "params": model.params,
        "fit": model.fit_info,
        "evaluation": {"metrics": cfg.metric_names(), "n_boot": cfg.evaluation.n_boot, "seed": cell.seed,
                       **eval_info},
        "degs": degs,
        "versions": _versions(),
        "files": files,
    }
    _io.atomic_write_text(cdir / "result.json", json.dumps(result, indent=1, default=_json_default) + "\n")
    return result


_VERSIONS: dict[str, str] = {}


def _versions() -> dict[str, str]:
    """:func:`perturbkit.pipeline.versions`, looked up once per process (it scans the installed packages)."""
    if not _VERSIONS:
        from .pipeline import versions

        _VERSIONS.update(versions())
    return dict(_VERSIONS)


def _save_png(fig, path, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi, format="png", metadata={"Software": None})


class CellsFailed(RuntimeError):
    """Some cells raised; the others finished and were aggregated."""


def run(config: BenchConfig | str | Path, out: str | Path, *, cells: list[str] | None = None,
        do_cells: bool = True, do_aggregate: bool = True, partial: bool = False, progress: bool = True,
        jobs: int = 1, keep_going: bool = False, log=print) -> dict[str, Any]:
    """Run a benchmark into ``out``: every unfinished cell (or only ``cells``), then :func:`aggregate`.

    ``jobs > 1`` runs the cells in that many worker processes (each ``perturbkit bench --cell ...`` with the
    config's ``training.threads``); the results are the same as with one process, since each cell depends
    only on the config, its seed and the thread count. A failing cell is reported and the others go on, except
    when ``cells`` are named without ``keep_going`` (then it raises).

    Returns ``{"cells": [ids run or skipped], "ran": [...], "skipped": [...], "failed": {id: error}}``.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"--jobs must be a positive integer, got {jobs!r}.")
    config_text = None
    if not isinstance(config, BenchConfig):
        config_text = Path(config).read_text() if Path(config).exists() else None
        config = load_config(config)
    cfg = config
    out = prepare_dir(cfg, out, config_text=config_text)
    from . import _io

    _io.remove_stale_temps(out, recursive=True)  # left by a SIGKILLed process; never another worker's
    ctx = Context(cfg, out, log=log)
    everything = plan(cfg, _obs_only(cfg, ctx))
    by_id = {c.id: c for c in everything}
    if cells:
        unknown = [c for c in cells if c not in by_id]
        if unknown:
            raise InputError(f"--cell {unknown[0]!r} is not a cell of this config.{suggest(unknown[0], by_id)} "
                             "List them with --list-cells.")
        todo = [by_id[c] for c in dict.fromkeys(cells)]
    else:
        todo = everything if do_cells else []
    splits = list(dict.fromkeys(c.split for c in everything))
    ran, skipped, failed = [], [], {}
    pending = [c for c in todo if cell_result(out, c) is None]
    skipped = [c.id for c in todo if cell_result(out, c) is not None]
    if skipped:
        log(f"bench: {len(skipped)} of {len(todo)} cells already finished in {out}; skipping them")
    t0 = time.perf_counter()
    if jobs > 1 and len(pending) > 1:
        ran, failed = _run_workers(cfg, out, ctx, pending, jobs, log=log)
        pending = []
    for i, cell in enumerate(pending, 1):
        try:
            res = run_cell(cfg, out, cell, ctx, keep_pred=figure_cell(cfg, cell, splits),
                           degs=_wants_degs(cfg, cell, splits), progress=progress, log=log)
        except InputError:
            raise
        except Exception as exc:  # one failing cell does not lose the others; it is reported and rerun later
            failed[cell.id] = f"{type(exc).__name__}: {exc}"
            log(f"[{i}/{len(pending)}] {cell.id}: FAILED ({failed[cell.id]})")
            if cells and not keep_going:
                raise
            continue
        ran.append(cell.id)
        tm = res["timings"]
        elapsed = time.perf_counter() - t0
        eta = elapsed / i * (len(pending) - i)
        log(f"[{i}/{len(pending)}] {cell.id}: fit {tm['fit_s']:.1f} s, evaluate {tm['evaluate_s']:.1f} s, "
            f"total {tm['total_s']:.1f} s (elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left)")
    summary = {"cells": [c.id for c in todo], "ran": ran, "skipped": skipped, "failed": failed}
    if do_aggregate and not ran and not failed and _aggregate_is_current(cfg, out, everything):
        log(f"bench: {out} is complete and its tables, figures, report and crate are up to date")
    elif do_aggregate:
        aggregate(cfg, out, partial=partial or bool(failed), ctx=ctx, log=log)
    if failed:
        raise CellsFailed(f"{len(failed)} cell(s) failed: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
                          + ". The others are saved; rerun the same command to retry the failed ones.")
    return summary


def _run_workers(cfg: BenchConfig, out: Path, ctx: Context, pending: list[Cell], jobs: int, *, log=print):
    """Run ``pending`` in ``jobs`` processes of ``perturbkit bench --cell``; returns (ran ids, {failed id: why})."""
    import subprocess
    import sys

    from . import _io

    ctx.data()  # preprocess once and cache it before the workers start, so none of them repeats it
    worker_cfg = out / CACHE_DIR / f"config-{config_hash(cfg.to_dict())}.toml"
    if not worker_cfg.exists():
        _io.atomic_write_text(worker_cfg, to_toml(cfg))
    # the expensive cells first, dealt round-robin, so the workers finish at about the same time
    cost = {"scpram": 2, "scgen": 3}
    order = sorted(pending, key=lambda c: -cost.get(c.model, 0))
    groups = [order[i::jobs] for i in range(jobs)]
    log(f"bench: {len(pending)} cells in {len(groups)} worker processes (training.threads = "
        f"{cfg.training.threads} each)")
    procs = []
    for group in groups:
        if group:
            cmd = [sys.executable, "-m", "perturbkit", "bench", str(worker_cfg), "--out", str(out), "--no-progress",
                   "--keep-going"]
            for cell in group:
                cmd += ["--cell", cell.id]
            procs.append(subprocess.Popen(cmd))
    try:
        for p in procs:
            p.wait()
    except BaseException:  # interrupted: stop the workers; their finished cells are complete
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    ran = [c.id for c in pending if cell_result(out, c) is not None]
    failed = {c.id: "failed in a worker process (its error is printed above)" for c in pending
              if cell_result(out, c) is None}
    return ran, failed


# ============================================================================================ aggregate


def collect(out: str | Path, cells: list[Cell]):
    """(scores of the finished cells, their results, the ids that have not finished)."""
    import pandas as pd

    out = Path(out)
    tables, results, missing = [], {}, []
    for cell in cells:
        res = cell_result(out, cell)
        if res is None:
            missing.append(cell.id)
            continue
        results[cell.id] = res
        tables.append(pd.read_csv(cell_dir(out, cell) / "scores.csv", keep_default_na=False,
                                  na_values=[""], dtype={"error": str, "variant": str, "context": str,
                                                         "split": str}))
    scores = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=list(SCORE_COLUMNS))
    for col in ("error", "variant"):
        scores[col] = scores[col].fillna("")
    return scores, results, missing


def tidy_scores(raw, control_label: str | None):
    """Every model's rows once, the ceiling once per (scenario, split, seed), then the normalised rows."""
    import pandas as pd

    from .metrics import normalise

    is_ceiling = raw.model == "ceiling"
    ceiling = raw[is_ceiling].drop_duplicates(["scenario", "split", "seed", "metric"])
    scores = pd.concat([raw[~is_ceiling], ceiling], ignore_index=True)
    if control_label is not None and (scores.model == control_label).any():
        norm = normalise(scores, baseline=control_label, ceiling="ceiling", by=["scenario", "split", "seed"])
        scores = pd.concat([scores, norm[norm.model != "ceiling"]], ignore_index=True)
    return scores[list(SCORE_COLUMNS)].reset_index(drop=True)


def _t_interval(values) -> tuple[float, float, float, float]:
    """(mean, sd, ci_low, ci_high): Student-t 95 % interval of the mean over seeds (NaN with one seed)."""
    import numpy as np
    from scipy import stats

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return (math.nan,) * 4
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan, math.nan
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(v) - 1)) * sd / math.sqrt(len(v))
    return mean, sd, mean - half, mean + half


def summarise(scores):
    """Mean and 95 % interval over seeds per (scenario, split, model, metric), and per scenario (split "all").

    The "all" rows average each seed's scores over the scenario's splits first, then take the interval over
    seeds. ``rank`` orders the models (not the ceiling) within (scenario, split, metric): 1 = best, by the
    metric's direction (ties share the best rank).
    """
    import pandas as pd

    rows = []
    hib = scores.groupby("metric")["higher_is_better"].first().to_dict()
    for (scen, split, model, metric), g in scores.groupby(["scenario", "split", "model", "metric"], sort=False):
        mean, sd, lo, hi = _t_interval(g.value.to_numpy())
        rows.append((scen, split, model, metric, int(g.value.notna().sum()), mean, sd, lo, hi))
    for (scen, model, metric), g in scores.groupby(["scenario", "model", "metric"], sort=False):
        per_seed = g.groupby("seed").value.mean()
        mean, sd, lo, hi = _t_interval(per_seed.to_numpy())
        rows.append((scen, "all", model, metric, int(per_seed.notna().sum()), mean, sd, lo, hi))
    summary = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS[:-2]))
    summary["higher_is_better"] = summary.metric.map(hib).astype(bool)
    summary["rank"] = math.nan
    models = summary.model != "ceiling"
    for _key, g in summary[models].groupby(["scenario", "split", "metric"], sort=False):
        asc = not bool(g.higher_is_better.iloc[0])
        summary.loc[g.index, "rank"] = g["mean"].rank(ascending=asc, method="min")
    return summary[list(SUMMARY_COLUMNS)]


def specificity_table(summary, counts, spec):
    """Per-context (loco) scores with each context's cell counts: do methods favour abundant types?"""
    loco = summary[(summary.scenario == "loco") & (summary.split != "all")].copy()
    loco = loco.rename(columns={"split": "context"})
    loco["n_control"] = loco.context.map(counts[spec.control]).astype("Int64")
    loco["n_perturbed"] = loco.context.map(counts[spec.perturbed]).astype("Int64")
    cols = ["context", "n_control", "n_perturbed", "model", "metric", "n_seeds", "mean", "ci_low", "ci_high", "rank"]
    return loco[cols].sort_values(["metric", "n_perturbed", "model"], ascending=[True, False, True])


def unbalanced_tables(scores, results: dict[str, dict], cells: list[Cell]):
    """(scores side by side: balanced loco vs each unbalanced variant; top-DEG overlap balanced vs unbalanced)."""
    import pandas as pd

    ub = scores[scores.scenario == "unbalanced"]
    if ub.empty:
        return None, None
    bal = scores[scores.scenario == "loco"]
    keys = ["context", "model", "metric"]
    bal_m = bal.groupby(keys).value.agg(["mean", "count"]).rename(columns={"mean": "balanced", "count": "n_bal"})
    ub_m = ub.groupby(["variant", *keys]).value.mean().rename("unbalanced").reset_index()
    side = ub_m.join(bal_m, on=keys)
    side["change"] = side.unbalanced - side.balanced
    side = side[["context", "variant", "model", "metric", "balanced", "unbalanced", "change"]]
    rows = []
    by_key = {(c.scenario, c.split.context, c.model, c.seed): c for c in cells}
    for cell in cells:
        if cell.scenario != "unbalanced" or cell.id not in results or results[cell.id]["registry_model"] == "control":
            continue  # the control baseline's "prediction" is the source cells: it has no DEGs of its own
        twin = by_key.get(("loco", cell.split.context, cell.model, cell.seed))
        mine, theirs = results[cell.id].get("degs"), results.get(twin.id, {}).get("degs") if twin else None
        if not mine or not theirs:
            continue
        for what, label in (("real", "real cells"), ("pred", cell.model)):
            a, b = theirs[what], mine[what]
            k = deg_k(len(a), results[cell.id].get("n_genes"))
            rows.append({"context": cell.split.context, "variant": cell.split.variant, "model": label,
                         "seed": cell.seed, "k": k, "top_k_overlap": len(set(a[:k]) & set(b[:k])) / max(k, 1),
                         "balanced_top10": " ".join(a[:10]), "unbalanced_top10": " ".join(b[:10]),
                         "new_in_top10": " ".join(g for g in b[:10] if g not in set(a[:10]))})
    degs = pd.DataFrame(rows)
    if not degs.empty:
        degs = degs.drop_duplicates(["context", "variant", "model", "seed"])
    return side, degs


def deg_k(n_listed: int, n_genes: int | None) -> int:
    """How many top DEGs to compare: 100, or a quarter of the genes when there are fewer than 400."""
    n_genes = n_genes or n_listed
    return max(1, min(n_listed, 100, n_genes // 4 if n_genes < 400 else 100))


def aggregate(config: BenchConfig | str | Path, out: str | Path, *, partial: bool = False, ctx: Context | None = None,
              log=print) -> dict[str, Any]:
    """Build ``scores.csv``, ``summary.csv``, the scenario tables, figures, ``run.json``, the report and the crate.

    Refuses (InputError) while cells are unfinished, unless ``partial``.
    """
    from . import _io

    if not isinstance(config, BenchConfig):
        config = load_config(config)
    cfg = config
    out = prepare_dir(cfg, out)
    ctx = ctx or Context(cfg, out, log=log)
    cells = plan(cfg, _obs_only(cfg, ctx))
    raw, results, missing = collect(out, cells)
    if missing and not partial:
        raise InputError(f"{len(missing)} of {len(cells)} cells have not finished (e.g. {missing[0]}); run them "
                         "first (perturbkit bench CONFIG --out DIR, or --cell ID), or pass --partial.")
    if not results:
        raise InputError("no cell has finished yet; nothing to aggregate.")
    shas = {r["data_sha256"] for r in results.values()}
    if len(shas) > 1:
        raise InputError(f"the finished cells were computed from different input data (sha256 {sorted(shas)}); "
                         "start a new run directory.")
    t0 = time.perf_counter()
    control = next((m.label for m in cfg.models if m.model == "control" and not m.params), None)
    scores = tidy_scores(raw, control)
    summary = summarise(scores)
    written = []

    def write_csv(name, table):
        if table is None or table.empty:
            return
        _io.atomic_write_text(out / name, table.to_csv(index=False, float_format="%.10g", lineterminator="\n"))
        written.append(name)

    write_csv("scores.csv", scores)
    write_csv("summary.csv", summary)
    adata = ctx.data()
    counts = context_counts(adata, ctx.spec)
    spec_table = specificity_table(summary, counts, ctx.spec) if cfg.scenarios.loco is not None else None
    write_csv("specificity.csv", spec_table)
    side, degs = unbalanced_tables(scores, results, cells)
    write_csv("unbalanced.csv", side)
    write_csv("unbalanced_degs.csv", degs)
    figures = make_figures(cfg, out, ctx, cells, scores, spec_table, side, counts, log=log) if cfg.output.figures else []
    record = run_record(cfg, out, ctx, cells, results, missing, written, figures)
    from .pipeline import _json_default

    _io.atomic_write_text(out / "run.json", json.dumps(record, indent=2, default=_json_default) + "\n")
    from . import report

    report.write_report(out)
    write_crate(out)
    log(f"aggregated {len(results)} cells into {out}: scores.csv, summary.csv, {len(figures)} figures, report.html, "
        f"ro-crate-metadata.json ({time.perf_counter() - t0:.1f} s)")
    return record


def _aggregate_is_current(cfg: BenchConfig, out: Path, cells: list[Cell]) -> bool:
    """Whether run.json already aggregates every cell of this config (so a rerun need not redo the figures)."""
    from ._io import read_json

    run = read_json(out / "run.json")
    if not isinstance(run, dict):
        return False
    listed = run.get("cells", {})
    return (run.get("config_sha") == config_hash(cfg.to_dict()) and not run.get("missing")
            and set(listed) == {c.id for c in cells}
            and all(listed[c.id].get("ended") == (cell_result(out, c) or {}).get("ended") for c in cells)
            and all((out / name).exists() for name in ("scores.csv", "summary.csv", "report.html",
                                                        "ro-crate-metadata.json", *run.get("figures", []))))


def run_record(cfg: BenchConfig, out: Path, ctx: Context, cells, results, missing, tables, figures) -> dict:
    """``run.json``: what was run, on what, with which software, when, and how long each cell took."""
    from .data import DATASETS
    from .pipeline import versions

    src = cfg.data.source
    starts = sorted(r["started"] for r in results.values())
    ends = sorted(r["ended"] for r in results.values())
    adata = ctx.data()
    splits = {}
    for c in cells:
        if c.id in results and f"{c.scenario}.{c.split.key}" not in splits:
            splits[f"{c.scenario}.{c.split.key}"] = results[c.id]["split_info"]
    return {
        "kind": RUN_KIND,
        "name": cfg.name,
        "description": cfg.description,
        "config": cfg.to_dict(),
        "config_sha": config_hash(cfg.to_dict()),
        "started": starts[0],
        "ended": max(ends[-1], _now()),
        "aggregated": _now(),
        "versions": versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "processor": platform.processor(), "python": platform.python_implementation()},
        "data": {
            "source": src,
            "dataset": src if src in DATASETS else None,
            "file": DATASETS[src].file if src in DATASETS else Path(src).name,
            **({"synthetic": _plain(cfg.data.synthetic)} if src == "synthetic" else {}),
            "sha256": ctx.digest,
            "reference": DATASETS[src].reference if src in DATASETS else None,
            "doi": DATASETS[src].doi if src in DATASETS else None,
            "accession": DATASETS[src].accession if src in DATASETS else None,
            "n_cells": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
        },
        "spec": ctx.spec.to_dict(),
        "preprocessing": ctx.preprocessing_info(),
        "models": [{"label": m.label, "model": m.model, "params": _effective_params(cfg, m.label)}
                   for m in cfg.models],
        "splits": splits,
        "cells": {c.id: {"scenario": c.scenario, "split": c.split.name, "model": c.model, "seed": c.seed,
                         "status": "finished" if c.id in results else "missing",
                         **({"started": results[c.id]["started"], "ended": results[c.id]["ended"],
                             "timings": results[c.id]["timings"]} if c.id in results else {})}
                  for c in cells},
        "missing": missing,
        "tables": tables,
        "figures": figures,
        "timing_totals_s": _timing_totals(cells, results),
    }


def _effective_params(cfg: BenchConfig, label: str) -> dict[str, Any]:
    """Every parameter a model runs with: its defaults, the config's table and training.epochs."""
    from . import models

    return dict(models.get(cfg.model(label).model, **cfg.model_params(label)).params)


def _timing_totals(cells, results) -> dict[str, float]:
    tot: dict[str, float] = {}
    for c in cells:
        if c.id in results:
            key = f"{c.scenario}/{c.model}"
            tot[key] = tot.get(key, 0.0) + float(results[c.id]["timings"]["total_s"])
    return {k: round(v, 2) for k, v in tot.items()}


# ============================================================================================== figures


def make_figures(cfg: BenchConfig, out: Path, ctx: Context, cells: list[Cell], scores, spec_table, side, counts, *,
                 log=print) -> list[str]:
    """Write ``figures/*.png``; returns their paths relative to ``out``."""
    import shutil

    from . import _io, metrics, pl

    fdir = out / "figures"
    written: list[str] = []

    def save(name: str, fig) -> None:
        _io.atomic_write_with(fdir / name, lambda p: _save_png(fig, p, dpi=cfg.output.dpi))
        written.append(f"figures/{name}")

    hib = {name: m.higher_is_better for name, m in metrics.METRICS.items()}
    fmetrics = [m for m in cfg.output.figure_metrics if m in set(scores.metric)]
    models = [m.label for m in cfg.models]
    for scen in SCENARIOS:
        sub = scores[(scores.scenario == scen) & (scores.model != "ceiling")]
        if sub.empty:
            continue
        for metric in fmetrics:
            m = sub[sub.metric == metric]
            wide = m.groupby(["model", "split"], sort=False).value.mean().unstack("split")
            wide = wide.reindex([x for x in models if x in wide.index])
            wide = wide[list(dict.fromkeys(m.split))]
            save(f"heatmap_{scen}_{metric}.png",
                 pl.metric_heatmap(wide, metric=metric, higher_is_better=hib[metric],
                                   title=f"{scen}: {metric} (mean over {len(cfg.seeds)} seed(s))"))
        if len(cfg.seeds) > 1 and scen == "loco":
            for metric in fmetrics[:2]:
                save(f"seeds_{scen}_{metric}.png",
                     pl.seed_variability(sub, metric=metric, title=f"{scen}: {metric}, one dot per seed"))
    if spec_table is not None and not spec_table.empty:
        n_cells = counts.sum(axis=1)
        for metric in fmetrics:
            t = spec_table[(spec_table.metric == metric) & (spec_table.model != "ceiling")]
            if not t.empty:
                save(f"specificity_{metric}.png", pl.context_scores(t, n_cells, metric=metric))
    if side is not None and not side.empty:
        for metric in fmetrics:
            t = side[(side.metric == metric) & (side.model != "ceiling")]
            if not t.empty:
                save(f"unbalanced_{metric}.png", pl.unbalanced_comparison(
                    t, metric=metric, title=f"{metric}: balanced vs unbalanced training data"))
    _example_figures(cfg, out, ctx, cells, save)
    for cell in cells:  # per-cell figures made while the model was in memory (scPRAM attention)
        src = cell_dir(out, cell) / "attention.png"
        if src.exists():
            dst = fdir / f"attention_{cell.model}.png"
            _io.atomic_write_with(dst, lambda p, s=src: shutil.copyfile(s, p))
            written.append(f"figures/attention_{cell.model}.png")
    return written


def _example_figures(cfg, out, ctx, cells, save) -> None:
    """Per-gene regressions, PCA / UMAP and DEG violins of the figure split, from the kept predictions."""
    import anndata as ad

    from . import metrics, pl

    splits = list(dict.fromkeys(c.split for c in cells))
    chosen = [c for c in cells if figure_cell(cfg, c, splits) and (cell_dir(out, c) / "pred.h5ad").exists()]
    if not chosen:
        return
    s = ctx.split(chosen[0].split)
    _train, source, target = s.subsets(ctx.data())
    top = metrics.top_degs(target, source, 100)
    preds = {c.model: ad.read_h5ad(cell_dir(out, c) / "pred.h5ad") for c in chosen}
    where = f"{chosen[0].split.context} (seed {chosen[0].seed})"
    for label, pred in preds.items():
        save(f"reg_mean_{label}.png", pl.reg_mean(target, pred, top_genes=top, title=f"{label}: means, {where}"))
        save(f"reg_var_{label}.png", pl.reg_var(target, pred, top_genes=top, title=f"{label}: variances, {where}"))
    groups = {"control": source, "real": target, **{k: v for k, v in preds.items() if k != "control"}}
    n = cfg.output.max_figure_cells
    save("pca.png", pl.cell_embedding(groups, basis="pca", max_cells=n, title=f"PCA: {where}"))
    if cfg.output.umap:
        save("umap.png", pl.cell_embedding(groups, basis="umap", max_cells=n, title=f"UMAP: {where}"))
    save("violins_top_degs.png", pl.deg_violins(groups, top[:6], max_cells=n, title=f"top 6 real DEGs: {where}"))


def write_crate(out: str | Path) -> Path:
    """``ro-crate-metadata.json`` of a bench run directory (from its ``run.json``; see :mod:`perturbkit.record`)."""
    from . import record

    out = Path(out)
    run = json.loads((out / "run.json").read_text())
    cfg = run["config"]
    scen = ", ".join(k for k, v in cfg["scenarios"].items() if v)
    desc = run.get("description") or (
        f"Benchmark of single-cell perturbation response models ({', '.join(m['label'] for m in cfg['models'])}) on "
        f"{run['data']['file']}: scenarios {scen}; seeds {cfg['seeds']}; run with perturbkit "
        f"{run['versions']['perturbkit']}.")
    # the crate lists every parameter each model ran with (defaults included), not only the config's overrides
    crate_record = {**run, "config": {**cfg, "models": run.get("models", cfg["models"])}}
    return record.write_crate(out, crate_record, name=f"perturbkit bench: {run['name']}", description=desc,
                              license=cfg["output"]["license"])


# ============================================================================================ small API


def list_cells(config: BenchConfig | str | Path, out: str | Path | None = None, *, as_dicts: bool = False) -> list:
    """The cell ids of a config in run order (``as_dicts``: with scenario, split, context, model, seed and,
    when ``out`` is given, whether the cell has finished there). Reads the input's obs; runs nothing."""
    cfg = config if isinstance(config, BenchConfig) else load_config(config)
    ctx = Context(cfg, Path(out), log=lambda *a: None) if out is not None else _NoCache(cfg)
    cells = plan(cfg, _obs_only(cfg, ctx))
    if not as_dicts:
        return [c.id for c in cells]
    return [{"id": c.id, "scenario": c.scenario, "split": c.split.name, "context": c.split.context,
             "model": c.model, "seed": c.seed,
             "finished": out is not None and cell_result(Path(out), c) is not None} for c in cells]


class _NoCache(Context):
    """A context that never looks for a run directory's cache (for listing cells without --out)."""

    def __init__(self, cfg: BenchConfig):
        super().__init__(cfg, Path("/nonexistent-perturbkit-run"), log=lambda *a: None)

    def cache_file(self) -> Path:
        return self.out / "none.h5ad"


def headline(out: str | Path, metrics=("r2_mean_top100", "pearson_delta", "edistance")) -> str:
    """A short text table of summary.csv: each scenario's mean over splits and seeds, with the interval."""
    import pandas as pd

    s = pd.read_csv(Path(out) / "summary.csv")
    s = s[(s.split == "all") & s.metric.isin(metrics)].copy()
    s["cell"] = [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if lo == lo else f"{m:.3f}"
                 for m, lo, hi in zip(s["mean"], s.ci_low, s.ci_high)]
    wide = s.pivot_table(index=["scenario", "model"], columns="metric", values="cell", aggfunc="first", sort=False)
    return wide[[m for m in metrics if m in wide.columns]].to_string()
