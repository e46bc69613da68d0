"""Procedural liver-CT phantom: slice properties, determinism, dataset layout, CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from medad_fast.data import bmad, phantom
from medad_fast.cli import phantom as phantom_cli
from medad_fast.data.phantom import generate_slice, write_phantom_dataset
from medad_fast.io import read_mask, read_png_gray

SIZE = 96


# every test its own disk cache folder and an empty in-process cache (conftest)
pytestmark = pytest.mark.usefixtures("isolated_cache")


def _slices(n, abnormal, seed=0, size=SIZE, difficulty=1.0):
    return [phantom._render_slice(phantom.slice_rng(seed, "test", "Ungood" if abnormal else "good", i),
                                  size, abnormal, difficulty) for i in range(n)]


def test_same_generator_state_same_slice_and_seeds_differ():
    a = generate_slice(np.random.default_rng(7), SIZE, abnormal=True)
    b = generate_slice(np.random.default_rng(7), SIZE, abnormal=True)
    c = generate_slice(np.random.default_rng(8), SIZE, abnormal=True)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("abnormal", [False, True])
def test_background_zero_liver_positive_after_quantisation_masks_inside_liver(abnormal):
    for image, mask, info in _slices(25, abnormal):
        assert image.dtype == np.float32 and image.shape == (SIZE, SIZE)
        assert mask.dtype == np.bool_ and mask.shape == (SIZE, SIZE)
        liver = image > 0
        assert image.min() == 0.0 and image.max() <= 1.0
        assert image[liver].min() >= 1 / 255  # survives 8-bit quantisation as > 0
        assert (np.rint(image * 255)[liver] >= 1).all()
        assert not mask[~liver].any()  # lesion pixels are liver pixels
        assert mask.any() == abnormal  # non-empty exactly for abnormal slices
        assert 0.2 <= liver.mean() <= 0.55  # the liver covers roughly 25-50 % of the image
        # the liver is one blob that does not touch the image border
        assert not (liver[0].any() or liver[-1].any() or liver[:, 0].any() or liver[:, -1].any())
        assert info["liver_fraction"] == pytest.approx(liver.mean())


def test_parenchyma_intensity_and_texture():
    for image, _mask, info in _slices(10, False):
        liver = image[image > 0]
        assert 0.4 <= np.median(liver) <= 0.7
        assert 0.005 < liver.std() < 0.1  # textured, not flat, not wild


def test_lesions_vary_in_size_contrast_and_edge_and_contrast_is_real():
    slices = _slices(60, True, size=128)
    lesions = [lesion for _i, _m, info in slices for lesion in info["lesions"]]
    assert 60 <= len(lesions) <= 180  # 1-3 per slice
    radii = np.array([l["radius_px"] for l in lesions]) / 128
    contrasts = np.array([l["contrast"] for l in lesions])
    edges = np.array([l["edge_px"] / l["radius_px"] for l in lesions])
    assert radii.min() < 0.035 and radii.max() > 0.08  # 2-12 % of the side
    assert np.abs(contrasts).min() < 0.07 and np.abs(contrasts).max() > 0.2  # subtle to strong
    assert (np.abs(contrasts) >= 0.04 - 1e-9).all() and (np.abs(contrasts) <= 0.35 + 1e-9).all()
    assert 0.6 < (contrasts < 0).mean() < 0.9  # mostly hypodense, some hyperdense
    assert edges.min() < 0.05 and edges.max() > 0.25  # sharp to very blurred
    assert any(l["rim"] > 0 for l in lesions)

    # The drawn contrast is what the image shows: for single-lesion slices, the mean inside
    # the mask minus the mean of the surrounding liver ring follows the nominal contrast.
    nominal, measured = [], []
    for image, mask, info in slices:
        if len(info["lesions"]) == 1 and mask.sum() >= 12:
            ring = binary_dilation(mask, iterations=4) & ~binary_dilation(mask, iterations=1) & (image > 0)
            nominal.append(info["lesions"][0]["contrast"])
            measured.append(image[mask].mean() - image[ring].mean())
    assert len(nominal) >= 10
    assert np.corrcoef(nominal, measured)[0, 1] > 0.9
    assert np.all(np.sign(nominal) == np.sign(measured))


def test_difficulty_controls_how_subtle_lesions_get():
    def lowest_contrast(difficulty):
        infos = [phantom._render_slice(np.random.default_rng(i), 64, True, difficulty)[2] for i in range(80)]
        return min(abs(l["contrast"]) for info in infos for l in info["lesions"])

    easy, hard = lowest_contrast(0.5), lowest_contrast(4.0)
    assert easy >= 0.08 - 1e-9  # 0.04 / 0.5
    assert hard < 0.03  # can go down to 0.01
    with pytest.raises(ValueError, match="difficulty"):
        generate_slice(np.random.default_rng(0), 64, True, difficulty=0)
    with pytest.raises(ValueError, match="size"):
        generate_slice(np.random.default_rng(0), 8, True)
    with pytest.raises(TypeError, match="rng"):
        generate_slice(0, 64, True)


def test_vessels_make_dark_or_bright_structures_in_normal_slices():
    # Normal slices contain thin structures well away from the parenchyma level, in both
    # polarities across slices: a "dark blob" detector meets dark vessels in normals.
    signs = []
    for image, _mask, info in _slices(20, False):
        liver = image[image > 0]
        median = np.median(liver)
        signs.append(info["vessel_sign"])
        extreme = liver.max() - median if info["vessel_sign"] > 0 else median - liver.min()
        assert extreme > 0.06
    assert 1 in signs and -1 in signs


# --------------------------------------------------------------------------- dataset


def test_dataset_layout_manifest_and_bmad_round_trip(tmp_path):
    out = tmp_path / "phantom"
    counts = write_phantom_dataset(out, n_train=6, n_test=5, n_valid=2, size=64, seed=3, progress=False)
    assert counts == {"train": {"good": 6}, "valid": {"good": 1, "Ungood": 1}, "test": {"good": 2, "Ungood": 3}}
    assert len(list((out / "train" / "good").glob("*.png"))) == 6
    assert len(list((out / "test" / "good" / "img").glob("*.png"))) == 2
    images = sorted(p.name for p in (out / "test" / "Ungood" / "img").glob("*.png"))
    labels = sorted(p.name for p in (out / "test" / "Ungood" / "label").glob("*.png"))
    assert images == labels == ["00000.png", "00001.png", "00002.png"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"] == "medad_fast.phantom" and manifest["complete"] is True
    assert manifest["counts"] == counts and len(manifest["slices"]) == 13
    assert manifest["parameters"]["seed"] == 3

    test = bmad.load_split(out, "test", size=64)
    assert test.labels.tolist() == [False, False, True, True, True]
    for k in range(5):
        assert (test.masks[k] > 0).any() == test.labels[k]
        # masks inside the liver as loaded
        assert not (test.masks[k].bool() & (test.images[k] == 0)).any()
    # the PNGs hold exactly the generated slice, 8-bit quantised
    image, mask = generate_slice(phantom.slice_rng(3, "test", "Ungood", 1), 64, True)
    np.testing.assert_array_equal(read_png_gray(out / "test/Ungood/img/00001.png"), np.rint(image * 255))
    np.testing.assert_array_equal(read_mask(out / "test/Ungood/label/00001.png"), mask)
    np.testing.assert_array_equal(test.images[3, 0].numpy(), np.rint(image * 255))
    assert len(bmad.load_split(out, "train", size=32)) == 6
    assert len(bmad.load_split(out, "valid", size=32)) == 2


def test_slices_do_not_depend_on_the_counts_of_other_splits(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_phantom_dataset(a, n_train=2, n_test=4, size=48, seed=1, progress=False)
    write_phantom_dataset(b, n_train=5, n_test=8, n_valid=3, size=48, seed=1, progress=False)
    for rel in ("train/good/00001.png", "test/good/img/00001.png", "test/Ungood/img/00001.png",
                "test/Ungood/label/00001.png"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert not (a / "valid").exists()
    c = tmp_path / "c"
    write_phantom_dataset(c, n_train=2, n_test=4, size=48, seed=2, progress=False)
    assert (a / "train/good/00001.png").read_bytes() != (c / "train/good/00001.png").read_bytes()


def test_refuses_foreign_non_empty_folder_and_rewrites_its_own(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="foreign"):
        write_phantom_dataset(foreign, n_train=1, n_test=0, size=32, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["thesis.tex"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        write_phantom_dataset(tmp_path / "file", n_train=1, n_test=0, size=32, progress=False)

    own = tmp_path / "own"
    write_phantom_dataset(own, n_train=4, n_test=4, size=32, progress=False)
    write_phantom_dataset(own, n_train=2, n_test=2, size=32, progress=False)  # smaller: stale files removed
    assert sorted(p.name for p in (own / "train" / "good").iterdir()) == ["00000.png", "00001.png"]
    assert len(bmad.load_split(own, "test", size=32)) == 2
    assert not any(p.name.endswith(".tmp") for p in own.rglob("*"))


def test_argument_errors():
    for kwargs, name in (({"n_train": -1}, "n_train"), ({"size": 4}, "size"), ({"abnormal_fraction": 1.5},
                         "abnormal_fraction"), ({"difficulty": float("nan")}, "difficulty"),
                         ({"n_train": 0, "n_test": 0}, "nothing to write"), ({"seed": -3}, "seed")):
        with pytest.raises(ValueError, match=name):
            write_phantom_dataset("/nonexistent/never/written", progress=False, **kwargs)


def test_cli_writes_dataset_and_reports_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    phantom_cli.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args([str(out), "--train", "2", "--test", "2", "--size", "32", "--seed", "5",
                              "--difficulty", "1.5", "--no-progress"])
    assert phantom_cli.main(args) == 0
    assert "wrote phantom dataset" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["difficulty"] == 1.5 and manifest["parameters"]["size"] == 32
    bad = parser.parse_args([str(tmp_path / "x"), "--size", "4", "--no-progress"])
    assert phantom_cli.main(bad) == 2
    assert "size" in capsys.readouterr().err


def test_few_slices_mode_writes_few_normal_slices_and_small_faint_lesions(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    phantom_cli.add_arguments(parser)
    out = tmp_path / "few"
    assert phantom_cli.main(parser.parse_args([str(out), "--few-slices", "--test", "4", "--size", "64",
                                           "--no-progress"])) == 0
    parameters = json.loads((out / "manifest.json").read_text())["parameters"]
    assert (parameters["n_train"], parameters["lesion_scale"], parameters["difficulty"]) == (24, 0.5, 2.0)
    assert len(list((out / "train" / "good").glob("*.png"))) == 24
    # explicit options win over the mode's
    assert phantom_cli.main(parser.parse_args([str(tmp_path / "own"), "--few-slices", "--train", "3", "--test", "2",
                                           "--size", "32", "--lesion-scale", "0.8", "--no-progress"])) == 0
    parameters = json.loads((tmp_path / "own" / "manifest.json").read_text())["parameters"]
    assert (parameters["n_train"], parameters["lesion_scale"], parameters["difficulty"]) == (3, 0.8, 2.0)
    assert phantom_cli.main(parser.parse_args([str(tmp_path / "bad"), "--lesion-scale", "0", "--no-progress"])) == 2
    assert "--lesion-scale" in capsys.readouterr().err


def test_lesion_scale_shrinks_the_same_lesions():
    def radii(scale):
        rng = phantom.slice_rng(0, "test", "Ungood", 0)
        return [lesion["radius_px"] for lesion in phantom._render_slice(rng, 256, True, 1.0, scale)[2]["lesions"]]

    full, half = radii(1.0), radii(0.5)
    assert len(full) == len(half)
    assert all(h == pytest.approx(max(f / 2, 1.5), rel=1e-3) for f, h in zip(full, half))
