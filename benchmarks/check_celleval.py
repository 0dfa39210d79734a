"""Check perturbkit's metrics against cell-eval's on random screens: both values per metric and the largest
difference.

cell-eval (ArcInstitute, ``pip install cell-eval``; the ``test`` extra installs it) scores a screen given as
two AnnData, the real and the predicted cells, each with the control cells and a perturbation column. This
script builds random screens (2 to 29 perturbations, 5 to 200 genes, some perturbations named after a gene so
that the target-gene rule acts, predictions = the real effect plus noise, from small to large enough to confuse the
perturbations), hands the same cells to both packages and compares per perturbation:

- ``discrimination_score`` (``l1``, ``l2``, ``cosine``; target gene left out, cell-eval's default):
  ``cell_eval.metrics.discrimination_score`` vs ``perturbkit.metrics.discrimination_score``;
- ``pearson_delta``: cell-eval's ``pearson_delta`` vs perturbkit's (the change of the means from the control
  cells);
- ``mse_mean`` / ``mae_mean``: cell-eval's ``mse`` / ``mae`` of the pseudobulk means vs perturbkit's.

Run::

    .venv/bin/python benchmarks/check_celleval.py [--cases 300] [--seed 0] [--tol 1e-9]

Prints one row per metric: how many values were compared (one per perturbation and screen), each package's
mean of them and the largest absolute difference between the two; exits 1 if a difference
exceeds ``--tol`` (discrimination scores are ranks: they must agree exactly). Exact ties of distances are left
out: cell-eval orders them with numpy's unstable sort, so its answer there depends on the platform
(docs/metrics.md). tests/test_references.py runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

CONTROL = "control"
KEY = "perturbation"
DISTANCES = ("l1", "l2", "cosine")


def _import_perturbkit():
    try:
        import perturbkit.metrics as metrics
    except ImportError:  # running from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import perturbkit.metrics as metrics
    return metrics


def random_case(rng):
    """(real AnnData, predicted AnnData) of one random screen; both hold the same control cells."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    n_pert, n_genes = int(rng.integers(2, 30)), int(rng.integers(5, 201))
    genes = [f"G{i}" for i in range(n_genes)]
    named = rng.random(n_pert) < 0.5  # about half the perturbations are named after a gene (a knock-down)
    gene_names = rng.choice(genes, size=n_pert, replace=False) if n_pert <= n_genes else genes[:n_pert]
    labels = [str(g) if k else f"drug{i}" for i, (g, k) in enumerate(zip(gene_names, named))]
    labels = list(dict.fromkeys(labels))
    base = rng.gamma(2.0, 0.6, n_genes)
    effects = {p: rng.normal(0, 0.8, n_genes) * (rng.random(n_genes) < 0.3) for p in labels}

    def cells(shift, n):
        return np.clip(base + shift + rng.normal(0, 0.3, (n, n_genes)), 0, None)

    n_ctrl = int(rng.integers(10, 40))
    ctrl = cells(0.0, n_ctrl)
    real = [ctrl] + [cells(effects[p], int(rng.integers(5, 30))) for p in labels]
    noise = rng.uniform(0.2, 3.0)  # from near-perfect predictions to ones that confuse the perturbations
    pred = [ctrl] + [cells(effects[p] + rng.normal(0, noise, n_genes), int(rng.integers(5, 30)))
                     for p in labels]

    def adata(blocks):
        obs = pd.DataFrame({KEY: np.repeat([CONTROL, *labels], [len(b) for b in blocks])})
        obs.index = obs.index.astype(str)
        return ad.AnnData(np.vstack(blocks), obs=obs, var=pd.DataFrame(index=genes))

    return adata(real), adata(pred), labels


def perturbkit_values(real, pred, labels, metrics) -> dict[str, dict[str, float]]:
    """metric -> {perturbation: value} from perturbkit."""
    import numpy as np

    perts = sorted(labels)  # cell-eval's order (np.union1d)
    lab_r, lab_p = real.obs[KEY].to_numpy(str), pred.obs[KEY].to_numpy(str)
    source = real[lab_r == CONTROL].copy()
    out: dict[str, dict[str, float]] = {}
    truth_means = np.vstack([real.X[lab_r == p].mean(0) for p in perts])
    pred_means = np.vstack([pred.X[lab_p == p].mean(0) for p in perts])
    control = real.X[lab_r == CONTROL].mean(0)
    pred_control = pred.X[lab_p == CONTROL].mean(0)
    for dist in DISTANCES:
        scores = metrics.discrimination_score(truth_means, pred_means, control, pred_control_mean=pred_control,
                                              labels=perts, var_names=real.var_names, metric=dist)
        out[f"discrimination_score_{dist}"] = dict(zip(perts, scores.tolist()))
    names = ("pearson_delta", "mse_mean", "mae_mean")
    for name in names:
        out[name] = {}
    for p in perts:  # (with fewer than 100 genes the top-100 DEGs are every gene: a warning we do not need)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            table = metrics.evaluate(real[lab_r == p].copy(), pred[lab_p == p].copy(), source,
                                     metrics=list(names), n_boot=0)
        for _, row in table.iterrows():
            out[row.metric][p] = float(row.value)
    return out


def celleval_values(real, pred) -> dict[str, dict[str, float]]:
    """metric -> {perturbation: value} from cell-eval."""
    from cell_eval._types import PerturbationAnndataPair
    from cell_eval.metrics import _anndata as ce

    pair = PerturbationAnndataPair(real=real, pred=pred, pert_col=KEY, control_pert=CONTROL)
    out = {f"discrimination_score_{d}": ce.discrimination_score(pair, metric=d) for d in DISTANCES}
    out["pearson_delta"] = ce.pearson_delta(pair)
    out["mse_mean"] = ce.mse(pair)
    out["mae_mean"] = ce.mae(pair)
    return {name: {str(k): float(getattr(v, "statistic", v)) for k, v in vals.items()} for name, vals in out.items()}


@contextlib.contextmanager
def _no_bars():
    """cell-eval draws a progress bar per metric and screen. tqdm reads TQDM_DISABLE once, when it is first
    imported, so this quiets them where tqdm is not loaded yet (the script); the caller's environment is restored
    afterwards either way: a process started later (a test's child) must not inherit it."""
    old = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TQDM_DISABLE"]
        else:
            os.environ["TQDM_DISABLE"] = old


def compare(cases: int = 300, seed: int = 0):
    """Rows ``metric, n_values, perturbkit_mean, cell_eval_mean, max_abs_diff``: over every perturbation of every
    case, each package's mean value and the largest absolute difference between the two."""
    import numpy as np
    import pandas as pd

    metrics = _import_perturbkit()
    rng = np.random.default_rng(seed)
    diffs: dict[str, list[float]] = {}
    sums: dict[str, np.ndarray] = {}
    for _ in range(cases):
        real, pred, labels = random_case(rng)
        with _no_bars():
            theirs = celleval_values(real, pred)
        ours = perturbkit_values(real, pred, labels, metrics)
        for name, values in ours.items():
            if set(values) != set(theirs[name]):
                raise AssertionError(f"{name}: perturbations differ: {sorted(values)} vs {sorted(theirs[name])}")
            a = np.array([values[p] for p in sorted(values)])
            b = np.array([theirs[name][p] for p in sorted(values)])
            diffs.setdefault(name, []).extend(np.abs(a - b).tolist())
            sums[name] = sums.get(name, np.zeros(2)) + [a.sum(), b.sum()]
    return pd.DataFrame([{"metric": n, "n_values": len(d), "perturbkit_mean": sums[n][0] / len(d),
                          "cell_eval_mean": sums[n][1] / len(d), "max_abs_diff": max(d)}
                         for n, d in diffs.items()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=300, help="random screens (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random screens (default 0)")
    p.add_argument("--tol", type=float, default=1e-9, help="largest absolute difference allowed (default 1e-9)")
    args = p.parse_args(argv)
    import importlib.metadata as md

    table = compare(args.cases, args.seed)
    print(f"cell-eval {md.version('cell-eval')} vs perturbkit {md.version('perturbkit')}: {args.cases} random "
          f"screens, seed {args.seed}; per metric the values compared (one per perturbation and screen), each "
          "package's mean of them and their largest absolute difference")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    worst = float(table.max_abs_diff.max())
    print(f"max abs difference over all metrics: {worst:.3g} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
