"""The one small VAE that scGen and scPRAM share.

Encoder: ``n_layers`` x [Linear -> (BatchNorm) -> activation -> Dropout] -> (mu, log-variance) of a diagonal
Gaussian. Decoder: the mirror image -> Linear -> optional output activation. Loss per cell:
``recon_scale * sum_g (x_g - x_hat_g)^2 + kl_scale * kl_weight * KL(q(z|x) || N(0, I))``, averaged over the
batch. scGen's reference uses ``recon_scale = kl_scale = 0.5`` (``scgen/_scgenvae.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    n_input: int
    n_hidden: int = 800
    n_latent: int = 100
    n_layers: int = 2
    dropout_rate: float = 0.2
    batch_norm: bool = True
    activation: str = "leaky_relu"  # "leaky_relu" | "relu"
    output_activation: str | None = None  # None | "relu"
    kl_weight: float = 5e-5
    recon_scale: float = 0.5
    kl_scale: float = 0.5
    input_noise: float = 0.0  # std of Gaussian noise added to the input while training (denoising)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossOutput:
    loss: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor


_ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU}


def _stack(n_in: int, cfg: VAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(cfg.n_layers):
        layers.append(nn.Linear(n_in, cfg.n_hidden))
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(cfg.n_hidden, momentum=0.01, eps=1e-3))  # scvi-tools FCLayers settings
        layers.append(_ACTIVATIONS[cfg.activation]())
        if cfg.dropout_rate > 0:
            layers.append(nn.Dropout(cfg.dropout_rate))
        n_in = cfg.n_hidden
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Gaussian-latent autoencoder on log-normalised expression."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {cfg.activation!r}")
        self.cfg = cfg
        self.encoder = _stack(cfg.n_input, cfg)
        self.mu = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.logvar = nn.Linear(cfg.n_hidden, cfg.n_latent)
        self.decoder = _stack(cfg.n_latent, cfg)
        out: list[nn.Module] = [nn.Linear(cfg.n_hidden, cfg.n_input)]
        if cfg.output_activation == "relu":
            out.append(nn.ReLU())
        self.out = nn.Sequential(*out)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.decoder(z))

    def loss(self, x: torch.Tensor, *, sample: bool = True) -> LossOutput:
        """Loss of one batch. ``sample=False`` uses the posterior mean (deterministic validation loss)."""
        cfg = self.cfg
        x_in = x + cfg.input_noise * torch.randn_like(x) if (cfg.input_noise > 0 and self.training) else x
        mu, logvar = self.encode(x_in)
        mu, logvar = mu.float(), logvar.float()  # the loss in float32 under bfloat16 autocast (else a no-op)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu) if sample else mu
        x_hat = self.decode(z).float()
        recon = (x - x_hat).pow(2).sum(dim=1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        loss = (cfg.recon_scale * recon + cfg.kl_scale * cfg.kl_weight * kl).mean()
        return LossOutput(loss=loss, reconstruction=recon.mean(), kl=kl.mean())
