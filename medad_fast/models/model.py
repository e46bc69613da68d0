"""The paper's network: Break (high-pass) -> reconstruction ``R`` -> segmentation ``S``.

Training: ``I_r = R(highpass(I_a))``, ``logits = S(concat(I_r, I_a))`` with the
reconstruction NOT detached (the segmentation loss also trains ``R``). Inference: the same
with the test image ``I`` in place of ``I_a``; pixel map ``p = softmax(logits)[:, 1]``.
The method around it (synthesis, losses, alpha schedule, image score) is
:class:`medad_fast.methods.frequency_aware.FrequencyAwareMethod`.

Modes (the paper's ablations):

* ``full``: the method.
* ``recon_only``: ``R`` alone; the pixel map is ``1 - MSGMS(I, I_r)``, the multi-scale
  gradient-magnitude similarity of the input and its reconstruction (RIAD's score).
* ``seg_only``: ``S`` alone on the (augmented) image, 1 input channel.

``highpass=False`` feeds ``R`` the image itself instead of its high-pass (the "no Break"
ablation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from .layers import init_weights
from .reconstruction import ReconstructionNetwork
from .scoring import msgms_anomaly_map
from .segmentation import SegmentationNetwork

__all__ = ["FrequencyAwareModel", "ModelOutput", "MODES"]

#: what the model trains and scores with
MODES = ("full", "recon_only", "seg_only")


@dataclass
class ModelOutput:
    """What :meth:`FrequencyAwareModel.forward` returns (None for a sub-network the mode
    does not use). ``reconstruction [B,1,H,W]``, ``logits [B,2,H,W]``."""

    reconstruction: torch.Tensor | None
    logits: torch.Tensor | None


class FrequencyAwareModel(nn.Module):
    """Reconstruction + weight-decay segmentation network.

    Args:
        recon_width: base width ``w`` of ``R`` (widths w, 2w, 4w, 8w, 8w).
        seg_width: base width of ``S``; ``seg_depth``: its max-pools (DRAEM's: 5).
        mode: one of :data:`MODES`.
        highpass: Butterworth high-pass before ``R`` (``d0`` at 256 x 256, ``order``).
    """

    def __init__(self, recon_width: int = 128, seg_width: int = 64, seg_depth: int = 5, mode: str = "full",
                 highpass: bool = True, d0: float = 30.0, butterworth_order: int = 2) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
        self.mode = mode
        self.highpass: nn.Module = ops.ButterworthHighpass(d0, butterworth_order) if highpass else nn.Identity()
        self.reconstruction = ReconstructionNetwork(1, 1, recon_width) if mode in ("full", "recon_only") else None
        seg_inputs = 2 if mode == "full" else 1
        self.segmentation = (SegmentationNetwork(seg_inputs, 2, seg_width, depth=seg_depth)
                             if mode in ("full", "seg_only") else None)
        self.apply(init_weights)

    @property
    def alpha(self) -> float:
        """Skip weight of the segmentation network (1.0 when there is none)."""
        return self.segmentation.alpha if self.segmentation is not None else 1.0

    @alpha.setter
    def alpha(self, value: float) -> None:
        if self.segmentation is not None:
            self.segmentation.alpha = value

    def forward(self, images: torch.Tensor) -> ModelOutput:
        """Forward pass on (augmented) images ``[B, 1, H, W]`` in [0, 1]."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
        reconstruction = logits = None
        if self.reconstruction is not None:
            reconstruction = self.reconstruction(self.highpass(images))
        if self.segmentation is not None:
            if reconstruction is not None:
                # the reconstruction is NOT detached: L_seg also trains R (paper, Sec. 3.3)
                segmentation_input = torch.cat([reconstruction.to(images.dtype), images], dim=1)
            else:
                segmentation_input = images
            logits = self.segmentation(segmentation_input)
        return ModelOutput(reconstruction, logits)

    def anomaly_maps(self, images: torch.Tensor, output: ModelOutput) -> torch.Tensor:
        """Pixel anomaly maps ``[B, H, W]`` (float32) from a forward pass on ``images``."""
        if output.logits is not None:
            return torch.softmax(output.logits.float(), dim=1)[:, 1]
        return msgms_anomaly_map(images, output.reconstruction)
