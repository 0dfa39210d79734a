"""Running cells: one cell (:func:`run_cell`), many in worker processes, and a whole run (:func:`run`)."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import InputError, own_warning, suggest
from .aggregate import N_TOP_NOTE, aggregate, aggregate_is_current
from .config import BenchConfig, config_hash, load_config, to_toml
from .data import Context
from .plan import Cell, ceiling_model, keeps_degs, keeps_prediction, plan, splits_of
from .rundir import CACHE_DIR, RUN_KIND, SCORE_COLUMNS, cell_dir, cell_result, prepare_dir


def run_cell(cfg: BenchConfig, out: str | Path, cell: Cell, ctx: Context, *, keep_pred: bool = False,
             degs: bool = False, progress: bool = False, log=print) -> dict[str, Any]:
    """Fit, predict and score one cell; write ``cells/<id>/``; return its result (``result.json``).

    ``keep_pred``: write the prediction (``pred.h5ad``, for the example figures) and the model's own figures
    (``<name>.png``); ``degs``: record the real and predicted top DEGs. Every file is written to a temporary
    name and renamed; ``result.json`` last, so a cell with a ``result.json`` is finished and complete.

    In a screen (``data.perturbed`` a list or "all") the one fitted model predicts every perturbation of the
    task from its source cells (``pred.h5ad`` holds them all, ``obs[condition_key]`` set to each), every
    perturbation is scored (:func:`perturbkit.metrics.screen.evaluate_screen`) and the cell that scores the
    ceiling also tests each perturbation's effect (``effects`` in ``result.json``).
    """
    from .. import _io, engine, metrics, models
    from .. import record as rec
    from ..data import sha256
    from ..metrics.screen import effect_table, evaluate_screen
    from ..scenarios.screen_rows import ALL, LABELS

    out = Path(out)
    cdir = cell_dir(out, cell)
    done = cell_result(out, cell)
    if done is not None:
        return done
    started, t_start = rec.stamp(), time.perf_counter()
    from ..scenarios import SCENARIOS

    adata, spec = SCENARIOS[cell.scenario].task_data(cell.split, ctx), ctx.spec
    s = ctx.split(cell.split)
    train, source, target = s.subsets(adata)
    mc = cfg.model(cell.model)
    model = models.get(mc.model, **mc.build_params(cfg.training))
    perts = engine.task_perturbations(s, spec)
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # kept in result.json, and shown as usual
            warnings.simplefilter("always")
            fitted = engine.fit_predict(model, train, source, spec, perts, seed=cell.seed,
                                        execution=ctx.execution, progress=progress)
    finally:  # (also when the fit fails: what came before it is shown)
        for w in {(str(w.message), w.category, w.filename, w.lineno): w for w in caught}.values():  # once each
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    fit_warnings = list(dict.fromkeys(str(w.message) for w in caught if own_warning(w.category, w.filename)))
    if fitted.cannot:
        raise InputError(f"cell {cell.id}: the {cell.model!r} model cannot predict "
                         + "; ".join(f"{p} ({why})" for p, why in fitted.cannot.items()))
    pred = fitted.pred(perts)
    timings = dict(fitted.timings)
    t = time.perf_counter()
    metric_names = cfg.evaluation.metric_names()
    is_ceiling = cell.model == ceiling_model(cfg, cell.split)  # the ceiling once per (split, seed)
    with warnings.catch_warnings():  # fewer genes than top DEGs: in the scores' notes, not warned per cell
        warnings.filterwarnings("ignore", message=N_TOP_NOTE, category=UserWarning)
        scores, eval_info = evaluate_screen(target, {cell.model: pred}, source,
                                            condition_key=spec.condition_key, metric_names=metric_names,
                                            n_boot=cfg.evaluation.n_boot, seed=cell.seed, ceiling=is_ceiling,
                                            execution=ctx.execution)
    # normalised, and averaged over perturbations, once all models are in: aggregate()
    scores = scores[~scores.metric.str.endswith("_norm") & (~scores.perturbation.isin(LABELS)
                                                            | (scores.perturbation == ALL))]
    timings["evaluate_s"] = time.perf_counter() - t
    effects = None
    if is_ceiling:  # each perturbation's measurable effect (the responsive set of the aggregation)
        t = time.perf_counter()
        effects = effect_table(target, source, condition_key=spec.condition_key, seed=cell.seed)
        effects = effects.to_dict("records")
        timings["effects_s"] = time.perf_counter() - t
    if degs:
        t = time.perf_counter()
        degs = {"real": metrics.top_degs(target, source, 100), "pred": metrics.top_degs(pred, source, 100)}
        timings["degs_s"] = time.perf_counter() - t
    else:
        degs = None
    # a perturbation's rows: its own target cells (summary rows: all of them)
    n_target = scores.perturbation.map(target.obs[spec.condition_key].astype(str).value_counts())
    n_target = n_target.fillna(len(s.target)).astype(int)
    scores = scores.assign(scenario=cell.scenario, split=cell.split.name, seed=cell.seed,
                           context=cell.split.context, variant=cell.split.variant, n_train=len(s.train),
                           n_source=len(s.source), n_target=n_target)
    scores = scores[list(SCORE_COLUMNS)]

    t = time.perf_counter()
    files = {}
    _io.write_csv(cdir / "scores.csv", scores)
    files["scores.csv"] = sha256(cdir / "scores.csv")
    if cfg.output.save_predictions or keep_pred:
        pred.uns["perturbkit"] = {"cell": cell.id, "model": cell.model, "seed": cell.seed}
        _io.atomic_write_with(cdir / "pred.h5ad", lambda p: pred.write_h5ad(p))
        files["pred.h5ad"] = sha256(cdir / "pred.h5ad")
    if cfg.output.save_weights:
        try:
            model.save(cdir / "model")
            for f in sorted((cdir / "model").iterdir()):
                files[f"model/{f.name}"] = sha256(f)
        except NotImplementedError:
            pass
    if keep_pred:  # the model's own figures, drawn while it is in memory (scPRAM: its attention)
        for name, fig in model.figures(source).items():
            fig.axes[0].set_title(f"{cell.model} {name}: {cell.split.context} (seed {cell.seed})", fontsize=9,
                                  pad=18)
            _io.write_png(cdir / f"{name}.png", fig)
            files[f"{name}.png"] = sha256(cdir / f"{name}.png")
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
        "ended": rec.stamp(),
        "timings": timings,
        "torch_threads": fitted.threads,
        "execution": fitted.execution.describe(),
        "split_info": s.to_dict(adata.obs_names),
        "params": model.params,
        "fit": model.fit_info,
        "warnings": fit_warnings,
        "evaluation": {"metrics": metric_names, "n_boot": cfg.evaluation.n_boot, "seed": cell.seed,
                       **eval_info},
        "degs": degs,
        "perturbations": perts,
        "effects": effects,
        "versions": rec.versions(),
        "files": files,
    }
    text = json.dumps(result, indent=1, default=_io.json_default) + "\n"
    _io.atomic_write_text(cdir / "result.json", text)
    return result


class CellsFailed(RuntimeError):
    """Some cells raised; the others finished and were aggregated."""


def claim(claims: str | Path, cell_id: str) -> bool:
    """Take ``cell_id`` from the queue shared through the folder ``claims``: True for the one process that
    creates its file first (atomic, ``O_EXCL``), False for every other."""
    import os

    try:
        os.close(os.open(Path(claims) / cell_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def run(config: BenchConfig | str | Path, out: str | Path, *, cells: list[str] | None = None,
        do_cells: bool = True, do_aggregate: bool = True, partial: bool = False, progress: bool = True,
        jobs: int = 1, keep_going: bool = False, claims: str | Path | None = None, log=print) -> dict[str, Any]:
    """Run a benchmark into ``out``: every unfinished cell (or only ``cells``), then :func:`aggregate`.

    ``jobs > 1`` runs the cells in that many worker processes (each ``perturbkit bench --cell ...`` with the
    config's ``training.threads``); the results are the same as with one process, since each cell depends
    only on the config, its seed and the thread count. The workers share one queue (``claims``, a folder: each
    runs only the cells it claims there first, :func:`claim`), so a worker that dies loses the one cell it was
    running, not the rest of a share. A failing cell is reported and the others go on, except when ``cells`` are
    named without ``keep_going`` (then it raises); an :class:`InputError` raises at once unless ``keep_going``
    (each worker process runs with it, so one cell's error does not stop the worker).

    Returns ``{"cells": [ids run or skipped], "ran": [...], "skipped": [...], "failed": {id: error}}``.
    """
    from .. import _io

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"--jobs must be a positive integer, got {jobs!r}.")
    if claims is not None and not Path(claims).is_dir():
        raise InputError(f"claims {str(claims)!r} is not a folder: make it first (every worker process "
                         "sharing the queue names the same one), or leave claims out.", params=("claims",))
    config_text = None
    if not isinstance(config, BenchConfig):
        config_text = Path(config).read_text() if Path(config).exists() else None
        config = load_config(config)
    cfg = config
    out = prepare_dir(cfg, out, config_text=config_text)
    _io.remove_stale_temps(out, recursive=True)  # left by a SIGKILLed process; never another worker's
    ctx = Context(cfg, out, log=log)
    if do_cells:
        ctx.execution  # a device that is not on this machine: the error now, before any work
    everything = plan(cfg, ctx.planning_data())
    by_id = {c.id: c for c in everything}
    if cells:
        unknown = [c for c in cells if c not in by_id]
        if unknown:
            raise InputError(f"--cell {unknown[0]!r} is not a cell of this config."
                             f"{suggest(unknown[0], by_id)} List them with --list-cells.")
        todo = [by_id[c] for c in dict.fromkeys(cells)]
    else:
        todo = everything if do_cells else []
    splits = splits_of(everything)
    ran, failed = [], {}
    pending = [c for c in todo if cell_result(out, c) is None]
    skipped = [c.id for c in todo if cell_result(out, c) is not None]
    if skipped:
        log(f"bench: {len(skipped)} of {len(todo)} cells already finished in {out}; skipping them")
    t0 = time.perf_counter()
    if jobs > 1 and len(pending) > 1 and claims is None:  # (a worker has claims: it runs its cells itself)
        ran, failed = run_workers(cfg, out, ctx, pending, jobs, log=log)
        pending = []
    i = 0
    for cell in pending:
        if claims is not None and not claim(claims, cell.id):
            continue  # another worker has it
        i += 1
        try:
            res = run_cell(cfg, out, cell, ctx, keep_pred=keeps_prediction(cfg, cell, splits),
                           degs=keeps_degs(cfg, cell, splits), progress=progress, log=log)
        except Exception as exc:  # one failing cell does not lose the others; it is reported and rerun later
            if isinstance(exc, InputError) and not keep_going:
                raise  # bad input fails every cell alike: say so once; a worker (--keep-going) goes on
            failed[cell.id] = f"{type(exc).__name__}: {exc}"
            log(f"[{i}/{len(pending)}] {cell.id}: FAILED ({failed[cell.id]})")
            if cells and not keep_going:
                raise
            continue
        ran.append(cell.id)
        tm = res["timings"]
        elapsed = time.perf_counter() - t0
        started = len(list(Path(claims).iterdir())) if claims is not None else i
        eta = elapsed / i * (len(pending) - started) / (jobs if claims is not None else 1)
        log(f"[{started}/{len(pending)}] {cell.id}: fit {tm['fit_s']:.1f} s, evaluate {tm['evaluate_s']:.1f} s, "
            f"total {tm['total_s']:.1f} s (elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left)")
    summary = {"cells": [c.id for c in todo], "ran": ran, "skipped": skipped, "failed": failed}
    if do_aggregate and not ran and not failed and aggregate_is_current(cfg, out, everything):
        log(f"bench: {out} is complete and its tables, figures, report and crate are up to date")
    elif do_aggregate:
        aggregate(cfg, out, partial=partial or bool(failed), ctx=ctx, log=log)
    if failed:
        why = "; ".join(f"{k}: {v}" for k, v in failed.items())
        raise CellsFailed(f"{len(failed)} cell(s) failed: {why}. The others are saved; rerun the same "
                          "command to retry the failed ones.")
    return summary


def run_workers(cfg: BenchConfig, out: Path, ctx: Context, pending: list[Cell], jobs: int, *, log=print):
    """Run ``pending`` in ``jobs`` processes of ``perturbkit bench --cell``.

    Returns (ran ids, {failed id: why}).
    """
    import os
    import shutil
    import subprocess
    import sys

    from .. import _io, models

    ctx.data()  # preprocess once and cache it before the workers start, so none of them repeats it
    worker_cfg = out / CACHE_DIR / f"config-{config_hash(cfg.to_dict())}.toml"
    if not worker_cfg.exists():
        _io.atomic_write_text(worker_cfg, to_toml(cfg))
    # one queue, the expensive cells first (by the model's COST): each worker takes the next cell no other has
    # claimed, so they finish at about one time, and a worker that dies loses only the cell it was running
    order = sorted(pending, key=lambda c: -models.MODELS[cfg.model(c.model).model].COST)
    n = min(jobs, len(order))
    log(f"bench: {len(pending)} cells in {n} worker processes (training.threads = {cfg.training.threads} each)")
    claims = out / CACHE_DIR / f"claims-{os.getpid()}-{time.time_ns()}"
    claims.mkdir(parents=True)
    cmd = [sys.executable, "-m", "perturbkit", "bench", str(worker_cfg), "--out", str(out), "--no-progress",
           "--keep-going", "--jobs", str(n), "--claims", str(claims)]
    for cell in order:
        cmd += ["--cell", cell.id]
    procs = [subprocess.Popen(cmd) for _ in range(n)]
    try:
        for p in procs:
            p.wait()
    except BaseException:  # interrupted: stop the workers; their finished cells are complete
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()
        raise
    finally:
        shutil.rmtree(claims, ignore_errors=True)
    ran = [c.id for c in pending if cell_result(out, c) is not None]
    failed = {c.id: "failed in a worker process (its error is printed above)" for c in pending
              if cell_result(out, c) is None}
    return ran, failed
