"""Building blocks shared by the reconstruction and segmentation networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["conv_bn_relu", "double_conv", "level_widths", "double_conv_encoder", "pad_to_multiple", "encode",
           "encode_levels", "init_weights"]


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """``3x3 conv (padding 1) + BatchNorm + ReLU``; keeps ``H, W``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """DRAEM's block: two ``3x3 conv + BN + ReLU`` (``in -> mid -> out``)."""
    return nn.Sequential(conv_bn_relu(in_channels, mid_channels), conv_bn_relu(mid_channels, out_channels))


def level_widths(base_width: int, depth: int) -> list[int]:
    """Channel widths of the ``depth + 1`` encoder levels: ``w * min(2^i, 8)`` (DRAEM's
    ``w, 2w, 4w, 8w, 8w, ...``)."""
    return [base_width * min(2 ** i, 8) for i in range(depth + 1)]


def double_conv_encoder(in_channels: int, widths: list[int]) -> nn.ModuleList:
    """One :func:`double_conv` block per level, ``in_channels -> widths[0] -> widths[1] ...``."""
    blocks, previous = nn.ModuleList(), in_channels
    for width in widths:
        blocks.append(double_conv(previous, width, width))
        previous = width
    return blocks


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad ``[B, C, H, W]`` at the bottom/right so ``H`` and ``W`` are multiples of
    ``multiple`` (what the pooling depth needs). Zero is the background value of the liver
    slices, so the padding looks like more background. Returns the padded tensor and the
    original ``(H, W)`` to crop the output back to."""
    H, W = x.shape[-2:]
    pad_h, pad_w = (-H) % multiple, (-W) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x, (H, W)


def encode(blocks: nn.ModuleList, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoder pass of the skip-less encoder-decoders: ``blocks`` in order with ``pool``
    between them (not before the first). Returns the bottleneck feature."""
    for index, block in enumerate(blocks):
        if index > 0:
            x = pool(x)
        x = block(x)
    return x


def encode_levels(blocks: nn.ModuleList, pool: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Like :func:`encode`, for the U-Nets: every level's feature, shallowest first."""
    features = []
    for index, block in enumerate(blocks):
        if index > 0:
            x = pool(x)
        x = block(x)
        features.append(x)
    return features


def init_weights(module: nn.Module) -> None:
    """DRAEM's initialisation: conv weights ``N(0, 0.02)``, BatchNorm weights ``N(1, 0.02)``
    and biases 0 (use with ``model.apply(init_weights)``)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
