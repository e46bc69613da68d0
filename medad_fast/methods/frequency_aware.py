"""The paper's method: frequency-aware image restoration.

One training step on a batch of normal slices ``I``:

1. liver-aware Perlin anomaly synthesis (:class:`~medad_fast.synthesis.AnomalySynthesizer`,
   the fused op, this step's generator) -> ``I_a, M``;
2. ``alpha`` of the skip connections decays linearly per iteration from 1 to 0 over
   ``alpha_decay_epochs`` epochs (:func:`~medad_fast.schedules.alpha_at`);
3. ``I_r = R(highpass(I_a))``, ``logits = S(concat(I_r, I_a))``
   (:class:`~medad_fast.models.FrequencyAwareModel`);
4. ``L = MSE(I_r, I) + lambda (1 - SSIM(I_r, I)) + L1(p, M) + Focal(p, M)``; Adam with
   MultiStepLR at 80 % and 90 % of the epochs (x0.2).

Inference: the pixel map is ``p = softmax(S(concat(R(highpass(I)), I)))[:, 1]`` at the
checkpoint's alpha; image score: max of its mean filter. The paper's ablations are settings:
``roi``, ``highpass``, ``synthesis``, ``mode`` (``recon_only``: score
``1 - MSGMS(I, I_r)``; ``seg_only``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import Config, MethodConfig, setting
from ..data.sources import training_sources
from ..losses import reconstruction_loss, segmentation_loss
from ..models.model import MODES, FrequencyAwareModel
from ..schedules import adam_with_milestones, alpha_at
from ..synthesis import AnomalySynthesizer
from .registry import register
from .base import Method

__all__ = ["FrequencyAwareConfig", "FrequencyAwareMethod"]


@dataclass
class FrequencyAwareConfig(MethodConfig):
    """The method's settings; the defaults are the paper's."""

    architecture_fields = ("recon_width", "seg_width", "seg_depth", "mode")

    recon_width: int = setting(128, "base width w of the reconstruction network")
    seg_width: int = setting(64, "base width of the segmentation network")
    seg_depth: int = setting(5, "max-pools of the segmentation U-Net (paper 5)")
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs
    lr_gamma: float = 0.2
    alpha_decay_epochs: float = setting(20.0, "epochs over which alpha decays 1 -> 0")
    ssim_weight: float = 1.0  # lambda of L_rec
    focal_gamma: float = 2.0
    # anomaly synthesis
    synthesis: bool = setting(True, "anomaly synthesis (--no-synthesis: train on normal images only)")
    p_anomaly: float = setting(0.5, "probability a training sample gets an anomaly")
    max_retries: int = 10
    perlin_threshold: float = 0.5
    roi: bool = setting(True, "liver localisation of the synthetic anomalies (--no-roi: anywhere)")
    roi_threshold: float = 0.0
    source_pool_size: int = setting(256, "anomaly-source images kept on the device")
    # Break module
    highpass: bool = setting(True, "Butterworth high-pass before R (--no-highpass: the image itself)")
    d0: float = setting(30.0, "Butterworth cut-off at 256x256 (default 30)")
    butterworth_order: int = setting(2, "2: textbook 2nd order (default); 1: the paper's printed formula")
    mode: str = setting("full", "which sub-networks train and score (the paper's ablations: recon_only scores "
                                "1 - MSGMS(I, I_r), seg_only the segmentation network alone)", choices=MODES,
                        shortcuts={"recon-only": ("recon_only", "the paper's ablation: reconstruction network only "
                                                                "(same as --mode recon_only)"),
                                   "seg-only": ("seg_only", "the paper's ablation: segmentation network only "
                                                            "(same as --mode seg_only)")})
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
        need(self.alpha_decay_epochs >= 0, "alpha_decay_epochs", "must be >= 0")
        need(self.ssim_weight >= 0, "ssim_weight", "must be >= 0")
        need(self.focal_gamma >= 0, "focal_gamma", "must be >= 0")
        need(0.0 <= self.p_anomaly <= 1.0, "p_anomaly", "must be in [0, 1]")
        need(self.max_retries >= 0, "max_retries", "must be >= 0")
        need(self.source_pool_size >= 1, "source_pool_size", "must be >= 1")
        need(self.d0 > 0, "d0", "must be > 0")
        need(isinstance(self.butterworth_order, int) and self.butterworth_order >= 1,
             "butterworth_order", "must be an int >= 1")
        self.need_score_filter()

    @property
    def effective_roi_threshold(self) -> float:
        """``roi_threshold``, or ``-inf`` (every pixel is "liver") with ``roi`` off."""
        return self.roi_threshold if self.roi else -math.inf

    def variant(self) -> str:
        ablated = [name for name, on in (("no ROI", self.roi), ("no high-pass", self.highpass),
                                         ("no synthesis", self.synthesis)) if not on]
        return ", ".join([self.mode, *ablated])


@register
class FrequencyAwareMethod(Method):
    """Liver-aware synthesis + Butterworth break + reconstruction + weight-decay U-Net."""

    name = "frequency_aware"
    summary = "the paper's method: liver-aware Perlin synthesis, Butterworth break, R + weight-decay U-Net"
    Config = FrequencyAwareConfig
    uses_anomaly_sources = True
    presets = {
        "paper": {},
        "small": {
            # sized for a 2-core CPU (make demo trains in about 9 minutes): ~0.3 s per step of 8
            "image_size": 96, "recon_width": 16, "seg_width": 16,
            "seg_depth": 3,  # bottleneck 12 x 12: a 96-pixel slice keeps its localisation
            "batch_size": 8, "epochs": 70,
            "lr": 1e-3,  # short schedule: 10x the paper's lr (Adam, still decayed at 80 / 90 %)
            # alpha only reaches 0.5 by the end: in a short run the deep decoder path cannot
            # take over the localisation from the encoder skips (measured: alpha -> 0 within
            # 20 epochs gives image/pixel AUROC 0.781/0.937 on the demo, 140 gives 0.950/0.975)
            "alpha_decay_epochs": 140.0,
            "source_pool_size": 64,
        },
        # for tests: seconds on one CPU thread
        "tiny": {"image_size": 32, "recon_width": 2, "seg_width": 2, "seg_depth": 3, "batch_size": 4, "epochs": 3,
                 "lr": 1e-3, "alpha_decay_epochs": 140.0, "source_pool_size": 4},
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: FrequencyAwareConfig = config.method
        self.model = FrequencyAwareModel(m.recon_width, m.seg_width, m.seg_depth, m.mode, m.highpass, m.d0,
                                         m.butterworth_order)
        self.synthesizer: AnomalySynthesizer | None = None
        self.alpha = 1.0

    @property
    def alpha(self) -> float:
        """Skip weight of the segmentation network's skip connections."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = float(value)
        self.model.alpha = self._alpha

    def setup_training(self, device: torch.device) -> None:
        m: FrequencyAwareConfig = self.config.method
        if m.synthesis:
            sources = training_sources(self.config, m.source_pool_size)
            self.synthesizer = AnomalySynthesizer(
                sources.to(device=device, dtype=torch.float32), p_anomaly=m.p_anomaly, max_retries=m.max_retries,
                threshold=m.perlin_threshold, roi_threshold=m.effective_roi_threshold)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        m, run = self.config.method, self.config.run
        return adam_with_milestones(self.parameters(), run.lr, run.epochs, m.lr_milestones, m.lr_gamma)

    def on_train_step(self, step: int, steps_per_epoch: int) -> None:
        self.alpha = alpha_at(step, steps_per_epoch, self.config.method.alpha_decay_epochs)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m: FrequencyAwareConfig = self.config.method
        if self.synthesizer is not None:
            augmented, mask = self.synthesizer(images, generator)
        else:
            augmented, mask = images, torch.zeros_like(images)
        augmented = self.to_memory_format(augmented)
        with self.autocast():
            output = self.model(augmented)
        terms: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=images.device)
        if output.reconstruction is not None:
            rec, mse, ssim_term = reconstruction_loss(output.reconstruction, images, m.ssim_weight)
            loss = loss + rec
            terms.update(loss_rec=rec.detach(), loss_mse=mse.detach(), loss_ssim=ssim_term.detach())
        if output.logits is not None:
            seg, l1, focal = segmentation_loss(output.logits, mask, m.focal_gamma)
            loss = loss + seg
            terms.update(loss_seg=seg.detach(), loss_l1=l1.detach(), loss_focal=focal.detach())
        terms["anomalous_fraction"] = (mask.flatten(1).amax(dim=1) > 0).float().mean()
        return loss, terms

    def log_values(self) -> dict[str, float]:
        return {"alpha": self.alpha}

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            output = self.model(images)
        return self.model.anomaly_maps(images, output)

    def method_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.alpha = float(state.get("alpha", 0.0))
