"""After the trials: the best parameters, their importance, the tuned vs default parameters retrained on the
real task over several seeds, the summary over seeds, the figures and the RO-Crate."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from .config import RECORD_KIND, TuneConfig

#: the tables and figures of a run directory (besides record.json, the crate, config.toml, study.db, workers/)
TABLES = ("trials.csv", "intermediate.csv", "best_params.json", "importance.csv", "final_scores.csv",
          "final_summary.csv")
FIGURES = ("history.png", "intermediate.png", "importance.png", "final.png")
#: every name a tune run directory may hold (the output-directory guard accepts a directory of these)
RUN_FILES = frozenset((*TABLES, *FIGURES, "record.json", "ro-crate-metadata.json", "config.toml",
                       "config.json", "workers"))
#: SQLite storages (``study.db`` or a ``--storage`` file kept in the run directory) and their side files
SQLITE_SUFFIXES = (".db", ".db-journal", ".db-wal", ".db-shm")


def accepts_out(cfg: TuneConfig):
    """``accepts(out, entries)`` for :func:`perturbkit._io.check_out`: a tuning run of the same model (or
    the study and worker files it starts with)."""
    from .._io import read_json

    def accepts(out: Path, entries: list[str]) -> bool:
        if any(e not in RUN_FILES and not e.endswith(SQLITE_SUFFIXES) for e in entries):
            return False
        if "record.json" not in entries:
            return True
        old = read_json(out / "record.json", {})
        if old.get("kind") != RECORD_KIND:
            raise InputError(f"out {str(out)!r} holds another tool's run ({old.get('kind')}); choose a new "
                             "directory.")
        model = (old.get("best") or {}).get("model")
        if model != cfg.name:
            raise InputError(f"out {str(out)!r} holds a tuning run of model {model!r}; choose a new "
                             "directory.")
        return True

    return accepts


def best_document(cfg: TuneConfig, study) -> dict[str, Any]:
    """``best_params.json``: the best trial, its parameters (sampled + fixed, and in full), the defaults."""
    from .. import models

    best = study.best_trial
    best_params = {**cfg.params, **best.params}
    return {"model": cfg.name, "label": cfg.label, "metric": cfg.tune.metric, "direction": cfg.direction,
            "validation_value": best.value, "trial": best.number, "sampled": best.params,
            "params": best_params,
            "full_params": models.get(cfg.name, **best_params).params,
            "default_params": models.get(cfg.name, **cfg.params).params}


def evaluate_configs(adata, task, cfg: TuneConfig, configs: dict[str, dict], *, execution=None,
                     log=print, progress: bool = True):
    """Retrain each parameter set on the real task for every seed of ``seeds``; score them with the baselines
    and the ceiling.

    Returns the tidy table (``model, config, seed, metric, value, ci_low, ci_high, higher_is_better, error``;
    ``model`` is e.g. ``scgen:tuned``) and fit details per (config, seed). In a screen each score is the mean
    over the task's perturbations (:func:`perturbkit.metrics.evaluate_screen`'s ``mean`` rows).
    """
    import pandas as pd

    from .. import engine, models
    from ..metrics import evaluate_screen

    train, source, target = task.subsets(adata)
    perts = engine.task_perturbations(task, cfg.spec)
    names = cfg.evaluation.metric_names()
    baselines = models.BASELINES if cfg.evaluation.baselines else ()
    base_preds = {b: engine.fit_predict(models.get(b), train, source, cfg.spec, perts, seed=0,
                                        execution=execution).pred(perts) for b in baselines}
    tables, fits = [], {}
    for seed in cfg.seeds:
        preds = {}
        for label, params in configs.items():
            model = models.get(cfg.name, **params)
            done = engine.fit_predict(model, train, source, cfg.spec, perts, seed=seed, execution=execution,
                                      progress=progress)
            preds[f"{cfg.label}:{label}"] = done.pred(perts)
            history = getattr(model, "history", None)
            seconds = done.timings["fit_s"] + done.timings["predict_s"]
            fits[f"{label}:seed{seed}"] = {"seconds": round(seconds, 3),
                                           "epochs_run": history.epochs_run if history is not None else None}
            log(f"final {label} seed {seed}: fit {done.timings['fit_s']:.0f} s")
        preds.update(base_preds)
        tab, _ = evaluate_screen(target, preds, source, condition_key=cfg.spec.condition_key, metric_names=names,
                                 n_boot=cfg.evaluation.n_boot, seed=seed, execution=execution)
        if len(perts) > 1:  # the means over the perturbations
            tab = tab[tab.perturbation == "mean"]
        tab = tab.drop(columns="perturbation").reset_index(drop=True)
        tab.insert(1, "seed", seed)
        tables.append(tab)
    out = pd.concat(tables, ignore_index=True)
    out.insert(1, "config", out["model"].str.split(":").str[-1])
    return out, fits


def summarise_seeds(scores, *, ci: float = 0.95):
    """Mean over seeds with a Student-t interval (and the mean bootstrap interval of single runs) per model x
    metric."""
    import numpy as np
    import pandas as pd

    from ..metrics.stats import t_interval

    rows = []
    for (model, metric), g in scores.groupby(["model", "metric"], sort=False):
        v = g["value"].to_numpy(dtype=float)
        mean, sd, lo, hi = t_interval(v, ci)
        rows.append({"model": model, "metric": metric, "n_seeds": int(np.isfinite(v).sum()), "mean": mean,
                     "sd": sd, "ci_low": lo, "ci_high": hi,
                     "boot_ci_low": float(g["ci_low"].mean()), "boot_ci_high": float(g["ci_high"].mean()),
                     "higher_is_better": bool(g["higher_is_better"].iloc[0])})
    return pd.DataFrame(rows)


def headline(cfg: TuneConfig) -> list[str]:
    """Up to 4 metrics for the seed-comparison figure: the objective first."""
    names = cfg.evaluation.metric_names()
    others = ("r2_mean_top100", "pearson_delta", "edistance")
    pick = [cfg.tune.metric] + [m for m in others if m != cfg.tune.metric]
    return [m for m in pick if m in names][:4]


def write_figures(out: Path, trials_df, inter_df, imp_df, final, cfg: TuneConfig) -> list[str]:
    """history.png, intermediate.png, importance.png, final.png; returns the names written."""
    from .. import pl
    from .._io import write_png

    metric = cfg.tune.metric
    figs = {
        "history.png": pl.optimization_history(trials_df, inter_df, metric=metric, direction=cfg.direction),
        "intermediate.png": pl.intermediate_values(inter_df, metric=metric),
        "importance.png": pl.param_importance(dict(zip(imp_df["param"], imp_df["importance"]))),
        "final.png": pl.seed_comparison(final, metrics=headline(cfg)),
    }
    for fname, fig in figs.items():
        write_png(out / fname, fig, dpi=110)
    return list(figs)


def results(cfg: TuneConfig, study, out: Path, adata, task, *, execution, timings: dict[str, float],
            log=print, progress: bool = True) -> dict[str, Any]:
    """Write the tables of the study, the best parameters, their importance, the final retraining and the
    figures into ``out``; returns the record's parts (states, best, importance, final, outputs)."""
    import pandas as pd
    from optuna.trial import TrialState

    from .._io import atomic_write_text
    from .._io import to_json, write_csv
    from .study import intermediate_table, param_importance, trials_table

    states = {s.name: len(study.get_trials(deepcopy=False, states=(s,))) for s in TrialState}
    if states["RUNNING"]:
        log(f"warning: {states['RUNNING']} trials are still running in other workers; results use the "
            "finished ones")
    complete = [tr for tr in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if tr.value is not None and math.isfinite(tr.value)]
    trials_df, inter_df = trials_table(study), intermediate_table(study)
    write_csv(out / "trials.csv", trials_df, float_format=None)
    write_csv(out / "intermediate.csv", inter_df, float_format=None)
    if not complete:
        raise InputError(f"study {study.study_name!r} has no completed trial ({states}); see the error "
                         f"column of {out / 'trials.csv'}.")
    best = best_document(cfg, study)
    atomic_write_text(out / "best_params.json", to_json(best))
    log(f"best trial {best['trial']}: {cfg.tune.metric} = {best['validation_value']:.4f} with "
        f"{best['sampled']}")

    importance, importance_error = {}, None
    t = time.perf_counter()
    try:
        importance = param_importance(study, seed=cfg.tune.seed)
    except Exception as exc:  # e.g. too few completed trials or a constant parameter
        importance_error = f"{type(exc).__name__}: {exc}"
        log(f"note: no parameter importance ({importance_error})")
    timings["importance_s"] = time.perf_counter() - t
    imp_df = pd.DataFrame({"param": list(importance), "importance": list(importance.values())})
    write_csv(out / "importance.csv", imp_df, float_format=None)

    t = time.perf_counter()
    configs = {"tuned": best["params"], "default": dict(cfg.params)}
    final, fit_info = evaluate_configs(adata, task, cfg, configs, execution=execution, log=log, progress=progress)
    timings["final_s"] = time.perf_counter() - t
    write_csv(out / "final_scores.csv", final)
    write_csv(out / "final_summary.csv", summarise_seeds(final))
    figures = write_figures(out, trials_df, inter_df, imp_df, final, cfg)
    return {
        "states": states, "best": best,
        "importance": {"method": "fANOVA (optuna FanovaImportanceEvaluator, seed = [tune] seed)",
                       "values": importance, "error": importance_error},
        "final": {"seeds": list(cfg.seeds), "n_boot": cfg.evaluation.n_boot, "fits": fit_info,
                  "note": "tuned = best trial's parameters; default = the model's defaults with "
                          f"[models.{cfg.label}] (and [training] epochs) applied; both retrained on the real "
                          "task's training cells and scored on its held-out target"},
        "outputs": [*TABLES, *figures],
    }


def write_crate(out: Path, record: dict[str, Any]) -> Path:
    """``ro-crate-metadata.json`` of the run directory (the shared writer of :mod:`perturbkit.record`)."""
    from .. import record as rec

    best, cfg = record["best"], record["config"]
    return rec.write_crate(out, record, name=f"perturbkit tune: {best['model']} on {cfg['data']['source']}, "
                           f"{cfg['tune']['holdout']} held out",
                           description="Optuna study of the model's hyperparameters on a validation task "
                                       "carved from the training cells, and the tuned vs default parameters "
                                       "on the real held-out target over several seeds.")
