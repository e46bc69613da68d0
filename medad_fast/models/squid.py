"""SQUID's networks (Xiang et al., "SQUID: Deep Feature In-Painting for Unsupervised Anomaly
Detection", CVPR 2023): the patch encoder, the spatial-aware memory queue, the in-painting
block, the student / teacher decoders and the discriminator.

Shapes: ``B`` images, a ``G x G`` grid of ``P = G^2`` patches per image, patch side
``s = S / G``, encoder features ``C = w min(2^L, 16)`` channels at ``h = s / 2^L`` (``L``
levels); a memory item is one patch's bottleneck feature flattened, ``D = (C / 4) h^2``
values. Public code: github.com/tiangexiang/SQUID (``models/``).
Patches are ordered row-major (patch ``p`` is at row ``p // G``, column ``p % G``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


__all__ = ["patchify", "unpatchify", "top_k_attention", "memory_read", "masked_shortcut",
           "neighbour_features", "position_code", "MemoryQueue", "MemoryMatrixBlock", "InpaintingBlock",
           "squid_widths", "ResidualDoubleConv", "PatchEncoder", "Decoder", "Discriminator"]


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

def top_k_attention(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """SQUID's sparse read weights over the memory slots (last dim; its ``gumbel_softmax``,
    which draws no Gumbel noise): ``y = softmax(similarity)``; forward value: the weights of
    ``y`` strictly above its ``k``-th largest value, L1-normalised; backward: the
    straight-through estimator ``(hard - y).detach() + y``, i.e. the gradient of the dense
    softmax ``y``.

    SQUID shrinks with MemAE's ``relu(w - lambda) w / (|w - lambda| + 1e-12)`` at ``lambda`` =
    the ``k``-th largest weight, which zeroes ``w == lambda``: (without ties) the ``k - 1``
    largest weights are kept, as here. The ``where`` form drops the ``1e-12`` (a relative
    change of ``1e-12 / (w - lambda)``) and exports to ONNX, where the ratio came out NaN."""
    weights = torch.softmax(similarity, dim=-1)
    threshold = torch.topk(weights, k, dim=-1).values[..., -1:]
    kept = torch.where(weights > threshold, weights, torch.zeros_like(weights)).detach()
    hard = F.normalize(kept, p=1, dim=-1)
    return (hard - weights).detach() + weights


def memory_read(queries: torch.Tensor, memory: torch.Tensor, k: int) -> torch.Tensor:
    """``queries [B, W, D]`` read from ``memory [W, slots, D]`` (one memory per ``W``):
    raw dot products, :func:`top_k_attention`, weighted sum of the slots (SQUID's read)."""
    similarity = torch.einsum("bwd,wsd->bws", queries, memory)
    return torch.einsum("bws,wsd->bwd", top_k_attention(similarity, k), memory)


def masked_shortcut(new: torch.Tensor, old: torch.Tensor, mask_ratio: float,
                    generator: torch.Generator | None) -> torch.Tensor:
    """SQUID's masked shortcut (training only): each pixel of ``new [N, C, H, W]`` is kept
    with probability ``mask_ratio`` and replaced by ``old``'s elsewhere (one draw per pixel,
    shared by the channels, from ``generator``)."""
    if mask_ratio >= 1.0:
        return new
    shape = (new.shape[0], 1, new.shape[2], new.shape[3])
    draw = torch.rand(shape, generator=generator, device=generator.device if generator is not None else None)
    keep = (draw.to(new.device) < mask_ratio).to(new.dtype)
    return keep * new + (1.0 - keep) * old


class MemoryQueue(nn.Module):
    """SQUID's spatial-aware memory queue: for each of ``positions`` patch positions, a FIFO
    of ``slots`` normal features of ``dim`` values, written from the training batches
    (detached) and read by :func:`memory_read` (dot product, softmax, top-``k`` with the
    straight-through estimator).

    ``memory [positions, slots, dim]`` is a buffer (it is checkpointed with the weights and
    moves with ``.to()``); ``pointer`` is the next slot to write (the same at every position:
    each write adds one feature per position). Starts as SQUID's: uniform in
    ``+-1/sqrt(dim)`` (from torch's global generator, i.e. the run's seed).
    """

    def __init__(self, positions: int, slots: int, dim: int, top_k: int = 5) -> None:
        super().__init__()
        if not 1 <= top_k <= slots:
            raise ValueError(f"top_k {top_k} must be in [1, slots = {slots}]")
        self.positions, self.slots, self.dim, self.top_k = positions, slots, dim, top_k
        bound = 1.0 / math.sqrt(dim)
        self.register_buffer("memory", torch.empty(positions, slots, dim).uniform_(-bound, bound))
        self.pointer = 0

    def snapshot(self) -> torch.Tensor:
        """A copy of the memory ``[positions, slots, dim]`` for a training step's reads: the
        backward pass keeps what the reads used, and the step's write, before the backward,
        changes the queue in place. Taken outside any compiled network, so that a compiled
        graph gets it as an input (inside one, the compiler may drop the copy and save the
        buffer itself, which the write then invalidates)."""
        return self.memory.detach().float().clone()

    def read(self, queries: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """``queries [B, positions, dim]`` -> ``[B, positions, dim]``: :func:`memory_read` of
        ``memory`` (default: the queue itself, for reads with no write before the backward,
        e.g. inference; training reads a :meth:`snapshot`). No gradient reaches the memory,
        which is a buffer; the queries get the straight-through gradient."""
        memory = (self.memory if memory is None else memory).detach().float()
        return memory_read(queries.float(), memory, self.top_k).to(queries.dtype)

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


class MemoryMatrixBlock(nn.Module):
    """SQUID's decoder memory block (``MemoryMatrixBlock`` of its ``models/memory.py``): the
    map ``[N, C, H, W]`` is cut into a ``grid x grid`` grid of windows; window ``i``
    (flattened, ``C (H / grid)^2`` values) is replaced by its read (:func:`memory_read`) of
    its own LEARNED memory matrix ``[slots, dim]`` (a parameter, trained by the generator's
    loss; uniform in ``+-1/sqrt(dim)`` at the start), then the masked shortcut
    (:func:`masked_shortcut`) in training. Values of a window are flattened channel-major
    (SQUID: channel-minor; a fixed permutation of a learned matrix's columns)."""

    def __init__(self, channels: int, side: int, grid: int, slots: int, top_k: int, mask_ratio: float) -> None:
        super().__init__()
        if side % grid:
            raise ValueError(f"a decoder memory block's {side} x {side} map cannot be cut into a {grid} x {grid} grid")
        if not 1 <= top_k <= slots:
            raise ValueError(f"top_k {top_k} must be in [1, decoder memory slots = {slots}]")
        self.grid, self.top_k, self.mask_ratio = grid, top_k, mask_ratio
        dim = channels * (side // grid) ** 2
        bound = 1.0 / math.sqrt(dim)
        self.memory = nn.Parameter(torch.empty(grid * grid, slots, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        N, C, H, W = x.shape
        G = self.grid
        windows = patchify(x, G)  # [N * G^2, C, H / G, W / G]
        read = memory_read(windows.reshape(N, G * G, -1).float(), self.memory.float(), self.top_k)
        out = unpatchify(read.to(x.dtype).reshape(windows.shape), G)
        return masked_shortcut(out, x, self.mask_ratio, generator) if self.training else out


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
    """SQUID's in-painting block (``InpaintBlock``): each patch's bottleneck feature is
    replaced by one predicted from the memory and its neighbours.

    1. ``1x1 conv + BN + ReLU`` reduces ``C`` to ``C / 4`` channels; a patch's feature,
       flattened, is its query ``f [B, P, D]``;
    2. ``n = memory.read(f)``: the closest normal features of the same position;
    3. a transformer layer whose query is the patch's own ``f`` and whose keys / values are
       the memory reads of its 8 neighbours: ``n' = relu(LN(attn) + n)``,
       ``n'' = relu(LN(FF(n')) + n')`` (FF: ``D -> D / 4 -> D``); the patch itself is not
       among the keys, so it is in-painted from what surrounds it;
    4. the binary position code appended as channels, ``1x1 conv + BN + ReLU`` back to ``C``;
    5. in training, the masked shortcut (:func:`masked_shortcut`) with the encoder's feature.
    """

    def __init__(self, channels: int, feature_side: int, grid: int, slots: int, heads: int,
                 top_k: int, mask_ratio: float) -> None:
        super().__init__()
        self.grid, self.mask_ratio = grid, mask_ratio
        reduced = max(1, channels // 4)
        self.reduced, self.feature_side = reduced, feature_side
        dim = reduced * feature_side * feature_side
        self.reduce = nn.Sequential(nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced),
                                    nn.ReLU(inplace=True))
        self.memory = MemoryQueue(grid * grid, slots, dim, top_k)
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
        if self.training:
            inpainted = masked_shortcut(inpainted, features, self.mask_ratio, generator)
        return inpainted, queries


# ----------------------------------------------------------------------------- encoder / decoders

#: decoder levels with an encoder skip concatenated and a memory block, from the bottleneck
#: up; and the levels, from the output down, that work on the whole recombined image (SQUID's
#: ``ops = ['concat', 'concat', 'none', 'none']``, ``decoder_memory`` at its two deepest
#: levels, ``initial_combine = 2``)
DEEP_DECODER_LEVELS = 2
WHOLE_IMAGE_LEVELS = 2


def squid_widths(width: int, levels: int) -> list[int]:
    """Channels of the encoder levels ``0 .. levels``: SQUID's ``filter_list``
    ``w, 2w, 4w, 8w, 16w, 16w``."""
    return [width * min(2 ** i, 16) for i in range(levels + 1)]


class ResidualDoubleConv(nn.Module):
    """SQUID's ``double_conv``: ``conv3x3 (stride) + BN + ReLU`` -> ``a``, then
    ``relu(a + BN(conv3x3(relu(BN(conv3x3(a))))))``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                                   nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                                   nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 3, padding=1),
                                   nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return F.relu(self.conv2(x) + x)


class PatchEncoder(nn.Module):
    """The encoder applied to every patch (shared weights, as SQUID): a
    :class:`ResidualDoubleConv` to ``w`` channels, then ``levels`` stride-2
    :class:`ResidualDoubleConv` (widths :func:`squid_widths`). ``[N, 1, s, s]`` ->
    ``(bottleneck [N, C_L, s / 2^L, s / 2^L], skips)``, ``skips[k]`` the level-``k`` feature
    ``[N, C_k, s / 2^k, s / 2^k]`` before its down-sampling (per patch)."""

    def __init__(self, width: int, levels: int) -> None:
        super().__init__()
        widths = squid_widths(width, levels)
        self.stem = ResidualDoubleConv(1, width)
        self.downs = nn.ModuleList(ResidualDoubleConv(widths[i], widths[i + 1], stride=2) for i in range(levels))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x, skips = self.stem(patches), []
        for down in self.downs:
            skips.append(x)
            x = down(x)
        return x, skips


class Decoder(nn.Module):
    """SQUID's decoder (its ``up_blocks``, with ``memory_slots`` its ``memory_blocks``; the
    teacher is the same without them). Step ``j = 0 .. L-1`` rebuilds level ``k = L-1-j``:
    bilinear up-sampling to the skip's side, then a :class:`ResidualDoubleConv` to ``C_k``;
    at the :data:`DEEP_DECODER_LEVELS` deepest steps the encoder's level-``k`` skip is
    concatenated first (``[skip, x]``) and, in the student, a :class:`MemoryMatrixBlock`
    follows. The patches are recombined into whole images before the last
    :data:`WHOLE_IMAGE_LEVELS` steps (with the skips of those levels; at 2 levels, before the
    first). Then a ``1x1`` conv and a sigmoid.

    :meth:`forward` takes the patch bottleneck ``[B P, C_L, h, h]`` and the encoder's patch
    skips; returns ``(image [B, 1, S, S], levels)`` (every step's output, for the
    distillation)."""

    def __init__(self, width: int, levels: int, grid: int, patch_side: int, memory_slots: int | None = None,
                 top_k: int = 5, mask_ratio: float = 0.95) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels {levels} must be >= 2 (SQUID's decoder recombines the patches two levels "
                             "before the output)")
        widths = squid_widths(width, levels)
        self.grid, self.levels = grid, levels
        self.combine_step = levels - WHOLE_IMAGE_LEVELS
        self.ups, self.memory_blocks = nn.ModuleList(), nn.ModuleList()
        for step in range(levels):
            k = levels - 1 - step
            deep = step < DEEP_DECODER_LEVELS
            self.ups.append(ResidualDoubleConv(widths[k + 1] + (widths[k] if deep else 0), widths[k]))
            if deep and memory_slots is not None:
                side = patch_side // 2 ** k * (1 if step < self.combine_step else grid)
                self.memory_blocks.append(MemoryMatrixBlock(widths[k], side, grid, memory_slots, top_k, mask_ratio))
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        levels = []
        for step, up in enumerate(self.ups):
            k = self.levels - 1 - step
            if step == self.combine_step:
                x = unpatchify(x, self.grid)
            skip = skips[k] if step < self.combine_step else unpatchify(skips[k], self.grid)
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = up(torch.cat([skip, x], dim=1) if step < DEEP_DECODER_LEVELS else x)
            if step < len(self.memory_blocks):
                x = self.memory_blocks[step](x, generator)
            levels.append(x)
        return torch.sigmoid(self.out(x)), levels


class Discriminator(nn.Module):
    """SQUID's discriminator (``SimpleDiscriminator``): ``depth`` x (5x5 conv, stride 2,
    [BN], LeakyReLU 0.2) with widths ``w, 2w, 4w, 8w, 8w, ...`` (SQUID: 16 ... 128, no BN
    after the first), then a linear layer on the flattened ``S / 2^depth`` map (SQUID's
    ``size``; inputs of another side are average-pooled to it). ``[B, 1, S, S]`` -> logits
    ``[B]`` (high: real).

    ``per_image_statistics``: the BNs normalise each image by its own statistics (as BN in
    training mode on a batch of one: what SQUID's scoring does, which never puts ``D`` in
    eval mode and scores one image at a time); no running statistics are read or written."""

    def __init__(self, width: int = 16, depth: int = 5, image_size: int = 128) -> None:
        super().__init__()
        if image_size % 2 ** depth:
            raise ValueError(f"image_size {image_size} must be a multiple of 2^disc_depth = {2 ** depth}")
        layers, previous = [], 1
        for i in range(depth):
            out = width * min(2 ** i, 8)
            layers.append(nn.Conv2d(previous, out, 5, stride=2, padding=2))
            if i > 0:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            previous = out
        self.features = nn.Sequential(*layers)
        self.pooled = image_size // 2 ** depth
        self.classifier = nn.Linear(previous * self.pooled * self.pooled, 1)

    def forward(self, images: torch.Tensor, per_image_statistics: bool = False) -> torch.Tensor:
        x = images
        for layer in self.features:
            if per_image_statistics and isinstance(layer, nn.BatchNorm2d):
                x = F.instance_norm(x, weight=layer.weight, bias=layer.bias, eps=layer.eps)
            else:
                x = layer(x)
        if x.shape[-1] != self.pooled or x.shape[-2] != self.pooled:
            x = F.adaptive_avg_pool2d(x, self.pooled)
        return self.classifier(x.flatten(1)).squeeze(1)
