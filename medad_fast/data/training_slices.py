"""The normal training slices of a run, by index: what lets a DDP rank hold only its share.

:func:`medad_fast.data.bmad.load_split` reads a whole split at once (cached); a training run
under torchrun does not need every slice on every rank, only the ones of its batches.
:class:`TrainingSlices` lists the split's files (``train/good``, or ``train["0"]`` of a
MedIAnomaly ``data.json``) and reads any of them by index, each exactly as ``load_split``
stores it (:class:`~medad_fast.data.dataset.BmadSliceDataset`: decode, resize, and with
``crop`` the cut to the liver box of its volume), so a slice read alone and the same slice
of the whole split are equal bitwise.

It is a view: ``chosen`` holds the split's indices it stands for (position ``p`` of the view
is split slice ``chosen[p]``), and :meth:`TrainingSlices.subset` narrows it, so that the
selections of training (slices without liver left out, the ``max_train_images`` subset, the
held-back validation slices: :mod:`medad_fast.train`) are index operations that read nothing.

* :meth:`TrainingSlices.read` ``(positions)``: those slices only, ``uint8 [k, 1, S, S]``;
* :meth:`TrainingSlices.read_all`: every slice of the view, through ``load_split``'s caches
  (one process reads the whole split once, as before);
* :meth:`TrainingSlices.empty_flags`: which slices of the view are all black (no liver);
  under torchrun each rank reads a contiguous 1/world of them and the flags are gathered
  (the pixels are dropped as they are read), so no rank reads the whole split for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from medad_fast import distributed
from medad_fast.data.bmad import load_split
from medad_fast.data.dataset import BmadSliceDataset, check_size

__all__ = ["TRAIN_SPLIT", "TrainingSlices"]

TRAIN_SPLIT = "train"
#: slices read at a time while looking for empty ones (bounds the memory of that pass)
_FLAG_CHUNK = 256


class TrainingSlices:
    """The normal training slices of ``root`` at side ``size`` (cut to their liver boxes with
    ``crop``), by index (module docstring).

    ``chosen``: int64 ``[n]``, the split indices this view stands for (default: all of them,
    in the split's order). Listing happens here: a missing folder or an empty split raises
    ``FileNotFoundError`` naming it; an unreadable image raises when it is read."""

    def __init__(self, root: str | os.PathLike, size: int, crop: bool = False,
                 chosen: torch.Tensor | None = None, *, _dataset: BmadSliceDataset | None = None) -> None:
        self.root, self.size, self.crop = root, check_size(size), bool(crop)
        # one dataset per split: it keeps the liver boxes it found (a volume's slices read once)
        self.dataset = _dataset if _dataset is not None else BmadSliceDataset(root, TRAIN_SPLIT, self.size, crop=crop)
        self.chosen = (torch.arange(len(self.dataset), dtype=torch.int64) if chosen is None
                       else torch.as_tensor(chosen, dtype=torch.int64))

    def __len__(self) -> int:
        return int(self.chosen.shape[0])

    @property
    def paths(self) -> list[str]:
        """The resolved image path of every slice of the view, in its order."""
        return [self.dataset.paths[i] for i in self.chosen.tolist()]

    def subset(self, positions: torch.Tensor) -> TrainingSlices:
        """The view of the slices at ``positions`` (int64 indices or a bool mask over this
        view), in that order; reads nothing."""
        return TrainingSlices(self.root, self.size, self.crop, self.chosen[positions], _dataset=self.dataset)

    def read(self, positions: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``uint8 [k, 1, S, S]``: the slices at ``positions`` of the view, in that order."""
        index = self.chosen[torch.as_tensor(positions, dtype=torch.int64)].tolist()
        images = torch.empty(len(index), 1, self.size, self.size, dtype=torch.uint8)
        for j, i in enumerate(index):
            record = self.dataset[i]
            images[j] = record.crop if self.crop else record.image
        return images

    def read_all(self) -> torch.Tensor:
        """``uint8 [n, 1, S, S]``: every slice of the view, through the caches of
        :func:`~medad_fast.data.bmad.load_split` (the whole split is read, then indexed)."""
        images = load_split(self.root, TRAIN_SPLIT, size=self.size, crop=self.crop).images
        return images if len(self) == images.shape[0] and bool(
            (self.chosen == torch.arange(len(self))).all()) else images[self.chosen]

    def empty_flags(self, images: torch.Tensor | None = None) -> torch.Tensor:
        """bool ``[n]``: True for a slice of the view whose pixels are all 0 (no liver).
        ``images``: the view's slices when already read (:meth:`read_all`); else every rank
        reads its contiguous share (:func:`medad_fast.distributed.shard_bounds`) and the
        flags of all ranks are gathered (the same on every rank)."""
        if images is not None:
            return images.flatten(1).amax(dim=1) == 0
        start, stop = distributed.shard_bounds(len(self))
        flags = [self.read(torch.arange(i, min(i + _FLAG_CHUNK, stop))).flatten(1).amax(dim=1) == 0
                 for i in range(start, stop, _FLAG_CHUNK)]
        mine = torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)
        return distributed.all_gather_uneven(mine)
