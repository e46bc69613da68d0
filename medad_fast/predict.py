"""`medad-fast predict`: score image files with a checkpoint of any method and write heatmaps.

``medad-fast predict CKPT INPUT... --out DIR``: every INPUT is an image file or a folder
(its images, recursively). Each image is read as grayscale, resized to the model's side
(area averaging to shrink, bilinear to enlarge, as the BMAD loader does) and scored.

Writes into ``--out``::

    scores.csv    path,score (one row per image, in input order)
    scores.json   [{"path", "score", "heatmap"}...] plus the checkpoint and its preset
    heatmaps/     <index>-<stem>.png: the slice beside the slice with its anomaly map
                  (colour scale 0 .. the largest pixel value of the call, heatmap_scale)

Under torchrun every rank reads and scores its contiguous share of the images; rank 0
gathers them and writes every file.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch

from . import distributed
from .cli import int_at_least
from .config import Config
from .inference import load_method, resolve_checkpoint, score_dataset
from .data.dataset import ImageFileDataset
from .data.layout import collect_image_files
from .io import atomic_write_json, atomic_write_text
from .runtime import resolve_device
from .visualize import overlay_heatmap, save_rgb_png

__all__ = ["predict", "add_arguments", "main"]


def predict(checkpoint: str | Path, inputs: list[str | Path], out: str | Path,
            device: str | torch.device | None = None, batch_size: int = 16, progress: bool = True
            ) -> list[dict]:
    """Score the images of ``inputs`` with ``checkpoint``; write scores and heatmaps into
    ``out``. Returns ``[{"path", "score", "heatmap"}]`` in input order."""
    checkpoint = resolve_checkpoint(checkpoint)
    files = collect_image_files(inputs)
    world = distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    method, _ = load_method(checkpoint, world.device)
    dataset = ImageFileDataset(files, size=method.config.run.image_size)
    start, stop = distributed.shard_bounds(len(files))  # this rank's share, gathered back in order
    results = [(maps, scores) for _, maps, scores in
               score_dataset(method, dataset, batch_size, start, stop, progress and world.is_main, world.device)]
    size = method.config.run.image_size
    maps = torch.cat([m for m, _ in results]) if results else torch.empty(0, size, size)
    scores = torch.cat([s for _, s in results]) if results else torch.empty(0)
    maps, scores = distributed.all_gather_uneven(maps), distributed.all_gather_uneven(scores)
    rows = _write_predictions(Path(out), checkpoint, method.config, dataset, maps, scores) if world.is_main else None
    return distributed.broadcast_object(rows)


def _write_predictions(out: Path, checkpoint: Path, config: Config, dataset: ImageFileDataset,
                       maps: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    """Heatmaps, scores.csv and scores.json of the gathered predictions."""
    # one colour scale for all heatmaps of this call: 0 .. the largest pixel value
    heatmap_scale = float(maps.max()) if maps.numel() else 1.0
    rows = []
    files = [entry.image for entry in dataset.files]
    width = max(3, len(str(len(files))))
    for i, path in enumerate(files):
        # the index prefix keeps names unique when two inputs share a stem
        name = f"{i:0{width}d}-{path.stem}.png"
        overlay = overlay_heatmap(dataset[i].image[0].numpy(), maps[i].numpy(), vmax=heatmap_scale)
        save_rgb_png(out / "heatmaps" / name, overlay)
        rows.append({"path": str(path), "score": float(scores[i]), "heatmap": f"heatmaps/{name}"})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows([r["path"], f"{r['score']:.6f}"] for r in rows)
    atomic_write_text(out / "scores.csv", text.getvalue())
    atomic_write_json(out / "scores.json", {"checkpoint": str(checkpoint.resolve()), "method": config.run.method,
                                            "variant": config.variant, "preset": config.run.preset,
                                            "image_size": config.run.image_size,
                                            "heatmap_scale": heatmap_scale, "images": rows})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run directory")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        world = distributed.init_distributed(resolve_device(args.device))  # so that only rank 0 prints
        rows = predict(args.checkpoint, args.inputs, args.out, world.device, args.batch_size,
                       not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"medad-fast predict: error: {exc}", file=sys.stderr)
        return 2
    if not world.is_main:
        return 0
    for row in rows:
        print(f"{row['score']:.4f}  {row['path']}")
    print(f"wrote {Path(args.out) / 'scores.csv'}, {Path(args.out) / 'scores.json'} and "
          f"{len(rows)} heatmaps in {Path(args.out) / 'heatmaps'}/")
    return 0
