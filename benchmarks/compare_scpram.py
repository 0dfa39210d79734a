"""Run the ``scpram`` 0.0.3 pip package and perturbkit's ScPRAM side by side on Kang 2018, CD4 T cells held out.

Not a test and not a CI dependency. The package pins torch 1.13 and pulls jupyter and torchvision, so install it
without its dependencies next to the local torch; it then needs one small pure-python package, adjustText:

    .venv/bin/python -m pip install --no-deps scpram==0.0.3
    .venv/bin/python -m pip install -c constraints.txt adjustText
    nice -n 5 .venv/bin/python benchmarks/compare_scpram.py            # seeds 0-4, 10 epochs, 1 torch thread

Both sides get the same AnnData: ``perturbkit.data.preprocess`` of ``kang2018`` (2,000 HVGs, log-normalised),
split by ``perturbkit.split.holdout_cell_type`` ("CD4 T cells"): the training cells are every cell but the
stimulated CD4 T cells (the package's ``train_adata``), the source cells the control CD4 T cells, the target the
stimulated CD4 T cells. For each seed:

- the package: ``torch.manual_seed(seed)``, ``np.random.seed(seed)`` (it draws from the global generators),
  ``SCPRAM(input_dim=n_genes).train_SCPRAM(train, epochs)`` (batch 128, lr 5e-4), then
  ``predict(train, "CD4 T cells", key_dic, ratio=0.05)``: exact EMD pairing, the first query cell's attention
  for every cell;
- perturbkit: ``ScPRAM(epochs=epochs, **params).fit(train, spec, seed=seed)`` and ``predict(source)``, at its
  defaults unless ``--param KEY=VALUE`` says otherwise; each ``--variant KEY=VALUE[,...]`` adds a row of the
  same fitted VAE with its transfer step (pairing and attention: ``ratio``, ``attention``, ``ot*``) redone
  under those parameters, so that the rows differ in the transfer step alone;
- ``perturbkit.metrics.evaluate(target, pred, source)`` scores both (no bootstrap).

Prints every seed's scores and, per side and metric, the mean with its 95 % Student-t interval over the seeds
(``perturbkit.metrics.stats.t_interval``), and writes the same as a Markdown table (``--out``) with the command,
date, machine and versions. ``--save-models DIR`` keeps perturbkit's fitted models (``DIR/seed<N>``) for
``benchmarks/scpram_attention.py --models DIR``. ``--csv FILE`` writes every seed's scores as they come; on a
busy machine the seeds can run as parallel processes (``--seeds N --csv sN.csv``) and ``--merge s0.csv s1.csv
... --runs "COMMAND" ...`` writes the one table from their files (benchmarks/results/scpram_vs_package.md was
made so).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta", "pearson_delta_top100", "edistance")
HOLDOUT = "CD4 T cells"
TRANSFER_KEYS = ("ratio", "attention", "ot", "ot_cost", "ot_reg", "ot_within_context", "latent_sampling",
                 "early_stopping")
KEY_DIC = {"condition_key": "condition", "cell_type_key": "cell_type", "ctrl_key": "control",
           "stim_key": "stimulated", "pred_key": "stimulated"}


def _import_perturbkit():
    try:
        import perturbkit
    except ImportError:  # running from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import perturbkit
    return perturbkit


def kang_task(pk, holdout: str = HOLDOUT):
    """(train, source, target, spec) of the canonical Kang task, as ``perturbkit predict`` builds it."""
    adata, _ = pk.data.preprocess(pk.data.load("kang2018"), log=lambda *a, **k: None)
    spec = pk.PerturbSpec(condition_key="condition", control="control", perturbed="stimulated",
                          context_key="cell_type")
    train, source, target = pk.split.holdout_cell_type(adata, spec, holdout).subsets(adata)
    return train, source, target, spec


def unbalanced_tasks(pk, holdout: str, variants) -> list[tuple]:
    """(variant, name, train, source, target, spec) of configs/kang.toml's unbalanced tasks of ``holdout`` in
    ``variants``, built by the bench's own split (``scenarios.Unbalanced.split``), so a diagnosis here is of the
    cells docs/bench.md scores."""
    from perturbkit import bench
    from perturbkit.bench.plan import plan_splits
    from perturbkit.scenarios import Unbalanced

    cfg = bench.load_config(Path(__file__).resolve().parents[1] / "configs" / "kang.toml")
    spec = pk.PerturbSpec(condition_key="condition", control="control", perturbed="stimulated",
                          context_key="cell_type")
    adata, _ = pk.data.preprocess(pk.data.load("kang2018"), log=lambda *a, **k: None)
    out = []
    for sd in plan_splits(cfg, adata):
        if sd.scenario == "unbalanced" and sd.context == holdout and sd.variant in variants:
            sp = Unbalanced.split(sd, adata, spec)
            out.append((sd.variant, sd.name, adata[sp.train], adata[sp.source], adata[sp.target], spec))
    missing = sorted(set(variants) - {t[0] for t in out})
    if missing:
        raise SystemExit(f"configs/kang.toml has no unbalanced task of {holdout!r} in variant(s) {missing}: "
                         "name a cell type of its loco scenario and a variant of [scenarios.unbalanced]")
    return out


def run_package(train, holdout: str, *, seed: int, epochs: int, ratio: float):
    """The ``scpram`` package's own training and ``predict``, seeded through the global generators it uses."""
    import numpy as np
    import torch
    from scpram import models

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = models.SCPRAM(input_dim=train.n_vars, device=torch.device("cpu"))
    model.train_SCPRAM(train, epochs=epochs)
    model.eval()  # no dropout or batch norm in the package's network: eval() changes nothing but is explicit
    with torch.no_grad():
        return model.predict(train, holdout, KEY_DIC, ratio=ratio)


def run_perturbkit(pk, train, source, spec, *, seed: int, epochs: int, params: dict, save: Path | None):
    model = pk.models.ScPRAM(epochs=epochs, **params)
    model.fit(train, spec, seed=seed, execution=pk.execution.resolve("cpu", threads=1))
    if save is not None:
        model.save(save)
    return model.predict(source), model


def with_transfer(model, train, spec, *, seed: int, base: dict, change: dict):
    """``model`` with its transfer step (pairing and attention) redone under ``base`` + ``change`` on the same
    trained VAE: only parameters of the transfer step may change (``ratio``, ``attention``, ``ot*``)."""
    allowed = {"ratio", "attention"} | {k for k in model.params if k.startswith("ot")}
    if set(change) - allowed:
        raise SystemExit(f"--variant may change only the transfer step ({', '.join(sorted(allowed))}), "
                         f"not {sorted(set(change) - allowed)}")
    params = {**base, **change}
    type(model)(**params)  # validates
    model.params.update(params)
    cond = train.obs[spec.condition_key].astype(str).to_numpy()
    ctx = train.obs[spec.context_key].astype(str).to_numpy()
    model._fit_transfer(model.latent(train), cond, ctx, spec, seed=seed)
    return model


def parse_params(text: str) -> dict:
    """``KEY=VALUE[,KEY=VALUE...]``: JSON values, or else the text itself (``attention=first_cell``)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def scores(pk, target, pred, source, seed: int) -> dict[str, float]:
    table = pk.metrics.evaluate(target, pred, source, None, list(METRICS), n_boot=0, seed=seed)
    return dict(zip(table["metric"], table["value"].astype(float)))


def summary_rows(results: dict[str, list[dict]]) -> list[dict]:
    from perturbkit.metrics.stats import t_interval

    rows = []
    for side, per_seed in results.items():
        for metric in METRICS:
            mean, sd, lo, hi = t_interval([r[metric] for r in per_seed])
            rows.append({"side": side, "metric": metric, "mean": mean, "sd": sd, "ci_low": lo, "ci_high": hi,
                         "n": len(per_seed)})
    return rows


def markdown(results, rows, *, command: str, started: str, seconds: dict, info: dict) -> str:
    sides = list(results)
    lines = [
        "# scPRAM: the `scpram` 0.0.3 package and perturbkit side by side (Kang 2018, CD4 T cells held out)",
        "",
        f"Command: `{command}`",
        "",
        f"Run: {started}; {info['machine']}; torch threads per run: 1.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "",
        f"Data: {info['data']}. perturbkit parameters: {info['params']}.",
        "",
        "Mean over the seeds [95 % Student-t interval] (`perturbkit.metrics.stats.t_interval`); higher is "
        "better except `edistance`.",
        "",
        "| metric | " + " | ".join(sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    for metric in METRICS:
        cells = []
        for side in sides:
            r = next(r for r in rows if r["side"] == side and r["metric"] == metric)
            cells.append(f"{r['mean']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (sd {r['sd']:.3f})")
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (" + " / ".join(METRICS) + "):", "", "| seed | " + " | ".join(sides) + " |",
              "|---|" + "---|" * len(sides)]
    seeds = [r["seed"] for r in results[sides[0]]]
    for i, seed in enumerate(seeds):
        cells = [" / ".join(f"{results[s][i][m]:.3f}" for m in METRICS) for s in sides]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    if seconds:
        lines += ["", "Seconds per seed (training and prediction, scoring excluded): "
                  + "; ".join(f"{s} {', '.join(f'{t:.0f}' for t in seconds[s])}" for s in sides) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.05, help="the package's predict ratio (its default)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a perturbkit ScPRAM parameter (value parsed as JSON); repeatable")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="another perturbkit row: the same fitted VAE with its transfer step (ratio, "
                             "attention, ot*) redone under these parameters; repeatable")
    parser.add_argument("--out", default="benchmarks/results/scpram_vs_package.md")
    parser.add_argument("--csv", default=None, help="every seed's scores, written as they come")
    parser.add_argument("--save-models", default=None, metavar="DIR")
    parser.add_argument("--merge", nargs="+", default=None, metavar="CSV",
                        help="write the table from the --csv files of earlier runs (e.g. seeds split over two "
                             "processes) instead of running; give their --param and --epochs again")
    parser.add_argument("--runs", nargs="+", default=[], metavar="COMMAND",
                        help="with --merge: the commands that wrote the files, quoted in the table")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args, argv)

    import importlib.util

    if importlib.util.find_spec("scpram") is None:
        print("the scpram package is not installed; install it without its dependencies and run again:\n"
              "    .venv/bin/python -m pip install --no-deps scpram==0.0.3\n"
              "    .venv/bin/python -m pip install -c constraints.txt adjustText")
        return 2
    os.environ.setdefault("TQDM_DISABLE", "1")  # the package's per-epoch progress bar
    import torch

    torch.set_num_threads(1)
    pk = _import_perturbkit()
    import perturbkit.execution  # noqa: F401  (pk.execution)
    from perturbkit.record import platform_info, stamp, versions

    params = {}
    for item in args.param:
        params.update(parse_params(item))
    variants = {f"perturbkit {v}": parse_params(v) for v in args.variant}
    started = stamp()
    train, source, target, spec = kang_task(pk)
    print(f"Kang 2018, {HOLDOUT} held out: {train.n_obs} training cells, {source.n_obs} source, "
          f"{target.n_obs} target, {train.n_vars} genes; seeds {args.seeds}, {args.epochs} epochs", flush=True)
    results: dict[str, list[dict]] = {"scpram 0.0.3 package": [], "perturbkit": [], **{v: [] for v in variants}}
    seconds: dict[str, list[float]] = {k: [] for k in results}
    for seed in args.seeds:
        t0 = time.perf_counter()
        pred = run_package(train, HOLDOUT, seed=seed, epochs=args.epochs, ratio=args.ratio)
        seconds["scpram 0.0.3 package"].append(time.perf_counter() - t0)
        pred = pred[source.obs_names].copy()  # the source cells, in the source order
        results["scpram 0.0.3 package"].append({"seed": seed, **scores(pk, target, pred, source, seed)})
        t0 = time.perf_counter()
        save = Path(args.save_models) / f"seed{seed}" if args.save_models else None
        pred, model = run_perturbkit(pk, train, source, spec, seed=seed, epochs=args.epochs, params=params,
                                     save=save)
        seconds["perturbkit"].append(time.perf_counter() - t0)
        results["perturbkit"].append({"seed": seed, **scores(pk, target, pred, source, seed)})
        base = dict(model.params)
        for name, change in variants.items():
            t0 = time.perf_counter()
            pred = with_transfer(model, train, spec, seed=seed, base=base, change=change).predict(source)
            seconds[name].append(time.perf_counter() - t0)
            results[name].append({"seed": seed, **scores(pk, target, pred, source, seed)})
        if args.csv:
            import pandas as pd

            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame([{"side": k, **r} for k, v in results.items() for r in v]).to_csv(args.csv, index=False)
        for side in results:
            r = results[side][-1]
            print(f"seed {seed} {side:22s} " + "  ".join(f"{m} {r[m]:.4f}" for m in METRICS)
                  + f"  ({seconds[side][-1]:.0f} s)", flush=True)
    rows = summary_rows(results)
    print("\nmean [95 % t-interval] over seeds", args.seeds)
    for metric in METRICS:
        print(f"{metric:22s} " + "   ".join(
            f"{r['side']} {r['mean']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
            for r in rows if r["metric"] == metric))
    v = versions(("scpram", "pot", "torch"))
    info = {"machine": f"{platform_info()['system']}, {os.cpu_count()} CPUs",
            "versions": {k: v[k] for k in ("python", "perturbkit", "scpram", "torch", "pot", "numpy", "scanpy")
                         if k in v},
            "data": f"kang2018 through perturbkit.data.preprocess (defaults), {train.n_obs} training cells, "
                    f"{source.n_obs} source (control CD4 T), {target.n_obs} target, {train.n_vars} genes",
            "params": (", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults")
                      + f", epochs={args.epochs}; its transfer step: "
                      + ", ".join(f"{k}={base[k]!r}" for k in TRANSFER_KEYS)
                      + f"; training precision: {model.fit_info['history'].get('precision')}"
                      + (". Rows `perturbkit KEY=VALUE`: the same fitted VAE per seed, the transfer step redone "
                         "with those parameters (seconds: that transfer and prediction only)" if variants else "")}
    command = "nice -n 5 .venv/bin/python benchmarks/compare_scpram.py " + shlex.join(argv if argv is not None
                                                                                      else sys.argv[1:])
    text = markdown(results, rows, command=command.strip(), started=started, seconds=seconds, info=info)
    if args.out:
        from perturbkit._io import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0


def merge(args, argv) -> int:
    """The table of the ``--csv`` files of earlier runs (each row a side and a seed), as one run would write it."""
    import subprocess

    import pandas as pd

    pk = _import_perturbkit()
    from perturbkit.record import platform_info, stamp, versions

    frames = [pd.read_csv(f) for f in args.merge]
    df = pd.concat(frames).drop_duplicates(["side", "seed"], keep="last").sort_values("seed", kind="stable")
    sides = list(dict.fromkeys(frames[0]["side"]))
    results = {side: df[df.side == side].drop(columns="side").to_dict("records") for side in sides}
    seeds = [sorted(r["seed"] for r in v) for v in results.values()]
    if any(s != seeds[0] for s in seeds):
        raise SystemExit(f"the files do not hold the same seeds for every side: {dict(zip(sides, seeds))}")
    params = {k: v for item in args.param for k, v in parse_params(item).items()}
    base = pk.models.ScPRAM(epochs=args.epochs, **params).params
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    v = versions(("scpram", "pot", "torch"))
    info = {"machine": f"{platform_info()['system']}, {os.cpu_count()} CPUs",
            "versions": {k: v[k] for k in ("python", "perturbkit", "scpram", "torch", "pot", "numpy", "scanpy")
                         if k in v},
            "data": "kang2018 through perturbkit.data.preprocess (defaults), CD4 T cells held out",
            "params": (", ".join(f"{k}={v!r}" for k, v in params.items()) or "defaults")
                      + f", epochs={args.epochs}; its transfer step (the defaults at commit {rev}, when the "
                      "files were merged): " + ", ".join(f"{k}={base[k]!r}" for k in TRANSFER_KEYS)
                      + f", precision={base['precision']!r}"
                      + ". Rows `perturbkit KEY=VALUE`: the same fitted VAE per seed, the transfer step redone "
                        "with those parameters"}
    command = ("nice -n 5 .venv/bin/python benchmarks/compare_scpram.py "
               + shlex.join(argv if argv is not None else sys.argv[1:]))
    if args.runs:
        command += "` from the runs `" + "` and `".join(args.runs)
    text = markdown(results, summary_rows(results), command=command, started=f"merged {stamp()} from "
                    + ", ".join(args.merge), seconds=None, info=info)
    print(text)
    if args.out:
        from perturbkit._io import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
