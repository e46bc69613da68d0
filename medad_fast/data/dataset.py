"""Slice by slice: datasets that read one slice per access, and a batch iterator over them.

Evaluation over 10^5 slices, or ``medad-fast predict`` over a folder of that size, must not
hold every slice in memory; these read each slice when asked for it:

- :class:`BmadSliceDataset`: the slices of one split of a BMAD-layout folder
  (:func:`medad_fast.data.layout.list_split`), each exactly as
  :func:`medad_fast.data.bmad.load_split` stores it (both read through :func:`read_slice`).
- :class:`ImageFileDataset`: image files (e.g. from
  :func:`medad_fast.data.layout.collect_image_files`), unlabelled.
- :func:`iter_batches`: consecutive :class:`SliceBatch` es of a range of a dataset, read in
  process or by ``torch.utils.data.DataLoader`` worker processes.

Reading a slice: grayscale float in [0, 1] (:func:`medad_fast.io.read_image_gray`), resized
to ``size x size`` (:func:`medad_fast.io.resize_images`: area averaging to shrink, bilinear
to enlarge), quantised to uint8 with every positive pixel kept >= 1 (so ``image > 0`` still
marks the liver); the mask nearest-neighbour resized (:func:`medad_fast.io.resize_masks`).

Every record knows the volume it was cut from: from the ``medad-fast prepare`` manifest when
the folder has one, else from a ``<volume>_<slice index>`` file name, else the file's stem
is its volume and the slice index is -1 (:func:`medad_fast.data.layout.slice_origin`; always
so for a MedIAnomaly ``data.json`` dataset, whose images are 2-D, one per subject).

With ``crop=True`` (liver-box cropping, :mod:`medad_fast.data.crop`) a record also holds the
model's input, the slice cut to its liver box and resized to the side (``crop``,
``crop_mask``), and that box in the coordinates of the whole resized slice (``box``), where
the scored map is pasted back. The box is the volume's (the union of its slices' liver
extents) when the record's volume is known (slice index >= 0), else the slice's own; boxes
are found on first use, reading each slice of the volume once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from medad_fast.data.crop import Box, box_window, crop_to_box, group_boxes, liver_extent
from medad_fast.data.layout import SliceFile, list_split, slice_origin
from medad_fast.data.manifest import slice_origins
from medad_fast.data.medianomaly import dataset_root
from medad_fast.io import quantize_uint8, read_image_gray, read_mask, resize_images, resize_masks

__all__ = [
    "SliceRecord",
    "SliceBatch",
    "BmadSliceDataset",
    "ImageFileDataset",
    "iter_batches",
    "collate_slices",
    "read_slice",
    "to_model_side",
    "check_size",
]


@dataclass
class SliceRecord:
    """One slice, resized to side S.

    image:       torch.uint8 [1, S, S] (0 outside the liver)
    mask:        torch.uint8 [1, S, S], 0/1 (1 = lesion); zeros for normal or unlabelled slices
    label:       True = abnormal (from an ``Ungood`` folder); False for unlabelled images
    path:        the image file
    volume_id:   the patient / volume the slice was cut from
    slice_index: its position in that volume, -1 when unknown
    crop:        with liver-box cropping: torch.uint8 [1, S, S], the slice cut to its liver box
                 and resized (the model's input); else None
    crop_mask:   with cropping: the lesion mask cut the same way, uint8 0/1 [1, S, S]; else None
    box:         with cropping: the liver box in the coordinates of ``image`` (where the
                 crop's map goes back, :func:`medad_fast.data.crop.paste_back`); else None
    """

    image: torch.Tensor
    mask: torch.Tensor
    label: bool
    path: str
    volume_id: str
    slice_index: int
    crop: torch.Tensor | None = None
    crop_mask: torch.Tensor | None = None
    box: Box | None = None


@dataclass
class SliceBatch:
    """B consecutive :class:`SliceRecord` s, stacked.

    images: torch.uint8 [B, 1, S, S]
    masks:  torch.uint8 [B, 1, S, S], 0/1
    labels: torch.bool [B]
    paths, volume_ids, slice_indices: lists of B
    crops, crop_masks: with liver-box cropping, uint8 [B, 1, S, S] (the model's inputs); else None
    boxes: with cropping, B :class:`~medad_fast.data.crop.Box` es in the images' coordinates
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    volume_ids: list[str]
    slice_indices: list[int]
    crops: torch.Tensor | None = None
    crop_masks: torch.Tensor | None = None
    boxes: list[Box] | None = None

    @property
    def model_inputs(self) -> torch.Tensor:
        """What the model scores: the crops when cropping, else the images."""
        return self.images if self.crops is None else self.crops

    def __len__(self) -> int:
        return len(self.paths)


def check_size(size: int) -> int:
    """``size`` as an int; ``ValueError`` naming it unless it is a positive integer."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return int(size)


def to_model_side(images: np.ndarray, size: int, box: Box | None = None) -> torch.Tensor:
    """Grayscale slices ``[N, H, W]`` (float in [0, 1], or uint8) as the model reads them:
    resized to ``size x size`` (:func:`medad_fast.io.resize_images`) and quantised to
    ``torch.uint8 [N, 1, S, S]`` with every positive pixel kept >= 1. What :func:`read_slice`
    does to an image file, and ``medad-fast predict`` to the slices of a CT volume. With a
    ``box``, the slices are first cut to it (:func:`medad_fast.data.crop.crop_to_box`)."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / np.float32(255.0)
    images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    resized = resize_images(images, size) if box is None else crop_to_box(images, box, size)
    return torch.from_numpy(quantize_uint8(resized.numpy(), keep_positive=True))


def _masks_to_model_side(masks: np.ndarray, size: int, box: Box | None = None) -> torch.Tensor:
    """Bool/0-1 masks ``[N, H, W]`` -> uint8 ``[N, 1, S, S]`` (nearest neighbour), cut to ``box`` first."""
    masks = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8))[:, None]
    return resize_masks(masks if box is None else box_window(masks, box).contiguous(), size)


def _read_source(image_path: str | os.PathLike, mask_path: str | os.PathLike | None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(image float32 [H, W] in [0, 1], mask bool [H, W] or None)`` at the file's own size."""
    image = read_image_gray(image_path)
    if mask_path is None:
        return image, None
    mask = read_mask(mask_path)
    if mask.shape != image.shape:
        raise ValueError(f"mask {mask_path} has shape {mask.shape} but its image {image_path} "
                         f"has shape {image.shape}")
    return image, mask


def read_slice(image_path: str | os.PathLike, mask_path: str | os.PathLike | None, size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one slice resized to ``size``: ``(image uint8 [1, S, S], mask uint8 0/1 [1, S, S])``,
    the mask all zeros when ``mask_path`` is None.

    ``FileNotFoundError`` / ``ValueError`` name a missing or unreadable file; ``ValueError``
    names both files when the mask's shape differs from its image's.
    """
    image, mask = _read_source(image_path, mask_path)
    image_out = to_model_side(image[None], size)[0]
    if mask is None:
        return image_out, torch.zeros(1, size, size, dtype=torch.uint8)
    return image_out, _masks_to_model_side(mask[None], size)[0]


class _SliceFilesDataset(Dataset):
    """A dataset over :class:`SliceFile` s; subclasses fill ``files``, ``paths``,
    ``volume_ids`` and ``slice_indices`` (one entry per slice) and set ``crop``."""

    size: int
    crop: bool = False
    _boxes: dict[int, Box]  # crop boxes found so far, by slice
    _group_members: dict[tuple, list[int]] | None = None  # the slices of each crop group
    files: list[SliceFile]
    paths: list[str]
    volume_ids: list[str]
    slice_indices: list[int]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> SliceRecord:
        i = range(len(self.files))[index]  # negative indices as for a list; IndexError past the end
        entry = self.files[i]
        origin = (entry.abnormal, self.paths[i], self.volume_ids[i], self.slice_indices[i])
        if not self.crop:
            return SliceRecord(*read_slice(entry.image, entry.mask, self.size), *origin)
        image, mask = _read_source(entry.image, entry.mask)
        if mask is None:
            mask = np.zeros(image.shape, dtype=bool)
        box = self.crop_box(i, image)
        return SliceRecord(to_model_side(image[None], self.size)[0], _masks_to_model_side(mask[None], self.size)[0],
                           *origin, crop=to_model_side(image[None], self.size, box)[0],
                           crop_mask=_masks_to_model_side(mask[None], self.size, box)[0],
                           box=box.rescaled(image.shape, (self.size, self.size)))

    def _crop_group(self, i: int) -> tuple:
        """The slices that share a crop box: a known volume's, else the slice alone."""
        return ("volume", self.volume_ids[i]) if self.slice_indices[i] >= 0 else ("slice", i)

    def crop_box(self, i: int, image: np.ndarray | None = None) -> Box:
        """The liver box of slice ``i`` in its file's pixels (``image``: that slice, already
        read). The first call for a volume reads its other slices to find their union."""
        if self._group_members is None:  # built on first use: most datasets never crop
            self._group_members = {}
            for j in range(len(self.files)):
                self._group_members.setdefault(self._crop_group(j), []).append(j)
        if i not in self._boxes:
            members = self._group_members[self._crop_group(i)]
            slices = [image if j == i and image is not None else read_image_gray(self.files[j].image)
                      for j in members]
            boxes = group_boxes([liver_extent(s > 0) for s in slices], [s.shape for s in slices],
                                [0] * len(members), [str(self.files[j].image) for j in members])
            self._boxes.update(zip(members, boxes))
        return self._boxes[i]


class BmadSliceDataset(_SliceFilesDataset):
    """The slices of one split (``"train"``, ``"valid"``, ``"test"``) of a BMAD-layout folder,
    in :func:`medad_fast.data.bmad.load_split` order (normal first, then abnormal), each read
    on access; ``dataset[i]`` equals ``load_split(root, split, size)`` at ``i`` bitwise.

    ``path`` is the resolved image path (as ``load_split``'s ``paths``). Listing happens here,
    so a missing folder, an empty split or a missing mask raises at construction
    (``FileNotFoundError`` naming it); an unreadable image raises on access.
    """

    def __init__(self, root: str | os.PathLike, split: str, size: int = 256, crop: bool = False):
        self.size = check_size(size)
        self.crop, self._boxes = bool(crop), {}
        self.root = Path(root).expanduser()
        self.split = split
        self.files = list_split(self.root, split)
        self.paths = [str(entry.image.resolve()) for entry in self.files]
        if dataset_root(self.root) is not None:
            # MedIAnomaly sets are 2-D images, each its own subject: a name like "Te-noTr_0000"
            # is no volume and slice position (it would group unrelated images into one crop box)
            located = [(entry.image.stem, -1) for entry in self.files]
        else:
            origins = slice_origins(self.root)
            located = [origins.get(entry.image.relative_to(self.root).as_posix()) or slice_origin(entry.image)
                       for entry in self.files]
        self.volume_ids = [volume for volume, _ in located]
        self.slice_indices = [index for _, index in located]


class ImageFileDataset(_SliceFilesDataset):
    """Unlabelled image files (``label`` False, ``mask`` zeros), in the given order, each
    read as grayscale and resized on access (``medad-fast predict``'s inputs).

    ``path`` is the file as given; the volume comes from the file name
    (:func:`medad_fast.data.layout.slice_origin`). A missing or unreadable file raises on
    access, naming it.
    """

    def __init__(self, files: Iterable[str | os.PathLike], size: int = 256, crop: bool = False):
        self.size = check_size(size)
        self.crop, self._boxes = bool(crop), {}
        if isinstance(files, (str, os.PathLike)):  # one file, not the characters of its name
            files = [files]
        self.files = [SliceFile(Path(f), None, False) for f in files]
        self.paths = [str(entry.image) for entry in self.files]
        located = [slice_origin(entry.image) for entry in self.files]
        self.volume_ids = [volume for volume, _ in located]
        self.slice_indices = [index for _, index in located]


def collate_slices(records: list[SliceRecord]) -> SliceBatch:
    """Stack records into a :class:`SliceBatch` (the ``collate_fn`` of the DataLoader)."""
    if not records:
        raise ValueError("cannot collate an empty list of slices")
    cropped = records[0].crop is not None
    return SliceBatch(
        images=torch.stack([r.image for r in records]),
        masks=torch.stack([r.mask for r in records]),
        labels=torch.tensor([r.label for r in records], dtype=torch.bool),
        paths=[r.path for r in records],
        volume_ids=[r.volume_id for r in records],
        slice_indices=[r.slice_index for r in records],
        crops=torch.stack([r.crop for r in records]) if cropped else None,
        crop_masks=torch.stack([r.crop_mask for r in records]) if cropped else None,
        boxes=[r.box for r in records] if cropped else None,
    )


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def iter_batches(dataset: Dataset, batch_size: int, start: int = 0, stop: int | None = None,
                 workers: int = 0) -> Iterator[SliceBatch]:
    """The slices ``start .. stop - 1`` of ``dataset`` in order, as :class:`SliceBatch` es of
    ``batch_size`` (the last one smaller when the range does not divide); nothing for an
    empty range. ``stop`` None = ``len(dataset)``.

    Only one batch is held at a time (per worker, plus the DataLoader's prefetch).
    ``workers`` 0 reads in this process; ``workers > 0`` uses a
    ``torch.utils.data.DataLoader`` with that many worker processes (same batches, same
    order). Bad arguments raise ``ValueError`` naming them, at the call.
    """
    n = len(dataset)
    batch_size = _check_count("batch_size", batch_size, 1)
    start = _check_count("start", start, 0)
    stop = n if stop is None else _check_count("stop", stop, 0)
    workers = _check_count("workers", workers, 0)
    if not start <= stop <= n:
        raise ValueError(f"need start <= stop <= len(dataset) = {n}, got start={start}, stop={stop}")
    if start == stop:
        return iter(())
    if workers == 0:
        return (collate_slices([dataset[i] for i in range(first, min(first + batch_size, stop))])
                for first in range(start, stop, batch_size))
    return iter(DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, shuffle=False,
                           num_workers=workers, collate_fn=collate_slices))
