"""Reconstruction sub-network ``R``: DRAEM's reconstructive encoder-decoder.

Encoder: five blocks of two ``3x3 conv + BN + ReLU`` with widths ``w, 2w, 4w, 8w, 8w`` and a
2x2 max-pool between blocks (four pools). Decoder: four stages of ``bilinear x2 up-sampling
+ 3x3 conv + BN + ReLU`` followed by a block of two convs, widths back down to ``w``, and a
final ``3x3`` conv to the output channels (no activation, as in DRAEM). No skip connections:
the network has to rebuild the image from the bottleneck, which is what makes it forget
anomalies.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import conv_bn_relu, double_conv, double_conv_encoder, encode, level_widths, pad_to_multiple

__all__ = ["ReconstructionNetwork"]


class ReconstructionNetwork(nn.Module):
    """``[B, in_channels, H, W] -> [B, out_channels, H, W]``.

    Any ``H, W``: the input is zero-padded to a multiple of 16 (four pools) and the output
    cropped back, so odd sizes never crash inside a conv.
    """

    #: spatial size the input must be a multiple of (padded to it otherwise)
    size_multiple = 16

    def __init__(self, in_channels: int = 1, out_channels: int = 1, base_width: int = 128) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1; got {base_width}")
        w = base_width
        widths = level_widths(w, 4)  # w, 2w, 4w, 8w, 8w
        self.encoder = double_conv_encoder(in_channels, widths)
        previous = widths[-1]
        self.pool = nn.MaxPool2d(2)
        # decoder stage i: up-sample, conv to the bottleneck width, then two convs that
        # halve the width (DRAEM: 8w -> 8w -> 4w, 4w -> 4w -> 2w, 2w -> 2w -> w, w -> w -> w)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        stage_widths = [(8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w), (w, w)]
        self.up_convs = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width, out_width in stage_widths:
            self.up_convs.append(conv_bn_relu(previous, width))
            self.decoder.append(double_conv(width, width, out_width))
            previous = out_width
        self.final = nn.Conv2d(w, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (H, W) = pad_to_multiple(x, self.size_multiple)
        x = encode(self.encoder, self.pool, x)
        for up_conv, block in zip(self.up_convs, self.decoder):
            x = block(up_conv(self.up(x)))
        return self.final(x)[..., :H, :W]
