"""`medad-fast evaluate`: score a split with a trained model and write the evaluation.

Output folder (default ``<run>/eval-<split>``)::

    metrics.json                  image/pixel AUROC, AP, AUPRO@0.3, best Dice, counts (+ run facts)
    roc.png                       image-level and pixel-level ROC curves
    heatmaps/worst-*.png          abnormal slices with the lowest scores and normal slices
                                  with the highest (the model's worst cases)
    heatmaps/best-*.png           the opposite (its best cases)

Each heatmap PNG shows the slice and, beside it, the slice with the anomaly map blended in
(jet colour map from 0 to the split's largest pixel value, ``heatmap_scale`` in
metrics.json) and the ground-truth lesion outline in green.

Under torchrun (``torchrun --nproc_per_node N -m medad_fast.cli evaluate ...``) every rank
scores its contiguous share of the slices, the maps and scores are gathered in order, and
rank 0 alone computes the metrics and writes the files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import distributed, ops
from .cli import int_at_least
from .config import Config
from .io import atomic_write_bytes, atomic_write_json
from .models.model import FrequencyAwareModel, model_from_checkpoint
from .train import CHECKPOINT_NAME, autocast_context, resolve_device

__all__ = ["resolve_checkpoint", "score_images", "evaluate", "overlay_heatmap", "save_rgb_png", "add_arguments", "main"]


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    """A run directory -> its ``checkpoint.pt``; a file -> itself. FileNotFoundError naming
    the path otherwise."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (pass a run directory or a checkpoint file)")
    return path


@torch.no_grad()
def score_images(model: FrequencyAwareModel, images: torch.Tensor, device: torch.device,
                 batch_size: int = 16, progress: bool = False, amp: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel maps and image scores of ``images`` (uint8 or float in [0, 1], ``[N, 1, H, W]``).

    Returns ``(maps float32 [N, H, W], scores float32 [N])`` on the CPU."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape [N, 1, H, W]; got {list(images.shape)}")
    n = images.shape[0]
    maps = torch.empty(n, *images.shape[-2:], dtype=torch.float32)
    scores = torch.empty(n, dtype=torch.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="score", unit="batch", dynamic_ncols=True)
    channels_last = model.config.channels_last
    for start in starts:
        batch = images[start:start + batch_size].to(device)
        batch = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp and model.config.amp):
            batch_maps, batch_scores = model.predict(batch)
        maps[start:start + batch.shape[0]] = batch_maps.float().cpu()
        scores[start:start + batch.shape[0]] = batch_scores.float().cpu()
    return maps, scores


def _jet(values: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [0, 1] -> ``uint8 [H, W, 3]`` with matplotlib's jet colour map."""
    from matplotlib import colormaps
    return (colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask ``[H, W]`` (mask minus its 4-neighbour erosion)."""
    padded = np.pad(mask, 1)
    eroded = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
              & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~eroded


def overlay_heatmap(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray | None = None,
                    vmax: float = 1.0, opacity: float = 0.45, min_side: int = 256) -> np.ndarray:
    """Side-by-side ``uint8 [H', 2W', 3]``: the slice, and the slice blended with the jet
    heatmap of ``anomaly_map / vmax`` with the lesion outline of ``mask`` in green.

    ``image`` ``[H, W]`` float in [0, 1] or uint8. Small slices are enlarged by an integer
    factor (nearest neighbour, so pixels stay pixels) until the side is >= ``min_side``."""
    image = np.asarray(image)
    gray = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    gray_rgb = np.repeat((np.clip(gray, 0, 1) * 255).astype(np.uint8)[..., None], 3, axis=-1)
    scaled = np.asarray(anomaly_map, dtype=np.float32) / max(float(vmax), 1e-12)
    blended = ((1 - opacity) * gray_rgb + opacity * _jet(scaled)).astype(np.uint8)
    if mask is not None:
        blended[_outline(np.asarray(mask).astype(bool))] = (0, 255, 0)
    tile = np.concatenate([gray_rgb, blended], axis=1)
    factor = max(1, -(-min_side // max(1, min(gray.shape))))  # ceil(min_side / side)
    return tile.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else tile


def save_rgb_png(path: Path, rgb: np.ndarray) -> None:
    """Save ``uint8 [H, W, 3]`` as an RGB PNG, atomically (io.save_png is grayscale only)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _plot_roc(path: Path, image_labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray,
              maps: np.ndarray, metrics: dict[str, Any], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import roc_curve

    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    fpr, tpr = roc_curve(image_labels, image_scores)
    axis.plot(fpr, tpr, label=f"image (AUROC {metrics['image_auroc']:.3f})")
    fpr, tpr = roc_curve(masks.reshape(-1), maps.reshape(-1))
    axis.plot(fpr, tpr, label=f"pixel (AUROC {metrics['pixel_auroc']:.3f})")
    axis.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _write_cases(folder: Path, images: np.ndarray, masks: np.ndarray, maps: np.ndarray, labels: np.ndarray,
                 scores: np.ndarray, paths: list[str], n_cases: int, vmax: float) -> list[str]:
    """Heatmaps of the worst and best cases: per class, the ``n_cases`` slices ranked
    worst (abnormal: lowest score; normal: highest) and best (the opposite). All share
    one colour scale, ``[0, vmax]``."""
    written = []
    for kind in ("abnormal", "normal"):
        index = np.flatnonzero(labels if kind == "abnormal" else ~labels)
        if index.size == 0:
            continue
        ranked = index[np.argsort(scores[index], kind="stable")]  # ascending score
        if kind == "normal":
            ranked = ranked[::-1]  # for normal slices a high score is bad
        picks = {"worst": ranked[:n_cases], "best": ranked[::-1][:n_cases]}
        for quality, chosen in picks.items():
            for rank, i in enumerate(chosen, start=1):
                name = f"{quality}-{kind}-{rank:02d}-{Path(paths[i]).stem}-score{scores[i]:.3f}.png"
                save_rgb_png(folder / name, overlay_heatmap(images[i], maps[i], masks[i], vmax))
                written.append(name)
    return written


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", out: str | Path | None = None,
             device: str | torch.device | None = None, batch_size: int = 16, n_cases: int = 4,
             progress: bool = True, reference_ops: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint (or run directory) on a split of a BMAD-layout folder; write
    ``metrics.json``, ``roc.png`` and the heatmaps into ``out``. Returns the metrics."""
    from .data.bmad import load_split

    checkpoint = resolve_checkpoint(checkpoint)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    out = Path(out) if out is not None else checkpoint.parent / f"eval-{split}"
    world = distributed.init_distributed(device)  # a no-op without torchrun
    context = ops.use_reference() if reference_ops else contextlib.nullcontext()
    with context:
        model, config, state = model_from_checkpoint(checkpoint, device=world.device)
        slices = load_split(data, split, size=config.image_size)
        # each rank scores its share of the slices; gathered back in slice order
        start, stop = distributed.shard_bounds(slices.images.shape[0])
        maps, scores = score_images(model, slices.images[start:stop], world.device, batch_size,
                                    progress and world.is_main)
        maps, scores = distributed.all_gather_uneven(maps), distributed.all_gather_uneven(scores)
    metrics = None
    if world.is_main:
        metrics = _write_evaluation(out, checkpoint, data, split, config, state, slices, maps, scores, n_cases)
    return distributed.broadcast_object(metrics)


def _write_evaluation(out: Path, checkpoint: Path, data: str | Path, split: str, config: Config,
                      state: dict[str, Any], slices: Any, maps: torch.Tensor, scores: torch.Tensor,
                      n_cases: int) -> dict[str, Any]:
    """Metrics of the gathered maps and scores; metrics.json, roc.png, heatmaps."""
    from .metrics import compute_metrics

    labels = slices.labels.numpy().astype(bool)
    masks = slices.masks[:, 0].numpy().astype(bool)
    maps_np, scores_np = maps.numpy(), scores.numpy()
    metrics = compute_metrics(labels, scores_np, masks, maps_np)
    # the heatmaps share one colour scale: the largest pixel value of the split (the
    # L1 + focal loss keeps p well below 1, so a fixed [0, 1] scale would look washed out)
    heatmap_scale = float(maps_np.max()) if maps_np.size else 1.0
    metrics.update({"split": split, "data": str(Path(data).resolve()), "checkpoint": str(checkpoint.resolve()),
                    "epoch": int(state.get("epoch", 0)), "alpha": float(state.get("alpha", 0.0)),
                    "preset": config.preset, "mode": config.mode, "image_size": config.image_size,
                    "heatmap_scale": heatmap_scale})
    atomic_write_json(out / "metrics.json", metrics)
    _plot_roc(out / "roc.png", labels, scores_np, masks, maps_np, metrics,
              title=f"{config.preset} ({config.variant}), {split} split")
    _write_cases(out / "heatmaps", slices.images[:, 0].numpy(), masks, maps_np, labels, scores_np,
                 slices.paths, n_cases, heatmap_scale)
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
