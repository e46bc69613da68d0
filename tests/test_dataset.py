"""Per-slice datasets and the streaming batch iterator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medad_fast.data import bmad, layout
from medad_fast.data.dataset import (BmadSliceDataset, ImageFileDataset, SliceBatch, SliceRecord, iter_batches,
                                     read_slice)
from medad_fast.data.phantom import write_phantom_dataset


# every test its own disk cache folder and an empty in-process cache (conftest)
pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A small phantom dataset: 4 train slices, 7 test slices (3 normal, 4 abnormal), 40 px."""
    out = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(out, n_train=4, n_test=7, size=40, seed=5, abnormal_fraction=0.5, progress=False)
    return out


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.mark.parametrize("split", ["train", "test"])
def test_records_equal_load_split_bitwise(phantom, split):
    whole = bmad.load_split(phantom, split, size=32, cache=False)  # 40 -> 32: area averaging, nearest masks
    dataset = BmadSliceDataset(phantom, split, size=32)
    assert len(dataset) == len(whole)
    for i in range(len(dataset)):
        record = dataset[i]
        assert isinstance(record, SliceRecord)
        assert record.image.dtype == torch.uint8 and record.image.shape == (1, 32, 32)
        assert record.mask.dtype == torch.uint8 and record.mask.shape == (1, 32, 32)
        assert torch.equal(record.image, whole.images[i]) and torch.equal(record.mask, whole.masks[i])
        assert record.label is bool(whole.labels[i]) and record.path == whole.paths[i]
        # phantom slices are not cut from volumes: each one is its own, position unknown
        assert record.volume_id == Path(record.path).stem and record.slice_index == -1
    if split == "test":
        assert whole.labels.any() and whole.masks.any()
    assert torch.equal(dataset[-1].image, whole.images[-1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_volume_and_slice_from_prepare_stems_and_from_the_manifest(tmp_path):
    image = np.full((16, 16), 90, np.uint8)
    _png(tmp_path / "test/good/img" / f"{layout.slice_stem('lits-3', 41)}.png", image)
    _png(tmp_path / "test/good/img/loose.png", image)
    _png(tmp_path / "test/Ungood/img" / "renamed.png", image)
    _png(tmp_path / "test/Ungood/label" / "renamed.png", (image > 0).astype(np.uint8) * 255)
    records = list(BmadSliceDataset(tmp_path, "test", size=16))  # a Dataset iterates to IndexError
    assert [(r.volume_id, r.slice_index) for r in records] == [("lits-3", 41), ("loose", -1), ("renamed", -1)]
    # the manifest prepare writes is the better source: it wins over the file name
    (tmp_path / layout.MANIFEST_NAME).write_text(json.dumps({"generator": "medad_fast.prepare", "slices": [
        {"image": "test/Ungood/img/renamed.png", "mask": "test/Ungood/label/renamed.png", "split": "test",
         "label": 1, "patient": "dicom-p7", "slice_index": 12, "source": "x"}]}))
    records = list(BmadSliceDataset(tmp_path, "test", size=16))
    assert [(r.volume_id, r.slice_index) for r in records] == [("lits-3", 41), ("loose", -1), ("dicom-p7", 12)]
    assert records[2].label and records[2].mask.all()


@pytest.mark.parametrize("start, stop, batch_size", [(1, 6, 2), (0, None, 3), (2, 5, 1), (0, 7, 7), (0, 7, 50)])
def test_batches_cover_the_range_in_order(phantom, start, stop, batch_size):
    whole = bmad.load_split(phantom, "test", size=32, cache=False)
    dataset = BmadSliceDataset(phantom, "test", size=32)
    end = len(dataset) if stop is None else stop
    batches = list(iter_batches(dataset, batch_size, start, stop))
    assert all(isinstance(b, SliceBatch) for b in batches)
    sizes = [len(b) for b in batches]
    assert sizes == [min(batch_size, end - first) for first in range(start, end, batch_size)]  # last one partial
    images = torch.cat([b.images for b in batches])
    masks = torch.cat([b.masks for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert images.shape == (end - start, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, whole.images[start:end]) and torch.equal(masks, whole.masks[start:end])
    assert labels.dtype == torch.bool and torch.equal(labels, whole.labels[start:end])
    assert [p for b in batches for p in b.paths] == whole.paths[start:end]
    assert [v for b in batches for v in b.volume_ids] == dataset.volume_ids[start:end]
    assert [k for b in batches for k in b.slice_indices] == dataset.slice_indices[start:end]


def test_empty_range_gives_no_batch(phantom):
    dataset = BmadSliceDataset(phantom, "test", size=32)
    assert list(iter_batches(dataset, 4, start=3, stop=3)) == []
    assert list(iter_batches(dataset, 4, start=len(dataset))) == []
    assert list(iter_batches(dataset, 4, start=2, stop=2, workers=2)) == []


def test_worker_processes_give_the_same_batches(phantom):
    dataset = BmadSliceDataset(phantom, "test", size=32)
    in_process = list(iter_batches(dataset, 3, start=1))
    with_workers = list(iter_batches(dataset, 3, start=1, workers=2))
    assert [len(b) for b in with_workers] == [3, 3]
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
        assert (a.paths, a.volume_ids, a.slice_indices) == (b.paths, b.volume_ids, b.slice_indices)


def test_iter_batches_argument_errors(phantom):
    dataset = BmadSliceDataset(phantom, "train", size=32)
    for kwargs, name in (({"batch_size": 0}, "batch_size"), ({"batch_size": 2, "start": -1}, "start"),
                         ({"batch_size": 2, "stop": 5}, "stop"), ({"batch_size": 2, "start": 3, "stop": 2}, "start"),
                         ({"batch_size": 2, "workers": -1}, "workers"), ({"batch_size": True}, "batch_size")):
        with pytest.raises(ValueError, match=name):
            iter_batches(dataset, **kwargs)  # raised at the call, not at the first batch


def load_images(files, size):
    """The loader `medad-fast predict` had before the dataset layer (read, resize, quantise)."""
    from medad_fast.io import quantize_uint8, read_image_gray, resize_images
    images = torch.empty(len(files), 1, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        resized = resize_images(torch.from_numpy(read_image_gray(path))[None, None], size)[0, 0].numpy()
        images[i, 0] = torch.from_numpy(quantize_uint8(resized, keep_positive=True))
    return images


def test_image_files_equal_predicts_former_loader(tmp_path):
    rng = np.random.default_rng(0)
    files = [
        _png(tmp_path / "a_gray.png", rng.integers(0, 256, (48, 40), dtype=np.uint8)),  # shrink, non-square
        _png(tmp_path / "b_rgb.png", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)),  # enlarge, colour
        _png(tmp_path / "c_16bit.png", rng.integers(0, 65536, (32, 32), dtype=np.uint16)),
        _png(tmp_path / "lits-1_0003.png", np.zeros((32, 32), np.uint8)),
    ]
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(tmp_path / "d.jpg")
    files.append(tmp_path / "d.jpg")
    dataset = ImageFileDataset(files, size=32)
    expected = load_images(files, 32)
    (batch,) = list(iter_batches(dataset, batch_size=len(files)))
    assert torch.equal(batch.images, expected)
    assert not batch.masks.any() and not batch.labels.any()
    assert batch.paths == [str(f) for f in files]
    assert batch.volume_ids == ["a_gray", "b_rgb", "c_16bit", "lits-1", "d"]
    assert batch.slice_indices == [-1, -1, -1, 3, -1]
    assert len(ImageFileDataset(str(files[0]), size=32)) == 1


def test_bad_inputs_name_the_path(tmp_path, phantom):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BmadSliceDataset(tmp_path / "nowhere", "test", size=32)
    with pytest.raises(ValueError, match="size"):
        BmadSliceDataset(phantom, "test", size=0)
    with pytest.raises(ValueError, match="split"):
        BmadSliceDataset(phantom, "training", size=32)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    dataset = ImageFileDataset([tmp_path / "missing.png", broken], size=16)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        dataset[0]
    with pytest.raises(ValueError, match="broken.png"):
        next(iter_batches(dataset, 2, start=1))

    image = _png(tmp_path / "x.png", np.full((16, 16), 50, np.uint8))
    mask = _png(tmp_path / "x_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"x_mask\.png.*x\.png"):
        read_slice(image, mask, 16)
