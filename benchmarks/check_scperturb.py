"""Check perturbkit's E-test (``perturbkit.metrics.effect_test``) against scPerturb's ``etest``: both statistics
and p-values per group, and the largest differences.

scPerturb (sanderlab, ``pip install scperturb``; the ``test`` extra installs it) tests each perturbation's cells
against the control cells in an embedding (``obsm["X_pca"]``) with the energy distance of squared Euclidean
distances (``sample_correct=True``) and ``runs`` label permutations. This script draws three groups of cells in a
given 10-dimensional space (no PCA on either side: perturbkit's ``n_pcs=None``), a strong, a weak and no shift
from the control cells, and runs both tests on them with 1000 permutations:

- the statistic must agree to rounding (relative difference <= ``--tol``);
- the p-values come from different permutation streams (scPerturb draws with numpy's global generator, seeded
  here), so they agree only up to the permutation noise, about ``sqrt(p (1 - p) / runs)`` each: the script
  prints both and their difference, and fails if one differs by more than 4 such standard deviations of the
  difference (or, for p at the floor ``1 / runs``, if one is not at the floor).

Also: the share of ``--null`` tests of two groups drawn from one distribution that perturbkit calls significant
at 0.05 (the test's size; it should be near 0.05).

Run::

    .venv/bin/python benchmarks/check_scperturb.py [--seed 0] [--null 300] [--tol 1e-9]

tests/test_references.py runs it.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

RUNS = 1000
SHIFTS = {"strong": 1.0, "weak": 0.3, "none": 0.0}


def _import_perturbkit():
    try:
        import perturbkit.metrics as metrics
    except ImportError:  # running from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import perturbkit.metrics as metrics
    return metrics


def groups(seed: int, n_control: int = 200, n_group: int = 100, dims: int = 10):
    """(control cells, {group: cells}) in a ``dims``-dimensional space, each group shifted along one axis."""
    import numpy as np

    rng = np.random.default_rng(seed)
    control = rng.normal(0, 1, (n_control, dims))
    out = {}
    for name, shift in SHIFTS.items():
        x = rng.normal(0, 1, (n_group, dims))
        x[:, 0] += shift
        out[name] = x
    return control, out


def scperturb_etest(control, cells: dict, seed: int):
    """scPerturb's table (``edist``, ``pvalue``) for the groups against the control cells."""
    import anndata as ad
    import numpy as np
    import pandas as pd
    from scperturb import etest

    X = np.vstack([control, *cells.values()])
    labels = ["control"] * len(control) + [g for g, x in cells.items() for _ in range(len(x))]
    adata = ad.AnnData(np.zeros((len(X), 1)), obs=pd.DataFrame({"perturbation": labels},
                                                               index=[str(i) for i in range(len(X))]))
    adata.obsm["X_pca"] = X
    np.random.seed(seed)  # scPerturb permutes with numpy's global generator; n_jobs=1 keeps it in this process
    with warnings.catch_warnings():  # its Holm-Sidak step takes log1p(-1) of the control group's p = 1
        warnings.simplefilter("ignore", RuntimeWarning)
        return etest(adata, obs_key="perturbation", obsm_key="X_pca", dist="sqeuclidean", control="control",
                     runs=RUNS, sample_correct=True, n_jobs=1, verbose=False)


def compare(seed: int = 0):
    """Rows ``group, statistic_perturbkit, statistic_scperturb, rel_diff, p_perturbkit, p_scperturb, p_diff,
    p_allowed``."""
    import pandas as pd

    metrics = _import_perturbkit()
    control, cells = groups(seed)
    theirs = scperturb_etest(control, cells, seed)
    rows = []
    for name, x in cells.items():
        ours = metrics.effect_test(x, control, n_perm=RUNS, n_pcs=None, seed=seed)
        stat = float(theirs.loc[name, "edist"])
        p_theirs = float(theirs.loc[name, "pvalue"])
        p_mid = (ours.p_value + p_theirs) / 2
        rows.append({"group": name, "shift": SHIFTS[name], "statistic_perturbkit": ours.statistic,
                     "statistic_scperturb": stat, "rel_diff": abs(ours.statistic - stat) / abs(stat),
                     "p_perturbkit": ours.p_value, "p_scperturb": p_theirs,
                     "p_diff": abs(ours.p_value - p_theirs),
                     "p_allowed": 4 * math.sqrt(2 * p_mid * (1 - p_mid) / RUNS)})
    return pd.DataFrame(rows)


def null_size(n_tests: int, seed: int, alpha: float = 0.05) -> float:
    """The share of perturbkit's E-tests of two samples of one distribution with p < alpha."""
    import numpy as np

    metrics = _import_perturbkit()
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n_tests):
        a, b = rng.normal(0, 1, (60, 10)), rng.normal(0, 1, (80, 10))
        hits += metrics.effect_test(a, b, n_perm=200, n_pcs=None, seed=seed + i).p_value < alpha
    return hits / n_tests


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="seed of the cells and the permutations (default 0)")
    p.add_argument("--null", type=int, default=300, help="null tests for the size check (default 300; 0: none)")
    p.add_argument("--tol", type=float, default=1e-9, help="largest relative difference of the statistics")
    args = p.parse_args(argv)
    import importlib.metadata as md

    table = compare(args.seed)
    print(f"scperturb {md.version('scperturb')} vs perturbkit {md.version('perturbkit')}: E-test of three groups "
          f"(100 cells, 10 dimensions, shift of axis 0) against 200 control cells, {RUNS} permutations, "
          f"seed {args.seed}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.6g}"))
    worst = float(table.rel_diff.max())
    floor = 1 / RUNS
    p_ok = all((r.p_perturbkit == floor) == (r.p_scperturb == floor) if floor in (r.p_perturbkit, r.p_scperturb)
               else r.p_diff <= r.p_allowed for r in table.itertuples())
    print(f"max relative difference of the statistics: {worst:.3g} (tolerance {args.tol:g}); max p-value "
          f"difference: {table.p_diff.max():.3g} ({'within' if p_ok else 'beyond'} the permutation noise)")
    if args.null:
        size = null_size(args.null, args.seed)
        print(f"perturbkit under the null: {size:.1%} of {args.null} tests had p < 0.05 (200 permutations each)")
    return 0 if worst <= args.tol and p_ok else 1


if __name__ == "__main__":
    sys.exit(main())
