"""One prediction task end to end: load -> filter -> preprocess -> split -> fit -> predict -> evaluate ->
write.

:func:`run_predict` is what ``perturbkit predict`` and ``perturbkit demo`` call. The task is either context
transfer (``holdout``: the perturbed cells of one context are held out and every requested perturbation is
predicted from that context's control cells; with one perturbation this is the scGen / scPRAM protocol) or an
unseen combination (``combination``: every cell of ``A+B`` is held out and predicted from its contexts'
control cells; ``A`` and ``B`` train). Every model is fitted once and predicts every perturbation of the task.
It writes into ``out``:

- ``pred.h5ad``: the chosen model's predicted cells of every perturbation (obs copied from the source cells,
  the condition set to the perturbation; concatenated in the task's order);
- ``scores.csv``: ``model, perturbation, metric, value, ci_low, ci_high, higher_is_better, error`` for the
  chosen model, the baselines (``control``, ``mean_shift``; ``additive`` where a combination is predicted) and
  the ceiling (one half of the real target against the other), plus baseline-normalised rows; for a screen
  also the means over perturbations (``mean``, ``mean_responsive``) and the cross-perturbation rows (``all``),
  see :func:`perturbkit.metrics.evaluate_screen`;
- ``effects.csv``: per perturbation the energy-distance permutation test against the source
  cells (``statistic, p_value, q_value, responsive``; :func:`perturbkit.metrics.effect_table`);
- ``record.json``: what was run and what determined it (versions, seed, threads, data sha256, filter,
  preprocessing, split, the perturbations predicted and skipped with their reasons, parameters, training
  history, timings, sha256 of every output);
- figures: ``reg_mean.png`` (one perturbation: the scGen regression plot of per-gene means); for a screen
  ``heatmap_perturbation_metric.png``, ``pearson_delta_vs_mean_shift.png`` (``_vs_additive`` where mean_shift
  cannot predict the task) and ``reg_mean_<label>.png`` for the :data:`TOP_K` perturbations with the largest
  effect; plus the model's own figures (``NAME.png``).

Every file is written to a temporary name and renamed, so an interrupted run leaves either the previous
complete file or none.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, check_seed
from .spec import PerturbSpec, Preprocessing

OUTPUTS = ("pred.h5ad", "scores.csv", "effects.csv", "record.json", "reg_mean.png")  # + figures (NAME.png)
RECORD_KIND = "perturbkit.predict"
#: hidden marker present while the outputs are being written (an interrupted write leaves it behind)
PENDING = ".perturbkit-pending.json"
#: a screen's reg_mean figures: the perturbations with the largest effect (effects.csv statistic)
TOP_K = 4
#: the metrics of the printed table and of the screen heatmap
SUMMARY_METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta", "edistance")
#: the ``perturbation`` values of a screen's summary rows (not perturbations)
SUMMARY_ROWS = ("mean", "mean_responsive", "all")


@dataclass(frozen=True)
class PredictConfig:
    """Everything that defines one ``predict`` run (written to record.json as ``config``).

    ``holdout`` (a context: context transfer) and ``combination`` (``"A+B"``: unseen combination) choose the
    task; exactly one is set. ``filter`` keeps the cells whose obs columns hold the given values (a value or a
    list of values per column; :func:`perturbkit.data.apply_filter`), before validation and preprocessing.
    """

    data: str = "kang2018"
    model: str = "scgen"
    holdout: str | None = "CD4 T cells"
    spec: PerturbSpec = field(default_factory=PerturbSpec)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    epochs: int | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] | None = None
    n_boot: int = 100
    threads: int | None = None
    filter: dict[str, Any] = field(default_factory=dict)
    combination: str | None = None
    #: where the models train and predict: "auto" (cuda, mps or cpu), "cpu", "cuda", "cuda:N", "mps"
    device: str = "auto"
    #: reference -> query transfer: a bundled name or .h5ad path whose control cells are predicted by models
    #: trained on all of ``data`` (then holdout and combination are None); see perturbkit.transfer
    query: str | None = None
    #: the query's obs keys and labels where they differ from ``spec``'s (a QueryKeys or a dict of its fields)
    query_keys: Any = None
    #: integration of reference and query before transfer: "none" or "combat" (perturbkit.transfer)
    integrate: str = "none"
    #: the smallest share of the reference's genes the query must hold
    min_shared_genes: float = 0.5
    #: read ``data`` (an .h5ad path) in row chunks and preprocess it out of core into ``OUT/.cache``
    #: (:func:`perturbkit.ondisk.preprocessed`); the training cells stay there (models read them in batches),
    #: the source and target cells are read into memory
    backed: bool = False
    #: the most source cells, and target cells of each perturbation, the cell-level metrics hold (DEGs, PCA,
    #: distances, ceiling, bootstrap, figures): a larger held-out context is scored on a seeded sample of them,
    #: its moment metrics on every cell (streamed sums; :mod:`perturbkit.metrics.stream`)
    eval_cells: int = 10_000

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"] = list(self.metrics) if self.metrics is not None else None
        d["spec"] = self.spec.to_dict()
        d["filter"] = {k: list(v) if isinstance(v, tuple | list) else v for k, v in self.filter.items()}
        if self.query is None:  # a run without a query records what it always did
            for key in ("query", "query_keys", "integrate", "min_shared_genes"):
                d.pop(key)
        else:
            d["query_keys"] = self.keys().to_dict()
        if not self.backed:  # a run that does not read out of core records what it always did
            d.pop("backed")
        if self.eval_cells == PredictConfig.eval_cells:
            d.pop("eval_cells")
        return d

    def keys(self):
        """The query's keys as a :class:`perturbkit.transfer.QueryKeys`."""
        from .transfer import QueryKeys

        if self.query_keys is None or isinstance(self.query_keys, QueryKeys):
            return self.query_keys or QueryKeys()
        if not isinstance(self.query_keys, dict) or set(self.query_keys) - set(QueryKeys().to_dict()):
            raise InputError(f"query_keys must be a dict with keys among {sorted(QueryKeys().to_dict())}, got "
                             f"{self.query_keys!r}.", params=("query_keys",))
        return QueryKeys(**self.query_keys)

    def check_task(self) -> None:
        """Raise :class:`InputError` unless exactly one task (holdout or combination) is set and fits the
        spec."""
        if self.query is not None:
            from .transfer import check_integration, check_min_shared

            if self.holdout is not None or self.combination is not None:
                raise InputError(f"query is set and so is {'holdout' if self.holdout is not None else 'combination'}"
                                 "; with a query the models train on all of data and predict the query: pass "
                                 "holdout=None (and no combination).", params=("holdout", "combination"))
            check_integration(self.integrate)
            check_min_shared(self.min_shared_genes)
            self.keys()
        elif self.integrate != "none":
            raise InputError(f"integrate {self.integrate!r} needs a query (query='QUERY.h5ad'): integration "
                             "aligns the query with the reference.", params=("integrate", "query"))
        if self.query is None and (self.holdout is None) == (self.combination is None):
            both = self.holdout is not None
            raise InputError(
                "holdout and combination " + ("are both set" if both else "are both unset")
                + "; give exactly one: holdout='CONTEXT' (context transfer) or combination='A+B' (an unseen "
                "combination).", params=("holdout", "combination"))
        if not isinstance(self.filter, dict):
            raise InputError(f"filter must map obs columns to values, got {type(self.filter).__name__} "
                             f"{self.filter!r}; e.g. filter={{'dataset': 'mcfaline23'}}.", params=("filter",))


def _same_run(config: dict[str, Any]):
    """The output-directory test of :func:`perturbkit._io.check_out` for ``predict``: a previous run of the same
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


def _model_names(chosen: str, perturbations: list[str], spec: PerturbSpec) -> list[str]:
    """The chosen model, then the baselines (and the combination baselines where a combination is
    predicted)."""
    from . import models

    names = [chosen] + [b for b in models.BASELINES if b != chosen]
    if any(spec.is_combination(p) for p in perturbations):
        names += [b for b in models.COMBINATION_BASELINES if b not in names]
    return names


def file_label(label: str, taken: set[str]) -> str:
    """``label`` as a file-name part (characters other than letters, digits, ``.``, ``_``, ``-`` -> ``_``),
    made unique against ``taken`` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or "perturbation"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def run_predict(cfg: PredictConfig, out: str | Path, *, progress: bool = True, log=print, force: bool = False,
                save_model: str | Path | None = None, load_model: str | Path | None = None,
                command: str | None = None) -> dict[str, Any]:
    """Run one held-out prediction task and write its outputs into ``out``; returns the record dict.

    A step that runs out of memory raises :class:`InputError` naming the step (:func:`out_of_memory`); the
    outputs are written only after every step succeeded, so none is left half-written."""
    timings: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as files:  # the input file of a backed run, closed however the run ends
            return _run_predict(cfg, out, files, timings, progress=progress, log=log, force=force,
                                save_model=save_model, load_model=load_model, command=command)
    except MemoryError as exc:
        raise out_of_memory(exc, timings, cfg) from None


def scoring_bytes(n_source: int, n_targets: list[int], n_genes: int, n_models: int,
                  eval_cells: int = PredictConfig.eval_cells) -> int:
    """A lower bound of the memory the scoring of one task takes at once: every model's predictions of the cells
    scored (float32, at most ``eval_cells`` source cells x genes for each perturbation, all held together), the
    metrics' float64 copies of one perturbation's truth, a prediction and the source (at most ``eval_cells``
    cells each; :func:`perturbkit.metrics.prepare`) and one piece of a prediction in float64
    (:data:`perturbkit.engine.PRED_CHUNK` cells: :class:`perturbkit.metrics.stream.GeneSums`)."""
    from .engine import PRED_CHUNK

    n_perts = max(len(n_targets), 1)
    source = min(n_source, eval_cells)
    target = min(max(n_targets, default=0), eval_cells)
    return n_genes * (4 * n_models * n_perts * source + 8 * (target + 2 * source) + 8 * min(n_source, PRED_CHUNK))


def check_scoring_fits(task, perts: list[str], spec, adata, n_models: int, eval_cells: int) -> None:
    """Raise :class:`InputError` before anything is fitted when :func:`scoring_bytes` of the task is more than
    the memory available (:func:`perturbkit.models._ot.available_memory`), naming the options that shrink it."""
    from .models._ot import _gib, available_memory

    cond = adata.obs[spec.condition_key].astype(str).to_numpy()[task.target]
    n_targets = [int((cond == p).sum()) for p in perts]
    need = scoring_bytes(len(task.source), n_targets, int(adata.n_vars), n_models, eval_cells)
    have = available_memory()
    if have is not None and need > have:
        raise InputError(
            f"predict: scoring this task needs at least {_gib(need)} of memory ({n_models} models' predictions of "
            f"{min(len(task.source), eval_cells):,} source cells x {len(perts)} perturbation(s) x "
            f"{adata.n_vars:,} genes, and the metrics' copies of up to {min(max(n_targets, default=0), eval_cells):,}"
            f" target cells) and {_gib(have)} are available; lower eval_cells (the cells the metrics hold) or "
            "n_top_genes (every part grows with the genes), or predict fewer perturbations at once (perturbed).",
            params=("eval_cells", "n_top_genes", "perturbed"))


#: the steps of a predict run, each named by the timing its end records (out_of_memory)
STEPS = (("preprocess_s", "reading and preprocessing the data"), ("fit_s", "fitting and predicting"),
         ("evaluate_s", "scoring"), ("write_s", "writing the outputs"))


def out_of_memory(exc: MemoryError, timings: dict, cfg: PredictConfig) -> InputError:
    """The one-line error of a run that ran out of memory: the step (the first whose timing is not recorded),
    what could not be allocated, and the options that shrink it."""
    step = next((what for key, what in STEPS if key not in timings), STEPS[-1][1])
    if step == STEPS[0][1] and "load_s" in timings:
        step = "preprocessing the data"
    detail = " ".join(str(exc).split()) or type(exc).__name__
    fix = ("lower n_top_genes (every dense step grows with the genes)" if cfg.backed else
           "read the input on disk with backed (the training cells then stay there and are read in batches), "
           "or lower n_top_genes (every dense step grows with the genes)")
    return InputError(f"predict ran out of memory while {step} ({detail}); {fix}.",
                      params=("backed", "n_top_genes"))


def _run_predict(cfg: PredictConfig, out, files: contextlib.ExitStack, timings: dict, *, progress: bool, log,
                 force: bool, save_model, load_model, command) -> dict[str, Any]:
    from . import _io, data, engine, execution, metrics, models, split

    t_start = time.time()
    out = Path(out)
    config = json.loads(json.dumps(cfg.to_dict()))
    _io.check_out(out, accepts=_same_run(config), force=force)
    models.get(cfg.model)  # unknown model -> clear error before any work
    metric_names = metrics.resolve(cfg.metrics)
    check_seed(cfg.seed)
    ex = execution.resolve(cfg.device, threads=cfg.threads)  # a device that is not there: InputError now
    cfg.preprocessing.check()
    cfg.check_task()
    if isinstance(cfg.eval_cells, bool) or not isinstance(cfg.eval_cells, int) or cfg.eval_cells < 100:
        raise InputError(f"eval_cells must be an integer >= 100 (the cells the metrics hold; default 10000), got "
                         f"{cfg.eval_cells!r}.", params=("eval_cells",))
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
    if cfg.backed:  # validated and preprocessed in row chunks; X stays on disk, the training cells read in batches
        adata, digest, source_desc, pp_info = _backed_input(cfg, out, log)
        files.enter_context(adata)
        n_loaded = int(adata.n_obs)
        timings["preprocess_s"] = time.perf_counter() - t
    else:
        adata, digest, source_desc = data.load_any(cfg.data)
        n_loaded = int(adata.n_obs)
        adata = data.apply_filter(adata, cfg.filter)
        if cfg.filter:
            kept = ", ".join(f"{k}={v}" for k, v in cfg.filter.items())
            log(f"filter {kept}: {adata.n_obs} of {n_loaded} cells")
        timings["load_s"] = time.perf_counter() - t
    transfer_record = None
    if cfg.query is None:
        if not cfg.backed:
            data.validate(adata, cfg.spec, holdout=cfg.holdout)
            t = time.perf_counter()
            adata, pp_info = data.preprocess(adata, cfg.preprocessing, log=log)
            timings["preprocess_s"] = time.perf_counter() - t
        if load_model is not None:
            chosen.check_genes(adata, f"load_model {str(load_model)!r}: the preprocessed data")
        task = (split.holdout_context(adata, cfg.spec, cfg.holdout) if cfg.combination is None
                else split.holdout_combination(adata, cfg.spec, cfg.combination))
        tasks = {None: task}
    else:
        adata, pp_info, tasks, transfer_record = _query_tasks(cfg, adata, timings, log)
        if load_model is not None:
            chosen.check_genes(adata, f"load_model {str(load_model)!r}: the reference and query on their "
                               "shared genes")
        task = next(iter(tasks.values()))
    planned = engine.task_perturbations(task, cfg.spec)
    perts = planned  # less what the chosen model cannot predict (below)
    skipped = dict(task.info.get("skipped", {}))
    what = (f"{perts[0]!r} cells" if len(perts) == 1 else f"cells of {len(perts)} perturbations "
            f"({', '.join(perts[:6])}{' ...' if len(perts) > 6 else ''})")
    if cfg.query is None:
        log(f"task {task.name}: train on {len(task.train)} cells, predict {len(task.target)} {what} from "
            f"{len(task.source)} {cfg.spec.control!r} cells on {ex.device}")
    else:
        log(f"query: train on the {len(task.train)} reference cells, predict {what} from the query's "
            f"{sum(len(s.source) for s in tasks.values())} {cfg.spec.control!r} cells in {len(tasks)} contexts "
            f"on {ex.device}")

    names = _model_names(cfg.model, perts, cfg.spec)
    if cfg.query is None:  # before any training: a task whose scoring cannot fit memory stops now
        check_scoring_fits(task, perts, cfg.spec, adata, len(names), cfg.eval_cells)
    todo = {name: chosen if name == cfg.model else models.get(name) for name in names}
    if load_model is not None:
        log(f"loaded {cfg.model} from {load_model}")
    # the same training cells for every task (the query's contexts); left on disk when the input is (backed)
    train = split.cells(adata, task.train, in_memory=False)
    streamed = cfg.query is None  # one held-out context: predicted piece by piece, scored as it streams
    if streamed:  # left on disk when the input is; read piece by piece
        sources = {None: split.cells(adata, task.source, in_memory=False)}
        targets_all = {None: split.cells(adata, task.target, in_memory=False)}
        scoring = _Scoring(cfg, adata, task, planned, sources[None], targets_all[None], log)
        pred_file = files.enter_context(contextlib.ExitStack())  # pred.h5ad's temporary file until the end
        pred_tmp = pred_file.enter_context(_io.atomic_path(out / "pred.h5ad"))
    else:
        sources = {label: split.cells(adata, s.source) for label, s in tasks.items()}
        targets_all = {label: split.cells(adata, s.target) for label, s in tasks.items()}
    fitted, left_out, by_task = {}, {}, {}
    for name, model in todo.items():
        fits = {}
        for i, (label, s) in enumerate(tasks.items()):  # one fit; each further query context reuses it
            fits[label] = engine.fit_predict(model, train, None if streamed else sources[label], cfg.spec, perts,
                                             seed=cfg.seed, execution=ex, progress=progress,
                                             fitted=i > 0 or (name == cfg.model and load_model is not None))
        f = fits[next(iter(tasks))]
        if name == cfg.model and f.cannot:  # the chosen model decides what the task can predict
            for p, why in f.cannot.items():
                skipped[p] = why
                log(f"note: {p!r} is skipped: {why}.")
            perts = [p for p in perts if p not in f.cannot]
            if not perts:
                raise InputError(f"model {cfg.model!r} can predict none of the task's perturbations: "
                                 + "; ".join(f.cannot.values()) + ". Choose a model that can (e.g. scgen or "
                                 "additive for an unseen combination).", params=("model",))
        elif any(p in f.cannot for p in perts):
            left_out[name] = {p: why for p, why in f.cannot.items() if p in perts}
            log(f"note: {name} is left out of this task: {'; '.join(left_out[name].values())}.")
            continue
        if streamed:  # every source cell predicted piece by piece; the sums and the sample kept, the rest dropped
            scoring.predict(name, f, perts, pred_tmp if name == cfg.model else None)
        log(f"{name}: fit {f.timings['fit_s']:.1f} s, predict "
            f"{sum(g.timings['predict_s'] for g in fits.values()):.2f} s")
        for warning in f.model.fit_info.get("warnings", []):
            log(f"warning: {warning}")
        fitted[name] = f
        by_task[name] = fits
    if cfg.query is not None:
        return _finish_query(cfg, out, config, adata, tasks, sources, targets_all, by_task, perts, chosen,
                             metric_names, ex, timings, t_start, source_desc, digest, n_loaded, pp_info,
                             transfer_record, left_out, save_model, load_model, command, log)
    source, target = scoring.source, scoring.target  # the cells scored: all of them, or the sample
    if len(perts) < len(planned):
        keep = target.obs[cfg.spec.condition_key].astype(str).isin(perts).to_numpy()
        target = target[keep].copy()
    preds = {name: scoring.preds[name] for name in fitted}
    timings["fit_s"] = {n: f.timings["fit_s"] for n, f in fitted.items()}
    timings["predict_s"] = {n: f.timings["predict_s"] for n, f in fitted.items()}

    t = time.perf_counter()
    effects = metrics.effect_table(target, source, condition_key=cfg.spec.condition_key, seed=cfg.seed)
    reference = "mean_shift" if "mean_shift" in preds else "additive"
    responsive = effects.perturbation[effects.responsive].tolist()
    scores, eval_info = metrics.evaluate_screen(
        target, preds, source, condition_key=cfg.spec.condition_key, metric_names=metric_names,
        n_boot=cfg.n_boot, seed=cfg.seed, baseline="control", reference=reference, responsive=responsive,
        execution=ex, moments=scoring.moments(perts, list(preds)))
    timings["evaluate_s"] = time.perf_counter() - t
    cond = target.obs[cfg.spec.condition_key].astype(str).to_numpy()
    targets = {p: target if len(perts) == 1 else target[cond == p].copy() for p in perts}
    top = {p: metrics.top_degs(targets[p], source, 100) for p in perts}

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    previous = _io.read_json(out / "record.json", {}).get("outputs", {})
    _io.remove_stale_temps(out)  # left only by a SIGKILLed earlier run
    _io.atomic_write_text(out / PENDING, json.dumps({"kind": RECORD_KIND, "config": config}))  # until record.json
    if save_model is not None:
        chosen.save(save_model)
    pred_file.close()  # pred.h5ad, written piece by piece while the chosen model predicted, renamed into place
    _io.write_csv(out / "scores.csv", scores)
    _io.write_csv(out / "effects.csv", effects)
    written = ["pred.h5ad", "scores.csv", "effects.csv"]
    figures = _figures(cfg, perts, targets, scoring.pieces[cfg.model], scores, effects, top, reference)
    figures.update(chosen.figures(source))  # the model's own figures (scPRAM: the tutorial's attention scores)
    for name, fig in figures.items():
        _io.write_png(out / f"{name}.png", fig, dpi=120)
    written += [f"{name}.png" for name in figures]
    for name in previous:  # a figure of an earlier --force run of another model
        if name not in written:
            (out / name).unlink(missing_ok=True)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.time() - t_start

    record = {
        **_record_head(cfg, config, command, t_start, ex, fitted[cfg.model].threads),
        "data": {**source_desc, "sha256": digest, "filter": config["filter"], "n_cells_loaded": n_loaded,
                 "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars)},
        "spec": cfg.spec.to_dict(),
        "preprocessing": pp_info,
        "split": task.to_dict(adata.obs_names),
        "perturbations": {"predicted": perts, "skipped": skipped, "models_left_out": left_out,
                          "responsive": responsive},
        "models": {name: {"params": f.model.params, "fit": f.model.fit_info} for name, f in fitted.items()},
        "warnings": [w for f in fitted.values() for w in f.model.fit_info.get("warnings", [])],
        "loaded_model": str(load_model) if load_model is not None else None,
        "evaluation": {"metrics": metric_names, "n_boot": cfg.n_boot, "ci": 0.95,
                       "top_degs": top, **eval_info, **scoring.info(perts)},
        "timings": timings,
        "outputs": {name: data.sha256(out / name) for name in written},
    }
    _io.atomic_write_text(out / "record.json", _io.to_json(record))
    (out / PENDING).unlink(missing_ok=True)
    return record


def _record_head(cfg: PredictConfig, config: dict, command, t_start: float, ex, threads) -> dict[str, Any]:
    """The first entries of a predict run's record.json: what ran, when, where, and what determined it."""
    from . import record as rec

    return {
        "kind": RECORD_KIND,
        "config": config,
        "command": command,
        "started": rec.stamp(t_start),
        "versions": rec.versions(),
        "platform": rec.platform_info(),
        "execution": ex.describe(),
        "determinism": {"seed": cfg.seed, "torch_threads": threads, "device": ex.device,
                        "guarantee": ex.guarantee,
                        "note": "all randomness is drawn from generators seeded with `seed`."},
    }


def _backed_input(cfg: PredictConfig, out: Path, log):
    """``backed``: (the preprocessed file, open, :class:`perturbkit.ondisk.OnDisk`: obs in memory, X on disk; the
    input's sha256, its description, the preprocessing record) from :func:`perturbkit.ondisk.preprocessed`,
    cached in ``out/.cache``. The caller closes the file."""
    from . import ondisk
    from .data import DATASETS

    for key, value, why in (("query", cfg.query, "a query"), ("filter", cfg.filter, "filter")):
        if value:
            raise InputError(f"backed does not take {why} yet; drop backed (the input is then read into memory) "
                             f"or {key}.", params=("backed", key))
    if cfg.data in DATASETS:
        raise InputError(f"backed reads an .h5ad file in chunks, not the registered dataset {cfg.data!r} (its "
                         "obs are harmonised in memory); drop backed.", params=("backed", "data"))
    od, info = ondisk.preprocessed(cfg.data, cfg.preprocessing, out / ".cache", spec=cfg.spec, holdout=cfg.holdout,
                                   log=log)
    digest = info.pop("sha256")
    info["cache"] = str(Path(info["cache"]).relative_to(out))
    return od, digest, {"dataset": None, "file": str(cfg.data)}, {**info, "out_of_core": True}


def _query_tasks(cfg: PredictConfig, reference, timings: dict, log):
    """(the reference and query in one AnnData, the reference's preprocessing, context -> Split of the query,
    the transfer's record) for a run with ``cfg.query`` (:mod:`perturbkit.transfer`)."""
    from . import data, transfer

    t = time.perf_counter()
    if cfg.query in data.DATASETS:
        query, q_digest, q_desc = data.load_any(cfg.query)
    else:
        query = data.read_h5ad(cfg.query, "query")
        q_digest, q_desc = data.sha256(cfg.query), {"dataset": None, "file": str(cfg.query)}
    timings["load_query_s"] = time.perf_counter() - t
    keys = cfg.keys()
    if cfg.query in data.DATASETS:  # a registered query: its own keys where none are given
        own = data.DATASETS[cfg.query].spec
        keys = transfer.QueryKeys(**{k: v if v is not None else getattr(own, k)
                                     for k, v in keys.to_dict().items()})
    t = time.perf_counter()
    tr = transfer.prepare(reference, query, cfg.spec, cfg.preprocessing, keys=keys,
                          integrate=cfg.integrate, min_shared=cfg.min_shared_genes, seed=cfg.seed, log=log)
    timings["preprocess_s"] = time.perf_counter() - t
    tasks, skipped = transfer.query_splits(tr)
    for c, why in skipped.items():
        log(f"note: query context {c!r} is not predicted: {why}.")
    unscored = [c for c, s in tasks.items() if not s.info["scored"]]
    if len(unscored) == len(tasks):
        log("note: the query has no context with >= 3 cells of a perturbation the reference learned; its "
            "control cells are predicted, nothing is scored.")
    elif unscored:
        log(f"note: {len(unscored)} query context(s) have < 3 perturbed cells: predicted, not scored "
            f"({', '.join(unscored[:5])}{' ...' if len(unscored) > 5 else ''}).")
    record = {"query": {**q_desc, "sha256": q_digest}, **tr.info, "query_keys": keys.to_dict(),
              "contexts": {c: s.to_dict(tr.adata.obs_names) for c, s in tasks.items()},
              "contexts_not_predicted": skipped}
    return tr.adata, tr.info["reference"]["preprocessing"], tasks, record


def _finish_query(cfg, out, config, adata, tasks, sources, targets, by_task, perts, chosen, metric_names, ex,
                  timings, t_start, source_desc, digest, n_loaded, pp_info, transfer_record, left_out,
                  save_model, load_model, command, log) -> dict[str, Any]:
    """Score every query context with perturbed cells (each context its own rows, ``context`` column), write
    the outputs and record.json of a reference -> query run."""
    import anndata as ad
    import pandas as pd

    from . import _io, data, metrics, pl

    t = time.perf_counter()
    tables, effect_tables, top, eval_infos = [], [], {}, {}
    for label, s in tasks.items():
        if not s.info["scored"]:
            continue
        preds = {name: fits[label].pred(perts) for name, fits in by_task.items()}
        eff = metrics.effect_table(targets[label], sources[label], condition_key=cfg.spec.condition_key,
                                   seed=cfg.seed)
        sc, info = metrics.evaluate_screen(
            targets[label], preds, sources[label], condition_key=cfg.spec.condition_key,
            metric_names=metric_names, n_boot=cfg.n_boot, seed=cfg.seed, baseline="control",
            reference="mean_shift", responsive=eff.perturbation[eff.responsive].tolist(), execution=ex)
        tables.append(sc.assign(context=label))
        effect_tables.append(eff.assign(context=label))
        cond = targets[label].obs[cfg.spec.condition_key].astype(str).to_numpy()
        top[label] = {p: metrics.top_degs(targets[label][cond == p], sources[label], 100) for p in s.info["truth"]}
        eval_infos[label] = info
    scores = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["model", "perturbation", *metrics.COLUMNS, "context"])
    effects = pd.concat(effect_tables, ignore_index=True) if effect_tables else pd.DataFrame(
        columns=["perturbation", "statistic", "p_value", "q_value", "responsive", "context"])
    timings["evaluate_s"] = time.perf_counter() - t
    timings["fit_s"] = {n: fits[next(iter(tasks))].timings["fit_s"] for n, fits in by_task.items()}
    timings["predict_s"] = {n: sum(f.timings["predict_s"] for f in fits.values()) for n, fits in by_task.items()}

    t = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    previous = _io.read_json(out / "record.json", {}).get("outputs", {})
    _io.remove_stale_temps(out)
    _io.atomic_write_text(out / PENDING, json.dumps({"kind": RECORD_KIND, "config": config}))
    if save_model is not None:
        chosen.save(save_model)
    pred = ad.concat([by_task[cfg.model][label].pred(perts) for label in tasks])
    pred.uns["perturbkit"] = {"model": cfg.model, "query": str(cfg.query), "seed": cfg.seed,
                              "integrate": cfg.integrate, "perturbations": perts}
    _io.atomic_write_with(out / "pred.h5ad", lambda p: pred.write_h5ad(p))
    _io.write_csv(out / "scores.csv", scores)
    _io.write_csv(out / "effects.csv", effects)
    written = ["pred.h5ad", "scores.csv", "effects.csv"]
    figures, taken = {}, set()
    scored = sorted(top, key=lambda c: -len(targets[c]))[:TOP_K]  # the contexts with the most truth cells
    for label in scored:  # the context's first perturbation with truth cells
        p = tasks[label].info["truth"][0]
        truth = targets[label][targets[label].obs[cfg.spec.condition_key].astype(str).to_numpy() == p]
        figures[f"reg_mean_{file_label(label, taken)}"] = pl.reg_mean(
            truth, by_task[cfg.model][label].preds[p], top_genes=top[label][p],
            title=f"{cfg.model}: query {label}, {p} (seed {cfg.seed}, integrate {cfg.integrate})")
    for name, fig in figures.items():
        _io.write_png(out / f"{name}.png", fig, dpi=120)
    written += [f"{name}.png" for name in figures]
    for name in previous:
        if name not in written:
            (out / name).unlink(missing_ok=True)
    timings["write_s"] = time.perf_counter() - t
    timings["total_s"] = time.time() - t_start
    first = next(iter(tasks))
    fitted = {name: fits[first] for name, fits in by_task.items()}
    record = {
        **_record_head(cfg, config, command, t_start, ex, fitted[cfg.model].threads),
        "data": {**source_desc, "sha256": digest, "filter": config["filter"], "n_cells_loaded": n_loaded,
                 "n_cells": int(transfer_record["reference"]["n_cells"]), "n_genes": int(adata.n_vars)},
        "spec": cfg.spec.to_dict(),
        "preprocessing": pp_info,
        "transfer": transfer_record,
        "split": {"name": "query", "n_train": int(len(tasks[first].train)),
                  "contexts": list(tasks), "scored": list(top)},
        "perturbations": {"predicted": perts, "skipped": {}, "models_left_out": left_out},
        "models": {name: {"params": f.model.params, "fit": f.model.fit_info} for name, f in fitted.items()},
        "warnings": [w for f in fitted.values() for w in f.model.fit_info.get("warnings", [])],
        "loaded_model": str(load_model) if load_model is not None else None,
        "evaluation": {"metrics": metric_names, "n_boot": cfg.n_boot, "ci": 0.95, "per": "query context",
                       "top_degs": top, "notes": {c: i.get("notes", []) for c, i in eval_infos.items()}},
        "timings": timings,
        "outputs": {name: data.sha256(out / name) for name in written},
    }
    _io.atomic_write_text(out / "record.json", _io.to_json(record))
    (out / PENDING).unlink(missing_ok=True)
    return record


def _held(cells):
    """Cells in memory: an on-disk View read, an AnnData view copied, an AnnData as it is."""
    from .ondisk import View

    if isinstance(cells, View):
        return cells.to_memory()
    return cells.copy() if cells.is_view else cells


class _Scoring:
    """The scoring of one held-out context, fed as each model predicts (:func:`_run_predict`).

    Holds the cells scored (``source``, ``target``: all of the context's, or the seeded sample of
    :func:`perturbkit.metrics.stream.sample_rows` when it has more than ``cfg.eval_cells`` source cells or target
    cells of a perturbation) and, for a sampled context, the per-gene sums of every source, target and predicted
    cell. :meth:`predict` runs a fitted model over every source cell piece by piece (:func:`engine.predict_chunks`)
    and keeps its predictions of the cells scored; the chosen model's pieces are written to pred.h5ad as they come.
    """

    def __init__(self, cfg: PredictConfig, adata, task, planned: list[str], source_all, target_all, log):
        import numpy as np

        from .metrics.stream import GeneSums, label_sums, row_blocks, sample_rows
        from .ondisk import chunk_rows

        cap = cfg.eval_cells
        self.cfg, self.cap, self.source_all = cfg, cap, source_all
        cond = cfg.spec.condition_key
        labels = target_all.obs[cond].astype(str).to_numpy()
        self.src_rows = sample_rows(source_all.n_obs, cap, cfg.seed, 0)
        picks, sampled_target = [], False
        for i, p in enumerate(planned):
            rows = np.flatnonzero(labels == p)
            sub = sample_rows(len(rows), cap, cfg.seed, i + 1)
            sampled_target |= sub is not None
            picks.append(rows if sub is None else rows[sub])
        self.sampled = self.src_rows is not None or sampled_target
        self.n_all = {"source": int(source_all.n_obs), **{p: int((labels == p).sum()) for p in planned}}
        self.source = _held(source_all if self.src_rows is None else source_all[self.src_rows])
        self.target = _held(target_all[np.sort(np.concatenate(picks))] if sampled_target else target_all)
        self.preds: dict[str, Any] = {}  # model -> its predictions of the cells scored (all perturbations)
        self.pieces: dict[str, dict[str, Any]] = {}  # model -> perturbation -> the same, one AnnData each
        self.pred_sums: dict[str, dict] = {}
        self.size = chunk_rows(int(adata.n_vars))
        if self.sampled:  # one pass over the context's cells for the moments of all of them
            log(f"scoring: {self.source.n_obs:,} of {source_all.n_obs:,} source cells and at most {cap:,} target "
                "cells of each perturbation (eval_cells) for the DEGs, distances, ceiling and intervals; the "
                "per-gene means and variances of every cell")
            self.source_sums = GeneSums(int(adata.n_vars))
            for _start, _stop, block in row_blocks(source_all, self.size):
                self.source_sums.add(block)
            self.truth_sums = label_sums(target_all, labels, planned, self.size)

    def predict(self, name: str, fitted, perts: list[str], path) -> None:
        """Predict every source cell for ``perts`` with ``fitted``; keep what is scored (and, with ``path``,
        write every piece to that .h5ad: pred.h5ad's temporary file)."""
        import anndata as ad
        import numpy as np

        from . import engine
        from .metrics.stream import GeneSums
        from .ondisk import write_h5ad_chunks

        n_vars = int(self.source_all.n_vars)
        sums = {p: GeneSums(n_vars) for p in perts}
        kept: dict[str, list] = {p: [] for p in perts}

        def pieces():
            for p, start, piece in engine.predict_chunks(fitted, self.source_all, perts):
                if self.sampled:
                    sums[p].add(piece.X)
                if self.src_rows is None:
                    kept[p].append(piece)
                else:
                    rows = self.src_rows[(self.src_rows >= start) & (self.src_rows < start + piece.n_obs)]
                    kept[p].append(piece[rows - start].copy())
                yield piece.X

        if path is None:
            for _ in pieces():
                pass
        else:
            where = ({"holdout": self.cfg.holdout} if self.cfg.combination is None
                     else {"combination": self.cfg.combination})
            uns = {"perturbkit": {"model": self.cfg.model, **where, "seed": self.cfg.seed, "perturbations": perts}}
            write_h5ad_chunks(path, self._pred_obs(perts), self.source_all.var[[]].copy(), pieces(), uns,
                              dense=True, atomic=False)
        self.pieces[name] = {p: v[0] if len(v) == 1 else ad.concat(v, merge="same", uns_merge="same")
                             for p, v in kept.items()}
        self.preds[name] = engine.stack(self.pieces[name])
        self.pred_sums[name] = sums

    def _pred_obs(self, perts: list[str]):
        """The obs of the chosen model's predictions of every source cell, as :func:`engine.stack` gives them."""
        import pandas as pd

        from . import _keys as K

        parts = []
        for p in perts:
            obs = self.source_all.obs.copy()
            if self.cfg.spec.condition_key in obs:
                obs[self.cfg.spec.condition_key] = p
            obs[K.PRED_FLAG] = True
            if len(perts) > 1:
                obs.index = obs.index.astype(str) + f"-{p}"
            parts.append(obs)
        return parts[0] if len(parts) == 1 else pd.concat(parts)

    def moments(self, perts: list[str], names: list[str]):
        """:func:`perturbkit.metrics.evaluate_screen`'s ``moments`` of every cell; None when every cell is scored."""
        if not self.sampled:
            return None
        return {"source": self.source_sums.moments(), "truth": {p: self.truth_sums[p].moments() for p in perts},
                "pred": {n: {p: self.pred_sums[n][p].moments() for p in perts} for n in names}}

    def info(self, perts: list[str]) -> dict[str, Any]:
        """The record's account of which cells were scored."""
        cond = self.target.obs[self.cfg.spec.condition_key].astype(str)
        return {"cells_scored": {
            "eval_cells": self.cap, "sampled": self.sampled,
            "source": [int(self.source.n_obs), self.n_all["source"]],
            "target": {p: [int((cond == p).sum()), self.n_all[p]] for p in perts},
            "moments": "every cell (streamed per-gene sums)" if self.sampled else "the cells scored",
            "sample": "numpy default_rng(SeedSequence([seed, 20, stream])): source stream 0, the i-th "
                      "perturbation's target cells stream i + 1 (perturbkit.metrics.stream.sample_rows)"}}


def _figures(cfg: PredictConfig, perts, targets, pred, scores, effects, top, reference) -> dict[str, Any]:
    """name -> Figure: reg_mean for one perturbation; for a screen the heatmap, the comparison with the
    reference baseline and the reg_mean plots of the TOP_K perturbations with the largest effect."""
    from . import pl

    def reg(p, title_p):
        return pl.reg_mean(targets[p], pred[p], top_genes=top[p],
                           title=f"{cfg.model}: {title_p} (seed {cfg.seed})")

    where = cfg.holdout if cfg.combination is None else "unseen combination"
    if len(perts) == 1:
        return {"reg_mean": reg(perts[0], f"{where}, {perts[0]}")}
    per = scores[~scores.perturbation.isin(SUMMARY_ROWS)]
    figures = {"heatmap_perturbation_metric": pl.perturbation_heatmap(
        per, metrics=SUMMARY_METRICS, title=f"per perturbation: {where} (seed {cfg.seed})")}
    if reference in set(per.model):
        figures[f"pearson_delta_vs_{reference}"] = pl.versus_baseline(
            per, metric="pearson_delta", baseline=reference, title=f"pearson_delta per perturbation: {where}")
    taken: set[str] = set()
    for p in effects.sort_values("statistic", ascending=False, kind="stable").perturbation[:TOP_K]:
        figures[f"reg_mean_{file_label(p, taken)}"] = reg(p, f"{where}, {p}")
    return figures


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


def summary(record_or_scores, metrics=SUMMARY_METRICS):
    """A short models x metrics table (value only) from a scores DataFrame or an output directory.

    One perturbation: one row per model. A screen: per model the mean over the perturbations (``over`` =
    ``mean``) and over the responsive ones (``mean_responsive``, where any), with the ``discrimination_score``
    (on the ``mean`` row); ``table.attrs["n_perturbations"]`` counts the perturbations.
    """
    import math

    import pandas as pd

    scores = record_or_scores
    if isinstance(scores, (str, Path)):
        scores = pd.read_csv(Path(scores) / "scores.csv", keep_default_na=False, na_values=[""])
    if "context" in scores.columns:  # a query: one row per (model, query context)
        rows = scores[scores.metric.isin(metrics)]
        wide = rows.pivot_table(index=["model", "context"], columns="metric", values="value", aggfunc="first",
                                sort=False)
        return wide[[m for m in metrics if m in wide.columns]]
    if "perturbation" not in scores.columns or not scores.perturbation.isin(SUMMARY_ROWS).any():
        rows = scores[scores.metric.isin(metrics)]
        wide = rows.pivot(index="model", columns="metric", values="value")
        order = [m for m in rows.model.unique() if m in wide.index]
        return wide.loc[order, [m for m in metrics if m in wide.columns]]
    extra = ("discrimination_score",)
    rows, index = [], []
    for model in scores.model.unique():
        mine = scores[scores.model == model]
        for over in ("mean", "mean_responsive"):
            sub = mine[mine.perturbation == over]
            if sub.empty:
                continue
            values = sub.set_index("metric").value
            row = {m: values.get(m, math.nan) for m in metrics}
            cross = mine[mine.perturbation == "all"].set_index("metric").value
            row.update({m: cross.get(m, math.nan) if over == "mean" else math.nan for m in extra})
            rows.append(row)
            index.append((model, over))
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["model", "over"]))
    table = table[[c for c in table.columns if table[c].notna().any()]]
    per = scores[~scores.perturbation.isin(SUMMARY_ROWS)]
    table.attrs["n_perturbations"] = int(per.perturbation.nunique())
    return table
