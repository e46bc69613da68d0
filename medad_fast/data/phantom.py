"""Procedural liver-CT phantom: the data of the demo and of the end-to-end tests.

Real CT cannot be shipped, so ``medad-fast phantom OUT`` writes slices that look like
BMAD's liver slices, in the BMAD layout, with pixel masks:

- **Liver**: a smooth, irregular, star-shaped blob: a superellipse whose radius is
  modulated by a few random Fourier harmonics (lopsided, lobulated), random orientation,
  position and size, covering about 25-50 % of the image. Everything outside the liver is
  EXACTLY 0 (BMAD convention: ``image > 0`` is the liver); liver pixels are >= 1/255, so
  they stay > 0 after 8-bit quantisation.
- **Parenchyma**: mean 0.45-0.65, a low-frequency intensity drift (a few plane waves),
  a mild mottling, fine-grained noise (Gaussian noise blurred at ~0.6 px) and a thin
  darker band along the liver border (partial volume with the surrounding fat).
- **Vessels**: 2-3 branching trees of thin tapering tubes plus a few round vessel
  cross-sections, all brighter (contrast phase) or all darker (plain phase) than the
  parenchyma. They are dark/bright tubes and dots in NORMAL slices, so a "dark blob"
  detector is not a perfect lesion detector.
- **Lesions** (abnormal slices only, 1-3 of them): lobulated ellipses of radius 2-12 % of
  the image side (log-uniform), hypodense (75 %) or hyperdense, optional enhancing rim,
  internal heterogeneity and, for large hypodense ones, a necrotic core. Conspicuous
  lesions have |contrast| 0.1-0.35 and edge blur up to 1/4 of the radius; a fraction
  ``0.3 * difficulty`` of the lesions is SUBTLE: |contrast| from ``0.04 / difficulty`` to
  0.1, edge blur up to ``0.4 * difficulty`` of the radius (very blurred). Vessels do not
  run through lesions (tumours displace them). The pixel mask is the lesion's nominal
  outline (where its edge profile crosses 1/2) clipped to the liver.

The hard case of real CT with few normal scans (``--few-slices``): 24 normal training
slices (``--train 24``), and lesions half the size (``--lesion-scale 0.5``: radius 1-6 % of
the side) and fainter (``--difficulty 2``: 60 % of them subtle, down to |contrast| 0.02) in
the valid/test splits. Options given explicitly override these. The livers, vessels and
noise are drawn as in the default mode, so the normal slices are the same kind.

``--liver-scale F`` (default 1) shrinks the liver's outline by F: with 0.65 the liver's box is
about half the slice wide, as on a 512 x 512 CT slice, so resizing the whole slice to the
model's side shrinks the lesions (the case liver-box cropping, ``train --crop liver``, is
for). Lesion radii stay fractions of the slice's side, so they are the same size in pixels.

Randomness: :func:`generate_slice` draws everything from the ``numpy.random.Generator``
it is given. :func:`write_phantom_dataset` gives every slice its own generator seeded by
``(seed, split, kind, index)``, so a slice never depends on how many slices the other
splits (or the other kind) hold: ``--test 200`` writes the same first 50 abnormal test
slices as ``--test 100``.

Rendering is vectorised numpy; per-structure work (vessel segments, lesions) is done on
the structure's bounding box only. 500 slices of 256 x 256 generate and write in seconds.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from medad_fast.data.layout import ABNORMAL_FOLDER, EVAL_SPLITS, MANIFEST_NAME, NORMAL_FOLDER, slice_relpaths
from medad_fast.io import atomic_write_json, check_writable_folder, save_png

__all__ = ["generate_slice", "ellipse_slices", "write_phantom_dataset", "FEW_SLICES"]

GENERATOR_NAME = "medad_fast.phantom"
FORMAT_VERSION = 1
# Seed components of a slice (slice_rng): fixed numbers, so the data never changes with them.
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}
KIND_CODES = {NORMAL_FOLDER: 0, ABNORMAL_FOLDER: 1}
MIN_SIZE = 16

# Lesion parameter ranges (radius as a fraction of the image side, |contrast| in intensity
# units, edge blur as a fraction of the radius). A lesion is "subtle" with probability
# SUBTLE_FRACTION * difficulty; subtle ones reach down to |contrast| 0.04 / difficulty.
LESION_RADIUS_RANGE = (0.02, 0.12)
CONSPICUOUS_CONTRAST_RANGE = (0.1, 0.35)
CONSPICUOUS_MAX_BLUR = 0.25
SUBTLE_FRACTION = 0.3
SUBTLE_MIN_CONTRAST = 0.04  # at difficulty 1
SUBTLE_MAX_BLUR = 0.4  # at difficulty 1
HYPODENSE_PROBABILITY = 0.75
#: ``--few-slices``: few normal training slices, small faint lesions (module docstring)
FEW_SLICES = {"n_train": 24, "lesion_scale": 0.5, "difficulty": 2.0}


# --------------------------------------------------------------------------- geometry helpers


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, float32 [S, S], read-only (cached per size)."""
    coords = np.arange(size, dtype=np.float32)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _box(cy: float, cx: float, half: float, size: int) -> tuple[slice, slice] | None:
    """Bounding box (clipped to the image) of the square ``centre +- half``; None if empty."""
    y0, y1 = max(int(math.floor(cy - half)), 0), min(int(math.ceil(cy + half)) + 1, size)
    x0, x1 = max(int(math.floor(cx - half)), 0), min(int(math.ceil(cx + half)) + 1, size)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


class _LiverShape:
    """Star-shaped liver outline: radius ``R(phi)`` around a centre, phi measured from the
    liver's own axis (``angle``). ``R`` is tabulated on ``n_table`` angles and interpolated."""

    n_table = 1024

    def __init__(self, rng: np.random.Generator, size: int, liver_scale: float = 1.0):
        phi = np.linspace(0.0, 2.0 * np.pi, self.n_table, endpoint=False)
        # Superellipse |x/a|^p + |y/b|^p = 1 in polar form; p in [2, 3.2] goes from an
        # ellipse to a rounded rectangle, b/a in [0.6, 1] gives elongated to round livers.
        p = rng.uniform(2.0, 3.2)
        aspect = rng.uniform(0.6, 1.0)
        base = (np.abs(np.cos(phi)) ** p + np.abs(np.sin(phi) / aspect) ** p) ** (-1.0 / p)
        # Harmonic 1 makes it lopsided (a big right lobe, a thin left lobe), 2-5 lobulate it.
        # Amplitudes sum to < 0.45, so the radius stays positive.
        amplitudes = rng.uniform(0.0, 1.0, 5) * np.array([0.15, 0.12, 0.08, 0.05, 0.05])
        phases = rng.uniform(0.0, 2.0 * np.pi, 5)
        harmonics = np.arange(1, 6)[:, None]
        modulation = 1.0 + (amplitudes[:, None] * np.cos(harmonics * phi + phases[:, None])).sum(0)
        radius = base * modulation  # arbitrary scale for now

        # Scale to the target area: area = 1/2 * integral R^2 dphi (liver_scale: linear size).
        target_fraction = rng.uniform(0.25, 0.5) * liver_scale**2
        area = 0.5 * np.mean(radius**2) * 2.0 * np.pi
        radius *= math.sqrt(target_fraction * size * size / area)

        # Orientation, then shrink if the outline does not fit in the image with a margin.
        self.angle = rng.uniform(0.0, 2.0 * np.pi)
        ys = radius * np.sin(phi + self.angle)
        xs = radius * np.cos(phi + self.angle)
        margin = max(1.0, 0.02 * size)
        room = size - 1 - 2 * margin
        extent = max(ys.max() - ys.min(), xs.max() - xs.min())
        if extent > room:
            shrink = room / extent * (1.0 - 1e-6)  # slack for rounding: the range below stays >= 0
            radius, ys, xs = radius * shrink, ys * shrink, xs * shrink
        # Centre uniformly among positions that keep the whole outline inside the margins.
        self.cy = rng.uniform(margin - ys.min(), size - 1 - margin - ys.max())
        self.cx = rng.uniform(margin - xs.min(), size - 1 - margin - xs.max())
        self.radius_table = radius.astype(np.float32)

    def radius_at(self, phi: np.ndarray | float) -> np.ndarray:
        """Outline radius at angle(s) ``phi`` (relative to the liver axis, any real value):
        linear interpolation in the periodic table."""
        position = np.asarray(phi, dtype=np.float32) * np.float32(self.n_table / (2.0 * np.pi))
        lower = np.floor(position)
        frac = position - lower
        i0 = lower.astype(np.int64) % self.n_table
        i1 = (i0 + 1) % self.n_table
        table = self.radius_table
        return table[i0] + frac * (table[i1] - table[i0])

    def point(self, phi: float, u: float) -> tuple[float, float]:
        """Image coordinates (y, x) of the point at fraction ``u`` of the way from the
        centre to the outline, in direction ``phi``."""
        r = u * float(self.radius_at(phi))
        return self.cy + r * math.sin(phi + self.angle), self.cx + r * math.cos(phi + self.angle)

    def rasterize(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (liver bool [S, S], distance to the outline along the ray in px, float32 [S, S],
        positive inside)."""
        yy, xx = _pixel_grid(size)
        dy, dx = yy - np.float32(self.cy), xx - np.float32(self.cx)
        rho = np.hypot(dy, dx)
        phi = np.arctan2(dy, dx) - np.float32(self.angle)
        outline = self.radius_at(phi)
        depth = outline - rho
        return depth > 0, depth


# --------------------------------------------------------------------------- textures


def _plane_wave_drift(rng: np.random.Generator, size: int, n_waves: int = 3) -> np.ndarray:
    """Low-frequency intensity drift: a sum of plane waves of 0.3-1.5 cycles per image."""
    yy, xx = _pixel_grid(size)
    drift = np.zeros((size, size), np.float32)
    for _ in range(n_waves):
        cycles = rng.uniform(0.3, 1.5)
        direction = rng.uniform(0.0, 2.0 * np.pi)
        k = np.float32(2.0 * np.pi * cycles / size)
        ky, kx = k * np.float32(math.sin(direction)), k * np.float32(math.cos(direction))
        drift += np.float32(rng.uniform(0.005, 0.025)) * np.cos(ky * yy + kx * xx + np.float32(rng.uniform(0, 2 * np.pi)))
    return drift


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """White noise blurred by a Gaussian of ``sigma_px``, renormalised to unit std."""
    noise = gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma_px, mode="wrap")
    return noise / max(float(noise.std()), 1e-8)


# --------------------------------------------------------------------------- vessels


def _vessel_segments(rng: np.random.Generator, liver: _LiverShape, size: int) -> np.ndarray:
    """Branching vessel trees and cross-sections as tapered segments.

    Returns float32 [K, 7]: (y0, x0, y1, x1, radius0, radius1, amplitude); a segment with
    equal ends is a round cross-section.
    """
    segments = []
    mean_radius = float(liver.radius_table.mean())
    for _ in range(int(rng.integers(2, 4))):
        # Root near the periphery (the hilum side of a tree), heading roughly inwards.
        phi = rng.uniform(0.0, 2.0 * np.pi)
        y, x = liver.point(phi, rng.uniform(0.55, 0.9))
        heading = phi + liver.angle + np.pi + rng.uniform(-0.5, 0.5)
        amplitude = rng.uniform(0.7, 1.1)
        level = [(y, x, heading, rng.uniform(0.25, 0.4) * mean_radius, rng.uniform(0.008, 0.014) * size)]
        for _depth in range(4):
            children = []
            for y, x, heading, length, radius in level:
                y1 = y + length * math.sin(heading)
                x1 = x + length * math.cos(heading)
                end_radius = radius * rng.uniform(0.65, 0.85)
                segments.append((y, x, y1, x1, radius, end_radius, amplitude))
                for side in (-1.0, 1.0):  # bifurcation
                    children.append((y1, x1, heading + side * rng.uniform(0.35, 0.8),
                                     length * rng.uniform(0.55, 0.8), end_radius * rng.uniform(0.85, 1.0)))
            level = children
    # Vessels cut across the slice: small round dots.
    for _ in range(int(rng.integers(0, 6))):
        y, x = liver.point(rng.uniform(0.0, 2.0 * np.pi), math.sqrt(rng.uniform(0.0, 0.8)))
        radius = rng.uniform(0.005, 0.014) * size
        segments.append((y, x, y, x, radius, radius, rng.uniform(0.7, 1.1)))
    return np.asarray(segments, dtype=np.float32)


def _render_tubes(segments: np.ndarray, size: int) -> np.ndarray:
    """Max over segments of ``amplitude * exp(-(d / r)^2)``, ``d`` = distance to the segment,
    ``r`` tapering linearly along it. float32 [S, S] in [0, ~1.1]. Work is done on each
    segment's bounding box (a loop over segments, not pixels)."""
    yy, xx = _pixel_grid(size)
    tubes = np.zeros((size, size), np.float32)
    for y0, x0, y1, x1, r0, r1, amplitude in segments:
        r0, r1 = max(r0, 0.6), max(r1, 0.6)  # thinner than ~1 px is invisible anyway
        half = 0.5 * math.hypot(y1 - y0, x1 - x0) + 2.5 * max(r0, r1)
        box = _box(0.5 * (y0 + y1), 0.5 * (x0 + x1), half, size)
        if box is None:
            continue
        py, px = yy[box] - y0, xx[box] - x0
        sy, sx = y1 - y0, x1 - x0
        length_sq = sy * sy + sx * sx
        t = np.clip((py * sy + px * sx) / length_sq, 0.0, 1.0) if length_sq > 0 else np.zeros_like(py)
        dist_sq = (py - t * sy) ** 2 + (px - t * sx) ** 2
        radius = r0 + t * (r1 - r0)
        np.maximum(tubes[box], amplitude * np.exp(-dist_sq / (radius * radius)), out=tubes[box])
    return tubes


# --------------------------------------------------------------------------- lesions


def _draw_lesion(rng: np.random.Generator, liver: _LiverShape, liver_mask: np.ndarray, size: int,
                 difficulty: float, lesion_scale: float = 1.0) -> dict[str, Any]:
    """Draw one lesion's parameters, with its centre on a liver pixel well inside the outline;
    ``lesion_scale`` multiplies the radius range (the draws are the same for every scale)."""
    lo, hi = LESION_RADIUS_RANGE
    radius = max(lesion_scale * size * math.exp(rng.uniform(math.log(lo), math.log(hi))), 1.5)
    for _attempt in range(50):
        phi = rng.uniform(0.0, 2.0 * np.pi)
        outline = float(liver.radius_at(phi))
        radius = min(radius, 0.6 * outline)
        u_max = 1.0 - 1.05 * radius / outline
        y, x = liver.point(phi, u_max * math.sqrt(rng.uniform()))
        cy, cx = int(round(y)), int(round(x))
        if 0 <= cy < size and 0 <= cx < size and liver_mask[cy, cx]:
            break
    else:  # pragma: no cover - the liver always holds its own centre
        cy, cx = int(round(liver.cy)), int(round(liver.cx))

    subtle = rng.uniform() < min(SUBTLE_FRACTION * difficulty, 0.9)
    if subtle:
        contrast_range = (min(SUBTLE_MIN_CONTRAST / difficulty, 0.09), CONSPICUOUS_CONTRAST_RANGE[0])
        max_blur = float(np.clip(SUBTLE_MAX_BLUR * difficulty, 0.1, 0.8))
    else:
        contrast_range, max_blur = CONSPICUOUS_CONTRAST_RANGE, CONSPICUOUS_MAX_BLUR
    magnitude = math.exp(rng.uniform(math.log(contrast_range[0]), math.log(contrast_range[1])))
    hypodense = rng.uniform() < HYPODENSE_PROBABILITY
    blur = math.exp(rng.uniform(math.log(0.02), math.log(max_blur)))  # fraction of the radius
    rim = rng.uniform() < 0.25
    return {
        "subtle": bool(subtle),
        "center_yx": [cy, cx],
        "radius_px": radius,
        "aspect": rng.uniform(0.6, 1.0),
        "angle": rng.uniform(0.0, np.pi),
        "lobulation": (rng.uniform(0.0, 0.12, 3) * np.array([1.0, 0.7, 0.5])).tolist(),
        "lobulation_phase": rng.uniform(0.0, 2.0 * np.pi, 3).tolist(),
        "contrast": -magnitude if hypodense else magnitude,
        "edge_px": max(0.3, blur * radius),
        "heterogeneity": rng.uniform(0.0, 0.4),
        "rim": rng.uniform(0.3, 0.8) * magnitude if rim else 0.0,
        "rim_width_px": max(0.7, rng.uniform(0.08, 0.15) * radius),
        "necrotic_core": bool(hypodense and radius > 0.06 * size and rng.uniform() < 0.3),
    }


def _render_lesion(lesion: dict[str, Any], delta_image: np.ndarray, occupancy: np.ndarray, mask: np.ndarray,
                   mottle: np.ndarray) -> None:
    """Add one lesion, in place: its intensity change to ``delta_image``, its edge profile
    (1 inside, 0 outside) to ``occupancy`` (max), its outline to ``mask``; all [S, S]."""
    size = delta_image.shape[0]
    cy, cx = lesion["center_yx"]
    radius, aspect, edge = lesion["radius_px"], lesion["aspect"], lesion["edge_px"]
    box = _box(cy, cx, 1.45 * radius + 4.0 * edge + 2.0 * lesion["rim_width_px"], size)
    if box is None:
        return
    yy, xx = _pixel_grid(size)
    dy, dx = yy[box] - cy, xx[box] - cx
    cos_a, sin_a = math.cos(lesion["angle"]), math.sin(lesion["angle"])
    along = (dx * cos_a + dy * sin_a) / radius
    across = (-dx * sin_a + dy * cos_a) / (radius * aspect)
    phi = np.arctan2(across, along)
    lobes = 1.0 + sum(a * np.cos((k + 2) * phi + p)
                      for k, (a, p) in enumerate(zip(lesion["lobulation"], lesion["lobulation_phase"])))
    rho = np.hypot(along, across) / lobes  # 1 on the nominal outline
    signed_px = (rho - 1.0) * radius  # ~ distance to the outline in px, negative inside
    # Blurred step: logistic with the scale chosen so that `edge` ~ a Gaussian sigma.
    profile = 1.0 / (1.0 + np.exp(np.clip(signed_px * (1.702 / edge), -60.0, 60.0)))
    contrast = lesion["contrast"]
    delta = contrast * profile * (1.0 + lesion["heterogeneity"] * mottle[box])
    if lesion["necrotic_core"]:
        delta += 0.5 * contrast / (1.0 + np.exp(np.clip((rho - 0.45) * radius * (1.702 / max(edge, 1.0)), -60, 60)))
    if lesion["rim"]:
        rim_centre = 1.0 - 0.5 * lesion["rim_width_px"] / radius
        delta += lesion["rim"] * np.exp(-(((rho - rim_centre) * radius / lesion["rim_width_px"]) ** 2))
    delta_image[box] += delta.astype(np.float32)
    np.maximum(occupancy[box], profile.astype(np.float32), out=occupancy[box])
    mask[box] |= rho < 1.0


# --------------------------------------------------------------------------- one slice


def _check_difficulty(difficulty: float) -> float:
    difficulty = float(difficulty)
    if not math.isfinite(difficulty) or difficulty <= 0:
        raise ValueError(f"difficulty must be a finite number > 0, got {difficulty}")
    return difficulty


def _check_liver_scale(liver_scale: float) -> float:
    liver_scale = float(liver_scale)
    if not math.isfinite(liver_scale) or not 0.3 <= liver_scale <= 1:
        raise ValueError(f"liver_scale (--liver-scale) must be a number in [0.3, 1], got {liver_scale}")
    return liver_scale


def _check_lesion_scale(lesion_scale: float) -> float:
    lesion_scale = float(lesion_scale)
    if not math.isfinite(lesion_scale) or not 0 < lesion_scale <= 4:
        raise ValueError(f"lesion_scale (--lesion-scale) must be a number in (0, 4], got {lesion_scale}")
    return lesion_scale


def _render_slice(rng: np.random.Generator, size: int, abnormal: bool, difficulty: float,
                  lesion_scale: float = 1.0, liver_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The phantom slice, its lesion mask and a description (liver fraction, lesions)."""
    shape = _LiverShape(rng, size, liver_scale)
    liver, depth = shape.rasterize(size)

    parenchyma = rng.uniform(0.45, 0.65)
    image = np.full((size, size), parenchyma, np.float32)
    image += _plane_wave_drift(rng, size)
    mottle = _smooth_noise(rng, size, sigma_px=max(1.0, 0.012 * size))
    image += np.float32(rng.uniform(0.004, 0.012)) * mottle
    # Partial volume with the fat around the liver: a darker band ~1.5 px wide inside the outline.
    image -= np.float32(rng.uniform(0.0, 0.06)) * np.exp(-np.maximum(depth, 0.0) / np.float32(1.5))

    vessel_sign = 1.0 if rng.uniform() < 0.6 else -1.0
    vessel_strength = rng.uniform(0.08, 0.2) if vessel_sign > 0 else rng.uniform(0.05, 0.14)
    vessels = _render_tubes(_vessel_segments(rng, shape, size), size)

    mask = np.zeros((size, size), bool)
    lesions = []
    if abnormal:
        lesion_delta = np.zeros((size, size), np.float32)
        occupancy = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            lesion = _draw_lesion(rng, shape, liver, size, difficulty, lesion_scale)
            _render_lesion(lesion, lesion_delta, occupancy, mask, mottle)
            lesions.append(lesion)
        # A tumour displaces the vessels: none run through it (this also keeps its contrast honest).
        vessels *= 1.0 - occupancy
        image += lesion_delta
    image += np.float32(vessel_sign * vessel_strength) * vessels

    noise_sigma = rng.uniform(0.012, 0.03)
    image += np.float32(noise_sigma) * _smooth_noise(rng, size, sigma_px=0.6)

    # Liver pixels in [1/255, 1] so they survive 8-bit quantisation as > 0; outside exactly 0.
    np.clip(image, 1.0 / 255.0, 1.0, out=image)
    image[~liver] = 0.0
    mask &= liver
    if abnormal and not mask.any():  # pragma: no cover - each lesion centre is a liver pixel
        raise AssertionError("abnormal phantom slice with an empty lesion mask")
    info = {
        "liver_fraction": float(liver.mean()),
        "parenchyma": parenchyma,
        "vessel_sign": int(vessel_sign),
        "noise_sigma": noise_sigma,
        "lesion_fraction": float(mask.mean()),
        "lesions": [_json_lesion(lesion) for lesion in lesions],
    }
    return image, mask, info


def _json_lesion(lesion: dict[str, Any]) -> dict[str, Any]:
    keep = ("subtle", "center_yx", "radius_px", "aspect", "angle", "contrast", "edge_px", "rim", "necrotic_core")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in lesion.items() if k in keep}


def generate_slice(rng: np.random.Generator, size: int, abnormal: bool,
                   difficulty: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One phantom liver-CT slice.

    Args:
        rng: the only source of randomness (same generator state -> same slice).
        size: image side S (>= 16).
        abnormal: draw 1-3 lesions (the mask is non-empty exactly when True).
        difficulty: > 0; larger gives more and subtler lesions. A lesion is "subtle"
            with probability ``min(0.3 * difficulty, 0.9)``: |contrast| log-uniform in
            ``[0.04 / difficulty, 0.1]`` and edge blur up to ``0.4 * difficulty`` of the radius
            (clipped to [0.1, 0.8]); otherwise |contrast| is log-uniform in [0.1, 0.35] and
            the blur up to 0.25 of the radius.

    Returns:
        image: float32 [S, S] in [0, 1]; exactly 0 outside the liver, >= 1/255 inside.
        mask: bool [S, S], the lesion pixels (a subset of the liver).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    size = int(size)
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    image, mask, _ = _render_slice(rng, size, bool(abnormal), _check_difficulty(difficulty))
    return image, mask


def slice_rng(seed: int, split: str, kind: str, index: int) -> np.random.Generator:
    """The generator of slice ``index`` of ``split``/``kind`` ("good" or "Ungood")."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], KIND_CODES[kind], index]))


# --------------------------------------------------------------------------- dataset


def _slice_counts(n_train: int, n_valid: int, n_test: int, abnormal_fraction: float) -> dict[str, dict[str, int]]:
    """Slices per split and kind: ``{"train": {"good": n}, "valid": {"good": n, "Ungood": n}, "test": ...}``."""
    counts = {"train": {NORMAL_FOLDER: n_train}}
    for split, n in zip(EVAL_SPLITS, (n_valid, n_test)):
        n_abnormal = math.floor(n * abnormal_fraction + 0.5)  # half up: 5 slices at 0.5 -> 3 abnormal
        counts[split] = {NORMAL_FOLDER: n - n_abnormal, ABNORMAL_FOLDER: n_abnormal}
    return counts


def _plan(counts: dict[str, dict[str, int]]) -> list[tuple[str, str, int, str, str | None]]:
    """Every slice to write: (split, kind, index, image relpath, mask relpath or None)."""
    return [(split, kind, i, *slice_relpaths(split, kind == ABNORMAL_FOLDER, f"{i:05d}"))
            for split, kinds in counts.items() for kind, n in kinds.items() for i in range(n)]


def _read_own_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest of a previous phantom run in ``out``; None if ``out`` is missing or empty.
    Raises if ``out`` holds anything else."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise NotADirectoryError(f"output path exists and is not a directory: {out}")
    if not any(out.iterdir()):
        return None
    manifest_path = out / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("generator") != GENERATOR_NAME:
            raise ValueError("not a phantom manifest")
    except (OSError, ValueError, AttributeError):
        raise FileExistsError(
            f"refusing to write into {out}: it is not empty and is not the output of "
            f"`medad-fast phantom` (no {MANIFEST_NAME} written by it). Choose an empty or new folder."
        ) from None
    return manifest


def write_phantom_dataset(out: str | Path, n_train: int = 200, n_test: int = 100, n_valid: int = 0,
                          size: int = 256, seed: int = 0, abnormal_fraction: float = 0.5,
                          difficulty: float = 1.0, progress: bool = True,
                          lesion_scale: float = 1.0, liver_scale: float = 1.0) -> dict[str, dict[str, int]]:
    """Write a phantom dataset in the BMAD layout under ``out``.

    Layout (:mod:`medad_fast.data.layout`): ``train/good/*.png`` (normal only),
    ``{valid,test}/good/img/*.png``, ``{valid,test}/Ungood/img/*.png`` and
    ``{valid,test}/Ungood/label/*.png`` (masks 0/255, same stem ``<index:05d>``), plus
    ``manifest.json`` (parameters, counts, and per slice its files and lesions). Splits
    with 0 slices get no folder. ``round(n * abnormal_fraction)`` (half up) slices of
    valid/test are abnormal. ``lesion_scale`` in (0, 4] multiplies the lesions' radius range
    (``FEW_SLICES`` holds the ``--few-slices`` values). ``liver_scale`` in [0.3, 1] multiplies
    the liver's linear size (0.65: a liver box about half the slice wide, as on 512 x 512 CT).

    ``out`` must be missing, empty, or a previous phantom output (which is then rewritten;
    files of the previous run that the new one does not produce are removed). The manifest
    is written first (``complete: false``) and last (``complete: true``), so an interrupted
    run can simply be re-run. All writes are atomic.

    Returns the counts: ``{"train": {"good": n}, "valid": {"good": n, "Ungood": n}, "test": {...}}``.
    """
    out = Path(out)
    for name, value in (("n_train", n_train), ("n_test", n_test), ("n_valid", n_valid), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if n_train + n_test + n_valid == 0:
        raise ValueError("nothing to write: n_train, n_test and n_valid are all 0")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")
    abnormal_fraction = float(abnormal_fraction)
    if not 0.0 <= abnormal_fraction <= 1.0:
        raise ValueError(f"abnormal_fraction must be in [0, 1], got {abnormal_fraction}")
    difficulty = _check_difficulty(difficulty)
    lesion_scale = _check_lesion_scale(lesion_scale)
    liver_scale = _check_liver_scale(liver_scale)
    n_train, n_test, n_valid, size, seed = int(n_train), int(n_test), int(n_valid), int(size), int(seed)

    previous = _read_own_manifest(out)
    check_writable_folder(out, "OUT")  # before any work
    counts = _slice_counts(n_train, n_valid, n_test, abnormal_fraction)
    plan = _plan(counts)
    manifest: dict[str, Any] = {
        "generator": GENERATOR_NAME,
        "format_version": FORMAT_VERSION,
        "complete": False,
        "parameters": {"size": size, "seed": seed, "abnormal_fraction": abnormal_fraction,
                       "difficulty": difficulty, "lesion_scale": lesion_scale, "liver_scale": liver_scale,
                       "n_train": n_train,
                       "n_valid": n_valid, "n_test": n_test},
        "counts": counts,
        "slices": [{"image": image_rel, "mask": mask_rel, "split": split, "label": int(kind == ABNORMAL_FOLDER),
                    "index": index} for split, kind, index, image_rel, mask_rel in plan],
    }

    out.mkdir(parents=True, exist_ok=True)
    # Remove what the previous run wrote and this one will not (only files it listed).
    if previous is not None:
        keep = {p for entry in manifest["slices"] for p in (entry["image"], entry["mask"]) if p}
        for entry in previous.get("slices", []):
            for rel in (entry.get("image"), entry.get("mask")):
                if rel and rel not in keep and ".." not in Path(rel).parts and not Path(rel).is_absolute():
                    (out / rel).unlink(missing_ok=True)
    atomic_write_json(out / MANIFEST_NAME, manifest)

    with tqdm(total=len(plan), desc="phantom", unit="slice", disable=not progress) as bar:
        for entry, (split, kind, index, image_rel, mask_rel) in zip(manifest["slices"], plan):
            image, mask, info = _render_slice(slice_rng(seed, split, kind, index), size, kind == ABNORMAL_FOLDER,
                                              difficulty, lesion_scale, liver_scale)
            save_png(out / image_rel, image)
            if mask_rel is not None:
                save_png(out / mask_rel, mask)
            entry.update(info)
            bar.update(1)

    manifest["complete"] = True
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return counts


def ellipse_slices(n: int, side: int, seed: int = 0):
    """``uint8 torch [n, 1, side, side]``: textured ellipses on a zero background, the cheapest
    stand-in for liver slices (0 outside the liver, which the synthesis' liver mask ``I > 0``
    relies on) for benchmarks and step-level tests, where the content does not matter."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(-1, 1, side).view(side, 1)
    xs = torch.linspace(-1, 1, side).view(1, side)
    radii = 0.5 + 0.4 * torch.rand(n, 2, generator=g)
    inside = (ys / radii[:, 0, None, None]) ** 2 + (xs / radii[:, 1, None, None]) ** 2 <= 1
    texture = torch.randint(60, 200, (n, side, side), generator=g, dtype=torch.uint8)
    return (texture * inside).to(torch.uint8).unsqueeze(1)
