"""Image-level splits (abnormal images without lesion masks): read, evaluated and compared
with image metrics only, pixel metrics null / "n/a (no masks)"; a split with masks for some
abnormal images and not others is refused naming the first image without one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medad_fast.cli import main as cli
from medad_fast.compare import table
from medad_fast.data import bmad
from medad_fast.data.layout import has_split, is_image_level, list_split
from medad_fast.metrics import average_precision, roc_auc
from medad_fast.operating_point import read_operating_point

TINY_AE = ["--method", "ae", "--preset", "tiny", "--epochs", "1", "--device", "cpu", "--no-progress"]


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _image(seed: int, lesion: bool, side: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = (40 + rng.random((side, side)) * 60).astype(np.uint8)
    if lesion:
        image[8:16, 8:16] = 250
    return image


def write_image_level_bmad(root: Path, n_train: int = 8, n_good: int = 3, n_ungood: int = 3) -> Path:
    """BMAD folders without any mask folder: ``test/Ungood/img`` only."""
    for i in range(n_train):
        _png(root / "train" / "good" / f"t{i:03d}.png", _image(i, False))
    for i in range(n_good):
        _png(root / "test" / "good" / "img" / f"g{i:03d}.png", _image(100 + i, False))
    for i in range(n_ungood):
        _png(root / "test" / "Ungood" / "img" / f"u{i:03d}.png", _image(200 + i, True))
    return root


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    bmad.clear_memory_cache()
    yield
    bmad.clear_memory_cache()


@pytest.fixture(scope="module")
def image_level_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): an image-level BMAD folder and a 1-epoch tiny ``ae`` run on it."""
    root = write_image_level_bmad(tmp_path_factory.mktemp("image-level") / "data")
    run = tmp_path_factory.mktemp("runs") / "ae"
    with pytest.MonkeyPatch.context() as patch:  # its cache files in a folder of its own
        patch.setenv("MEDAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
        assert cli(["train", "--data", str(root), "--out", str(run), *TINY_AE]) == 0
    return root, run


def test_split_without_any_mask_is_image_level(tmp_path):
    root = write_image_level_bmad(tmp_path / "data")
    entries = list_split(root, "test")
    assert [(e.image.name, e.mask, e.abnormal) for e in entries] == [
        ("g000.png", None, False), ("g001.png", None, False), ("g002.png", None, False),
        ("u000.png", None, True), ("u001.png", None, True), ("u002.png", None, True)]
    assert is_image_level(entries)
    assert not is_image_level(list_split(root, "train"))  # no abnormal images: not image-level
    slices = bmad.load_split(root, "test", size=32)
    assert slices.labels.tolist() == [False] * 3 + [True] * 3 and int(slices.masks.sum()) == 0
    # an empty mask folder is no mask either
    (root / "test" / "Ungood" / "label").mkdir()
    assert is_image_level(list_split(root, "test"))


def test_split_with_masks_is_pixel_level(tmp_path):
    root = write_image_level_bmad(tmp_path / "data")
    for i in range(3):
        _png(root / "test" / "Ungood" / "label" / f"u{i:03d}.png", np.full((32, 32), 255, np.uint8))
    entries = list_split(root, "test")
    assert not is_image_level(entries)
    assert [e.mask.name for e in entries if e.abnormal] == ["u000.png", "u001.png", "u002.png"]


def test_mixed_split_is_refused_naming_the_first_image_without_a_mask(image_level_run, tmp_path, capsys):
    root = write_image_level_bmad(tmp_path / "data", n_ungood=4)
    for name in ("u000.png", "u002.png"):  # u001 and u003 have none
        _png(root / "test" / "Ungood" / "label" / name, np.full((32, 32), 255, np.uint8))
    with pytest.raises(FileNotFoundError, match=r"abnormal image \S*u001\.png.*2 of the 4 abnormal images have masks"):
        list_split(root, "test")
    with pytest.raises(FileNotFoundError, match=r"u001\.png"):
        bmad.load_split(root, "test", size=32)
    _, run = image_level_run
    assert cli(["evaluate", str(run), "--data", str(root), "--out", str(tmp_path / "eval"), "--no-progress"]) == 2
    assert "u001.png" in capsys.readouterr().err


def test_evaluate_reports_image_metrics_and_no_pixel_metrics(image_level_run, tmp_path, capsys):
    root, run = image_level_run
    out = tmp_path / "eval"
    assert cli(["evaluate", str(run), "--data", str(root), "--out", str(out), "--no-progress", "--cases", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(6 images, 3 abnormal; image-level split)" in printed
    assert "pixel AUROC, pixel AP, AUPRO@0.3, best Dice: n/a (no masks)" in printed
    assert "pixel threshold n/a (no masks)" in printed
    text = (out / "metrics.json").read_text()
    assert "NaN" not in text
    metrics = json.loads(text)
    assert metrics["image_level"] is True
    for key in ("pixel_auroc", "pixel_ap", "aupro_0.3", "best_dice", "n_pixels", "n_abnormal_pixels"):
        assert metrics[key] is None, key
    assert metrics["n_images"] == 6 and metrics["n_abnormal_images"] == 3
    # the image metrics are those of the written scores
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert metrics["image_auroc"] == pytest.approx(roc_auc(labels, scores))
    assert metrics["image_ap"] == pytest.approx(average_precision(labels, scores))
    assert (out / "roc.png").stat().st_size > 1000
    heatmaps = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 4 and any(n.startswith("worst-abnormal-01-u") for n in heatmaps)
    # the operating point has a slice threshold and no pixel threshold; predict is told why
    point = json.loads((run / "operating_point.json").read_text())
    assert point["pixel_threshold"] is None and point["pixel_dice"] is None
    assert point["slice_threshold"] == pytest.approx(np.sort(scores[:3])[2])  # ceil(0.95 * 3) = 3rd normal
    with pytest.raises(ValueError, match="image-level split.*--threshold"):
        read_operating_point(run)


def test_heatmaps_of_an_image_level_split_have_no_outline(image_level_run, tmp_path):
    root, run = image_level_run
    out = tmp_path / "eval"
    assert cli(["evaluate", str(run), "--data", str(root), "--out", str(out), "--no-progress", "--cases", "3"]) == 0
    for path in (out / "heatmaps").glob("*abnormal*.png"):
        overlay = np.asarray(Image.open(path))[:, 256:]
        assert not ((overlay == (0, 255, 0)).all(axis=-1)).any(), path.name  # no green lesion outline


def test_compare_table_says_n_a_for_pixel_metrics(image_level_run, tmp_path):
    root, _ = image_level_run
    out = tmp_path / "compare"
    assert has_split(root, "train") and not has_split(root, "valid")
    assert cli(["compare", "--data", str(root), "--methods", "ae", "--preset", "tiny", "--epochs", "1",
                "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    markdown = (out / "compare.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| ae |"))
    cells = [c.strip() for c in row.split("|")[3:9]]  # image AUROC .. best Dice
    assert cells[1] == cells[3] == cells[4] == cells[5] == "n/a"
    assert cells[0] != "n/a" and cells[2] != "n/a"
    assert "image-level (no lesion masks): pixel metrics n/a" in markdown
    saved = json.loads((out / "compare.json").read_text())["rows"]["ae"]
    assert saved["pixel_auroc"] is None and 0.0 <= saved["image_auroc"] <= 1.0


def test_table_formats_missing_pixel_metrics():
    row = {"image_auroc": 0.75, "pixel_auroc": None, "image_ap": 0.5, "pixel_ap": None, "aupro_0.3": None,
           "best_dice": None, "training_minutes": 1.5, "slices_per_s": 10.0}
    assert table({"ae": row}).splitlines()[2] == "| ae | `-` | 0.750 | n/a | 0.500 | n/a | n/a | n/a | 1.5 | 10 |"
