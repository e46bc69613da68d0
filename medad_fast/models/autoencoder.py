"""Plain autoencoders: the reconstruction baseline of the anomaly-detection surveys (train on
normal slices only; an anomaly is what the network cannot rebuild).

:class:`ConvAutoencoder` (a spatial latent). Encoder: ``depth + 1`` blocks of two ``3x3 conv + BN + ReLU`` with widths
``w * min(2^i, 8)`` and a 2x2 max-pool between blocks; a ``1x1`` conv squeezes the
bottleneck to ``latent_channels`` (the information bottleneck that keeps the network from
learning the identity) and another expands it back. Decoder: per level, bilinear x2
up-sampling and two ``3x3 conv + BN + ReLU`` down to that level's width; a final ``3x3``
conv to one channel. No skip connections.

:class:`DenseAutoencoder` (a dense latent): the AE of MedIAnomaly (Cai et al., arXiv
2404.04518; github caiyu6666/MedIAnomaly, ``reconstruction/networks/ae.py`` with its
``BasicBlock``/``BottleNeck`` at the default options ``--base-width 16 --expansion 1
--hidden-num 1024 -ls 16 --en-depth 1 --de-depth 1``), the network of AE4AD (Cai et al.,
MICCAI 2024), layer for layer: ``depth`` blocks of ``4x4 stride-2 conv (no bias) + BN +
ReLU`` with widths ``w, 2w, 4w, 4w`` (16/32/64/64); the ``4w x S/16 x S/16`` feature
flattened (1,024 values at 64 x 64) through ``Linear -> BN1d -> ReLU -> Linear`` to the
latent vector (16) and back through ``Linear -> BN1d -> ReLU -> Linear``, reshaped, with
no activation; mirrored ``4x4 stride-2`` transposed convs (no bias) + BN + ReLU, the last
one to one channel with neither. PyTorch's default initialisation, as the public code.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import double_conv, double_conv_encoder, encode, init_weights, level_widths, pad_to_multiple

__all__ = ["ConvAutoencoder", "DenseAutoencoder", "dense_level_widths"]


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


def dense_level_widths(base_width: int, depth: int) -> list[int]:
    """Widths of the :class:`DenseAutoencoder` 's stride-2 conv blocks: ``w * 2^min(i, 2)``
    (MedIAnomaly's ``w, 2w, 4w, 4w`` at depth 4)."""
    return [base_width * 2 ** min(i, 2) for i in range(depth)]


def _strided_block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class DenseAutoencoder(nn.Module):
    """``[B, 1, S, S] -> [B, 1, S, S]`` through a dense latent vector of ``latent_size``
    (see the module docstring). The dense layers fix the side: ``S = image_size``, a
    multiple of ``2^depth``; another side is refused (``ValueError``)."""

    def __init__(self, image_size: int = 64, base_width: int = 16, latent_size: int = 16,
                 hidden_size: int = 1024, depth: int = 4) -> None:
        super().__init__()
        if min(base_width, latent_size, hidden_size) < 1:
            raise ValueError(f"base_width, latent_size and hidden_size must be >= 1; got {base_width}, "
                             f"{latent_size}, {hidden_size}")
        if not 1 <= depth <= 8:
            raise ValueError(f"depth must be in 1..8; got {depth}")
        if image_size % 2 ** depth or image_size < 2 ** depth:
            raise ValueError(f"image_size must be a positive multiple of 2^depth = {2 ** depth} (the dense "
                             f"bottleneck flattens a fixed-size feature); got {image_size}")
        widths = dense_level_widths(base_width, depth)
        self.image_size = image_size
        self.feature_shape = (widths[-1], image_size // 2 ** depth, image_size // 2 ** depth)
        flat = widths[-1] * self.feature_shape[1] * self.feature_shape[2]
        down = lambda c_in, c_out: nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1, bias=False)  # noqa: E731
        up = lambda c_in, c_out: nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1,  # noqa: E731
                                                   bias=False)
        self.encoder = nn.Sequential(*(_strided_block(down(c_in, c_out), c_out)
                                       for c_in, c_out in zip([1, *widths[:-1]], widths)))
        self.to_latent = nn.Sequential(nn.Linear(flat, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU(True),
                                       nn.Linear(hidden_size, latent_size))
        self.from_latent = nn.Sequential(nn.Linear(latent_size, hidden_size), nn.BatchNorm1d(hidden_size),
                                         nn.ReLU(True), nn.Linear(hidden_size, flat))
        outs = [*reversed(widths[:-1]), 1]
        self.decoder = nn.Sequential(*(_strided_block(up(c_in, c_out), c_out)
                                       for c_in, c_out in zip(reversed(widths), outs[:-1])),
                                     up(widths[0], 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The latent vectors ``[B, latent_size]`` of ``x [B, 1, S, S]``."""
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"the dense autoencoder was built for {self.image_size} x {self.image_size} images; "
                             f"got {tuple(x.shape[-2:])}")
        return self.to_latent(self.encoder(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        return self.decoder(self.from_latent(z).view(z.shape[0], *self.feature_shape))
