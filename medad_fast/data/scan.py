"""Reading CT scans and their label volumes: NIfTI files (nibabel) and DICOM series (pydicom).

Used by ``medad-fast prepare`` (:mod:`medad_fast.data.volumes`, which writes BMAD slices) and
by ``medad-fast predict`` on volumes (:mod:`medad_fast.volume_inference`), so both read a scan
the same way and see the same slices.

Geometry (:class:`Geometry`, read from the headers only: :func:`read_geometry`)

- **NIfTI**: the voxel array in the file's own order, and nibabel's affine (voxel index ->
  RAS+ millimetres: the sform when its code is set, else the qform, else the zooms), plus
  both header matrices and their codes, so an output written with :func:`nifti_like` carries
  the input's geometry exactly.
- **DICOM series** (one folder, one file per slice, any file names): slices are ordered by
  ImagePositionPatient projected on the slice normal (row cosine x column cosine of
  ImageOrientationPatient), RescaleSlope/Intercept is applied per file (Hounsfield units),
  PixelSpacing gives the in-plane spacing and the first-to-last position the slice step. The
  voxel array is ``[column, row, slice]`` with the affine converted from DICOM's LPS to RAS
  (the convention of nibabel and dcm2niix, NEMA PS3.3 C.7.6.2.1.1). A folder holding several
  series, several orientations or sizes, two slices at one position or a missing slice (a gap
  larger than ``MISSING_SLICE_GAP_FACTOR`` x the median step) is refused, naming it.

The **axial axis** is the voxel axis closest to the patient's superior-inferior axis
(``nibabel.orientations.io_orientation``); it need not be the last one.

Display orientation (:func:`to_display` / :func:`from_display`): a stack ``[slice, row, col]``
of axial slices as a radiologist reads them: anterior at the top, the patient's right on the
image's left, slice 0 the most inferior. Every slice that ``prepare`` writes and ``predict``
scores is in this orientation, whatever the voxel order of the file.

Intensities (:func:`apply_window`, :func:`liver_image`): an HU window ``[lo, hi]`` (default
[-200, 250]) mapped linearly onto 0..255; outside the liver exactly 0, inside at least 1 (the
method's liver localisation is ``image > 0``); optional histogram equalisation of the liver
pixels (BMAD's preprocessing: Bao et al., "BMAD: Benchmarks for Medical Anomaly Detection",
arXiv:2306.11876).

Values that cannot be scored (:func:`check_scan_values`, :func:`require_liver`, run by
``predict`` and ``evaluate`` on every scan before it is scored): NaN or infinite voxels (an
all-NaN scan included) and scans not in Hounsfield units (no voxel below ``HU_AIR_CEILING``
= -100, where every CT holds air at about -1000 HU: an 8-bit image, raw stored values) are
refused, naming the file and what was seen; ``allow_nonfinite`` (``--allow-nonfinite``)
scores the non-finite voxels as air (-1000 HU) and ``allow_non_hu`` (``--allow-non-hu``)
scores the values as they are, each with a named warning (:class:`NonFiniteVoxelsWarning`,
:class:`NotHounsfieldWarning`). A scan without a finite voxel inside its liver is refused
either way. Liver masks holding NaN or infinite values (:meth:`LiverMaskSource.read`) and
empty liver masks are refused.

Every problem with a file raises :class:`VolumeError` (a ``ValueError``) naming it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "DEFAULT_WINDOW",
    "HU_AIR_CEILING",
    "NONFINITE_FILL_HU",
    "VolumeError",
    "NonFiniteVoxelsWarning",
    "NotHounsfieldWarning",
    "check_scan_values",
    "require_liver",
    "Geometry",
    "Volume",
    "DicomSeries",
    "GridMatch",
    "LiverMaskSource",
    "is_nifti_path",
    "is_dicom_folder",
    "scan_name",
    "read_geometry",
    "read_volume",
    "open_liver_mask",
    "match_grid",
    "orientation",
    "axial_axis",
    "to_display",
    "from_display",
    "display_slice",
    "put_display_slice",
    "load_nifti",
    "read_nifti_block",
    "read_dicom_series",
    "read_dicom_pixels",
    "match_mask_files",
    "nifti_like",
    "apply_window",
    "liver_image",
    "equalize_liver_histogram",
]

DEFAULT_WINDOW = (-200.0, 250.0)
# NIfTI voxels are read in chunks of this many slices (bounded memory: nibabel may hand out
# float64 for scaled data, which must never exist for the whole volume).
LABEL_CHUNK_SLICES = 64
# A gap between consecutive DICOM slices larger than this multiple of the median spacing
# means at least one slice is missing.
MISSING_SLICE_GAP_FACTOR = 1.5
# Files in a DICOM folder that are never slices.
DICOM_IGNORED_NAMES = {"dicomdir", "thumbs.db", "desktop.ini"}
DICOM_IGNORED_SUFFIXES = {".txt", ".md", ".json", ".xml", ".csv", ".zip", ".png", ".jpg", ".jpeg"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A mask lies on a scan's grid when every corner voxel centre maps to within this many voxels.
GRID_TOLERANCE_VOXELS = 0.1
# A CT scan in Hounsfield units holds voxels below this value (air is about -1000 HU, and
# every scan holds some air around or inside the body); a scan without any is in other units.
HU_AIR_CEILING = -100.0
# What ``allow_nonfinite`` scores a NaN or infinite voxel as: air.
NONFINITE_FILL_HU = -1000.0


class VolumeError(ValueError):
    """A volume, DICOM series or mask that cannot be read or used; the message names the file."""


class NonFiniteVoxelsWarning(UserWarning):
    """A scan's NaN or infinite voxels were scored as air (``--allow-nonfinite``)."""


class NotHounsfieldWarning(UserWarning):
    """A scan that does not look like Hounsfield units was scored as it is (``--allow-non-hu``)."""


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class DicomSeries:
    """A DICOM series sorted along its slice normal (ascending).

    ``files``: [n] paths; ``positions``: float64 [n] mm along ``normal`` (unit vector, LPS);
    ``affine``: RAS voxel-to-world of the voxel array ``[col, row, slice]``; ``shape``: (rows, cols).
    Pixel data is not read here (see :func:`read_dicom_pixels`).
    """

    folder: Path
    files: list[Path]
    positions: np.ndarray
    normal: np.ndarray
    affine: np.ndarray
    shape: tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """Where a volume's voxels are, from its headers alone.

    ``path``: the NIfTI file or the DICOM folder; ``files``: the files read (DICOM: the slices
    in voxel order); ``format``: ``"nifti"`` or ``"dicom"``; ``shape``: the voxel array's;
    ``affine``: float64 [4, 4] voxel index -> RAS+ mm; ``qform``/``sform`` and their codes:
    the NIfTI header's (a DICOM series gets its affine in both, sform code 1 "scanner", qform
    code 1 unless the affine is sheared); ``zooms``: voxel sizes (mm); ``series``: the sorted
    :class:`DicomSeries` of a DICOM input.
    """

    path: Path
    files: tuple[Path, ...]
    format: str
    shape: tuple[int, int, int]
    affine: np.ndarray
    qform: np.ndarray
    qform_code: int
    sform: np.ndarray
    sform_code: int
    zooms: tuple[float, float, float]
    series: DicomSeries | None = None

    @property
    def name(self) -> str:
        """The file name without ``.nii``/``.nii.gz``, or the DICOM folder's name."""
        return scan_name(self.path)

    @property
    def orientation(self) -> np.ndarray:
        """nibabel orientation: for each voxel axis, the closest RAS+ axis and its direction."""
        return orientation(self.affine, str(self.path))

    @property
    def axial_axis(self) -> int:
        """The voxel axis closest to the superior-inferior axis."""
        return axial_axis(self.affine, str(self.path))

    def slice_z_mm(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Superior coordinate (RAS z, mm) of the centre of each axial slice ``indices``
        (voxel indices along :attr:`axial_axis`)."""
        indices = np.asarray(indices, dtype=np.float64)
        centre = (np.asarray(self.shape, dtype=np.float64) - 1) / 2
        points = np.tile(np.append(centre, 1.0), (indices.size, 1))
        points[:, self.axial_axis] = indices
        return (points @ self.affine.T)[:, 2]


@dataclass(frozen=True, kw_only=True)
class Volume(Geometry):
    """A volume with its voxels: float32 Hounsfield units for a scan (:func:`read_volume`),
    bool "inside" for a mask (:meth:`LiverMaskSource.read`), in the file's voxel order."""

    voxels: np.ndarray


# --------------------------------------------------------------------------- inputs


def is_nifti_path(path: str | Path) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` name (case-insensitive)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The candidate slice files of a DICOM folder (sorted; hidden files, DICOMDIR and
    obvious non-DICOM suffixes left out). ``VolumeError`` for a missing or empty folder."""
    if not folder.is_dir():
        raise VolumeError(f"{folder}: DICOM folder not found")
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name.lower() not in DICOM_IGNORED_NAMES
             and p.suffix.lower() not in DICOM_IGNORED_SUFFIXES]
    if not files:
        raise VolumeError(f"{folder}: no DICOM files")
    return files


def is_dicom_folder(path: str | Path) -> bool:
    """True for a folder that directly holds a DICOM file (``.dcm``, or the ``DICM`` marker of
    Part 10 files) and no image file (PNG/JPEG... as listed by the BMAD layout)."""
    from .layout import IMAGE_SUFFIXES

    folder = Path(path)
    if not folder.is_dir():
        return False
    children = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(p.suffix.lower() in IMAGE_SUFFIXES for p in children):
        return False
    return any(p.suffix.lower() == ".dcm" or _has_dicom_preamble(p) for p in children)


def scan_name(path: str | Path) -> str:
    """``volume-3.nii.gz`` -> ``volume-3``; a DICOM folder -> its name."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------- orientation


def orientation(affine: np.ndarray, where: str) -> np.ndarray:
    """``nibabel`` orientation (array axes -> closest RAS+ axes) of a voxel-to-world affine."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{where}: the voxel-to-world affine is missing or degenerate, cannot orient the volume")
    return nib.orientations.io_orientation(affine)


def axial_axis(affine: np.ndarray, where: str = "volume") -> int:
    """The voxel axis of ``affine`` closest to the superior-inferior (RAS z) axis."""
    return int(np.flatnonzero(orientation(affine, where)[:, 0] == 2)[0])


def to_display(array_ijk: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """[I, J, K] voxel array -> [slice, row, col] display stack (see the module docstring).

    After ``apply_orientation`` the axes point to patient Right, Anterior, Superior; rows must
    run anterior -> posterior and columns right -> left, so both in-plane axes are flipped,
    and ``[R, A, S] -> [S, A, R]``.
    """
    import nibabel as nib

    canonical = nib.orientations.apply_orientation(array_ijk, ornt)
    return np.ascontiguousarray(np.flip(canonical, (0, 1)).transpose(2, 1, 0))


def from_display(display: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_display`: a [slice, row, col] stack back to the voxel order of
    ``ornt`` (a view where possible)."""
    import nibabel as nib

    canonical = np.flip(np.asarray(display).transpose(2, 1, 0), (0, 1))
    ras = nib.orientations.axcodes2ornt("RAS")
    return nib.orientations.apply_orientation(canonical, nib.orientations.ornt_transform(ras, ornt))


def _one_slice_index(axis: int, index: int) -> tuple[slice, ...]:
    where = [slice(None)] * 3
    where[axis] = slice(index, index + 1)
    return tuple(where)


def display_slice(voxels: np.ndarray, ornt: np.ndarray, index: int) -> np.ndarray:
    """Axial slice ``index`` (voxel index along the axial axis of ``ornt``) of ``voxels`` as a
    [row, col] display image (a copy)."""
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    return to_display(voxels[_one_slice_index(axis, index)], ornt)[0]


def put_display_slice(target: np.ndarray, ornt: np.ndarray, index: int, image: np.ndarray) -> None:
    """Write the [row, col] display image ``image`` into axial slice ``index`` of ``target``
    (inverse of :func:`display_slice`)."""
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    target[_one_slice_index(axis, index)] = from_display(np.asarray(image)[None], ornt)


# --------------------------------------------------------------------------- NIfTI


def load_nifti(path: Path):
    """``(nibabel image, 3-D shape)`` of a NIfTI file, header only (a trailing axis of size 1
    is dropped). ``VolumeError`` naming the file when it is unreadable or not 3-D."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise VolumeError(f"{path}: file not found") from None
    except Exception as e:  # nibabel raises many types for broken files
        raise VolumeError(f"{path}: cannot read NIfTI header ({type(e).__name__}: {e})") from e
    shape = tuple(int(s) for s in image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # [X, Y, Z, 1] -> [X, Y, Z]
        shape = shape[:-1]
    if len(shape) != 3:
        raise VolumeError(f"{path}: expected a 3-D volume, got shape {tuple(image.shape)}")
    return image, shape


def read_nifti_block(image, path: Path, axis: int, lo: int, hi: int,
                     convert: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``convert(data)`` of ``image[..., lo:hi, ...]`` (``axis`` sliced), read in chunks so the
    float64 that nibabel may return never exists for the whole volume; the result is
    allocated once and filled."""
    extra = (0,) * (len(image.shape) - 3)
    out = None
    try:
        for start in range(lo, hi, LABEL_CHUNK_SLICES):
            stop = min(start + LABEL_CHUNK_SLICES, hi)
            index = [slice(None)] * 3
            index[axis] = slice(start, stop)
            chunk = convert(np.asarray(image.dataobj[tuple(index) + extra]))
            if out is None:
                shape = list(chunk.shape)
                shape[axis] = hi - lo
                out = np.empty(shape, dtype=chunk.dtype)
            index[axis] = slice(start - lo, stop - lo)
            out[tuple(index)] = chunk
    except VolumeError:
        raise
    except Exception as e:  # truncated / corrupt data: zlib.error, EOFError, OSError, ValueError...
        raise VolumeError(f"{path}: cannot read the voxel data ({type(e).__name__}: {e})") from e
    if out is None:  # an empty range
        shape = list(image.shape[:3])
        shape[axis] = 0
        out = convert(np.zeros(shape, dtype=np.float32))
    return out


def _nifti_geometry(path: Path) -> tuple[Geometry, object]:
    image, shape = load_nifti(path)
    header = image.header
    try:
        qform, qform_code = header.get_qform(coded=True)
        sform, sform_code = header.get_sform(coded=True)
        qform_matrix = header.get_qform()
        sform_matrix = header.get_sform()
    except AttributeError:  # Analyze and other headers without qform/sform
        qform_matrix = sform_matrix = np.asarray(image.affine, dtype=np.float64)
        qform_code = sform_code = 0
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    geometry = Geometry(path=path, files=(path,), format="nifti", shape=shape,
                        affine=np.asarray(image.affine, dtype=np.float64),
                        qform=np.asarray(qform_matrix, dtype=np.float64), qform_code=int(qform_code or 0),
                        sform=np.asarray(sform_matrix, dtype=np.float64), sform_code=int(sform_code or 0),
                        zooms=zooms)
    orientation(geometry.affine, str(path))  # refuse a degenerate affine now
    return geometry, image


def nifti_like(geometry: Geometry, data: np.ndarray):
    """A ``nibabel.Nifti1Image`` of ``data`` (the shape of ``geometry``) with ``geometry``'s
    affine, qform, sform, their codes and zooms: an output on the input's grid."""
    import nibabel as nib

    if tuple(data.shape) != tuple(geometry.shape):
        raise ValueError(f"data of shape {tuple(data.shape)} does not fit the grid {geometry.shape} of {geometry.path}")
    image = nib.Nifti1Image(data, None)
    image.header.set_zooms(geometry.zooms)
    image.set_sform(geometry.sform, code=geometry.sform_code)
    image.set_qform(geometry.qform, code=geometry.qform_code)
    image.header.set_xyzt_units("mm")
    if geometry.sform_code == 0 and geometry.qform_code == 0:  # nibabel's fallback: the zooms
        image.header.set_zooms(geometry.zooms)
    return image


# --------------------------------------------------------------------------- DICOM


def read_dicom_header(path: Path):
    """The header of one DICOM file (no pixel data); ``VolumeError`` naming it."""
    import pydicom

    try:
        dataset = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception as e:
        raise VolumeError(f"{path}: cannot read DICOM ({type(e).__name__}: {e})") from e
    return dataset


def _float_list(dataset, keyword: str, count: int, path: Path) -> np.ndarray | None:
    value = dataset.get(keyword)
    if value is None:
        return None
    try:
        array = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise VolumeError(f"{path}: invalid {keyword} {value!r}") from e
    if array.shape != (count,) or not np.isfinite(array).all():
        raise VolumeError(f"{path}: invalid {keyword} {value!r}")
    return array


def read_dicom_series(folder: str | Path, modality: str | None = None) -> DicomSeries:
    """Read the headers of the series in ``folder``, sort and check it.

    Slices are sorted by ImagePositionPatient projected on the normal (row x column cosine).
    Raises ``VolumeError`` naming the folder or file: unreadable file, not an image, several
    series or orientations or sizes mixed, duplicate positions, missing slices (a gap larger
    than ``MISSING_SLICE_GAP_FACTOR`` x the median spacing), multi-frame files, and, with
    ``modality`` (e.g. ``"CT"``), a file whose Modality is another one (a file without
    Modality is accepted).
    """
    folder = Path(folder)
    files = dicom_files(folder)
    positions, series_uids, sizes = [], set(), set()
    orientation_cosines = spacing = None
    for path in files:
        ds = read_dicom_header(path)
        if "Rows" not in ds or "Columns" not in ds:
            raise VolumeError(f"{path}: not a DICOM image (no Rows/Columns)")
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise VolumeError(f"{path}: multi-frame DICOM is not supported (expected one file per slice)")
        found_modality = str(ds.get("Modality", "") or "").strip()
        if modality is not None and found_modality and found_modality.upper() != modality.upper():
            raise VolumeError(f"{path}: Modality {found_modality!r}, expected {modality!r} "
                              f"(the method scores {modality} scans)")
        ipp = _float_list(ds, "ImagePositionPatient", 3, path)
        iop = _float_list(ds, "ImageOrientationPatient", 6, path)
        if ipp is None or iop is None:
            raise VolumeError(f"{path}: no ImagePositionPatient/ImageOrientationPatient, cannot place the slice")
        if orientation_cosines is None:
            orientation_cosines = iop
            ps = _float_list(ds, "PixelSpacing", 2, path)
            spacing = ps if ps is not None else np.ones(2)
        elif np.abs(iop - orientation_cosines).max() > 1e-3:
            raise VolumeError(f"{path}: ImageOrientationPatient {iop.tolist()} differs from the rest of the "
                              f"series in {folder}")
        series_uids.add(str(ds.get("SeriesInstanceUID", "")))
        sizes.add((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))))
        positions.append(ipp)
    if len(series_uids) > 1:
        raise VolumeError(f"{folder}: holds {len(series_uids)} different series (SeriesInstanceUID); "
                          "put each series in its own folder")
    if len(sizes) > 1:
        raise VolumeError(f"{folder}: slices of different sizes {sorted(sizes)}")
    row_cosine, col_cosine = orientation_cosines[:3], orientation_cosines[3:]
    normal = np.cross(row_cosine, col_cosine)
    if np.linalg.norm(normal) < 1e-3:
        raise VolumeError(f"{folder}: degenerate ImageOrientationPatient {orientation_cosines.tolist()}")
    normal /= np.linalg.norm(normal)
    ipps = np.stack(positions)
    along = ipps @ normal
    order = np.argsort(along, kind="stable")
    files = [files[i] for i in order]
    along, ipps = along[order], ipps[order]

    if len(files) > 1:
        steps = np.diff(along)
        spacing_z = float(np.median(steps))
        duplicate = np.flatnonzero(steps < max(1e-3, 0.01 * spacing_z))
        if duplicate.size:
            i = int(duplicate[0])
            raise VolumeError(f"{folder}: two slices at the same position {along[i]:.3f} mm: "
                              f"{files[i].name} and {files[i + 1].name}")
        gaps = np.flatnonzero(steps > MISSING_SLICE_GAP_FACTOR * spacing_z)
        if gaps.size:
            i = int(gaps[0])
            n_missing = int(round(steps[i] / spacing_z)) - 1
            raise VolumeError(f"{folder}: missing slice(s): a gap of {steps[i]:.2f} mm between {files[i].name} and "
                              f"{files[i + 1].name} where the series spacing is {spacing_z:.2f} mm "
                              f"(about {n_missing} slice(s) missing, {gaps.size} gap(s) in all)")
        slice_step = (ipps[-1] - ipps[0]) / (len(files) - 1)
    else:
        slice_step = normal * 1.0

    # Voxel [col i, row j, slice k] -> LPS mm; PixelSpacing = (between rows, between columns).
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * spacing[1]
    lps[:3, 1] = col_cosine * spacing[0]
    lps[:3, 2] = slice_step
    lps[:3, 3] = ipps[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS
    (rows, cols), = sizes
    return DicomSeries(folder, files, along, normal, affine, (rows, cols))


def read_dicom_pixels(path: Path, shape: tuple[int, int], rescale: bool) -> np.ndarray:
    """Pixel data of one slice, float32 [rows, cols]; ``rescale`` applies slope/intercept (HU)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)
        pixels = ds.pixel_array
    except Exception as e:  # compressed without a decoder, truncated, ...
        raise VolumeError(f"{path}: cannot decode the pixel data ({type(e).__name__}: {e})") from e
    if pixels.shape != shape:
        raise VolumeError(f"{path}: pixel data has shape {pixels.shape}, expected {shape}")
    pixels = pixels.astype(np.float32)
    if rescale:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        pixels = pixels * np.float32(slope) + np.float32(intercept)
    return pixels


def match_mask_files(folder: Path, ct: DicomSeries) -> list[Path]:
    """The files of a mask series in ``folder``, one per slice of ``ct`` in ``ct``'s order.

    Slices are matched to the CT by position along the CT normal; masks without
    ImagePositionPatient are matched by file name (3D-IRCADb names both ``image_N``).
    ``VolumeError`` naming both folders (or files) when they do not match."""
    files = dicom_files(folder)
    normal_positions = {}
    by_name = {p.name: p for p in files}
    headers_have_ipp = True
    for path in files:
        ds = read_dicom_header(path)
        ipp = _float_list(ds, "ImagePositionPatient", 3, path)
        if ipp is None:
            headers_have_ipp = False
            break
        normal_positions[path] = float(ipp @ ct.normal)
    if len(files) != len(ct.files):
        raise VolumeError(f"{folder}: {len(files)} mask slices but the CT series {ct.folder} has {len(ct.files)}")
    if headers_have_ipp:
        mask_files = sorted(files, key=lambda p: normal_positions[p])
        mask_positions = np.array([normal_positions[p] for p in mask_files])
        spacing = float(np.median(np.diff(ct.positions))) if len(ct.files) > 1 else 1.0
        mismatch = np.flatnonzero(np.abs(mask_positions - ct.positions) > max(1e-2, 0.1 * abs(spacing)))
        if mismatch.size:
            i = int(mismatch[0])
            raise VolumeError(f"{folder}: mask slice {mask_files[i].name} at {mask_positions[i]:.2f} mm does not "
                              f"match CT slice {ct.files[i].name} at {ct.positions[i]:.2f} mm")
        return mask_files
    missing = [p.name for p in ct.files if p.name not in by_name]
    if missing:
        raise VolumeError(f"{folder}: masks have no ImagePositionPatient and their file names do not match "
                          f"the CT files of {ct.folder} (e.g. no {missing[0]})")
    return [by_name[p.name] for p in ct.files]


def _dicom_geometry(series: DicomSeries) -> Geometry:
    affine = series.affine
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    directions = affine[:3, :3] / np.asarray(zooms)
    orthogonal = np.abs(directions.T @ directions - np.eye(3)).max() < 1e-4
    rows, cols = series.shape
    return Geometry(path=series.folder, files=tuple(series.files), format="dicom",
                    shape=(cols, rows, len(series.files)), affine=affine, qform=affine, qform_code=1 if orthogonal else 0, sform=affine, sform_code=1,
                    zooms=zooms, series=series)


def _read_dicom_voxels(series: DicomSeries, rescale: bool, convert=None) -> np.ndarray:
    """The series' voxels ``[col, row, slice]`` (a transposed view of one ``[slice, row, col]``
    array, filled file by file)."""
    out = None
    for k, path in enumerate(series.files):
        pixels = read_dicom_pixels(path, series.shape, rescale)
        if convert is not None:
            pixels = convert(pixels)
        if out is None:
            out = np.empty((len(series.files), *series.shape), dtype=pixels.dtype)
        out[k] = pixels
    return out.transpose(2, 1, 0)


# --------------------------------------------------------------------------- volumes


def read_geometry(path: str | Path, modality: str | None = None) -> Geometry:
    """The :class:`Geometry` of a NIfTI file or a DICOM series folder (headers only).
    ``modality`` is checked for DICOM (see :func:`read_dicom_series`)."""
    path = Path(path)
    if is_nifti_path(path):
        return _nifti_geometry(path)[0]
    if path.is_dir():
        return _dicom_geometry(read_dicom_series(path, modality))
    if not path.exists():
        raise VolumeError(f"{path}: not found")
    raise VolumeError(f"{path}: not a NIfTI file (.nii, .nii.gz) nor a DICOM series folder")


def read_volume(source: str | Path | Geometry, modality: str | None = "CT") -> Volume:
    """A scan with its voxels as float32 Hounsfield units (DICOM: rescale slope/intercept
    applied; NIfTI: the header's scaling), in the file's voxel order."""
    geometry = source if isinstance(source, Geometry) else read_geometry(source, modality)
    if geometry.format == "nifti":
        image, shape = load_nifti(geometry.path)
        voxels = read_nifti_block(image, geometry.path, 2, 0, shape[2], lambda a: a.astype(np.float32, copy=False))
    else:
        voxels = _read_dicom_voxels(geometry.series, rescale=True)
    return Volume(**_fields(geometry), voxels=voxels)


def _fields(geometry: Geometry) -> dict:
    return {name: getattr(geometry, name) for name in Geometry.__dataclass_fields__}


def _inside(values: Sequence[float] | None, path: Path | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Label values -> bool "inside": any nonzero value, or one of ``values`` (float labels
    rounded). NaN or infinite labels raise ``VolumeError`` naming ``path`` (``NaN != 0``
    would make every such voxel inside)."""
    def convert(labels: np.ndarray) -> np.ndarray:
        if np.issubdtype(labels.dtype, np.floating):
            n_bad = labels.size - int(np.count_nonzero(np.isfinite(labels)))
            if n_bad:
                raise VolumeError(f"mask {path} holds NaN or infinite values (at least {n_bad} voxels): a "
                                  "mask's voxels must be label numbers")
        if values is None:
            return labels != 0
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels)
        return np.isin(labels, np.asarray(values))
    return convert


@dataclass(frozen=True)
class GridMatch:
    """How a mask's voxel array maps onto a scan's when both lie on the same grid: scan axis
    ``i`` is mask axis ``axes[i]``, reversed when ``flips[i]``."""

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    def apply(self, mask: np.ndarray) -> np.ndarray:
        """The mask's voxels in the scan's voxel order (a view)."""
        out = mask.transpose(self.axes)
        flipped = tuple(i for i, f in enumerate(self.flips) if f)
        return np.flip(out, flipped) if flipped else out


def _corners(shape: Sequence[int]) -> np.ndarray:
    """The 8 corner voxel indices of a grid, homogeneous [8, 4]."""
    n = np.asarray(shape, dtype=np.float64) - 1
    return np.array([[i * n[0], j * n[1], k * n[2], 1.0] for i in (0, 1) for j in (0, 1) for k in (0, 1)])


def match_grid(mask: Geometry, scan: Geometry, what: str = "liver mask") -> GridMatch:
    """How ``mask``'s voxels map onto ``scan``'s grid: the same shape and affine, or the same
    grid in another voxel order (axes permuted or reversed, as converters write it), every
    corner voxel centre within ``GRID_TOLERANCE_VOXELS``. Anything else raises
    ``VolumeError`` naming both files (the mask must be resampled onto the scan first);
    ``what`` names the mask's role in the message."""
    transform = np.linalg.inv(mask.affine) @ scan.affine  # scan voxel index -> mask voxel index
    rotation = transform[:3, :3]
    signed = np.rint(rotation)
    is_permutation = (np.abs(signed).sum(axis=0) == 1).all() and (np.abs(signed).sum(axis=1) == 1).all()
    if is_permutation:
        axes = tuple(int(np.flatnonzero(signed[:, i])[0]) for i in range(3))
        flips = tuple(bool(signed[axes[i], i] < 0) for i in range(3))
        if tuple(mask.shape[a] for a in axes) == tuple(scan.shape):
            exact = np.zeros((4, 4))
            exact[3, 3] = 1.0
            for i, (a, f) in enumerate(zip(axes, flips)):
                exact[a, i] = -1.0 if f else 1.0
                exact[a, 3] = mask.shape[a] - 1 if f else 0.0
            corners = _corners(scan.shape)
            error = np.abs(corners @ transform.T - corners @ exact.T)[:, :3].max()
            if error <= GRID_TOLERANCE_VOXELS:
                return GridMatch(axes, flips)
    if sorted(mask.shape) != sorted(scan.shape):
        problem = f"its shape {tuple(mask.shape)} differs from the scan's {tuple(scan.shape)}"
    else:
        # how far the grids lie apart: each corner voxel centre of the scan to the nearest
        # corner voxel centre of the mask (a shift of the mask by d mm reads d mm; a permuted
        # or reversed voxel order of the same grid reads 0)
        scan_corners = (_corners(scan.shape) @ scan.affine.T)[:, :3]
        mask_corners = (_corners(mask.shape) @ mask.affine.T)[:, :3]
        distance = np.linalg.norm(scan_corners[:, None] - mask_corners[None], axis=2).min(axis=1).max()
        problem = (f"its affine differs from the scan's (a corner voxel of the scan is {distance:.2f} mm from the "
                   f"nearest corner voxel of the mask; mask affine {np.round(mask.affine[:3], 3).tolist()}, scan "
                   f"affine {np.round(scan.affine[:3], 3).tolist()})")
    raise VolumeError(f"{what} {mask.path} does not lie on the voxel grid of scan {scan.path}: {problem}; "
                      "resample the mask onto the scan's grid (nearest neighbour)")


@dataclass(frozen=True)
class LiverMaskSource:
    """A liver mask checked against its scan's grid, voxels not read yet (:meth:`read`)."""

    path: Path
    scan: Geometry
    geometry: Geometry | None  # None: a DICOM mask series matched to a DICOM scan by file name
    match: GridMatch | None
    files: tuple[Path, ...] = ()

    def read(self, values: Sequence[float] | None = None) -> np.ndarray:
        """bool mask in the scan's voxel order: any nonzero label, or one of ``values``."""
        inside = _inside(values, self.path)
        if self.geometry is None:  # DICOM by file name: stored values, the scan's slice order
            stack = np.stack([inside(read_dicom_pixels(p, self.scan.series.shape, rescale=False)) for p in self.files])
            return stack.transpose(2, 1, 0)
        if self.geometry.format == "nifti":
            image, shape = load_nifti(self.path)
            mask = read_nifti_block(image, self.path, 2, 0, shape[2], inside)
        else:
            mask = _read_dicom_voxels(self.geometry.series, rescale=False, convert=inside)
        return self.match.apply(mask)


def open_liver_mask(path: str | Path, scan: Geometry, what: str = "liver mask") -> LiverMaskSource:
    """Check that the liver mask at ``path`` (NIfTI file or DICOM series folder) lies on
    ``scan``'s voxel grid (:func:`match_grid`); a DICOM mask series without
    ImagePositionPatient is matched to a DICOM scan by file name. ``VolumeError`` naming both
    (``what``: the mask's role in the message, e.g. ``"tumour label"``)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{what} {path} of scan {scan.path}: not found")
    if path.is_dir() and scan.series is not None:
        first = read_dicom_header(dicom_files(path)[0])
        if "ImagePositionPatient" not in first:
            try:
                files = match_mask_files(path, scan.series)
            except VolumeError as e:
                raise VolumeError(f"{what} {path} does not fit scan {scan.path}: {e}") from None
            return LiverMaskSource(path, scan, None, None, tuple(files))
    geometry = read_geometry(path)
    return LiverMaskSource(path, scan, geometry, match_grid(geometry, scan, what))


# --------------------------------------------------------------------------- values


def require_liver(liver: np.ndarray, masks: Sequence[str | Path], scan_path: str | Path,
                  labels: Sequence[float] | None = None) -> None:
    """``VolumeError`` naming the mask(s) and the scan when ``liver`` (bool) holds no voxel:
    the method scores the liver only (``predict`` and ``evaluate`` refuse alike)."""
    if not liver.any():
        named = ", ".join(str(m) for m in masks)
        raise VolumeError(f"liver mask {named} of scan {scan_path} is empty"
                          + (f" (no voxel labelled {list(labels)})" if labels else "")
                          + ": the method scores the liver only")


def _stored_as(scan: Geometry) -> str:
    """`` (stored as uint8)`` for a NIfTI scan, else an empty string."""
    if scan.format != "nifti":
        return ""
    try:
        return f" (stored as {load_nifti(scan.path)[0].get_data_dtype()})"
    except VolumeError:
        return ""


def check_scan_values(scan: Volume, liver: np.ndarray | None = None, *, allow_nonfinite: bool = False,
                      allow_non_hu: bool = False) -> None:
    """Refuse a scan whose values cannot be scored as CT (``VolumeError`` naming the file and
    what was seen; see the module docstring):

    - NaN or infinite voxels: refused, or with ``allow_nonfinite`` set to
      ``NONFINITE_FILL_HU`` (air) IN PLACE with a :class:`NonFiniteVoxelsWarning`; a scan
      without a finite voxel (inside ``liver``, bool, when given) is refused either way;
    - no finite voxel below ``HU_AIR_CEILING``: not Hounsfield units; refused, or with
      ``allow_non_hu`` scored as it is with a :class:`NotHounsfieldWarning`.
    """
    voxels = scan.voxels
    finite = np.isfinite(voxels)
    n_bad = voxels.size - int(np.count_nonzero(finite))
    if n_bad:
        if not finite.any() or (liver is not None and not finite[liver].any()):
            where = "" if not finite.any() else " inside its liver mask"
            raise VolumeError(f"scan {scan.path}: no voxel{where} is a finite number ({n_bad} of {voxels.size} "
                              "voxels are NaN or infinite): nothing to score")
        n_nan = int(np.count_nonzero(np.isnan(voxels)))
        in_liver = (f", {int(np.count_nonzero(~finite[liver]))} of them inside the liver mask"
                    if liver is not None else "")
        seen = (f"scan {scan.path}: {n_bad} of {voxels.size} voxels are not finite numbers ({n_nan} NaN, "
                f"{n_bad - n_nan} infinite){in_liver}")
        if not allow_nonfinite:
            raise VolumeError(f"{seen}; repair the file, or pass --allow-nonfinite to score them as air "
                              f"({NONFINITE_FILL_HU:g} HU)")
        warnings.warn(NonFiniteVoxelsWarning(f"{seen}: scored as air ({NONFINITE_FILL_HU:g} HU), --allow-nonfinite"),
                      stacklevel=2)
    lowest = float(voxels.min(initial=np.inf, where=finite))
    highest = float(voxels.max(initial=-np.inf, where=finite))
    if n_bad:
        voxels[~finite] = np.float32(NONFINITE_FILL_HU)
    if lowest >= HU_AIR_CEILING:
        seen = (f"scan {scan.path}: its values run from {lowest:g} to {highest:g}{_stored_as(scan)}, none below "
                f"{HU_AIR_CEILING:g}, where a CT in Hounsfield units holds air at about -1000 HU: it does not look "
                "like HU (an 8-bit image? stored values without their rescale slope and intercept?)")
        if not allow_non_hu:
            raise VolumeError(f"{seen}; convert it to Hounsfield units, or pass --allow-non-hu to score it as it is")
        warnings.warn(NotHounsfieldWarning(f"{seen}; scored as it is (--allow-non-hu)"), stacklevel=2)


# --------------------------------------------------------------------------- intensities


def apply_window(values: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """HU -> 0..255 float, IN PLACE on a float32 array (returned): ``[lo, hi]`` linearly onto
    ``[0, 255]``, clipped, NaN -> 0."""
    lo, hi = window
    values -= np.float32(lo)
    values *= np.float32(255.0 / (hi - lo))
    np.clip(values, 0.0, 255.0, out=values)
    np.nan_to_num(values, copy=False, nan=0.0)
    return values


def equalize_liver_histogram(image: np.ndarray, liver: np.ndarray) -> np.ndarray:
    """Histogram-equalise the liver pixels of one slice onto 1..255; background stays 0.

    ``image``: uint8 [H, W]; ``liver``: bool [H, W]. With ``c`` the cumulative histogram of
    the liver values and ``c_min`` its first nonzero value, a liver pixel ``v`` becomes
    ``1 + round(254 (c(v) - c_min) / (N - c_min))`` (the textbook mapping, shifted so the
    liver stays > 0). A liver of a single grey value is left unchanged.
    """
    out = np.where(liver, image, 0).astype(np.uint8)
    values = image[liver]
    if values.size == 0:
        return out
    cdf = np.cumsum(np.bincount(values, minlength=256))
    cdf_min = cdf[values.min()]
    if cdf[-1] == cdf_min:
        return out
    lut = 1 + np.rint(254.0 * (cdf - cdf_min) / (cdf[-1] - cdf_min))
    out[liver] = np.clip(lut, 1, 255).astype(np.uint8)[values]
    return out


def liver_image(grey: np.ndarray, liver: np.ndarray, hist_eq: bool = False) -> np.ndarray:
    """Windowed slices ``grey`` (float 0..255 [n, H, W], from :func:`apply_window`; rounded
    in place) -> uint8 [n, H, W]: exactly 0 outside ``liver`` (bool [n, H, W]), at least 1
    inside, optionally histogram-equalised per slice (:func:`equalize_liver_histogram`)."""
    images = np.rint(grey, out=grey).astype(np.uint8)  # already within 0..255
    np.maximum(images, 1, out=images, where=liver)  # liver pixels >= 1 ...
    images[~liver] = 0  # ... and everything else exactly 0
    if hist_eq and len(images):
        images = np.stack([equalize_liver_histogram(im, lv) for im, lv in zip(images, liver)])
    return images
