"""Honest baselines: no change, the mean expression shift learned on the training contexts, and the additive
baseline for combinations (the sum of the singles' shifts)."""

from __future__ import annotations

import numpy as np

from ..data import PerturbSpec
from ._base import Model, balanced_means, dense


class Control(Model):
    """Predict the source (control) cells unchanged: the no-response baseline."""

    name = "control"
    NO_CHANGE = True
    COMBINES = True  # nothing to combine: every perturbation is predicted as no change

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        self.fit_info = {"description": "prediction = source cells unchanged"}

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        return dense(source.X)


class MeanShift(Model):
    """Add the class-balanced mean expression difference (perturbed - control) of the training cells.

    One shift per perturbation: within each condition every context seen with both the control and that
    perturbation weighs the same, as in scGen's latent delta; the shift is applied in expression space instead
    of latent space.
    """

    name = "mean_shift"

    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool) -> None:
        X = dense(adata.X)
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        self.shifts = {}
        for p in self.trained:
            ctrl, pert = balanced_means(X, cond, ctx, spec.for_label(p))
            self.shifts[p] = (pert - ctrl).astype(np.float32)
        self.fit_info = {"description": self.DESCRIPTION}

    DESCRIPTION = "prediction = source + balanced mean(perturbed) - mean(control)"

    def shift(self, perturbation: str) -> np.ndarray:
        """The expression shift added to the source cells for ``perturbation``."""
        return self.shifts[perturbation]

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        return dense(source.X) + self.shift(perturbation)[None, :]

    def _state_arrays(self) -> dict[str, np.ndarray]:
        return {f"shift/{p}": v for p, v in self.shifts.items()}  # earlier saves of one: "shift" (still loads)

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        if "shift" in arrays:
            self.shifts = {self.trained[0]: arrays["shift"]}
        else:
            self.shifts = {k[len("shift/"):]: v for k, v in arrays.items() if k.startswith("shift/")}


class Additive(MeanShift):
    """The additive baseline: a combination ``A+B`` is the source plus the sum of its singles' mean shifts.

    A single perturbation gets its own mean shift (as :class:`MeanShift`); a combination always gets the sum of
    its singles' shifts, even when the combination itself was in the training data.
    """

    name = "additive"
    COMBINES = True
    DESCRIPTION = "prediction = source + sum of the singles' balanced mean shifts (combinations)"

    def can_predict(self, perturbation: str) -> bool:
        if self.spec.is_combination(perturbation):  # always from its singles, so they must have been learned
            return all(s in self.trained for s in self.spec.singles(perturbation))
        return perturbation in self.trained

    def shift(self, perturbation: str) -> np.ndarray:
        if self.spec.is_combination(perturbation):
            return np.sum([self.shifts[s] for s in self.spec.singles(perturbation)], axis=0, dtype=np.float32)
        return self.shifts[perturbation]
