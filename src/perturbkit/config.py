"""One TOML -> frozen-dataclass loader, and the tables that ``bench`` and ``tune`` configs share.

:func:`build` turns a parsed TOML table into a frozen dataclass, driven by the dataclass's type hints: an
unknown setting or a value of the wrong type raises :class:`~perturbkit.errors.InputError` naming the full
setting path (``scenarios.loco.min_cells``), a close match and the settings that exist there. :func:`plain`
is the inverse (JSON-ready data); :func:`to_toml` writes it back as TOML.

The shared tables, written the same way in every config:

- ``[data]`` (:class:`DataConfig`): ``source`` (bundled name, ``"synthetic"``, ``"synthetic_screen"`` or an
  ``.h5ad`` path), ``filter`` (cells kept), the :class:`~perturbkit.data.PerturbSpec` keys (``condition_key``,
  ``control``, ...), ``[data.synthetic]`` and ``[data.synthetic_screen]``;
- ``[preprocessing]``: :class:`~perturbkit.data.Preprocessing` itself;
- ``[training]`` (:class:`TrainingConfig`): ``epochs`` and ``threads`` for every model that trains;
- ``[models.NAME]`` (:class:`ModelConfig`, read by :func:`model_tables`): a registry model and its parameters;
- ``[evaluation]`` (:class:`EvaluationConfig`): ``metrics``, ``n_boot``, ``baselines``;
- ``seeds``: a list of seeds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .spec import PerturbSpec, Preprocessing
from .errors import InputError, choices_text, suggest

# ============================================================================================ the loader


def typename(value) -> str:
    """How a TOML value reads in a message: ``an integer``, ``a table``, ..."""
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def describe(tp) -> str:
    """What a type hint accepts, in words (``an integer or 'auto'``)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "nothing"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict or is_dataclass(tp):
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
        return build(tp, value, where)
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
    if origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        item = typing.get_args(tp)[0]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item, f"{where}[{i}]"))
            except _Mismatch:
                raise InputError(f"{where}[{i}]: expected {describe(item)}, got {v!r} ({typename(v)}).") from None
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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config type {tp!r}")  # pragma: no cover - a bug in a config dataclass


def _flattened(cls) -> tuple[str, ...]:
    """Fields of ``cls`` whose own dataclass's settings are written in ``cls``'s table (``FLATTEN``)."""
    return tuple(getattr(cls, "FLATTEN", ()))


def settings(cls) -> list[str]:
    """The setting names of a config dataclass's table (flattened fields contribute theirs)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        if f.name in _flattened(cls):
            out += settings(hints[f.name])
        else:
            out.append(f.name)
    return out


def build(cls, raw: dict[str, Any], where: str = ""):
    """``cls(**raw)`` with every key checked: unknown keys and wrong types raise InputError naming them.

    ``where`` is the table's path (``"scenarios.loco"``; ``""`` for the top level).
    """
    if not isinstance(raw, dict):
        raise InputError(f"{where or 'config'}: expected a table, got {raw!r} ({typename(raw)}).")
    hints = typing.get_type_hints(cls)
    flat = _flattened(cls)
    own = [f.name for f in fields(cls) if f.name not in flat]
    sub_keys = {name: settings(hints[name]) for name in flat}
    known = settings(cls)
    kwargs: dict[str, Any] = {}
    sub_raw: dict[str, dict] = {name: {} for name in flat}
    prefix = f"{where}." if where else ""
    for key, value in raw.items():
        path = f"{prefix}{key}"
        owner = next((name for name, keys in sub_keys.items() if key in keys), None)
        if owner is not None:
            sub_raw[owner][key] = value
            continue
        if key not in own:
            raise InputError(f"{path}: unknown setting.{suggest(key, known)} Settings here: "
                             f"{choices_text(known, 30)}.")
        try:
            kwargs[key] = _convert(value, hints[key], path)
        except _Mismatch:
            raise InputError(f"{path}: expected {describe(hints[key])}, got {value!r} ({typename(value)}).") \
                from None
    for name in flat:
        kwargs[name] = build(hints[name], sub_raw[name], where)
    return cls(**kwargs)


from ._io import plain  # noqa: E402,F401  (config.plain: where config dataclasses become JSON-ready data)


def replace(obj, **changes):
    return dataclasses.replace(obj, **changes)


def first_difference(old: Any, new: Any, path: str = "") -> str:
    """Where two plain configs first differ, as ``key.sub: <old> there, <new> now``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new or old[key] != new[key]:
                return first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    return f"{path or 'config'}: {json.dumps(old)} there, {json.dumps(new)} now"


def to_toml(data: dict[str, Any], *, tables_last: tuple[str, ...] = ()) -> str:
    """Plain config data as TOML: scalars first, then one ``[table]`` per nested dict (``None`` values are left
    out). Keys in ``tables_last`` are written after the others."""
    lines: list[str] = []

    def table(name: str, values: dict) -> None:
        lines.extend(["", f"[{name}]"] if name else [])
        subs = {k: v for k, v in values.items() if isinstance(v, dict)}
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items() if v is not None and k not in subs)
        for k, v in subs.items():
            table(f"{name}.{k}" if name else k, v)

    first = {k: v for k, v in data.items() if k not in tables_last}
    table("", first)
    for k in tables_last:
        if isinstance(data.get(k), dict):
            for sub, values in data[k].items():
                if values is not None:
                    table(f"{k}.{sub}", values)
    return "\n".join(lines).lstrip("\n") + "\n"


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def read(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a dict; a missing, unreadable or invalid file raises :class:`InputError`."""
    from ._io import read_toml

    return read_toml(path)


# ========================================================================================= shared tables


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
class SyntheticScreenConfig:
    """``[data.synthetic_screen]``: parameters of :func:`perturbkit.data.synthetic_screen` when
    ``source = "synthetic_screen"``."""

    n_contexts: int = 3
    n_cells: int = 60
    n_genes: int = 50
    perturbations: tuple[str, ...] = ("A", "B", "C", "D")
    combinations: tuple[str, ...] = ("A+B", "C+D")
    n_responsive: int = 5
    effect: float = 1.5
    null: tuple[str, ...] = ("D",)  # perturbations without an effect
    seed: int = 0


#: the ``[data] source`` values that generate seeded data instead of reading it (each has a table of its own)
SYNTHETIC_SOURCES = ("synthetic", "synthetic_screen")


def check_filter(where: str, value: dict[str, Any]) -> None:
    """Raise :class:`InputError` unless ``value`` maps obs columns to a value or a list of values (a
    ``filter`` setting; ``where``: its path)."""
    scalar = (str, int, float, bool)
    for key, v in value.items():
        ok = isinstance(v, scalar) or (isinstance(v, list | tuple) and len(v) > 0
                                       and all(isinstance(x, scalar) for x in v))
        if not ok:
            raise InputError(f"{where}.{key}: expected a value or a non-empty list of values of "
                             f"obs[{key!r}], got {v!r} ({typename(v)}); e.g. {where} = {{ {key} = \"a\" }}.")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: the input (``source``), the cells kept (``filter``) and the
    :class:`~perturbkit.data.PerturbSpec` keys, in one table."""

    FLATTEN: ClassVar[tuple[str, ...]] = ("spec",)

    # bundled dataset name, "synthetic", "synthetic_screen", or an .h5ad path (relative: to the config)
    source: str = "kang2018"
    # obs column -> value or list of values: only those cells are read (before preprocessing), e.g. one screen
    filter: dict[str, Any] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    synthetic_screen: SyntheticScreenConfig = field(default_factory=SyntheticScreenConfig)
    spec: PerturbSpec = field(default_factory=PerturbSpec)

    def __post_init__(self):
        check_filter("data.filter", self.filter)

    @property
    def synthetic_params(self) -> dict[str, Any] | None:
        """The generator's parameters when ``source`` is synthetic (None for a dataset or a file)."""
        return plain(getattr(self, self.source)) if self.source in SYNTHETIC_SOURCES else None

    def load(self):
        """(input AnnData, sha256, description): a bundled dataset, a file, or seeded synthetic data;
        ``filter`` is applied after the sha256 (of the file, or of the generated data) is taken."""
        from . import data

        if self.source not in SYNTHETIC_SOURCES:
            adata, digest, desc = data.load_any(self.source)
        else:
            import hashlib

            params = self.synthetic_params
            adata = getattr(data, self.source)(**params)
            h = hashlib.sha256(adata.X.tobytes())
            for col in adata.obs.columns:
                h.update("\n".join(adata.obs[col].astype(str)).encode())
            digest, desc = h.hexdigest(), {"dataset": None, "file": self.source, self.source: params}
        if self.filter:
            adata = data.apply_filter(adata, self.filter, "data.filter")
            desc = {**desc, "filter": dict(self.filter)}
        return adata, digest, desc


def load_data(raw: Any, *, base_dir: str | Path | None = None, where: str = "data") -> DataConfig:
    """The ``[data]`` table: a bundled dataset's own keys fill in what the table leaves out; a relative path is
    resolved against ``base_dir`` (the config file's folder)."""
    from .data import DATASETS

    if isinstance(raw, str):  # `data = "kang2018"`: the tune configs before the shared [data] table
        raise InputError(f"{where} = {raw!r}: the input is now a table shared with bench configs; write "
                         f"[data] source = {json.dumps(raw)}.")
    cfg = build(DataConfig, raw if raw is not None else {}, where)
    given = set(raw or {})
    if cfg.source in DATASETS:
        ds = DATASETS[cfg.source].spec
        filled = {k: getattr(ds, k) for k in settings(PerturbSpec) if k not in given}
        cfg = replace(cfg, spec=replace(cfg.spec, **filled))
    elif (cfg.source not in SYNTHETIC_SOURCES and base_dir is not None
          and not Path(cfg.source).is_absolute()):
        cand = Path(base_dir) / cfg.source
        if cand.exists():
            cfg = replace(cfg, source=str(cand.resolve()))
    return cfg


def load_preprocessing(raw: Any, where: str = "preprocessing") -> Preprocessing:
    """The ``[preprocessing]`` table (:class:`~perturbkit.data.Preprocessing`), values checked up front."""
    pp = build(Preprocessing, raw if raw is not None else {}, where)
    try:
        pp.check()
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    return pp


def positive(name: str, value: int, least: int) -> None:
    """Raise :class:`InputError` unless ``value >= least`` (``name``: the setting's path)."""
    if value < least:
        raise InputError(f"{name} must be >= {least}, got {value}.")


@dataclass(frozen=True)
class TrainingConfig:
    """``[training]``: settings every trained model shares (a model's own table may set its own ``epochs``)."""

    epochs: int | None = None  # None: each model's default
    threads: int | None = None  # torch CPU threads (None: torch's default)
    #: where models train and predict: "auto" (cuda, mps or cpu), "cpu", "cuda", "cuda:N", "mps"
    device: str = "auto"

    def __post_init__(self):
        from .execution import DEVICES, check_device

        if self.epochs is not None:
            positive("training.epochs", self.epochs, 1)
        if self.threads is not None:
            positive("training.threads", self.threads, 1)
        try:
            object.__setattr__(self, "device", check_device(self.device))
        except InputError:
            raise InputError(f"training.device must be one of {', '.join(map(repr, DEVICES))} (N a GPU index), "
                             f"got {self.device!r}.") from None

    def execution(self, *, threads: int | None = None, device: str | None = None):
        """The execution context of these settings (``threads`` and ``device`` override ``training.threads``
        and ``training.device``); a device that is not on this machine raises :class:`InputError`."""
        from .execution import resolve

        try:
            return resolve(self.device if device is None else device,
                           threads=self.threads if threads is None else threads)
        except InputError as exc:
            if device is not None:
                raise
            raise InputError(f"training.device: {exc}") from None


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
            from .metrics import resolve

            try:
                resolve(self.metrics)
            except InputError as exc:
                raise InputError(f"evaluation.metrics: {exc}") from None

    def metric_names(self) -> list[str]:
        from .metrics import resolve

        return resolve(None if self.metrics == "all" else self.metrics)


@dataclass(frozen=True)
class ModelConfig:
    """``[models.LABEL]``: a registry model (``model``, default: LABEL) and its parameters."""

    label: str
    model: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_plain(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.model, "params": dict(sorted(self.params.items()))}

    def build_params(self, training: TrainingConfig) -> dict[str, Any]:
        """The parameters the model is built with: its table, with ``training.epochs`` where it trains."""
        from . import models

        params = dict(self.params)
        if training.epochs is not None and models.MODELS[self.model].takes("epochs"):
            params.setdefault("epochs", training.epochs)
        return params


_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def model_tables(raw: Any, where: str = "models") -> list[ModelConfig]:
    """The ``[models.LABEL]`` tables, each checked by building its model (bad parameters name the table)."""
    from . import models as registry

    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected tables like [{where}.scgen]; got {typename(raw)}.")
    out = []
    for label, table in raw.items():
        here = f"{where}.{label}"
        if not _LABEL.match(label):
            raise InputError(f"{here}: a model label must start with a letter and hold only letters, digits and "
                             "'_' (it names files and cell ids).")
        if not isinstance(table, dict):
            raise InputError(f"{here}: expected a table [{here}], got {typename(table)}.")
        params = dict(table)
        name = params.pop("model", label)
        if not isinstance(name, str) or name not in registry.MODELS:
            raise InputError(f"{here}: unknown model {name!r}.{suggest(str(name), registry.MODELS)} Models: "
                             f"{choices_text(registry.MODELS)} (a custom label names one with model = '...').")
        try:
            registry.get(name, **params)
        except (InputError, TypeError) as exc:
            raise InputError(f"{here}: {exc}") from None
        out.append(ModelConfig(label=label, model=name, params=params))
    return out


def seeds(raw: Any, where: str = "seeds") -> tuple[int, ...]:
    """A non-empty list of distinct seeds."""
    from .errors import check_seed

    if not isinstance(raw, list | tuple):
        raise InputError(f"{where}: expected a list of seeds, e.g. {where} = [0, 1, 2]; got {raw!r}.")
    if not raw:
        raise InputError(f"{where}: give at least one seed, e.g. {where} = [0].")
    for s in raw:
        check_seed(s, where)
    if len(set(raw)) != len(raw):
        raise InputError(f"{where}: {list(raw)} repeats a seed.")
    return tuple(int(s) for s in raw)
