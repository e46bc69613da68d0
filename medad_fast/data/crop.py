"""Liver-box cropping: the model sees the liver at its own side, not the whole slice.

On a 512 x 512 CT slice the liver fills a box of only ~230-280 px, so resizing the whole slice
to the model's side (96 or 256) throws away most of a small lesion's pixels. With cropping
(``RunConfig.crop``, ``--crop liver``), every slice is cut to the liver's bounding box plus a
margin, made square, and resized to the model's side; the method's maps are pasted back
into the whole slice (resized into the box, the map's minimum outside it), so metrics,
heatmaps and volume outputs are computed on the whole slice, as without cropping.

This module owns the box logic; training (:func:`medad_fast.data.bmad.load_split`), the
per-slice datasets of ``evaluate``/``predict`` (:mod:`medad_fast.data.dataset`) and the CT
volume paths (:func:`medad_fast.volume_inference.score_volume`) all go through it.

- The liver is where the slice is > 0 (BMAD and ``prepare`` set everything outside the
  liver to exactly 0; CT volumes use their liver mask).
- One box per VOLUME when the slices' volume is known (the ``prepare`` manifest, a
  ``<volume>_<index>`` file name, a CT scan): the union of its slices' liver extents, so every
  slice of a patient is seen at the same scale; else one box per slice.
- The box is square, ``(1 + 2 * CROP_MARGIN)`` times the extent's longer side (capped at the
  image's longer side), centred on the extent and shifted to stay inside the image when it
  fits; where it does not, it reaches past the border and the crop is padded with 0
  (background).
- A slice (or a whole volume) without any liver pixel keeps the whole slice as its box,
  with an :class:`EmptyLiverWarning` naming the file: nothing to crop to, but nothing to
  crash on either.

``crop`` modes: ``"liver"`` crops, ``"none"`` resizes the whole slice (the behaviour before
cropping existed, and what runs trained before it are read as), ``"auto"`` (the default)
crops the data written by ``medad-fast prepare`` (CT slices at their scanner resolution) and
not other BMAD folders (BMAD's own 256 x 256 slices, the phantom: already model-sized, so
the published and the demo's figures stay as they were). Training resolves ``"auto"`` once
and saves the result in the run's config, which evaluate and predict follow.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medad_fast.data.manifest import written_by_prepare
from medad_fast.io import resize_images

__all__ = ["Box", "EmptyLiverWarning", "CROP_MODES", "CROP_MARGIN", "liver_extent", "square_box", "liver_box",
           "group_boxes", "box_window", "crop_to_box", "paste_back", "resolve_crop", "crops_liver"]

CROP_MODES = ("auto", "liver", "none")
#: room around the liver on each side, as a fraction of the liver extent's longer side
#: (lesions on the liver's edge and the synthesis' border effects stay inside the crop)
CROP_MARGIN = 0.1


class EmptyLiverWarning(UserWarning):
    """A slice or volume has no liver pixel: it is not cropped (the whole slice is used)."""


@dataclass(frozen=True)
class Box:
    """A rectangle of pixels ``[top, top + height) x [left, left + width)`` of an image; it
    may reach past the image's border (the crop is then padded)."""

    top: int
    left: int
    height: int
    width: int

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    def union(self, other: Box) -> Box:
        top, left = min(self.top, other.top), min(self.left, other.left)
        return Box(top, left, max(self.bottom, other.bottom) - top, max(self.right, other.right) - left)

    def rescaled(self, from_shape: tuple[int, int], to_shape: tuple[int, int]) -> Box:
        """The same region in an image of ``to_shape`` that is the one of ``from_shape``
        resized (edges rounded to the nearest pixel edge, at least 1 px)."""
        sy, sx = to_shape[0] / from_shape[0], to_shape[1] / from_shape[1]
        top, left = round(self.top * sy), round(self.left * sx)
        return Box(top, left, max(round(self.bottom * sy) - top, 1), max(round(self.right * sx) - left, 1))


def whole(shape: tuple[int, int]) -> Box:
    """The box of a whole image of ``shape`` (H, W)."""
    return Box(0, 0, int(shape[0]), int(shape[1]))


def liver_extent(liver: np.ndarray | torch.Tensor) -> Box | None:
    """The bounding box of the True pixels of ``liver`` (bool ``[H, W]``, or ``[N, H, W]``:
    their union); None when there is none."""
    liver = liver.numpy() if isinstance(liver, torch.Tensor) else np.asarray(liver)
    rows = np.flatnonzero(liver.any(axis=tuple(a for a in range(liver.ndim) if a != liver.ndim - 2)))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(liver.any(axis=tuple(range(liver.ndim - 1))))
    return Box(int(rows[0]), int(cols[0]), int(rows[-1]) - int(rows[0]) + 1, int(cols[-1]) - int(cols[0]) + 1)


def square_box(extent: Box, shape: tuple[int, int], margin: float = CROP_MARGIN) -> Box:
    """The square crop of an image of ``shape`` (H, W) around ``extent`` (see the module
    docstring): side ``ceil((1 + 2 margin) * longer side)``, at most ``max(H, W)``; centred on
    the extent, then shifted inside the image along each axis where the side fits."""
    height, width = int(shape[0]), int(shape[1])
    side = min(math.ceil((1.0 + 2.0 * margin) * max(extent.height, extent.width)), max(height, width))
    side = max(side, 1)

    def start(low: int, length: int, size: int) -> int:
        first = low + (length - side) // 2  # centred (rounded towards low)
        if side <= size:
            return min(max(first, 0), size - side)
        return (size - side) // 2  # wider than the image: centred on the image, padded both sides

    return Box(start(extent.top, extent.height, height), start(extent.left, extent.width, width), side, side)


def liver_box(liver: np.ndarray | torch.Tensor, margin: float = CROP_MARGIN) -> Box | None:
    """The square crop box of a liver mask (bool ``[H, W]`` or ``[N, H, W]``: one box for all
    N slices); None when the mask is empty."""
    extent = liver_extent(liver)
    return None if extent is None else square_box(extent, tuple(liver.shape[-2:]), margin)


def group_boxes(extents: Sequence[Box | None], shapes: Sequence[tuple[int, int]], groups: Sequence[Hashable],
                names: Sequence[str], margin: float = CROP_MARGIN) -> list[Box]:
    """One square box per slice, shared by the slices of a group (a volume): the box of the
    union of their liver extents (``liver_extent`` of each slice, None: no liver). A group
    without any liver keeps each slice whole, with an :class:`EmptyLiverWarning` naming
    ``names`` (the slices' files)."""
    union: dict[Hashable, Box | None] = {}
    for extent, group in zip(extents, groups):
        if extent is not None:
            union[group] = extent if union.get(group) is None else union[group].union(extent)
        else:
            union.setdefault(group, None)
    boxes = []
    for shape, group, name in zip(shapes, groups, names):
        extent = union[group]
        if extent is None:
            warnings.warn(f"{name}: no liver pixel (nothing > 0) to crop to; using the whole slice",
                          EmptyLiverWarning, stacklevel=2)
            boxes.append(whole(shape))
        else:
            boxes.append(square_box(extent, shape, margin))
    return boxes


def box_window(images: torch.Tensor, box: Box) -> torch.Tensor:
    """The pixels of ``images [..., H, W]`` (any dtype) inside ``box``, 0 where it leaves the
    image (a view when the box is inside)."""
    height, width = images.shape[-2:]
    if box.top >= 0 and box.left >= 0 and box.bottom <= height and box.right <= width:
        return images[..., box.top:box.bottom, box.left:box.right]
    out = images.new_zeros(*images.shape[:-2], box.height, box.width)
    y0, y1 = max(box.top, 0), min(box.bottom, height)
    x0, x1 = max(box.left, 0), min(box.right, width)
    if y0 < y1 and x0 < x1:
        out[..., y0 - box.top:y1 - box.top, x0 - box.left:x1 - box.left] = images[..., y0:y1, x0:x1]
    return out


def crop_to_box(images: torch.Tensor, box: Box, side: int) -> torch.Tensor:
    """Float ``images [N, C, H, W]`` cut to ``box`` (padded with 0 past the border) and
    resized to ``side x side`` (:func:`medad_fast.io.resize_images`: area averaging to
    shrink, bilinear to enlarge) -> ``[N, C, side, side]``."""
    return resize_images(box_window(images, box).contiguous(), side)


def paste_back(maps: torch.Tensor, box: Box, full_shape: tuple[int, int], fill: float | None = None
               ) -> torch.Tensor:
    """The inverse of :func:`crop_to_box` for anomaly maps: ``maps [N, h, w]`` (float, the
    crop's) resized to the box and placed into ``[N, H, W]`` = ``full_shape``. Outside the box
    each map gets ``fill`` (None: its own minimum, so no pixel outside the box, where there
    is no liver, ranks above one inside)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape [N, h, w]; got {list(maps.shape)}")
    height, width = int(full_shape[0]), int(full_shape[1])
    resized = resize_images(maps[:, None].float(), (box.height, box.width))[:, 0]
    if fill is None:
        background = resized.flatten(1).amin(dim=1) if maps.shape[0] else resized.new_zeros(0)
    else:
        background = resized.new_full((maps.shape[0],), float(fill))
    out = background.view(-1, 1, 1).expand(maps.shape[0], height, width).clone()
    y0, y1 = max(box.top, 0), min(box.bottom, height)
    x0, x1 = max(box.left, 0), min(box.right, width)
    if y0 < y1 and x0 < x1:
        out[:, y0:y1, x0:x1] = resized[:, y0 - box.top:y1 - box.top, x0 - box.left:x1 - box.left]
    return out


def resolve_crop(mode: str, data: str | os.PathLike | None) -> str:
    """``"liver"`` or ``"none"``: what ``mode`` (one of :data:`CROP_MODES`) means for the data
    folder ``data``. ``"auto"`` crops exactly the folders written by ``medad-fast prepare``
    (its manifest), whose slices are CT at scanner resolution with 0 outside the liver."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop must be one of {list(CROP_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    return "liver" if written_by_prepare(data) else "none"


def crops_liver(run) -> bool:
    """Whether a run (:class:`medad_fast.config.RunConfig`) crops to the liver box."""
    return resolve_crop(run.crop, run.data) == "liver"
