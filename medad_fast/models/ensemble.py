"""K convolutional autoencoders evaluated in one batched pass (DDAD's reconstruction
ensembles: Cai et al., "Dual-distribution discrepancy with self-supervised refinement for
anomaly detection in medical images", Medical Image Analysis 2023).

:class:`AutoencoderEnsemble` is K copies of :class:`~medad_fast.models.ConvAutoencoder`
(same blocks, same widths) laid side by side along the channel axis: member ``k`` owns
channels ``[k C, (k + 1) C)`` of every layer, and every convolution after the first is a
grouped convolution with ``groups = K``, so no member sees another's channels. The first
convolution reads the one input channel that all members share, so it is an ordinary
convolution with ``K w`` output channels (no copy of the input per member). BatchNorm,
ReLU, max-pooling and bilinear up-sampling act per channel, so they are per member as they
stand; each member's BatchNorm statistics come from the batch alone, as in a single
autoencoder.

Member ``k``'s weights are the slice ``[k C_out, (k + 1) C_out)`` along dim 0 of every
tensor, so :meth:`AutoencoderEnsemble.member` extracts a standalone
:class:`~medad_fast.models.ConvAutoencoder` and :meth:`AutoencoderEnsemble.from_members`
builds the ensemble from K of them. Adam's update is element-wise, so one Adam over the
ensemble's stacked weights, with the loss summed over the members, takes exactly the steps
that K Adams over the K members would take (tests/test_ddad.py checks this in float64).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .autoencoder import ConvAutoencoder
from .layers import init_weights, level_widths, pad_to_multiple

__all__ = ["AutoencoderEnsemble"]


def _grouped_block(in_channels: int, out_channels: int, members: int, shared_input: bool = False) -> nn.Sequential:
    """K ``3x3 conv + BN + ReLU`` side by side: ``[B, K in, H, W] -> [B, K out, H, W]``
    (``shared_input``: ``[B, in, H, W]`` read by every member, an ordinary convolution)."""
    return nn.Sequential(
        nn.Conv2d(in_channels if shared_input else members * in_channels, members * out_channels, 3, padding=1,
                  groups=1 if shared_input else members),
        nn.BatchNorm2d(members * out_channels),
        nn.ReLU(inplace=True),
    )


def _grouped_double(in_channels: int, mid: int, out: int, members: int, shared_input: bool = False) -> nn.Sequential:
    """K :func:`~medad_fast.models.layers.double_conv` blocks side by side."""
    return nn.Sequential(_grouped_block(in_channels, mid, members, shared_input), _grouped_block(mid, out, members))


class AutoencoderEnsemble(nn.Module):
    """``[B, 1, H, W] -> [K, B, 1, H, W]``: the reconstructions of K autoencoders with the
    architecture of :class:`~medad_fast.models.ConvAutoencoder` (``base_width``,
    ``latent_channels``, ``depth``), in one pass of grouped convolutions.

    Any ``H, W`` (zero-padded to a multiple of ``2^depth`` and cropped back, as the single one).
    """

    def __init__(self, members: int = 3, base_width: int = 32, latent_channels: int = 16, depth: int = 4) -> None:
        super().__init__()
        if members < 1:
            raise ValueError(f"members must be >= 1; got {members}")
        if base_width < 1 or latent_channels < 1:
            raise ValueError(f"base_width and latent_channels must be >= 1; got {base_width}, {latent_channels}")
        if not 1 <= depth <= 8:
            raise ValueError(f"depth must be in 1..8; got {depth}")
        K = members
        self.members, self.base_width, self.latent_channels, self.depth = K, base_width, latent_channels, depth
        widths = level_widths(base_width, depth)
        self.size_multiple = 2 ** depth
        self.encoder = nn.ModuleList()
        previous = 1
        for index, width in enumerate(widths):
            self.encoder.append(_grouped_double(previous, width, width, K, shared_input=index == 0))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.squeeze = nn.Sequential(nn.Conv2d(K * previous, K * latent_channels, 1, groups=K), nn.ReLU(inplace=True))
        self.expand = nn.Sequential(nn.Conv2d(K * latent_channels, K * previous, 1, groups=K), nn.ReLU(inplace=True))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.decoder = nn.ModuleList(_grouped_double(widths[i + 1], widths[i], widths[i], K)
                                     for i in reversed(range(depth)))
        self.final = nn.Conv2d(K * widths[0], K, kernel_size=3, padding=1, groups=K)
        # per element, so the same law as K single autoencoders (not the same draws: use
        # from_members for that)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"input must have shape [B, 1, H, W]; got {list(x.shape)}")
        x, (H, W) = pad_to_multiple(x, self.size_multiple)
        for index, block in enumerate(self.encoder):
            if index > 0:
                x = self.pool(x)
            x = block(x)
        x = self.expand(self.squeeze(x))
        for block in self.decoder:
            x = block(self.up(x))
        out = self.final(x)[..., :H, :W]  # [B, K, H, W]
        return out.transpose(0, 1).unsqueeze(2)  # [K, B, 1, H, W]

    # ------------------------------------------------------------------ members
    def _pairs(self, single: ConvAutoencoder) -> list[tuple[str, torch.Tensor]]:
        """(name, the ensemble's tensor) for every entry of a single autoencoder's state dict
        (the two share the module names)."""
        own = self.state_dict()
        return [(name, own[name]) for name in single.state_dict()]

    def _single(self) -> ConvAutoencoder:
        return ConvAutoencoder(self.base_width, self.latent_channels, self.depth)

    @torch.no_grad()
    def member(self, k: int) -> ConvAutoencoder:
        """Member ``k`` as a standalone :class:`~medad_fast.models.ConvAutoencoder` (a copy:
        its weights, BatchNorm statistics and mode; same dtype and device)."""
        if not 0 <= k < self.members:
            raise IndexError(f"member {k} of an ensemble of {self.members}")
        single = self._single()
        reference = next(self.parameters())
        single.to(device=reference.device, dtype=reference.dtype)
        state = {}
        for name, tensor in self._pairs(single):
            if tensor.dim() == 0:  # num_batches_tracked: one counter for all members
                state[name] = tensor.clone()
            else:
                rows = tensor.shape[0] // self.members
                state[name] = tensor[k * rows:(k + 1) * rows].clone()
        single.load_state_dict(state)
        return single.train(self.training)

    @classmethod
    @torch.no_grad()
    def from_members(cls, singles: Sequence[ConvAutoencoder]) -> AutoencoderEnsemble:
        """The ensemble of ``singles`` (same architecture each): member ``k`` = ``singles[k]``."""
        if not singles:
            raise ValueError("from_members needs at least one autoencoder")
        first = singles[0]
        widths = [block[0][0].out_channels for block in first.encoder]
        ensemble = cls(len(singles), widths[0], first.squeeze[0].out_channels, len(widths) - 1)
        reference = next(first.parameters())
        ensemble.to(device=reference.device, dtype=reference.dtype)
        states = [s.state_dict() for s in singles]
        merged = {}
        for name, tensor in ensemble._pairs(first):
            parts = [state[name] for state in states]
            merged[name] = parts[0].clone() if tensor.dim() == 0 else torch.cat(parts, dim=0)
        ensemble.load_state_dict(merged)
        return ensemble.train(first.training)
