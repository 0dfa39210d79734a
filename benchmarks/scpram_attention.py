"""Why scPRAM's per-cell attention loses pearson_delta: transfer variants and diagnostics on trained VAEs.

Every variant below keeps one trained perturbkit ScPRAM VAE (so the differences are those of the transfer step
alone) and changes how the latent delta of each query cell is built; all are decoded by the same decoder and
scored with ``perturbkit.metrics.evaluate`` (no bootstrap) against the held-out perturbed cells:

- ``cell r=R``: the published step, per-cell top-``R`` cosine attention over the OT-paired deltas (R = 0.05 is
  the package's default);
- ``first_cell r=0.05``: the package's ``predict``, the first query cell's attention for every cell;
- ``shared r=0.05``: the mean over the query cells of their per-cell deltas, added to every cell;
- ``mean delta``: mean perturbed latent minus mean control latent of the paired training contexts (scGen's
  transfer on this VAE, the simple mean-delta);
- ``within-context OT, cell r=R``: OT pairing of control and perturbed cells inside each training context
  (the model's own Sinkhorn settings), then the published attention;
- ``draws, cell r=0.05``: pairing and attention on one seeded posterior draw per cell (as the package encodes)
  instead of the posterior means.

Diagnostics of the default (per-cell attention, r = 0.05, global OT): the share of the total attention mass on
each training context, the same for ``first_cell``, the share of control cells whose OT partner is a perturbed
cell of their own context, and the spread of the per-cell deltas around their mean (``||d_q - mean d|| /
||mean d||``, averaged over the query cells).

Tasks:

- ``--task test``: Kang, CD4 T cells held out (the canonical task); ``--models DIR`` loads the models that
  ``benchmarks/compare_scpram.py --save-models DIR`` fitted (``DIR/seed<N>``), else they are trained here;
- ``--task thin``: configs/kang.toml's unbalanced ``thin`` task of ``--holdout`` (default CD14+ Monocytes): the
  two monocyte types keep 10 % of their stimulated training cells, the held-out type's target is whole. There
  the bench's scPRAM loses most (docs/bench.md): the transfer variants say whether the pairing and attention or
  the VAE lose it;
- ``--task validation``: inside the CD4 T task's *training* cells only, each of the ``--contexts`` training
  contexts with most perturbed cells (tune's rule, ``perturbkit.tune``) has its perturbed cells held out
  (``split.holdout_context``); one VAE per (context, seed) is trained on the rest. The CD4 T target is never
  seen. This is what the defaults are chosen on.

    nice -n 5 .venv/bin/python benchmarks/scpram_attention.py --task validation --seeds 0 1 --contexts 4
    nice -n 5 .venv/bin/python benchmarks/scpram_attention.py --task test --models /tmp/scpram_models

Writes a Markdown report (``--out``) with the command and the tables, and a CSV of every score (``--csv``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_scpram import HOLDOUT, _import_perturbkit, kang_task, unbalanced_tasks  # noqa: E402

METRICS = ("r2_mean_all", "r2_mean_top100", "pearson_delta")
RATIOS = (0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _pairing_within(zc, zp, ctx_c, ctx_p, params):
    """Deltas of OT pairing inside each context (``ot_within_context=True``: the model's own
    ``pair_within_contexts`` with its Sinkhorn settings), in the order of ``zc``."""
    from perturbkit.models.scpram import ot_pairing, pair_within_contexts

    def solve(a, b):
        return ot_pairing(a, b, method=params["ot"], reg=params["ot_reg"], max_iter=params["ot_max_iter"],
                          tol=params["ot_tol"], cost=params["ot_cost"])

    partner, _ = pair_within_contexts(solve, zc, zp, ctx_c, ctx_p)
    return zp[partner] - zc


def _draws(model, adata, seed: int):
    """One posterior draw per cell of ``adata`` (numpy generator seeded by ``seed``)."""
    import torch

    from perturbkit.models._train import Rows

    model.module.eval()
    mus, sds = [], []
    with torch.no_grad():
        for xb in Rows(adata.X).device_chunks(4096, model.execution):
            mu, logvar = model.module.encode(xb)
            mus.append(mu.cpu().numpy())
            sds.append(torch.exp(0.5 * logvar).cpu().numpy())
    mu, sd = np.concatenate(mus), np.concatenate(sds)
    return (mu + sd * np.random.default_rng(seed).standard_normal(mu.shape)).astype(np.float32)


def analyse(pk, model, train, source, target, spec, *, seed: int, variants: str = "all"):
    """Scores of every transfer variant on ``model``'s VAE and the diagnostics of the default."""
    from perturbkit.models.scpram import attention_weights, ot_pairing, own_context_shares

    p = model.params
    cond = train.obs[spec.condition_key].astype(str).to_numpy()
    ctx = train.obs[spec.context_key].astype(str).to_numpy()
    zc, delta, ctx_c = model.pairing()
    contexts = np.unique(ctx_c)
    pert = (cond == spec.perturbed) & np.isin(ctx, contexts)
    z_train = model.latent(train)
    zp, ctx_p = z_train[pert], ctx[pert]
    zq = model.latent(source)

    def scored(name, zpred):
        import anndata as ad

        pred = ad.AnnData(X=model.decode(zpred), obs=source.obs.copy(), var=source.var.copy())
        table = pk.metrics.evaluate(target, pred, source, None, list(METRICS), n_boot=0, seed=seed)
        return {"variant": name, **dict(zip(table["metric"], table["value"].astype(float)))}

    rows = []
    W = attention_weights(zq, zc, p["ratio"])
    d_cell = W @ delta
    for r in RATIOS:
        Wr = W if r == p["ratio"] else attention_weights(zq, zc, r)
        rows.append(scored(f"cell r={r:g}", zq + Wr @ delta))
    W1 = attention_weights(zq, zc, 0.05, mode="first_cell")
    rows.append(scored("first_cell r=0.05", zq + W1 @ delta))
    rows.append(scored("shared r=0.05", zq + d_cell.mean(axis=0)))
    rows.append(scored("mean delta", zq + (zp.mean(axis=0) - zc.mean(axis=0))))
    within = _pairing_within(zc, zp, ctx_c, ctx_p, p)
    for r in (0.02, 0.05, 0.2, 1.0):
        rows.append(scored(f"within-context OT, cell r={r:g}", zq + attention_weights(zq, zc, r) @ within))
    rows.append(scored("within-context OT, shared r=0.05",
                       zq + (attention_weights(zq, zc, 0.05) @ within).mean(axis=0)))
    if variants == "all":
        keep = (cond == spec.control) & np.isin(ctx, contexts)
        zt = _draws(model, train, seed * 2 + 11)
        zc_s, zp_s = zt[keep], zt[pert]
        partner_s, _ = ot_pairing(zc_s, zp_s, method=p["ot"], reg=p["ot_reg"], max_iter=p["ot_max_iter"],
                                  tol=p["ot_tol"], cost=p["ot_cost"])
        zq_s = _draws(model, source, seed * 2 + 12)
        rows.append(scored("draws, cell r=0.05", zq_s + attention_weights(zq_s, zc_s, 0.05) @ (zp_s[partner_s] - zc_s)))

    # diagnostics of the default transfer
    partner, _ = ot_pairing(zc, zp, method=p["ot"], reg=p["ot_reg"], max_iter=p["ot_max_iter"], tol=p["ot_tol"],
                            cost=p["ot_cost"])
    own = own_context_shares(partner, ctx_c, ctx_p)  # the model's own record of it (fit.ot.partner_own_context)
    mass = np.asarray(W.sum(axis=0)).ravel() / W.shape[0]
    mass1 = np.asarray(W1[:1].sum(axis=0)).ravel()
    mean_d = d_cell.mean(axis=0)
    diag = {
        "attention_mass": {c: float(mass[ctx_c == c].sum()) for c in contexts},
        "first_cell_mass": {c: float(mass1[ctx_c == c].sum()) for c in contexts},
        "key_share": {c: float((ctx_c == c).mean()) for c in contexts},
        "partner_same_context": float((ctx_p[partner] == ctx_c).mean()),
        "partner_same_context_by_context": {c: own[c] for c in contexts},
        "delta_spread": float(np.mean(np.linalg.norm(d_cell - mean_d, axis=1)) / np.linalg.norm(mean_d)),
        "delta_spread_within": float(np.mean(np.linalg.norm((W @ within) - (W @ within).mean(0), axis=1))
                                     / np.linalg.norm((W @ within).mean(0))),
        "cos_shared_vs_mean_delta": float(_cos(mean_d, zp.mean(0) - zc.mean(0))),
        "cos_within_shared_vs_mean_delta": float(_cos((W @ within).mean(0), zp.mean(0) - zc.mean(0))),
    }
    return rows, diag


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def validation_contexts(train, spec, n: int) -> list[str]:
    """The ``n`` training contexts with most perturbed cells (tune's default rule), ties by name."""
    cond = train.obs[spec.condition_key].astype(str)
    counts = train.obs.loc[cond == spec.perturbed, spec.context_key].astype(str).value_counts()
    return sorted(counts.index, key=lambda c: (-counts[c], c))[:n]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("test", "validation", "thin"), default="validation")
    parser.add_argument("--holdout", default="CD14+ Monocytes", help="thin task: the held-out cell type")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--contexts", type=int, default=4, help="validation contexts (most perturbed cells)")
    parser.add_argument("--models", default=None, help="test task: DIR/seed<N> saved by compare_scpram.py")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a ScPRAM parameter of the models trained here (JSON value); repeatable")
    parser.add_argument("--out", default=None)
    parser.add_argument("--csv", default=None, help="every score, written after each (task, seed); the "
                        "diagnostics go next to it as .json")
    parser.add_argument("--note", default="", help="a line for the top of the report")
    parser.add_argument("--from-csv", default=None, metavar="CSV",
                        help="write the report of an earlier (or stopped) run from its --csv file and exit")
    args = parser.parse_args(argv)
    if args.from_csv:
        import pandas as pd

        diag_path = Path(args.from_csv).with_suffix(".json")
        diags = json.loads(diag_path.read_text()) if diag_path.exists() else []
        text = report(pd.read_csv(args.from_csv), diags, args, f"from {args.from_csv}")
        print(text)
        if args.out:
            from perturbkit._io import atomic_write_text

            atomic_write_text(args.out, text)
        return 0

    import torch

    torch.set_num_threads(1)
    pk = _import_perturbkit()
    import pandas as pd

    import perturbkit.execution  # noqa: F401  (pk.execution)
    from perturbkit.record import stamp

    from compare_scpram import parse_params

    params = {k: v for item in args.param for k, v in parse_params(item).items()}
    started = stamp()
    train0, source0, target0, spec = kang_task(pk)
    ex = pk.execution.resolve("cpu", threads=1)
    if args.task == "test":
        tasks = [(HOLDOUT, train0, source0, target0)]
    elif args.task == "thin":
        tasks = [t[1:5] for t in unbalanced_tasks(pk, args.holdout, ["thin"])]
    else:
        import warnings

        tasks = []
        for c in validation_contexts(train0, spec, args.contexts):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # CD4 T has control cells only here, by construction
                tr, so, ta = pk.split.holdout_context(train0, spec, c).subsets(train0)
            tasks.append((c, tr, so, ta))
    all_rows, diags = [], []
    for seed, (name, train, source, target) in ((s, t) for s in args.seeds for t in tasks):
        t0 = time.perf_counter()
        saved = Path(args.models) / f"seed{seed}" if args.models and args.task == "test" else None
        if saved is not None and saved.exists():
            model = pk.models.Model.load(saved)
            model.use(ex)
        else:
            model = pk.models.ScPRAM(epochs=args.epochs, **params).fit(train, spec, seed=seed, execution=ex)
        rows, diag = analyse(pk, model, train, source, target, spec, seed=seed)
        for r in rows:
            r.update(task=name, seed=seed)
        all_rows += rows
        diags.append({"task": name, "seed": seed, **diag})
        best = max(rows, key=lambda r: r["pearson_delta"])
        print(f"{name} seed {seed} ({time.perf_counter() - t0:.0f} s): default "
              f"{rows[RATIOS.index(0.05)]['pearson_delta']:.4f}, best {best['variant']} "
              f"{best['pearson_delta']:.4f}; partner same context {diag['partner_same_context']:.3f}",
              flush=True)
        if args.csv:  # every (task, seed) as it comes, so that a stopped run keeps what it measured
            Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(all_rows).to_csv(args.csv, index=False)
            Path(args.csv).with_suffix(".json").write_text(json.dumps(diags, indent=1))
    df = pd.DataFrame(all_rows)
    text = report(df, diags, args, started)
    print(text)
    if args.out:
        from perturbkit._io import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)
    return 0


def report(df, diags, args, started) -> str:
    import pandas as pd

    command = "nice -n 5 .venv/bin/python benchmarks/scpram_attention.py " + shlex.join(
        [a for a in sys.argv[1:]])
    order = list(dict.fromkeys(df["variant"]))
    lines = [f"Command: `{command.strip()}` ({started}; {args.epochs} epochs, 1 torch thread).", ""]
    if "task" in df and df["task"].nunique() == 1 and "seed" in df:
        lines[-1:] = ["", f"Task {df['task'].iloc[0]}, seeds {sorted(df['seed'].unique().tolist())}.", ""]
    base = df[df.variant == "cell r=0.05"].set_index(["task", "seed"])
    if args.note:
        lines += [args.note, ""]
    lines += ["Mean over tasks and seeds; `d METRIC` is the mean paired difference to `cell r=0.05` (the "
              "default) on the same VAE; `higher`: the (task, seed) pairs where the variant's pearson_delta is "
              "higher.", "", "| variant | " + " | ".join(METRICS) + " | d r2_mean_all | d r2_mean_top100 | "
              "d pearson_delta | higher |", "|---|" + "---|" * (len(METRICS) + 4)]
    for v in order:
        sub = df[df.variant == v].set_index(["task", "seed"])
        d = {m: (sub[m] - base[m]).dropna() for m in METRICS}
        lines.append(f"| {v} | " + " | ".join(f"{sub[m].mean():.3f}" for m in METRICS) + " | "
                     + " | ".join(f"{d[m].mean():+.4f}" for m in METRICS)
                     + f" | {(d['pearson_delta'] > 1e-12).sum()}/{len(d['pearson_delta'])} |")
    if df["task"].nunique() > 1:
        lines += ["", "pearson_delta per task (mean over seeds):", "",
                  "| variant | " + " | ".join(df["task"].unique()) + " |",
                  "|---|" + "---|" * df["task"].nunique()]
        for v in order:
            sub = df[df.variant == v].groupby("task", sort=False)["pearson_delta"].mean()
            lines.append(f"| {v} | " + " | ".join(f"{sub[t]:.3f}" for t in df["task"].unique()) + " |")
    if not diags:
        return "\n".join(lines + ["", "(no diagnostics recorded for this run)"]) + "\n"
    d = pd.DataFrame(diags)
    lines += ["", "Diagnostics of the default (global Sinkhorn OT, per-cell attention, r = 0.05), mean over "
              "seeds:", ""]
    for task, g in d.groupby("task", sort=False):
        contexts = list(g.iloc[0]["key_share"])
        lines += [f"{task}:", "", "| training context | share of keys | attention mass (cell) | "
                  "attention mass (first_cell) | OT partner in own context |", "|---|---|---|---|---|"]
        for c in contexts:
            lines.append(f"| {c} | {np.mean([x[c] for x in g.key_share]):.3f} | "
                         f"{np.mean([x[c] for x in g.attention_mass]):.3f} | "
                         f"{np.mean([x[c] for x in g.first_cell_mass]):.3f} | "
                         f"{np.mean([x[c] for x in g.partner_same_context_by_context]):.3f} |")
        lines += ["", f"OT partner in own context, all control cells: {g.partner_same_context.mean():.3f}; "
                  f"per-cell delta spread ||d_q - mean d|| / ||mean d||: {g.delta_spread.mean():.3f} (global OT), "
                  f"{g.delta_spread_within.mean():.3f} (within-context OT); cosine of the mean per-cell delta "
                  f"with the mean delta: {g.cos_shared_vs_mean_delta.mean():.3f} (global OT), "
                  f"{g.cos_within_shared_vs_mean_delta.mean():.3f} (within-context OT).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
