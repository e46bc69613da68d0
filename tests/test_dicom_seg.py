"""DICOM SEG of a thresholded map: one frame per non-empty source slice, in the source's
study, referencing the series, each frame at its source slice's position and holding that
slice's mask pixels. highdicom is an optional runtime dependency (``make test`` installs it)."""

from __future__ import annotations

import math

import numpy as np
import pydicom
import pytest

from ct_data import DicomGrid, liver_phantom, rotation, write_dicom_series, write_nifti
from medad_fast.data.scan import VolumeError, read_geometry
from medad_fast.dicom_seg import write_dicom_seg


GRID = DicomGrid(rotation(math.radians(8), math.radians(-12), math.radians(21)), spacing=(0.9, 0.7), step=2.5)


@pytest.fixture
def series(tmp_path):
    hu, _ = liver_phantom((30, 26, 9), 2, (15, 12, 4))
    files = write_dicom_series(tmp_path / "CT", hu, GRID, seed=2)
    return tmp_path / "CT", files


def test_frames_sit_on_their_source_slices(series, tmp_path):
    folder, files = series
    geometry = read_geometry(folder, modality="CT")
    lesions = np.zeros(geometry.shape, dtype=bool)
    lesions[10:14, 5:9, 3] = True   # [column, row, slice]
    lesions[20:22, 15:20, 6] = True
    path = write_dicom_seg(tmp_path / "out" / "seg.dcm", geometry, lesions, threshold=0.25, method="ae",
                           software_version="test")
    seg = pydicom.dcmread(str(path))
    source = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID is not None
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "anomaly >= 0.25"
    # the slices in voxel order, found by position: frame i must be slice k's mask, rows x columns
    ipp_of_slice = [tuple(np.round(np.array(pydicom.dcmread(str(f), stop_before_pixels=True).ImagePositionPatient,
                                            float), 3)) for f in geometry.files]
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    found = []
    for i, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ipp = tuple(np.round(np.array(frame.PlanePositionSequence[0].ImagePositionPatient, float), 3))
        k = ipp_of_slice.index(ipp)
        assert np.array_equal(pixels[i].astype(bool), lesions[:, :, k].T), k
        found.append(k)
    assert sorted(found) == [3, 6]  # empty slices carry no frame


def test_a_nifti_scan_or_a_wrong_shape_is_refused(series, tmp_path):
    folder, _ = series
    geometry = read_geometry(folder, modality="CT")
    with pytest.raises(VolumeError, match="does not fit series"):
        write_dicom_seg(tmp_path / "a.dcm", geometry, np.zeros((2, 2, 2), bool), threshold=0.5, method="ae",
                        software_version="test")
    nifti = write_nifti(tmp_path / "ct.nii.gz", np.zeros((4, 4, 3)), np.eye(4))
    with pytest.raises(VolumeError, match="ct.nii.gz.*DICOM series"):
        write_dicom_seg(tmp_path / "b.dcm", read_geometry(nifti), np.zeros((4, 4, 3), bool), threshold=0.5,
                        method="ae", software_version="test")
    assert not (tmp_path / "a.dcm").exists() and not (tmp_path / "b.dcm").exists()


def test_predict_writes_the_lesion_mask_as_a_seg_of_the_series(series, tmp_path, capsys):
    import nibabel as nib

    from ct_data import tiny_checkpoint
    from medad_fast.cli import main as cli

    folder, files = series
    geometry = read_geometry(folder, modality="CT")
    hu, liver = liver_phantom(geometry.shape, 2, (15, 12, 4))
    write_dicom_series(tmp_path / "LIVER", liver, GRID, modality="OT", label=True, seed=5)
    checkpoint = tiny_checkpoint(tmp_path / "ckpt.pt")
    base = ["predict", str(checkpoint), str(folder), "--liver-mask", str(tmp_path / "LIVER"), "--no-progress"]
    assert cli([*base, "--out", str(tmp_path / "a"), "--dicom-seg"]) == 2  # no threshold, no operating point
    assert "--dicom-seg needs a pixel threshold" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()

    assert cli([*base, "--out", str(tmp_path / "b"), "--dicom-seg", "--threshold", "0.0"]) == 0
    lesions = np.asarray(nib.load(str(tmp_path / "b" / "CT_lesions.nii.gz")).dataobj).astype(bool)
    assert lesions.any() and np.array_equal(lesions, lesions & liver)
    seg = pydicom.dcmread(str(tmp_path / "b" / "CT_seg.dcm"))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(str(files[0])).SeriesInstanceUID
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns).astype(bool)
    assert int(frames.sum()) == int(lesions.sum())


def test_dicom_seg_of_a_nifti_scan_is_refused(tmp_path, capsys):
    from ct_data import tiny_checkpoint
    from medad_fast.cli import main as cli

    hu, liver = liver_phantom((20, 20, 6), 2, (10, 10, 3))
    scan = write_nifti(tmp_path / "ct.nii.gz", hu, np.eye(4))
    mask = write_nifti(tmp_path / "liver.nii.gz", liver, np.eye(4), dtype=np.uint8)
    assert cli(["predict", str(tiny_checkpoint(tmp_path / "ckpt.pt")), str(scan), "--liver-mask", str(mask),
                "--out", str(tmp_path / "out"), "--dicom-seg", "--threshold", "0.5", "--no-progress"]) == 2
    assert "none of the scans is a DICOM series" in capsys.readouterr().err
