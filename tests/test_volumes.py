"""`medad-fast prepare`: NIfTI (LiTS, BTCV) and DICOM series -> BMAD layout.

The oracle for geometry and intensities is a phantom defined as a FUNCTION OF WORLD
POSITION (RAS millimetres). The files are written on voxel grids with arbitrary axis
permutations/flips (NIfTI affines, DICOM ImageOrientationPatient), and the expected slices
are computed straight from world coordinates in radiological display (anterior at the top,
patient right on the image left, slice 0 most inferior), with no nibabel orientation code.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from ct_data import slice_dataset
from medad_fast.cli import prepare as prepare_cli
from medad_fast.data import volumes
from medad_fast.data.volumes import (equalize_liver_histogram, prepare_dataset, split_counts, split_patients)

# --------------------------------------------------------------------------- world phantom

# Display grid: slices along S, rows along A (top = anterior), columns along R (left = patient right).
N_S, N_A, N_R = 8, 18, 24
SPACING_S, SPACING_A, SPACING_R = 3.0, 1.5, 1.0
X_MAX, Y_MAX, Z_MIN = 12.0, 13.0, -10.5  # world (RAS) of display voxel [0, 0, 0]
WINDOW = (-200.0, 250.0)

DISPLAY_X = X_MAX - SPACING_R * np.arange(N_R)  # columns: patient right -> left
DISPLAY_Y = Y_MAX - SPACING_A * np.arange(N_A)  # rows: anterior -> posterior
DISPLAY_Z = Z_MIN + SPACING_S * np.arange(N_S)  # slices: inferior -> superior


def phantom(x, y, z):
    """HU and label (0 background, 1 liver, 2 tumour, 3 another organ) at RAS positions (mm).

    Liver: a box, absent from the two most inferior slices. Marker (HU 230): the liver's
    anterior-right corner. Tumour: only in the superior half (z > 0). Liver HU is a ramp in
    x and y, so any flip or transpose changes the pixels.
    """
    x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
    hu = -600.0 + 3.0 * x
    liver = (np.abs(x - 1) <= 9.5) & (np.abs(y - 1) <= 7.6) & (z > Z_MIN + 1.5 * SPACING_S)
    hu = np.where(liver, 40.0 + 6.0 * x + 2.0 * y, hu)
    marker = liver & (x >= 5) & (y >= 4)
    hu = np.where(marker, 230.0, hu)
    tumour = liver & (np.abs(x + 3) <= 2.5) & (np.abs(y) <= 2.5) & (z > 0)
    hu = np.where(tumour, -40.0, hu)
    other_organ = ~liver & (x < -9) & (y < -5)
    label = np.where(tumour, 2, np.where(liver, 1, np.where(other_organ, 3, 0)))
    return hu, label


def expected_display():
    """Expected uint8 slices, liver and tumour masks [N_S, N_A, N_R], from world coordinates."""
    z, y, x = np.meshgrid(DISPLAY_Z, DISPLAY_Y, DISPLAY_X, indexing="ij")
    hu, label = phantom(x, y, z)
    liver = (label == 1) | (label == 2)
    grey = np.clip(np.rint((hu - WINDOW[0]) * 255.0 / (WINDOW[1] - WINDOW[0])), 0, 255)
    image = np.where(liver, np.maximum(grey, 1), 0).astype(np.uint8)
    return image, liver, label == 2


# axis spec: for each array axis (world axis 0=x/R, 1=y/A, 2=z/S, direction +1/-1)
LITS_LIKE = [(0, -1), (1, -1), (2, 1)]            # typical LiTS header (x, y flipped)
PERMUTED = [(2, -1), (0, 1), (1, -1)]             # slices on axis 0, descending; R then A flipped
SPACING_BY_WORLD_AXIS = {0: SPACING_R, 1: SPACING_A, 2: SPACING_S}
SORTED_WORLD = {0: np.sort(DISPLAY_X), 1: np.sort(DISPLAY_Y), 2: np.sort(DISPLAY_Z)}


def nifti_arrays(axes):
    """Phantom voxel arrays + affine for a grid whose array axes follow ``axes``."""
    coords, affine = [], np.eye(4)
    for a, (w, sign) in enumerate(axes):
        values = SORTED_WORLD[w] if sign > 0 else SORTED_WORLD[w][::-1]
        coords.append((w, values))
        affine[:3, a] = 0.0
        affine[w, a] = sign * SPACING_BY_WORLD_AXIS[w]
        affine[w, 3] = values[0]
    grids = np.meshgrid(*(values for _, values in coords), indexing="ij")
    world = [None, None, None]
    for (w, _), grid in zip(coords, grids):
        world[w] = grid
    hu, label = phantom(*world)
    return hu, label, affine


def write_nifti_case(folder: Path, image_name: str, label_name: str, axes=LITS_LIKE, label_map=None,
                     label_shape_cut: int = 0):
    hu, label, affine = nifti_arrays(axes)
    # Default: LiTS codes (0/1/2), the phantom's other organ (3) is background.
    label = label_map(label) if label_map is not None else np.where(label == 3, 0, label)
    if label_shape_cut:
        label = label[:-label_shape_cut]
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(folder / image_name))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), str(folder / label_name))


def write_lits(src: Path, numbers, axes=LITS_LIKE):
    for n in numbers:
        write_nifti_case(src, f"volume-{n}.nii.gz", f"segmentation-{n}.nii.gz", axes=axes)


def btcv_labels(label):
    """Phantom labels -> BTCV codes: liver (incl. the 'tumour') = 6, the other organ = 1 (spleen)."""
    return np.where(label >= 1, np.where(label == 3, 1, 6), 0)


# --------------------------------------------------------------------------- DICOM


def _dicom_dataset(series_uid, rows, cols, ipp, iop, instance, bits=16):
    ds = slice_dataset(series_uid, "CT", rows, cols, ipp, iop, (SPACING_A, SPACING_R), bits)
    ds.SliceThickness = SPACING_S
    ds.InstanceNumber = instance
    return ds


def write_dicom_patient(patient_dir: Path, flipped: bool = False, drop_slice: int | None = None,
                        tumour_series: int = 2):
    """A 3D-IRCADb-style patient folder of the phantom. ``flipped``: image rows/columns run the
    other way (IOP -1,0,0 / 0,-1,0), so the reader must use the orientation. Files are named
    in an order unrelated to position, InstanceNumber is scrambled, and slice 3 uses a
    different RescaleSlope/Intercept."""
    row_cos = np.array([-1.0, 0, 0]) if flipped else np.array([1.0, 0, 0])
    col_cos = np.array([0, -1.0, 0]) if flipped else np.array([0, 1.0, 0])
    # LPS corner (pixel [0, 0]) so that the grid covers the display grid's world points.
    x_l = -DISPLAY_X  # LPS x of the display columns
    y_p = -DISPLAY_Y
    corner_x = x_l.max() if flipped else x_l.min()
    corner_y = y_p.max() if flipped else y_p.min()
    cols = np.arange(N_R)
    rows = np.arange(N_A)
    lps_x = corner_x + row_cos[0] * SPACING_R * cols  # per column
    lps_y = corner_y + col_cos[1] * SPACING_A * rows  # per row
    series_uid, masks_uids = generate_uid(), [generate_uid() for _ in range(1 + tumour_series)]
    rng = np.random.default_rng(7)
    names = rng.permutation(N_S)
    for k, z in enumerate(DISPLAY_Z):
        if k == drop_slice:
            continue
        yy, xx = np.meshgrid(lps_y, lps_x, indexing="ij")
        hu, label = phantom(-xx, -yy, z)
        ipp = (corner_x, corner_y, z)
        iop = list(row_cos) + list(col_cos)
        name = f"image_{names[k]}"
        ds = _dicom_dataset(series_uid, N_A, N_R, ipp, iop, instance=int(names[(k + 3) % N_S]) + 1)
        slope, intercept = (0.5, -1000.0) if k == 3 else (1.0, -1024.0)
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.rint((hu - intercept) / slope).astype("<u2").tobytes()
        (patient_dir / "PATIENT_DICOM").mkdir(parents=True, exist_ok=True)
        ds.save_as(patient_dir / "PATIENT_DICOM" / name, enforce_file_format=True)
        # Masks: liver, and the tumour split over ``tumour_series`` series (left / right half).
        masks = {"liver": (label == 1) | (label == 2)}
        tumour = label == 2
        for t in range(tumour_series):
            half = (xx < 3) if t == 0 else (xx >= 3)  # LPS x = -R x: split the tumour in two parts
            masks[f"livertumor{t + 1:02d}"] = tumour & (half if tumour_series > 1 else True)
        for (mask_name, mask), uid in zip(masks.items(), masks_uids):
            mds = _dicom_dataset(uid, N_A, N_R, ipp, iop, instance=k + 1, bits=8)
            mds.PixelData = (mask.astype(np.uint8) * 255).tobytes()
            folder = patient_dir / "MASKS_DICOM" / mask_name
            folder.mkdir(parents=True, exist_ok=True)
            mds.save_as(folder / name, enforce_file_format=True)


# --------------------------------------------------------------------------- helpers


def run_prepare(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    prepare_cli.add_arguments(parser)
    return prepare_cli.main(parser.parse_args([*argv, "--no-progress"]))


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.array(img)


def load_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def pngs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))


def tree_digest(root: Path) -> dict[str, tuple[str, float]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(root.rglob("*")) if p.is_file()}


def slices_by_index(out: Path, patient: str) -> dict[int, dict]:
    return {s["slice_index"]: s for s in load_manifest(out)["slices"] if s["patient"] == patient}


def check_against_oracle(out: Path, patient: str, splits=("test",)):
    """Every written slice of ``patient`` equals the world-computed expectation."""
    image_exp, liver_exp, tumour_exp = expected_display()
    written = slices_by_index(out, patient)
    expected_indices = {k for k in range(N_S) if liver_exp[k].any()}
    assert set(written) == expected_indices, "slices with liver, and only those, are written"
    for k, entry in written.items():
        assert entry["split"] in splits
        image = read_png(out / entry["image"])
        assert image.shape == (N_A, N_R)
        # Background EXACTLY 0 and liver >= 1: image > 0 is the liver mask.
        np.testing.assert_array_equal(image > 0, liver_exp[k])
        assert np.abs(image.astype(int) - image_exp[k]).max() <= 1, f"slice {k} differs from the oracle"
        assert entry["label"] == int(tumour_exp[k].any())
        if entry["label"]:
            mask = read_png(out / entry["mask"])
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, tumour_exp[k])
        else:
            assert entry["mask"] is None
    # The marker (anterior-right corner of the liver) is in the top-left part of the image.
    k = max(written)
    image = read_png(out / written[k]["image"])
    rows, cols = np.nonzero(image == image_exp[k].max())
    assert rows.mean() < N_A / 2 and cols.mean() < N_R / 2


# --------------------------------------------------------------------------- geometry / content


@pytest.mark.parametrize("axes", [LITS_LIKE, PERMUTED], ids=["lits-affine", "permuted-flipped-affine"])
def test_lits_slices_match_world_oracle(tmp_path, axes):
    src, out = tmp_path / "src", tmp_path / "out"
    write_lits(src, [5], axes=axes)
    assert run_prepare("lits", str(src), str(out), "--test-fraction", "1", "--val-fraction", "0") == 0
    check_against_oracle(out, "lits-5")
    manifest = load_manifest(out)
    assert all(s["source"] == str((src / "volume-5.nii.gz").resolve()) for s in manifest["slices"])
    _, liver_exp, tumour_exp = expected_display()
    n_abnormal = int(sum(tumour_exp[k].any() for k in range(N_S)))
    n_liver = int(sum(liver_exp[k].any() for k in range(N_S)))
    assert manifest["counts"]["test"] == {"good": n_liver - n_abnormal, "Ungood": n_abnormal}
    assert n_abnormal > 0 and n_liver - n_abnormal > 0
    # Superior slices (higher index) hold the tumour.
    abnormal_indices = [s["slice_index"] for s in manifest["slices"] if s["label"]]
    assert min(abnormal_indices) > max(s["slice_index"] for s in manifest["slices"] if not s["label"])


@pytest.mark.parametrize("flipped", [False, True], ids=["standard-iop", "rotated-iop"])
def test_dicom_series_match_world_oracle(tmp_path, flipped):
    src, out = tmp_path / "ircadb", tmp_path / "out"
    write_dicom_patient(src / "3Dircadb1.1", flipped=flipped)
    assert run_prepare("dicom", str(src), str(out), "--test-fraction", "1", "--val-fraction", "0") == 0
    check_against_oracle(out, "dicom-3Dircadb1.1")


def test_btcv_layouts_normals_only_and_label_6(tmp_path):
    nested, flat = tmp_path / "btcv", tmp_path / "btcv_flat"
    for number in ("0001", "0002"):
        hu, label, affine = nifti_arrays(PERMUTED)
        for folder, (img_dir, lab_dir) in ((nested, ("img", "label")), (flat, ("", ""))):
            (folder / img_dir).mkdir(parents=True, exist_ok=True)
            (folder / lab_dir).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(folder / img_dir / f"img{number}.nii.gz"))
            nib.save(nib.Nifti1Image(btcv_labels(label).astype(np.uint8), affine),
                     str(folder / lab_dir / f"label{number}.nii.gz"))
    image_exp, liver_exp, _ = expected_display()
    for folder in (nested, flat):
        out = tmp_path / f"out_{folder.name}"
        assert run_prepare("btcv", str(folder), str(out), "--val-fraction", "0", "--test-fraction", "0") == 0
        manifest = load_manifest(out)
        assert sorted(manifest["sources"][0]["patients"]) == ["btcv-0001", "btcv-0002"]
        n_liver = int(sum(liver_exp[k].any() for k in range(N_S)))
        # No tumours in BTCV: every liver slice of both patients goes to train as normal.
        assert manifest["counts"]["train"] == {"good": 2 * n_liver}
        assert pngs(out) == sorted(f"train/good/btcv-{n}_{k:04d}.png" for n in ("0001", "0002")
                                   for k in range(N_S) if liver_exp[k].any())
        for entry in manifest["slices"]:
            image = read_png(out / entry["image"])
            # Label 6 (liver incl. the phantom's "tumour") is the liver; label 1 (spleen) is background.
            np.testing.assert_array_equal(image > 0, liver_exp[entry["slice_index"]])


def test_hist_eq_matches_rank_oracle_and_keeps_background(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(40, 50)).astype(np.uint8)
    liver = np.zeros((40, 50), bool)
    liver[5:30, 10:45] = True
    image[liver] = np.clip(rng.normal(120, 10, liver.sum()), 1, 255).astype(np.uint8)  # narrow liver histogram
    result = equalize_liver_histogram(image, liver)
    assert (result[~liver] == 0).all() and (result[liver] >= 1).all()
    # Oracle by ranks: share of liver pixels <= v, rescaled from the minimum value's share.
    values = np.sort(image[liver])
    n = values.size
    below_or_equal = np.searchsorted(values, image[liver], side="right")
    n_min = np.searchsorted(values, values[0], side="right")
    expected = 1 + np.rint(254.0 * (below_or_equal - n_min) / (n - n_min))
    np.testing.assert_array_equal(result[liver], expected)
    assert result[liver].min() == 1 and result[liver].max() == 255
    assert np.std(result[liver]) > 3 * np.std(image[liver])  # contrast stretched
    # Single grey value: unchanged; empty liver: all 0.
    flat = np.where(liver, 77, 5).astype(np.uint8)
    np.testing.assert_array_equal(equalize_liver_histogram(flat, liver), np.where(liver, 77, 0))
    assert not equalize_liver_histogram(image, np.zeros_like(liver)).any()

    # Through prepare: --hist-eq stretches the liver, background stays exactly 0.
    src, out = tmp_path / "src", tmp_path / "out"
    write_lits(src, [1])
    assert run_prepare("lits", str(src), str(out), "--hist-eq", "--test-fraction", "1", "--val-fraction", "0") == 0
    _, liver_exp, _ = expected_display()
    for entry in load_manifest(out)["slices"]:
        out_image = read_png(out / entry["image"])
        np.testing.assert_array_equal(out_image > 0, liver_exp[entry["slice_index"]])
        assert out_image.max() == 255


def test_window_and_resize(tmp_path):
    src = tmp_path / "src"
    write_lits(src, [2])
    # Narrow window: a liver pixel below LO still reads >= 1, above HI reads 255.
    out = tmp_path / "narrow"
    assert run_prepare("lits", str(src), str(out), "--window", "0", "100", "--test-fraction", "1",
                       "--val-fraction", "0") == 0
    _, liver_exp, _ = expected_display()
    for entry in load_manifest(out)["slices"]:
        image = read_png(out / entry["image"])
        liver = liver_exp[entry["slice_index"]]
        assert (image[liver] >= 1).all() and (image[~liver] == 0).all()
        assert (image[liver] == 1).any() and (image[liver] == 255).any()
    # Resize to 16 x 16 (shrink) and 40 x 40 (enlarge): sizes, exact background, 0/255 masks.
    for size in (16, 40):
        out = tmp_path / f"size{size}"
        assert run_prepare("lits", str(src), str(out), "--size", str(size), "--test-fraction", "1",
                           "--val-fraction", "0") == 0
        manifest = load_manifest(out)
        assert manifest["sources"][0]["settings"]["size"] == size
        for entry in manifest["slices"]:
            image = read_png(out / entry["image"])
            assert image.shape == (size, size)
            assert image.max() > 0 and (image == 0).any()
            if entry["label"]:
                mask = read_png(out / entry["mask"])
                assert mask.shape == (size, size) and set(np.unique(mask)) == {0, 255}
                assert (image[mask == 255] > 0).all(), "tumour lies inside the liver"


def test_tiny_tumour_keeps_a_mask_after_shrinking():
    hu = np.zeros((1, 64, 64), np.float32)
    liver = np.zeros((1, 64, 64), bool)
    liver[0, 8:56, 8:56] = True
    tumour = np.zeros_like(liver)
    tumour[0, 33, 33] = True  # one pixel; nearest-neighbour to 8 x 8 misses it
    volume = volumes.LiverSlab(hu=hu, liver=liver, tumour=tumour, slice_indices=np.array([4]), source="x")
    rendered = volumes.render_slices(volume, size=8)
    assert rendered.abnormal.tolist() == [True]
    assert rendered.masks.shape == (1, 8, 8) and rendered.masks.sum() == 1
    assert rendered.masks[0, 4, 4]  # the 8x8 cell that covers pixel (33, 33)


# --------------------------------------------------------------------------- split


def test_split_counts_and_determinism():
    assert split_counts(10, 0.2, 0.3) == {"train": 5, "valid": 2, "test": 3}
    assert split_counts(2, 0.1, 0.2) == {"train": 1, "valid": 0, "test": 1}
    assert split_counts(3, 0.1, 0.2) == {"train": 1, "valid": 1, "test": 1}
    assert split_counts(5, 0.0, 0.0) == {"train": 5, "valid": 0, "test": 0}
    assert split_counts(4, 0.0, 1.0) == {"train": 0, "valid": 0, "test": 4}
    assert split_counts(7, 0.5, 0.5) == {"train": 0, "valid": 3, "test": 4} or \
        split_counts(7, 0.5, 0.5) == {"train": 0, "valid": 4, "test": 3}
    for n in range(0, 30):
        for fv, ft in ((0.1, 0.2), (0.0, 0.5), (0.3, 0.3), (0.25, 0.75)):
            c = split_counts(n, fv, ft)
            assert sum(c.values()) == n and min(c.values()) >= 0
            if n >= 3:
                assert abs(c["test"] - ft * n) <= 1 and abs(c["valid"] - fv * n) <= 1
    patients = [f"p{i}" for i in range(20)]
    first = split_patients(patients, 0.2, 0.3, seed=3)
    assert first == split_patients(list(reversed(patients)), 0.2, 0.3, seed=3)  # order-independent
    assert first != split_patients(patients, 0.2, 0.3, seed=4)
    assert sorted(first.values()).count("test") == 6 and sorted(first.values()).count("valid") == 4


def test_patient_level_split_and_manifest(tmp_path):
    src, out = tmp_path / "lits", tmp_path / "out"
    write_lits(src / "Training Batch 1", range(0, 5))
    write_lits(src / "Training Batch 2", range(5, 10))
    assert run_prepare("lits", str(src), str(out), "--val-fraction", "0.2", "--test-fraction", "0.3",
                       "--seed", "11") == 0
    manifest = load_manifest(out)
    patients = manifest["sources"][0]["patients"]
    assert len(patients) == 10
    assert [info["split"] for info in patients.values()].count("test") == 3
    assert [info["split"] for info in patients.values()].count("valid") == 2
    assert split_patients(list(patients), 0.2, 0.3, seed=11) == {p: i["split"] for p, i in patients.items()}

    files = pngs(out)
    listed = sorted([s["image"] for s in manifest["slices"]] + [s["mask"] for s in manifest["slices"] if s["mask"]])
    assert files == listed, "manifest lists exactly the files on disk"
    split_of_file_patient = {}
    for entry in manifest["slices"]:
        patient = entry["patient"]
        assert entry["split"] == patients[patient]["split"]
        assert entry["image"].startswith(entry["split"] + "/")
        split_of_file_patient.setdefault(patient, set()).add(entry["image"].split("/")[0])
        if entry["split"] == "train":
            assert entry["label"] == 0 and entry["image"].startswith("train/good/")
        else:
            kind = "Ungood" if entry["label"] else "good"
            assert entry["image"] == f"{entry['split']}/{kind}/img/{patient}_{entry['slice_index']:04d}.png"
        assert entry["source"].endswith(f"volume-{patient.split('-')[1]}.nii.gz")
    assert all(len(s) == 1 for s in split_of_file_patient.values()), "a patient is never in two splits"

    _, liver_exp, tumour_exp = expected_display()
    per_patient_liver = int(sum(liver_exp[k].any() for k in range(N_S)))
    per_patient_abnormal = int(sum(tumour_exp[k].any() for k in range(N_S)))
    counts = manifest["counts"]
    assert counts["train"] == {"good": 5 * (per_patient_liver - per_patient_abnormal)}
    assert counts["train_abnormal_dropped"] == 5 * per_patient_abnormal
    assert counts["valid"] == {"good": 2 * (per_patient_liver - per_patient_abnormal), "Ungood": 2 * per_patient_abnormal}
    assert counts["test"] == {"good": 3 * (per_patient_liver - per_patient_abnormal), "Ungood": 3 * per_patient_abnormal}
    assert counts["patients"] == {"train": 5, "valid": 2, "test": 3}
    assert counts["volumes"] == {"done": 10, "failed": 0, "pending": 0}
    assert counts["slices"] == len(manifest["slices"])


def test_prepare_finds_the_cases_volume_evaluation_reads_back(tmp_path):
    """One patient type for both: discovery makes each patient with its case source, and the
    manifest's patients read back (volume evaluation) are those same cases."""
    from medad_fast.data.cases import CASE_SOURCES, VolumeCase
    from medad_fast.volume_evaluate import cases_from_manifest

    src, out = tmp_path / "lits", tmp_path / "out"
    write_lits(src, [0, 1])
    (src / "volume-2.nii.gz").write_bytes((src / "volume-0.nii.gz").read_bytes())  # an image without its label
    found = volumes.discover_cases("lits", src.resolve())
    assert all(isinstance(case, VolumeCase) for case in found)
    good, broken = found[:2], found[2]
    assert good == [CASE_SOURCES["lits"].case(c.name, c.image, c.label) for c in good]
    assert [(c.name, c.kind, c.problem) for c in good] == [("lits-0", "lits", None), ("lits-1", "lits", None)]
    assert good[0].scan == src.resolve() / "volume-0.nii.gz" and good[0].liver[0].path == Path(good[0].label)
    assert (broken.name, broken.liver, broken.label) == ("lits-2", (), None)
    assert "no label file segmentation-2" in broken.problem
    report = prepare_dataset("lits", src, out, val_fraction=0, test_fraction=1, progress=False, log=lambda m: None)
    assert report.failed == {"lits-2": broken.problem}
    read_back, skipped = cases_from_manifest(out / "manifest.json", "test")
    assert read_back == good and [s["patient"] for s in skipped] == ["lits-2"]


def test_second_source_merges_into_same_out(tmp_path):
    btcv, lits, out = tmp_path / "btcv", tmp_path / "lits", tmp_path / "out"
    hu, label, affine = nifti_arrays(LITS_LIKE)
    (btcv / "img").mkdir(parents=True)
    (btcv / "label").mkdir(parents=True)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(btcv / "img" / "img0001.nii.gz"))
    nib.save(nib.Nifti1Image(btcv_labels(label).astype(np.uint8), affine), str(btcv / "label" / "label0001.nii.gz"))
    write_lits(lits, [3, 4])
    assert run_prepare("btcv", str(btcv), str(out), "--val-fraction", "0", "--test-fraction", "0") == 0
    assert run_prepare("lits", str(lits), str(out), "--val-fraction", "0.5", "--test-fraction", "0.5") == 0
    manifest = load_manifest(out)
    assert [s["kind"] for s in manifest["sources"]] == ["btcv", "lits"]
    assert manifest["counts"]["patients"] == {"train": 1, "valid": 1, "test": 1}
    assert manifest["counts"]["train"]["good"] > 0 and manifest["counts"]["test"]["Ungood"] > 0
    # The same LiTS folder again, other settings: refused (resume must not mix settings).
    assert run_prepare("lits", str(lits), str(out), "--val-fraction", "0.5", "--test-fraction", "0.5",
                       "--window", "-100", "200") == 2


# --------------------------------------------------------------------------- robustness


def test_corrupt_and_mismatched_volumes_are_reported_and_others_converted(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    write_lits(src, [0, 1, 2, 3])
    # 1: truncated gzip image; 2: label with one slice less; 3: not NIfTI at all.
    data = (src / "volume-1.nii.gz").read_bytes()
    (src / "volume-1.nii.gz").write_bytes(data[: len(data) // 2])
    write_nifti_case(src, "volume-2.nii.gz", "segmentation-2.nii.gz", label_shape_cut=1)
    (src / "segmentation-3.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    (src / "volume-4.nii.gz").write_bytes((src / "volume-0.nii.gz").read_bytes())  # image without label
    before = tree_digest(src)

    code = run_prepare("lits", str(src), str(out), "--val-fraction", "0", "--test-fraction", "1")
    captured = capsys.readouterr()
    assert code == 1
    manifest = load_manifest(out)
    statuses = {p: i["status"] for p, i in manifest["sources"][0]["patients"].items()}
    assert statuses == {"lits-0": "done", "lits-1": "failed", "lits-2": "failed", "lits-3": "failed",
                        "lits-4": "failed"}
    errors = {p: i["error"] for p, i in manifest["sources"][0]["patients"].items()}
    assert str(src.resolve() / "volume-1.nii.gz") in errors["lits-1"]
    assert "segmentation-2.nii.gz" in errors["lits-2"] and "does not match" in errors["lits-2"]
    assert str((src / "segmentation-2.nii.gz").resolve()) in errors["lits-2"]
    assert "segmentation-3.nii.gz" in errors["lits-3"]
    assert "volume-4.nii.gz" in errors["lits-4"] and "no label file segmentation-4" in errors["lits-4"]
    # Summary at the end names every failure; lits-0 was converted.
    assert "4 failed" in captured.out and all(p in captured.out for p in ("lits-1", "lits-2", "lits-3", "lits-4"))
    assert {s["patient"] for s in manifest["slices"]} == {"lits-0"}
    check_against_oracle(out, "lits-0")
    assert tree_digest(src) == before, "the source is never modified"


def test_wrong_kind_is_reported(tmp_path):
    hu, label, affine = nifti_arrays(LITS_LIKE)
    # BTCV labels (liver 6, spleen 1) named as LiTS: label 1 must not be taken for liver.
    lits_named = tmp_path / "lits_named"
    lits_named.mkdir()
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(lits_named / "volume-9.nii"))
    nib.save(nib.Nifti1Image(btcv_labels(label).astype(np.uint8), affine), str(lits_named / "segmentation-9.nii"))
    report = prepare_dataset("lits", lits_named, tmp_path / "out1", progress=False, log=lambda m: None)
    assert not report.ok and not report.converted
    assert "0..2" in report.failed["lits-9"] and "segmentation-9.nii" in report.failed["lits-9"]
    # LiTS labels (liver 1, tumour 2) named as BTCV: there is no label 6.
    btcv_named = tmp_path / "btcv_named"
    btcv_named.mkdir()
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), str(btcv_named / "img0009.nii"))
    nib.save(nib.Nifti1Image(np.where(label == 3, 0, label).astype(np.uint8), affine),
             str(btcv_named / "label0009.nii"))
    report = prepare_dataset("btcv", btcv_named, tmp_path / "out2", progress=False, log=lambda m: None)
    assert "no liver voxel" in report.failed["btcv-0009"] and "label0009.nii" in report.failed["btcv-0009"]


def test_dicom_missing_slice_and_mask_problems(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_dicom_patient(src / "good_patient")
    write_dicom_patient(src / "gap_patient", drop_slice=4)
    write_dicom_patient(src / "mask_patient")
    next(iter(sorted((src / "mask_patient" / "MASKS_DICOM" / "liver").iterdir()))).unlink()
    write_dicom_patient(src / "nomask_patient", tumour_series=0)
    for child in (src / "nomask_patient" / "MASKS_DICOM").iterdir():
        for f in child.iterdir():
            f.unlink()
        child.rmdir()
    write_dicom_patient(src / "junk_patient")
    (src / "junk_patient" / "PATIENT_DICOM" / "image_99").write_bytes(b"not a dicom file at all" * 10)
    write_dicom_patient(src / "truncated_patient")
    truncated = next(p for p in sorted((src / "truncated_patient" / "PATIENT_DICOM").iterdir())  # a liver slice
                     if float(pydicom.dcmread(p).ImagePositionPatient[2]) == DISPLAY_Z[5])
    truncated.write_bytes(truncated.read_bytes()[:-200])
    (src / "zipped_patient").mkdir()
    (src / "zipped_patient" / "PATIENT_DICOM.zip").write_bytes(b"PK")
    before = tree_digest(src)

    report = prepare_dataset("dicom", src, out, val_fraction=0, test_fraction=1, progress=False, log=lambda m: None)
    assert sorted(report.converted) == ["dicom-good-patient"]
    failed = report.failed
    assert set(failed) == {"dicom-gap-patient", "dicom-mask-patient", "dicom-nomask-patient", "dicom-zipped-patient",
                           "dicom-junk-patient", "dicom-truncated-patient"}
    assert str((src / "junk_patient" / "PATIENT_DICOM" / "image_99").resolve()) in failed["dicom-junk-patient"]
    assert str(truncated.resolve()) in failed["dicom-truncated-patient"]
    gap = failed["dicom-gap-patient"]
    assert "missing slice" in gap and str((src / "gap_patient" / "PATIENT_DICOM").resolve()) in gap
    assert "6.00 mm" in gap and "3.00 mm" in gap
    assert "MASKS_DICOM/liver" in failed["dicom-mask-patient"] and "7 mask slices" in failed["dicom-mask-patient"]
    assert "MASKS_DICOM/liver" in failed["dicom-nomask-patient"]
    assert "unzip" in failed["dicom-zipped-patient"]
    check_against_oracle(out, "dicom-good-patient")
    assert tree_digest(src) == before


def test_resume_after_fix_and_after_interruption(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_lits(src, [0, 1, 2])
    good_copy = (src / "volume-1.nii.gz").read_bytes()
    (src / "volume-1.nii.gz").write_bytes(good_copy[:100])
    args = ("lits", str(src), str(out), "--val-fraction", "0", "--test-fraction", "0.4")
    assert run_prepare(*args) == 1
    first = load_manifest(out)
    done_files = {p: out.joinpath(p).stat().st_mtime_ns for p in pngs(out)}
    assert first["sources"][0]["patients"]["lits-1"]["status"] == "failed"

    # Fix the file, run again: only lits-1 is converted, the rest is untouched, nothing duplicated.
    (src / "volume-1.nii.gz").write_bytes(good_copy)
    report = prepare_dataset(*args[:3], val_fraction=0, test_fraction=0.4, progress=False, log=lambda m: None)
    assert report.ok and report.converted == ["lits-1"] and sorted(report.skipped) == ["lits-0", "lits-2"]
    assert all(out.joinpath(p).stat().st_mtime_ns == t for p, t in done_files.items())
    second = load_manifest(out)
    images = [s["image"] for s in second["slices"]]
    assert len(images) == len(set(images))
    assert pngs(out) == sorted(images + [s["mask"] for s in second["slices"] if s["mask"]])
    assert second["counts"]["volumes"] == {"done": 3, "failed": 0, "pending": 0}

    # Simulate an interruption in the middle of lits-2: marked pending, a half-written temp file
    # and a stray slice left behind. The re-run redoes lits-2 and leaves no leftovers.
    manifest = load_manifest(out)
    manifest["sources"][0]["patients"]["lits-2"]["status"] = "pending"
    manifest["slices"] = [s for s in manifest["slices"] if s["patient"] != "lits-2"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    split = manifest["sources"][0]["patients"]["lits-2"]["split"]
    stray_dir = out / "train" / "good" if split == "train" else out / split / "good" / "img"
    (stray_dir / "lits-2_0999.png").write_bytes(b"partial")
    (stray_dir / ".lits-2_0003.png.0123456789ab.tmp").write_bytes(b"partial")
    assert run_prepare(*args) == 0
    third = load_manifest(out)
    assert third["slices"] == second["slices"]
    assert third["counts"] == second["counts"]
    assert pngs(out) == sorted([s["image"] for s in third["slices"]] + [s["mask"] for s in third["slices"] if s["mask"]])
    assert not list(out.rglob("*.tmp"))


def test_refuses_foreign_or_changed_out(tmp_path, capsys):
    src = tmp_path / "src"
    write_lits(src, [0, 1])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert run_prepare("lits", str(src), str(foreign)) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"], "nothing written into a foreign OUT"

    phantom_out = tmp_path / "phantom_out"
    phantom_out.mkdir()
    (phantom_out / "manifest.json").write_text(json.dumps({"generator": "medad_fast.phantom"}))
    assert run_prepare("lits", str(src), str(phantom_out)) == 2

    out = tmp_path / "out"
    assert run_prepare("lits", str(src), str(out)) == 0
    write_lits(src, [2])  # a new patient appeared: the split would change
    assert run_prepare("lits", str(src), str(out)) == 2
    assert "changed" in capsys.readouterr().err
    # Bad arguments and paths: exit code 2 with a message naming them.
    assert run_prepare("lits", str(tmp_path / "missing"), str(tmp_path / "o2")) == 2
    assert "missing" in capsys.readouterr().err
    assert run_prepare("lits", str(src), str(tmp_path / "o3"), "--val-fraction", "0.7", "--test-fraction", "0.5") == 2
    assert "--val-fraction + --test-fraction" in capsys.readouterr().err
    assert run_prepare("lits", str(src), str(tmp_path / "o4"), "--window", "100", "0") == 2
    assert run_prepare("lits", str(src), str(src / "out")) == 2
    assert not (src / "out").exists()
    empty = tmp_path / "empty_src"
    empty.mkdir()
    assert run_prepare("btcv", str(empty), str(tmp_path / "o5")) == 2
    assert "no btcv data" in capsys.readouterr().err


def test_workers_give_the_same_output(tmp_path):
    src = tmp_path / "src"
    write_lits(src, range(4))
    (src / "volume-3.nii.gz").write_bytes(b"\x1f\x8b broken")
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert run_prepare("lits", str(src), str(serial), "--test-fraction", "0.5") == 1
    assert run_prepare("lits", str(src), str(parallel), "--test-fraction", "0.5", "--workers", "2") == 1
    a, b = load_manifest(serial), load_manifest(parallel)
    assert a["slices"] == b["slices"] and a["counts"] == b["counts"]
    assert a["sources"][0]["patients"] == b["sources"][0]["patients"]
    for rel in pngs(serial):
        assert (serial / rel).read_bytes() == (parallel / rel).read_bytes()
    assert pngs(serial) == pngs(parallel)
