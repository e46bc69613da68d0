"""Atomic writers, image readers and resizing of medad_fast.io."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medad_fast import io as mio


def _leftover_temp_files(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# --------------------------------------------------------------------------- writers


def test_atomic_write_bytes_creates_parents_overwrites_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    mio.atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    mio.atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftover_temp_files(target.parent) == []


def test_atomic_write_uses_umask_permissions_not_0600(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    target = mio.atomic_write_text(tmp_path / "t.txt", "x")
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        mio.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert _leftover_temp_files(tmp_path) == []


def test_atomic_write_into_a_directory_path_is_refused(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        mio.atomic_write_bytes(tmp_path, b"x")


def test_atomic_write_json_indent_2_and_unserialisable_writes_nothing(tmp_path):
    target = tmp_path / "m.json"
    mio.atomic_write_json(target, {"a": [1, 2], "b": {"c": 1.5}})
    text = target.read_text()
    assert text == json.dumps({"a": [1, 2], "b": {"c": 1.5}}, indent=2) + "\n"
    with pytest.raises(TypeError, match="bad.json"):
        mio.atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    assert _leftover_temp_files(tmp_path) == []


# --------------------------------------------------------------------------- PNG


def test_save_png_uint8_float_and_bool(tmp_path):
    data = np.arange(256, dtype=np.uint8).reshape(16, 16)
    mio.save_png(tmp_path / "u8.png", data)
    with Image.open(tmp_path / "u8.png") as img:
        assert img.mode == "L"
        np.testing.assert_array_equal(np.asarray(img), data)

    floats = np.array([[0.0, 0.5, 1.0, 1.7], [-0.3, 1 / 255, 0.2 / 255, 0.6 / 255]], np.float32)
    mio.save_png(tmp_path / "f.png", floats)
    expected = np.array([[0, 128, 255, 255], [0, 1, 0, 1]], np.uint8)  # round(255 x), clipped
    np.testing.assert_array_equal(mio.read_png_gray(tmp_path / "f.png"), expected)

    mio.save_png(tmp_path / "b.png", np.array([[True, False]]))
    np.testing.assert_array_equal(mio.read_png_gray(tmp_path / "b.png"), [[255, 0]])


def test_save_png_rejects_bad_shapes_dtypes_and_nan(tmp_path):
    with pytest.raises(ValueError, match="rgb.png"):
        mio.save_png(tmp_path / "rgb.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="int.png"):
        mio.save_png(tmp_path / "int.png", np.zeros((4, 4), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        mio.save_png(tmp_path / "nan.png", np.full((2, 2), np.nan, np.float32))
    assert list(tmp_path.iterdir()) == []


def test_read_png_gray_16bit_rgb_and_keep_positive(tmp_path):
    values16 = np.array([[0, 100, 257 * 7, 65535]], np.uint16)
    Image.fromarray(values16).save(tmp_path / "i16.png")
    # 65535 -> 255, 257 k -> k, a tiny positive value stays positive (liver convention)
    np.testing.assert_array_equal(mio.read_png_gray(tmp_path / "i16.png"), [[0, 1, 7, 255]])
    np.testing.assert_allclose(mio.read_image_gray(tmp_path / "i16.png"), values16 / 65535.0, atol=1e-7)

    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 2] = (10, 200, 30)
    Image.fromarray(rgb, "RGB").save(tmp_path / "rgb.png")
    # ITU-R 601-2 luma: L = (299 R + 587 G + 114 B) / 1000
    got = mio.read_png_gray(tmp_path / "rgb.png")
    assert got[0, 0] == 76 and got[1, 2] == 124 and got[0, 1] == 0


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        mio.read_png_gray(tmp_path / "missing.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a png at all")
    with pytest.raises(ValueError, match="garbage.png"):
        mio.read_png_gray(tmp_path / "garbage.png")
    mio.save_png(tmp_path / "ok.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.png"):
        mio.read_image_gray(tmp_path / "truncated.png")
    with pytest.raises(ValueError, match="garbage.png"):
        mio.read_mask(tmp_path / "garbage.png")


def test_read_mask_any_nonzero_channel_counts(tmp_path):
    Image.fromarray(np.array([[0, 255, 1]], np.uint8)).save(tmp_path / "l.png")
    np.testing.assert_array_equal(mio.read_mask(tmp_path / "l.png"), [[False, True, True]])
    Image.fromarray(np.array([[0, 1]], np.uint16)).save(tmp_path / "i16.png")
    np.testing.assert_array_equal(mio.read_mask(tmp_path / "i16.png"), [[False, True]])
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., 3] = 255  # opaque everywhere: alpha must not count as lesion
    rgba[0, 1, 0] = 200  # pure red pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(mio.read_mask(tmp_path / "rgba.png"), [[False, True, False]])


# --------------------------------------------------------------------------- resizing


def test_resize_images_area_downscale_equals_block_means():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]])  # means of the 2x2 blocks
    torch.testing.assert_close(mio.resize_images(x, 2)[0, 0], expected)


def test_resize_images_bilinear_upscale_hand_values_and_identity():
    x = torch.tensor([[0.0, 1.0], [0.0, 1.0]]).reshape(1, 1, 2, 2)
    up = mio.resize_images(x, 4)[0, 0]
    # half-pixel centres: output x = 0.5*(i + 0.5) - 0.5 -> -0.25, 0.25, 0.75, 1.25 clamped
    torch.testing.assert_close(up, torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 4))
    assert mio.resize_images(x, 2) is x
    rect = mio.resize_images(torch.rand(2, 1, 8, 3), (5, 6))  # mixed shrink/enlarge
    assert rect.shape == (2, 1, 5, 6)
    with pytest.raises(ValueError, match="images"):
        mio.resize_images(torch.rand(4, 4), 2)
    with pytest.raises(ValueError, match="size"):
        mio.resize_images(torch.rand(1, 1, 4, 4), 0)


def test_resize_masks_nearest_keeps_dtype_and_values():
    m = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    m[0, 0, 1, 1] = 1
    m[0, 0, 3, 3] = 1
    small = mio.resize_masks(m, 2)
    assert small.dtype == torch.uint8
    # nearest-exact samples input pixels 1 and 3 of each axis
    torch.testing.assert_close(small[0, 0], torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8))
    big = mio.resize_masks(m.bool(), 8)
    assert big.dtype == torch.bool and int(big.sum()) == 8  # each pixel -> 2x2 block
