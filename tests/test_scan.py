"""Reading volumes (medad_fast.data.scan): NIfTI and DICOM geometry, display orientation,
liver masks on the scan's grid, and the slices predict scores equal the ones prepare writes."""

from __future__ import annotations

import itertools
import math

import nibabel as nib
import numpy as np
import pytest

from ct_data import DicomGrid, liver_phantom, rotation, write_dicom_series, write_nifti
from medad_fast.data import scan as scanmod
from medad_fast.data.scan import (GridMatch, VolumeError, axial_axis, display_slice, from_display, nifti_like,
                                  open_liver_mask, put_display_slice, read_geometry, read_volume,
                                  to_display)


def signed_permutation_affine(axes, signs, spacing=(0.7, 0.9, 2.5)) -> np.ndarray:
    """Affine whose voxel axis i runs along world axis ``axes[i]`` in direction ``signs[i]``."""
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i, (w, s) in enumerate(zip(axes, signs)):
        affine[w, i] = s * spacing[i]
    affine[:3, 3] = (12.0, -7.0, 30.0)
    return affine


@pytest.mark.parametrize("axes", list(itertools.permutations(range(3))))
def test_display_round_trip_and_axial_axis_for_every_axis_order(axes):
    voxels = np.random.default_rng(0).random((5, 6, 7))
    for signs in itertools.product((1, -1), repeat=3):
        affine = signed_permutation_affine(axes, signs)
        ornt = scanmod.orientation(affine, "test")
        assert axial_axis(affine) == axes.index(2)
        assert np.array_equal(from_display(to_display(voxels, ornt), ornt), voxels)
        target = np.zeros_like(voxels)
        for k in range(voxels.shape[axial_axis(affine)]):
            put_display_slice(target, ornt, k, display_slice(voxels, ornt, k))
        assert np.array_equal(target, voxels)


def test_axial_axis_of_an_oblique_affine_is_the_one_closest_to_superior():
    # voxel axis 0 runs 20 degrees off the superior axis, axis 2 is nearly left-right
    tilt = rotation(math.radians(20), 0, 0)
    affine = np.eye(4)
    affine[:3, :3] = tilt @ np.array([[0, 0, 0.8], [0, 0.9, 0], [3.0, 0, 0]])
    assert axial_axis(affine) == 0


def test_dicom_series_in_shuffled_files_reads_hu_and_geometry(tmp_path):
    grid = DicomGrid(rotation(math.radians(12), math.radians(-8), math.radians(25)))
    hu, _ = liver_phantom((20, 18, 9), 2, (9, 8, 4))
    write_dicom_series(tmp_path / "ct", hu, grid)
    volume = read_volume(tmp_path / "ct")
    assert volume.format == "dicom" and volume.shape == hu.shape and volume.voxels.dtype == np.float32
    assert np.array_equal(volume.voxels, hu)  # slope/intercept applied per file, slices in order
    assert np.allclose(volume.affine, grid.affine(hu.shape[2]), atol=1e-9)
    assert volume.axial_axis == 2 and volume.sform_code == 1
    # slice centres: z from the affine
    centre = np.array([(hu.shape[0] - 1) / 2, (hu.shape[1] - 1) / 2, 4, 1])
    assert volume.slice_z_mm([4])[0] == pytest.approx((grid.affine(9) @ centre)[2])


def test_nifti_geometry_keeps_qform_sform_and_codes(tmp_path):
    affine = signed_permutation_affine((2, 0, 1), (-1, 1, -1))
    affine[:3, :3] = rotation(0.1, 0.2, -0.3) @ affine[:3, :3]
    image = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    image.set_qform(affine, code=1)
    other = affine.copy()
    other[:3, 3] += 5.0
    image.set_sform(other, code=4)
    nib.save(image, str(tmp_path / "v.nii.gz"))
    geometry = read_geometry(tmp_path / "v.nii.gz")
    assert (geometry.qform_code, geometry.sform_code) == (1, 4)
    assert np.allclose(geometry.affine, other, atol=1e-5)  # nibabel: the sform wins
    written = nifti_like(geometry, np.zeros((4, 5, 6), np.float32))
    nib.save(written, str(tmp_path / "out.nii.gz"))
    back = nib.load(str(tmp_path / "out.nii.gz"))
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 4
    assert np.allclose(back.header.get_qform(), image.header.get_qform(), atol=1e-6)
    assert np.allclose(back.header.get_sform(), image.header.get_sform(), atol=1e-6)
    assert np.array_equal(back.affine, nib.load(str(tmp_path / "v.nii.gz")).affine)


def test_mask_on_the_same_grid_in_another_voxel_order_is_reordered(tmp_path):
    affine = signed_permutation_affine((0, 1, 2), (-1, -1, 1))
    hu, liver = liver_phantom((10, 12, 8), 2, (5, 6, 4))
    write_nifti(tmp_path / "scan.nii.gz", hu, affine)
    # the same grid stored as [slice, row, col] with the first axis reversed
    axes = (2, 1, 0)
    stored = np.flip(liver.transpose(axes), 0)
    mask_affine = affine[:, list(axes) + [3]].copy()
    mask_affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (liver.shape[2] - 1)
    mask_affine[:3, 0] *= -1
    write_nifti(tmp_path / "mask.nii.gz", stored, mask_affine, dtype=np.uint8)
    scan = read_geometry(tmp_path / "scan.nii.gz")
    source = open_liver_mask(tmp_path / "mask.nii.gz", scan)
    assert source.match != GridMatch()
    assert np.array_equal(source.read(), liver)


@pytest.mark.parametrize("change", ["shift", "spacing", "shape"])
def test_mask_off_the_scan_grid_names_both_files(tmp_path, change):
    affine = signed_permutation_affine((0, 1, 2), (1, 1, 1))
    hu, liver = liver_phantom((10, 12, 8), 2, (5, 6, 4))
    write_nifti(tmp_path / "scan.nii.gz", hu, affine)
    mask_affine, mask = affine.copy(), liver
    if change == "shift":
        mask_affine[:3, 3] += (0.0, 0.0, 1.25)  # half a slice
    elif change == "spacing":
        mask_affine[0, 0] *= 1.1
    else:
        mask = liver[:, :, :-1]
    write_nifti(tmp_path / "mask.nii.gz", mask, mask_affine, dtype=np.uint8)
    with pytest.raises(VolumeError) as error:
        open_liver_mask(tmp_path / "mask.nii.gz", read_geometry(tmp_path / "scan.nii.gz"))
    assert "mask.nii.gz" in str(error.value) and "scan.nii.gz" in str(error.value)


def test_dicom_mask_without_positions_is_matched_by_file_name(tmp_path):
    grid = DicomGrid(rotation(0, 0, 0))
    hu, liver = liver_phantom((14, 12, 7), 2, (7, 6, 3))
    files = write_dicom_series(tmp_path / "ct", hu, grid)
    masks = write_dicom_series(tmp_path / "liver", liver, grid, modality="OT", label=True, skip_ipp=True)
    for mask_file, ct_file in zip(masks, files):  # same slice -> same name, as 3D-IRCADb does
        mask_file.rename(mask_file.with_name(ct_file.name))
    scan = read_geometry(tmp_path / "ct", modality="CT")
    assert np.array_equal(open_liver_mask(tmp_path / "liver", scan).read(), liver)


def test_truncated_nifti_names_the_file(tmp_path):
    hu, _ = liver_phantom((16, 16, 12), 2, (8, 8, 6))
    path = write_nifti(tmp_path / "scan.nii.gz", hu, np.eye(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="scan.nii.gz"):
        read_volume(path)
