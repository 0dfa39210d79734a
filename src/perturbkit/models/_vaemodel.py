"""The user class shared by scGen and scPRAM: a thin wrapper over one :class:`VAE` module.

Subclasses differ only in the latent transfer step: ``_fit_transfer`` learns it from the training latents,
``_transfer`` turns the source latents into predicted perturbed latents.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..data import PerturbSpec
from ._base import Model

VAE_KEYS = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "batch_norm", "activation", "output_activation",
            "kl_weight", "recon_scale", "kl_scale", "input_noise")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "adam_eps", "val_fraction", "patience", "min_delta",
              "restore_best", "grad_clip", "precision", "max_steps")


PRECISIONS = ("float32", "bfloat16", "auto")  # as models._train.PRECISIONS (kept here: no torch import)


class VAEModel(Model):
    """A VAE with a latent transfer step (the base of scGen and scPRAM)."""

    needs_torch = True
    DEFAULTS: dict[str, Any] = {}
    #: the tutorial's knobs shared by the VAE models (a model may replace or extend them)
    SEARCH_SPACE = {
        "n_layers": {"type": "int", "low": 1, "high": 3},
        "n_latent": {"type": "categorical", "choices": [10, 25, 50, 100]},
        "n_hidden": {"type": "categorical", "choices": [128, 256, 512, 800]},
        "dropout_rate": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.05},
        "input_noise": {"type": "float", "low": 0.0, "high": 0.3, "step": 0.05},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "kl_weight": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        "batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
        "epochs": {"type": "int", "low": 10, "high": 100, "step": 10},
    }

    def __init__(self, **params: Any):
        unknown = set(params) - set(self.DEFAULTS)
        if unknown:
            from ..errors import InputError, suggest

            bad = sorted(unknown)[0]
            raise InputError(
                f"{self.name}: unknown parameter {bad!r}.{suggest(bad, self.DEFAULTS)} "
                f"Known: {', '.join(sorted(self.DEFAULTS))}."
            )
        super().__init__(**{**self.DEFAULTS, **params})
        if self.params.get("precision", "float32") not in PRECISIONS:
            from ..errors import InputError

            raise InputError(f"{self.name}: precision={self.params['precision']!r} is not allowed; use one of "
                             f"{', '.join(map(repr, PRECISIONS))} (auto: bfloat16 on CPUs with native bfloat16).")
        self.module = None
        self.history = None

    # ------------------------------------------------------------------------------------------- config
    def _vae_config(self, n_input: int):
        from ._vae import VAEConfig

        return VAEConfig(n_input=n_input, **{k: self.params[k] for k in VAE_KEYS if k in self.params})

    def _train_config(self):
        from ._train import TrainConfig

        kwargs = {k: self.params[k] for k in TRAIN_KEYS if k in self.params}  # absent: TrainConfig's default
        if not self.params.get("early_stopping", True):  # every training cell, all epochs, the last weights
            kwargs.update(val_fraction=0.0, patience=None, restore_best=False)
        return TrainConfig(**kwargs)

    # ---------------------------------------------------------------------------------------------- fit
    def _fit(self, adata, spec: PerturbSpec, *, seed: int, progress: bool, callback=None) -> None:
        import torch

        from ._train import Rows, train_vae

        X = Rows(adata.X)  # sparse stays sparse: batches are densified one at a time
        cond = adata.obs[spec.condition_key].astype(str).to_numpy()
        ctx = adata.obs[spec.context_key].astype(str).to_numpy()
        self.module = self._new_module(X.shape[1], seed)
        hook = None
        if callback is not None:
            def hook(epoch, history):  # predict() inside the callback first refits the transfer at these weights
                self.history = history
                self._pending_transfer = lambda: self._fit_transfer(self._encode(X), cond, ctx, spec, seed=seed)
                try:
                    return callback(epoch, history)
                finally:
                    self._pending_transfer = None
        self.history = train_vae(self.module, X, self._train_config(), seed=seed, progress=progress,
                                 desc=f"{self.name} training", callback=hook, execution=self.execution)
        z = self._encode(X)
        self._fit_transfer(z, cond, ctx, spec, seed=seed)
        self.fit_info = {"history": self.history.to_dict(), "seed": seed, "steps": self.history.steps,
                         "torch_threads": torch.get_num_threads(), "latent": "posterior mean",
                         **self._device_info(), "warnings": training_warnings(self.name, self.history)}

    def _new_module(self, n_input: int, seed: int):
        """A fresh VAE initialised from ``seed`` (inside ``execution.seeded``: the same weights on every device),
        on the execution's device."""
        from ._vae import VAE

        with self.execution.seeded(seed):
            module = VAE(self._vae_config(n_input))
        return module.to(self.execution.torch_device)

    def _device_info(self) -> dict:
        """What ``fit_info`` says of where the model trained: the device, the precision of the training steps,
        whether CUDA graphs replayed them and where the batches came from."""
        h = self.history
        return {"device": self.execution.device, "precision": h.precision, "cuda_graphs": h.cuda_graphs,
                "batches": h.batches}

    def _moved(self) -> None:
        """Move the fitted (or loaded) module to the device of ``self.execution``."""
        if self.module is not None:
            self.module.to(self.execution.torch_device)

    def _fit_transfer(self, z: np.ndarray, cond: np.ndarray, ctx: np.ndarray, spec: PerturbSpec, *,
                      seed: int) -> None:
        raise NotImplementedError

    def _transfer(self, z: np.ndarray, perturbation: str) -> np.ndarray:
        """The predicted latents of ``perturbation`` for the source latents ``z``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ predict
    _pending_transfer = None  # set only inside a training callback (see _fit)

    def _predict_cells(self, source, label: str):
        if self._pending_transfer is not None:  # called from a training callback: transfer of the current weights
            refit, self._pending_transfer = self._pending_transfer, None
            refit()
        return super()._predict_cells(source, label)

    def latent(self, adata) -> np.ndarray:
        """Posterior means of the cells of ``adata`` (cells x n_latent)."""
        from ._train import Rows

        self._check_fitted()
        self.check_genes(adata, "adata")
        return self._encode(Rows(adata.X))

    def _encode(self, X, chunk: int = 4096) -> np.ndarray:
        """Posterior means of the rows of ``X`` (a :class:`~perturbkit.models._train.Rows` or a matrix), chunk by
        chunk on the execution's device (each chunk's result moved to the CPU once)."""
        import torch

        from ._train import Rows

        self.module.eval()
        with torch.no_grad():
            return np.concatenate([self.module.encode(xb)[0].cpu().numpy()
                                   for xb in Rows(X).device_chunks(chunk, self.execution)])

    def decode(self, z: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Decoded expression of the latents ``z``, chunk by chunk on the execution's device."""
        import torch

        from ._train import to_device

        self.module.eval()
        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
        with torch.no_grad():
            return np.concatenate([self.module.decode(to_device(zt[i:i + chunk], self.execution)).cpu().numpy()
                                   for i in range(0, len(zt), chunk)])

    def _predict_matrix(self, source, perturbation: str) -> np.ndarray:
        from ._train import Rows

        z = self._encode(Rows(source.X))
        return self.decode(self._transfer(z, perturbation))

    # -------------------------------------------------------------------------------------- persistence
    def _state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"module.{k}": v.detach().cpu().numpy() for k, v in self.module.state_dict().items()}
        arrays.update({f"transfer.{k}": v for k, v in self._transfer_arrays().items()})
        return arrays

    def _load_state(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        import torch

        from ._train import zero_subnormal
        from ._vae import VAE

        self.module = VAE(self._vae_config(len(self.var_names)))
        sd = {k[len("module."):]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("module.")}
        self.module.load_state_dict(sd)
        zero_subnormal(self.module)  # as training leaves them (a model saved before that did not)
        self.module.to(self.execution.torch_device).eval()
        self._load_transfer({k[len("transfer."):]: v for k, v in arrays.items() if k.startswith("transfer.")})

    def _transfer_arrays(self) -> dict[str, np.ndarray]:
        return {}

    def _load_transfer(self, arrays: dict[str, np.ndarray]) -> None:
        pass


def training_warnings(name: str, history) -> list[str]:
    """The warnings of one training run (for ``fit_info["warnings"]``): its monitored loss still falling at the
    end (:func:`perturbkit.models._train.still_falling`, docs/training.md)."""
    if not history.still_falling:
        return []
    budget = "max_steps" if history.stop_reason == "max_steps" else "epochs"
    return [f"{name}: the {history.monitor} was still falling when training ended ({history.epochs_run} epochs, "
            f"{history.steps} optimizer steps): the model is likely undertrained; raise {budget} "
            "(docs/training.md)."]
