"""The MedIAnomaly / DDAD-ASR layout (``<Dataset>/images/*`` + ``<Dataset>/data.json``):
listing, errors naming data.json, RGB to grayscale, the unlabeled pool, the cache, and
training and evaluating on it end to end. Every dataset here is made in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medad_fast.cli import main as cli
from medad_fast.data import bmad, medianomaly
from medad_fast.data.dataset import BmadSliceDataset
from medad_fast.data.layout import has_split, is_image_level, list_split

TINY_AE = ["--method", "ae", "--preset", "tiny", "--epochs", "1", "--device", "cpu", "--no-progress"]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_dataset(folder: Path, n_train: int = 8, n_unlabeled: tuple[int, int] = (2, 3),
                  n_test: tuple[int, int] = (3, 3), side: int = 32) -> dict:
    """A MedIAnomaly dataset of gray JPGs (names as BrainTumor's: ``Te-noTr_0000.jpg``);
    returns its data.json content."""
    rng = np.random.default_rng(0)
    groups = {"train": ("Te-noTr", n_train, False), "u0": ("Te-noU", n_unlabeled[0], False),
              "u1": ("Te-glU", n_unlabeled[1], True), "t0": ("Te-no", n_test[0], False),
              "t1": ("Te-gl", n_test[1], True)}
    names = {}
    for key, (prefix, count, lesion) in groups.items():
        names[key] = []
        for i in range(count):
            image = (40 + rng.random((side, side)) * 60).astype(np.uint8)
            if lesion:
                image[8:16, 8:16] = 250
            name = f"{prefix}_{i:04d}.png"
            _save(folder / "images" / name, image)
            names[key].append(name)
    content = {"train": {"0": names["train"], "unlabeled": {"0": names["u0"], "1": names["u1"]}},
               "test": {"0": names["t0"], "1": names["t1"]}}
    (folder / "data.json").write_text(json.dumps(content))
    return content


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    bmad.clear_memory_cache()
    yield tmp_path / "cache"
    bmad.clear_memory_cache()


def test_splits_in_the_order_of_the_file(tmp_path):
    dataset = tmp_path / "BrainTumor"
    content = write_dataset(dataset)
    train = list_split(dataset, "train")
    assert [(e.image, e.mask, e.abnormal) for e in train] == [
        (dataset / "images" / name, None, False) for name in content["train"]["0"]]
    test = list_split(dataset, "test")
    assert [e.image.name for e in test] == content["test"]["0"] + content["test"]["1"]
    assert [e.abnormal for e in test] == [False] * 3 + [True] * 3
    assert is_image_level(test)
    assert has_split(dataset, "train") and has_split(dataset, "test") and not has_split(dataset, "valid")
    assert medianomaly.splits(dataset) == ("train", "test")


def test_parent_folder_with_one_dataset_is_accepted(tmp_path):
    write_dataset(tmp_path / "root" / "BrainTumor")
    (tmp_path / "root" / "notes").mkdir()  # a folder without data.json does not count
    assert medianomaly.dataset_root(tmp_path / "root") == tmp_path / "root" / "BrainTumor"
    assert list_split(tmp_path / "root", "test") == list_split(tmp_path / "root" / "BrainTumor", "test")
    write_dataset(tmp_path / "root" / "LAG", n_train=1, n_unlabeled=(1, 1), n_test=(1, 1))
    with pytest.raises(ValueError, match=r"2 MedIAnomaly datasets \(BrainTumor, LAG\)"):
        list_split(tmp_path / "root", "train")
    # a BMAD folder is never taken for a parent of datasets
    (tmp_path / "bmad" / "train" / "good").mkdir(parents=True)
    write_dataset(tmp_path / "bmad" / "Other", n_train=1, n_unlabeled=(1, 1), n_test=(1, 1))
    assert medianomaly.dataset_root(tmp_path / "bmad") is None


def test_a_split_the_file_lacks_is_named(tmp_path):
    write_dataset(tmp_path / "Set")
    with pytest.raises(FileNotFoundError, match=r"Set[/\\]data\.json has no 'valid' split \(its splits: train, test\)"):
        list_split(tmp_path / "Set", "valid")
    with pytest.raises(ValueError, match="'training'"):
        list_split(tmp_path / "Set", "training")


def test_missing_files_are_all_named_in_one_error(tmp_path):
    dataset = tmp_path / "Set"
    content = write_dataset(dataset, n_test=(14, 3))
    gone = content["test"]["0"][:12] + content["test"]["1"][1:2]
    for name in gone:
        (dataset / "images" / name).unlink()
    with pytest.raises(FileNotFoundError) as caught:
        list_split(dataset, "test")
    message = str(caught.value)
    assert str(dataset / "data.json") in message and "13 of the 17 images of the test split" in message
    assert ", ".join(gone[:10]) + " and 3 more" in message
    assert list_split(dataset, "train")  # the train split's files are all there
    with pytest.raises(FileNotFoundError, match=r"data\.json.*the test split"):  # through the training loader too
        bmad.load_split(dataset, "test", size=16)


def test_malformed_files_are_named(tmp_path):
    dataset = tmp_path / "Set"
    content = write_dataset(dataset, n_train=2)
    (dataset / "data.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot read .*Set[/\\]data\.json"):
        list_split(dataset, "train")
    (dataset / "data.json").write_text(json.dumps({**content, "train": {"0": ["../escape.png"]}}))
    with pytest.raises(ValueError, match=r"data\.json: train\['0'\] holds '\.\./escape\.png'"):
        list_split(dataset, "train")
    (dataset / "data.json").write_text(json.dumps({**content, "train": {"0": content["train"]["0"], "1": ["x.png"]}}))
    with pytest.raises(ValueError, match=r"train\['1'\] lists abnormal training images"):
        list_split(dataset, "train")
    (dataset / "data.json").write_text(json.dumps({**content, "test": {"0": [], "1": []}}))
    with pytest.raises(FileNotFoundError, match="the test split lists no images"):
        list_split(dataset, "test")


def test_rgb_images_are_read_as_grayscale(tmp_path):
    dataset = tmp_path / "Set"
    write_dataset(dataset, n_train=2)
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (200, 100, 50)
    _save(dataset / "images" / "Te-noTr_0000.png", rgb)
    _save(dataset / "images" / "Te-noTr_0001.png", np.full((16, 16), 77, np.uint8))
    images = bmad.load_split(dataset, "train", size=16, cache=False).images
    # ITU-R 601-2 luma (PIL's convert("L"), the public loaders'): (200*299 + 100*587 + 50*114) / 1000 = 124.2
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.uint8
    assert (images[0] == 124).all() and (images[1] == 77).all()


def test_unlabeled_pool_without_labels(tmp_path):
    dataset = tmp_path / "Set"
    content = write_dataset(dataset, n_unlabeled=(4, 6))
    pool = medianomaly.unlabeled_files(tmp_path)  # the parent holding one dataset works too
    assert pool == [dataset / "images" / n for n in content["train"]["unlabeled"]["0"]
                    + content["train"]["unlabeled"]["1"]]
    assert all(isinstance(p, Path) for p in pool)
    # DDAD-ASR's composition: extra_data=5, ar=0.6 -> int(3.0) = 3 abnormal, 2 normal, the first of each
    composed = medianomaly.unlabeled_files(dataset, count=5, anomaly_rate=0.6)
    assert [p.name for p in composed] == (content["train"]["unlabeled"]["0"][:2]
                                          + content["train"]["unlabeled"]["1"][:3])
    with pytest.raises(ValueError, match="needs 1 normal and 7 abnormal.*has 4 and 6"):
        medianomaly.unlabeled_files(dataset, count=8, anomaly_rate=0.9)
    with pytest.raises(ValueError, match="together"):
        medianomaly.unlabeled_files(dataset, count=5)
    images = bmad.load_images(pool, size=16)
    assert images.shape == (10, 1, 16, 16) and images.dtype == torch.uint8
    (dataset / "images" / content["train"]["unlabeled"]["1"][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"data\.json: 1 of the 10 images of the unlabeled pool.*Te-glU_0000"):
        medianomaly.unlabeled_files(dataset)
    with pytest.raises(FileNotFoundError, match=r"no data\.json in"):
        medianomaly.unlabeled_files(tmp_path / "elsewhere")


def test_images_are_their_own_volume(tmp_path):
    dataset = tmp_path / "Set"
    content = write_dataset(dataset)
    test = BmadSliceDataset(dataset, "test", size=16)
    # "Te-no_0000" is not slice 0 of a volume "Te-no"
    assert test.volume_ids == [Path(n).stem for n in content["test"]["0"] + content["test"]["1"]]
    assert test.slice_indices == [-1] * 6
    loaded = bmad.load_split(dataset, "test", size=16)
    for i in range(len(test)):
        assert torch.equal(test[i].image, loaded.images[i]) and int(test[i].mask.sum()) == 0


def test_cache_follows_the_files_and_the_labels(tmp_path, isolated_cache):
    dataset = tmp_path / "Set"
    content = write_dataset(dataset, n_test=(2, 2))
    first = bmad.load_split(dataset, "test", size=16)
    assert len(list(isolated_cache.glob("bmad-*.pt"))) == 1
    bmad.clear_memory_cache()
    assert torch.equal(bmad.load_split(dataset, "test", size=16).images, first.images)  # from disk
    # a rewritten image is read again
    _save(dataset / "images" / content["test"]["0"][0], np.full((32, 32), 9, np.uint8))
    os.utime(dataset / "images" / content["test"]["0"][0], ns=(1, 1))
    assert (bmad.load_split(dataset, "test", size=16).images[0] == 9).all()
    # a label moved in data.json makes another entry, not the cached labels
    moved = {**content, "test": {"0": content["test"]["0"][:1], "1": content["test"]["0"][1:] + content["test"]["1"]}}
    (dataset / "data.json").write_text(json.dumps(moved))
    assert bmad.load_split(dataset, "test", size=16).labels.tolist() == [False, True, True, True]


def test_train_and_evaluate_read_the_data_json_layout(tmp_path, capsys):
    root = tmp_path / "data"
    write_dataset(root / "BrainTumor", n_train=8)
    run = tmp_path / "run"
    assert cli(["train", "--data", str(root / "BrainTumor"), "--out", str(run), *TINY_AE]) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 2  # train["0"] only: 8 images / batch 4
    capsys.readouterr()
    assert cli(["evaluate", str(run), "--data", str(root), "--no-progress", "--cases", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(6 images, 3 abnormal; image-level split)" in printed and "n/a (no masks)" in printed
    metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    assert metrics["n_images"] == 6 and metrics["pixel_auroc"] is None
    assert cli(["evaluate", str(run), "--data", str(root), "--split", "valid", "--no-progress"]) == 2
    assert "has no 'valid' split" in capsys.readouterr().err
