"""Seeded synthetic data with planted effects, for tests, examples and the smoke benchmark."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from . import _keys as K


def synthetic(
    n_contexts: int = 4,
    n_cells: int = 150,
    n_genes: int = 60,
    n_responsive: int = 10,
    effect: float = 1.5,
    seed: int = 0,
) -> Any:
    """Seeded log-normal-like expression with a planted perturbation effect.

    Every context has its own baseline profile; the perturbation raises ``n_responsive`` genes by
    ``effect`` (scaled per context between 0.75x and 1.25x). Returns AnnData with obs ``condition``
    (control / stimulated), ``cell_type`` (ctx0, ...) and ``donor`` (d0, d1); X is log-scale, non-negative.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.6, size=n_genes)
    shift = np.zeros(n_genes)
    shift[:n_responsive] = effect
    return _cells(rng, base, {K.CONTROL: np.zeros(n_genes), K.PERTURBED: shift}, n_contexts, n_cells)


def _cells(rng, base: np.ndarray, shifts: dict[str, np.ndarray], n_contexts: int, n_cells: int):
    """``n_cells`` cells per (context, condition): each context its own profile around ``base``, each condition
    its ``shift`` scaled per context between 0.75x and 1.25x, Gaussian noise, clipped at 0."""
    import anndata as ad

    n_genes = len(base)
    blocks, conds, ctxs, donors = [], [], [], []
    for c in range(n_contexts):
        profile = base + rng.normal(0, 0.4, size=n_genes).clip(-0.5, None)
        scale = 0.75 + 0.5 * c / max(n_contexts - 1, 1)
        for cond, shift in shifts.items():
            mean = profile + scale * shift
            x = np.clip(mean + rng.normal(0, 0.35, size=(n_cells, n_genes)), 0, None)
            blocks.append(x.astype(np.float32))
            conds += [cond] * n_cells
            ctxs += [f"ctx{c}"] * n_cells
            donors += [f"d{i % 2}" for i in range(n_cells)]
    obs = pd.DataFrame(
        {K.CONDITION: pd.Categorical(conds), K.CONTEXT: pd.Categorical(ctxs), K.DONOR: pd.Categorical(donors)},
        index=[f"cell{i}" for i in range(len(conds))],
    )
    var = pd.DataFrame(index=[f"gene{i}" for i in range(n_genes)])
    return ad.AnnData(X=np.vstack(blocks), obs=obs, var=var)


def synthetic_screen(
    n_contexts: int = 3,
    n_cells: int = 60,
    n_genes: int = 50,
    perturbations: tuple[str, ...] = ("A", "B", "C", "D"),
    combinations: tuple[str, ...] = ("A+B", "C+D"),
    n_responsive: int = 5,
    effect: float = 1.5,
    null: tuple[str, ...] = ("D",),
    seed: int = 0,
) -> Any:
    """A seeded screen: control cells and several perturbations in every context, with planted effects.

    Perturbation ``k`` raises its own block of ``n_responsive`` genes (genes ``k * n_responsive`` onwards) by
    ``effect`` (scaled per context between 0.75x and 1.25x), except those in ``null``, which change nothing. A
    combination ``A+B`` is additive: the sum of its singles' effects. obs: ``condition`` (``control``, the
    perturbations, the combinations), ``cell_type`` (ctx0, ...), ``donor``; X is log-scale, non-negative.
    """
    if n_genes < n_responsive * len(perturbations):
        raise ValueError("n_genes must leave each perturbation its own block of n_responsive genes")
    rng = np.random.default_rng(seed)
    base = rng.gamma(2.0, 0.6, size=n_genes)
    shifts = {}
    for k, p in enumerate(perturbations):
        shift = np.zeros(n_genes)
        if p not in null:
            shift[k * n_responsive:(k + 1) * n_responsive] = effect
        shifts[p] = shift
    for combo in combinations:
        shifts[combo] = sum(shifts[p] for p in combo.split("+"))
    return _cells(rng, base, {K.CONTROL: np.zeros(n_genes), **shifts}, n_contexts, n_cells)
