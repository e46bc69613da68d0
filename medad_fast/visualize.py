"""Pictures people look at rather than read: heatmap overlays of slices and ROC plots.

* :func:`overlay_heatmap`: the slice beside the slice with its anomaly map blended in (jet,
  one colour scale per call) and the ground-truth lesion outline in green;
* :func:`write_cases`: heatmaps of the worst and best cases of an evaluation;
* :func:`plot_roc`: ROC curves (one or several, e.g. image and pixel, or one per method);
* :func:`plot_froc`: lesion recall against false-positive components per scan (FROC-style);
* :func:`plot_review`: a montage of a volume's highest-scoring slices with their maps, one
  colour bar, a caption per tile (``medad-fast predict`` on CT volumes).

Every file is written atomically.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .io import atomic_write_bytes

__all__ = ["overlay_heatmap", "save_rgb_png", "plot_roc", "plot_froc", "plot_review", "write_cases"]


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


def _save_figure(figure, path: Path) -> None:
    """``figure`` as a PNG at ``path``, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def plot_roc(path: Path, curves: Sequence[tuple[str, np.ndarray, np.ndarray]], title: str) -> None:
    """ROC plot of ``curves``: ``(label, false positive rates, true positive rates)`` each,
    with the chance diagonal; a PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    for label, fpr, tpr in curves:
        axis.plot(fpr, tpr, label=label)
    axis.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01), title=title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_froc(path: Path, curves: Sequence[tuple[str, Sequence[float], Sequence[float]]], budgets: Sequence[float],
              title: str) -> None:
    """FROC-style plot of ``curves``: ``(label, mean false positives per scan, lesion recall)``
    each, one point per threshold. Drawn: the points (faint) and, as steps, the best recall
    reached within each false-positive count (what the recall at a budget reads off; recall is
    not monotone in the false positives, components merge as the threshold falls); dotted
    lines at the false-positive ``budgets``. A PNG written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5), dpi=100)
    x_max = 1.2 * max(budgets) if budgets else 1.0
    for label, fp, recall in curves:
        fp, recall = np.asarray(fp, dtype=np.float64), np.asarray(recall, dtype=np.float64)
        order = np.argsort(fp, kind="stable")
        best = np.maximum.accumulate(recall[order])
        (line,) = axis.step(fp[order], best, where="post", label=label)
        axis.scatter(fp, recall, s=6, alpha=0.35, color=line.get_color())
        x_max = max(x_max, min(float(fp.max(initial=0.0)) * 1.05, 3 * max(budgets, default=1.0)))
    for budget in budgets:
        axis.axvline(budget, color="gray", linestyle=":", linewidth=1)
    axis.set(xlabel="false-positive components per scan (mean)", ylabel="lesion recall", xlim=(0, x_max),
             ylim=(0, 1.02), title=title)
    axis.legend(loc="lower right")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_review(path: Path, tiles: Sequence[tuple[np.ndarray, np.ndarray, str]], vmax: float, title: str,
                columns: int = 2) -> None:
    """A montage PNG (written atomically) of ``tiles``: ``(image [H, W], anomaly map [H, W],
    caption)`` each, drawn by :func:`overlay_heatmap` (the slice beside the slice with its map)
    with the caption above it, in rows of ``columns``; one jet colour bar for ``[0, vmax]``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if not tiles:
        raise ValueError(f"no slices to show in {path}")
    vmax = float(vmax) if float(vmax) > 0 else 1.0
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    pictures = [overlay_heatmap(image, anomaly_map, vmax=vmax, min_side=1) for image, anomaly_map, _ in tiles]
    aspect = max(p.shape[1] / p.shape[0] for p in pictures)  # width / height of the widest tile
    tile_height = 3.0  # inches, at 120 dpi: a 512-pixel slice is shown at ~360 pixels
    figure, axes = plt.subplots(rows, columns, figsize=(columns * tile_height * aspect + 1.0,
                                                        rows * (tile_height + 0.3) + 0.4),
                                dpi=120, squeeze=False, layout="constrained")
    for axis in axes.flat:
        axis.axis("off")
    for axis, picture, (_, _, caption) in zip(axes.flat, pictures, tiles):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(caption, fontsize=9)
    figure.suptitle(title, fontsize=10)
    mappable = ScalarMappable(norm=Normalize(0.0, vmax), cmap=colormaps["jet"])
    figure.colorbar(mappable, ax=axes, fraction=0.04, pad=0.01, shrink=0.9, label="anomaly map")
    _save_figure(figure, path)


def write_cases(folder: Path, image_of: Callable[[int], np.ndarray], mask_of: Callable[[int], np.ndarray],
                map_of: Callable[[int], np.ndarray], labels: np.ndarray, scores: np.ndarray, paths: list[str],
                n_cases: int, vmax: float) -> list[str]:
    """Heatmaps of the worst and best cases: per class, the ``n_cases`` slices ranked
    worst (abnormal: lowest score; normal: highest) and best (the opposite). All share
    one colour scale, ``[0, vmax]``. ``image_of(i)``, ``mask_of(i)``, ``map_of(i)``: slice
    ``i``'s image, lesion mask and anomaly map as ``[H, W]`` (only the chosen slices are read)."""
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
                save_rgb_png(folder / name, overlay_heatmap(image_of(int(i)), map_of(int(i)), mask_of(int(i)), vmax))
                written.append(name)
    return written
