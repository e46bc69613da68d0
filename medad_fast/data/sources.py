"""Anomaly-source images for the synthesis (what gets blended into the Perlin-masked region).

- :func:`load_anomaly_sources`: a folder of images (the paper uses Brain Tumor MRI JPGs;
  DRAEM uses DTD textures), any mode -> grayscale float in [0, 1], resized to S x S.
- :func:`perlin_texture_sources`: the fallback when no folder is given: DRAEM-like
  textures from a few octaves of smooth noise with a random contrast, drawn from a
  caller-passed ``torch.Generator`` (same seed -> same textures).
- :func:`anomaly_source_pool`: one or the other, as a run uses them (the folder of
  ``--anomaly-source`` if given, else seeded textures); :func:`training_sources`: the pool
  the synthesis-based methods train with (the validation set draws its own, other seed).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from medad_fast.data.dataset import check_size
from medad_fast.data.layout import IMAGE_SUFFIXES, collect_image_files
from medad_fast.io import read_image_gray, resize_images

if TYPE_CHECKING:
    from medad_fast.config import Config

__all__ = ["SOURCE_SUFFIXES", "TRAINING_SOURCE_SEED_OFFSET", "list_anomaly_sources", "load_anomaly_sources",
           "perlin_texture_sources", "anomaly_source_pool", "training_sources"]

#: added to the run's seed for the Perlin textures of training (seed: the weights, seed + 1:
#: the method's step generator)
TRAINING_SOURCE_SEED_OFFSET = 2

# One list for every image the package reads (medad_fast.data.layout); the old name stays.
SOURCE_SUFFIXES = IMAGE_SUFFIXES


def list_anomaly_sources(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, so DTD's class sub-folders work), sorted by
    their path relative to ``folder``; hidden files are skipped
    (:func:`medad_fast.data.layout.collect_image_files`).

    Raises ``FileNotFoundError`` naming the folder if it does not exist or holds no image.
    """
    return collect_image_files(folder, what="anomaly source")


def load_anomaly_sources(folder: str | os.PathLike, size: int, max_images: int | None = None) -> torch.Tensor:
    """Load the anomaly-source images of ``folder`` -> float32 ``[N, 1, size, size]`` in [0, 1].

    Images are converted to grayscale (16-bit / colour handled, see
    :func:`medad_fast.io.read_image_gray`) and resized with area averaging (shrink) or
    bilinear interpolation (enlarge); non-square images are stretched to the square.
    ``max_images`` keeps the first N files in sorted order. An unreadable file raises
    ``ValueError`` naming it.
    """
    size = check_size(size)
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"max_images must be None or an integer >= 1, got {max_images!r}")
    files = list_anomaly_sources(folder)[:max_images]
    sources = torch.empty(len(files), 1, size, size, dtype=torch.float32)
    for i, path in enumerate(files):
        image = torch.from_numpy(read_image_gray(path))[None, None]
        sources[i] = resize_images(image, size)[0].clamp_(0.0, 1.0)
    return sources


def perlin_texture_sources(n: int, size: int, generator: torch.Generator, octaves: int = 6) -> torch.Tensor:
    """``n`` random smooth-noise textures -> float32 ``[n, 1, size, size]`` in [0, 1].

    Per texture: octaves of value noise on lattices of 2, 4, ..., 2^octaves cells (bicubic
    interpolation of random lattice values; capped so that a cell spans >= 4 pixels),
    weighted by a random persistence from a random lowest octave; half of them "turbulent" (absolute value: sharp creases, like marble);
    then min-max normalised and given a random contrast: gamma in [0.5, 2], output range
    ``[lo, hi]`` with lo in [0, 0.4], hi in [0.6, 1]. All randomness comes from
    ``generator``; the result lives on the generator's device.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if octaves < 1:
        raise ValueError(f"octaves must be >= 1, got {octaves}")
    device = generator.device
    # Finest lattice: at least 4 px per cell, finer would just be pixel noise.
    octaves = max(1, min(octaves, int(math.log2(max(size, 8) / 4))))

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator, device=device)

    # Per-texture octave weights: persistence^j from a random first octave, zero below it.
    persistence = uniform(n, 1, low=0.35, high=0.75)
    first_octave = torch.floor(uniform(n, 1, high=min(3, octaves) - 1e-6))
    level = torch.arange(octaves, device=device, dtype=torch.float32)[None]
    weights = torch.where(level >= first_octave, persistence ** (level - first_octave), 0.0)

    noise = torch.zeros(n, 1, size, size, device=device)
    for j in range(octaves):
        cells = 2 ** (j + 1)
        lattice = uniform(n, 1, cells + 1, cells + 1, low=-1.0, high=1.0)
        layer = F.interpolate(lattice, size=(size, size), mode="bicubic", align_corners=True)
        noise += weights[:, j, None, None, None] * layer

    turbulent = uniform(n, 1, 1, 1) < 0.5
    noise = torch.where(turbulent, noise.abs(), noise)

    flat = noise.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    normalised = (noise - low[:, None, None, None]) / (high - low).clamp_min(1e-8)[:, None, None, None]
    gamma = torch.exp(uniform(n, 1, 1, 1, low=-0.693, high=0.693))  # 0.5 .. 2
    out_low, out_high = uniform(n, 1, 1, 1, high=0.4), uniform(n, 1, 1, 1, low=0.6, high=1.0)
    textures = out_low + (out_high - out_low) * normalised.clamp(0.0, 1.0) ** gamma
    return textures.to(torch.float32)


def anomaly_source_pool(folder: str | os.PathLike | None, size: int, n: int, seed: int) -> torch.Tensor:
    """``float32 [K, 1, size, size]`` on the CPU: the images of ``folder`` (at most ``n``,
    :func:`load_anomaly_sources`), or, when ``folder`` is None or empty, ``n`` Perlin
    textures drawn from ``seed`` (:func:`perlin_texture_sources`)."""
    if folder:
        return load_anomaly_sources(folder, size, max_images=n)
    return perlin_texture_sources(n, size, torch.Generator().manual_seed(seed))


def training_sources(config: Config, pool_size: int) -> torch.Tensor:
    """The anomaly-source pool a run trains with (the methods whose
    ``uses_anomaly_sources`` is set): ``run.anomaly_source``'s images (at most
    ``pool_size``), else Perlin textures from ``run.seed + TRAINING_SOURCE_SEED_OFFSET``."""
    run = config.run
    return anomaly_source_pool(run.anomaly_source, run.image_size, pool_size, run.seed + TRAINING_SOURCE_SEED_OFFSET)
