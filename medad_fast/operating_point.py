"""Operating points: the thresholds that turn scores into decisions, stored with the run.

``medad-fast evaluate`` computes two thresholds and writes them into the run folder (the
checkpoint's folder) as ``operating_point.json``:

- ``slice_threshold``: a slice is flagged abnormal when its score is ABOVE it (``score >
  slice_threshold``); it is the lowest threshold at which at least ``specificity`` (95 %) of
  the normal slices are not flagged: the ``ceil(specificity * n)``-th smallest normal slice
  score (:func:`slice_threshold_at_specificity`).
- ``pixel_threshold``: a pixel (voxel) is lesion when its map value is AT OR ABOVE it
  (``map >= pixel_threshold``); the threshold of the best Dice over the split's pixels
  (:func:`medad_fast.metrics.best_dice_threshold_from_counts`). None (JSON null) when the
  split is image-level (no lesion masks): ``medad-fast predict`` then needs ``--threshold``.

Both come from the validation split when the data has one with normal slices and lesions
(BMAD ``valid/``, or the ``valid`` patients of a ``prepare`` manifest), else from the split
that was evaluated; ``split`` and ``source`` in the file say which. Choosing thresholds on
the split that is then reported is optimistic: the file says so (``on_evaluated_split``).

``medad-fast predict`` reads the pixel threshold (:func:`read_operating_point`) to write
thresholded lesion masks when no ``--threshold`` is given.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .io import atomic_write_json

__all__ = ["OPERATING_POINT_NAME", "DEFAULT_SPECIFICITY", "slice_threshold_at_specificity", "operating_point",
           "write_operating_point", "read_operating_point"]

OPERATING_POINT_NAME = "operating_point.json"
DEFAULT_SPECIFICITY = 0.95


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
        raise ValueError(f"{path}: not a readable operating point ({type(e).__name__}: {e}); run `medad-fast "
                         "evaluate` again or pass --threshold") from None
    if image_level:
        raise ValueError(f"{path}: no pixel threshold (it was chosen on an image-level split, without lesion "
                         "masks); pass --threshold")
    if not math.isfinite(threshold):
        raise ValueError(f"{path}: pixel_threshold is {threshold}, not a finite number")
    return point
