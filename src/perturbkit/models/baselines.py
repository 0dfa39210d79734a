"""Honest baselines: no change, and the mean expression shift learned on the training contexts."""

from __future__ import annotations

import numpy as np

from ..data import PerturbSpec
from ._base import Model, balanced_means, dense


class Control(Model):
    """Predict the source (control) cells unchanged: the no-response baseline."""

    name = "control"
    NO_CHANGE = True

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        self.fit_info = {"description": "prediction = source cells unchanged"}

    def _predict_matrix(self, source) -> np.ndarray:
        return dense(source.X)


class MeanShift(Model):
    """Add the class-balanced mean expression difference (perturbed - control) of the training cells.

    Every context seen in both conditions weighs the same within each condition, as in scGen's latent delta;
    the shift is applied in expression space instead of latent space.
    """

    name = "mean_shift"

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        X = dense(adata.X)
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        ctrl, pert = balanced_means(X, cond, ctx, spec)
        self.shift = (pert - ctrl).astype(np.float32)
        self.fit_info = {"description": "prediction = source + balanced mean(perturbed) - mean(control)"}

    def _predict_matrix(self, source) -> np.ndarray:
        return dense(source.X) + self.shift[None, :]

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {"shift": self.shift}

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self.shift = arrays["shift"]
