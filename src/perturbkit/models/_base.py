"""What every model offers: ``fit(adata, spec)``, ``predict(source) -> AnnData``, ``save`` / ``load``.

Models never write into the AnnData they are given; ``predict`` returns a new AnnData whose obs are a
copy of the source cells' obs (with the condition set to the perturbed label).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from .. import _keys as K
from ..data import PerturbSpec
from ..errors import InputError, check_seed, suggest
from ..execution import CPU, Execution, check

FORMAT_VERSION = 1
#: the parameters that the messages of Model.save / Model.load name
LOAD_PARAMS = ("load_model", "save_model")
SAVED_BY = "written by Model.save / save_model"


def dense(X) -> np.ndarray:
    """``X`` (an array, a sparse matrix, or a matrix left on disk, read whole) as a dense float32 array."""
    if hasattr(X, "to_memory"):  # perturbkit.ondisk.DiskMatrix
        X = X.to_memory()
    return np.asarray(X.toarray() if sp.issparse(X) else X, dtype=np.float32)


#: rows densified at a time by the streamed means (:func:`group_means`)
MEAN_CHUNK = 4096


def group_means(X, groups: np.ndarray, keys) -> dict:
    """key -> the float32 mean of the rows of ``X`` whose ``groups`` value is ``key``, for each of ``keys``.

    A dense array: ``X[rows].mean(axis=0)``. A sparse matrix or one left on disk: one pass over ``X`` in blocks
    of ``MEAN_CHUNK`` consecutive rows, each group's sum carried in float32 and extended row after row in
    order, as numpy sums the rows of a dense float32 array (so the means are those of the dense array, byte for
    byte), without a dense copy of ``X``."""
    keys = list(keys)
    if isinstance(X, np.ndarray):
        return {k: X[groups == k].mean(axis=0) for k in keys}
    sums = {k: np.zeros(X.shape[1], dtype=np.float32) for k in keys}
    counts = dict.fromkeys(keys, 0)
    wanted = np.isin(groups, keys)
    for start in range(0, X.shape[0], MEAN_CHUNK):
        stop = min(start + MEAN_CHUNK, X.shape[0])
        if not wanted[start:stop].any():
            continue
        block = dense(X.rows(start, stop) if hasattr(X, "to_memory") else X[start:stop])
        part = groups[start:stop]
        for k in keys:
            rows = part == k
            if rows.any():
                sums[k] = np.add.reduce(np.concatenate([sums[k][None], block[rows]]), axis=0)
                counts[k] += int(rows.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        return {k: sums[k] / counts[k] if counts[k] else np.full(X.shape[1], np.nan, np.float32) for k in keys}


class Model:
    """Base class. Subclasses set ``name`` and implement ``_fit`` and ``_predict_matrix``."""

    name: ClassVar[str] = "model"
    #: name -> class of every registered model: :data:`perturbkit.models.MODELS` (the literal registry), which
    #: that package hands to this class once it is built, so this module need not import its package back
    registry: ClassVar[dict[str, type[Model]]] = {}
    needs_torch: ClassVar[bool] = False
    #: the model's parameters and their defaults (None: the model takes no parameters)
    DEFAULTS: ClassVar[dict[str, Any] | None] = None
    #: parameters that act at prediction time: they may change on a loaded model
    PREDICT_PARAMS: ClassVar[tuple[str, ...]] = ()
    #: options the ``predict`` command line offers as flags of their own: name -> (type, help)
    OPTIONS: ClassVar[dict[str, tuple[type, str]]] = {}
    #: the default search space of ``perturbkit tune``, as written in a config's ``[tune.space]`` table
    SEARCH_SPACE: ClassVar[dict[str, dict[str, Any]]] = {}
    #: relative cost of one fit (orders the work of ``bench --jobs``: the expensive cells first)
    COST: ClassVar[float] = 0.0
    #: True for a model whose prediction is its input unchanged (it has no response, nor DEGs, of its own)
    NO_CHANGE: ClassVar[bool] = False
    #: True for a baseline: a model every benchmark sets beside the others (verdicts compare with the best one)
    BASELINE: ClassVar[bool] = False
    #: True for a model that predicts a combination ``A+B`` it never saw from its singles ``A`` and ``B``
    COMBINES: ClassVar[bool] = False

    @classmethod
    def takes(cls, param: str) -> bool:
        """Whether the model has the parameter ``param``."""
        return param in (cls.DEFAULTS or {})

    @classmethod
    def summary(cls) -> str:
        """One line saying what the model is (the first line of its docstring)."""
        lines = (cls.__doc__ or "").strip().splitlines()
        return lines[0].strip() if lines else cls.name

    def figures(self, source) -> dict[str, Any]:
        """The model's own figures of a fitted model and its source cells: name -> matplotlib Figure (none by
        default; scPRAM draws its attention)."""
        return {}

    def __init__(self, **params: Any):
        defaults = self.DEFAULTS
        if defaults is None and params:
            raise InputError(f"the {self.name!r} model takes no parameters, got {sorted(params)}.")
        check_params(self.name, params, defaults or {})
        self.params = dict(params)
        self.spec: PerturbSpec | None = None
        self.var_names: list[str] | None = None
        self.fit_info: dict[str, Any] = {}
        #: where the model trains and predicts (:mod:`perturbkit.execution`; set by fit, or by use)
        self.execution = CPU
        #: the perturbations seen in training (each has a learned response), in the spec's order
        self.trained: list[str] = []

    # -------------------------------------------------------------------------------------- public API
    def fit(self, adata, spec: PerturbSpec, *, seed: int = 0, progress: bool = False, callback=None,
            execution: Execution | None = None) -> Model:
        """Learn the response from ``adata`` (the training cells: every cell except the held-out target).

        ``execution``: where to train and later predict (:func:`perturbkit.execution.resolve`; None: the CPU).
        The model keeps it in ``self.execution`` (:meth:`use` changes it).

        ``callback(epoch, history)``: for models that train (``needs_torch``), called after every training epoch
        with the model usable for :meth:`predict` at its current weights; returning True stops training early.
        Models that do not train ignore it.
        """
        from ..data import validate

        check_seed(seed)
        validate(adata, spec)
        if execution is not None:
            self.use(execution)
        self.spec = spec
        self.var_names = [str(v) for v in adata.var_names]
        cond = adata.obs[spec.condition_key].astype(str)
        self.trained = [p for p in spec.perturbations(adata) if (cond == p).any()]
        if not self.trained:
            raise InputError(f"{self.name}: the training cells hold none of the requested perturbations "
                             f"({spec.perturbed!r}); there is no response to learn.", params=("perturbed",))
        if callback is not None and self.needs_torch:
            self._fit(adata, spec, seed=seed, progress=progress, callback=callback)
        else:
            self._fit(adata, spec, seed=seed, progress=progress)
        return self

    def use(self, execution: Execution) -> Model:
        """Train and predict in ``execution`` from now on (a fitted or loaded model moves its state there)."""
        self.execution = check(execution, default=None)
        self._moved()
        return self

    def _moved(self) -> None:
        """Hook: move learned state to ``self.execution`` (models that keep tensors)."""

    def predict(self, source, perturbation: str | None = None):
        """Predicted cells of ``perturbation`` for the control cells ``source`` (a new AnnData whose obs are the
        source cells', with the condition set to ``perturbation``).

        ``perturbation`` may be omitted when the model learned one perturbation. A combination ``A+B`` that was
        not seen in training is predicted from its singles by models that can (``COMBINES``).
        """
        self._check_fitted()
        label = self.resolve(perturbation)
        self._check_source(source)
        return self._predict_cells(source, label)

    def _check_source(self, source) -> None:
        """The checks of a source (its values, in row chunks when it stays on disk, and its genes)."""
        from ..data import check_matrix

        check_matrix(source, "source")
        self.check_genes(source, "source")

    def _predict_cells(self, source, label: str):
        """:meth:`predict` of checked source cells."""
        import anndata as ad

        X = self._predict_matrix(source, label)
        obs = source.obs.copy()
        if self.spec.condition_key in obs:
            obs[self.spec.condition_key] = label
        obs[K.PRED_FLAG] = True
        return ad.AnnData(X=np.asarray(X, dtype=np.float32), obs=obs, var=source.var[[]].copy())

    def predict_chunks(self, source, perturbation: str, chunk: int):
        """Yield ``(start, predicted AnnData)`` for the source cells ``start`` to ``start + chunk`` (or fewer), in
        order: :meth:`predict` of consecutive pieces of ``source`` (an AnnData or a
        :class:`perturbkit.ondisk.View`), so no more than one piece's prediction is held at once. A source of at
        most ``chunk`` cells is predicted in one piece, exactly as by :meth:`predict`. Every model here predicts
        each cell from that cell and what it learned, so the pieces are the rows of the whole prediction; a
        model whose prediction also depends on the other source cells overrides this (``linear``). The source is
        checked once, whole (a file's values in row chunks, as :meth:`predict` checks them), not piece by piece:
        that would read a source on disk once more for every model."""
        n = source.n_obs
        if n <= chunk:
            yield 0, self.predict(source, perturbation)
            return
        label = self.resolve(perturbation)
        self._check_source(source)
        for start in range(0, n, chunk):
            yield start, self._predict_cells(source[start:start + chunk], label)

    def can_predict(self, perturbation: str) -> bool:
        """Whether the fitted model can predict ``perturbation`` (seen in training, or composed of seen singles)."""
        if perturbation in self.trained:
            return True
        return (self.COMBINES and self.spec.is_combination(perturbation)
                and all(s in self.trained for s in self.spec.singles(perturbation)))

    def resolve(self, perturbation: str | None) -> str:
        """The label to predict: ``perturbation``, or the one perturbation the model learned."""
        self._check_fitted()
        if perturbation is None:
            if len(self.trained) == 1:
                return self.trained[0]
            raise InputError(f"the {self.name!r} model learned {len(self.trained)} perturbations "
                             f"({', '.join(self.trained[:5])}{' ...' if len(self.trained) > 5 else ''}); name the "
                             "one to predict: predict(source, perturbation=...).", params=("perturbation",))
        if not isinstance(perturbation, str) or not self.can_predict(perturbation):
            how = (" A combination is predicted from its singles only by models that combine (scgen, scpram, "
                   "additive)." if isinstance(perturbation, str) and self.spec.is_combination(perturbation)
                   else "")
            raise InputError(f"the {self.name!r} model cannot predict {perturbation!r}: it learned "
                             f"{', '.join(map(repr, self.trained[:8]))}{' ...' if len(self.trained) > 8 else ''}."
                             + how, params=("perturbation",))
        return perturbation

    # ------------------------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``params.json`` and ``weights.safetensors`` (no pickles) into the folder ``path``."""
        from safetensors.numpy import save as save_safetensors

        from .._io import atomic_write_bytes, atomic_write_text

        self._check_fitted()
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError(f"save_model {str(path)!r} is a file; give a folder (new, or one {SAVED_BY}).",
                             params=("save_model",))
        path.mkdir(parents=True, exist_ok=True)
        from .. import __version__

        meta = {
            "format_version": FORMAT_VERSION,
            "model": self.name,
            "perturbkit_version": __version__,
            "params": self.params,
            "spec": self.spec.to_dict(),
            "var_names": self.var_names,
            "perturbations": self.trained,
            "state": self._state_json(),
        }
        arrays = {k: np.ascontiguousarray(v) for k, v in self._state_arrays().items()}
        atomic_write_bytes(path / "weights.safetensors", save_safetensors(arrays))
        atomic_write_text(path / "params.json", json.dumps(meta, indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Model:
        """Load a model written by :meth:`save` (any model class: the folder says which)."""
        from safetensors.numpy import load_file

        path = Path(path)
        pfile, wfile = path / "params.json", path / "weights.safetensors"
        for f in (pfile, wfile):
            if not f.exists():
                raise InputError(f"load_model: {str(f)!r} is missing; give a folder {SAVED_BY}.",
                                 params=LOAD_PARAMS)
        try:
            meta = json.loads(pfile.read_text())
            arrays = load_file(str(wfile))
        except Exception as exc:
            raise InputError(f"load_model: {str(path)!r} is not a readable saved model ({exc}).",
                             params=LOAD_PARAMS) from None
        MODELS = Model.registry
        if not isinstance(meta, dict):
            raise InputError(f"load_model: {str(pfile)!r} does not hold a JSON object; it was not "
                             f"{SAVED_BY}.", params=LOAD_PARAMS)
        missing = [k for k in ("model", "params", "spec", "var_names") if k not in meta]
        if missing:
            raise InputError(f"load_model: {str(pfile)!r} lacks {missing}; it is incomplete or was not "
                             f"{SAVED_BY}. Save the model again.", params=LOAD_PARAMS)
        version = meta.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise InputError(f"load_model: {str(path)!r} has format_version {version!r}; this perturbkit "
                             f"reads up to {FORMAT_VERSION}. Upgrade perturbkit.", params=LOAD_PARAMS)
        name = meta.get("model")
        if name not in MODELS:
            raise InputError(f"load_model: saved model {name!r} is unknown to this perturbkit."
                             f"{suggest(str(name), MODELS)}", params=LOAD_PARAMS)
        model_cls = MODELS[name]
        if cls is not Model and cls is not model_cls:
            raise InputError(f"{str(path)!r} holds a {name!r} model, not {cls.name!r}.")
        if not isinstance(meta["params"], dict) or not isinstance(meta["spec"], dict) \
                or not isinstance(meta["var_names"], list):
            raise InputError(f"load_model: {str(pfile)!r} has malformed params, spec or var_names; save the "
                             "model again.", params=LOAD_PARAMS)
        model = model_cls(**meta["params"])
        try:
            model.spec = PerturbSpec(**meta["spec"])
            model.var_names = [str(v) for v in meta["var_names"]]
            model.trained = [str(p) for p in meta.get("perturbations") or model.spec.perturbations(None)]
            model._load_state(meta.get("state", {}), arrays)
        except InputError:
            raise
        except Exception as exc:  # weights that do not fit the parameters, missing arrays, bad spec
            first = " ".join(ln.strip() for ln in str(exc).strip().splitlines()[:2])[:300]
            raise InputError(
                f"load_model: the weights in {str(wfile)!r} do not match its params.json "
                f"({type(exc).__name__}: {first}). The folder was altered or mixes two saves; save the model "
                "again.", params=LOAD_PARAMS,
            ) from None
        return model

    # ----------------------------------------------------------------------------------------- helpers
    def _check_fitted(self) -> None:
        if self.var_names is None:
            raise InputError(f"The {self.name!r} model is not fitted yet: call fit(adata, spec) or load() first.")

    def check_genes(self, adata, what: str, *, where: str = "") -> None:
        """Raise :class:`InputError` unless ``adata`` holds the model's training genes in their order."""
        from ..data import check_same_genes

        # params: the fix names n_top_genes and normalize; callers' what / where may name load_model
        check_same_genes(what, adata, "the model", self.var_names, where=where,
                         params=("n_top_genes", "normalize", *LOAD_PARAMS),
                         fix="subset and order them with adata[:, model.var_names].copy(), and preprocess "
                         "the same way (the same data, n_top_genes and normalize as when the model was "
                         "fitted).")

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        raise NotImplementedError

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        raise NotImplementedError

    def _state_json(self) -> dict:
        return {}

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        pass


#: value checks for parameters shared by the models (a parameter a model does not have is not checked)
_RANGES: dict[str, tuple[Any, str]] = {
    "n_hidden": (lambda v: v >= 1, ">= 1"),
    "n_latent": (lambda v: v >= 1, ">= 1"),
    "n_layers": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "batch_size": (lambda v: v >= 2, ">= 2"),
    "patience": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "dropout_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "val_fraction": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "input_noise": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "adam_eps": (lambda v: v > 0, "> 0"),
    "kl_weight": (lambda v: v >= 0, ">= 0"),
    "ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    return type(value).__name__


def check_params(model: str, params: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Raise :class:`InputError` for a parameter whose type differs from its default's or whose value is out of range.

    An int is accepted where the default is a float; a default of ``None`` accepts anything.
    """
    for key, value in params.items():
        if key not in defaults or value is None:
            continue
        want, got = _kind(defaults[key]), _kind(value)
        if defaults[key] is None or want == got or (want == "float" and got == "int"):
            pass
        else:
            raise InputError(
                f"{model}: parameter {key!r} must be {'an' if want == 'int' else 'a'} {want} (like its default {defaults[key]!r}), got {got} "
                f"{value!r}; e.g. {key}={_value_text(defaults[key])}."
            )
        if key in _RANGES and got in ("int", "float"):
            ok, text = _RANGES[key]
            if not ok(value):
                raise InputError(f"{model}: parameter {key!r} must be {text}, got {value!r}.")


def _value_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")


_SEP = "\x1f"  # between condition and context in a pair label (numpy strings drop trailing NULs)


def pair_labels(cond: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """One label per (condition, context) pair of each cell: the groups of :func:`balanced_means`."""
    return np.char.add(np.char.add(np.asarray(cond).astype(str), _SEP), np.asarray(ctx).astype(str))


def balanced_means(X: np.ndarray, cond: np.ndarray, ctx: np.ndarray, spec: PerturbSpec, *,
                   contexts: str = "paired", means: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per condition, the mean over contexts of each context's mean row (every context weighs the same).

    This is the deterministic expectation of scGen's ``balancer`` (which oversamples every cell type of a
    condition to the size of the largest one at random before averaging).

    ``contexts="paired"`` (default) averages only over contexts that have cells of both conditions, so the
    difference of the two means holds no cell-type composition. ``contexts="all"`` is the reference scGen: the
    control mean also includes the held-out context's control cells (which have no perturbed partner), which
    leaks that cell type's offset from the average into the delta with weight 1 / n_contexts.

    ``X`` may be sparse or on disk (:func:`group_means` streams it); ``means``: the group means of every
    (condition, context) pair (:func:`group_means` over :func:`pair_labels`), when the caller computed them once
    for several perturbations.
    """
    if contexts not in ("paired", "all"):
        raise InputError(f"delta_contexts must be 'paired' or 'all', got {contexts!r}.")
    labels = (spec.control, spec.perturbed)
    have = [set(np.unique(ctx[cond == label])) for label in labels]
    uses = [sorted(have[0] & have[1]) if contexts == "paired" else sorted(present) for present in have]
    if means is None:
        means = group_means(X, pair_labels(cond, ctx), [f"{label}{_SEP}{c}" for label, use in zip(labels, uses)
                                                        for c in use])
    return tuple(np.mean([means[f"{label}{_SEP}{c}"] for c in use], axis=0) for label, use in zip(labels, uses))
