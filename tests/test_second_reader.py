"""The anomaly map of `medad-fast predict` read back by nibabel agrees with a second,
independent reader of the INPUT scan (SimpleITK / ITK, as MONAI and nnU-Net users read
their scans): same origin, direction and spacing, and the lesion at the same point in
patient space. SimpleITK is a test-only dependency (``make test`` installs it).

The method is the tiny ``ae`` with its map replaced by the image (:func:`ct_data.identity_maps`),
so the map peaks at the lesion wherever the geometry puts it."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ct_data import DicomGrid, identity_maps, liver_phantom, rotation, tiny_checkpoint, write_dicom_series, write_nifti
from medad_fast.cli import main as cli

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", image_size=32)


def itk_affine(image: sitk.Image) -> np.ndarray:
    """RAS affine of an ITK image (ITK works in LPS): voxel (x, y, z) -> mm."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.array(image.GetOrigin())
    return affine


def itk_peak_mm(image: sitk.Image) -> np.ndarray:
    """RAS position of the brightest voxel of ``image``, through ITK's own index -> point."""
    array = sitk.GetArrayFromImage(image)  # [z, y, x]
    z, y, x = np.unravel_index(np.argmax(array), array.shape)
    return LPS_TO_RAS @ np.array(image.TransformIndexToPhysicalPoint((int(x), int(y), int(z))))


def nib_peak_mm(image: nib.Nifti1Image) -> np.ndarray:
    data = np.asarray(image.dataobj)
    return nib.affines.apply_affine(image.affine, np.unravel_index(np.argmax(data), data.shape))


def check_against_itk(map_path: Path, itk_input: sitk.Image) -> None:
    """The output map (nibabel) and the input (ITK) share the grid; the lesion is within a voxel."""
    output = nib.load(str(map_path))
    assert output.shape == itk_input.GetSize()
    np.testing.assert_allclose(output.affine, itk_affine(itk_input), atol=1e-4)
    # the map's peak and the input's brightest voxel (the lesion) are the same point in space
    voxel_diagonal = float(np.linalg.norm(itk_input.GetSpacing()))
    assert np.linalg.norm(nib_peak_mm(output) - itk_peak_mm(itk_input)) <= voxel_diagonal


def predict(checkpoint, scan, mask, out) -> None:
    assert cli(["predict", str(checkpoint), str(scan), "--liver-mask", str(mask), "--out", str(out),
                "--no-progress", "--batch-size", "4"]) == 0


def test_nifti_oblique_anisotropic_flipped(checkpoint, tmp_path, monkeypatch):
    identity_maps(monkeypatch)
    shape, lesion = (40, 34, 12), (23, 14, 6)
    affine = np.eye(4)
    affine[:3, :3] = rotation(math.radians(12), math.radians(-20), math.radians(35)) @ np.diag([-0.8, 0.7, -2.5])
    affine[:3, 3] = (55.0, -30.0, 220.0)
    hu, liver = liver_phantom(shape, 2, lesion)
    scan = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    mask = write_nifti(tmp_path / "liver.nii.gz", liver, affine, dtype=np.uint8)
    predict(checkpoint, scan, mask, tmp_path / "out")
    check_against_itk(tmp_path / "out" / "ct_anomaly.nii.gz", sitk.ReadImage(str(scan)))


def test_dicom_series_shuffled_and_oblique(checkpoint, tmp_path, monkeypatch):
    identity_maps(monkeypatch)
    grid = DicomGrid(rotation(math.radians(-11), math.radians(16), math.radians(-25)), spacing=(0.9, 0.6), step=3.0)
    shape, lesion = (42, 36, 10), (17, 20, 4)  # [column, row, slice]
    hu, liver = liver_phantom(shape, 2, lesion)
    series = tmp_path / "SERIES"
    write_dicom_series(series, hu, grid, seed=3)
    write_dicom_series(tmp_path / "liver", liver, grid, modality="OT", label=True, seed=4)
    predict(checkpoint, series, tmp_path / "liver", tmp_path / "out")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))  # ITK orders the files by position
    check_against_itk(tmp_path / "out" / "SERIES_anomaly.nii.gz", reader.Execute())
