"""Operating points: the thresholds that turn scores into decisions, chosen on data the user
names for it (calibration) and stored with the run.

Calibration is explicit: ``medad-fast evaluate RUN --calibrate`` (on BMAD slices with
``--split valid``, the default with ``--calibrate``; on the ``valid`` patients of a
``prepare`` manifest; or on volumes given with ``--scans``) computes two thresholds on the
data it evaluates and writes them into the run folder (the checkpoint's folder) as
``operating_point.json``:

- ``slice_threshold``: a slice is flagged abnormal when its score is ABOVE it (``score >
  slice_threshold``); it is the lowest threshold at which at least ``specificity`` (95 %) of
  the normal slices are not flagged: the ``ceil(specificity * n)``-th smallest normal slice
  score (:func:`slice_threshold_at_specificity`).
- ``pixel_threshold``: a pixel (voxel) is lesion when its map value is AT OR ABOVE it
  (``map >= pixel_threshold``); the threshold of the best Dice over the data's pixels
  (:func:`medad_fast.metrics.best_dice_threshold_from_counts`). None (JSON null) when the
  data is image-level (no lesion masks): ``medad-fast predict`` then needs ``--threshold``.

The one ``evaluate`` driver (:mod:`medad_fast.evaluation`; BMAD slices,
:mod:`medad_fast.evaluate`; CT volumes, :mod:`medad_fast.volume_evaluate`) chooses it with
:func:`choose_operating_point`, the one place the rule and its errors live. ``split`` and ``source`` in the file say which data it
was chosen on. ``--calibrate`` is
refused on the test split (the threshold would be tuned on the data the metrics report) and
on the train split (slices the model was trained on): :func:`check_calibration_split`.
Without ``--calibrate``, ``evaluate`` writes its report into its ``--out`` (by default a
folder beside the run, :func:`default_evaluation_dir`) and nothing into the run folder: the
run's behaviour never depends on the last evaluation.

``medad-fast predict`` reads the pixel threshold (:func:`read_operating_point`) to write
thresholded lesion masks when no ``--threshold`` is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_json

__all__ = ["OPERATING_POINT_NAME", "DEFAULT_SPECIFICITY", "CALIBRATE_HINT", "slice_threshold_at_specificity",
           "operating_point", "choose_operating_point", "write_operating_point", "read_operating_point", "check_calibration_split",
           "default_evaluation_dir"]

OPERATING_POINT_NAME = "operating_point.json"
DEFAULT_SPECIFICITY = 0.95
#: how a run gets an operating point (error messages)
CALIBRATE_HINT = ("calibrate the run on validation data (`medad-fast evaluate RUN --calibrate --data DIR`, "
                  "`--manifest FILE` or `--scans ...`)")


def check_calibration_split(split: str | None) -> None:
    """``ValueError`` when ``--calibrate`` is asked on the test or train split (None: volumes
    the user named with ``--scans``, allowed)."""
    if split == "test":
        raise ValueError("--calibrate on --split test: the operating point would be tuned on the data the metrics "
                         "report; calibrate on validation data (--split valid, the default with --calibrate)")
    if split == "train":
        raise ValueError("--calibrate on --split train: the model was trained on those slices; calibrate on "
                         "validation data (--split valid, the default with --calibrate)")


def default_evaluation_dir(checkpoint: str | Path, name: str) -> Path:
    """``<run folder>-<name>`` beside the checkpoint's folder (e.g. ``runs/exp1-eval-test``):
    the default ``--out`` of ``evaluate``, outside the run, which it leaves unchanged."""
    run = Path(checkpoint).resolve().parent
    return run.parent / f"{run.name}-{name}"


def slice_threshold_at_specificity(normal_scores, specificity: float = DEFAULT_SPECIFICITY) -> float:
    """The lowest ``t`` with ``mean(normal_scores <= t) >= specificity`` (flag ``score > t``):
    the ``ceil(specificity * n)``-th smallest of the ``n`` normal scores ([n], n >= 1)."""
    scores = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))
    if scores.size == 0:
        raise ValueError("no normal slice scores: the slice threshold at a specificity needs normal slices")
    if np.isnan(scores).any():
        raise ValueError("normal slice scores contain NaN")
    if not 0.0 < specificity <= 1.0:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    rank = max(1, math.ceil(specificity * scores.size - 1e-9))  # the 1e-9: 0.95 * 20 is 19.000000000000004
    return float(scores[rank - 1])


def operating_point(slice_labels, slice_scores, pixel_counts, split: str, source: str, on_evaluated_split: bool,
                    specificity: float = DEFAULT_SPECIFICITY) -> dict[str, Any]:
    """The operating point of one split: ``slice_labels`` [n] bool (True = lesion),
    ``slice_scores`` [n], ``pixel_counts`` the split's exact pixel counts
    (:meth:`medad_fast.metrics.PixelMetricsStream.counts`), or None for an image-level split
    (no lesion masks: the pixel threshold and Dice are None). Returns the JSON-ready dict with
    the thresholds, what they achieve on that split and where they come from."""
    from .metrics import best_dice_threshold_from_counts

    labels = np.asarray(slice_labels, dtype=bool).reshape(-1)
    scores = np.asarray(slice_scores, dtype=np.float64).reshape(-1)
    threshold = slice_threshold_at_specificity(scores[~labels], specificity)
    dice, pixel_threshold = (None, None) if pixel_counts is None else best_dice_threshold_from_counts(pixel_counts)
    flagged = scores > threshold
    return {
        "slice_threshold": threshold,
        "slice_rule": "a slice is abnormal when its score > slice_threshold",
        "target_specificity": specificity,
        "slice_specificity": float(np.mean(~flagged[~labels])),
        "slice_sensitivity": float(np.mean(flagged[labels])) if labels.any() else None,
        "pixel_threshold": pixel_threshold,
        "pixel_rule": "a pixel (voxel) is lesion when its anomaly map value >= pixel_threshold",
        "pixel_dice": dice,
        "split": split,
        "source": source,
        "on_evaluated_split": bool(on_evaluated_split),
        "n_slices": int(labels.size),
        "n_normal_slices": int((~labels).sum()),
    }


def choose_operating_point(slice_labels, slice_scores, pixel_counts: Callable[[str], Any] | None, split: str,
                           source: str, specificity: float = DEFAULT_SPECIFICITY) -> dict[str, Any]:
    """The operating point that ``evaluate --calibrate`` stores, chosen on the data it
    evaluated (slices of a BMAD split or liver slices of CT volumes: the evaluation driver
    calls this for both, so the choice is made here only). ``pixel_counts(purpose)``: the exact pixel counts
    (:meth:`medad_fast.metrics.PixelMetricsStream.counts`), or None for image-level data
    (no lesion masks: no pixel threshold). ``ValueError`` naming ``source`` when the data
    cannot give one (one class of slices only, no lesion pixel)."""
    try:
        counts = None if pixel_counts is None else pixel_counts("the operating point")
        return operating_point(slice_labels, slice_scores, counts, split, source, True, specificity)
    except ValueError as e:
        raise ValueError(f"--calibrate: no operating point from {source}: {e}") from None


def write_operating_point(run_dir: str | Path, point: dict[str, Any]) -> Path:
    """Write ``point`` as ``run_dir/operating_point.json`` (atomic). Returns the path."""
    return atomic_write_json(Path(run_dir) / OPERATING_POINT_NAME, point)


def read_operating_point(run_dir: str | Path) -> dict[str, Any] | None:
    """The stored operating point of a run folder, or None when it has none. ``ValueError``
    naming the file when it is unreadable or lacks a finite ``pixel_threshold`` (null: an
    image-level split's)."""
    path = Path(run_dir) / OPERATING_POINT_NAME
    if not path.is_file():
        return None
    try:
        point = json.loads(path.read_text())
        image_level = isinstance(point, dict) and "pixel_threshold" in point and point["pixel_threshold"] is None
        threshold = math.nan if image_level else float(point["pixel_threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a readable operating point ({type(e).__name__}: {e}); {CALIBRATE_HINT} "
                         "again, or pass --threshold") from None
    if image_level:
        raise ValueError(f"{path}: no pixel threshold (it was chosen on an image-level split, without lesion "
                         "masks); pass --threshold")
    if not math.isfinite(threshold):
        raise ValueError(f"{path}: pixel_threshold is {threshold}, not a finite number")
    return point
