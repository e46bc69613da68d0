"""The one evaluation driver of ``medad-fast evaluate``, for 2-D slices and CT volumes alike.

:func:`run_evaluation` is the loop that :func:`medad_fast.evaluate.evaluate` (BMAD /
MedIAnomaly slices) and :func:`medad_fast.volume_evaluate.evaluate_volumes` (CT volumes) both
run. What differs between them is an :class:`EvaluationSource` (after MONAI's split of an
evaluation into an inferer, a splitter and a merger):

- its *units*, what the ranks share under torchrun: the slices of a split, or the volumes;
- :meth:`EvaluationSource.score`: a range of units scored as :class:`ScoredBatch` es of
  slices (masks, maps, the region counted, slice labels and scores);
- :meth:`EvaluationSource.records` / :meth:`EvaluationSource.merge`: what a rank's units
  leave beside the slices (the per-volume rows), gathered to rank 0 in unit order;
- :meth:`EvaluationSource.finish`: the source's metrics and files on rank 0 (the slice
  metrics, ``scores.csv`` and ``roc.png``; or the per-volume aggregation: ``volumes.csv``,
  ``slices.csv``, volume AUROC, lesion FROC and ``froc.png``);
- the heatmap accessors: a slice's image, lesion mask and name.

The driver does everything else, once for both:

1. the process group (a no-op without torchrun) and the output folder (checked before any
   work, created by rank 0, removed again when an error leaves it empty);
2. the scorer (:func:`medad_fast.inference.load_scorer_and_state`: a checkpoint, run folder or
   a ``.pt2`` / ``.onnx`` file of ``medad-fast export``; ``compile``), under ``ops_mode``
   (``reference_ops``);
3. a spill folder inside the output folder (made by rank 0, its path given to every rank, so
   the output folder must be on a file system all ranks see; deleted at the end) holding the
   pixel stream's maps (:class:`medad_fast.metrics.PixelMetricsStream`) and whatever a
   source spills (the volumes' lesion arrays);
4. each rank scores its contiguous share of the units (:func:`medad_fast.distributed.shard_bounds`);
   the slices' masks, maps, regions, labels and scores are gathered to rank 0 in unit order
   (:func:`medad_fast.distributed.all_gather_uneven`) and fed to one pixel stream, so the
   metrics are those of one process;
5. on rank 0: with ``calibrate``, the operating point (:func:`medad_fast.operating_point.choose_operating_point`,
   the one place it is chosen); the source's metrics and files; the heatmaps
   (:func:`medad_fast.visualize.write_cases`: ``heatmaps/worst-*.png`` and ``heatmaps/best-*.png``,
   one colour scale, ``heatmap_scale`` in ``metrics.json``); last, the operating point into
   the run folder;
6. the metrics are broadcast, so every rank returns them (and raises the same calibration error).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .inference import ScorerPath, load_scorer_and_state, resolve_scorer
from .io import check_writable_folder, output_folder
from .metrics import PixelMetricsStream
from .operating_point import (OPERATING_POINT_NAME, check_calibration_split, choose_operating_point,
                              default_evaluation_dir, write_operating_point)
from .runtime import ops_mode, resolve_device
from .visualize import write_cases

__all__ = ["ScoredBatch", "EvaluationSource", "run_evaluation", "resolve_evaluated", "evaluation_dir",
           "scorer_paths"]


def resolve_evaluated(scorer: ScorerPath, calibrate: bool, split: str | None) -> Path | list[Path]:
    """What is evaluated: a checkpoint (run directory, checkpoint, exported file) resolved,
    or a seed ensemble's runs (a list, :mod:`medad_fast.ensemble`) each resolved.
    ``ValueError`` for ``calibrate`` on the test or train split, or with an ensemble (its
    operating point would have no run folder to go to, and ``predict`` never reads one for an
    ensemble)."""
    if calibrate:
        check_calibration_split(split)
    resolved = resolve_scorer(scorer)
    if calibrate and isinstance(resolved, list):
        raise ValueError("--calibrate with --ensemble: an ensemble has no run folder to store its operating point "
                         "in; calibrate each run, or pass --threshold to predict")
    return resolved


def evaluation_dir(scorer: Path | list[Path], name: str) -> Path:
    """The default ``--out``: ``<run>-<name>`` beside the run folder
    (:func:`~medad_fast.operating_point.default_evaluation_dir`); an ensemble's beside its
    first run's, ``<run>-ensemble<N>-<name>``."""
    if isinstance(scorer, list):
        return default_evaluation_dir(scorer[0], f"ensemble{len(scorer)}-{name}")
    return default_evaluation_dir(scorer, name)


def scorer_paths(scorer: Path | list[Path]) -> str | list[str]:
    """``metrics.json``'s ``checkpoint``: the absolute path, or the list of an ensemble's."""
    return [str(path.resolve()) for path in scorer] if isinstance(scorer, list) else str(scorer.resolve())


@dataclass
class ScoredBatch:
    """One batch of ``B`` scored slices, all ``[H, W]`` = the source's ``map_shape``.

    ``masks``: bool ``[B, H, W]`` lesion pixels; ``maps``: float32 ``[B, H, W]``;
    ``region``: bool ``[B, H, W]``, the pixels counted (None: all; slices of different sizes
    are padded with pixels outside it); ``labels``: bool ``[B]`` (slice abnormal);
    ``scores``: ``[B]`` slice scores, of the source's ``score_dtype``."""

    masks: np.ndarray
    maps: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    region: np.ndarray | None = None


class EvaluationSource:
    """What :func:`run_evaluation` evaluates (see the module docstring). Subclasses set the
    attributes in their constructor and implement the methods."""

    #: units the ranks share (slices, volumes)
    n_units: int
    #: (H, W) of every map in a :class:`ScoredBatch`
    map_shape: tuple[int, int]
    #: dtype of the slice scores (kept as the source computes them, so the metrics are too)
    score_dtype: np.dtype = np.dtype(np.float32)
    #: whether batches carry a region (every rank must agree)
    has_region: bool = False
    #: True when there are no lesion masks: no pixel metrics, no pixel threshold
    image_level: bool = False
    #: the split the operating point is chosen on, and the words naming the data (errors, the file)
    calibration_split: str = ""
    calibration_source: str = ""
    #: facts added to the operating point besides the checkpoint
    point_facts: dict[str, Any] = {}

    def score(self, method, start: int, stop: int, spill: Path, progress: bool,
              device: torch.device) -> Iterator[ScoredBatch]:
        """Score units ``[start, stop)``, batch by batch. ``spill``: a folder every rank sees."""
        raise NotImplementedError

    def records(self) -> Any:
        """What the units scored by this rank leave beside the slices (picklable; gathered)."""
        return None

    def merge(self, records: list[Any]) -> None:
        """Rank 0: take every rank's :meth:`records`, in rank (= unit) order."""

    def finish(self, out: Path, checkpoint: Path, state: dict[str, Any], stream: PixelMetricsStream,
               labels: np.ndarray, scores: np.ndarray, scoring_seconds: float, heatmap_scale: float,
               calibration: dict[str, Any]) -> dict[str, Any]:
        """Rank 0: compute the metrics of every slice (``labels`` / ``scores`` ``[N]``, the maps
        in ``stream``) and write the source's files into ``out``; ``calibration``: the
        ``calibrated``, ``operating_point`` and ``operating_point_file`` entries of the
        metrics. Returns the metrics (as written to ``metrics.json``)."""
        raise NotImplementedError

    def heatmap_image(self, index: int) -> np.ndarray:
        """Slice ``index``'s image ``[H, W]`` (uint8, or float in [0, 1]) for its heatmap."""
        raise NotImplementedError

    def heatmap_mask(self, index: int) -> np.ndarray | None:
        """Slice ``index``'s lesion mask ``[H, W]`` (None: no outline)."""
        raise NotImplementedError

    def heatmap_names(self) -> list[str]:
        """Every slice's name (a path: its stem names the heatmap file)."""
        raise NotImplementedError


def run_evaluation(checkpoint: Path | list[Path], out: Path, open_source: Callable[[Any], EvaluationSource], *,
                   device: str | torch.device | None, n_cases: int, progress: bool, reference_ops: bool,
                   compile: bool, calibrate: bool) -> dict[str, Any]:
    """Evaluate the scorer at ``checkpoint`` (:func:`resolve_evaluated`: a path, or a seed
    ensemble's list, which never calibrates) on ``open_source(method)`` and write
    the outputs into ``out`` (see the module docstring). Returns the metrics, with ``out``
    added, on every rank; ``ValueError`` when ``calibrate`` cannot choose an operating point."""
    world = distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    if world.is_main:
        check_writable_folder(out)  # before any work
    with ops_mode(reference_ops), contextlib.ExitStack() as cleanup:
        method, state = load_scorer_and_state(checkpoint, world.device, compile)
        source = open_source(method)
        stream, spill = None, None
        if world.is_main:
            # made here; removed again when an error leaves it empty
            cleanup.enter_context(output_folder(out))
            # the maps go to spill files beside the outputs, not into memory (deleted at the end)
            spill = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".evaluation-", dir=out))
            stream = cleanup.enter_context(PixelMetricsStream(os.path.join(spill, "pixels")))
        spill = Path(distributed.broadcast_object(spill))
        started = time.perf_counter()
        labels, scores = _score_units(source, method, stream, spill, progress and world.is_main, world)
        records = distributed.gather_objects(source.records())
        scoring_seconds = time.perf_counter() - started
        metrics = None
        if world.is_main:
            source.merge(records)
            metrics = _finish(source, checkpoint, out, state, stream, labels, scores, scoring_seconds, n_cases,
                              calibrate)
        metrics = distributed.broadcast_object(metrics)
        if "calibration_error" in metrics:  # raised on every rank, inside the output folder's guard
            raise ValueError(metrics["calibration_error"])
    metrics["out"] = str(out)  # not in metrics.json: where it is
    return metrics


def _score_units(source: EvaluationSource, method, stream: PixelMetricsStream | None, spill: Path, progress: bool,
                 world) -> tuple[np.ndarray, np.ndarray]:
    """Score this rank's share of ``source``'s units into ``stream`` (rank 0's; None elsewhere),
    one batch in memory at a time in a single process; with several, the shares are gathered
    to rank 0 in unit order. Returns ``(labels bool [N], scores [N])`` of every slice (every rank)."""
    start, stop = distributed.shard_bounds(source.n_units)
    labels, scores, shard = [], [], []
    for batch in source.score(method, start, stop, spill, progress, world.device):
        labels.append(torch.as_tensor(np.asarray(batch.labels, dtype=bool)))
        scores.append(torch.as_tensor(np.asarray(batch.scores, dtype=source.score_dtype)))
        if world.is_distributed:
            shard.append(batch)
        else:
            stream.add(batch.masks, batch.maps, batch.region)
    labels = distributed.all_gather_uneven(torch.cat(labels) if labels else torch.empty(0, dtype=torch.bool))
    scores = distributed.all_gather_uneven(
        torch.cat(scores) if scores else torch.from_numpy(np.empty(0, dtype=source.score_dtype)))
    if world.is_distributed:
        pieces = {"masks": (torch.bool, np.bool_), "maps": (torch.float32, np.float32)}
        if source.has_region:
            pieces["region"] = (torch.bool, np.bool_)
        gathered = {}
        for name, (dtype, numpy_dtype) in pieces.items():
            local = (torch.from_numpy(np.concatenate([np.asarray(getattr(b, name), dtype=numpy_dtype) for b in shard]))
                     if shard else torch.empty(0, *source.map_shape, dtype=dtype))
            gathered[name] = distributed.all_gather_uneven(local).numpy()
        if world.is_main:
            stream.add(gathered["masks"], gathered["maps"], gathered.get("region"))
    return labels.numpy(), scores.numpy()


def _finish(source: EvaluationSource, checkpoint: Path, out: Path, state: dict[str, Any],
            stream: PixelMetricsStream, labels: np.ndarray, scores: np.ndarray, scoring_seconds: float, n_cases: int,
            calibrate: bool) -> dict[str, Any]:
    """Rank 0: the operating point, the source's metrics and files, the heatmaps; the
    operating point into the run folder last. ``{"calibration_error": message}`` when
    ``calibrate`` cannot choose one (nothing is written then)."""
    calibration: dict[str, Any] = {"calibrated": calibrate, "operating_point": None, "operating_point_file": None}
    point = None
    if calibrate:
        try:
            point = choose_operating_point(labels, scores, None if source.image_level else stream.counts,
                                           source.calibration_split, source.calibration_source)
        except ValueError as e:  # one class only, no lesion pixel: no operating point to store
            return {"calibration_error": str(e)}
        point.update(checkpoint=str(checkpoint.resolve()), **source.point_facts)
        calibration.update(operating_point=point, operating_point_file=str(checkpoint.parent / OPERATING_POINT_NAME))
    # the heatmaps share one colour scale: the largest pixel value evaluated (the L1 + focal
    # loss keeps p well below 1, so a fixed [0, 1] scale would look washed out)
    heatmap_scale = stream.max if stream.n_slices else 1.0
    metrics = source.finish(out, checkpoint, state, stream, labels, scores, scoring_seconds, heatmap_scale,
                            calibration)
    write_cases(out / "heatmaps", source.heatmap_image, source.heatmap_mask, stream.map, labels, scores,
                source.heatmap_names(), n_cases, heatmap_scale)
    if point is not None:  # the run changes last, once the report is written
        write_operating_point(checkpoint.parent, point)
    return metrics
