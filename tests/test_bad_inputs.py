"""Inputs that must not fool the package (issue 23): each is a named error (exit code 2 from
the CLI, the message naming the file or option and what was seen) or, with its flag, a named
warning; never silently scored, and the output folder is left exactly as it was.

- scans with NaN / infinite voxels, an all-NaN scan, a scan not in Hounsfield units (uint8);
- liver masks holding NaN, an empty liver mask given to ``evaluate`` beside a tumour label;
- output folders that cannot be written (predict, evaluate, export, train, phantom), and
  ``evaluate`` failing half-way on a new ``--out``;
- training slices without liver;
- the distance that the off-grid mask message reports;
- ``score_images`` on numpy arrays and on images of another size.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from ct_data import AIR, liver_phantom, tiny_checkpoint, write_nifti
from medad_fast.cli import main as cli
from medad_fast.data.scan import (NONFINITE_FILL_HU, NonFiniteVoxelsWarning, NotHounsfieldWarning, VolumeError,
                                  open_liver_mask, read_geometry)

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
SHAPE = (30, 28, 10)
LESION = (12, 12, 4)


def snapshot(folder: Path) -> dict[str, str] | None:
    """Every file under ``folder`` (hidden ones too) -> its SHA-256; None when it does not exist."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", image_size=32)


@pytest.fixture
def ct(tmp_path):
    """A scan (float32 NIfTI, HU), its liver mask, its tumour label and an --out holding one file."""
    hu, liver = liver_phantom(SHAPE, 2, LESION)
    folder = tmp_path / "in"
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    return {"hu": hu, "liver": liver, "dir": folder, "out": out,
            "scan": write_nifti(folder / "scan.nii.gz", hu, AFFINE, dtype=np.float32),
            "mask": write_nifti(folder / "liver.nii.gz", liver, AFFINE, dtype=np.uint8),
            "tumour": write_nifti(folder / "tumour.nii.gz", np.zeros(SHAPE, bool), AFFINE, dtype=np.uint8)}


def predict(checkpoint, scan, mask, out, *extra) -> int:
    return cli(["predict", str(checkpoint), str(scan), "--liver-mask", str(mask), "--out", str(out),
                "--no-progress", *extra])


def evaluate(checkpoint, scan, mask, tumour, out, *extra) -> int:
    return cli(["evaluate", str(checkpoint), "--scans", str(scan), "--masks", str(mask), "--labels", str(tumour),
                "--out", str(out), "--no-progress", "--lesion-thresholds", "4", *extra])


def refused(capsys, run, out: Path, *names: str) -> str:
    """``run()`` exits 2 naming every one of ``names`` on stderr, with ``out`` unchanged."""
    before = snapshot(out)
    assert run() == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)
    assert "Traceback" not in err
    assert snapshot(out) == before
    return err


# --------------------------------------------------------------------------- scan values


def test_nan_and_infinite_voxels_are_refused_with_their_count(checkpoint, ct, capsys):
    hu = ct["hu"].copy()
    hu[0, 0, 0] = hu[1, 0, 0] = np.nan  # outside the liver
    hu[15, 14, 5] = np.nan  # inside the liver
    hu[2, 0, 0], hu[3, 0, 0] = np.inf, -np.inf
    bad = write_nifti(ct["dir"] / "nan.nii.gz", hu, AFFINE, dtype=np.float32)
    err = refused(capsys, lambda: predict(checkpoint, bad, ct["mask"], ct["out"]), ct["out"], "nan.nii.gz",
                  f"5 of {hu.size} voxels are not finite numbers (3 NaN, 2 infinite), 1 of them inside the liver",
                  "--allow-nonfinite")
    # evaluate refuses it alike (the same check), and leaves no new --out behind
    refused(capsys, lambda: evaluate(checkpoint, bad, ct["mask"], ct["tumour"], ct["out"]), ct["out"], "nan.nii.gz",
            "5 of")
    assert evaluate(checkpoint, bad, ct["mask"], ct["tumour"], ct["dir"] / "new-eval") == 2
    assert "nan.nii.gz" in capsys.readouterr().err and not (ct["dir"] / "new-eval").exists()
    assert err.startswith("medad-fast predict: error:")


def test_allow_nonfinite_scores_them_as_air_with_a_named_warning(checkpoint, ct, tmp_path):
    hu = ct["hu"].copy()
    where = [(0, 0, 0), (15, 14, 5), (16, 14, 5)]
    for index, value in zip(where, (np.nan, np.inf, np.nan)):
        hu[index] = value
    bad = write_nifti(ct["dir"] / "nan.nii.gz", hu, AFFINE, dtype=np.float32)
    for index in where:
        hu[index] = NONFINITE_FILL_HU
    air = write_nifti(ct["dir"] / "air.nii.gz", hu, AFFINE, dtype=np.float32)
    with pytest.warns(NonFiniteVoxelsWarning, match=r"nan\.nii\.gz: 3 of .* \(2 NaN, 1 infinite\).*as air"):
        assert predict(checkpoint, bad, ct["mask"], tmp_path / "nan-out", "--allow-nonfinite") == 0
    assert predict(checkpoint, air, ct["mask"], tmp_path / "air-out") == 0
    scored = np.asarray(nib.load(str(tmp_path / "nan-out" / "nan_anomaly.nii.gz")).dataobj)
    expected = np.asarray(nib.load(str(tmp_path / "air-out" / "air_anomaly.nii.gz")).dataobj)
    assert np.array_equal(scored, expected)


def test_an_all_nan_scan_is_refused_even_with_the_flag(checkpoint, ct, capsys):
    bad = write_nifti(ct["dir"] / "allnan.nii.gz", np.full(SHAPE, np.nan, np.float32), AFFINE, dtype=np.float32)
    for extra in ((), ("--allow-nonfinite",)):
        refused(capsys, lambda: predict(checkpoint, bad, ct["mask"], ct["out"], *extra), ct["out"],
                "allnan.nii.gz", "no voxel is a finite number", "nothing to score")


def test_a_uint8_scan_is_not_taken_for_hounsfield_units(checkpoint, ct, capsys, tmp_path):
    # what an 8-bit export of the slices holds: the window [-200, 250] HU mapped onto 0..255
    grey = np.clip((ct["hu"] + 200.0) * (255.0 / 450.0), 0, 255).round()
    scan8 = write_nifti(ct["dir"] / "grey.nii.gz", grey, AFFINE, dtype=np.uint8)
    refused(capsys, lambda: predict(checkpoint, scan8, ct["mask"], ct["out"]), ct["out"], "grey.nii.gz",
            f"values run from 0 to {grey.max():g} (stored as uint8), none below -100",
            "does not look like HU", "--allow-non-hu")
    refused(capsys, lambda: evaluate(checkpoint, scan8, ct["mask"], ct["tumour"], ct["out"]), ct["out"],
            "grey.nii.gz", "stored as uint8")
    with pytest.warns(NotHounsfieldWarning, match=r"grey\.nii\.gz.*scored as it is"):
        assert predict(checkpoint, scan8, ct["mask"], tmp_path / "out8", "--allow-non-hu") == 0
    assert (tmp_path / "out8" / "grey_anomaly.nii.gz").is_file()


# --------------------------------------------------------------------------- liver masks


def test_a_nan_valued_liver_mask_is_refused(checkpoint, ct, capsys):
    values = np.where(ct["liver"], 1.0, np.nan).astype(np.float32)  # NaN != 0 would make all of it liver
    mask = write_nifti(ct["dir"] / "nanmask.nii.gz", values, AFFINE, dtype=np.float32)
    with pytest.raises(VolumeError, match=r"nanmask\.nii\.gz holds NaN or infinite values"):
        open_liver_mask(mask, read_geometry(ct["scan"])).read()
    refused(capsys, lambda: predict(checkpoint, ct["scan"], mask, ct["out"]), ct["out"], "nanmask.nii.gz",
            "NaN or infinite")
    refused(capsys, lambda: evaluate(checkpoint, ct["scan"], mask, ct["tumour"], ct["out"]), ct["out"],
            "nanmask.nii.gz", "NaN or infinite")


def test_evaluate_refuses_an_empty_liver_mask_as_predict_does(checkpoint, ct, capsys):
    empty = write_nifti(ct["dir"] / "empty.nii.gz", np.zeros(SHAPE, bool), AFFINE, dtype=np.uint8)
    # a tumour label that is not empty: the scored region (liver | tumour) would not be empty
    tumour = np.zeros(SHAPE, bool)
    tumour[11:14, 11:14, 3:6] = True
    label = write_nifti(ct["dir"] / "tumour1.nii.gz", tumour, AFFINE, dtype=np.uint8)
    message = "liver mask " + str(empty) + " of scan " + str(ct["scan"]) + " is empty"
    predicted = refused(capsys, lambda: predict(checkpoint, ct["scan"], empty, ct["out"]), ct["out"], message)
    evaluated = refused(capsys, lambda: evaluate(checkpoint, ct["scan"], empty, label, ct["out"]), ct["out"], message)
    assert predicted.split(": error: ")[1] == evaluated.split(": error: ")[1]  # one shared check, one message


# --------------------------------------------------------------------------- output folders


@pytest.fixture
def locked(tmp_path):
    """A folder holding one file, that this process cannot write into (read-only for a user;
    immutable for root, who ignores permissions)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "earlier.txt").write_text("kept")
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("root cannot make a folder unwritable here (chattr +i)")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_unwritable_output_is_a_named_error_before_any_work(checkpoint, ct, data, locked, capsys, monkeypatch):
    import medad_fast.predict
    import medad_fast.train

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(medad_fast.predict, "read_geometry", no_work)
    monkeypatch.setattr(medad_fast.train, "training_slices", no_work)
    lits = ct["dir"] / "lits"
    write_nifti(lits / "volume-1.nii.gz", ct["hu"], AFFINE)
    write_nifti(lits / "segmentation-1.nii.gz", ct["liver"], AFFINE, dtype=np.uint8)
    png = ct["dir"] / "slice.png"
    Image.fromarray(np.full((32, 32), 100, np.uint8)).save(png)
    for out in (locked, locked / "new"):
        runs = {
            "predict (volumes)": lambda: predict(checkpoint, ct["scan"], ct["mask"], out),
            "predict (images)": lambda: cli(["predict", str(checkpoint), str(png), "--out", str(out)]),
            "evaluate (volumes)": lambda: evaluate(checkpoint, ct["scan"], ct["mask"], ct["tumour"], out),
            "evaluate (slices)": lambda: cli(["evaluate", str(checkpoint), "--data", str(data), "--out", str(out),
                                              "--no-progress"]),
            "train": lambda: cli(["train", "--data", str(data), "--preset", "tiny", "--method", "ae", "--out",
                                  str(out), "--no-progress"]),
        }
        if out != locked:  # a folder holding other files is refused by phantom and prepare before (not theirs)
            runs["phantom"] = lambda: cli(["phantom", str(out), "--train", "1", "--test", "0", "--size", "32",
                                           "--no-progress"])
            runs["prepare"] = lambda: cli(["prepare", "lits", str(lits), str(out), "--no-progress"])
        for verb, run in runs.items():
            option = "OUT" if verb in ("phantom", "prepare") else "--out"
            err = refused(capsys, run, locked, f"{option} {out}", "cannot be written")
            assert f"medad-fast {verb.split()[0]}: error:" in err, (verb, err)
    refused(capsys, lambda: cli(["export", str(checkpoint), "--format", "pt2", "--out", str(locked / "m.pt2")]),
            locked, f"--out {locked / 'm.pt2'}: its folder {locked} cannot be written")


def test_evaluate_failing_half_way_leaves_no_new_output_folder(checkpoint, data, tmp_path, capsys):
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    image = sorted((broken / "test" / "good" / "img").glob("*.png"))[-1]
    image.write_bytes(image.read_bytes()[:40])  # truncated: found when its batch is read, after --out exists
    out = tmp_path / "new" / "eval"
    assert cli(["evaluate", str(checkpoint), "--data", str(broken), "--out", str(out), "--no-progress"]) == 2
    assert image.name in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------- training data


def write_slices(folder: Path, n_liver: int, n_black: int) -> Path:
    good = folder / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n_liver + n_black):
        image = np.zeros((32, 32), np.uint8)
        if i < n_liver:
            image[6:26, 8:24] = rng.integers(80, 160, size=(20, 16))
        Image.fromarray(image).save(good / f"slice_{i:04d}.png")
    return folder


def test_training_slices_without_liver_are_refused_or_skipped(tmp_path, capsys, monkeypatch):
    from medad_fast.methods import resolve_config
    from medad_fast.train import EmptySlicesSkippedWarning, load_training_images

    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    folder = write_slices(tmp_path / "data", n_liver=4, n_black=2)
    run = tmp_path / "run"
    assert cli(["train", "--data", str(folder), "--preset", "tiny", "--method", "ae", "--image-size", "32",
                "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 training slices" in err and "no liver" in err and "slice_0004.png" in err, err
    assert "--skip-empty-slices" in err and not run.exists()
    config = resolve_config("ae", "tiny", image_size=32, data=str(folder), skip_empty_slices=True)
    with pytest.warns(EmptySlicesSkippedWarning, match="2 of 6 training slices") as caught:
        images = load_training_images(config)
    assert len([w for w in caught if w.category is EmptySlicesSkippedWarning]) == 1
    assert images.shape == (4, 1, 32, 32) and bool((images.flatten(1).amax(1) > 0).all())
    black = write_slices(tmp_path / "black", n_liver=0, n_black=3)
    with pytest.raises(ValueError, match="3 of 3 training slices .* none is left to train on"):
        load_training_images(config.replace(data=str(black)))


# --------------------------------------------------------------------------- geometry


def test_off_grid_mask_message_reports_the_shift(tmp_path):
    hu, liver = liver_phantom(SHAPE, 2, LESION)
    write_nifti(tmp_path / "scan.nii.gz", hu, AFFINE)
    for shift, flip in ((10.0, False), (10.0, True), (3.5, False)):
        moved = AFFINE.copy()
        mask = liver
        if flip:  # the same grid stored in another voxel order, then shifted
            moved[0, 0] *= -1
            moved[0, 3] = AFFINE[0, 0] * (SHAPE[0] - 1)
            mask = liver[::-1]
        moved[:3, 3] += (0.0, shift, 0.0)
        write_nifti(tmp_path / "mask.nii.gz", mask, moved, dtype=np.uint8)
        with pytest.raises(VolumeError) as error:
            open_liver_mask(tmp_path / "mask.nii.gz", read_geometry(tmp_path / "scan.nii.gz"))
        assert f"is {shift:.2f} mm from the nearest corner voxel of the mask" in str(error.value), str(error.value)


# --------------------------------------------------------------------------- Python API


def test_score_images_takes_numpy_and_resizes_other_sizes(checkpoint):
    from medad_fast.inference import load_method, score_images

    method, _ = load_method(checkpoint, "cpu")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 32, 32)).astype(np.uint8)
    images[:, :4] = 0
    maps, scores = score_images(method, torch.from_numpy(images)[:, None])
    for given in (images, images[:, None], images.astype(np.float64) / 255.0):
        other_maps, other_scores = score_images(method, given)
        assert torch.equal(other_maps, maps) and torch.equal(other_scores, scores)
    # each pixel as a 2 x 2 block: area averaging back to 32 x 32 gives the images exactly
    big = images.repeat(2, axis=1).repeat(2, axis=2)
    big_maps, big_scores = score_images(method, big)
    assert big_maps.shape == (3, 64, 64) and torch.equal(big_scores, scores)
    from medad_fast.io import resize_images
    assert torch.allclose(big_maps, resize_images(maps[:, None], 64)[:, 0])
    with pytest.raises(ValueError, match=r"float images must hold values in \[0, 1\].*got 0 .. 255"):
        score_images(method, images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 .* or float in \\[0, 1\\]; got torch.int64"):
        score_images(method, images.astype(np.int64))
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\] or \[N, H, W\]; got \[32, 32\]"):
        score_images(method, images[0])
