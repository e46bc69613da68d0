"""Weight-decay segmentation sub-network ``S`` (the paper's weight-decay skip connections).

A U-Net in the WDMT layout: the encoder feature ``E_i`` and the up-sampled decoder feature
``D_i`` have the SAME channel count ``c_i`` at every level, so the skip connection can mix
them: ``D'_i = concat(alpha E_i + (1 - alpha) D_i, stopgrad(D_i))`` (:func:`ops.skip_merge`),
and the decoder block after it takes ``2 c_i`` channels.

Depth: ``depth`` 2x2 max-pools between ``depth + 1`` encoder blocks of widths
``w * min(2^i, 8)``; the default 5 is DRAEM's discriminative network (``w, 2w, 4w, 8w, 8w,
8w``). Once alpha has decayed to 0 the encoder features no longer reach the decoder, so the
bottleneck (side / 2^depth) bounds how finely the map can localise: small images want a
shallower network. Decoder level ``i`` (deepest first):
bilinear x2 up-sampling + ``3x3 conv + BN + ReLU`` to ``c_i`` channels (= ``D_i``),
skip merge with ``E_i`` (-> ``2 c_i``), two ``3x3 conv + BN + ReLU`` back to ``c_i``.
A final ``3x3`` conv gives the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import SkipMerge
from .layers import conv_bn_relu, double_conv, double_conv_encoder, encode_levels, level_widths, pad_to_multiple

__all__ = ["SegmentationNetwork"]


class SegmentationNetwork(nn.Module):
    """``[B, in_channels, H, W] -> [B, out_channels, H, W]`` logits.

    ``alpha`` (property) sets the weight of the encoder feature in every skip connection;
    the training loop updates it each iteration. Any ``H, W``: zero-padded to a multiple
    of ``2^depth`` (32 for the default five pools) and cropped back.
    """

    def __init__(self, in_channels: int = 2, out_channels: int = 2, base_width: int = 64,
                 alpha: float = 1.0, depth: int = 5) -> None:
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1; got {base_width}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        w = base_width
        widths = level_widths(w, depth)
        self.size_multiple = 2 ** depth
        self.encoder = double_conv_encoder(in_channels, widths)
        previous = widths[-1]
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.up_convs = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(widths[:-1]):  # levels depth-1 .. 0
            self.up_convs.append(conv_bn_relu(previous, width))  # D_i has c_i = width of E_i
            self.skips.append(SkipMerge(alpha))
            self.decoder.append(double_conv(2 * width, width, width))
            previous = width
        self.final = nn.Conv2d(w, out_channels, kernel_size=3, padding=1)

    @property
    def alpha(self) -> float:
        return self.skips[0].alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {value}")
        for skip in self.skips:
            skip.alpha = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (H, W) = pad_to_multiple(x, self.size_multiple)
        features = encode_levels(self.encoder, self.pool, x)
        x = features.pop()  # bottleneck
        for up_conv, skip, block in zip(self.up_convs, self.skips, self.decoder):
            decoder_feature = up_conv(self.up(x))
            x = block(skip(features.pop(), decoder_feature))
        return self.final(x)[..., :H, :W]
