"""The ``perturbkit`` command line.

Bad input prints one line ``error: ...`` naming the key, the value and the fix and exits with status 2;
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_OUT = "runs/demo"


def _add_spec(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data keys (defaults fit the bundled datasets)")
    g.add_argument("--condition-key", default="condition", help="obs column of the condition (default: condition)")
    g.add_argument("--control", default="control", help="control label (default: control)")
    g.add_argument("--perturbed", default="stimulated", metavar="LABEL|A,B,C|all",
                   help="the perturbation(s) to learn and predict: one label, a comma-separated list, or "
                   "'all' (every label but the control) (default: stimulated)")
    g.add_argument("--context-key", default="cell_type", help="obs column of the context (default: cell_type)")
    g.add_argument("--combo-delimiter", default="+", metavar="TEXT",
                   help="joins the labels of a combination of perturbations, e.g. KLF1+MAP2K6 (default: +)")


def _add_predict(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--data", default="kang2018",
                       help="registered dataset (perturbkit list datasets) or path of an .h5ad file")
        from .models import MODELS

        p.add_argument("--model", default="scgen", help=", ".join(MODELS) + " (perturbkit list models)")
        g = p.add_argument_group("task (give exactly one)")
        g.add_argument("--holdout", default=None, metavar="CONTEXT",
                       help="context transfer: the context whose perturbed cells are held out; every "
                       "perturbation in it is predicted from its control cells")
        g.add_argument("--holdout-combination", default=None, metavar="A+B",
                       help="unseen combination: every cell of A+B is held out and predicted from its "
                       "contexts' control cells; A, B and the other perturbations train (needs --perturbed "
                       "all or a list)")
        q = p.add_argument_group("reference -> query transfer (instead of a task above; docs/cross_study.md)")
        q.add_argument("--query", default=None, metavar="QUERY.h5ad",
                       help="train on all of --data (the reference) and predict this study's control cells; its "
                       "perturbed cells, where it has any, are the truth, scored per context")
        q.add_argument("--query-condition-key", default=None, metavar="KEY",
                       help="the query's condition column (default: --condition-key)")
        q.add_argument("--query-control", default=None, metavar="LABEL",
                       help="the query's control label (default: --control)")
        q.add_argument("--query-perturbed", default=None, metavar="LABEL",
                       help="the query's perturbed label (default: --perturbed)")
        q.add_argument("--query-context-key", default=None, metavar="KEY",
                       help="the query's context column (default: --context-key)")
        q.add_argument("--integrate", default="none", metavar="none|combat|scvi",
                       help="integrate reference and query before transfer: none (default), combat (scanpy's "
                       "ComBat on the control cells) or scvi (scvi-tools, if installed: every cell decoded in the "
                       "reference batch); models train, predict and are scored in the corrected expression")
        q.add_argument("--min-shared-genes", type=float, default=0.5, metavar="SHARE",
                       help="stop unless the query holds this share of the reference's genes (default 0.5)")
        p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                       help="keep only the cells whose obs column KEY holds VALUE (comma-separated: any of "
                       "them), before validation and preprocessing, e.g. --filter dataset=mcfaline23 "
                       "(repeatable: all must hold)")
        _add_spec(p)
    g = p.add_argument_group("preprocessing")
    g.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes to keep; 0 keeps all")
    g.add_argument("--normalize", choices=("auto", "yes", "no"), default="auto",
                   help="normalize_total + log1p: auto = only for raw counts (default)")
    if not demo:
        g.add_argument("--backed", action="store_true",
                       help="read --data (an .h5ad file) in row chunks: validate and preprocess it out of core "
                       "into OUT/.cache (one file per input and settings, reused), then train on the preprocessed "
                       "genes in memory (docs/ondisk.md)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10 if demo else None, help="training epochs (model default: 100)")
    t.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (recorded; default: torch's)")
    t.add_argument("--device", default="auto", help="where models train and predict: auto (cuda, mps, else cpu; "
                   "default), cpu, cuda, cuda:N, mps (recorded in record.json)")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a model parameter, e.g. --param n_latent=50 (repeatable)")
    g = p.add_argument_group("model options (each model declares its own; also settable as --param KEY=VALUE)")
    for opt, (kind, text, owners) in _model_options().items():
        g.add_argument(f"--{opt.replace('_', '-')}", dest=opt, type=kind, default=None,
                       help=f"{', '.join(owners)}: {text}")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    e.add_argument("--n-boot", type=int, default=100, help="bootstrap replicates for intervals (default 100)")
    from .pipeline import PredictConfig

    e.add_argument("--eval-cells", type=int, default=PredictConfig.eval_cells, metavar="N",
                   help="a held-out context with more source cells, or target cells of a perturbation, is scored "
                        "on a seeded sample of N of each (DEGs, distances, ceiling, intervals, figures); its "
                        f"per-gene means and variances on every cell (default {PredictConfig.eval_cells}; "
                        "docs/ondisk.md)")
    e.add_argument("--out", default=DEMO_OUT if demo else None, required=not demo, help="output directory")
    e.add_argument("--force", action="store_true", help="overwrite an output directory holding other files")
    e.add_argument("--save-model", default=None, metavar="DIR", help="also save the fitted model to DIR")
    if not demo:
        e.add_argument("--load-model", default=None, metavar="DIR", help="use a model saved with --save-model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_options() -> dict[str, tuple[type, str, list[str]]]:
    """The ``OPTIONS`` the registered models declare: name -> (type, help, models that take it)."""
    from .models import MODELS

    out: dict[str, tuple[type, str, list[str]]] = {}
    for name, cls in MODELS.items():
        for opt, (kind, text) in cls.OPTIONS.items():
            out.setdefault(opt, (kind, text, []))[2].append(name)
    return out


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _config(args, *, data: str, model: str, holdout: str | None, spec, combination: str | None = None,
            where: dict | None = None):
    from .data import Preprocessing
    from .errors import InputError
    from .pipeline import PredictConfig

    params = {}
    for item in args.param:
        if "=" not in item:
            raise InputError(f"--param {item!r} must look like KEY=VALUE, e.g. --param n_latent=50.")
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_value(value.strip())
    for opt in _model_options():
        if getattr(args, opt, None) is not None:
            params[opt] = getattr(args, opt)
    pp = Preprocessing(normalize={"auto": "auto", "yes": True, "no": False}[args.normalize],
                       n_top_genes=args.n_top_genes)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else None
    if args.n_boot < 0:
        raise InputError(f"--n-boot must be >= 0, got {args.n_boot}.")
    query = {}
    if getattr(args, "query", None) is not None:
        keys = {k: getattr(args, f"query_{k}") for k in ("condition_key", "control", "perturbed", "context_key")}
        query = {"query": args.query, "query_keys": {k: v for k, v in keys.items() if v is not None} or None,
                 "integrate": args.integrate, "min_shared_genes": args.min_shared_genes}
    elif getattr(args, "integrate", "none") != "none":
        raise InputError(f"--integrate {args.integrate} needs --query QUERY.h5ad: integration aligns a query with "
                         "the reference (--data).")
    return PredictConfig(data=data, model=model, holdout=holdout, spec=spec, preprocessing=pp, epochs=args.epochs,
                         seed=args.seed, params=params, metrics=metrics, n_boot=args.n_boot,
                         threads=args.threads, filter=where or {}, combination=combination, device=args.device,
                         backed=getattr(args, "backed", False), eval_cells=args.eval_cells, **query)


def _perturbed(text: str, delimiter: str):
    """``--perturbed``: one label, ``all``, or a comma-separated list (a tuple)."""
    from .errors import InputError

    if "," not in text:
        return text.strip()
    if delimiter == ",":
        raise InputError("--combo-delimiter ',' clashes with the comma that separates the labels of "
                         "--perturbed; choose another delimiter, e.g. --combo-delimiter +.")
    labels = tuple(label.strip() for label in text.split(","))
    if not all(labels):
        raise InputError(f"--perturbed {text!r} holds an empty label; separate labels with single commas, "
                         "e.g. --perturbed A,B,C.")
    return labels


def _filters(items: list[str]) -> dict:
    """``--filter KEY=VALUE`` (repeatable; VALUE may be a comma-separated list) -> ``{KEY: VALUE or
    [values]}``."""
    from .errors import InputError

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, values = key.strip(), [v.strip() for v in value.split(",")]
        if not sep or not key or not all(values):
            raise InputError(f"--filter {item!r} must look like KEY=VALUE or KEY=A,B, e.g. --filter "
                             "dataset=mcfaline23.")
        if key in out:
            raise InputError(f"--filter names {key!r} twice; give its values once, comma-separated: --filter "
                             f"{key}=A,B.")
        out[key] = values[0] if len(values) == 1 else values
    return out


def _command() -> str:
    import shlex

    return shlex.join(["perturbkit", *sys.argv[1:]])


def _print_table(out: Path) -> None:
    import pandas as pd

    from .pipeline import summary

    scores = pd.read_csv(out / "scores.csv", keep_default_na=False, na_values=[""])
    if scores.empty:  # a query without perturbed cells: predictions only
        print("nothing scored: the query has no context with perturbed cells (predictions in pred.h5ad)")
        return
    if "context" in scores.columns:
        print("per query context (scores.csv; the batch mixing of the integration in record.json transfer)")
        print(summary(scores).to_string(float_format=lambda v: f"{v:.3f}", na_rep=""))
        return
    table = summary(scores)
    if "n_perturbations" in table.attrs:  # a screen: the means over its perturbations
        effects = pd.read_csv(out / "effects.csv")
        n_resp = int(effects.responsive.sum())
        print(f"mean over {table.attrs['n_perturbations']} perturbations (mean_responsive: the {n_resp} with "
              "a significant effect, effects.csv); per perturbation in scores.csv")
    print(table.to_string(float_format=lambda v: f"{v:.3f}", na_rep=""))
    _print_verdicts(scores, screen="n_perturbations" in table.attrs)


def _print_verdicts(scores, *, screen: bool) -> None:
    """Per metric: the best model and whether any model's interval lies beyond the best baseline's (report.py);
    for a screen, from the means over its perturbations."""
    from .pipeline import SUMMARY_METRICS
    from .report import verdict_lines

    for line in verdict_lines(scores[scores.perturbation == "mean"] if screen else scores, SUMMARY_METRICS):
        print(line)


def cmd_predict(args) -> int:
    from .data import PerturbSpec
    from .pipeline import run_predict

    from .errors import InputError

    if args.query is not None and (args.holdout is not None or args.holdout_combination is not None):
        raise InputError("--query predicts another study from a model trained on all of --data; drop "
                         + ("--holdout." if args.holdout is not None else "--holdout-combination."))
    if args.query is None and (args.holdout is None) == (args.holdout_combination is None):
        raise InputError("give exactly one task: --holdout CONTEXT (context transfer) or "
                         "--holdout-combination A+B (an unseen combination)"
                         + (", not both." if args.holdout is not None else "."))
    spec = PerturbSpec(condition_key=args.condition_key, control=args.control,
                       perturbed=_perturbed(args.perturbed, args.combo_delimiter),
                       context_key=args.context_key, combo_delimiter=args.combo_delimiter)
    cfg = _config(args, data=args.data, model=args.model, holdout=args.holdout, spec=spec,
                  combination=args.holdout_combination, where=_filters(args.filter))
    record = run_predict(cfg, args.out, progress=not args.no_progress, force=args.force, save_model=args.save_model,
                         load_model=args.load_model, command=_command())
    _print_table(Path(args.out))
    if record.get("transfer"):
        mix = record["transfer"]["integration"]
        print(f"integration {mix['method']}: batch mixing (kNN batch entropy, 0-1) "
              f"{mix['mixing_before']['score']:.3f}" + (f" -> {mix['mixing_after']['score']:.3f}"
                                                         if mix["method"] != "none" else "")
              + f"; {len(record['transfer']['genes']['dropped'])} reference genes missing from the query")
    print(f"wrote {args.out}/{', '.join(record['outputs'])}, record.json")
    return 0


def cmd_demo(args) -> int:
    from .data import DATASETS
    from .pipeline import run_predict

    print("perturbkit demo: scGen on Kang 2018 PBMC (control vs IFN-beta), CD4 T cells held out")
    cfg = _config(args, data="kang2018", model="scgen", holdout="CD4 T cells", spec=DATASETS["kang2018"].spec)
    record = run_predict(cfg, args.out, progress=not args.no_progress, force=args.force,
                         save_model=args.save_model, command=_command())
    # the scores are byte-identical only at the same thread count: say which one made them (record.json too)
    threads = record["determinism"]["torch_threads"]
    print(f"torch threads: {threads} ({'--threads' if args.threads is not None else 'torch default'}; "
          "record.json determinism.torch_threads)")
    _print_table(Path(args.out))
    print(f"outputs in {args.out}/ ({_interval_note(record['evaluation']['metrics'])})")
    return 0


def _interval_note(names) -> str:
    """What scores.csv holds: every metric, and which ones have bootstrap intervals (the registry says)."""
    from .metrics import METRICS

    without = [n for n in names if not METRICS[n].bootstrap]
    if not without:
        return "scores.csv has every metric with 95% bootstrap intervals"
    return (f"scores.csv has all {len(names)} metrics, {len(names) - len(without)} with 95% bootstrap intervals; "
            f"none for {', '.join(without)}")


def cmd_evaluate(args) -> int:
    from . import _io, data, metrics
    from .errors import InputError

    if Path(args.out).is_dir():  # before the work, not after it
        raise InputError(f"--out {args.out!r} is a directory; give the path of the CSV file to write.")
    truth, pred, source = (data.read_h5ad(p, f"--{w}") for p, w in ((args.truth, "truth"), (args.pred, "pred"),
                                                                     (args.source, "source")))
    names = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    table = metrics.evaluate(truth, pred, source, metrics=names, n_boot=args.n_boot, seed=args.seed)
    _io.atomic_write_text(args.out, table.to_csv(index=False, float_format="%.10g", lineterminator="\n"))
    print(table[["metric", "value", "ci_low", "ci_high"]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {args.out}")
    return 0


def cmd_list(args) -> int:
    if args.what == "metrics":
        from .metrics import list_metrics

        for row in list_metrics().itertuples():
            print(f"{row.name:28s} {'higher' if row.higher_is_better else 'lower':6s}  {row.definition}")
    elif args.what == "models":
        from .models import MODELS

        for name, cls in MODELS.items():
            print(f"{name:15s} {cls.summary()}")
    else:
        from .data import DATASETS, dataset_status

        width = max(map(len, DATASETS))
        for name, ds in DATASETS.items():
            where = "" if ds.bundled else f" from {ds.url}"
            licence = f" licence: {ds.licence}" if ds.licence else ""
            print(f"{name:{width}s} {dataset_status(name):11s} {ds.reference} doi:{ds.doi}{where}{licence}")
    return 0


def cmd_data(args) -> int:
    from .data import fetch

    for name in args.names:
        fetch(name, force=args.force, progress=not args.no_progress and sys.stderr.isatty())
    return 0


DATA_HELP = ("Fetch a published data set into the cache ($PERTURBKIT_CACHE, or the platform's user cache): its "
             "sha256 is recorded at the first fetch and checked at every later use (--data NAME, "
             "pk.data.load(NAME)). perturbkit list datasets shows the registry. See docs/data.md.")


def _add_data(sub) -> None:
    p = sub.add_parser("data", description=DATA_HELP, help="fetch published data sets (cached, sha256-checked)")
    verbs = p.add_subparsers(dest="verb", required=True)
    f = verbs.add_parser("fetch", description=DATA_HELP, help="download registered data sets into the cache")
    f.add_argument("names", nargs="+", metavar="NAME", help="a registered data set (perturbkit list datasets)")
    f.add_argument("--force", action="store_true",
                   help="download again and record the new sha256 (after a changed or corrupt file)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_data)


def cmd_tune(args) -> int:
    from .tune import load_config, run

    cfg = load_config(args.config)
    record = run(cfg, args.out, trials=args.trials, storage=args.storage, study=args.study, worker=args.worker,
                 worker_only=args.worker_only, threads=args.threads, device=args.device,
                 progress=not args.no_progress,
                 command=_command(), config_text=Path(args.config).read_text())
    if args.worker_only:
        print(f"worker {args.worker}: ran {len(record['trials'])} trials of study {record['study']!r}")
        return 0
    best = record["best"]
    print(f"best trial {best['trial']}: validation {best['metric']} = {best['validation_value']:.4f}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["sampled"].items()))
    import pandas as pd

    summ = pd.read_csv(Path(args.out) / "final_summary.csv")
    summ = summ[summ.metric.isin([best["metric"], "r2_mean_top100", "pearson_delta"])]
    print(summ[["model", "metric", "n_seeds", "mean", "ci_low", "ci_high"]].to_string(
        index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"wrote {args.out}/trials.csv, best_params.json, final_summary.csv, importance.csv, figures, record.json, "
          "ro-crate-metadata.json")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser("tune", help="tune a model's hyperparameters with Optuna on a validation task",
                       description="Optuna study (TPE, median pruning) scored on a validation task carved from the "
                       "training cells; then the best and the default parameters are retrained on the real "
                       "held-out target over several seeds. See docs/tune.md.")
    p.add_argument("config", help="tuning config (TOML), e.g. configs/tune_scgen_kang.toml")
    p.add_argument("--trials", type=int, default=None,
                   help="total trials of the study, those already stored included (default: the config's)")
    p.add_argument("--storage", default=None, help="Optuna storage URL, e.g. postgresql://user@host/db, shared by "
                   "workers (default: sqlite file OUT/study.db)")
    p.add_argument("--study", default=None, help="study name (default: from the model and a hash of the config)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--worker", type=int, default=0, help="this worker's number (offsets the sampler seed; give "
                   "each concurrent process its own)")
    p.add_argument("--worker-only", action="store_true",
                   help="only run trials; a later run without this flag writes the results")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the config's or torch's)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps (default: the config's "
                   "training.device, else auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)


def cmd_bench(args) -> int:
    from . import bench

    def log(*parts):
        stderr_line(" ".join(map(str, parts)))

    cfg = bench.load_config(args.config)
    if args.list_cells:
        for item in bench.list_cells(cfg, args.out, as_dicts=args.json):
            print(json.dumps(item) if args.json else item)
        return 0
    if args.out is None:
        from .errors import InputError

        raise InputError("--out DIR is required (the run directory); only --list-cells works without it.")
    try:
        if args.aggregate and not args.cell:
            bench.aggregate(args.config, args.out, partial=args.partial, log=log)
        else:
            bench.run(args.config, args.out, cells=args.cell or None, do_aggregate=not args.cell or args.aggregate,
                      partial=args.partial, progress=not args.no_progress, jobs=args.jobs,
                      keep_going=args.keep_going, claims=args.claims, log=log)
    except bench.CellsFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    if (args.aggregate or not args.cell) and (out / "summary.csv").exists():
        print(bench.headline(out))
        print(f"wrote {out}/scores.csv, summary.csv, figures/, report.html, ro-crate-metadata.json")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark config: scenarios x models x seeds, scores, figures, crate",
                       description="Run every cell (scenario, split, model, seed) of a benchmark config into a run "
                       "directory, skipping finished cells, then aggregate scores.csv, summary.csv, figures, "
                       "report.html and ro-crate-metadata.json. --list-cells / --cell / --aggregate run the steps "
                       "separately (for workflow engines). See docs/bench.md.")
    p.add_argument("config", help="benchmark config (TOML), e.g. configs/kang.toml")
    p.add_argument("--out", default=None, help="run directory (new, empty, or a run of the same config to resume)")
    p.add_argument("--list-cells", action="store_true", help="print the cell ids, one per line, and exit")
    p.add_argument("--json", action="store_true", help="with --list-cells: one JSON object per line (id, "
                   "scenario, split, context, model, seed, finished)")
    p.add_argument("--cell", action="append", default=[], metavar="ID",
                   help="run only this cell (repeatable); writes DIR/cells/ID/ and does not aggregate")
    p.add_argument("--aggregate", action="store_true", help="only build the tables, figures, report and crate "
                   "from the finished cells (with --cell: after running them)")
    p.add_argument("--partial", action="store_true", help="aggregate even though some cells have not finished")
    p.add_argument("--jobs", type=int, default=1, help="run the cells in N worker processes, each with the "
                   "config's training.threads (e.g. --jobs 2 with threads = 1 on a 2-core machine)")
    p.add_argument("--keep-going", action="store_true", help="with --cell: a failing cell does not stop the others")
    p.add_argument("--claims", default=None, metavar="DIR", help="with --cell: a folder shared by worker "
                   "processes; each runs only the cells it claims there first (how --jobs workers share one queue)")
    p.add_argument("--no-progress", action="store_true", help="no training progress bars")
    p.set_defaults(func=cmd_bench)


def cmd_report(args) -> int:
    from . import bench, report

    path = report.write_report(args.dir, args.output)
    if args.output is None and (Path(args.dir) / "ro-crate-metadata.json").exists():
        bench.write_crate(args.dir)  # the crate lists report.html with its new checksum
    print(f"wrote {path}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained report.html of a bench run directory")
    p.add_argument("dir", help="bench run directory")
    p.add_argument("--output", default=None, help="HTML file to write (default: DIR/report.html)")
    p.set_defaults(func=cmd_report)


def cmd_workflow_crate(args) -> int:
    from . import record
    from .errors import InputError

    if not (Path(args.workflow) / record.WORKFLOW_MAIN).is_file():
        raise InputError(f"--workflow {args.workflow!r} holds no {record.WORKFLOW_MAIN}; give the workflow/ folder of "
                         "a perturbkit checkout.")
    path = record.write_workflow_crate(args.workflow, args.out, authors=tuple(args.author),
                                       organization=args.organization)
    todo = [flag for flag, given in (("--author", args.author), ("--organization", args.organization)) if not given]
    fill = f"; replace its placeholders first: {' '.join(todo)}" if todo else ""
    print(f"wrote {path}: a Workflow RO-Crate of {args.workflow} (upload the .zip to WorkflowHub{fill})")
    return 0


WORKFLOW_CRATE = ("Write the Workflow RO-Crate of workflow/ (Snakefile as main entity, its config schema as inputs, "
                  "profiles, example config, licence, authors): a folder, or a .zip to upload to WorkflowHub. See "
                  "docs/cluster.md.")


def _add_workflow_crate(sub) -> None:
    p = sub.add_parser("workflow-crate", description=WORKFLOW_CRATE,
                       help="package the Snakemake workflow as a Workflow RO-Crate for WorkflowHub")
    p.add_argument("--workflow", default="workflow", help="the workflow folder (default: ./workflow)")
    p.add_argument("--out", default="perturbkit-workflow.crate.zip",
                   help="folder or .zip file to write (default: perturbkit-workflow.crate.zip)")
    p.add_argument("--author", action="append", default=[], metavar="NAME",
                   help="an author, 'Name' or 'Name <https://orcid.org/...>'; repeat for several (default: a "
                   "placeholder to fill in)")
    p.add_argument("--organization", default=None, metavar="NAME",
                   help="the authors' organisation and the crate's publisher, 'Name' or 'Name <https://ror.org/...>' "
                   "(default: a placeholder to fill in)")
    p.set_defaults(func=cmd_workflow_crate)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="perturbkit", description="Predict single-cell perturbation responses "
                                     "and benchmark them honestly.")
    parser.add_argument("--version", action="version", version=f"perturbkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="fit a model once and predict held-out perturbed cells: every "
                       "perturbation of one context (--holdout) or an unseen combination "
                       "(--holdout-combination)")
    _add_predict(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser("demo", help="scGen on the bundled Kang 2018 data, CD4 T cells held out")
    _add_predict(p, demo=True)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("evaluate", help="score any tool's prediction against the real cells")
    p.add_argument("--truth", required=True, help="real perturbed cells (.h5ad)")
    p.add_argument("--pred", required=True, help="predicted cells (.h5ad), same genes in the same order")
    p.add_argument("--source", required=True, help="control cells the prediction started from (.h5ad)")
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    p.add_argument("--n-boot", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="scores CSV to write")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("list", help="list metrics, models or datasets (bundled, fetched or not fetched)")
    p.add_argument("what", choices=("metrics", "models", "datasets"))
    p.set_defaults(func=cmd_list)
    _add_data(sub)
    _add_tune(sub)
    _add_bench(sub)
    _add_report(sub)
    _add_workflow_crate(sub)
    return parser


#: parameter name, as library messages say it (``InputError.params``) -> the flag of this command line that sets it
FLAGS = {
    "data": "--data", "model": "--model", "holdout": "--holdout", "condition_key": "--condition-key",
    "control": "--control", "perturbed": "--perturbed", "context_key": "--context-key",
    "combo_delimiter": "--combo-delimiter", "combination": "--holdout-combination", "filter": "--filter",
    "n_top_genes": "--n-top-genes", "normalize": "--normalize", "epochs": "--epochs", "seed": "--seed",
    "threads": "--threads", "device": "--device", "param": "--param", "ratio": "--ratio", "ot": "--ot", "attention": "--attention",
    "metrics": "--metrics", "n_boot": "--n-boot", "eval_cells": "--eval-cells", "out": "--out", "force": "--force", "save_model": "--save-model",
    "load_model": "--load-model", "truth": "--truth", "pred": "--pred", "source": "--source", "output": "--output",
    "jobs": "--jobs", "cell": "--cell", "partial": "--partial", "keep_going": "--keep-going", "claims": "--claims",
    "list_cells": "--list-cells", "worker": "--worker", "worker_only": "--worker-only", "aggregate": "--aggregate",
    "trials": "--trials", "study": "--study", "storage": "--storage", "json": "--json",
    "query": "--query", "query_condition_key": "--query-condition-key", "query_control": "--query-control",
    "query_perturbed": "--query-perturbed", "query_context_key": "--query-context-key",
    "integrate": "--integrate", "min_shared_genes": "--min-shared-genes", "backed": "--backed",
}


def stderr_line(text: str) -> None:
    """``text`` and its newline on stderr in one write, so the lines of processes sharing it (the workers of
    ``bench --jobs``) do not run into each other."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def with_flags(exc: BaseException) -> str:
    """The message of ``exc`` with each parameter in ``exc.params`` written as its flag (:data:`FLAGS`).

    Whole words outside quoted values (paths, labels): ``seed must be ...`` -> ``--seed must be ...``,
    ``pass n_top_genes=0`` -> ``pass --n-top-genes 0``, ``pass model='scgen'`` -> ``pass --model scgen``. Left
    alone: ``spec.control``, ``adata``, ``truth.var_names``, and a name right after a quoted value (``a 'scgen'
    model``: a noun, not the parameter).
    """
    import re

    text = str(exc)
    names = sorted((n for n in getattr(exc, "params", ()) if n in FLAGS), key=len, reverse=True)
    if not names:
        return text
    quoted = r"""(?<!\w)'[^']*'(?!\w)|(?<!\w)"[^"]*"(?!\w)"""
    pattern = re.compile(
        rf"(?P<quoted>{quoted})"
        rf"|(?<![\w.-])(?<!' )(?<!\" )(?P<name>{'|'.join(map(re.escape, names))})\b(?!\.\w|[\[(])"
        r"""(?P<eq>=(?:'(?P<v1>[^'\s]*)'(?!\w)|"(?P<v2>[^"\s]*)"(?!\w))?)?"""
    )

    def flag(m: re.Match) -> str:
        if m["quoted"]:
            return m["quoted"]
        if not m["eq"]:
            return FLAGS[m["name"]]
        value = m["v1"] if m["v1"] is not None else m["v2"]
        return f"{FLAGS[m['name']]} {value if value is not None else ''}"

    return pattern.sub(flag, text)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import warnings

    from ._io import signals_as_interrupt
    from .errors import InputError, own_warning

    # SIGTERM unwinds like Ctrl-C so temporary files are removed. perturbkit's own warnings print once as one
    # "warning: ..." line; other libraries' warnings only with --debug.
    with signals_as_interrupt(), warnings.catch_warnings():
        warnings.simplefilter("always")
        show, shown = warnings.showwarning, set()

        def showwarning(msg, cat, filename, lineno, file=None, line=None):
            if (str(msg), cat) in shown:
                return
            shown.add((str(msg), cat))
            if own_warning(cat, filename):
                stderr_line(f"warning: {with_flags(msg)}")
            elif args.debug:
                show(msg, cat, filename, lineno, file, line)

        warnings.showwarning = showwarning
        if args.debug:
            return args.func(args)
        try:
            return args.func(args)
        except InputError as exc:
            print(f"error: {with_flags(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            print("interrupted; finished files are complete, unfinished ones were not written", file=sys.stderr)
            return getattr(exc, "exit_code", 130)
        except BrokenPipeError:  # e.g. `perturbkit bench CONFIG --list-cells | head`
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0


if __name__ == "__main__":
    sys.exit(main())
