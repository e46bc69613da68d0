"""DDAD's anomaly score refinement network (ASR-Net; Cai et al., "Dual-distribution
discrepancy with self-supervised refinement for anomaly detection in medical images",
Medical Image Analysis 2023; public code github.com/caiyu6666/DDAD-ASR,
``models/refine_net.py``, layer for layer).

Input ``[B, 2, H, W]``: the two discrepancy maps ``[A_inter, A_intra]`` (in DDAD-ASR's
order), never the image: it refines scores, it does not look for anomalies itself.
Three ``3x3`` convolutions (padding 1): ``in -> width`` (BatchNorm, ReLU) ``-> width``
(BatchNorm, ReLU) ``-> 2`` logits (normal, anomalous); DDAD's width is 128. PyTorch's
default initialisation, as DDAD's. Any ``H, W``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RefinementNet"]


class RefinementNet(nn.Module):
    """``[B, in_channels, H, W] -> [B, 2, H, W]`` logits (class 1: anomalous)."""

    def __init__(self, in_channels: int = 2, width: int = 128, out_channels: int = 2) -> None:
        super().__init__()
        if in_channels < 1 or width < 1 or out_channels < 1:
            raise ValueError(f"in_channels, width and out_channels must be >= 1; got {in_channels}, {width}, "
                             f"{out_channels}")
        self.in_channels = in_channels
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, out_channels, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must have shape [B, {self.in_channels}, H, W]; got {list(x.shape)}")
        return self.model(x)
