"""scGen (Lotfollahi, Wolf & Theis, Nat Methods 2019): beta-VAE + one latent delta vector.

Defaults follow the reference implementation (theislab/scgen): 800 hidden units, 100 latent dimensions,
2 layers, dropout 0.2, batch norm, leaky ReLU, kl weight 5e-5, loss per cell
``0.5 * sum_g (x - x_hat)^2 + 0.5 * 5e-5 * KL``; Adam lr 1e-3, weight decay 1e-6, eps 0.01, batch 32, early
stopping on 10 % of the cells with patience 25.

Differences from the reference, on purpose:
- The delta is the mean perturbed latent minus the mean control latent with every cell type weighing the
  same (the expectation of scGen's random oversampling ``balancer``), computed without random draws, so the
  same seed gives the same prediction.
- The delta is averaged over the training cell types seen in both conditions (``delta_contexts="paired"``).
  The reference also puts the held-out cell type's control cells into the control mean (they have no
  perturbed partner), so its delta carries 1 / n_cell_types of that cell type's offset from the average;
  ``delta_contexts="all"`` reproduces it. On Kang CD4 T (10 epochs, seed 0, 1 torch thread) "paired" gave
  r2_mean_all 0.922 vs 0.911 and r2_mean_top100 0.938 vs 0.916 (benchmarks/results/scgen_choices.md, written
  by benchmarks/scgen_choices.py).
- Latents are posterior means (as scGen's ``get_latent_representation`` default).
- The decoder mirrors the encoder (n_layers hidden layers), then a linear output layer followed by a ReLU, as
  in the published TensorFlow model (log expression is non-negative). The scvi-tools port applies batch norm,
  leaky ReLU and dropout to the output layer instead. On Kang CD4 T (the same runs) the output ReLU raised
  r2_mean_all from 0.894 to 0.922 and r2_mean_top100 from 0.868 to 0.938 (``output_activation=None`` gives
  the linear output).
"""

from __future__ import annotations

import numpy as np

from ..data import PerturbSpec
from ._base import balanced_means
from ._vaemodel import VAEModel


class ScGen(VAEModel):
    """scGen: a beta-VAE; the prediction decodes the source latents plus one balanced latent delta."""

    name = "scgen"
    COST = 3.0
    COMBINES = True
    DEFAULTS = dict(
        n_hidden=800, n_latent=100, n_layers=2, dropout_rate=0.2, batch_norm=True, activation="leaky_relu",
        output_activation="relu", kl_weight=5e-5, recon_scale=0.5, kl_scale=0.5, input_noise=0.0,
        epochs=100, max_steps=None, batch_size=32, lr=1e-3, weight_decay=1e-6, adam_eps=1e-2,
        early_stopping=True, val_fraction=0.1, patience=25, min_delta=0.0, restore_best=True, grad_clip=None,
        precision="float32", delta_contexts="paired",
    )

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["delta_contexts"] not in ("paired", "all"):
            from ..errors import InputError

            raise InputError(f"scgen: delta_contexts={self.params['delta_contexts']!r} is not allowed; use "
                             "'paired' (cell types seen in both conditions, default) or 'all' (reference scGen).")

    def _fit_transfer(self, z, cond, ctx, spec: PerturbSpec, *, seed: int) -> None:
        self.deltas = {}
        for p in self.trained:  # one balanced delta per perturbation, over the contexts that have it
            ctrl, pert = balanced_means(z, cond, ctx, spec.for_label(p), contexts=self.params["delta_contexts"])
            self.deltas[p] = (pert - ctrl).astype(np.float32)

    def delta(self, perturbation: str) -> np.ndarray:
        """The latent delta of ``perturbation``; an unseen combination's is the sum of its singles' deltas
        (scGen's latent arithmetic)."""
        if perturbation in self.deltas:
            return self.deltas[perturbation]
        return np.sum([self.deltas[s] for s in self.spec.singles(perturbation)], axis=0, dtype=np.float32)

    def _transfer(self, z: np.ndarray, perturbation: str) -> np.ndarray:
        return z + self.delta(perturbation)[None, :]

    def _transfer_arrays(self) -> dict[str, np.ndarray]:
        return {f"delta/{p}": v for p, v in self.deltas.items()}  # earlier saves of one: "delta" (still loads)

    def _load_transfer(self, arrays: dict[str, np.ndarray]) -> None:
        if "delta" in arrays:
            self.deltas = {self.trained[0]: arrays["delta"]}
        else:
            self.deltas = {k[len("delta/"):]: v for k, v in arrays.items() if k.startswith("delta/")}
