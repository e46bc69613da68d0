"""`medad-fast evaluate`: score a split with a trained method and write the evaluation.

``--data DIR`` evaluates BMAD-layout slices or a MedIAnomaly ``data.json`` dataset (below);
``--scans ... --masks ... --labels ...`` or ``--manifest FILE`` evaluates CT volumes
(:mod:`medad_fast.volume_evaluate`).

An image-level split (abnormal images without lesion masks, :func:`medad_fast.data.layout.is_image_level`;
every MedIAnomaly test split) has image metrics only: the pixel metrics are null in
``metrics.json`` (``image_level`` true) and printed as "n/a (no masks)", ``roc.png`` has the
image-level curve alone, the heatmaps have no lesion outline, and the operating point has no
pixel threshold.

Output folder (``--out``; default ``<run>-eval-<split>`` beside the run folder, which
``evaluate`` leaves unchanged)::

    metrics.json                  image/pixel AUROC, AP, AUPRO@0.3, best Dice, counts, scoring
                                  speed (slices/s of the read-and-score loop) and run facts
                                  (``weights``: "ema" for a run trained with ``--ema``, which
                                  scores with its moving average, else "last"; ``scorer``:
                                  "checkpoint", or "pt2" / "onnx" for an exported file, whose
                                  ``epoch`` and ``weights`` are null: the file does not say)
    scores.csv                    every slice's path, label (1 = lesion) and image score
    roc.png                       image-level and pixel-level ROC curves
    heatmaps/worst-*.png          abnormal slices with the lowest scores and normal slices
                                  with the highest (the method's worst cases)
    heatmaps/best-*.png           the opposite (its best cases)

With ``--calibrate`` (on ``--split valid``, its default; refused on test and train), also
the operating point chosen on the evaluated split, in the run folder (the checkpoint's) as
``operating_point.json``: the slice-score threshold at 95 % slice specificity and the
best-Dice pixel threshold (:mod:`medad_fast.operating_point`; ``metrics.json`` repeats it
under ``operating_point``), which ``predict`` then uses. Without it nothing is written into
the run folder.

The model is a checkpoint, a run directory or a ``.pt2`` / ``.onnx`` file of ``medad-fast
export`` (:class:`medad_fast.exported.ExportedModel`, as ``predict`` scores it).

Slices are made as the model's training slices were: its preprocessing record's crop and
side (:mod:`medad_fast.preprocessing`).

Each heatmap PNG shows the slice and, beside it, the slice with the anomaly map blended in
(jet colour map from 0 to the split's largest pixel value, ``heatmap_scale`` in
metrics.json) and the ground-truth lesion outline in green.

A run that crops to the liver box (``--crop``, :mod:`medad_fast.data.crop`) scores each slice
cut to its liver box and pastes the map back into the whole slice, so the metrics are on the
same whole slices and masks (at the model's side) as a run's that does not crop;
``metrics.json`` says which (``crop``).

Slices are read and scored one batch at a time; the exact pixel metrics keep only the
lesion pixels' scores in memory and spill every map to a temporary file in the output folder
(4 bytes per pixel, deleted at the end; :class:`medad_fast.metrics.PixelMetricsStream`), so
a split of any size fits in memory. Under torchrun (``torchrun --nproc_per_node N -m medad_fast.cli evaluate ...``)
every rank scores its contiguous share of the slices, the maps and scores are gathered in
order, and rank 0 alone computes the metrics and writes the files.

An output folder that cannot be written is reported before any work (exit code 2); one
that the call created is removed again when an error leaves it empty.
"""

from __future__ import annotations

import contextlib
import csv
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .cpu_isa import isa_report
from .data.dataset import BmadSliceDataset
from .data.layout import is_image_level
from .inference import load_scorer_and_state, resolve_checkpoint, score_dataset, scorer_facts
from .io import atomic_write_json, atomic_write_text, check_writable_folder, output_folder
from .metrics import PixelMetricsStream, image_metrics, roc_curve, roc_curve_from_counts
from .operating_point import (OPERATING_POINT_NAME, check_calibration_split, choose_operating_point,
                              default_evaluation_dir, write_operating_point)
from .runtime import ops_mode, resolve_device
from .visualize import plot_roc, write_cases

__all__ = ["evaluate"]


def evaluate(checkpoint: str | Path, data: str | Path, split: str | None = None, out: str | Path | None = None,
             device: str | torch.device | None = None, batch_size: int = 16, n_cases: int = 4,
             progress: bool = True, reference_ops: bool = False, compile: bool = False,
             calibrate: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory, or a ``.pt2`` / ``.onnx`` file of ``medad-fast
    export``) of any method on a split of a BMAD-layout folder (None: ``valid`` with
    ``calibrate``, else ``test``); write ``metrics.json``, ``roc.png`` and the heatmaps into
    ``out`` (None: :func:`default_evaluation_dir`). ``calibrate``: also choose the operating
    point on this split and store it in the run folder (the file's folder;
    :mod:`medad_fast.operating_point`; ``ValueError`` on the test or train split); without it
    nothing is written into the run folder. Returns the metrics. ``compile``: compile the
    method's networks (:func:`~medad_fast.runtime.compile_networks`; an exported file is
    compiled already)."""
    split = split or ("valid" if calibrate else "test")
    if calibrate:
        check_calibration_split(split)
    checkpoint = resolve_checkpoint(checkpoint)
    out = Path(out) if out is not None else default_evaluation_dir(checkpoint, f"eval-{split}")
    world = distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    if world.is_main:
        check_writable_folder(out)  # before any work
    metrics = None
    with ops_mode(reference_ops), contextlib.ExitStack() as cleanup:
        method, state = load_scorer_and_state(checkpoint, world.device, compile)
        record = method.config.preprocessing  # as the run was trained; maps come back whole
        dataset = BmadSliceDataset(data, split, size=record.image_size, crop=record.crop == "liver")
        stream = None
        if world.is_main:
            # the maps go to a spill file beside the outputs, not into memory (deleted at the end)
            # made here; removed again when an error leaves it empty
            cleanup.enter_context(output_folder(out))
            spill = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".pixel-maps-", dir=out))
            stream = cleanup.enter_context(PixelMetricsStream(spill))
        started = time.perf_counter()
        scores = _score_split(method, dataset, stream, batch_size, progress, world)
        scoring_seconds = time.perf_counter() - started
        if world.is_main:
            extra: dict[str, Any] = {"calibrated": calibrate, "operating_point": None, "operating_point_file": None,
                                     "preprocessing": record.to_dict()}
            point = None
            if calibrate:
                try:
                    point = choose_operating_point(_labels(dataset), scores,
                                                   None if is_image_level(dataset.files) else stream.counts, split,
                                                   f"the {split} split of {Path(data).resolve()}")
                except ValueError as e:  # one class only: no operating point to store
                    metrics = {"calibration_error": str(e)}
            if point is not None:
                point.update(checkpoint=str(checkpoint.resolve()), data=str(Path(data).resolve()))
                extra.update(operating_point=point,
                             operating_point_file=str(checkpoint.parent / OPERATING_POINT_NAME))
            if metrics is None:
                metrics = _write_evaluation(out, checkpoint, data, split, method.config, state, dataset, stream,
                                            scores, n_cases, scoring_seconds, extra)
            if point is not None:  # the run changes last, once the report is written
                write_operating_point(checkpoint.parent, point)
    metrics = distributed.broadcast_object(metrics)
    if "calibration_error" in metrics:  # raised on every rank
        raise ValueError(metrics["calibration_error"])
    metrics["out"] = str(out)  # not in metrics.json: where it is
    return metrics


def _labels(dataset: BmadSliceDataset) -> np.ndarray:
    return np.array([entry.abnormal for entry in dataset.files], dtype=bool)


#: the metrics.json keys that need lesion masks: null for an image-level split
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro_0.3", "best_dice", "n_pixels", "n_abnormal_pixels")


def _pixel_counts(dataset: BmadSliceDataset, stream: PixelMetricsStream, metric: str):
    """The split's exact pixel counts, or None when it is image-level (no lesion masks)."""
    return None if is_image_level(dataset.files) else stream.counts(metric)


def _score_split(method, dataset: BmadSliceDataset, stream: PixelMetricsStream | None, batch_size: int,
                 progress: bool, world) -> np.ndarray:
    """Score ``dataset`` into ``stream`` (rank 0's; None elsewhere). Each rank scores its share
    of the slices, one batch in memory at a time; with several processes the shares are
    gathered to rank 0 in slice order. Returns the image scores [N] (every rank)."""
    start, stop = distributed.shard_bounds(len(dataset))
    scores, shard = [], []
    for batch, batch_maps, batch_scores in score_dataset(method, dataset, batch_size, start, stop,
                                                         progress and world.is_main, world.device):
        scores.append(batch_scores)
        if world.is_distributed:
            shard.append((batch.masks[:, 0].bool(), batch_maps))
        else:
            stream.add(batch.masks[:, 0].numpy(), batch_maps.numpy())
    scores = distributed.all_gather_uneven(torch.cat(scores) if scores else torch.empty(0))
    if world.is_distributed:
        size = method.config.run.image_size
        masks = distributed.all_gather_uneven(torch.cat([m for m, _ in shard]) if shard
                                              else torch.empty(0, size, size, dtype=torch.bool))
        maps = distributed.all_gather_uneven(torch.cat([m for _, m in shard]) if shard
                                             else torch.empty(0, size, size))
        if world.is_main:
            stream.add(masks.numpy(), maps.numpy())
    return scores.numpy()


def _write_evaluation(out: Path, checkpoint: Path, data: str | Path, split: str, config: Any,
                      state: dict[str, Any], dataset: BmadSliceDataset, stream: PixelMetricsStream,
                      scores: np.ndarray, n_cases: int, scoring_seconds: float,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics of the scored split (and ``extra``); metrics.json, scores.csv, roc.png, heatmaps."""
    labels = _labels(dataset)
    pixel_counts = _pixel_counts(dataset, stream, "AUROC")
    pixel = dict.fromkeys(PIXEL_KEYS) if pixel_counts is None else stream.metrics(pixel_counts)
    metrics = image_metrics(labels, scores) | pixel | {"image_level": pixel_counts is None}
    # the heatmaps share one colour scale: the largest pixel value of the split (the
    # L1 + focal loss keeps p well below 1, so a fixed [0, 1] scale would look washed out)
    heatmap_scale = stream.max if stream.n_slices else 1.0
    metrics.update({"split": split, "data": str(Path(data).resolve()), "checkpoint": str(checkpoint.resolve()),
                    "method": config.run.method, "variant": config.variant, **scorer_facts(checkpoint, state),
                    **{k: float(v) for k, v in state.get("method_state", {}).items() if isinstance(v, (int, float))},
                    "preset": config.run.preset, "image_size": config.run.image_size,
                    "crop": "liver" if dataset.crop else "none",
                    "heatmap_scale": heatmap_scale,
                    # rank 0's read-and-score loop (with torchrun: its shard and the gather)
                    "scoring_seconds": scoring_seconds,
                    "slices_per_s": len(scores) / scoring_seconds if scoring_seconds > 0 else float("nan"),
                    "cpu_isa": isa_report(),
                    **(extra or {})})
    atomic_write_json(out / "metrics.json", metrics)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", "label", "score"])
    writer.writerows((path, int(label), f"{score:.9g}") for path, label, score in zip(dataset.paths, labels, scores))
    atomic_write_text(out / "scores.csv", table.getvalue())
    curves = [(f"image (AUROC {metrics['image_auroc']:.3f})", *roc_curve(labels, scores))]
    if pixel_counts is not None:
        curves.append((f"pixel (AUROC {metrics['pixel_auroc']:.3f})", *roc_curve_from_counts(pixel_counts)))
    plot_roc(out / "roc.png", curves, title=f"{config.variant}, {config.run.preset}, {split} split"
             + (" (image-level: no masks)" if pixel_counts is None else ""))
    mask_of = (lambda i: None) if pixel_counts is None else (lambda i: dataset[i].mask[0].numpy())
    write_cases(out / "heatmaps", lambda i: dataset[i].image[0].numpy(), mask_of,
                stream.map, labels, scores, dataset.paths, n_cases, heatmap_scale)
    return metrics
