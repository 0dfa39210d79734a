"""One prediction task end to end: load -> preprocess -> split -> fit -> predict -> evaluate -> write.

:func:`run_predict` is what ``perturbkit predict`` and ``perturbkit demo`` call. It writes into ``out``:

- ``pred.h5ad``: the chosen model's predicted cells (obs copied from the source cells);
- ``scores.csv``: ``model, metric, value, ci_low, ci_high, higher_is_better, error`` for the chosen model, both
  baselines and the ceiling (one half of the real target against the other), plus baseline-normalised rows;
- ``record.json``: what was run and what determined it (versions, seed, threads, data sha256, preprocessing,
  split, parameters, training history, timings, sha256 of every output);
- ``reg_mean.png``: the scGen regression plot of per-gene means.

Every file is written to a temporary name and renamed, so an interrupted run leaves either the previous
complete file or none.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .data import PerturbSpec, Preprocessing
from .errors import InputError, check_seed

OUTPUTS = ("pred.h5ad", "scores.csv", "record.json", "reg_mean.png", "attention.png")  # attention: scPRAM only
RECORD_KIND = "perturbkit.predict"
#: hidden marker present while the outputs are being written (an interrupted write leaves it behind)
PENDING = ".perturbkit-pending.json"


@dataclass(frozen=True)
class PredictConfig:
    """Everything that defines one ``predict`` run (written to record.json as ``config``)."""

    data: str = "kang2018"
    model: str = "scgen"
    holdout: str = "CD4 T cells"
    spec: PerturbSpec = field(default_factory=PerturbSpec)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    epochs: int | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] | None = None
    n_boot: int = 100
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = list(self.metrics) if self.metrics is not None else None
        return d


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    out = {"python": platform.python_version(), "perturbkit": __version__}
    for dist in ("numpy", "scipy", "pandas", "anndata", "scanpy", "scikit-learn", "torch", "pot", "h5py",
                 "matplotlib"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def check_out_dir(out: Path, config: dict[str, Any], *, force: bool = False) -> None:
    """Refuse to mix results: ``out`` must be new, empty, or hold a previous run of the same config."""
    from . import _io

    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"--out {str(out)!r} exists and is a file; give a directory.")
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    if not entries or force:
        return
    if (out / "record.json").exists():
        old = _io.read_json(out / "record.json", {})
        if old.get("kind") == RECORD_KIND and old.get("config") == config:
            return  # a rerun of the same configuration replaces its own results
    elif (out / PENDING).exists() and set(entries) <= set(OUTPUTS):
        if _io.read_json(out / PENDING, {}).get("config") == config:
            return  # the same configuration, interrupted while writing its outputs
    raise InputError(
        f"--out {str(out)!r} already holds other files ({', '.join(sorted(entries)[:4])}) from another run or "
        "tool. Choose a new directory, or pass --force to overwrite them."
    )


def check_threads(n) -> None:
    """Raise :class:`InputError` unless ``n`` is None (torch's default) or an integer >= 1."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InputError(f"--threads must be >= 1, got {n!r}.")


def _threads(n: int | None) -> int:
    """Set torch's CPU threads to ``n`` (None: leave torch's default); returns the number in use."""
    import torch

    check_threads(n)
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def run_predict(cfg: PredictConfig, out: str | Path, *, progress: bool = True, log=print, force: bool = False,
                save_model: str | Path | None = None, load_model: str | Path | None = None,
                command: str | None = None) -> dict[str, Any]:
    """Run one held-out prediction task and write its outputs into ``out``; returns the record dict."""
    import pandas as pd

    from . import _io, data, metrics, models, pl, split

    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(out)
    config = json.loads(json.dumps(cfg.to_dict()))
    check_out_dir(out, config, force=force)
    models.get(cfg.model)  # unknown model -> clear error before any work
    metric_names = metrics._resolve(cfg.metrics)
    check_seed(cfg.seed)
    check_threads(cfg.threads)  # up front: models that do not train never reach _threads
    params = dict(cfg.params)
    if cfg.epochs is not None:
        if cfg.epochs < 1:
            raise InputError(f"--epochs must be >= 1, got {cfg.epochs}.")
        if "epochs" not in getattr(models.MODELS[cfg.model], "DEFAULTS", {}):
            log(f"note: --epochs is ignored by the {cfg.model!r} model (it does not train).")
        else:
            params["epochs"] = cfg.epochs
    chosen = models.get(cfg.model, **params) if load_model is None else models.Model.load(load_model)
    if load_model is not None and chosen.name != cfg.model:
        raise InputError(f"--load-model {str(load_model)!r} holds a {chosen.name!r} model but --model is "
                         f"{cfg.model!r}; pass --model {chosen.name}.")
    if load_model is not None:
        _apply_predict_params(chosen, params, load_model)
    threads = _threads(cfg.threads) if chosen.needs_torch else None

    t = time.perf_counter()
    adata, digest, source_desc = data.load_any(cfg.data)
    timings["load_s"] = time.perf_counter() - t
    cfg.spec.validate(adata, holdout=cfg.holdout)
    t = time.perf_counter()
    adata, pp_info = data.preprocess(adata, cfg.preprocessing, log=log)
    timings["preprocess_s"] = time.perf_counter() - t
    if load_model is not None:
        chosen._check_genes(adata, f"--load-model {str(load_model)!r}: the preprocessed data")
    task = split.holdout_cell_type(adata, cfg.spec, cfg.holdout)
    train, source, target = task.subsets(adata)
    log(f"task {task.name}: train on {train.n_obs} cells, predict {target.n_obs} {cfg.spec.perturbed!r} cells "
        f"from {source.n_obs} {cfg.spec.control!r} cells")

    names = [cfg.model] + [b for b in models.BASELINES if b != cfg.model]
    fitted, preds, fit_times, pred_times = {}, {}, {}, {}
    for name in names:
        model = chosen if name == cfg.model else models.get(name)
        t = time.perf_counter()
        if name == cfg.model and load_model is not None:
            log(f"loaded {name} from {load_model}")
        else:
            model.fit(train, cfg.spec, seed=cfg.seed, progress=progress and model.needs_torch)
        fit_times[name] = time.perf_counter() - t
        t = time.perf_counter()
        preds[name] = model.predict(source)
        pred_times[name] = time.perf_counter() - t
        fitted[name] = model
        log(f"{name}: fit {fit_times[name]:.1f} s, predict {pred_times[name]:.2f} s")
    timings["fit_s"], timings["predict_s"] = fit_times, pred_times

    t = time.perf_counter()
    scores, eval_info = score_predictions(target, source, preds, metric_names, n_boot=cfg.n_boot, seed=cfg.seed)
    timings["evaluate_s"] = time.perf_counter() - t
    top = metrics.top_degs(target, source, 100)

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _io.remove_stale_temps(out, OUTPUTS)  # left only by a SIGKILLed earlier run
    _io.atomic_write_text(out / PENDING, json.dumps({"kind": RECORD_KIND, "config": config}))  # until record.json
    if save_model is not None:
        chosen.save(save_model)
    pred = preds[cfg.model]
    pred.uns["perturbkit"] = {"model": cfg.model, "holdout": cfg.holdout, "seed": cfg.seed}
    _io.atomic_write_with(out / "pred.h5ad", lambda p: pred.write_h5ad(p))
    _io.atomic_write_text(out / "scores.csv", scores.to_csv(index=False, float_format="%.10g", lineterminator="\n"))
    fig = pl.reg_mean(target, pred, top_genes=top,
                      title=f"{cfg.model}: {cfg.holdout}, {cfg.spec.perturbed} (seed {cfg.seed})")
    _io.atomic_write_with(out / "reg_mean.png", lambda p: fig.savefig(p, dpi=120, format="png",
                                                                       metadata={"Software": None}))
    written = [name for name in OUTPUTS if name != "attention.png"]
    if not hasattr(chosen, "attention"):
        (out / "attention.png").unlink(missing_ok=True)  # from an earlier --force run of another model
    else:  # scPRAM: the tutorial's attention-score figure
        fig = pl.attention_heatmap(chosen, source)
        _io.atomic_write_with(out / "attention.png", lambda p: fig.savefig(p, dpi=120, format="png",
                                                                           metadata={"Software": None}))
        written.append("attention.png")
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.time() - t_start

    record = {
        "kind": RECORD_KIND,
        "config": config,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "versions": versions(),
        "platform": {"system": platform.platform(), "machine": platform.machine(),
                     "processor": platform.processor()},
        "determinism": {
            "seed": cfg.seed,
            "torch_threads": threads,
            "note": "scores and predictions are byte-identical for the same inputs, seed, thread count, "
                    "library versions and CPU; all randomness is drawn from generators seeded with `seed`.",
        },
        "data": {**source_desc, "sha256": digest, "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)},
        "spec": cfg.spec.to_dict(),
        "preprocessing": pp_info,
        "split": task.to_dict(adata.obs_names),
        "models": {name: {"params": fitted[name].params, "fit": fitted[name].fit_info} for name in names},
        "loaded_model": str(load_model) if load_model is not None else None,
        "evaluation": {"metrics": metric_names, "n_boot": cfg.n_boot, "ci": 0.95, "top_degs": top, **eval_info},
        "timings": timings,
        "outputs": {name: data.sha256(out / name) for name in written if name != "record.json"},
    }
    _io.atomic_write_text(out / "record.json", json.dumps(record, indent=2, default=_json_default) + "\n")
    (out / PENDING).unlink(missing_ok=True)
    return record


def _apply_predict_params(model, params: dict[str, Any], path) -> None:
    """Parameters given with ``--load-model``: those that act at prediction time (``PREDICT_PARAMS``, e.g.
    scPRAM's ratio and attention) are applied; the others cannot change a trained model and get a warning."""
    import warnings

    from .errors import InputWarning

    live = {k: v for k, v in params.items() if k in getattr(model, "PREDICT_PARAMS", ())}
    if live:
        type(model)(**{**model.params, **live})  # validates the new values (a bad one raises InputError)
        model.params.update(live)
    frozen = sorted(k for k, v in params.items() if k not in live and model.params.get(k) != v)
    if frozen:
        kept = ", ".join(f"{k}={model.params.get(k)!r}" for k in frozen)
        warnings.warn(f"--load-model {str(path)!r}: {', '.join(frozen)} cannot change a trained model and "
                      f"{'is' if len(frozen) == 1 else 'are'} ignored; it keeps {kept}. Retrain without "
                      "--load-model to change them.", InputWarning, stacklevel=3)


SCORE_COLUMNS = ("model", "metric", "value", "ci_low", "ci_high", "higher_is_better", "error")


def score_predictions(target, source, preds: dict, metric_names=None, *, n_boot: int = 100, seed: int = 0,
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


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def summary(record_or_scores, metrics=("r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance")):
    """A short models x metrics table (value only) from a scores DataFrame or an output directory."""
    import pandas as pd

    scores = record_or_scores
    if isinstance(scores, (str, Path)):
        scores = pd.read_csv(Path(scores) / "scores.csv")
    wide = scores[scores.metric.isin(metrics)].pivot(index="model", columns="metric", values="value")
    order = [m for m in scores.model.unique() if m in wide.index]
    return wide.loc[order, [m for m in metrics if m in wide.columns]]
