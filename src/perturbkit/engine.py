"""The one engine: fit a model, then predict a list of perturbations for a list of source cells.

``predict``, ``bench`` and ``tune`` all run their models through :func:`fit_predict`. A two-condition data set
(Kang: control vs stimulated) is a screen of one perturbation: the same call, a list of one label, the same
:class:`Fitted` back. Scoring is not the engine's job (:mod:`perturbkit.metrics`).

The execution context (:mod:`perturbkit.execution`) is resolved once by the caller and passed in: the model
trains and predicts on its device with its threads, which are set for the fit and restored afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import InputError, check_seed
from .execution import CPU, Execution, check


@dataclass
class Fitted:
    """A fitted model and what it predicted, always in this shape.

    ``preds``: perturbation -> predicted AnnData (obs of the source cells, the condition set to the
    perturbation), in the order asked for, for every perturbation the model can predict; ``cannot``:
    perturbation -> why the fitted model cannot predict it; ``timings``: ``fit_s``, ``predict_s``;
    ``threads``: torch's CPU threads during the fit (None for a model without torch).
    """

    model: Any
    preds: dict[str, Any]
    cannot: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    threads: int | None = None
    execution: Execution = CPU

    def pred(self, perturbations: list[str] | None = None):
        """One AnnData of the predictions of ``perturbations`` (default: all), see :func:`stack`."""
        labels = list(self.preds) if perturbations is None else perturbations
        return stack({p: self.preds[p] for p in labels})


def task_perturbations(task, spec) -> list[str]:
    """The perturbations a split predicts: those its split function kept (``info["perturbations"]``), else the
    spec's one label."""
    return list(task.info.get("perturbations") or spec.perturbations(None))


def train_spec(spec, train):
    """The spec a model is fitted with: a listed perturbation without training cells (left out of the split, or
    an unseen combination) is dropped from the list; ``"all"`` and one label stay as they are."""
    if not isinstance(spec.perturbed, tuple):
        return spec
    present = set(train.obs[spec.condition_key].astype(str))
    kept = tuple(p for p in spec.perturbed if p in present)
    return spec if kept == spec.perturbed else replace(spec, perturbed=kept)


def why_not(model, label: str) -> str:
    """Why a fitted ``model`` cannot predict ``label``."""
    if model.spec.is_combination(label) and not model.COMBINES:
        return (f"{model.name} cannot predict the unseen combination {label!r} (it learns one response per "
                "perturbation seen in training and does not compose singles)")
    return f"{model.name} learned no response for {label!r}"


def fit_predict(model, train, source, spec, perturbations: list[str], *, seed: int,
                execution: Execution | None = None, progress: bool = False, callback=None,
                fitted: bool = False) -> Fitted:
    """Fit ``model`` on ``train`` (unless ``fitted``, e.g. loaded from disk) and predict ``source`` for each of
    ``perturbations`` it can.

    ``execution`` (default: the CPU with torch's threads) is where the model trains and predicts; its threads
    hold for the fit and the predictions and the caller's are restored. ``callback(epoch, history)`` goes to
    :meth:`perturbkit.models.Model.fit` (tune prunes with it). ``source=None`` predicts nothing (``preds`` is
    empty, ``cannot`` filled): :func:`predict_chunks` then predicts the source piece by piece.
    """
    ex = check(execution)
    check_seed(seed)
    if isinstance(perturbations, str) or not perturbations:
        raise InputError(f"perturbations must be a non-empty list of labels, got {perturbations!r}.",
                         params=("perturbations",))
    timings: dict[str, float] = {}
    with ex.activate(torch_used=model.needs_torch) as threads:
        t = time.perf_counter()
        if fitted:
            model.use(ex)
        else:
            model.fit(train, train_spec(spec, train), seed=seed, progress=progress and model.needs_torch,
                      callback=callback, execution=ex)
        timings["fit_s"] = time.perf_counter() - t
        t = time.perf_counter()
        preds, cannot = {}, {}
        for p in perturbations:
            if not model.can_predict(p):
                cannot[p] = why_not(model, p)
            elif source is not None:
                preds[p] = model.predict(source, p)
        timings["predict_s"] = time.perf_counter() - t
    return Fitted(model, preds, cannot, timings, threads, ex)


#: source cells predicted at once by :func:`predict_chunks` (a held-out context of at most this many cells is
#: predicted in one piece, as :func:`fit_predict` predicts it)
PRED_CHUNK = 16_384


def predict_chunks(fitted: Fitted, source, perturbations: list[str], *, chunk: int | None = None):
    """Yield ``(perturbation, start, predicted AnnData)``: each of ``perturbations`` in turn, its prediction of
    ``source`` (an AnnData or a :class:`perturbkit.ondisk.View`) ``chunk`` cells at a time
    (:meth:`perturbkit.models.Model.predict_chunks`), so that one piece is in memory at a time. Runs in the fit's
    execution context; the seconds spent in the model are added to ``fitted.timings["predict_s"]``."""
    model, chunk = fitted.model, int(chunk or PRED_CHUNK)
    with fitted.execution.activate(torch_used=model.needs_torch):
        for p in perturbations:
            pieces = model.predict_chunks(source, p, chunk)
            while True:
                t = time.perf_counter()
                piece = next(pieces, None)
                fitted.timings["predict_s"] = fitted.timings.get("predict_s", 0.0) + time.perf_counter() - t
                if piece is None:
                    break
                yield (p, *piece)


def stack(preds: dict[str, Any]):
    """One AnnData of the predictions of several perturbations (obs names suffixed ``-<perturbation>`` so they
    stay unique); a single prediction is returned as it is."""
    if len(preds) == 1:
        return next(iter(preds.values()))
    import anndata as ad

    return ad.concat(list(preds.values()), keys=list(preds), index_unique="-")
