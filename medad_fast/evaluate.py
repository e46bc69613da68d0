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
order, and rank 0 alone computes the metrics and writes the files. The loop is the one
evaluation driver that volumes run too (:mod:`medad_fast.evaluation`); this module is its
slice source (:class:`SliceSource`).

An output folder that cannot be written is reported before any work (exit code 2); one
that the call created is removed again when an error leaves it empty.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cpu_isa import isa_report
from .data.dataset import BmadSliceDataset
from .data.layout import is_image_level
from .evaluation import (EvaluationSource, ScoredBatch, evaluation_dir, resolve_evaluated, run_evaluation,
                         scorer_paths)
from .inference import score_dataset, scorer_facts
from .io import atomic_write_json, atomic_write_text
from .metrics import PixelMetricsStream, image_metrics, roc_curve, roc_curve_from_counts
from .visualize import plot_roc

__all__ = ["evaluate", "SliceSource"]


def evaluate(checkpoint: str | Path, data: str | Path, split: str | None = None, out: str | Path | None = None,
             device: str | torch.device | None = None, batch_size: int = 16, n_cases: int = 4,
             progress: bool = True, reference_ops: bool = False, compile: bool = False,
             calibrate: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory, or a ``.pt2`` / ``.onnx`` file of ``medad-fast
    export``, or a list of runs: their seed ensemble, :mod:`medad_fast.ensemble`, which never
    calibrates) of any method on a split of a BMAD-layout folder (None: ``valid`` with
    ``calibrate``, else ``test``); write ``metrics.json``, ``roc.png`` and the heatmaps into
    ``out`` (None: :func:`~medad_fast.evaluation.evaluation_dir`). ``calibrate``: also choose the operating
    point on this split and store it in the run folder (the file's folder;
    :mod:`medad_fast.operating_point`; ``ValueError`` on the test or train split); without it
    nothing is written into the run folder. Returns the metrics. ``compile``: compile the
    method's networks (:func:`~medad_fast.runtime.compile_networks`; an exported file is
    compiled already)."""
    split = split or ("valid" if calibrate else "test")
    checkpoint = resolve_evaluated(checkpoint, calibrate, split)
    out = Path(out) if out is not None else evaluation_dir(checkpoint, f"eval-{split}")

    def open_source(method) -> SliceSource:
        record = method.config.preprocessing  # as the run was trained; maps come back whole
        return SliceSource(BmadSliceDataset(data, split, size=record.image_size, crop=record.crop == "liver"),
                           data, split, method.config, batch_size)

    return run_evaluation(checkpoint, out, open_source, device=device, n_cases=n_cases, progress=progress,
                          reference_ops=reference_ops, compile=compile, calibrate=calibrate)


#: the metrics.json keys that need lesion masks: null for an image-level split
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "aupro_0.3", "best_dice", "n_pixels", "n_abnormal_pixels")


class SliceSource(EvaluationSource):
    """The slices of a split (:class:`~medad_fast.data.dataset.BmadSliceDataset`), scored with
    :func:`medad_fast.inference.score_dataset`; its units are the slices. ``config``: the
    method's (for the report)."""

    def __init__(self, dataset: BmadSliceDataset, data: str | Path, split: str, config: Any, batch_size: int) -> None:
        self.dataset, self.data, self.split, self.config, self.batch_size = dataset, data, split, config, batch_size
        self.labels = np.array([entry.abnormal for entry in dataset.files], dtype=bool)
        self.n_units = len(dataset)
        self.map_shape = (config.run.image_size, config.run.image_size)
        self.image_level = is_image_level(dataset.files)
        self.calibration_split = split
        self.calibration_source = f"the {split} split of {Path(data).resolve()}"
        self.point_facts = {"data": str(Path(data).resolve())}

    def score(self, method, start: int, stop: int, spill: Path, progress: bool, device) -> Any:
        for batch, maps, scores in score_dataset(method, self.dataset, self.batch_size, start, stop, progress, device):
            yield ScoredBatch(batch.masks[:, 0].bool().numpy(), maps.numpy(), self.labels[start:start + len(scores)],
                              scores.numpy())
            start += len(scores)

    def finish(self, out: Path, checkpoint: Path, state: dict[str, Any], stream: PixelMetricsStream,
               labels: np.ndarray, scores: np.ndarray, scoring_seconds: float, heatmap_scale: float,
               calibration: dict[str, Any]) -> dict[str, Any]:
        """Metrics of the scored split; metrics.json, scores.csv, roc.png."""
        config, dataset = self.config, self.dataset
        pixel_counts = None if self.image_level else stream.counts("AUROC")
        pixel = dict.fromkeys(PIXEL_KEYS) if pixel_counts is None else stream.metrics(pixel_counts)
        metrics = image_metrics(labels, scores) | pixel | {"image_level": pixel_counts is None}
        metrics.update({"split": self.split, "data": str(Path(self.data).resolve()),
                        "checkpoint": scorer_paths(checkpoint),
                        "method": config.run.method, "variant": config.variant, **scorer_facts(checkpoint, state),
                        **{k: float(v) for k, v in state.get("method_state", {}).items()
                           if isinstance(v, (int, float))},
                        "preset": config.run.preset, "image_size": config.run.image_size,
                        "crop": "liver" if dataset.crop else "none",
                        "heatmap_scale": heatmap_scale,
                        # rank 0's read-and-score loop (with torchrun: its shard and the gather)
                        "scoring_seconds": scoring_seconds,
                        "slices_per_s": len(scores) / scoring_seconds if scoring_seconds > 0 else float("nan"),
                        "cpu_isa": isa_report(),
                        **calibration, "preprocessing": config.preprocessing.to_dict()})
        atomic_write_json(out / "metrics.json", metrics)
        table = io.StringIO()
        writer = csv.writer(table, lineterminator="\n")
        writer.writerow(["path", "label", "score"])
        writer.writerows((path, int(label), f"{score:.9g}") for path, label, score in zip(dataset.paths, labels, scores))
        atomic_write_text(out / "scores.csv", table.getvalue())
        curves = [(f"image (AUROC {metrics['image_auroc']:.3f})", *roc_curve(labels, scores))]
        if pixel_counts is not None:
            curves.append((f"pixel (AUROC {metrics['pixel_auroc']:.3f})", *roc_curve_from_counts(pixel_counts)))
        plot_roc(out / "roc.png", curves, title=f"{config.variant}, {config.run.preset}, {self.split} split"
                 + (" (image-level: no masks)" if pixel_counts is None else ""))
        return metrics

    def heatmap_image(self, index: int) -> np.ndarray:
        return self.dataset[index].image[0].numpy()

    def heatmap_mask(self, index: int) -> np.ndarray | None:
        return None if self.image_level else self.dataset[index].mask[0].numpy()

    def heatmap_names(self) -> list[str]:
        return self.dataset.paths
