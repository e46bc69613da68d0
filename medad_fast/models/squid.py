"""SQUID's networks (Xiang et al., "SQUID: Deep Feature In-Painting for Unsupervised Anomaly
Detection", CVPR 2023): the patch encoder, the spatial-aware memory queue, the in-painting
block, the student / teacher decoders and the discriminator.

Shapes: ``B`` images, a ``G x G`` grid of ``P = G^2`` patches per image, patch side
``s = S / G``, encoder features ``C = w 2^L`` channels at ``h = s / 2^L`` (``L`` levels);
a memory item is one patch's bottleneck feature flattened, ``D = (C / 4) h^2`` values.
Patches are ordered row-major (patch ``p`` is at row ``p // G``, column ``p % G``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .layers import conv_bn_relu

__all__ = ["patchify", "unpatchify", "hard_shrink", "shrinkage_attention", "neighbour_features",
           "position_code", "MemoryQueue", "InpaintingBlock", "PatchEncoder", "Decoder", "Discriminator"]


# ----------------------------------------------------------------------------- patches

def patchify(images: torch.Tensor, grid: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B * G^2, C, H / G, W / G]``: the ``G x G`` non-overlapping
    patches of every image, image-major and row-major inside an image."""
    B, C, H, W = images.shape
    if H % grid or W % grid:
        raise ValueError(f"a {H} x {W} image cannot be cut into a {grid} x {grid} grid")
    h, w = H // grid, W // grid
    patches = images.reshape(B, C, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(B * grid * grid, C, h, w)


def unpatchify(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B * G^2, C, h, w]`` -> ``[B, C, G h, G w]``."""
    N, C, h, w = patches.shape
    B = N // (grid * grid)
    images = patches.reshape(B, grid, grid, C, h, w).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(B, C, grid * h, grid * w)


# ----------------------------------------------------------------------------- memory

def hard_shrink(weights: torch.Tensor, threshold: float, eps: float = 1e-12) -> torch.Tensor:
    """MemAE's (Gong et al., ICCV 2019) ReLU form of hard shrinkage, which SQUID applies to
    its memory's attention weights: ``relu(w - lambda) w / (|w - lambda| + eps)``, i.e.
    ``w`` where ``w > lambda`` and 0 elsewhere, with a gradient."""
    return F.relu(weights - threshold) * weights / ((weights - threshold).abs() + eps)


def shrinkage_attention(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """Attention weights over the memory slots (last dim) from similarities:
    ``softmax``, :func:`hard_shrink` with ``threshold``, then renormalised to sum 1. Where
    every weight falls under the threshold (a flat softmax: nothing in memory is closer than
    the rest) the softmax weights are kept, rather than reading nothing."""
    weights = torch.softmax(similarity, dim=-1)
    if threshold <= 0:
        return weights
    shrunk = hard_shrink(weights, threshold)
    total = shrunk.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, shrunk / total.clamp_min(torch.finfo(total.dtype).tiny), weights)


class MemoryQueue(nn.Module):
    """SQUID's spatial-aware memory queue: for each of ``positions`` patch positions, a FIFO
    of ``slots`` normal features of ``dim`` values, written from the training batches
    (detached) and read by similarity attention.

    ``memory [positions, slots, dim]`` is a buffer (it is checkpointed with the weights and
    moves with ``.to()``); ``pointer`` is the next slot to write (the same at every position:
    each write adds one feature per position). Starts as SQUID's: uniform in
    ``+-1/sqrt(dim)`` (from torch's global generator, i.e. the run's seed).

    Read (:meth:`attention`, :meth:`read`): cosine similarity between the query and every
    slot of its own position, divided by ``temperature``, then :func:`shrinkage_attention`.
    SQUID takes the raw dot product; the cosine makes the read independent of the features'
    scale (the raw dot product of thousands of ReLU features saturates the softmax).
    """

    def __init__(self, positions: int, slots: int, dim: int, temperature: float = 0.1,
                 shrink_threshold: float = 0.0) -> None:
        super().__init__()
        self.positions, self.slots, self.dim = positions, slots, dim
        self.temperature, self.shrink_threshold = temperature, shrink_threshold
        bound = 1.0 / math.sqrt(dim)
        self.register_buffer("memory", torch.empty(positions, slots, dim).uniform_(-bound, bound))
        self.pointer = 0

    def attention(self, queries: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """``queries [B, positions, dim]`` -> weights ``[B, positions, slots]`` (each row
        sums to 1) over ``memory`` (default: the queue's)."""
        memory = self.memory if memory is None else memory
        q = F.normalize(queries.float(), dim=-1)
        m = F.normalize(memory.float(), dim=-1)
        similarity = torch.einsum("bpd,psd->bps", q, m) / self.temperature
        return shrinkage_attention(similarity, self.shrink_threshold)

    def snapshot(self) -> torch.Tensor:
        """A copy of the memory ``[positions, slots, dim]`` for a training step's reads: the
        backward pass keeps what the reads used, and the step's write, before the backward,
        changes the queue in place. Taken outside any compiled network, so that a compiled
        graph gets it as an input (inside one, the compiler may drop the copy and save the
        buffer itself, which the write then invalidates)."""
        return self.memory.detach().float().clone()

    def read(self, queries: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """``queries [B, positions, dim]`` -> ``[B, positions, dim]``: the attention-weighted
        sum of ``memory`` (default: the queue itself, for reads with no write before the
        backward, e.g. inference; training reads a :meth:`snapshot`). No gradient reaches
        the memory, which is a buffer."""
        memory = (self.memory if memory is None else memory).detach().float()
        return torch.einsum("bps,psd->bpd", self.attention(queries, memory), memory).to(queries.dtype)

    @torch.no_grad()
    def write(self, features: torch.Tensor) -> None:
        """Append ``features [n, positions, dim]`` in order (item ``i`` of every position to
        slot ``pointer + i`` modulo ``slots``, the oldest overwritten first); the pointer
        advances by ``n``. Of more than ``slots`` items only the last ``slots`` survive."""
        n = features.shape[0]
        if n > self.slots:
            self.pointer = (self.pointer + n - self.slots) % self.slots
            features, n = features[-self.slots:], self.slots
        index = (self.pointer + torch.arange(n, device=self.memory.device)) % self.slots
        self.memory[:, index] = features.detach().to(self.memory.dtype).transpose(0, 1)
        self.pointer = (self.pointer + n) % self.slots


def neighbour_features(features: torch.Tensor, grid: int) -> torch.Tensor:
    """The 8 neighbours of every patch in its 3 x 3 neighbourhood (zeros beyond the grid's
    border), centre excluded: ``[B, P, D]`` -> ``[B, P, 8, D]`` (neighbours row-major)."""
    B, P, D = features.shape
    as_image = features.transpose(1, 2).reshape(B, D, grid, grid)
    windows = F.unfold(as_image, kernel_size=3, padding=1).view(B, D, 9, P)
    keep = [i for i in range(9) if i != 4]
    return windows[:, :, keep].permute(0, 3, 2, 1)


def position_code(positions: int) -> torch.Tensor:
    """SQUID's position condition: patch index ``p`` in binary, ``[positions, bits]`` float,
    ``bits = floor(log2(positions)) + 1``, most significant bit first."""
    bits = int(math.log2(positions)) + 1
    index = torch.arange(positions).unsqueeze(1)
    return ((index >> torch.arange(bits - 1, -1, -1)) & 1).float()


class InpaintingBlock(nn.Module):
    """SQUID's in-painting block: each patch's bottleneck feature is replaced by one
    predicted from the memory and its neighbours.

    1. ``1x1 conv + BN + ReLU`` reduces ``C`` to ``C / 4`` channels; a patch's feature,
       flattened, is its query ``f [B, P, D]``;
    2. ``n = memory.read(f)``: the closest normal features of the same position;
    3. a transformer layer whose query is the patch's own ``f`` and whose keys / values are
       the memory reads of its 8 neighbours: ``n' = relu(LN(attn) + n)``,
       ``n'' = relu(LN(FF(n')) + n')`` (FF: ``D -> D / 4 -> D``); the patch itself is not
       among the keys, so it is in-painted from what surrounds it;
    4. the binary position code appended as channels, ``1x1 conv + BN + ReLU`` back to ``C``;
    5. in training, SQUID's masked shortcut: each feature-map pixel keeps the encoder's
       feature with probability ``1 - mask_ratio`` (drawn from the step's generator).
    """

    def __init__(self, channels: int, feature_side: int, grid: int, slots: int, heads: int,
                 temperature: float, shrink_threshold: float, mask_ratio: float) -> None:
        super().__init__()
        self.grid, self.mask_ratio = grid, mask_ratio
        reduced = max(1, channels // 4)
        self.reduced, self.feature_side = reduced, feature_side
        dim = reduced * feature_side * feature_side
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced),
                                    nn.ReLU(inplace=True))
        self.memory = MemoryQueue(grid * grid, slots, dim, temperature, shrink_threshold)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(nn.Linear(dim, max(1, dim // 4)), nn.ReLU(inplace=True),
                                          nn.Linear(max(1, dim // 4), dim))
        self.norm2 = nn.LayerNorm(dim)
        self.register_buffer("code", position_code(grid * grid), persistent=False)
        self.expand = nn.Sequential(nn.Conv2d(reduced + self.code.shape[1], channels, 1), nn.BatchNorm2d(channels),
                                    nn.ReLU(inplace=True))

    def queries(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features ``[B * P, C, h, h]`` -> the memory queries ``[B, P, D]``."""
        P = self.grid * self.grid
        return self.reduce(features).reshape(features.shape[0] // P, P, -1)

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None,
                memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``features [B * P, C, h, h]`` -> ``(in-painted [B * P, C, h, h], queries [B, P, D])``
        (the queries are what the caller writes to the memory after the step). ``memory``:
        what the reads use (:meth:`MemoryQueue.snapshot` in training; default the queue)."""
        P, side = self.grid * self.grid, self.feature_side
        queries = self.queries(features)
        B, _, D = queries.shape
        recalled = self.memory.read(queries, memory)  # [B, P, D]
        neighbours = neighbour_features(recalled, self.grid).reshape(B * P, 8, D)
        query = queries.reshape(B * P, 1, D)
        attended, _ = self.attention(query, neighbours, neighbours, need_weights=False)
        x = F.relu(self.norm1(attended) + recalled.reshape(B * P, 1, D))
        x = F.relu(self.norm2(self.feed_forward(x)) + x)
        x = x.reshape(B * P, self.reduced, side, side)
        code = self.code.to(x.dtype).view(1, P, -1, 1, 1).expand(B, P, -1, side, side).reshape(B * P, -1, side, side)
        inpainted = self.expand(torch.cat([x, code], dim=1))
        if self.training and self.mask_ratio < 1.0:
            shape = (inpainted.shape[0], 1, side, side)
            keep = torch.rand(shape, generator=generator, device=generator.device if generator is not None else None)
            keep = (keep.to(inpainted.device) < self.mask_ratio).to(inpainted.dtype)
            inpainted = keep * inpainted + (1.0 - keep) * features
        return inpainted, queries


# ----------------------------------------------------------------------------- encoder / decoders

class PatchEncoder(nn.Module):
    """The encoder applied to every patch (shared weights, as SQUID): ``conv-BN-ReLU`` x2 to
    ``w`` channels, then ``levels`` x (2x2 max-pool, ``conv-BN-ReLU`` x2) doubling the
    width: ``[N, 1, s, s]`` -> ``[N, w 2^L, s / 2^L, s / 2^L]``."""

    def __init__(self, width: int, levels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(1, width), conv_bn_relu(width, width))
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), conv_bn_relu(width * 2 ** i, width * 2 ** (i + 1)),
                          conv_bn_relu(width * 2 ** (i + 1), width * 2 ** (i + 1)))
            for i in range(levels))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.stem(patches)
        for down in self.downs:
            x = down(x)
        return x


class Decoder(nn.Module):
    """``levels`` x (bilinear x2 up-sampling, ``conv-BN-ReLU`` x2 halving the width), then a
    ``1x1`` conv and a sigmoid: ``[B, w 2^L, H / 2^L, W / 2^L]`` -> ``[B, 1, H, W]``.
    :meth:`forward` also returns every level's feature (for the distillation)."""

    def __init__(self, width: int, levels: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList(
            nn.Sequential(conv_bn_relu(width * 2 ** (i + 1), width * 2 ** i),
                          conv_bn_relu(width * 2 ** i, width * 2 ** i))
            for i in reversed(range(levels)))
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        levels = []
        for up in self.ups:
            x = up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
            levels.append(x)
        return torch.sigmoid(self.out(x)), levels


class Discriminator(nn.Module):
    """SQUID's discriminator: ``depth`` x (5x5 conv, stride 2, [BN], LeakyReLU 0.2) with
    widths ``w, 2w, 4w, 8w, 8w, ...`` (SQUID: 16 ... 128, no BN after the first), then a
    linear layer on the ``4 x 4`` map (adaptive average pooling makes any side give 4 x 4;
    at 128 x 128 with 5 convs it is the identity). ``[B, 1, H, W]`` -> logits ``[B]``
    (high: real)."""

    def __init__(self, width: int = 16, depth: int = 5, pooled: int = 4) -> None:
        super().__init__()
        layers, previous = [], 1
        for i in range(depth):
            out = width * min(2 ** i, 8)
            layers.append(nn.Conv2d(previous, out, 5, stride=2, padding=2))
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = out
        self.features = nn.Sequential(*layers)
        self.pooled = pooled
        self.classifier = nn.Linear(previous * pooled * pooled, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(images), self.pooled)
        return self.classifier(x.flatten(1)).squeeze(1)
