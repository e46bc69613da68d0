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
- The box is square, ``(1 + 2 * CROP_MARGIN)`` times the extent's longer side, but at least
  ``MIN_BOX_FRACTION`` (0.5) of the image's longer side and at most all of it; centred on the
  extent and shifted to stay inside the image when it fits; where it does not, it reaches past
  the border and the crop is padded with 0 (background). The lower bound keeps a slice near
  the liver's top or bottom, a sliver of liver, from being magnified to the whole input
  (where such normal slices would score high); training and every scoring path use the same
  :func:`square_box`, so a model is scored with the boxes it was trained with.
- A slice (or a whole volume) without any liver pixel keeps the whole slice as its box,
  with an :class:`EmptyLiverWarning` naming the file: nothing to crop to, but nothing to
  crash on either.

``crop`` modes: ``"liver"`` crops, ``"none"`` resizes the whole slice (the behaviour before
cropping existed, and what runs trained before it are read as), ``"auto"`` (the default)
crops liver-masked data and nothing else (:func:`choose_crop`): the folders written by
``medad-fast prepare`` (its manifest says so), and any other folder whose training slices
look liver-masked (:func:`check_liver_masked`: BMAD's liver slices, the phantom). The rule,
decided from the images: of up to ``MASK_CHECK_SAMPLE`` (64) training slices (a seeded
sample), at least ``MIN_MASKED_SHARE`` (90 %) have some pixels > 0, at most
``MAX_FOREGROUND_FRACTION`` (60 %) of the slice, with the largest 8-connected piece of them
holding ``MIN_CONNECTED_SHARE`` (90 %) of them, and exactly 0 everywhere else
(:func:`slice_is_liver_masked`): a zero background around one foreground. A natural image
(a foreground filling most of the slice, or exact zeros scattered through background noise,
as in an 8-bit MRI export) fails it; so would any other organ masked to a zero background
(a skull-stripped brain), which is then cropped to the organ's box too. Training resolves
``"auto"`` once, says in its log which it chose and why (:class:`CropChoice`), and saves the
result in the run's config and preprocessing record, which evaluate and predict follow.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medad_fast.data.layout import list_split
from medad_fast.data.manifest import written_by_prepare
from medad_fast.io import read_png_gray, resize_images

__all__ = ["Box", "EmptyLiverWarning", "CROP_MODES", "CROP_MARGIN", "MIN_BOX_FRACTION", "liver_extent", "square_box",
           "liver_box", "group_boxes", "box_window", "crop_to_box", "paste_back", "paste_back_each",
           "slice_is_liver_masked", "MaskCheck", "check_liver_masked", "is_liver_masked", "CropChoice", "choose_crop", "resolve_crop",
           "crops_liver"]

CROP_MODES = ("auto", "liver", "none")
#: room around the liver on each side, as a fraction of the liver extent's longer side
#: (lesions on the liver's edge and the synthesis' border effects stay inside the crop)
CROP_MARGIN = 0.1
#: the smallest crop box, as a fraction of the slice's longer side. A slice near the top or
#: bottom of the liver holds a sliver of it; its own box would magnify those few pixels to the
#: whole input, and such normal slices then score as anomalous (on liver-masked BMAD CT the
#: per-slice box raised pixel AP 0.09 -> 0.77 but dropped the slice-level image AUROC
#: 0.91 -> 0.66). A mid-liver box on a 512 x 512 CT slice is 0.54-0.66 of the side (an extent
#: of 230-280 px plus the margins), so a floor of 0.5 leaves those boxes alone and shows a
#: sliver at most 2x larger than the whole slice does, about the scale of a mid-liver slice. The
#: phantom's boxes (the demo's data) are 174-256 of 256 px: none is changed.
MIN_BOX_FRACTION = 0.5


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


def square_box(extent: Box, shape: tuple[int, int], margin: float = CROP_MARGIN,
               min_fraction: float = MIN_BOX_FRACTION) -> Box:
    """The square crop of an image of ``shape`` (H, W) around ``extent`` (see the module
    docstring): side ``ceil((1 + 2 margin) * longer side)``, at least
    ``ceil(min_fraction * max(H, W))`` (:data:`MIN_BOX_FRACTION`: a sliver of liver is not
    magnified to the whole input) and at most ``max(H, W)``; centred on the extent, then
    shifted inside the image along each axis where the side fits."""
    height, width = int(shape[0]), int(shape[1])
    longest = max(height, width)
    side = math.ceil((1.0 + 2.0 * margin) * max(extent.height, extent.width))
    side = max(min(max(side, math.ceil(min_fraction * longest)), longest), 1)

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


def paste_back_each(maps: torch.Tensor, boxes: list[Box], full_shape: tuple[int, int]) -> torch.Tensor:
    """:func:`paste_back` of each map ``maps[i]`` (``[N, h, w]``) into its own box
    ``boxes[i]`` (per-slice crops): ``[N, H, W]`` = ``full_shape``."""
    if len(boxes) != maps.shape[0]:
        raise ValueError(f"{maps.shape[0]} maps but {len(boxes)} boxes")
    if not boxes:
        return maps.new_zeros(0, int(full_shape[0]), int(full_shape[1]), dtype=torch.float32)
    return torch.cat([paste_back(maps[i:i + 1], box, full_shape) for i, box in enumerate(boxes)])


# --------------------------------------------------------------------------- "auto": is the data liver-masked?

#: training slices that :func:`check_liver_masked` looks at (a seeded sample when there are more)
MASK_CHECK_SAMPLE = 64
#: a liver-masked slice's foreground (> 0) covers at most this fraction of it (the phantom's
#: liver: 25-50 %; a CT liver less, its box being about half the slice); a natural image's
#: foreground is most of it
MAX_FOREGROUND_FRACTION = 0.6
#: the share of the foreground its largest connected piece holds, at least (room for a small
#: piece of liver cut off near the liver's top or bottom; exact zeros scattered through a
#: natural image's noise leave its foreground in many pieces)
MIN_CONNECTED_SHARE = 0.9
#: the share of the sampled slices that must look liver-masked for the data to count as such
MIN_MASKED_SHARE = 0.9


def slice_is_liver_masked(image: np.ndarray) -> bool:
    """Whether one slice (``[H, W]``, any numeric dtype) looks liver-masked: some pixels are
    > 0, at most :data:`MAX_FOREGROUND_FRACTION` of them, and the largest 8-connected piece
    of those holds at least :data:`MIN_CONNECTED_SHARE` of them; every other pixel is
    exactly 0 (a zero background around one foreground, as BMAD, ``prepare`` and the
    phantom write). A natural image has a foreground of most of the slice, or exact zeros
    scattered through noise (many small pieces)."""
    from scipy import ndimage  # here: only "auto" needs it

    foreground = np.asarray(image) > 0
    count = int(foreground.sum())
    if count == 0 or count > MAX_FOREGROUND_FRACTION * foreground.size:
        return False
    pieces, n = ndimage.label(foreground, structure=np.ones((3, 3), dtype=bool))
    largest = int(np.bincount(pieces.ravel())[1:].max()) if n else 0
    return largest >= MIN_CONNECTED_SHARE * count


@dataclass(frozen=True)
class MaskCheck:
    """What :func:`check_liver_masked` saw: ``masked`` of ``sampled`` training slices of
    ``folder`` look liver-masked (:func:`slice_is_liver_masked`)."""

    folder: str
    sampled: int
    masked: int

    @property
    def liver_masked(self) -> bool:
        """At least :data:`MIN_MASKED_SHARE` of the sampled slices look liver-masked."""
        return self.sampled > 0 and self.masked >= MIN_MASKED_SHARE * self.sampled

    def describe(self) -> str:
        """e.g. ``"64 of 64 sampled training slices of DATA are 0 outside one connected
        foreground covering at most 60% of the slice: liver-masked"``."""
        verdict = "liver-masked" if self.liver_masked else f"not liver-masked (that needs {MIN_MASKED_SHARE:.0%})"
        return (f"{self.masked} of {self.sampled} sampled training slices of {self.folder} are 0 outside one "
                f"connected foreground covering at most {MAX_FOREGROUND_FRACTION:.0%} of the slice: {verdict}")


def check_liver_masked(folder: str | os.PathLike, sample: int = MASK_CHECK_SAMPLE, seed: int = 0) -> MaskCheck:
    """Look at up to ``sample`` training slices of the data folder ``folder`` (any layout
    :func:`medad_fast.data.layout.list_split` reads; a seeded sample when it has more) at
    their file's resolution. ``FileNotFoundError`` naming the folder when it has no training
    split; ``ValueError`` naming an unreadable image."""
    files = list_split(folder, "train")
    chosen = (range(len(files)) if len(files) <= sample
              else sorted(np.random.default_rng(seed).choice(len(files), size=sample, replace=False)))
    masked = sum(slice_is_liver_masked(read_png_gray(files[i].image)) for i in chosen)
    return MaskCheck(str(folder), len(chosen), int(masked))


def is_liver_masked(folder: str | os.PathLike) -> bool:
    """Whether the training slices of ``folder`` are liver-masked (:func:`check_liver_masked`)."""
    return check_liver_masked(folder).liver_masked


@dataclass(frozen=True)
class CropChoice:
    """What a crop mode means for a data folder: ``crop`` (``"liver"`` or ``"none"``) and
    ``reason``, one sentence for the training log."""

    crop: str
    reason: str


def choose_crop(mode: str, data: str | os.PathLike | None) -> CropChoice:
    """What ``mode`` (one of :data:`CROP_MODES`) means for the data folder ``data``, and why.
    ``"auto"`` crops the folders written by ``medad-fast prepare`` (its manifest) and any
    folder whose training slices are liver-masked (:func:`check_liver_masked`); a folder
    without a training split (or no folder) is not cropped."""
    if mode not in CROP_MODES:
        raise ValueError(f"crop must be one of {list(CROP_MODES)}, got {mode!r}")
    if mode != "auto":
        return CropChoice(mode, f"--crop {mode} given")
    if data is None:
        return CropChoice("none", "no data folder to look at")
    if written_by_prepare(data):
        return CropChoice("liver", f"{data} was written by medad-fast prepare (CT slices, 0 outside the liver)")
    try:
        check = check_liver_masked(data)
    except FileNotFoundError as e:
        return CropChoice("none", f"no training slices to look at ({e})")
    return CropChoice("liver" if check.liver_masked else "none", check.describe())


def resolve_crop(mode: str, data: str | os.PathLike | None) -> str:
    """``"liver"`` or ``"none"``: what ``mode`` means for ``data`` (:func:`choose_crop`)."""
    return choose_crop(mode, data).crop


def crops_liver(run) -> bool:
    """Whether a run (:class:`medad_fast.config.RunConfig`) crops to the liver box."""
    return resolve_crop(run.crop, run.data) == "liver"
