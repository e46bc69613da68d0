"""`medad-fast predict` on CT volumes: maps on the scan's grid, slice tables, review montages,
scores.json; clear errors and nothing half-written in --out.

The method is the tiny ``ae`` with its anomaly map replaced by the image itself
(:func:`ct_data.identity_maps`): the brightest pixel of every slice is then the lesion's, so
where the lesion lands in the output map tests the whole geometry path (reading, display
orientation, resizing to the model's side and back, writing)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from ct_data import (AIR, DicomGrid, identity_maps, liver_phantom, rotation, tiny_checkpoint, write_dicom_series,
                     write_nifti)
from medad_fast.cli import main as cli
from medad_fast.data.scan import open_liver_mask, read_volume
from medad_fast.data.volumes import read_nifti_case, render_slices
from medad_fast.volume_inference import display_images, liver_slice_indices


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", image_size=32)


def predict(checkpoint, scans, masks, out, *extra) -> int:
    masks = ["--liver-mask", *map(str, masks)] if masks else []
    return cli(["predict", str(checkpoint), *map(str, scans), *masks, "--out", str(out), "--no-progress",
                "--batch-size", "3", *extra])


def oblique_affine(axes, signs, spacing, angles, origin=(40.0, -25.0, 310.0)) -> np.ndarray:
    """Voxel axis i along world axis ``axes[i]`` (direction ``signs[i]``, ``spacing[i]`` mm),
    then rotated by ``angles`` (radians about x, y, z)."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, (w, s, d) in enumerate(zip(axes, signs, spacing)):
        affine[w, i] = s * d
    affine[:3, :3] = rotation(*angles) @ affine[:3, :3]
    affine[:3, 3] = origin
    return affine


def check_map(out: Path, name: str, reference: nib.Nifti1Image, lesion, liver: np.ndarray) -> np.ndarray:
    """The map has the reference's grid and header codes, is 0 outside the liver, peaks at the lesion."""
    image = nib.load(str(out / f"{name}_anomaly.nii.gz"))
    data = np.asarray(image.dataobj)
    assert data.dtype == np.float32 and data.shape == reference.shape
    assert np.allclose(image.affine, reference.affine, atol=1e-5)
    for code in ("qform_code", "sform_code"):
        assert int(image.header[code]) == int(reference.header[code])
    assert (data[~liver] == 0).all() and data[liver].min() > 0
    peak = np.unravel_index(np.argmax(data), data.shape)
    assert np.abs(np.array(peak) - np.array(lesion)).max() <= 1, (peak, lesion)
    return data


@pytest.mark.parametrize("axes, signs", [((0, 1, 2), (-1, 1, -1)), ((2, 0, 1), (1, -1, 1))],
                         ids=["axial-last-flipped", "axial-first"])
def test_nifti_map_keeps_the_scan_geometry_and_finds_the_lesion(checkpoint, tmp_path, monkeypatch, axes, signs):
    identity_maps(monkeypatch)
    axial = axes.index(2)
    shape = [44, 50, 40]
    shape[axial] = 14
    spacing = [0.8, 0.75, 0.9]
    spacing[axial] = 2.5
    lesion = [26, 21, 17]
    lesion[axial] = 9
    affine = oblique_affine(axes, signs, spacing, (math.radians(10), math.radians(-15), math.radians(30)))
    hu, liver = liver_phantom(tuple(shape), axial, tuple(lesion))
    scan = write_nifti(tmp_path / "in" / "case-7.nii.gz", hu, affine, qform_code=1, sform_code=2)
    mask = write_nifti(tmp_path / "in" / "case-7_liver.nii.gz", liver, affine, qform_code=1, sform_code=2,
                       dtype=np.uint8)
    out = tmp_path / "out"
    assert predict(checkpoint, [scan], [mask], out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["case-7_anomaly.nii.gz", "case-7_review.png",
                                                    "case-7_slices.csv", "scores.json"]
    reference = nib.load(str(scan))
    data = check_map(out, "case-7", reference, lesion, liver)

    rows = list(csv.DictReader((out / "case-7_slices.csv").open()))
    liver_slices = [k for k in range(shape[axial]) if np.take(liver, k, axis=axial).any()]
    assert [int(r["slice"]) for r in rows] == liver_slices
    assert [int(r["liver_pixels"]) for r in rows] == [int(np.take(liver, k, axis=axial).sum()) for k in liver_slices]
    centre = (np.array(shape, float) - 1) / 2
    for row in rows:
        point = centre.copy()
        point[axial] = int(row["slice"])
        assert float(row["z_mm"]) == pytest.approx((affine @ np.append(point, 1))[2], abs=1e-3)
    best = max(rows, key=lambda r: float(r["score"]))
    assert int(best["slice"]) == lesion[axial]

    scores = json.loads((out / "scores.json").read_text())
    entry, = scores["scans"]
    slice_scores = sorted((s["score"] for s in entry["slices"]), reverse=True)
    assert entry["axial_axis"] == axial and entry["n_liver_slices"] == len(liver_slices)
    assert entry["score"] == pytest.approx(slice_scores[0])
    assert entry["top_k_mean"] == pytest.approx(np.mean(slice_scores[:scores["top_k"]]))
    assert entry["map_max"] == pytest.approx(float(data.max()))
    assert scores["window"] == [-200.0, 250.0] and scores["hist_eq"] is False
    with Image.open(out / "case-7_review.png") as review:
        assert review.mode in ("RGB", "RGBA") and review.size[0] > 600


def test_dicom_series_map_is_on_the_series_grid(checkpoint, tmp_path, monkeypatch):
    identity_maps(monkeypatch)
    grid = DicomGrid(rotation(math.radians(14), math.radians(-9), math.radians(20)), spacing=(0.8, 0.7), step=2.0)
    shape, lesion = (46, 40, 12), (18, 24, 7)  # [column, row, slice]
    hu, liver = liver_phantom(shape, 2, lesion)
    write_dicom_series(tmp_path / "in" / "SERIES_CT", hu, grid)
    write_dicom_series(tmp_path / "in" / "liver_mask", liver, grid, modality="OT", label=True, seed=1)
    # the same scan's mask as NIfTI, on the series' grid but stored [slice, row, column]
    affine = grid.affine(shape[2])
    stored = liver.transpose(2, 1, 0)
    write_nifti(tmp_path / "in" / "liver.nii.gz", stored, affine[:, [2, 1, 0, 3]], dtype=np.uint8)
    for mask in (tmp_path / "in" / "liver_mask", tmp_path / "in" / "liver.nii.gz"):
        out = tmp_path / f"out-{mask.name}"
        assert predict(checkpoint, [tmp_path / "in" / "SERIES_CT"], [mask], out, "--top-k", "3") == 0
        image = nib.load(str(out / "SERIES_CT_anomaly.nii.gz"))
        assert image.shape == shape and np.allclose(image.affine, affine, atol=1e-4)
        assert int(image.header["sform_code"]) == 1
        data = np.asarray(image.dataobj)
        assert (data[~liver] == 0).all()
        peak = np.unravel_index(np.argmax(data), data.shape)
        assert np.abs(np.array(peak) - np.array(lesion)).max() <= 1, (peak, lesion)
        entry, = json.loads((out / "scores.json").read_text())["scans"]
        assert entry["format"] == "dicom" and max(entry["slices"], key=lambda s: s["score"])["slice"] == lesion[2]


def test_two_scans_and_a_name_clash(checkpoint, tmp_path):
    """Two scans with the same file name in different folders; the real (untrained) network."""
    affine = oblique_affine((0, 1, 2), (1, 1, 1), (0.9, 0.9, 3.0), (0.0, 0.0, 0.0))
    inputs = []
    for i in range(2):
        hu, liver = liver_phantom((36, 30, 8), 2, (18, 15, 4), seed=i)
        inputs.append((write_nifti(tmp_path / f"p{i}" / "ct.nii", hu, affine),
                       write_nifti(tmp_path / f"p{i}" / "liver.nii.gz", liver, affine, dtype=np.uint8)))
    out = tmp_path / "out"
    assert predict(checkpoint, [s for s, _ in inputs], [m for _, m in inputs], out) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert [e["outputs"]["anomaly_map"] for e in scores["scans"]] == ["000-ct_anomaly.nii.gz", "001-ct_anomaly.nii.gz"]
    assert all((out / name).is_file() for e in scores["scans"] for name in e["outputs"].values())
    assert all(np.isfinite(e["score"]) for e in scores["scans"])


def test_the_records_window_is_used_by_default(tmp_path, monkeypatch):
    """A run's preprocessing record decides the window, whatever its data folder says now; a
    checkpoint saved before records existed falls back to its data's prepare settings, with a
    warning naming them."""
    from medad_fast.preprocessing import LegacyPreprocessingWarning

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"generator": "medad_fast.prepare", "sources": [
        {"settings": {"window": [-100.0, 200.0], "hist_eq": True}}]}))
    hu, liver = liver_phantom((30, 30, 6), 2, (15, 15, 3))
    scan = write_nifti(tmp_path / "s.nii.gz", hu, np.eye(4))
    mask = write_nifti(tmp_path / "m.nii.gz", liver, np.eye(4), dtype=np.uint8)

    old = tiny_checkpoint(tmp_path / "old" / "ckpt.pt", record=False, data=str(data))
    with pytest.warns(LegacyPreprocessingWarning, match="assuming HU window -100 200, hist-eq on"):
        assert predict(old, [scan], [mask], tmp_path / "a") == 0
    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    assert scores["window"] == [-100.0, 200.0] and scores["hist_eq"] is True
    assert scores["window_from"].endswith(f"(assumed: {(data / 'manifest.json').resolve()})")
    assert predict(old, [scan], [mask], tmp_path / "b", "--window", "-200", "250", "--no-hist-eq") == 0
    scores = json.loads((tmp_path / "b" / "scores.json").read_text())
    assert scores["window"] == [-200.0, 250.0] and scores["hist_eq"] is False
    assert scores["window_from"] == "--window and --hist-eq"

    # a record made when the data said -100 200: the data re-prepared since does not change it
    recorded = tiny_checkpoint(tmp_path / "new" / "ckpt.pt", data=str(data))
    (data / "manifest.json").write_text(json.dumps({"generator": "medad_fast.prepare", "sources": [
        {"settings": {"window": [0.0, 100.0], "hist_eq": False}}]}))
    assert predict(recorded, [scan], [mask], tmp_path / "c") == 0
    scores = json.loads((tmp_path / "c" / "scores.json").read_text())
    assert scores["window"] == [-100.0, 200.0] and scores["hist_eq"] is True
    assert scores["preprocessing"]["window"] == [-100.0, 200.0]


def test_predict_scores_the_slices_prepare_writes(tmp_path):
    """The same LiTS-style volume: the 8-bit slices predict feeds the model equal prepare's."""
    affine = oblique_affine((2, 0, 1), (-1, -1, 1), (2.0, 0.8, 0.9), (0.15, -0.1, 0.2))
    shape = (9, 22, 20)  # axial axis first
    hu, liver = liver_phantom(shape, 0, (4, 11, 9))
    labels = liver.astype(np.uint8)
    labels[4, 10:13, 8:11] = 2  # a "tumour" label counts as liver for both
    write_nifti(tmp_path / "volume-1.nii.gz", hu, affine)
    write_nifti(tmp_path / "segmentation-1.nii.gz", labels, affine, dtype=np.uint8)
    for hist_eq in (False, True):
        rendered = render_slices(read_nifti_case(tmp_path / "volume-1.nii.gz", tmp_path / "segmentation-1.nii.gz",
                                                 "lits"), hist_eq=hist_eq)
        scan = read_volume(tmp_path / "volume-1.nii.gz")
        mask = open_liver_mask(tmp_path / "segmentation-1.nii.gz", scan).read()
        indices = liver_slice_indices(mask, scan.axial_axis)
        images, _ = display_images(scan, mask, indices, hist_eq=hist_eq)
        # prepare counts slices from the most inferior; the voxel axis may run the other way
        order = np.argsort(scan.slice_z_mm(indices))
        assert images.shape == rendered.images.shape
        assert np.array_equal(images[order], rendered.images)
    assert (hu[~liver] == AIR).all()


# --------------------------------------------------------------------------- bad input


def outputs_of(out: Path) -> list[str]:
    """Everything under --out, hidden files included."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


@pytest.fixture
def case(tmp_path):
    affine = oblique_affine((0, 1, 2), (-1, -1, 1), (0.8, 0.8, 2.5), (0.1, 0.0, 0.0))
    hu, liver = liver_phantom((32, 30, 8), 2, (16, 15, 4))
    scan = write_nifti(tmp_path / "in" / "scan.nii.gz", hu, affine)
    mask = write_nifti(tmp_path / "in" / "mask.nii.gz", liver, affine, dtype=np.uint8)
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    return {"scan": scan, "mask": mask, "affine": affine, "hu": hu, "liver": liver, "out": out, "dir": tmp_path / "in"}


def refused(capsys, checkpoint, scans, masks, out, *names) -> str:
    assert predict(checkpoint, scans, masks, out) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)
    assert outputs_of(out) == ["earlier.txt"], outputs_of(out)  # nothing written, nothing left behind
    return err


def test_mask_shape_or_affine_mismatch_names_both_files(checkpoint, case, capsys):
    write_nifti(case["dir"] / "short.nii.gz", case["liver"][:, :, :-1], case["affine"], dtype=np.uint8)
    refused(capsys, checkpoint, [case["scan"]], [case["dir"] / "short.nii.gz"], case["out"], "short.nii.gz",
            "scan.nii.gz", "shape")
    moved = case["affine"].copy()
    moved[:3, 3] += 3.0
    write_nifti(case["dir"] / "moved.nii.gz", case["liver"], moved, dtype=np.uint8)
    refused(capsys, checkpoint, [case["scan"]], [case["dir"] / "moved.nii.gz"], case["out"], "moved.nii.gz",
            "scan.nii.gz", "affine")


def test_missing_or_empty_liver_mask(checkpoint, case, capsys):
    assert predict(checkpoint, [case["scan"]], [], case["out"]) == 2
    assert "--liver-mask" in capsys.readouterr().err
    refused(capsys, checkpoint, [case["scan"]], [case["dir"] / "nothing.nii.gz"], case["out"], "nothing.nii.gz",
            "scan.nii.gz")
    refused(capsys, checkpoint, [case["scan"], case["scan"]], [case["mask"]], case["out"], "2 scan(s)")
    write_nifti(case["dir"] / "empty.nii.gz", np.zeros_like(case["liver"]), case["affine"], dtype=np.uint8)
    refused(capsys, checkpoint, [case["scan"]], [case["dir"] / "empty.nii.gz"], case["out"], "empty.nii.gz", "empty")
    # a label value that is not in the mask leaves it empty too
    assert predict(checkpoint, [case["scan"]], [case["mask"]], case["out"], "--liver-label", "6") == 2
    assert "no voxel labelled [6.0]" in capsys.readouterr().err


def test_dicom_folder_with_two_series_or_another_modality(checkpoint, case, tmp_path, capsys):
    grid = DicomGrid(rotation(0.2, 0.0, 0.1))
    hu, liver = liver_phantom((20, 18, 6), 2, (10, 9, 3))
    write_dicom_series(tmp_path / "mixed", hu, grid, seed=1)
    write_dicom_series(tmp_path / "mixed", hu[:, :, :3], grid, seed=2)
    mask = write_nifti(tmp_path / "liver.nii.gz", liver, grid.affine(6), dtype=np.uint8)
    refused(capsys, checkpoint, [tmp_path / "mixed"], [mask], case["out"], "mixed", "different series")
    write_dicom_series(tmp_path / "mr", hu, grid, modality="MR")
    refused(capsys, checkpoint, [tmp_path / "mr"], [mask], case["out"], "'MR'", "expected 'CT'")


def test_truncated_second_scan_leaves_no_output_of_the_first(checkpoint, case, tmp_path, capsys):
    broken = case["dir"] / "broken.nii.gz"
    data = case["scan"].read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    refused(capsys, checkpoint, [case["scan"], broken], [case["mask"], case["mask"]], case["out"], "broken.nii.gz")
    # a new --out that fails is not left behind either
    assert predict(checkpoint, [case["scan"], broken], [case["mask"], case["mask"]], tmp_path / "new" / "out") == 2
    assert not (tmp_path / "new" / "out").exists()


def test_volumes_and_images_are_not_mixed(checkpoint, case, tmp_path, capsys):
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    refused(capsys, checkpoint, [case["scan"], png], [case["mask"]], case["out"], "slice.png", "separate calls")
    refused(capsys, checkpoint, [png], [case["mask"]], case["out"], "--liver-mask is for CT volumes")
