"""Plain convolutional autoencoder baseline (the reconstruction baseline of the surveys).

Training: normal slices only, no synthesis: ``I_r = AE(I)``,
``L = MSE(I_r, I) + lambda (1 - SSIM(I_r, I))``; Adam with MultiStepLR at 80 % and 90 %
of the epochs (x0.2), like the paper's method, so the two compare on the same schedule.
Inference: pixel map = Gaussian-smoothed ``|I - I_r|`` inside the liver (``I > 0``);
image score = max of its mean filter (as for every method).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config, MethodConfig, setting
from ..losses import reconstruction_loss
from ..models.autoencoder import ConvAutoencoder
from ..models.scoring import smoothed_residual_map
from ..schedules import adam_with_milestones
from . import register
from .base import Method

__all__ = ["AutoencoderConfig", "AutoencoderMethod"]


@dataclass
class AutoencoderConfig(MethodConfig):
    """The autoencoder's settings."""

    architecture_fields = ("ae_width", "latent_channels", "ae_depth")

    ae_width: int = setting(32, "base width of the autoencoder")
    latent_channels: int = setting(16, "channels of the autoencoder's bottleneck")
    ae_depth: int = setting(4, "max-pools of the autoencoder")
    ssim_weight: float = 1.0
    lr_milestones: tuple[float, ...] = (0.8, 0.9)
    lr_gamma: float = 0.2
    # Gaussian smoothing of the residual at 256 x 256, scaled with the side
    residual_sigma: float = setting(4.0, "sigma (pixels at 256x256) of the residual's Gaussian smoothing")
    roi_threshold: float = 0.0  # the map is kept where I > roi_threshold (the liver)
    score_filter: int | None = None

    def validate(self) -> None:
        need = self.need
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        need(self.ae_width >= 1, "ae_width", "must be >= 1")
        need(self.latent_channels >= 1, "latent_channels", "must be >= 1")
        need(isinstance(self.ae_depth, int) and 1 <= self.ae_depth <= 8, "ae_depth", "must be an int in 1..8")
        need(self.ssim_weight >= 0, "ssim_weight", "must be >= 0")
        need(all(0.0 < m <= 1.0 for m in self.lr_milestones), "lr_milestones", "fractions in (0, 1]")
        need(0.0 < self.lr_gamma <= 1.0, "lr_gamma", "must be in (0, 1]")
        need(self.residual_sigma >= 0, "residual_sigma", "must be >= 0")
        self.need_score_filter()


@register
class AutoencoderMethod(Method):
    """Convolutional autoencoder; anomaly map = smoothed residual inside the liver."""

    name = "ae"
    summary = "plain convolutional autoencoder (MSE + SSIM); map = smoothed |I - AE(I)| in the liver"
    Config = AutoencoderConfig
    presets = {
        "paper": {"batch_size": 8, "epochs": 230, "lr": 1e-4},
        # the demo's data and side; same schedule length as the paper's method's small preset
        "small": {"image_size": 96, "ae_width": 16, "latent_channels": 8, "ae_depth": 3, "batch_size": 8,
                  "epochs": 70, "lr": 1e-3},
        "tiny": {"image_size": 32, "ae_width": 2, "latent_channels": 2, "ae_depth": 2, "batch_size": 4, "epochs": 3,
                 "lr": 1e-3},
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: AutoencoderConfig = config.method
        self.autoencoder = ConvAutoencoder(m.ae_width, m.latent_channels, m.ae_depth)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        m, run = self.config.method, self.config.run
        return adam_with_milestones(self.parameters(), run.lr, run.epochs, m.lr_milestones, m.lr_gamma)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self.autocast():
            reconstruction = self.autoencoder(images)
        loss, mse, ssim_term = reconstruction_loss(reconstruction, images, self.config.method.ssim_weight)
        return loss, {"loss_mse": mse.detach(), "loss_ssim": ssim_term.detach()}

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        m: AutoencoderConfig = self.config.method
        with self.autocast():
            reconstruction = self.autoencoder(images)
        sigma = m.residual_sigma * self.config.run.image_size / 256
        return smoothed_residual_map(images, reconstruction, sigma, m.roi_threshold)
