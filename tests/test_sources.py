"""Anomaly sources: image folders and the smooth-noise texture fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medad_fast.data.sources import load_anomaly_sources, perlin_texture_sources


def _folder_of_every_kind(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30), 100, np.uint8)).save(folder / "b_gray.png")  # non-square
    Image.fromarray(np.full((8, 8, 3), (255, 0, 0), np.uint8), "RGB").save(folder / "a_rgb.jpg", quality=100)
    Image.fromarray(np.full((10, 10), 257 * 40, np.uint16)).save(folder / "c_16bit.png")
    Image.fromarray(np.full((12, 12), 200, np.uint8)).save(folder / "d.bmp")
    Image.fromarray(np.full((12, 12), 10, np.uint8)).save(folder / "e.TIF")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"junk")  # hidden files are skipped
    sub = folder / "z_class"
    sub.mkdir()
    Image.fromarray(np.full((16, 16, 4), (0, 0, 255, 255), np.uint8), "RGBA").save(sub / "f.png")


def test_load_every_format_sorted_grayscale_resized(tmp_path):
    _folder_of_every_kind(tmp_path / "src")
    sources = load_anomaly_sources(tmp_path / "src", size=16)
    assert sources.shape == (6, 1, 16, 16) and sources.dtype == torch.float32
    # sorted by relative path: a_rgb, b_gray, c_16bit, d, e, z_class/f; constant images stay constant
    means = sources.mean(dim=(1, 2, 3))
    expected = torch.tensor([76 / 255, 100 / 255, 40 / 255, 200 / 255, 10 / 255, 29 / 255])  # red, blue: 601 luma
    torch.testing.assert_close(means, expected, atol=2 / 255, rtol=0)
    assert torch.allclose(sources.amin(dim=(1, 2, 3)), sources.amax(dim=(1, 2, 3)), atol=2 / 255)


def test_resize_area_down_and_bilinear_up(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker).save(folder / "checker.png")
    down = load_anomaly_sources(folder, size=16)
    torch.testing.assert_close(down, torch.full((1, 1, 16, 16), 0.5))  # area average of 2x2 blocks
    step = np.zeros((4, 4), np.uint8)
    step[:, 2:] = 255
    Image.fromarray(step).save(folder / "checker.png")
    up = load_anomaly_sources(folder, size=8)[0, 0, 0]
    torch.testing.assert_close(up, torch.tensor([0, 0, 0, 0.25, 0.75, 1, 1, 1]))


def test_max_images_keeps_the_first_in_order(tmp_path):
    _folder_of_every_kind(tmp_path / "src")
    full = load_anomaly_sources(tmp_path / "src", size=8)
    first_two = load_anomaly_sources(tmp_path / "src", size=8, max_images=2)
    assert torch.equal(first_two, full[:2])
    with pytest.raises(ValueError, match="max_images"):
        load_anomaly_sources(tmp_path / "src", size=8, max_images=0)
    with pytest.raises(ValueError, match="size"):
        load_anomaly_sources(tmp_path / "src", size=0)


def test_errors_name_the_folder_or_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        load_anomaly_sources(tmp_path / "missing_folder", size=8)
    empty = tmp_path / "only_text"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="only_text"):
        load_anomaly_sources(empty, size=8)
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(bad / "a.png")
    (bad / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_anomaly_sources(bad, size=8)


# --------------------------------------------------------------------------- texture fallback


def test_textures_shape_range_and_determinism():
    a = perlin_texture_sources(6, 40, torch.Generator().manual_seed(3))
    b = perlin_texture_sources(6, 40, torch.Generator().manual_seed(3))
    c = perlin_texture_sources(6, 40, torch.Generator().manual_seed(4))
    assert a.shape == (6, 1, 40, 40) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert perlin_texture_sources(0, 8, torch.Generator()).shape == (0, 1, 8, 8)


def test_textures_are_smooth_varied_textures_not_noise_or_constants():
    textures = perlin_texture_sources(32, 64, torch.Generator().manual_seed(0))
    flat = textures.flatten(1)
    spread = flat.amax(1) - flat.amin(1)
    # random contrast: every texture spans part of [0, 1], and the spans differ
    assert (spread > 0.15).all() and spread.std() > 0.03
    # smooth: a neighbouring pixel differs far less than the texture's own range
    # (white noise would give mean |dx| ~ spread / 3)
    dx = (textures[..., 1:] - textures[..., :-1]).abs().mean(dim=(1, 2, 3))
    assert (dx < 0.12 * spread).all()
    # different textures, not one texture repeated
    corr = torch.corrcoef(flat - flat.mean(1, keepdim=True))
    off_diagonal = corr[~torch.eye(32, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.9


def test_texture_argument_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="n must"):
        perlin_texture_sources(-1, 8, g)
    with pytest.raises(ValueError, match="size"):
        perlin_texture_sources(2, 0, g)
    with pytest.raises(TypeError, match="generator"):
        perlin_texture_sources(2, 8, 123)
