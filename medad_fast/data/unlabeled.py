"""Unlabeled slices for training (DDAD's unknown-distribution pool): read by the engine for a
method that declares it needs them (:class:`medad_fast.methods.base.UnlabeledImages`), never
by the method itself.

:func:`load_unlabeled_pool` reads, in this order and concatenated:

* a folder of images (``--unlabeled DIR``, recursively: :func:`~medad_fast.data.layout.collect_image_files`);
* a split (``valid`` or ``test``) of the run's data folder (``--unlabeled-split``), labels ignored
  (:func:`~medad_fast.data.bmad.load_split`);
* the ``train["unlabeled"]`` pool of a MedIAnomaly / DDAD-ASR ``data.json`` dataset
  (:func:`~medad_fast.data.medianomaly.unlabeled_files`), when asked for and ``--data`` is one.

Each slice is read as the run's training slices are (resized to the run's side; with ``crop``
cut to its liver box first). Errors name the setting (``--unlabeled``, ``--unlabeled-split``)
and the path.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medad_fast.data.bmad import load_split
from medad_fast.data.dataset import ImageFileDataset, read_slice
from medad_fast.data.layout import collect_image_files
from medad_fast.data.medianomaly import dataset_root, unlabeled_files

__all__ = ["load_unlabeled_pool", "read_unlabeled_folder"]


def read_unlabeled_folder(folder: str | os.PathLike, size: int, crop: bool = False) -> torch.Tensor:
    """``uint8 [N, 1, size, size]``: every image under ``folder`` (sorted by relative path),
    each cut to its liver box with ``crop``. ``FileNotFoundError`` naming ``--unlabeled`` for a
    missing folder or one without images."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"config unlabeled={str(folder)!r} (--unlabeled): folder not found: {path}")
    try:
        files = collect_image_files(path, what="unlabeled (--unlabeled)")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"config unlabeled={str(folder)!r} (--unlabeled): {exc}") from None
    if crop:  # as the run's training slices: each cut to its liver box
        dataset = ImageFileDataset(files, size, crop=True)
        return torch.stack([dataset[i].crop for i in range(len(dataset))])
    return torch.stack([read_slice(file, None, size)[0] for file in files])


def load_unlabeled_pool(data: str | os.PathLike | None, folder: str | None, split: str | None, data_json: bool,
                        size: int, crop: bool = False) -> torch.Tensor | None:
    """The unlabeled pool, ``uint8 [N, 1, size, size]`` (module docstring): the images of
    ``folder``, then of the ``split`` split of ``data``, then (``data_json`` and ``data`` a
    ``data.json`` dataset) its ``train["unlabeled"]`` pool; None when none of them gives any.
    Errors name the setting and the path."""
    parts = []
    if folder is not None:
        parts.append(read_unlabeled_folder(folder, size, crop))
    if split is not None:
        if data is None:
            raise ValueError(f"config unlabeled_split={split!r} (--unlabeled-split) needs the run's data folder "
                             f"(--data)")
        try:
            parts.append(load_split(data, split, size=size, crop=crop).images)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"config unlabeled_split={split!r} (--unlabeled-split): {exc}") from None
    if data_json and data is not None and dataset_root(data) is not None:
        # a data.json dataset: its unlabeled pool, labels unread
        parts.append(torch.stack([read_slice(file, None, size)[0] for file in unlabeled_files(data)]))
    return torch.cat(parts) if parts else None
