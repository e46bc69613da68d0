"""A plain convolutional autoencoder: the reconstruction baseline of the anomaly-detection
surveys (train on normal slices only; an anomaly is what the network cannot rebuild).

Encoder: ``depth + 1`` blocks of two ``3x3 conv + BN + ReLU`` with widths
``w * min(2^i, 8)`` and a 2x2 max-pool between blocks; a ``1x1`` conv squeezes the
bottleneck to ``latent_channels`` (the information bottleneck that keeps the network from
learning the identity) and another expands it back. Decoder: per level, bilinear x2
up-sampling and two ``3x3 conv + BN + ReLU`` down to that level's width; a final ``3x3``
conv to one channel. No skip connections.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import double_conv, double_conv_encoder, encode, init_weights, level_widths, pad_to_multiple

__all__ = ["ConvAutoencoder"]


class ConvAutoencoder(nn.Module):
    """``[B, 1, H, W] -> [B, 1, H, W]``; any ``H, W`` (zero-padded to a multiple of
    ``2^depth`` and cropped back)."""

    def __init__(self, base_width: int = 32, latent_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        if base_width < 1 or latent_channels < 1:
            raise ValueError(f"base_width and latent_channels must be >= 1; got {base_width}, {latent_channels}")
        if not 1 <= depth <= 8:
            raise ValueError(f"depth must be in 1..8; got {depth}")
        widths = level_widths(base_width, depth)
        self.size_multiple = 2 ** depth
        self.encoder = double_conv_encoder(1, widths)
        previous = widths[-1]
        self.pool = nn.MaxPool2d(2)
        self.squeeze = nn.Sequential(nn.Conv2d(previous, latent_channels, kernel_size=1), nn.ReLU(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(latent_channels, previous, kernel_size=1), nn.ReLU(inplace=True))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.decoder = nn.ModuleList(double_conv(widths[i + 1], widths[i], widths[i]) for i in reversed(range(depth)))
        self.final = nn.Conv2d(widths[0], 1, kernel_size=3, padding=1)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (H, W) = pad_to_multiple(x, self.size_multiple)
        x = encode(self.encoder, self.pool, x)
        x = self.expand(self.squeeze(x))
        for block in self.decoder:
            x = block(self.up(x))
        return self.final(x)[..., :H, :W]
