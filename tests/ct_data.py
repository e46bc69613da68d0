"""Synthetic CT volumes for the volume tests: NIfTI files with any affine, DICOM series written
with pydicom (oblique orientation, per-file rescale, shuffled random file names), a liver with a
bright lesion at a known voxel, and a tiny checkpoint whose map can be made the image itself."""

from __future__ import annotations

import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AIR, LIVER, LESION = -1000.0, 60.0, 240.0


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix (radians about x, then y, then z)."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def liver_phantom(shape, axial_axis: int, lesion, seed: int = 0, empty_slices: int = 2):
    """``(hu float32, liver bool)`` on a voxel grid of ``shape``: air, an ellipsoidal liver of
    ~60 HU (with integer noise) that leaves the first and last ``empty_slices`` axial slices
    empty, and a Gaussian bright lesion (peak 240 HU) centred at voxel ``lesion``."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    radius = [0.42 * n for n in shape]
    radius[axial_axis] = (shape[axial_axis] - 2 * empty_slices) / 2 - 0.01
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radius)) <= 1.0
    hu = np.full(shape, AIR, dtype=np.float32)
    hu[inside] = LIVER + rng.integers(-8, 9, size=int(inside.sum()))
    distance2 = sum((g - p) ** 2 for g, p in zip(grids, lesion))
    hu += np.rint((LESION - LIVER) * np.exp(-distance2 / (2 * 1.5 ** 2))).astype(np.float32) * inside
    assert inside[tuple(lesion)], "the lesion must be inside the liver"
    return hu, inside


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1,
                dtype=np.int16) -> Path:
    image = nib.Nifti1Image(data.astype(dtype), affine)
    image.set_qform(affine, code=qform_code)
    image.set_sform(affine, code=sform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def slice_dataset(series_uid: str, modality: str, rows: int, cols: int, ipp, iop, spacing, bits: int = 16) -> Dataset:
    """One single-frame slice header (no pixel data): CT image storage, explicit VR little
    endian, ``spacing`` = PixelSpacing (between rows, between columns), unsigned pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = "synthetic"
    ds.FrameOfReferenceUID = "1.2.3.4.5"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    return ds


class DicomGrid:
    """A DICOM slice grid: ``rot`` columns = row direction, column direction, slice normal
    (LPS); ``spacing`` = (between rows, between columns) mm; ``step`` mm between slices;
    ``origin`` = LPS position of voxel [0, 0, 0]. Values are rounded as they are written
    (DICOM DS strings), so :meth:`affine` is exactly what the files say."""

    def __init__(self, rot: np.ndarray, spacing=(0.8, 0.7), step: float = 2.5, origin=(-30.0, 20.0, -100.0)):
        self.row_cos, self.col_cos, self.normal = (np.round(rot[:, i], 6) for i in range(3))
        self.spacing = tuple(float(s) for s in spacing)
        self.step = float(step)
        self.origin = np.asarray(origin, dtype=np.float64)

    def ipp(self, k: int) -> np.ndarray:
        return np.round(self.origin + k * self.step * self.normal, 4)

    def affine(self, n_slices: int) -> np.ndarray:
        """RAS affine of the voxel array [column, row, slice] (NEMA PS3.3 C.7.6.2.1.1, then
        LPS -> RAS), computed from the written values."""
        lps = np.eye(4)
        lps[:3, 0] = self.row_cos * self.spacing[1]
        lps[:3, 1] = self.col_cos * self.spacing[0]
        lps[:3, 2] = (self.ipp(n_slices - 1) - self.ipp(0)) / (n_slices - 1)
        lps[:3, 3] = self.ipp(0)
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_dicom_series(folder: Path, voxels: np.ndarray, grid: DicomGrid, modality: str = "CT", label: bool = False,
                       seed: int = 0, series_uid: str | None = None, skip_ipp: bool = False) -> list[Path]:
    """Write ``voxels`` ([column, row, slice]; HU, or a 0/1 label with ``label``) as one file per
    slice under random names, in random order. CT slices alternate two RescaleSlope/Intercept
    pairs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cols, rows, n = voxels.shape
    series_uid = series_uid or generate_uid()
    iop = list(grid.row_cos) + list(grid.col_cos)
    written = []
    for k in rng.permutation(n):
        ds = slice_dataset(series_uid, modality, rows, cols, grid.ipp(k), iop, grid.spacing, 8 if label else 16)
        ds.InstanceNumber = int(rng.integers(1, 10_000))
        pixels = voxels[:, :, k].T  # [rows, cols]
        if label:
            ds.PixelData = pixels.astype(np.uint8).tobytes()
        else:
            slope, intercept = (0.5, -1000.0) if k % 2 else (1.0, -1024.0)
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            ds.PixelData = np.rint((pixels - intercept) / slope).astype("<u2").tobytes()
        if skip_ipp:
            del ds.ImagePositionPatient
        path = folder / uuid.UUID(bytes=rng.bytes(16)).hex
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def tiny_checkpoint(path: Path, image_size: int = 32, record: bool = True, **overrides) -> Path:
    """An untrained ``ae`` checkpoint at the ``tiny`` preset (what ``load_method`` reads),
    with the preprocessing record training would give it (``record=False``: none, as one
    saved before records existed); ``overrides``: config fields (e.g. ``data``)."""
    from medad_fast.checkpoint import checkpoint_bytes
    from medad_fast.methods import create_method, resolve_config
    from medad_fast.preprocessing import decide_preprocessing

    config = resolve_config("ae", "tiny", image_size=image_size, **overrides)
    if record:
        config = config.with_preprocessing(decide_preprocessing(config.run))
    method = create_method(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(checkpoint_bytes({"method": "ae", "config": config.to_dict(), "model": method.state_dict(),
                                       "method_state": {}}))
    return path


def identity_maps(monkeypatch) -> None:
    """Make the ``ae`` method's anomaly map the image itself (windowed intensity), so the
    brightest voxel of the output map is the lesion's peak wherever the geometry puts it."""
    from medad_fast.methods.ae import AutoencoderMethod

    monkeypatch.setattr(AutoencoderMethod, "anomaly_maps", lambda self, images: images[:, 0].float())
