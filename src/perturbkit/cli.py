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
    g.add_argument("--perturbed", default="stimulated", help="perturbed label (default: stimulated)")
    g.add_argument("--context-key", default="cell_type", help="obs column of the context (default: cell_type)")


def _add_predict(p: argparse.ArgumentParser, *, demo: bool = False) -> None:
    if not demo:
        p.add_argument("--data", default="kang2018", help="bundled dataset name or path of an .h5ad file")
        p.add_argument("--model", default="scgen", help="scgen, scpram, control or mean_shift")
        p.add_argument("--holdout", required=True, help="context whose perturbed cells are held out and predicted")
        _add_spec(p)
    g = p.add_argument_group("preprocessing")
    g.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes to keep; 0 keeps all")
    g.add_argument("--normalize", choices=("auto", "yes", "no"), default="auto",
                   help="normalize_total + log1p: auto = only for raw counts (default)")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=10 if demo else None, help="training epochs (model default: 100)")
    t.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (recorded; default: torch's)")
    t.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a model parameter, e.g. --param n_latent=50 (repeatable)")
    t.add_argument("--ratio", type=float, default=None, help="scpram: share of control cells attended to")
    t.add_argument("--ot", default=None, help="scpram: optimal transport, sinkhorn or exact")
    t.add_argument("--attention", default=None, help="scpram: cell (published) or first_cell (pip package)")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    e.add_argument("--n-boot", type=int, default=100, help="bootstrap replicates for intervals (default 100)")
    e.add_argument("--out", default=DEMO_OUT if demo else None, required=not demo, help="output directory")
    e.add_argument("--force", action="store_true", help="overwrite an output directory holding other files")
    e.add_argument("--save-model", default=None, metavar="DIR", help="also save the fitted model to DIR")
    if not demo:
        e.add_argument("--load-model", default=None, metavar="DIR", help="use a model saved with --save-model")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _config(args, *, data: str, model: str, holdout: str, spec):
    from .data import Preprocessing
    from .errors import InputError
    from .pipeline import PredictConfig

    params = {}
    for item in args.param:
        if "=" not in item:
            raise InputError(f"--param {item!r} must look like KEY=VALUE, e.g. --param n_latent=50.")
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_value(value.strip())
    for key in ("ratio", "ot", "attention"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.n_top_genes < 0:
        raise InputError(f"--n-top-genes must be >= 0 (0 keeps all genes), got {args.n_top_genes}.")
    pp = Preprocessing(normalize={"auto": None, "yes": True, "no": False}[args.normalize],
                       n_top_genes=args.n_top_genes or None)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else None
    if args.n_boot < 0:
        raise InputError(f"--n-boot must be >= 0, got {args.n_boot}.")
    return PredictConfig(data=data, model=model, holdout=holdout, spec=spec, preprocessing=pp, epochs=args.epochs,
                         seed=args.seed, params=params, metrics=metrics, n_boot=args.n_boot, threads=args.threads)


def _print_table(out: Path) -> None:
    from .pipeline import summary

    table = summary(out)
    print(table.to_string(float_format=lambda v: f"{v:.3f}"))


def cmd_predict(args) -> int:
    from .data import PerturbSpec
    from .pipeline import run_predict

    spec = PerturbSpec(condition_key=args.condition_key, control=args.control, perturbed=args.perturbed,
                       context_key=args.context_key)
    cfg = _config(args, data=args.data, model=args.model, holdout=args.holdout, spec=spec)
    run_predict(cfg, args.out, progress=not args.no_progress, force=args.force, save_model=args.save_model,
                load_model=args.load_model)
    _print_table(Path(args.out))
    print(f"wrote {args.out}/pred.h5ad, scores.csv, record.json, reg_mean.png")
    return 0


def cmd_demo(args) -> int:
    from .data import DATASETS
    from .pipeline import run_predict

    print("perturbkit demo: scGen on Kang 2018 PBMC (control vs IFN-beta), CD4 T cells held out")
    cfg = _config(args, data="kang2018", model="scgen", holdout="CD4 T cells", spec=DATASETS["kang2018"].spec)
    run_predict(cfg, args.out, progress=not args.no_progress, force=args.force, save_model=args.save_model)
    _print_table(Path(args.out))
    print(f"outputs in {args.out}/ (scores.csv has every metric with 95% bootstrap intervals)")
    return 0


def cmd_evaluate(args) -> int:
    from . import _io, data, metrics

    truth, pred, source = (data.read_h5ad(p) for p in (args.truth, args.pred, args.source))
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
            print(f"{name:12s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    else:
        from .data import DATASETS

        for name, ds in DATASETS.items():
            print(f"{name:12s} {ds.reference} doi:{ds.doi}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="perturbkit", description="Predict single-cell perturbation responses "
                                     "and benchmark them honestly.")
    parser.add_argument("--version", action="version", version=f"perturbkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="fit a model on all but one context's perturbed cells and predict them")
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
    p = sub.add_parser("list", help="list metrics, models or datasets")
    p.add_argument("what", choices=("metrics", "models", "datasets"))
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return args.func(args)
    from .errors import InputError

    try:
        return args.func(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished files are complete, unfinished ones were not written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
