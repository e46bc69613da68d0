"""Batched, liver-aware anomaly synthesis on the training device (the paper's liver-aware synthesis).

:class:`AnomalySynthesizer` draws every random parameter of a batch from a caller-supplied
``torch.Generator`` (on the device of the images, so the same seed gives the same batch and
nothing crosses to the host but the retry count) and calls the fused
:func:`medad_fast.ops.synthesize_anomalies` once per try:

* lattice resolution ``2^k`` cells per axis, ``k ~ U{0..5}`` drawn independently for y, x;
* lattice gradient angles ``U(0, 2 pi)`` on a ``[B, 33, 33]`` tensor (enough for 32 cells);
* rotation of the noise field ``U(-90 deg, 90 deg)`` (radians);
* opacity ``beta ~ U(0.1, 1.0)``;
* the sample is anomalous with probability ``p_anomaly`` (0.5), else it stays normal;
* the anomaly source of each sample is drawn uniformly from a pool tensor kept on the device;
  an optional ``source_transform(sources, generator)`` (e.g. DRAEM's source augmentation,
  :func:`medad_fast.augment.augment_anomaly_sources`) changes the drawn sources, after the
  lattice draws.

An anomalous sample whose mask comes out empty (the noise blob fell outside the liver) is
redrawn, up to ``max_retries`` times: each retry draws a new lattice and rotation for the
failed samples only and runs the fused op on that subset. A sample still empty after the
last retry stays normal (its mask is empty, so the loss treats it as normal).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import ops

__all__ = ["AnomalySynthesizer"]


class AnomalySynthesizer:
    """Callable ``(images [B,1,H,W], generator) -> (augmented [B,1,H,W], mask [B,1,H,W])``.

    Args:
        sources: ``[N, 1, H, W]`` anomaly-source pool (float, values in [0, 1]) on the
            training device; ``H, W`` must equal the training images'.
        p_anomaly: probability that a sample gets an anomaly.
        max_retries: redraws of the lattice for anomalous samples whose mask is empty.
        threshold: Perlin threshold of the mask (0.5).
        roi_threshold: liver mask ``I > roi_threshold`` (0.0; ``-inf`` switches the liver
            localisation off).
        max_log2_res: ``k`` of the lattice resolution ``2^k`` is drawn from ``0..max_log2_res``.
        beta_range: opacity range ``[lo, hi)``.
        max_rotation: rotation drawn from ``U(-max_rotation, max_rotation)`` radians.
        source_transform: ``None`` or a callable ``(sources [B,1,H,W] float32, generator) ->
            sources``, applied to each batch's drawn sources (its randomness from the generator).
    """

    def __init__(self, sources: torch.Tensor, p_anomaly: float = 0.5, max_retries: int = 10,
                 threshold: float = 0.5, roi_threshold: float = 0.0, max_log2_res: int = 5,
                 beta_range: tuple[float, float] = (0.1, 1.0), max_rotation: float = math.pi / 2,
                 source_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> None:
        if not isinstance(sources, torch.Tensor) or sources.dim() != 4 or sources.shape[1] != 1:
            shape = list(sources.shape) if isinstance(sources, torch.Tensor) else type(sources).__name__
            raise ValueError(f"sources must be a tensor [N, 1, H, W]; got {shape}")
        if sources.shape[0] < 1:
            raise ValueError("sources must hold at least one anomaly-source image")
        if not sources.is_floating_point():
            raise ValueError(f"sources must be a float tensor with values in [0, 1]; got {sources.dtype}")
        if not 0.0 <= p_anomaly <= 1.0:
            raise ValueError(f"p_anomaly must be in [0, 1]; got {p_anomaly}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0; got {max_retries}")
        if max_log2_res < 0:
            raise ValueError(f"max_log2_res must be >= 0; got {max_log2_res}")
        lo, hi = beta_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= lo <= hi <= 1; got {beta_range}")
        self.sources = sources
        self.p_anomaly = float(p_anomaly)
        self.max_retries = int(max_retries)
        self.threshold = float(threshold)
        self.roi_threshold = float(roi_threshold)
        self.max_log2_res = int(max_log2_res)
        self.beta_range = (float(lo), float(hi))
        self.max_rotation = float(max_rotation)
        if source_transform is not None and not callable(source_transform):
            raise ValueError(f"source_transform must be None or callable; got {type(source_transform).__name__}")
        self.source_transform = source_transform
        #: number of retries the last call needed (for logging)
        self.last_retries = 0

    @property
    def device(self) -> torch.device:
        return self.sources.device

    def to(self, device: torch.device | str) -> AnomalySynthesizer:
        """Move the source pool to ``device`` (in place; returns self)."""
        self.sources = self.sources.to(device)
        return self

    def _draw_lattice(self, n: int, generator: torch.Generator, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(angles [n, R+1, R+1], res [n, 2] int64, rotation [n])`` with ``R = 2^max_log2_res``."""
        device = self.device
        nodes = 2 ** self.max_log2_res + 1
        log2_res = torch.randint(0, self.max_log2_res + 1, (n, 2), generator=generator, device=device)
        res = torch.ones_like(log2_res) << log2_res  # 2^k, exact integers
        angles = torch.rand(n, nodes, nodes, generator=generator, device=device, dtype=dtype) * (2 * math.pi)
        rotation = (torch.rand(n, generator=generator, device=device, dtype=dtype) * 2 - 1) * self.max_rotation
        return angles, res, rotation

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthesize anomalies into a batch of normal images.

        Args:
            images: ``[B, 1, H, W]`` float in [0, 1], on the device of the source pool.
            generator: ``torch.Generator`` on that device; all randomness comes from it.

        Returns:
            ``(augmented, mask)``, both ``[B, 1, H, W]`` in the dtype of ``images``;
            ``mask`` is 0/1. Pixels outside the mask are bit-identical to ``images``.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
            shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [B, 1, H, W]; got {shape}")
        if images.device != self.device:
            raise ValueError(f"images are on {images.device} but the source pool is on {self.device}")
        if images.shape[-2:] != self.sources.shape[-2:]:
            raise ValueError(f"images are {list(images.shape[-2:])} but the anomaly sources are "
                             f"{list(self.sources.shape[-2:])}; load the sources at the training size")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        if generator.device.type != images.device.type:
            raise ValueError(f"generator is on {generator.device} but the images are on {images.device}")
        dtype, device = images.dtype, images.device
        B = images.shape[0]
        self.last_retries = 0

        anomalous = torch.rand(B, generator=generator, device=device) < self.p_anomaly
        source_index = torch.randint(0, self.sources.shape[0], (B,), generator=generator, device=device)
        lo, hi = self.beta_range
        beta = lo + (hi - lo) * torch.rand(B, generator=generator, device=device, dtype=dtype)
        sources = self.sources[source_index]
        angles, res, rotation = self._draw_lattice(B, generator, dtype)
        if self.source_transform is not None:
            sources = self.source_transform(sources, generator)
        sources = sources.to(dtype)
        # res = 2^k, k in [0, max_log2_res] (_draw_lattice): the op need not read it back to check it
        res_bounds = (1, 2 ** self.max_log2_res)
        augmented, mask = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous,
                                                   self.threshold, self.roi_threshold, res_bounds=res_bounds)

        failed = anomalous & (mask.flatten(1).amax(dim=1) == 0)
        for _ in range(self.max_retries):
            index = failed.nonzero().squeeze(1)  # one host sync per try
            if index.numel() == 0:
                break
            self.last_retries += 1
            angles, res, rotation = self._draw_lattice(index.numel(), generator, dtype)
            retry_augmented, retry_mask = ops.synthesize_anomalies(
                images[index], sources[index], angles, res, rotation, beta[index],
                torch.ones(index.numel(), dtype=torch.bool, device=device), self.threshold, self.roi_threshold,
                res_bounds=res_bounds)
            augmented[index] = retry_augmented
            mask[index] = retry_mask
            failed[index] = retry_mask.flatten(1).amax(dim=1) == 0
        return augmented, mask
