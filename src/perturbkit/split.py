"""Splits return integer indices into the AnnData; callers take ``adata[idx].copy()``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .data import PerturbSpec, validate


@dataclass(frozen=True)
class Split:
    """Train / source / target cell indices of one prediction task.

    ``source`` are the control cells whose perturbed state is predicted; ``target`` are the real perturbed
    cells the prediction is scored against. ``train`` never contains a ``target`` cell.
    """

    train: np.ndarray
    source: np.ndarray
    target: np.ndarray
    name: str
    info: dict = field(default_factory=dict)

    def fingerprint(self, obs_names=None) -> str:
        """sha256 (16 hex) of the three index sets (and the cell names when given)."""
        h = hashlib.sha256()
        for part in (self.train, self.source, self.target):
            h.update(np.asarray(part, dtype=np.int64).tobytes())
            h.update(b"|")
        if obs_names is not None:
            for idx in (self.train, self.source, self.target):
                h.update("\n".join(np.asarray(obs_names)[idx]).encode())
        return h.hexdigest()[:16]

    def subsets(self, adata):
        """(train, source, target) AnnData copies."""
        return adata[self.train].copy(), adata[self.source].copy(), adata[self.target].copy()

    def to_dict(self, obs_names=None) -> dict:
        return {
            "name": self.name,
            "n_train": int(len(self.train)),
            "n_source": int(len(self.source)),
            "n_target": int(len(self.target)),
            "fingerprint": self.fingerprint(obs_names),
            **self.info,
        }


def holdout_cell_type(adata, spec: PerturbSpec, holdout: str, *, min_cells: int = 3) -> Split:
    """The scGen / scPRAM protocol: train on every cell except the perturbed cells of ``holdout``.

    source = the control cells of ``holdout``; target = its perturbed cells.
    """
    validate(adata, spec, holdout=holdout, min_cells=min_cells)
    cond = adata.obs[spec.condition_key].astype(str).to_numpy()
    ctx = adata.obs[spec.context_key].astype(str).to_numpy()
    in_ctx = ctx == holdout
    target = np.flatnonzero(in_ctx & (cond == spec.perturbed))
    source = np.flatnonzero(in_ctx & (cond == spec.control))
    keep = np.isin(cond, [spec.control, spec.perturbed]) & ~(in_ctx & (cond == spec.perturbed))
    train = np.flatnonzero(keep)
    return Split(train=train, source=source, target=target, name=f"holdout:{holdout}",
                 info={"holdout": holdout, "scenario": "holdout_cell_type"})
