"""DDAD's anomaly score refinement network (ASR; Cai et al., "Dual-distribution discrepancy
with self-supervised refinement for anomaly detection in medical images", Medical Image
Analysis 2023): a small U-Net from the initial anomaly maps to a refined one.

Input ``[B, in_channels, H, W]`` (DDAD: the image and its intra- and inter-discrepancy
maps, 3 channels); output ``[B, 1, H, W] >= 0`` (softplus), regressed onto the true
per-pixel error of a synthetic anomaly. The input first goes through a BatchNorm without
affine weights: the discrepancy maps are some 100x smaller than the image, and each channel
should reach the first convolution on the same scale. Encoder: ``depth + 1`` blocks of two
``3x3 conv + BN + ReLU`` with widths ``w * min(2^i, 8)``, 2x2 max-pool between them;
decoder: bilinear x2 up-sampling, concatenation with the encoder's feature of that level
(ordinary U-Net skips) and two ``3x3 conv + BN + ReLU``; a ``1x1`` conv to one channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import double_conv, double_conv_encoder, encode_levels, init_weights, level_widths, pad_to_multiple

__all__ = ["RefinementUNet"]


class RefinementUNet(nn.Module):
    """``[B, in_channels, H, W] -> [B, 1, H, W]``, non-negative; any ``H, W``."""

    def __init__(self, in_channels: int = 3, base_width: int = 16, depth: int = 3) -> None:
        super().__init__()
        if in_channels < 1 or base_width < 1:
            raise ValueError(f"in_channels and base_width must be >= 1; got {in_channels}, {base_width}")
        if not 1 <= depth <= 8:
            raise ValueError(f"depth must be in 1..8; got {depth}")
        widths = level_widths(base_width, depth)
        self.size_multiple = 2 ** depth
        self.encoder = double_conv_encoder(in_channels, widths)
        previous = widths[-1]
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        # level i: up-sampled level i+1 concatenated with the encoder's level i
        self.decoder = nn.ModuleList()
        for i in reversed(range(depth)):
            self.decoder.append(double_conv(previous + widths[i], widths[i], widths[i]))
            previous = widths[i]
        self.final = nn.Conv2d(widths[0], 1, kernel_size=1)
        self.apply(init_weights)
        self.input_norm = nn.BatchNorm2d(in_channels, affine=False)  # no weights: init_weights has nothing to set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (H, W) = pad_to_multiple(self.input_norm(x), self.size_multiple)
        features = encode_levels(self.encoder, self.pool, x)
        x = features[-1]
        for block, skip in zip(self.decoder, reversed(features[:-1])):
            x = block(torch.cat([self.up(x), skip], dim=1))
        # softplus: an error magnitude is >= 0, and unlike ReLU it never stops the gradient
        return F.softplus(self.final(x))[..., :H, :W]
