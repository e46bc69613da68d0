"""The BMAD layout module: writer paths, slice names, manifest origins, image collection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medad_fast.data import layout
from medad_fast.data.layout import (collect_image_files, list_split, parse_slice_stem, slice_folders, slice_origin,
                                    slice_paths, slice_relpaths, slice_stem)
from medad_fast.data.manifest import slice_origins


def _png(path: Path, value: int = 100, side: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((side, side), value, np.uint8)).save(path)
    return path


def test_writer_paths_follow_the_bmad_layout():
    assert slice_relpaths("train", False, "a") == ("train/good/a.png", None)
    assert slice_relpaths("valid", False, "a") == ("valid/good/img/a.png", None)
    assert slice_relpaths("test", True, "a") == ("test/Ungood/img/a.png", "test/Ungood/label/a.png")
    assert slice_paths("/data", "test", True, "a") == (Path("/data/test/Ungood/img/a.png"),
                                                       Path("/data/test/Ungood/label/a.png"))
    with pytest.raises(ValueError, match="normal slices only.*'a'"):
        slice_relpaths("train", True, "a")
    with pytest.raises(ValueError, match="'training'"):
        slice_relpaths("training", False, "a")
    # every folder a writer writes into is a slice folder
    written = {Path("/r", rel).parent for split in layout.SPLITS for abnormal in (False, True)
               if not (split == "train" and abnormal) for rel in slice_relpaths(split, abnormal, "x") if rel}
    assert written == set(slice_folders("/r"))


def test_written_layout_is_what_the_reader_lists(tmp_path):
    for split, abnormal, stem in (("train", False, "t"), ("test", False, "g"), ("test", True, "u")):
        image, mask = slice_paths(tmp_path, split, abnormal, stem)
        _png(image)
        if mask is not None:
            _png(mask, 255)
    assert list_split(tmp_path, "train") == [(tmp_path / "train/good/t.png", None, False)]
    assert list_split(tmp_path, "test") == [(tmp_path / "test/good/img/g.png", None, False),
                                           (tmp_path / "test/Ungood/img/u.png", tmp_path / "test/Ungood/label/u.png",
                                            True)]


def test_reader_takes_every_image_suffix(tmp_path):
    _png(tmp_path / "train/good/b.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train/good/a.JPG")
    (tmp_path / "train/good/notes.txt").write_text("x")
    (tmp_path / "train/good/.hidden.png").write_bytes(b"x")
    assert [e.image.name for e in list_split(tmp_path, "train")] == ["a.JPG", "b.png"]


def test_slice_stems_round_trip_and_other_names_are_not_volumes():
    assert slice_stem("lits-3", 42) == "lits-3_0042"
    assert parse_slice_stem("lits-3_0042") == ("lits-3", 42)
    assert parse_slice_stem(slice_stem("a_b", 12345)) == ("a_b", 12345)
    for name in ("00001", "img_1", "lits-3_", "_0001x"):
        assert parse_slice_stem(name) is None
    assert slice_origin("some/dir/dicom-p1_0007.png") == ("dicom-p1", 7)
    assert slice_origin("some/dir/00001.png") == ("00001", -1)
    with pytest.raises(ValueError, match="slice_index"):
        slice_stem("v", -1)
    with pytest.raises(ValueError, match="volume_id"):
        slice_stem("", 0)


def test_slice_origins_from_a_prepare_manifest(tmp_path):
    assert slice_origins(tmp_path) == {}
    (tmp_path / layout.MANIFEST_NAME).write_text(json.dumps({"slices": [
        {"image": "test/good/img/x.png", "mask": None, "patient": "lits-9", "slice_index": 3},
        {"image": "train/good/00000.png", "mask": None, "index": 0},  # phantom entry: no volume
    ]}))
    assert slice_origins(tmp_path) == {"test/good/img/x.png": ("lits-9", 3)}
    (tmp_path / layout.MANIFEST_NAME).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="manifest.json"):
        assert slice_origins(tmp_path) == {}


def _tree(root: Path) -> None:
    for rel in ("b.png", "a/z.jpg", "a-c.png", "a/y/x.tif", ".hidden/h.png", "a/.h.png", "C.BMP"):
        _png(root / rel)
    (root / "readme.txt").write_text("x")


def test_collect_image_files_order_suffixes_and_hidden(tmp_path):
    _tree(tmp_path / "in")
    lone = _png(tmp_path / "lone.png")
    other = tmp_path / "any.dat"
    other.write_bytes(b"x")  # a file named explicitly is taken as given
    files = collect_image_files([other, tmp_path / "in", str(lone)])
    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == ["any.dat", "in/C.BMP", "in/a/y/x.tif", "in/a/z.jpg", "in/a-c.png", "in/b.png", "lone.png"]
    assert collect_image_files(tmp_path / "in") == files[1:6]  # one path alone is fine too


def test_collect_image_files_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input not found: .*missing\.png"):
        collect_image_files([tmp_path / "missing.png"])
    empty = tmp_path / "only_text"
    empty.mkdir()
    (empty / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no images \(\.png.*\) in anomaly source folder .*only_text"):
        collect_image_files(empty, what="anomaly source")
