"""Scoring a CT volume slice by slice with any method, and putting the maps back on its grid.

:func:`score_volume` takes a scan (:class:`medad_fast.data.scan.Volume`, Hounsfield units in
the file's voxel order) and its liver mask (bool, same voxel order), and for every axial slice
that contains liver:

1. takes the slice in display orientation (:func:`medad_fast.data.scan.display_slice`:
   anterior up, the patient's right on the left: the orientation ``prepare`` writes, so the
   orientation the model was trained on);
2. windows it exactly as ``prepare`` wrote the model's training slices (the model's
   preprocessing record, :mod:`medad_fast.preprocessing`, unless told otherwise) (:func:`medad_fast.data.scan.apply_window`,
   :func:`medad_fast.data.scan.liver_image`: 0 outside the liver, >= 1 inside, optional
   histogram equalisation);
3. resizes it to the model's side as the BMAD loader resizes a PNG
   (:func:`medad_fast.data.dataset.to_model_side`) and scores it
   (:func:`medad_fast.inference.score_batch`: pixel map and slice score); when the run crops
   to the liver box (:mod:`medad_fast.data.crop`), the slice is first cut to the VOLUME's
   liver box (the union of its slices' liver extents plus a margin, square: one scale for
   every slice of the scan);
4. resizes the map back to the slice's in-plane size (:func:`medad_fast.io.resize_images`;
   with cropping, into the box: :func:`medad_fast.data.crop.paste_back`), sets it to 0
   outside the liver and writes it into the slice's voxels.

Slices are read, scored and put back ``batch_size`` at a time: only one batch of slices exists
at the model's side. Slices without liver are not scored; their map is 0. Several scans go
through :func:`read_ahead`, which reads the next scan from disk (decompression, DICOM
decoding) in a background thread while the current one is scored.

Volume score (:func:`aggregate_slice_scores`): ``score`` is the maximum of the slice scores
(a volume is as abnormal as its most abnormal slice, the image score's rule one level up);
``top_k_mean`` is the mean of the ``k`` highest slice scores (all of them when fewer), less
sensitive to one noisy slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .data.crop import liver_box, paste_back
from .data.dataset import to_model_side
from .data.scan import DEFAULT_WINDOW, Volume, VolumeError, apply_window, display_slice, liver_image, put_display_slice
from .inference import score_batch
from .io import resize_images
from .methods import Method
from .preprocessing import preprocessing_of, scoring_window

__all__ = ["VolumeScores", "score_volume", "aggregate_slice_scores", "display_images", "read_ahead", "DEFAULT_TOP_K"]

T = TypeVar("T")

#: slices averaged by ``top_k_mean`` and shown in the review montage
DEFAULT_TOP_K = 6


@dataclass
class VolumeScores:
    """What :func:`score_volume` returns.

    ``anomaly_map``: float32, the scan's shape and voxel order, 0 outside the liver;
    ``slice_indices``: int64 [n] voxel indices along the scan's axial axis of the scored
    (liver) slices, ascending; ``slice_scores``: float32 [n]; ``liver_pixels``: int64 [n];
    ``z_mm``: float64 [n], superior coordinate (RAS z) of each slice's centre.
    """

    anomaly_map: np.ndarray
    slice_indices: np.ndarray
    slice_scores: np.ndarray
    liver_pixels: np.ndarray
    z_mm: np.ndarray


def liver_slice_indices(liver: np.ndarray, axis: int) -> np.ndarray:
    """Voxel indices along ``axis`` of the slices holding at least one liver voxel."""
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(liver.any(axis=other)).astype(np.int64)


def display_images(scan: Volume, liver: np.ndarray, indices, window=DEFAULT_WINDOW, hist_eq: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, H, W], liver bool [n, H, W])``: axial slices ``indices`` of
    ``scan`` in display orientation, windowed as ``prepare`` writes them."""
    ornt = scan.orientation
    hu = np.stack([display_slice(scan.voxels, ornt, int(k)) for k in indices]).astype(np.float32, copy=False)
    masks = np.stack([display_slice(liver, ornt, int(k)) for k in indices])
    return liver_image(apply_window(hu, window), masks, hist_eq), masks


def score_volume(method: Method, scan: Volume, liver: np.ndarray, window: tuple[float, float] | None = None,
                 hist_eq: bool | None = None, batch_size: int = 16, device: torch.device | None = None,
                 progress: bool = False) -> VolumeScores:
    """Score every liver slice of ``scan`` (see the module docstring). ``liver``: bool, the
    scan's shape. ``window`` / ``hist_eq`` None: the method's preprocessing record's (its
    crop and side always are). ``VolumeError`` naming the scan when its liver mask is empty."""
    if tuple(liver.shape) != tuple(scan.shape):
        raise ValueError(f"liver mask of shape {tuple(liver.shape)} does not fit scan {scan.path} {scan.shape}")
    axis, ornt = scan.axial_axis, scan.orientation
    indices = liver_slice_indices(liver, axis)
    if indices.size == 0:
        raise VolumeError(f"the liver mask of scan {scan.path} is empty: no slice to score")
    record = preprocessing_of(method.config)
    window, hist_eq, _ = scoring_window(record, window, hist_eq)
    side = record.image_size
    box = None
    if record.crop == "liver":
        # one box for the volume: that of the liver's projection along the axial axis (the
        # union of the slices' livers), in display orientation
        box = liver_box(display_slice(liver.any(axis=axis, keepdims=True), ornt, 0))
    anomaly_map = np.zeros(scan.shape, dtype=np.float32)
    scores = np.empty(indices.size, dtype=np.float32)
    liver_pixels = np.empty(indices.size, dtype=np.int64)
    starts = range(0, indices.size, batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"score {scan.name}", unit="batch", dynamic_ncols=True)
    for start in starts:
        batch = indices[start:start + batch_size]
        images, masks = display_images(scan, liver, batch, window, hist_eq)
        maps, batch_scores = score_batch(method, to_model_side(images, side, box), device)
        if box is None:
            maps = resize_images(maps[:, None], tuple(images.shape[1:]))[:, 0].numpy()
        else:
            maps = paste_back(maps, box, tuple(images.shape[1:]), fill=0.0).numpy()
        maps[~masks] = 0.0
        for k, image_map in zip(batch, maps):
            put_display_slice(anomaly_map, ornt, int(k), image_map)
        scores[start:start + batch.size] = batch_scores.numpy()
        liver_pixels[start:start + batch.size] = masks.reshape(batch.size, -1).sum(axis=1)
    return VolumeScores(anomaly_map, indices, scores, liver_pixels, scan.slice_z_mm(indices))


def aggregate_slice_scores(slice_scores: np.ndarray, top_k: int = DEFAULT_TOP_K) -> dict[str, float]:
    """``{"score": max, "top_k_mean": mean of the top_k highest}`` of a volume's slice scores."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ranked = np.sort(np.asarray(slice_scores, dtype=np.float64))[::-1]
    if ranked.size == 0:
        raise ValueError("no slice scores to aggregate")
    return {"score": float(ranked[0]), "top_k_mean": float(ranked[:top_k].mean())}


def read_ahead(loaders: Iterable[Callable[[], T]]) -> Iterator[T]:
    """The results of ``loaders`` in order, each started in a background thread as soon as the
    previous result is handed out: reading scan ``i + 1`` overlaps whatever the caller does
    with scan ``i`` (nibabel's gzip and pydicom's decoding release the GIL for most of their
    work). At most two results are alive at a time when the caller drops each before asking
    for the next. An error of a loader is raised when its
    result is due, so the scans before it are processed first."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending: Future | None = None
        for loader in loaders:
            future = pool.submit(loader)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()
