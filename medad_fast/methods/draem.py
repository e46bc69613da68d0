"""DRAEM (Zavrtanik, Kristan, Skocaj: "DRAEM - a discriminatively trained reconstruction
embedding for surface anomaly detection", ICCV 2021): the paper's closest relative and the
REW-D comparison row.

One training step on a batch of normal slices ``I`` (every draw from this step's generator,
on the training device, so an exact resume stays exact):

0. DRAEM's loader rotates 30 % of the normal images by ``U(-90, 90)`` degrees
   (``transform_image``: ``torch.rand(1) > 0.7``, then ``iaa.Affine(rotate=(-90, 90))``)
   before anything else: the rotated image is both the synthesis's base and the
   reconstruction target (:func:`~medad_fast.augment.rotate_normal_images`;
   ``rotate_normal``, on by default).
1. DRAEM's anomaly synthesis, over the WHOLE image (no liver localisation), with the
   fused op (:class:`~medad_fast.synthesis.AnomalySynthesizer`):
   Perlin lattice ``2^k`` cells per axis with ``k ~ U{0..5}``, rotation ``U(-90, 90)``
   degrees, mask ``M = [P > 0.5]``, anomaly with probability 0.5 and DRAEM's opacity
   convention ``I_a = I (1 - M) + (1 - beta) A M + beta I M`` with ``beta ~ U(0, 0.8)``.
   Anomaly sources: ``run.anomaly_source``, else the Perlin-texture fallback
   (:func:`~medad_fast.data.sources.training_sources`); each sample's source
   first goes through DRAEM's ``randAugmenter``, 3 of its 10 imgaug ops drawn without
   replacement (:func:`~medad_fast.augment.augment_anomaly_sources`, whose docstring gives
   the ops, their ranges, and how the colour ops act on grey images;
   ``source_augmentation``, on by default). As in DRAEM, the source is augmented for
   every sample (also those that stay normal) and only the mask's pixels of it are used.
2. ``I_r = R(I_a)``: the reconstructive network on the augmented image itself (no
   high-pass; :class:`~medad_fast.models.ReconstructionNetwork`).
3. ``logits = S(concat(I_r, I_a))``: the discriminative U-Net with ordinary concatenated
   skip connections (:func:`discriminative_network`); the reconstruction is not detached.
4. ``L = MSE(I_r, I) + (1 - SSIM(I_r, I)) + Focal(p, M)``, ``p = softmax(logits)[:, 1]``
   (DRAEM's loss: no L1 term); Adam with MultiStepLR at 80 % and 90 % of the epochs (x0.2).

Inference: pixel map ``p = softmax(S(concat(R(I), I)))[:, 1]``; image score: max of its
mean filter (DRAEM's ``avg_pool2d(p, 21, 1, 10)`` at 256 x 256, scaled with the side).

Mapping DRAEM's blend onto the fused op. The op blends ``I_a = I + b M (A - I)`` with the
opacity ``b`` of the anomaly source; DRAEM's equation expands to
``I (1 - M) + (1 - beta) A M + beta I M = I + (1 - beta) M (A - I)``, so ``b = 1 - beta``.
DRAEM's ``beta = 0.8 u`` (``u ~ U[0, 1)``) makes the source's weight ``b`` uniform on
``(0.2, 1]``; the synthesizer draws ``b = 0.2 + 0.8 u`` (``beta_range = (0.2, 1.0)``), the
same uniform law (only which end of the interval can be hit differs, an event of
probability 2^-24 per draw). The other arguments: ``roi_threshold = -inf`` (every pixel may
become anomalous), ``max_retries = 0`` (DRAEM keeps a draw whose mask came out empty as a
normal sample rather than redrawing it), threshold 0.5, ``max_log2_res = 5``, rotation
``pi / 2``.

What is not DRAEM's: the discriminative network is the package's U-Net
(:class:`~medad_fast.models.SegmentationNetwork`, encoder widths ``w, 2w, 4w, 8w, 8w, 8w``
as DRAEM's), whose decoder keeps the encoder's width at every level where DRAEM's halves it
before the concatenation (slightly more weights, same depth, same receptive field). The
images are single-channel where DRAEM's are BGR, so the source ops act on grey levels (see
:mod:`medad_fast.augment` for the mapping of each op, and for the rounding differences of
its float rotations and Lab tables from imgaug's OpenCV calls, at most one grey level). The
normal image is rotated as a float image, not first stored as uint8 as DRAEM's ``cv2``
images are: the package's images are floats, and rounding them would only add DRAEM's
storage format's quantisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..augment import augment_anomaly_sources, rotate_normal_images
from ..config import Config, MethodConfig, setting
from ..data.sources import training_sources
from ..losses import focal_loss, reconstruction_loss
from ..models.layers import init_weights
from ..models.reconstruction import ReconstructionNetwork
from ..models.segmentation import SegmentationNetwork
from ..schedules import adam_with_milestones
from ..synthesis import AnomalySynthesizer
from .registry import register
from .base import Method

__all__ = ["DRAEM_MAX_BETA", "ConcatSkip", "DraemConfig", "DraemMethod", "discriminative_network",
           "draem_synthesizer"]

#: DRAEM's ``beta ~ U(0, 0.8)``: the weight of the normal image inside the mask
DRAEM_MAX_BETA = 0.8


@dataclass
class DraemConfig(MethodConfig):
    """DRAEM's settings; the defaults are DRAEM's (its code and paper)."""

    architecture_fields = ("recon_width", "seg_width", "seg_depth")

    recon_width: int = setting(128, "base width w of the reconstruction network")
    seg_width: int = setting(64, "base width of the segmentation network")
    seg_depth: int = setting(5, "max-pools of the segmentation U-Net (paper 5)")
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs
    lr_gamma: float = 0.2
    focal_gamma: float = 2.0
    # anomaly synthesis (DRAEM's: whole image, source weight 1 - beta in (0.2, 1])
    p_anomaly: float = setting(0.5, "probability a training sample gets an anomaly")
    max_retries: int = 0  # DRAEM keeps an empty draw as a normal sample
    perlin_threshold: float = 0.5
    source_pool_size: int = setting(256, "anomaly-source images kept on the device")
    # DRAEM's loader augmentations (both DRAEM's; the switches exist for ablations)
    source_augmentation: bool = setting(True, "DRAEM's augmentation of each anomaly source, 3 of its 10 imgaug ops "
                                              "(--no-source-augmentation: the sources as they come)")
    rotate_normal: bool = setting(True, "DRAEM's rotation of 30 %% of the normal images by U(-90, 90) degrees "
                                        "before synthesis (--no-rotate-normal: none)")
    # image score: max of a mean filter of this size over the pixel map; None: DRAEM's 21 at
    # 256 x 256, scaled with the side
    score_filter: int | None = setting(None, "side of the image score's mean filter (default: 21 at 256, scaled)")

    def validate(self) -> None:
        need = self.need
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        need(self.recon_width >= 1, "recon_width", "must be >= 1")
        need(self.seg_width >= 1, "seg_width", "must be >= 1")
        need(isinstance(self.seg_depth, int) and 1 <= self.seg_depth <= 8, "seg_depth", "must be an int in 1..8")
        need(all(0.0 < m <= 1.0 for m in self.lr_milestones), "lr_milestones", "fractions in (0, 1]")
        need(0.0 < self.lr_gamma <= 1.0, "lr_gamma", "must be in (0, 1]")
        need(self.focal_gamma >= 0, "focal_gamma", "must be >= 0")
        need(isinstance(self.source_augmentation, bool), "source_augmentation", "must be true or false")
        need(isinstance(self.rotate_normal, bool), "rotate_normal", "must be true or false")
        self.need_synthesis_settings()
        self.need_score_filter()

    def variant(self) -> str:
        return ", ".join(name for name, on in (("no source augmentation", self.source_augmentation),
                                               ("no rotation", self.rotate_normal)) if not on)


def draem_synthesizer(sources: torch.Tensor, p_anomaly: float = 0.5, max_retries: int = 0,
                      threshold: float = 0.5, source_augmentation: bool = True) -> AnomalySynthesizer:
    """DRAEM's synthesis on the fused op: the mask anywhere in the image
    (``roi_threshold = -inf``), the source's weight ``1 - beta`` uniform on (0.2, 1] (see
    the module docstring for the mapping of DRAEM's blend onto the op's) and, with
    ``source_augmentation``, DRAEM's augmentation of the drawn sources."""
    return AnomalySynthesizer(sources, p_anomaly=p_anomaly, max_retries=max_retries, threshold=threshold,
                              roi_threshold=-math.inf, max_log2_res=5, beta_range=(1.0 - DRAEM_MAX_BETA, 1.0),
                              max_rotation=math.pi / 2,
                              source_transform=augment_anomaly_sources if source_augmentation else None)


class ConcatSkip(nn.Module):
    """An ordinary U-Net skip connection: ``concat(E, D)``, gradients to both.

    It stands in for :class:`~medad_fast.ops.SkipMerge` in the discriminative network.
    ``skip_merge`` at ``alpha = 1`` gives the same values (``concat(E, stopgrad(D))``) but
    not the same gradients: ``D`` gets none, so nothing below the last decoder level would
    learn. ``alpha`` reads 1 and cannot be set to anything else."""

    @property
    def alpha(self) -> float:
        return 1.0

    @alpha.setter
    def alpha(self, value: float) -> None:
        if float(value) != 1.0:
            raise ValueError(f"DRAEM's skip connections are plain concatenations (alpha 1); got alpha={value}")

    def forward(self, encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        return torch.cat([encoder, decoder], dim=1)


def discriminative_network(base_width: int = 64, depth: int = 5) -> SegmentationNetwork:
    """DRAEM's discriminative sub-network: the package's U-Net
    (:class:`~medad_fast.models.SegmentationNetwork`, 2 channels in, 2 logits out) with every
    weight-decay skip replaced by a plain concatenation (:class:`ConcatSkip`). The skips
    hold no weights, so the state dict is the U-Net's."""
    network = SegmentationNetwork(2, 2, base_width, alpha=1.0, depth=depth)
    network.skips = nn.ModuleList(ConcatSkip() for _ in network.skips)
    return network


@register
class DraemMethod(Method):
    """DRAEM: whole-image Perlin synthesis + reconstructive network + discriminative U-Net."""

    name = "draem"
    summary = "DRAEM (ICCV 2021): whole-image Perlin synthesis, reconstruction R + discriminative U-Net (L2+SSIM+focal)"
    Config = DraemConfig
    uses_anomaly_sources = True
    presets = {
        # DRAEM's code: 700 epochs, batch 8, lr 1e-4 at 256 x 256
        "paper": {"image_size": 256, "batch_size": 8, "lr": 1e-4, "epochs": 700},
        # the paper's method's small preset (the demo on a 2-core CPU), so the two compare on
        # the same data, side, widths and schedule
        "small": {"image_size": 96, "recon_width": 16, "seg_width": 16, "seg_depth": 3, "batch_size": 8,
                  "epochs": 70, "lr": 1e-3, "source_pool_size": 64},
        # for tests: seconds on one CPU thread
        "tiny": {"image_size": 32, "recon_width": 2, "seg_width": 2, "seg_depth": 3, "batch_size": 4, "epochs": 3,
                 "lr": 1e-3, "source_pool_size": 4},
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: DraemConfig = config.method
        self.reconstructive = ReconstructionNetwork(1, 1, m.recon_width)
        self.discriminative = discriminative_network(m.seg_width, m.seg_depth)
        self.apply(init_weights)
        self.synthesizer: AnomalySynthesizer | None = None

    def setup_training(self, device: torch.device) -> None:
        m: DraemConfig = self.config.method
        sources = training_sources(self.config, m.source_pool_size)
        self.synthesizer = draem_synthesizer(sources.to(device=device, dtype=torch.float32), m.p_anomaly,
                                             m.max_retries, m.perlin_threshold, m.source_augmentation)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        m, run = self.config.method, self.config.run
        return adam_with_milestones(self.parameters(), run.lr, run.epochs, m.lr_milestones, m.lr_gamma)

    def networks(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(I_r [B,1,H,W], logits [B,2,H,W])`` of (augmented) images ``[B, 1, H, W]``."""
        images = self.to_memory_format(images)
        with self.autocast():
            reconstruction = self.reconstructive(images)
            # the reconstruction is NOT detached: the focal loss also trains R (as DRAEM)
            logits = self.discriminative(torch.cat([reconstruction.to(images.dtype), images], dim=1))
        return reconstruction, logits

    def training_batch(self, images: torch.Tensor, generator: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DRAEM's loader on a batch of normal images: ``(I, I_a, M)``, the (30 % rotated)
        normal images, the same with anomalies synthesised into them, and the masks."""
        if self.synthesizer is None:
            raise RuntimeError("setup_training() must run before the first training step")
        if self.config.method.rotate_normal:
            images = rotate_normal_images(images, generator)
        augmented, mask = self.synthesizer(images, generator)
        return images, augmented, mask

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m: DraemConfig = self.config.method
        images, augmented, mask = self.training_batch(images, generator)
        reconstruction, logits = self.networks(augmented)
        rec, mse, ssim_term = reconstruction_loss(reconstruction, images, 1.0)  # L2 + (1 - SSIM)
        focal = focal_loss(torch.softmax(logits.float(), dim=1)[:, 1:2], mask, m.focal_gamma)
        loss = rec + focal
        terms = {"loss_rec": rec.detach(), "loss_mse": mse.detach(), "loss_ssim": ssim_term.detach(),
                 "loss_focal": focal.detach(),
                 "anomalous_fraction": (mask.flatten(1).amax(dim=1) > 0).float().mean()}
        return loss, terms

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        _, logits = self.networks(images)
        return torch.softmax(logits.float(), dim=1)[:, 1]
