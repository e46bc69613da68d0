"""BMAD layout loader: the three layout variants, resizing, errors and caching."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from medad_fast.data import bmad, dataset


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own disk cache folder and an empty in-process cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(cache))
    bmad.clear_memory_cache()
    yield cache
    bmad.clear_memory_cache()


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _slice(value: int, side: int = 32) -> np.ndarray:
    """A 'liver' square of constant ``value`` on a 0 background, with a gradient so that
    mis-registrations show up."""
    image = np.zeros((side, side), np.uint8)
    q = side // 4
    image[q:3 * q, q:3 * q] = value + np.arange(2 * q, dtype=np.uint8)[None, :] % 5
    return image


def _lesion_mask(row: int, side: int = 32) -> np.ndarray:
    mask = np.zeros((side, side), np.uint8)
    mask[row:row + 4, 10:14] = 255
    return mask


def _make_layout(root, variant: str, n_train=3, n_good=2, n_ungood=3, side=32):
    """variant: "label" (img + label), "anomaly_mask" (img + anomaly_mask), "flat" (good/*.png)."""
    for i in range(n_train):
        _png(root / "train" / "good" / f"t{i:03d}.png", _slice(50 + i, side))
    for split in ("valid", "test"):
        for i in range(n_good):
            folder = root / split / "good" if variant == "flat" else root / split / "good" / "img"
            _png(folder / f"g{i:03d}.png", _slice(100 + i, side))
        mask_folder = "anomaly_mask" if variant == "anomaly_mask" else "label"
        for i in range(n_ungood):
            _png(root / split / "Ungood" / "img" / f"u{i:03d}.png", _slice(150 + i, side))
            _png(root / split / "Ungood" / mask_folder / f"u{i:03d}.png", _lesion_mask(8 + 2 * i, side))


@pytest.mark.parametrize("variant", ["label", "anomaly_mask", "flat"])
def test_three_layout_variants_load_with_counts_labels_and_aligned_masks(tmp_path, variant):
    root = tmp_path / "data"
    _make_layout(root, variant)
    train = bmad.load_split(root, "train", size=32)
    assert len(train) == 3
    assert train.images.shape == (3, 1, 32, 32) and train.images.dtype == torch.uint8
    assert train.masks.dtype == torch.uint8 and int(train.masks.sum()) == 0
    assert train.labels.dtype == torch.bool and not train.labels.any()

    for split in ("valid", "test"):
        s = bmad.load_split(root, split, size=32)
        assert len(s) == 5
        assert s.labels.tolist() == [False, False, True, True, True]  # normal first, then abnormal
        assert [os.path.basename(p) for p in s.paths] == ["g000.png", "g001.png", "u000.png", "u001.png", "u002.png"]
        # same size: images are exact, masks are 0/1 at the right place
        for k, value in enumerate([100, 101, 150, 151, 152]):
            np.testing.assert_array_equal(s.images[k, 0].numpy(), _slice(value))
        assert s.masks[:2].sum() == 0
        for k in range(3):
            np.testing.assert_array_equal(s.masks[2 + k, 0].numpy(), _lesion_mask(8 + 2 * k) // 255)
        assert set(torch.unique(s.masks).tolist()) <= {0, 1}


def test_downscale_uses_area_means_and_masks_nearest(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (64, 64), dtype=np.uint8)
    image[:, :16] = 0  # background stays exactly 0 after area averaging
    mask = np.zeros((64, 64), np.uint8)
    mask[20:28, 40:48] = 255  # aligned to 2x2 blocks: nearest gives exactly 10:14, 20:24
    _png(root / "test" / "Ungood" / "img" / "a.png", image)
    _png(root / "test" / "Ungood" / "label" / "a.png", mask)
    s = bmad.load_split(root, "test", size=32)
    block_means = image.astype(np.float64).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    got = s.images[0, 0].numpy()
    assert (got[:, :8] == 0).all()
    # the nearest integer to each block mean (either neighbour on exact .5 ties)
    assert np.abs(got[:, 8:] - block_means[:, 8:]).max() <= 0.5 + 1e-4
    expected_mask = np.zeros((32, 32), np.uint8)
    expected_mask[10:14, 20:24] = 1
    np.testing.assert_array_equal(s.masks[0, 0].numpy(), expected_mask)


def test_upscale_is_bilinear_and_keeps_constant_regions(tmp_path):
    root = tmp_path / "data"
    image = np.zeros((16, 16), np.uint8)
    image[:, 8:] = 200
    _png(root / "train" / "good" / "a.png", image)
    s = bmad.load_split(root, "train", size=32)
    row = s.images[0, 0, 5].numpy()
    assert (row[:14] == 0).all() and (row[18:] == 200).all()
    # the step is interpolated over the 2 px around the edge: 0 < values < 200, increasing
    assert 0 < row[15] < row[16] < 200 and np.all(np.diff(row.astype(int)) >= 0)


def test_16bit_and_rgb_images_are_converted_to_grayscale(tmp_path):
    root = tmp_path / "data"
    image16 = np.zeros((8, 8), np.uint16)
    image16[2:6, 2:6] = 257 * 120
    image16[2, 2] = 30  # tiny but positive: must stay liver (> 0)
    _png(root / "train" / "good" / "a16.png", image16)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:6, 2:6] = (90, 90, 90)
    _png(root / "train" / "good" / "b_rgb.png", rgb)
    s = bmad.load_split(root, "train", size=8)
    a, b = s.images[0, 0].numpy(), s.images[1, 0].numpy()
    assert a[3, 3] == 120 and a[2, 2] == 1 and a[0, 0] == 0
    assert b[3, 3] == 90 and b[0, 0] == 0


def test_missing_mask_names_the_image(tmp_path):
    root = tmp_path / "data"
    _make_layout(root, "label")
    (root / "test" / "Ungood" / "label" / "u001.png").unlink()
    with pytest.raises(FileNotFoundError, match="u001.png"):
        bmad.load_split(root, "test", size=32)


def test_missing_mask_folder_is_image_level_and_missing_img_folder(tmp_path):
    root = tmp_path / "data"
    _png(root / "test" / "Ungood" / "img" / "x.png", _slice(100))
    s = bmad.load_split(root, "test", size=32)  # no mask folder at all: an image-level split
    assert s.labels.tolist() == [True] and int(s.masks.sum()) == 0
    root2 = tmp_path / "data2"
    _png(root2 / "test" / "Ungood" / "x.png", _slice(100))  # no img/ sub-folder
    with pytest.raises(FileNotFoundError, match=r"Ungood[/\\]img"):
        bmad.load_split(root2, "test", size=32)


def test_unreadable_png_names_the_file(tmp_path):
    root = tmp_path / "data"
    _make_layout(root, "flat")
    (root / "valid" / "good" / "g001.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="g001.png"):
        bmad.load_split(root, "valid", size=32)


def test_mask_shape_mismatch_names_both_files(tmp_path):
    root = tmp_path / "data"
    _png(root / "test" / "Ungood" / "img" / "x.png", _slice(100, 32))
    _png(root / "test" / "Ungood" / "label" / "x.png", _lesion_mask(4, 16))
    with pytest.raises(ValueError, match=r"label[/\\]x.png.*img[/\\]x.png"):
        bmad.load_split(root, "test", size=32)


def test_missing_root_split_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        bmad.load_split(tmp_path / "nowhere", "train")
    root = tmp_path / "data"
    _make_layout(root, "label")
    shutil.rmtree(root / "valid")
    with pytest.raises(FileNotFoundError, match=r"split folder not found: .*valid"):
        bmad.load_split(root, "valid")
    with pytest.raises(ValueError, match="split"):
        bmad.load_split(root, "training")
    with pytest.raises(ValueError, match="size"):
        bmad.load_split(root, "train", size=0)
    shutil.rmtree(root / "train")
    (root / "train" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images \(\.png.*train"):
        bmad.load_split(root, "train")


# --------------------------------------------------------------------------- caching


def _listing(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_disk_cache_is_written_outside_the_data_and_reused(tmp_path, isolated_cache, monkeypatch):
    root = tmp_path / "data"
    _make_layout(root, "label")
    before = _listing(root)
    first = bmad.load_split(root, "test", size=16)
    assert _listing(root) == before  # nothing written into the data folder
    cache_files = list(isolated_cache.glob("bmad-*.pt"))
    assert len(cache_files) == 1

    # A fresh process (empty memory cache) must read the disk cache, not the PNGs.
    bmad.clear_memory_cache()

    def no_reading(*args, **kwargs):
        raise AssertionError("PNG read although the disk cache is valid")

    monkeypatch.setattr(dataset, "read_image_gray", no_reading)
    second = bmad.load_split(root, "test", size=16)
    for a, b in ((first.images, second.images), (first.masks, second.masks), (first.labels, second.labels)):
        assert torch.equal(a, b)
    assert first.paths == second.paths

    # A different size is a different entry.
    monkeypatch.undo()
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(isolated_cache))
    assert bmad.load_split(root, "test", size=8).images.shape[-1] == 8
    assert len(list(isolated_cache.glob("bmad-*.pt"))) == 2


def test_cache_invalidated_when_a_file_changes(tmp_path):
    root = tmp_path / "data"
    _make_layout(root, "label")
    first = bmad.load_split(root, "valid", size=32)
    path = root / "valid" / "good" / "img" / "g000.png"
    _png(path, _slice(7))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = bmad.load_split(root, "valid", size=32)
    assert not torch.equal(first.images[0], second.images[0])
    np.testing.assert_array_equal(second.images[0, 0].numpy(), _slice(7))
    # adding a file changes the key too
    _png(root / "valid" / "good" / "img" / "g999.png", _slice(9))
    assert len(bmad.load_split(root, "valid", size=32)) == len(first) + 1


def test_returned_tensors_are_copies_of_the_cache(tmp_path):
    root = tmp_path / "data"
    _make_layout(root, "label")
    first = bmad.load_split(root, "train", size=32)
    first.images.zero_()
    again = bmad.load_split(root, "train", size=32)
    assert again.images.sum() > 0


def test_cache_inside_data_folder_is_not_written(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _make_layout(root, "label")
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(root / ".cache"))
    with pytest.warns(RuntimeWarning, match="inside the data folder"):
        s = bmad.load_split(root, "train", size=32)
    assert len(s) == 3 and not (root / ".cache").exists()


def test_corrupt_cache_file_is_rebuilt(tmp_path, isolated_cache):
    root = tmp_path / "data"
    _make_layout(root, "label")
    reference = bmad.load_split(root, "test", size=32, cache=False)
    bmad.load_split(root, "test", size=32)
    (cache_file,) = isolated_cache.glob("bmad-*.pt")
    cache_file.write_bytes(b"garbage")
    bmad.clear_memory_cache()
    with pytest.warns(RuntimeWarning, match="unreadable cache"):
        rebuilt = bmad.load_split(root, "test", size=32)
    assert torch.equal(rebuilt.images, reference.images) and torch.equal(rebuilt.masks, reference.masks)
    assert torch.load(cache_file, weights_only=True)["images"].shape == reference.images.shape


def test_cache_false_writes_nothing(tmp_path, isolated_cache):
    root = tmp_path / "data"
    _make_layout(root, "label")
    bmad.load_split(root, "train", size=32, cache=False)
    assert not isolated_cache.exists()
