"""Compare perturbkit's edistance, mmd and kde_mean_var with pertpy's ``pt.tl.Distance`` on random data.

Not a test and not a CI dependency: pertpy is large (jax, ott-jax, numba, ...). Run it by hand:

    python -m pip install pertpy          # in a separate environment if you like
    python benchmarks/compare_pertpy.py [--seeds 3] [--cells 300] [--genes 500]

Both sides get the same inputs: the PCA embedding perturbkit builds (``EvalData.embedding``) for
``edistance`` and ``mmd`` (pertpy's Distance takes arrays, not AnnData, when called directly), and the
expression matrices for ``kde_mean_var`` (pertpy's ``mean_var_distribution``). Prints one row per
(seed, metric) with both values and their difference; exits 1 if any relative difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _import_perturbkit():
    try:
        import perturbkit.metrics as metrics
    except ImportError:  # running from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
        import perturbkit.metrics as metrics
    return metrics


def _random_data(seed: int, n_cells: int, n_genes: int):
    import anndata as ad
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    genes = [f"g{i}" for i in range(n_genes)]
    base = rng.gamma(1.0, 1.0, n_genes)
    shift = np.where(rng.random(n_genes) < 0.1, rng.normal(0, 1.5, n_genes), 0.0)

    def cells(n, s, prefix):
        X = np.log1p(rng.poisson(base * np.exp(s), (n, n_genes))).astype(np.float32)
        return ad.AnnData(
            X=X, obs=pd.DataFrame(index=[f"{prefix}{i}" for i in range(n)]), var=pd.DataFrame(index=genes)
        )

    truth = cells(n_cells, shift, "t")
    pred = cells(int(n_cells * 0.8), 0.7 * shift + rng.normal(0, 0.2, n_genes), "p")
    source = cells(int(n_cells * 0.9), 0.0 * shift, "s")
    return truth, pred, source


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--tol", type=float, default=1e-6, help="largest accepted relative difference")
    args = parser.parse_args(argv)

    import importlib.util

    if importlib.util.find_spec("pertpy") is None:
        print(
            "pertpy is not installed, so there is nothing to compare against.\n"
            "Install it (ideally in a separate environment, it pulls in jax and more) and run again:\n"
            "    python -m pip install pertpy\n"
            "    python benchmarks/compare_pertpy.py"
        )
        return 0
    try:
        import pertpy as pt
    except ImportError as exc:  # installed but broken: say so instead of pretending it is absent
        print(
            f"pertpy is installed but fails to import: {exc}\n"
            "Known for pertpy 1.0.3: it needs `filelock` and `statsmodels<0.15` (multipletests moved):\n"
            "    python -m pip install filelock 'statsmodels<0.15'"
        )
        return 0

    import numpy as np
    import pandas as pd

    M = _import_perturbkit()
    rows = []
    for seed in range(args.seeds):
        truth, pred, source = _random_data(seed, args.cells, args.genes)
        d = M.prepare(truth, pred, source, seed=seed)
        emb = d.embedding
        pairs = [
            ("edistance", M.edistance(d), pt.tl.Distance(metric="edistance")(emb.truth, emb.pred)),
            ("mmd", M.mmd(d), pt.tl.Distance(metric="mmd")(emb.truth, emb.pred, kernel="rbf")),
            (
                "kde_mean_var",
                M.kde_mean_var(d),
                pt.tl.Distance(metric="mean_var_distribution")(d.truth_X, d.pred_X),
            ),
        ]
        for name, ours, theirs in pairs:
            theirs = float(theirs)
            rows.append(
                {
                    "seed": seed,
                    "metric": name,
                    "perturbkit": ours,
                    "pertpy": theirs,
                    "abs_diff": abs(ours - theirs),
                    "rel_diff": abs(ours - theirs) / max(abs(theirs), 1e-300),
                }
            )
    table = pd.DataFrame(rows)
    version = getattr(pt, "__version__", "?")
    print(f"perturbkit vs pertpy {version}: {args.cells} truth cells, {args.genes} genes, perturbkit's PCA")
    with pd.option_context("display.float_format", "{:.6g}".format, "display.width", 120):
        print(table.to_string(index=False))
    worst = float(np.nanmax(table.rel_diff.to_numpy()))
    print(f"largest relative difference: {worst:.3g} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
