"""`medad-fast evaluate`: score a split with a trained method and write the evaluation.

Output folder (default ``<run>/eval-<split>``)::

    metrics.json                  image/pixel AUROC, AP, AUPRO@0.3, best Dice, counts, scoring
                                  speed (slices/s of the read-and-score loop) and run facts
    scores.csv                    every slice's path, label (1 = lesion) and image score
    roc.png                       image-level and pixel-level ROC curves
    heatmaps/worst-*.png          abnormal slices with the lowest scores and normal slices
                                  with the highest (the method's worst cases)
    heatmaps/best-*.png           the opposite (its best cases)

Each heatmap PNG shows the slice and, beside it, the slice with the anomaly map blended in
(jet colour map from 0 to the split's largest pixel value, ``heatmap_scale`` in
metrics.json) and the ground-truth lesion outline in green.

Slices are read and scored one batch at a time; the exact pixel metrics keep only the
lesion pixels' scores in memory and spill every map to a temporary file in the output folder
(4 bytes per pixel, deleted at the end; :class:`medad_fast.metrics.PixelMetricsStream`), so
a split of any size fits in memory. Under torchrun (``torchrun --nproc_per_node N -m medad_fast.cli evaluate ...``)
every rank scores its contiguous share of the slices, the maps and scores are gathered in
order, and rank 0 alone computes the metrics and writes the files.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed
from .cli import int_at_least
from .data.dataset import BmadSliceDataset
from .inference import load_method, resolve_checkpoint, score_dataset
from .io import atomic_write_json, atomic_write_text
from .metrics import PixelMetricsStream, image_metrics, roc_curve, roc_curve_from_counts
from .runtime import ops_mode, resolve_device
from .visualize import plot_roc, write_cases

__all__ = ["evaluate", "add_arguments", "main"]


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             device: str | torch.device | None = None, batch_size: int = 16, n_cases: int = 4,
             progress: bool = True, reference_ops: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory) of any method on a split of a BMAD-layout
    folder; write ``metrics.json``, ``roc.png`` and the heatmaps into ``out``. Returns the metrics."""
    checkpoint = resolve_checkpoint(checkpoint)
    out = Path(out) if out is not None else checkpoint.parent / f"eval-{split}"
    world = distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    metrics = None
    with ops_mode(reference_ops), contextlib.ExitStack() as cleanup:
        method, state = load_method(checkpoint, world.device)
        dataset = BmadSliceDataset(data, split, size=method.config.run.image_size)
        stream = None
        if world.is_main:
            # the maps go to a spill file beside the outputs, not into memory (deleted at the end)
            out.mkdir(parents=True, exist_ok=True)
            spill = cleanup.enter_context(tempfile.TemporaryDirectory(prefix=".pixel-maps-", dir=out))
            stream = cleanup.enter_context(PixelMetricsStream(spill))
        # each rank scores its share of the slices, one batch in memory at a time; with
        # several processes the shares are gathered to rank 0 in slice order
        start, stop = distributed.shard_bounds(len(dataset))
        scores, shard = [], []
        started = time.perf_counter()
        for batch, batch_maps, batch_scores in score_dataset(method, dataset, batch_size, start, stop,
                                                             progress and world.is_main, world.device):
            scores.append(batch_scores)
            if world.is_distributed:
                shard.append((batch.masks[:, 0].bool(), batch_maps))
            else:
                stream.add(batch.masks[:, 0].numpy(), batch_maps.numpy())
        scoring_seconds = time.perf_counter() - started
        scores = distributed.all_gather_uneven(torch.cat(scores) if scores else torch.empty(0))
        if world.is_distributed:
            size = method.config.run.image_size
            masks = distributed.all_gather_uneven(torch.cat([m for m, _ in shard]) if shard
                                                  else torch.empty(0, size, size, dtype=torch.bool))
            maps = distributed.all_gather_uneven(torch.cat([m for _, m in shard]) if shard
                                                 else torch.empty(0, size, size))
            if world.is_main:
                stream.add(masks.numpy(), maps.numpy())
        if world.is_main:
            metrics = _write_evaluation(out, checkpoint, data, split, method.config, state, dataset, stream,
                                        scores.numpy(), n_cases, scoring_seconds)
    return distributed.broadcast_object(metrics)


def _write_evaluation(out: Path, checkpoint: Path, data: str | Path, split: str, config: Any,
                      state: dict[str, Any], dataset: BmadSliceDataset, stream: PixelMetricsStream,
                      scores: np.ndarray, n_cases: int, scoring_seconds: float) -> dict[str, Any]:
    """Metrics of the scored split; metrics.json, scores.csv, roc.png, heatmaps."""
    labels = np.array([entry.abnormal for entry in dataset.files], dtype=bool)
    pixel_counts = stream.counts("AUROC")
    metrics = image_metrics(labels, scores) | stream.metrics(pixel_counts)
    # the heatmaps share one colour scale: the largest pixel value of the split (the
    # L1 + focal loss keeps p well below 1, so a fixed [0, 1] scale would look washed out)
    heatmap_scale = stream.max if stream.n_slices else 1.0
    metrics.update({"split": split, "data": str(Path(data).resolve()), "checkpoint": str(checkpoint.resolve()),
                    "method": config.run.method, "variant": config.variant, "epoch": int(state.get("epoch", 0)),
                    **{k: float(v) for k, v in state.get("method_state", {}).items() if isinstance(v, (int, float))},
                    "preset": config.run.preset, "image_size": config.run.image_size,
                    "heatmap_scale": heatmap_scale,
                    # rank 0's read-and-score loop (with torchrun: its shard and the gather)
                    "scoring_seconds": scoring_seconds,
                    "slices_per_s": len(scores) / scoring_seconds if scoring_seconds > 0 else float("nan")})
    atomic_write_json(out / "metrics.json", metrics)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["path", "label", "score"])
    writer.writerows((path, int(label), f"{score:.9g}") for path, label, score in zip(dataset.paths, labels, scores))
    atomic_write_text(out / "scores.csv", table.getvalue())
    curves = [(f"image (AUROC {metrics['image_auroc']:.3f})", *roc_curve(labels, scores)),
              (f"pixel (AUROC {metrics['pixel_auroc']:.3f})", *roc_curve_from_counts(pixel_counts))]
    plot_roc(out / "roc.png", curves, title=f"{config.variant}, {config.run.preset}, {split} split")
    write_cases(out / "heatmaps", lambda i: dataset[i].image[0].numpy(), lambda i: dataset[i].mask[0].numpy(),
                stream.map, labels, scores, dataset.paths, n_cases, heatmap_scale)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_or_checkpoint", metavar="RUN_OR_CKPT", help="run directory or checkpoint file")
    parser.add_argument("--data", required=True, metavar="DIR", help="BMAD-layout folder")
    parser.add_argument("--split", default="test", choices=("test", "valid", "train"), help="default test")
    parser.add_argument("--out", metavar="DIR", help="output folder (default <run>/eval-<split>)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--cases", type=int_at_least(0), default=4, metavar="K",
                        help="heatmaps of the K worst and K best slices per class (default 4)")
    parser.add_argument("--reference-ops", action="store_true", help="use the pure-PyTorch reference ops")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        world = distributed.init_distributed(resolve_device(args.device))  # so that only rank 0 prints
        metrics = evaluate(args.run_or_checkpoint, args.data, args.split, args.out, world.device,
                           args.batch_size, args.cases, not args.no_progress, args.reference_ops)
    except (ValueError, FileNotFoundError) as exc:
        print(f"medad-fast evaluate: error: {exc}", file=sys.stderr)
        return 2
    if not world.is_main:
        return 0
    out = Path(args.out) if args.out else resolve_checkpoint(args.run_or_checkpoint).parent / f"eval-{args.split}"
    print(f"image AUROC {metrics['image_auroc']:.4f}  pixel AUROC {metrics['pixel_auroc']:.4f}  "
          f"(image AP {metrics['image_ap']:.4f}, pixel AP {metrics['pixel_ap']:.4f}, "
          f"AUPRO@0.3 {metrics['aupro_0.3']:.4f}, best Dice {metrics['best_dice']:.4f}; "
          f"{metrics['n_images']} slices)")
    print(f"wrote {out / 'metrics.json'}, {out / 'roc.png'}, {out / 'heatmaps'}/")
    return 0
