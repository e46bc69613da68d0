"""The whole split at once: the cached, device-ready loader that training uses.

:func:`load_split` reads every slice of one split of a BMAD-layout folder (the layout, its
variants and its listing: :mod:`medad_fast.data.layout`; a MedIAnomaly ``data.json`` dataset
too: :mod:`medad_fast.data.medianomaly`) into uint8 tensors, each slice
exactly as :class:`medad_fast.data.dataset.BmadSliceDataset` reads it (resized to
``size x size``: images by area averaging to shrink and bilinear to enlarge, masks by
nearest neighbour; a pixel > 0 stays >= 1, so ``image > 0`` keeps marking the liver). For
evaluation over more slices than fit in memory, iterate the dataset instead
(:func:`medad_fast.data.dataset.iter_batches`).

Loading is cached twice: in process (a small LRU) and on disk (``torch.save`` in
``$MEDAD_FAST_CACHE`` or ``~/.cache/medad_fast/``), keyed by a hash of the resolved file
paths, sizes, modification times and the target size, so editing, adding or removing a file
invalidates the entry. The cache is never written inside the data folder.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from medad_fast.data.crop import CROP_MARGIN, MIN_BOX_FRACTION
from medad_fast.data.dataset import BmadSliceDataset, check_size, read_slice
from medad_fast.data.layout import MANIFEST_NAME, SPLITS, SliceFile, list_split
from medad_fast.io import atomic_write_bytes

__all__ = ["SliceSet", "load_split", "load_images", "list_split", "clear_memory_cache", "cache_dir", "SPLITS"]

CACHE_FORMAT = 1  # bump when the cached content changes meaning
_MEMORY_CACHE_SIZE = 4
_memory_cache: OrderedDict[str, "SliceSet"] = OrderedDict()


@dataclass
class SliceSet:
    """The slices of one split, resized to a common side S.

    images: torch.uint8 [N, 1, S, S] (0 outside the liver)
    masks:  torch.uint8 [N, 1, S, S] with values 0/1 (1 = lesion)
    labels: torch.bool [N] (True = abnormal, i.e. from an ``Ungood`` folder)
    paths:  list[str] of N resolved image paths, in the order of the tensors
            (normal slices first, then abnormal ones, each sorted by file name)
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def clone(self) -> "SliceSet":
        return SliceSet(self.images.clone(), self.masks.clone(), self.labels.clone(), list(self.paths))


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$MEDAD_FAST_CACHE`` if set, else ``~/.cache/medad_fast``."""
    configured = os.environ.get("MEDAD_FAST_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "medad_fast"


def clear_memory_cache() -> None:
    """Forget the in-process cache (the disk cache is left alone)."""
    _memory_cache.clear()


def _cache_key(entries: list[SliceFile], size: int, crop: bool = False, manifest: Path | None = None) -> str:
    # the crop's part only when cropping: the keys of the uncropped sets stay what they were
    # (and the box rule's settings: a changed rule makes other crops)
    cropped = f"|crop-margin={CROP_MARGIN}|crop-min-box={MIN_BOX_FRACTION}" if crop else ""
    digest = hashlib.sha256(f"bmad-v{CACHE_FORMAT}|size={size}{cropped}".encode())
    if crop and manifest is not None and manifest.is_file():  # it tells the volumes, which share a box
        stat = manifest.stat()
        digest.update(f"|manifest|{manifest.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for image, mask, abnormal in entries:
        for path in (image, mask):
            if path is None:
                digest.update(b"|-")
                continue
            stat = path.stat()
            digest.update(f"|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        digest.update(b"|1" if abnormal else b"|0")
    return digest.hexdigest()[:32]


def _is_inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _load_from_disk(file: Path) -> SliceSet | None:
    if not file.is_file():
        return None
    try:
        blob = torch.load(file, map_location="cpu", weights_only=True)
        return SliceSet(blob["images"], blob["masks"], blob["labels"], list(blob["paths"]))
    except Exception as e:  # a corrupt or foreign cache file is rebuilt, never fatal
        warnings.warn(f"ignoring unreadable cache file {file}: {e}", RuntimeWarning, stacklevel=3)
        return None


def _save_to_disk(file: Path, slices: SliceSet, root: Path) -> None:
    if _is_inside(file, root):
        warnings.warn(f"not writing the cache {file}: it would be inside the data folder {root}",
                      RuntimeWarning, stacklevel=3)
        return
    buffer = io.BytesIO()
    torch.save({"images": slices.images, "masks": slices.masks, "labels": slices.labels,
                "paths": slices.paths}, buffer)
    try:
        atomic_write_bytes(file, buffer.getvalue())
    except OSError as e:  # a read-only home must not stop training
        warnings.warn(f"could not write the cache file {file}: {e}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- loading


def _read_slices(entries: list[SliceFile], size: int) -> SliceSet:
    """Every slice of ``entries``, read as :class:`medad_fast.data.dataset.BmadSliceDataset` reads one."""
    n = len(entries)
    images = torch.empty(n, 1, size, size, dtype=torch.uint8)
    masks = torch.empty(n, 1, size, size, dtype=torch.uint8)
    for i, entry in enumerate(entries):
        images[i], masks[i] = read_slice(entry.image, entry.mask, size)
    labels = torch.tensor([entry.abnormal for entry in entries], dtype=torch.bool)
    return SliceSet(images, masks, labels, [str(entry.image.resolve()) for entry in entries])


def _read_cropped_slices(root: str | os.PathLike, split: str, size: int) -> SliceSet:
    """Every slice of the split cut to its liver box and resized (the boxes need the volumes,
    which the per-slice dataset knows)."""
    dataset = BmadSliceDataset(root, split, size, crop=True)
    n = len(dataset)
    images = torch.empty(n, 1, size, size, dtype=torch.uint8)
    masks = torch.empty(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        record = dataset[i]
        images[i], masks[i] = record.crop, record.crop_mask
    labels = torch.tensor([entry.abnormal for entry in dataset.files], dtype=torch.bool)
    return SliceSet(images, masks, labels, list(dataset.paths))


def _cached(entries: list[SliceFile], size: int, read, data_root: Path, crop: bool = False,
            manifest: Path | None = None) -> SliceSet:
    """``read()`` of ``entries``, through the in-process LRU and the disk cache (never written
    inside ``data_root``); a copy of the cached set."""
    key = _cache_key(entries, size, crop, manifest)
    if key in _memory_cache:
        _memory_cache.move_to_end(key)
        return _memory_cache[key].clone()
    disk_file = cache_dir() / f"bmad-{key}.pt"
    slices = _load_from_disk(disk_file)
    if slices is None or len(slices) != len(entries):
        slices = read()
        _save_to_disk(disk_file, slices, data_root)
    _memory_cache[key] = slices
    while len(_memory_cache) > _MEMORY_CACHE_SIZE:
        _memory_cache.popitem(last=False)
    return slices.clone()


def load_split(root: str | os.PathLike, split: str, size: int = 256, cache: bool = True, crop: bool = False
               ) -> SliceSet:
    """Load one split (``"train"``, ``"valid"`` or ``"test"``) of a BMAD-layout folder (or of
    a MedIAnomaly ``data.json`` dataset: :mod:`medad_fast.data.medianomaly`).

    Returns a :class:`SliceSet` (uint8 images and 0/1 masks ``[N, 1, size, size]``, bool
    labels ``[N]``, paths); the masks of an image-level split
    (:func:`medad_fast.data.layout.is_image_level`) are all zeros. ``crop=True``: every slice
    cut to its (volume's) liver box first (:mod:`medad_fast.data.crop`; images and masks are
    then the model's inputs, the ``crop``/``crop_mask`` of
    :class:`medad_fast.data.dataset.BmadSliceDataset` with ``crop=True``). ``cache=True``
    uses the in-process LRU and the disk cache (see module docstring); the returned tensors
    are the caller's own (a copy of the cached ones).

    Errors name the culprit: ``FileNotFoundError`` for a missing folder, an empty split or a
    missing mask; ``ValueError`` for an unreadable image or a mask whose shape differs from
    its image.
    """
    size = check_size(size)
    entries = list_split(root, split)
    read = (lambda: _read_cropped_slices(root, split, size)) if crop else (lambda: _read_slices(entries, size))
    if not cache:
        return read()
    return _cached(entries, size, read, Path(root).expanduser(), crop, Path(root).expanduser() / MANIFEST_NAME)


def load_images(files: Iterable[str | os.PathLike], size: int = 256, cache: bool = True) -> torch.Tensor:
    """Image files (e.g. :func:`medad_fast.data.medianomaly.unlabeled_files`), unlabelled,
    each read as :func:`load_split` reads a slice: ``uint8 [N, 1, size, size]``, in the given
    order. Cached as :func:`load_split` is (the same keys: paths, sizes, times, side).
    ``ValueError`` for an empty list; missing or unreadable files raise naming them."""
    size = check_size(size)
    entries = [SliceFile(Path(f).expanduser(), None, False) for f in files]
    if not entries:
        raise ValueError("no image files to load")
    for entry in entries:
        if not entry.image.is_file():
            raise FileNotFoundError(f"image file not found: {entry.image}")
    read = lambda: _read_slices(entries, size)  # noqa: E731
    if not cache:
        return read().images
    # the cache must not land inside the folder the images come from
    data_root = Path(os.path.commonpath([str(entry.image.resolve().parent) for entry in entries]))
    return _cached(entries, size, read, data_root).images
