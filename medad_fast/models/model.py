"""The whole model: Break (high-pass) -> reconstruction ``R`` -> segmentation ``S``.

Training (DESIGN §1): ``I_r = R(highpass(I_a))``, ``logits = S(concat(I_r, I_a))`` with the
reconstruction NOT detached. Inference: the same with the test image ``I`` in place of
``I_a``; pixel map ``p = softmax(logits)[:, 1]``, image score
``max(avg_pool2d(p, 21, 1, 10))`` (zero padding counted, DRAEM's) at 256 x 256; the filter
side scales with the image side (``Config.effective_score_filter``: 11 at 128).

Modes (ablations of the paper, :data:`medad_fast.config.MODES`):

* ``full``: the method.
* ``recon_only``: ``R`` alone; the pixel map is ``1 - MSGMS(I, I_r)``, the multi-scale
  gradient-magnitude similarity of the input and its reconstruction (RIAD's score).
* ``seg_only``: ``S`` alone on the (augmented) image, 1 input channel.

``highpass=False`` feeds ``R`` the image itself instead of its high-pass (the "no Break"
ablation).

Checkpoints are plain dicts saved with ``torch.save`` and loaded with
``torch.load(..., weights_only=True)``; :func:`load_checkpoint` refuses a checkpoint whose
architecture (preset, widths, mode) differs from the one asked for.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import Config
from .layers import init_weights
from .reconstruction import ReconstructionNetwork
from .segmentation import SegmentationNetwork

__all__ = ["FrequencyAwareModel", "ModelOutput", "image_scores", "msgms_anomaly_map",
           "CHECKPOINT_FORMAT", "load_checkpoint", "checkpoint_bytes", "model_from_checkpoint"]

CHECKPOINT_FORMAT = "medad_fast.checkpoint/1"


def image_scores(maps: torch.Tensor, filter_size: int = 21) -> torch.Tensor:
    """Image score = max of the ``filter_size`` mean filter of the pixel map, zero padding
    counted (DRAEM's ``avg_pool2d(p, 21, 1, 10)``). ``[B, H, W] -> [B]`` (float32)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape [B, H, W]; got {list(maps.shape)}")
    smoothed = F.avg_pool2d(maps.float().unsqueeze(1), filter_size, stride=1, padding=filter_size // 2)
    return smoothed.flatten(1).amax(dim=1)


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    # Prewitt filters (RIAD's MSGMS), zero padding; x [B, 1, H, W]
    prewitt = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=x.dtype, device=x.device) / 3.0
    kernels = torch.stack([prewitt, prewitt.t()]).unsqueeze(1)  # [2, 1, 3, 3]
    gradients = F.conv2d(x, kernels, padding=1)
    return torch.sqrt((gradients * gradients).sum(dim=1, keepdim=True) + 1e-12)


def msgms_anomaly_map(image: torch.Tensor, reconstruction: torch.Tensor, scales: int = 4,
                      c: float = 0.0026) -> torch.Tensor:
    """``1 - MSGMS``: one minus the gradient-magnitude similarity
    ``(2 g_I g_R + c) / (g_I^2 + g_R^2 + c)`` averaged over ``scales`` dyadic scales
    (2x2 average pooling between scales, bilinear up-sampling back). ``[B, 1, H, W]`` x2
    -> ``[B, H, W]`` in [0, 1] (0 where the gradients agree)."""
    H, W = image.shape[-2:]
    x, y = image.float(), reconstruction.float()
    total = torch.zeros_like(x)
    for scale in range(scales):
        if scale > 0:
            if min(x.shape[-2:]) < 2:
                scales = scale
                break
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        gx, gy = _gradient_magnitude(x), _gradient_magnitude(y)
        gms = (2 * gx * gy + c) / (gx * gx + gy * gy + c)
        total = total + F.interpolate(gms, size=(H, W), mode="bilinear", align_corners=False)
    return (1.0 - total / scales).squeeze(1).clamp(0.0, 1.0)


@dataclass
class ModelOutput:
    """What :meth:`FrequencyAwareModel.forward` returns (None for a sub-network the mode
    does not use). ``reconstruction [B,1,H,W]``, ``logits [B,2,H,W]``."""

    reconstruction: torch.Tensor | None
    logits: torch.Tensor | None


class FrequencyAwareModel(nn.Module):
    """Reconstruction + weight-decay segmentation network built from a :class:`Config`."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.highpass: nn.Module = (ops.ButterworthHighpass(config.d0, config.butterworth_order)
                                    if config.highpass else nn.Identity())
        self.reconstruction = (ReconstructionNetwork(1, 1, config.recon_width)
                               if config.mode in ("full", "recon_only") else None)
        seg_inputs = 2 if config.mode == "full" else 1
        self.segmentation = (SegmentationNetwork(seg_inputs, 2, config.seg_width, depth=config.seg_depth)
                             if config.mode in ("full", "seg_only") else None)
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
        """Training forward pass on (augmented) images ``[B, 1, H, W]`` in [0, 1]."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
        reconstruction = logits = None
        if self.reconstruction is not None:
            reconstruction = self.reconstruction(self.highpass(images))
        if self.segmentation is not None:
            if reconstruction is not None:
                # the reconstruction is NOT detached: L_seg also trains R (DESIGN §1.4)
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

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference on test images ``[B, 1, H, W]`` in [0, 1] (eval mode, current alpha).

        Returns ``(maps [B, H, W], scores [B])``, float32."""
        was_training = self.training
        self.eval()
        try:
            maps = self.anomaly_maps(images, self(images))
        finally:
            self.train(was_training)
        return maps, image_scores(maps, self.config.effective_score_filter)


# ---------------------------------------------------------------------------- checkpoints

def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """Serialise a checkpoint dict (see :mod:`medad_fast.train`) to bytes for an atomic write."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    return buffer.getvalue()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    expected: Config | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file).

    With ``expected``, refuse (``ValueError``) a checkpoint whose architecture differs,
    e.g. one trained with ``--preset paper`` loaded by a ``--preset small`` model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that needs code to load
        raise ValueError(f"{path} is not a readable medad_fast checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a medad_fast checkpoint (format tag "
                         f"{state.get('format') if isinstance(state, dict) else None!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    if expected is not None:
        saved = Config.from_dict(state["config"]).architecture()
        wanted = expected.architecture()
        if saved != wanted:
            differences = ", ".join(f"{k}: checkpoint {saved[k]!r} vs requested {wanted[k]!r}"
                                    for k in wanted if saved[k] != wanted[k])
            raise ValueError(f"checkpoint {path} was trained with preset {saved['preset']!r} and does not "
                             f"fit a model of preset {wanted['preset']!r} ({differences}); use the same "
                             f"--preset/widths/mode as the checkpoint or a new run directory")
    return state


def model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                          expected: Config | None = None
                          ) -> tuple[FrequencyAwareModel, Config, dict[str, Any]]:
    """Rebuild the model of a checkpoint, with its weights and its stored alpha, in eval mode.

    Returns ``(model, config, checkpoint dict)``."""
    state = load_checkpoint(path, map_location=device, expected=expected)
    config = Config.from_dict(state["config"])
    model = FrequencyAwareModel(config).to(device)
    model.load_state_dict(state["model"])
    model.alpha = float(state.get("alpha", 0.0))
    model.eval()
    return model, config, state
