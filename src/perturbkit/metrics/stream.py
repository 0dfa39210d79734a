"""Scoring a held-out context too large to hold: per-gene sums streamed over every cell, cells on a sample.

``perturbkit predict`` scores the moment metrics (the per-gene means and variances behind ``r2_mean_*``,
``pearson_delta``, ... and the cross-perturbation rows) from :class:`GeneSums` accumulated over every source,
target and predicted cell, read and predicted piece by piece, and the rest (the Wilcoxon DEGs, the PCA,
``edistance``, ``mmd``, the ceiling, the E-test, the bootstrap's resampling, the figures) on the cells of
:func:`sample_rows`: at most ``eval_cells`` source cells and ``eval_cells`` target cells of each perturbation
(``PredictConfig.eval_cells``, ``--eval-cells``; docs/ondisk.md, "Scoring a large held-out context"). A context within ``eval_cells`` is scored on all its
cells exactly as before: no sample is drawn and the moments are those of the cells.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: rows turned into float64 at a time by :meth:`GeneSums.add`
SUB_ROWS = 2048


def sample_rows(n: int, cap: int, seed: int, stream: int) -> np.ndarray | None:
    """Sorted row numbers of a seeded sample of ``cap`` of ``n`` rows, or None when ``n <= cap`` (every row).

    Drawn without replacement by ``numpy.random.default_rng(SeedSequence([seed, 20, stream]))``: the source is
    stream 0, the target cells of the ``i``-th perturbation stream ``i + 1``."""
    if n <= cap:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 20, int(stream)]))
    return np.sort(rng.choice(n, size=int(cap), replace=False))


class GeneSums:
    """Per-gene sums of the values and of their squares (float64) and the number of rows, one pass."""

    def __init__(self, n_vars: int):
        self.n = 0
        self.sum = np.zeros(n_vars, dtype=np.float64)
        self.squares = np.zeros(n_vars, dtype=np.float64)

    def add(self, X) -> None:
        """Add the rows of ``X`` (dense or sparse), ``SUB_ROWS`` of them in float64 at a time."""
        for start in range(0, X.shape[0], SUB_ROWS):
            block = X[start:start + SUB_ROWS]
            block = np.asarray(block.toarray() if sp.issparse(block) else block, dtype=np.float64)
            self.sum += block.sum(axis=0)
            self.squares += np.einsum("ij,ij->j", block, block)
            self.n += block.shape[0]

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance with ddof=0) of every row added."""
        mean = self.sum / self.n
        return mean, np.maximum(self.squares / self.n - mean * mean, 0.0)


def row_blocks(adata, size: int):
    """Yield ``(start, stop, block)`` over the rows of ``adata`` (an AnnData, or a
    :class:`perturbkit.ondisk.View` whose X is read from disk), ``size`` rows at a time."""
    X = adata.X
    for start in range(0, X.shape[0], size):
        stop = min(start + size, X.shape[0])
        yield start, stop, X.rows(start, stop) if hasattr(X, "to_memory") else X[start:stop]


def label_sums(adata, labels: np.ndarray, keys, size: int) -> dict:
    """key -> :class:`GeneSums` of the rows of ``adata`` whose ``labels`` value is that key, in one pass."""
    sums = {k: GeneSums(adata.n_vars) for k in keys}
    for start, stop, block in row_blocks(adata, size):
        part = labels[start:stop]
        for k in keys:
            rows = np.flatnonzero(part == k)
            if len(rows):
                sums[k].add(block if len(rows) == stop - start else block[rows])
    return sums
