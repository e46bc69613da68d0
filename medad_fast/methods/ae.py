"""Plain autoencoder baseline (the reconstruction baseline of the surveys).

Training: normal slices only, no synthesis: ``I_r = AE(I)``,
``L = MSE(I_r, I) + lambda (1 - SSIM(I_r, I))``; Adam with MultiStepLR at 80 % and 90 %
of the epochs (x0.2), like the paper's method, so the two compare on the same schedule.
Inference: pixel map = Gaussian-smoothed ``|I - I_r|`` inside the liver (``I > 0``);
image score = max of its mean filter (as for every method). That is the ``paper``,
``small`` and ``tiny`` presets (``latent = conv``: :class:`~medad_fast.models.autoencoder.ConvAutoencoder`).

The ``medianomaly`` preset is the published AE at the published protocol of the MedIAnomaly
benchmark (Cai et al., arXiv 2404.04518; github caiyu6666/MedIAnomaly, ``reconstruction/``),
whose code produced AE4AD's figures (Cai et al., MICCAI 2024, Table 1; its README:
``train_eval_latent_size.sh``):

* network: ``latent = dense``, ``latent_size 16``, ``hidden_size 1024``, ``ae_width 16``,
  ``ae_depth 4`` (:class:`~medad_fast.models.autoencoder.DenseAutoencoder`, layer for layer
  ``networks/ae.py`` at its default options);
* data: grayscale, 64 x 64, no augmentation, no liver crop; intensities in [-1, 1]
  (``input_range = symmetric``: the network sees ``2 I - 1``, which is the public
  ``ToTensor() + Normalize(0.5, 0.5)``). The range is mapped inside the method rather than
  argued away: [0, 1] would not give the same network (the convs have no bias and pad with
  zeros, so shifting the input changes the borders' features, not only a constant), hence
  not provably the same AUROC;
* loss: ``AELoss``, the mean squared error in the network's range ([-1, 1]), no SSIM
  (``ssim_weight 0``); Adam (``weight_decay 0``) at lr 1e-3, batch 64, constant lr (the
  public scheduler is commented out: ``lr_milestones ()``); 600 epochs: MedIAnomaly's
  ``options.py`` sets 600 for BrainTumor (250 for the other sets, and in DDAD-ASR's configs),
  and the AE4AD figures we compare with were made by that code; fp32 (``amp`` off);
* inference: pixel map = ``(I - I_r)^2`` over the whole image (``residual = squared``,
  ``residual_sigma 0``, ``roi_threshold None``), image score = its mean (``image_score =
  mean``), in eval mode (BatchNorm running statistics), as ``AEWorker.evaluate``.

Deviations kept, and why:

* the map is in the units of intensities in [0, 1] (``I_r`` mapped back), a quarter of the
  public [-1, 1] units: every map and threshold of this package is in [0, 1] units, and a
  constant factor leaves the image ranking (AUROC, AP) unchanged;
* the engine drops the last partial batch of each epoch (15 steps of 64 over 998 images
  instead of 16 with a last one of 38): the trainer's batching is shared by every method
  and DDP; each epoch still draws a new permutation, so every image is trained on;
* the resize is the package's reader's (area averaging, then uint8), not PIL's antialiased
  bilinear (``Image.resize(BILINEAR)``): the reader is shared by every method and dataset;
  both average the 224 x 224 BrainTumor images down to 64 x 64 and quantise to 8 bits, and
  on 30 of its test images they differ by 2.0 grey levels of 255 on average (4.9 at most).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import Config, MethodConfig, setting
from ..losses import reconstruction_loss
from ..models.autoencoder import ConvAutoencoder, DenseAutoencoder
from ..models.scoring import smoothed_residual_map
from ..schedules import adam_with_milestones
from .registry import register
from .base import Method

__all__ = ["AutoencoderConfig", "AutoencoderMethod", "LATENTS", "INPUT_RANGES", "RESIDUALS", "IMAGE_SCORES"]

LATENTS = ("conv", "dense")
INPUT_RANGES = ("unit", "symmetric")
RESIDUALS = ("abs", "squared")
IMAGE_SCORES = ("max_filter", "mean")


@dataclass
class AutoencoderConfig(MethodConfig):
    """The autoencoder's settings."""

    architecture_fields = ("ae_width", "latent_channels", "ae_depth", "latent", "latent_size", "hidden_size")

    ae_width: int = setting(32, "base width of the autoencoder")
    latent_channels: int = setting(16, "channels of the autoencoder's bottleneck")
    ae_depth: int = setting(4, "max-pools of the autoencoder")
    latent: str = setting("conv", "autoencoder bottleneck: conv (a spatial latent of --latent-channels) or dense "
                                  "(MedIAnomaly's AE: flattened feature -> --hidden-size -> a --latent-size vector)",
                          choices=LATENTS)
    latent_size: int = setting(16, "length of the dense latent vector (--latent dense)")
    hidden_size: int = setting(1024, "hidden units of the dense bottleneck (--latent dense)")
    input_range: str = setting("unit", "intensities the autoencoder sees: unit ([0, 1]) or symmetric ([-1, 1], "
                                       "MedIAnomaly's; its MSE loss is taken there)", choices=INPUT_RANGES)
    residual: str = setting("abs", "pixel map: abs (|I - I_r|) or squared ((I - I_r)^2, MedIAnomaly's)",
                            choices=RESIDUALS)
    image_score: str = setting("max_filter", "image score: max_filter (max of the mean-filtered map) or mean "
                                             "(the mean of the map over the image)", choices=IMAGE_SCORES)
    ssim_weight: float = 1.0
    lr_milestones: tuple[float, ...] = (0.8, 0.9)
    lr_gamma: float = 0.2
    # Gaussian smoothing of the residual at 256 x 256, scaled with the side
    residual_sigma: float = setting(4.0, "sigma (pixels at 256x256) of the residual's Gaussian smoothing")
    roi_threshold: float | None = 0.0  # the map is kept where I > roi_threshold (the liver); None: everywhere
    score_filter: int | None = None

    def validate(self) -> None:
        need = self.need
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        need(self.ae_width >= 1, "ae_width", "must be >= 1")
        need(self.latent_channels >= 1, "latent_channels", "must be >= 1")
        need(isinstance(self.ae_depth, int) and 1 <= self.ae_depth <= 8, "ae_depth", "must be an int in 1..8")
        need(isinstance(self.latent_size, int) and self.latent_size >= 1, "latent_size", "must be an int >= 1")
        need(isinstance(self.hidden_size, int) and self.hidden_size >= 1, "hidden_size", "must be an int >= 1")
        need(self.ssim_weight >= 0, "ssim_weight", "must be >= 0")
        need(self.ssim_weight == 0 or self.input_range == "unit", "ssim_weight",
             "must be 0 with input_range 'symmetric' (the SSIM term's constants assume intensities in [0, 1])")
        need(all(0.0 < m <= 1.0 for m in self.lr_milestones), "lr_milestones", "fractions in (0, 1]")
        need(0.0 < self.lr_gamma <= 1.0, "lr_gamma", "must be in (0, 1]")
        need(self.residual_sigma >= 0, "residual_sigma", "must be >= 0")
        self.need_score_filter()

    def variant(self) -> str:
        return f"dense latent {self.latent_size}" if self.latent == "dense" else ""


@register
class AutoencoderMethod(Method):
    """Convolutional autoencoder; anomaly map = smoothed residual inside the liver (or, in
    the ``medianomaly`` preset, MedIAnomaly's AE scored by its mean squared error)."""

    name = "ae"
    summary = ("plain autoencoder (MSE + SSIM); map = smoothed |I - AE(I)| in the liver; preset medianomaly: "
               "MedIAnomaly's dense-latent AE scored by its mean squared error")
    Config = AutoencoderConfig
    presets = {
        "paper": {"batch_size": 8, "epochs": 230, "lr": 1e-4},
        # the demo's data and side; same schedule length as the paper's method's small preset
        "small": {"image_size": 96, "ae_width": 16, "latent_channels": 8, "ae_depth": 3, "batch_size": 8,
                  "epochs": 70, "lr": 1e-3},
        "tiny": {"image_size": 32, "ae_width": 2, "latent_channels": 2, "ae_depth": 2, "batch_size": 4, "epochs": 3,
                 "lr": 1e-3},
        # MedIAnomaly's AE and protocol (AE4AD's latent-16 row); see the module docstring
        "medianomaly": {"image_size": 64, "batch_size": 64, "epochs": 600, "lr": 1e-3, "amp": False,
                        "augment": False, "crop": "none",
                        "latent": "dense", "latent_size": 16, "hidden_size": 1024, "ae_width": 16, "ae_depth": 4,
                        "input_range": "symmetric", "ssim_weight": 0.0, "lr_milestones": (),
                        "residual": "squared", "residual_sigma": 0.0, "roi_threshold": None, "image_score": "mean"},
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: AutoencoderConfig = config.method
        if m.latent == "dense":
            self.autoencoder = DenseAutoencoder(config.run.image_size, m.ae_width, m.latent_size, m.hidden_size,
                                                m.ae_depth)
        else:
            self.autoencoder = ConvAutoencoder(m.ae_width, m.latent_channels, m.ae_depth)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        m, run = self.config.method, self.config.run
        return adam_with_milestones(self.parameters(), run.lr, run.epochs, m.lr_milestones, m.lr_gamma)

    def _to_network(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the autoencoder's input range."""
        return images * 2.0 - 1.0 if self.config.method.input_range == "symmetric" else images

    def _from_network(self, output: torch.Tensor) -> torch.Tensor:
        """The autoencoder's output -> the units of images in [0, 1]."""
        return (output + 1.0) / 2.0 if self.config.method.input_range == "symmetric" else output

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m: AutoencoderConfig = self.config.method
        inputs = self._to_network(images)
        with self.autocast():
            output = self.autoencoder(inputs)
        if m.ssim_weight == 0:  # MedIAnomaly's AELoss: MSE in the network's range
            mse = F.mse_loss(output.float(), inputs.float())
            return mse, {"loss_mse": mse.detach()}
        loss, mse, ssim_term = reconstruction_loss(output, inputs, m.ssim_weight)
        return loss, {"loss_mse": mse.detach(), "loss_ssim": ssim_term.detach()}

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        m: AutoencoderConfig = self.config.method
        with self.autocast():
            reconstruction = self._from_network(self.autoencoder(self._to_network(images)))
        sigma = m.residual_sigma * self.config.run.image_size / 256
        return smoothed_residual_map(images, reconstruction, sigma, m.roi_threshold, squared=m.residual == "squared")

    def map_image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """``image_score``'s: ``max_filter`` (the max of the mean-filtered map) or ``mean``
        (MedIAnomaly's: the mean of the map over the image)."""
        if self.config.method.image_score == "mean":
            return maps.float().flatten(1).mean(dim=1)
        return super().map_image_scores(maps)
