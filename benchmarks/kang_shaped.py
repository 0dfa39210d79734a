"""Write a Kang-shaped data set larger than memory likes: every cell of the bundled Kang 2018 data ``--copies``
times, its counts binomially thinned (each count kept with probability ``--keep``, seeded per copy), as the
issue #20 measurements describe (15 copies: 203,640 cells x 14,053 genes).

The file is written chunk by chunk with :func:`perturbkit.ondisk.write_h5ad_chunks` (CSR, never dense, one
chunk of the bundled matrix in memory at a time); obs is the harmonised obs of ``pk.data.load("kang2018")``
(``condition``, ``cell_type`` = the authors' labels, ``donor``, ...) with the copy number appended to each cell
name. Usage::

    .venv/bin/python benchmarks/kang_shaped.py --copies 15 --out /tmp/kang15.h5ad
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import scipy.sparse as sp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=15)
    ap.add_argument("--keep", type=float, default=0.8, help="probability that a count is kept (default 0.8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=5000, help="rows per written block (default 5000)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import perturbkit as pk
    from perturbkit.ondisk import write_h5ad_chunks

    t = time.perf_counter()
    kang = pk.data.load("kang2018")
    X = sp.csr_matrix(kang.X)
    obs = pd.concat([kang.obs.set_axis([f"{name}-{c}" for name in kang.obs_names]) for c in range(args.copies)])
    for col in obs.columns:
        if isinstance(kang.obs[col].dtype, pd.CategoricalDtype):
            obs[col] = pd.Categorical(obs[col], categories=kang.obs[col].cat.categories)

    def blocks():
        for c in range(args.copies):
            rng = np.random.default_rng([args.seed, c])
            for start in range(0, X.shape[0], args.chunk):
                block = X[start:start + args.chunk].copy()
                block.data = rng.binomial(block.data.astype(np.int64), args.keep).astype(np.float32)
                block.eliminate_zeros()
                yield block

    write_h5ad_chunks(args.out, obs, kang.var[[]], blocks())
    print(f"wrote {args.out}: {len(obs)} cells x {kang.n_vars} genes in {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
