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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .spec import PerturbSpec, Preprocessing
from .errors import InputError, check_seed

OUTPUTS = ("pred.h5ad", "scores.csv", "record.json", "reg_mean.png")  # + the model's own figures (NAME.png)
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


def _same_run(config: dict[str, Any]):
    """The output-directory test of :func:`perturbkit.runner.check_out` for ``predict``: a previous run of the same
    configuration (finished, or interrupted while writing its outputs)."""
    from . import _io

    def accepts(out: Path, entries: list[str]) -> bool:
        if (out / "record.json").exists():
            old = _io.read_json(out / "record.json", {})
            return old.get("kind") == RECORD_KIND and old.get("config") == config
        if (out / PENDING).exists() and all(e in OUTPUTS or e.endswith(".png") for e in entries):
            return _io.read_json(out / PENDING, {}).get("config") == config
        return False

    return accepts


def run_predict(cfg: PredictConfig, out: str | Path, *, progress: bool = True, log=print, force: bool = False,
                save_model: str | Path | None = None, load_model: str | Path | None = None,
                command: str | None = None) -> dict[str, Any]:
    """Run one held-out prediction task and write its outputs into ``out``; returns the record dict."""
    from . import _io, data, metrics, models, pl, runner, split

    t_start = time.time()
    timings: dict[str, float] = {}
    out = Path(out)
    config = json.loads(json.dumps(cfg.to_dict()))
    runner.check_out(out, accepts=_same_run(config), force=force)
    models.get(cfg.model)  # unknown model -> clear error before any work
    metric_names = metrics.resolve(cfg.metrics)
    check_seed(cfg.seed)
    runner.check_threads(cfg.threads)
    cfg.preprocessing.check()
    params = dict(cfg.params)
    if cfg.epochs is not None:
        if cfg.epochs < 1:
            raise InputError(f"epochs must be >= 1, got {cfg.epochs}.", params=("epochs",))
        if not models.MODELS[cfg.model].takes("epochs"):
            log(f"note: epochs is ignored by the {cfg.model!r} model (it does not train).")
        else:
            params["epochs"] = cfg.epochs
    chosen = models.get(cfg.model, **params) if load_model is None else models.Model.load(load_model)
    if load_model is not None and chosen.name != cfg.model:
        raise InputError(f"load_model {str(load_model)!r} holds a {chosen.name!r} model but model is "
                         f"{cfg.model!r}; pass model={chosen.name!r}.", params=("load_model", "model"))
    if load_model is not None:
        _apply_predict_params(chosen, params, load_model)

    t = time.perf_counter()
    adata, digest, source_desc = data.load_any(cfg.data)
    timings["load_s"] = time.perf_counter() - t
    cfg.spec.validate(adata, holdout=cfg.holdout)
    t = time.perf_counter()
    adata, pp_info = data.preprocess(adata, cfg.preprocessing, log=log)
    timings["preprocess_s"] = time.perf_counter() - t
    if load_model is not None:
        chosen.check_genes(adata, f"load_model {str(load_model)!r}: the preprocessed data")
    task = split.holdout_cell_type(adata, cfg.spec, cfg.holdout)
    log(f"task {task.name}: train on {len(task.train)} cells, predict {len(task.target)} {cfg.spec.perturbed!r} "
        f"cells from {len(task.source)} {cfg.spec.control!r} cells")

    names = [cfg.model] + [b for b in models.BASELINES if b != cfg.model]
    todo = {name: chosen if name == cfg.model else models.get(name) for name in names}
    if load_model is not None:
        log(f"loaded {cfg.model} from {load_model}")

    def note(name, fitted):
        log(f"{name}: fit {fitted.timings['fit_s']:.1f} s, predict {fitted.timings['predict_s']:.2f} s")

    result = runner.run_task(todo, task, adata, cfg.spec, seed=cfg.seed, metric_names=metric_names,
                             n_boot=cfg.n_boot, threads=cfg.threads, progress=progress, log=note,
                             fitted=frozenset({cfg.model}) if load_model is not None else frozenset())
    fitted = result.fitted
    timings["fit_s"] = {n: f.timings["fit_s"] for n, f in fitted.items()}
    timings["predict_s"] = {n: f.timings["predict_s"] for n, f in fitted.items()}
    timings.update(result.timings)
    scores, eval_info = result.scores, result.evaluation
    _train, source, target = task.subsets(adata)
    top = metrics.top_degs(target, source, 100)

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    previous = _io.read_json(out / "record.json", {}).get("outputs", {})
    _io.remove_stale_temps(out)  # left only by a SIGKILLed earlier run
    _io.atomic_write_text(out / PENDING, json.dumps({"kind": RECORD_KIND, "config": config}))  # until record.json
    if save_model is not None:
        chosen.save(save_model)
    pred = fitted[cfg.model].pred
    pred.uns["perturbkit"] = {"model": cfg.model, "holdout": cfg.holdout, "seed": cfg.seed}
    _io.atomic_write_with(out / "pred.h5ad", lambda p: pred.write_h5ad(p))
    runner.write_csv(out / "scores.csv", scores)
    figures = {"reg_mean": pl.reg_mean(target, pred, top_genes=top,
                                       title=f"{cfg.model}: {cfg.holdout}, {cfg.spec.perturbed} (seed {cfg.seed})"),
               **chosen.figures(source)}  # the model's own figures (scPRAM: the tutorial's attention scores)
    for name, fig in figures.items():
        runner.write_png(out / f"{name}.png", fig, dpi=120)
    written = ["pred.h5ad", "scores.csv", *(f"{name}.png" for name in figures)]
    for name in previous:  # a figure of an earlier --force run of another model
        if name not in written:
            (out / name).unlink(missing_ok=True)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.time() - t_start

    record = {
        "kind": RECORD_KIND,
        "config": config,
        "command": command,
        "started": runner.stamp(t_start),
        "versions": runner.versions(),
        "platform": runner.platform_info(),
        "determinism": {
            "seed": cfg.seed,
            "torch_threads": fitted[cfg.model].threads,
            "note": "scores and predictions are byte-identical for the same inputs, seed, thread count, "
                    "library versions and CPU; all randomness is drawn from generators seeded with `seed`.",
        },
        "data": {**source_desc, "sha256": digest, "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)},
        "spec": cfg.spec.to_dict(),
        "preprocessing": pp_info,
        "split": task.to_dict(adata.obs_names),
        "models": {name: {"params": f.model.params, "fit": f.model.fit_info} for name, f in fitted.items()},
        "loaded_model": str(load_model) if load_model is not None else None,
        "evaluation": {"metrics": metric_names, "n_boot": cfg.n_boot, "ci": 0.95, "top_degs": top, **eval_info},
        "timings": timings,
        "outputs": {name: data.sha256(out / name) for name in written},
    }
    _io.atomic_write_text(out / "record.json", runner.to_json(record))
    (out / PENDING).unlink(missing_ok=True)
    return record


def _apply_predict_params(model, params: dict[str, Any], path) -> None:
    """Parameters given with ``load_model``: those that act at prediction time (``PREDICT_PARAMS``, e.g.
    scPRAM's ratio and attention) are applied; the others cannot change a trained model and get a warning."""
    import warnings

    from .errors import InputWarning

    live = {k: v for k, v in params.items() if k in model.PREDICT_PARAMS}
    if live:
        type(model)(**{**model.params, **live})  # validates the new values (a bad one raises InputError)
        model.params.update(live)
    frozen = sorted(k for k, v in params.items() if k not in live and model.params.get(k) != v)
    if frozen:
        kept = ", ".join(f"{k}={model.params.get(k)!r}" for k in frozen)
        warnings.warn(f"--load-model {str(path)!r}: {', '.join(frozen)} cannot change a trained model and "
                      f"{'is' if len(frozen) == 1 else 'are'} ignored; it keeps {kept}. Retrain without "
                      "--load-model to change them.", InputWarning, stacklevel=3)


def summary(record_or_scores, metrics=("r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance")):
    """A short models x metrics table (value only) from a scores DataFrame or an output directory."""
    import pandas as pd

    scores = record_or_scores
    if isinstance(scores, (str, Path)):
        scores = pd.read_csv(Path(scores) / "scores.csv")
    wide = scores[scores.metric.isin(metrics)].pivot(index="model", columns="metric", values="value")
    order = [m for m in scores.model.unique() if m in wide.index]
    return wide.loc[order, [m for m in metrics if m in wide.columns]]
