"""Raw CT volumes -> liver slices in the BMAD layout (``medad-fast prepare``).

Sources (``KIND``):

- ``lits``: ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]`` anywhere under SRC (LiTS ships
  them in several "Training Batch" folders); label 1 = liver, 2 = tumour.
- ``btcv``: ``img/imgXXXX.nii.gz`` + ``label/labelXXXX.nii.gz`` (or both flat in SRC, or
  anywhere below it); label 6 = liver; no tumours, so every slice is normal.
- ``dicom``: 3D-IRCADb-style patient folders, each holding ``PATIENT_DICOM/`` (the CT series)
  and ``MASKS_DICOM/liver/`` plus optional ``MASKS_DICOM/livertumor*/`` (mask series, nonzero
  stored value = inside). SRC is one patient folder or a folder containing them.

Each patient found is a :class:`medad_fast.data.cases.VolumeCase`, made by its kind's case
source (:data:`medad_fast.data.cases.CASE_SOURCES`), the one volume evaluation makes back from
the manifest. Reading (NIfTI headers and voxels, DICOM series, orientation, the HU window) is
:mod:`medad_fast.data.scan`'s, shared with ``medad-fast predict`` on volumes; this module adds
the datasets' label conventions, the liver slab, the split and the BMAD writing.

Geometry. Every volume is brought to ONE display orientation through its affine (NIfTI) or
its ImageOrientationPatient / ImagePositionPatient (DICOM): the closest canonical RAS+
orientation (``nibabel.orientations.io_orientation``), then a fixed flip + transpose so that a
slice ``[row, col]`` is what a radiologist looks at: anterior at the top, the patient's right
on the image left (rows run anterior -> posterior, columns patient right -> left). Slices are
the axial ones; ``slice_index`` counts them from the most inferior (0) to the most superior.
DICOM slices are ordered by ImagePositionPatient projected on the slice normal, RescaleSlope/
Intercept is applied per file, and a gap larger than 1.5 x the median spacing is reported as a
missing slice (the volume is then rejected: slices would otherwise be silently misplaced).

Intensities. HU window ``[lo, hi]`` (default [-200, 250]) mapped linearly to 0..255; pixels
outside the liver (liver label or tumour) are set to EXACTLY 0 and liver pixels to at least 1,
so ``image > 0`` is the liver mask (what the method's liver localisation relies on). Optional
``--hist-eq``: histogram equalisation of the liver pixels only, per slice (BMAD's
preprocessing), mapped onto 1..255 so the liver stays > 0. ``--size S`` resizes to S x S
(area averaging to shrink, bilinear to enlarge; masks nearest: :mod:`medad_fast.io`).

A slice is written when it contains liver; it is abnormal (``Ungood``, with a 0/255 tumour mask)
when it contains tumour at the source resolution. If resizing erases a small tumour, its mask
falls back to "any area coverage", so an abnormal slice never has an empty mask.

Split by PATIENT (never by slice): ``--test-fraction`` and ``--val-fraction`` of the patients
(at least one each when the fraction is > 0 and there are enough patients), the rest train.
Train keeps only the NORMAL slices of its patients (abnormal ones are dropped and counted).

Output (BMAD layout, :mod:`medad_fast.data.layout`; file stem ``<patient>_<slice_index:04d>``)::

    OUT/train/good/*.png
    OUT/{valid,test}/good/img/*.png
    OUT/{valid,test}/Ungood/img/*.png   OUT/{valid,test}/Ungood/label/*.png   (masks 0/255)
    OUT/manifest.json

``manifest.json`` lists every written slice (image, mask, source file, patient, slice index,
split, label 0/1), the per-source settings, the patient split and status, and the counts.

Robustness. A volume that cannot be read (corrupt file, label shape that does not match its
image, DICOM series with a missing slice, no liver in the labels...) is reported with a
message naming the file; the other volumes are still processed and the exit code is 1 with a
summary. All files are written atomically; the manifest is rewritten after every volume, so an
interrupted or partly failed run is resumed by running the same command again (finished
volumes are skipped, half-written ones are redone, nothing is duplicated). A different
source (e.g. BTCV for train, then LiTS for valid/test) can be added to the same OUT. SRC is only
read. OUT must be missing, empty, or a previous ``prepare`` output.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medad_fast.data.cases import CASE_SOURCES, KINDS, VolumeCase, unreadable_case
from medad_fast.data.layout import MANIFEST_NAME, WRITTEN_SUFFIX, parse_slice_stem, slice_folders, slice_relpaths, slice_stem
from medad_fast.data.manifest import (FORMAT_VERSION, PatientRecord, PrepareManifest, PrepareSettings,
                                      SliceRecord, SourceRecord)
from medad_fast.data import manifest as prepare_manifest
from medad_fast.data.scan import (DEFAULT_WINDOW, DicomSeries, VolumeError, apply_window, equalize_liver_histogram,
                                  liver_image, load_nifti, match_mask_files, orientation, read_dicom_pixels,
                                  read_dicom_series, read_nifti_block, to_display)
from medad_fast.io import check_writable_folder, resize_images, resize_masks, save_png

__all__ = [
    "KINDS",
    "DEFAULT_WINDOW",
    "VolumeError",
    "VolumeCase",
    "LiverSlab",
    "RenderedSlices",
    "PrepareReport",
    "discover_cases",
    "read_nifti_case",
    "read_dicom_case",
    "read_dicom_series",
    "DicomSeries",
    "render_slices",
    "process_case",
    "equalize_liver_histogram",
    "split_counts",
    "split_patients",
    "prepare_dataset",
]

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.2


# --------------------------------------------------------------------------- data classes


@dataclass
class LiverSlab:
    """The axial slab of one patient that spans the liver, in display orientation.

    ``hu``: float32 [n, H, W] Hounsfield units; ``liver``: bool [n, H, W] liver INCLUDING
    tumour; ``tumour``: bool [n, H, W]; ``slice_indices``: int64 [n], axial index of each slice
    in the whole volume (0 = most inferior). Rows run anterior -> posterior, columns patient
    right -> left (radiological display).
    """

    hu: np.ndarray
    liver: np.ndarray
    tumour: np.ndarray
    slice_indices: np.ndarray
    source: str


@dataclass
class RenderedSlices:
    """Slices ready to write: ``images`` uint8 [n, S, S] (0 outside the liver, >= 1 inside),
    ``masks`` bool [n, S, S] (tumour), ``abnormal`` bool [n], ``slice_indices`` int64 [n]."""

    images: np.ndarray
    masks: np.ndarray
    abnormal: np.ndarray
    slice_indices: np.ndarray


@dataclass
class PrepareReport:
    """What one ``prepare`` run did. ``failed``: patient -> message naming the file.
    ``counts``: the manifest's counts (whole OUT, all sources)."""

    out: Path
    n_cases: int
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already done by a previous run
    failed: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


# --------------------------------------------------------------------------- discovery


def _safe_id(name: str) -> str:
    """A file-name-safe patient id part: anything but letters, digits, '.' and '-' -> '-'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", name).strip("-") or "patient"


def _walk_files(root: Path, prune: Iterable[str] = ()) -> list[Path]:
    """All regular files under ``root`` (sorted, hidden entries skipped), not descending
    into directories whose lower-cased name is in ``prune``."""
    prune = {p.lower() for p in prune}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in prune)
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return found


def _discover_nifti(kind: str, src: Path) -> list[VolumeCase]:
    source = CASE_SOURCES[kind]
    image_prefix, label_prefix = source.image_prefix, source.label_prefix
    image_re, label_re = (re.compile(re.escape(prefix) + r"(\d+)\.nii(\.gz)?") for prefix in (image_prefix, label_prefix))
    images: dict[str, list[Path]] = {}
    labels: dict[str, list[Path]] = {}
    for path in _walk_files(src):
        for pattern, table in ((image_re, images), (label_re, labels)):
            match = pattern.fullmatch(path.name)
            if match:
                table.setdefault(match.group(1), []).append(path)
    cases = []
    for number in sorted(set(images) | set(labels), key=lambda n: (int(n), n)):
        patient = f"{kind}-{number}"
        image_files, label_files = images.get(number, []), labels.get(number, [])
        problem = None
        if len(image_files) > 1 or len(label_files) > 1:
            problem = "several files for one patient: " + ", ".join(map(str, image_files + label_files))
        elif not label_files:
            problem = f"{image_files[0]}: no label file {label_prefix}{number}.nii[.gz] found under {src}"
        elif not image_files:
            problem = f"{label_files[0]}: no image file {image_prefix}{number}.nii[.gz] found under {src}"
        image, label = str((image_files or label_files)[0]), str(label_files[0]) if label_files else None
        cases.append(unreadable_case(kind, patient, image, label, problem) if problem
                     else source.case(patient, image, label))
    return cases


def _discover_dicom(src: Path) -> list[VolumeCase]:
    dicom = CASE_SOURCES["dicom"]
    cases = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        names = {d.lower() for d in dirnames}
        patient = f"dicom-{_safe_id(here.name)}"
        if dicom.ct_folder.lower() in names:
            try:
                cases.append(dicom.case(patient, str(here), None))
            except VolumeError as e:  # no liver mask series: reported when the patient is converted
                cases.append(unreadable_case("dicom", patient, str(here), None, str(e)))
            dirnames[:] = []  # a patient folder holds no further patients
            continue
        zipped = {f.lower() for f in filenames}
        if f"{dicom.ct_folder.lower()}.zip" in zipped:
            cases.append(unreadable_case("dicom", patient, str(here), None,
                                         f"{here / (dicom.ct_folder + '.zip')}: unzip {dicom.ct_folder}.zip and "
                                         f"{dicom.masks_folder}.zip first (prepare reads DICOM folders)"))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(cases, key=lambda case: case.name)


def discover_cases(kind: str, src: str | Path) -> list[VolumeCase]:
    """Find the patients of ``kind`` under ``src`` (sorted by patient id), each a
    :class:`medad_fast.data.cases.VolumeCase` made by its case source (``kind``, ``image``,
    ``label`` as the manifest records them; ``problem`` when it cannot be converted).

    Raises ``FileNotFoundError`` naming ``src`` when there is nothing of that kind, and
    ``ValueError`` when two cases map to the same patient id.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"SRC folder not found: {src}")
    cases = _discover_dicom(src) if kind == "dicom" else _discover_nifti(kind, src)
    if not cases:
        expected = {
            "lits": "volume-N.nii[.gz] + segmentation-N.nii[.gz]",
            "btcv": "img/imgXXXX.nii.gz + label/labelXXXX.nii.gz",
            "dicom": "patient folders with PATIENT_DICOM/ and MASKS_DICOM/liver/",
        }[kind]
        raise FileNotFoundError(f"no {kind} data found under {src} (expected {expected})")
    seen: dict[str, VolumeCase] = {}
    for case in cases:
        if case.name in seen:
            raise ValueError(f"two cases map to the same patient id {case.name!r}: "
                             f"{seen[case.name].image} and {case.image}; rename one of them")
        seen[case.name] = case
    return cases


# --------------------------------------------------------------------------- orientation


def _axial_axis_range(ornt: np.ndarray, shape: tuple[int, ...], first: int, last: int) -> tuple[int, int, int]:
    """The array axis that becomes the axial (S) axis, and the index range ``[lo, hi)`` on it
    that holds display slices ``first..last`` (inclusive)."""
    axis = int(np.flatnonzero(ornt[:, 0] == 2)[0])
    n = shape[axis]
    if ornt[axis, 1] < 0:
        return axis, n - 1 - last, n - first
    return axis, first, last + 1


def _liver_range(codes_display: np.ndarray) -> tuple[int, int] | None:
    """First and last display slice holding liver (code >= 1); None when there is none."""
    present = np.flatnonzero(codes_display.reshape(codes_display.shape[0], -1).any(axis=1))
    if present.size == 0:
        return None
    return int(present[0]), int(present[-1])


def _liver_slab(codes_display: np.ndarray, hu_display: np.ndarray, first: int, source: str) -> LiverSlab:
    codes = codes_display[first:first + hu_display.shape[0]]
    return LiverSlab(hu=hu_display, liver=codes >= 1, tumour=codes == 2,
                      slice_indices=np.arange(first, first + hu_display.shape[0], dtype=np.int64), source=source)


# --------------------------------------------------------------------------- NIfTI


def _label_codes(labels: np.ndarray, liver_values: tuple[int, ...], tumour_values: tuple[int, ...]) -> np.ndarray:
    """Label volume -> uint8 codes: 0 background, 1 liver, 2 tumour (float labels rounded)."""
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels)
    codes = np.zeros(labels.shape, dtype=np.uint8)
    codes[np.isin(labels, liver_values)] = 1
    if tumour_values:
        codes[np.isin(labels, tumour_values)] = 2
    return codes


def read_nifti_case(image_path: str | Path, label_path: str | Path, kind: str) -> LiverSlab:
    """Read a LiTS or BTCV image + label pair; return the liver slab in display orientation.

    The image's affine orients BOTH volumes (labels are defined voxel-wise on the image grid;
    some datasets carry a sloppy label header). Only the label volume is read whole (as
    uint8); the image is read only over the slices that hold liver.
    Raises ``VolumeError`` naming the file: unreadable file, not 3-D, label shape differing
    from the image shape, no liver label in the label volume.
    """
    source = CASE_SOURCES[kind]
    liver_values, tumour_values = source.liver_values, source.tumour_values
    image_path, label_path = Path(image_path), Path(label_path)
    image, shape = load_nifti(image_path)
    label, label_shape = load_nifti(label_path)
    if label_shape != shape:
        raise VolumeError(f"{label_path}: label shape {label_shape} does not match the image shape {shape} "
                          f"of {image_path}")
    ornt = orientation(image.affine, str(image_path))

    value_range = [math.inf, -math.inf]

    def to_codes(chunk: np.ndarray) -> np.ndarray:
        if chunk.size:
            value_range[0] = min(value_range[0], float(np.nanmin(chunk)))
            value_range[1] = max(value_range[1], float(np.nanmax(chunk)))
        return _label_codes(chunk, liver_values, tumour_values)

    codes_ijk = read_nifti_block(label, label_path, 2, 0, shape[2], to_codes)
    codes_display = to_display(codes_ijk, ornt)
    del codes_ijk
    max_label = source.max_label
    if max_label is not None and (value_range[0] < 0 or value_range[1] > max_label):
        raise VolumeError(f"{label_path}: label values range {value_range[0]:g}..{value_range[1]:g}, but {kind} "
                          f"labels are 0..{max_label} — is this the right KIND?")
    span = _liver_range(codes_display)
    if span is None:
        wanted = " or ".join(map(str, liver_values + tumour_values))
        raise VolumeError(f"{label_path}: no liver voxel (label {wanted} for {kind}); label values range "
                          f"{value_range[0]:g}..{value_range[1]:g} — is this the right KIND?")
    first, last = span
    axis, lo, hi = _axial_axis_range(ornt, shape, first, last)
    hu_ijk = read_nifti_block(image, image_path, axis, lo, hi, lambda a: a.astype(np.float32, copy=False))
    # The block is the axial range [first, last]; orienting it puts its slices in display order.
    return _liver_slab(codes_display, to_display(hu_ijk, ornt), first, str(image_path))


# --------------------------------------------------------------------------- DICOM


def _read_mask_series(folder: Path, ct: DicomSeries) -> np.ndarray:
    """A mask series aligned to ``ct`` (:func:`medad_fast.data.scan.match_mask_files`): bool
    [n, rows, cols], True where the STORED value is nonzero."""
    return np.stack([read_dicom_pixels(p, ct.shape, rescale=False) != 0 for p in match_mask_files(folder, ct)])



def read_dicom_case(patient_dir: str | Path) -> LiverSlab:
    """Read a 3D-IRCADb-style patient folder; return the liver slab in display orientation.

    ``PATIENT_DICOM/`` is the CT series; ``MASKS_DICOM/liver/`` (required) and
    ``MASKS_DICOM/livertumor*/`` (optional, united) the masks. Only the CT slices spanning
    the liver are decoded. Raises ``VolumeError`` naming the folder or file.
    """
    ct_dir, liver_dir, tumour_dirs = CASE_SOURCES["dicom"].folders(patient_dir)
    ct = read_dicom_series(ct_dir)
    ornt = orientation(ct.affine, str(ct_dir))
    codes = _read_mask_series(liver_dir, ct).astype(np.uint8)
    for tumour_dir in tumour_dirs:
        codes[_read_mask_series(tumour_dir, ct)] = 2
    # [slice, row, col] -> voxel array [col, row, slice], the axes of the affine.
    codes_display = to_display(codes.transpose(2, 1, 0), ornt)
    span = _liver_range(codes_display)
    if span is None:
        raise VolumeError(f"{liver_dir}: the liver mask series is empty")
    first, last = span
    axis, lo, hi = _axial_axis_range(ornt, (ct.shape[1], ct.shape[0], len(ct.files)), first, last)
    if axis == 2:  # usual axial acquisition: decode only the files spanning the liver
        hu = np.stack([read_dicom_pixels(p, ct.shape, rescale=True) for p in ct.files[lo:hi]])
        hu_ijk = hu.transpose(2, 1, 0)
    else:  # coronal/sagittal acquisition: every file holds part of every axial slice
        hu = np.stack([read_dicom_pixels(p, ct.shape, rescale=True) for p in ct.files])
        hu_ijk = np.take(hu.transpose(2, 1, 0), np.arange(lo, hi), axis=axis)
    return _liver_slab(codes_display, to_display(hu_ijk, ornt), first, str(ct_dir))


# --------------------------------------------------------------------------- rendering


def render_slices(volume: LiverSlab, window: tuple[float, float] = DEFAULT_WINDOW, hist_eq: bool = False,
                  size: int | None = None) -> RenderedSlices:
    """Liver slices of ``volume`` as 8-bit images (see the module docstring for the rules)."""
    import torch

    has_liver = volume.liver.reshape(volume.liver.shape[0], -1).any(axis=1)
    # Boolean indexing copies, so the window is applied in place on the copy (CT slabs are
    # hundreds of MB; no further temporaries).
    scaled = volume.hu[has_liver].astype(np.float32, copy=False)
    liver, tumour = volume.liver[has_liver], volume.tumour[has_liver]
    slice_indices = volume.slice_indices[has_liver]
    abnormal = tumour.reshape(tumour.shape[0], -1).any(axis=1)
    apply_window(scaled, window)

    if size is not None and scaled.shape[0] and scaled.shape[1:] != (size, size):
        resized = resize_images(torch.from_numpy(scaled)[:, None], size)
        scaled = resized[:, 0].numpy()
        liver_small = resize_masks(torch.from_numpy(liver)[:, None], size)[:, 0].numpy()
        tumour_small = resize_masks(torch.from_numpy(tumour)[:, None], size)[:, 0].numpy()
        lost = abnormal & ~tumour_small.reshape(tumour_small.shape[0], -1).any(axis=1)
        if lost.any():  # a tumour smaller than a pixel after shrinking: keep any covered pixel
            coverage = resize_images(torch.from_numpy(tumour[lost].astype(np.float32))[:, None], size)
            tumour_small[lost] = coverage[:, 0].numpy() > 0
        liver, tumour = liver_small | tumour_small, tumour_small
        keep = liver.reshape(liver.shape[0], -1).any(axis=1)
        scaled, liver, tumour = scaled[keep], liver[keep], tumour[keep]
        abnormal, slice_indices = abnormal[keep], slice_indices[keep]

    images = liver_image(scaled, liver, hist_eq)
    del scaled
    return RenderedSlices(images=images, masks=tumour, abnormal=abnormal, slice_indices=slice_indices)


# --------------------------------------------------------------------------- split


def split_counts(n_patients: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """How many patients go to each split.

    Every split with a positive fraction gets at least one patient while there are patients
    left (priority test, train, valid); the rest is shared by largest remainder towards
    ``fraction * n_patients``.
    """
    fractions = {"test": test_fraction, "train": 1.0 - val_fraction - test_fraction, "valid": val_fraction}
    counts = {name: 0 for name in fractions}
    remaining = n_patients
    for name, fraction in fractions.items():
        if fraction > 1e-12 and remaining > 0:
            counts[name] = 1
            remaining -= 1
    wanted = {name: max(0.0, fraction * n_patients - counts[name]) for name, fraction in fractions.items()}
    for name in fractions:
        extra = min(int(math.floor(wanted[name] + 1e-9)), remaining)
        counts[name] += extra
        remaining -= extra
        wanted[name] -= extra
    for name in sorted(fractions, key=lambda k: -(wanted[k] - math.floor(wanted[k] + 1e-9))):
        if remaining == 0:
            break
        if fractions[name] > 1e-12:
            counts[name] += 1
            remaining -= 1
    counts["train"] += remaining  # only when every fraction is 0 (cannot happen) or rounding left some
    return {"train": counts["train"], "valid": counts["valid"], "test": counts["test"]}


def split_patients(patients: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Patient -> split, deterministic in ``seed`` and independent of the input order."""
    ordered = sorted(patients)
    counts = split_counts(len(ordered), val_fraction, test_fraction)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    names = ["test"] * counts["test"] + ["valid"] * counts["valid"] + ["train"] * counts["train"]
    return {ordered[i]: name for i, name in zip(permutation, names)}


# --------------------------------------------------------------------------- one case (worker)


# The temporary file of an interrupted atomic write (medad_fast.io.atomic_write_bytes):
# ".<name>.<hex>.tmp" next to <name>.
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[0-9a-f]+\.tmp")


def _remove_patient_files(out: Path, patient: str) -> None:
    """Delete what an interrupted earlier attempt at this patient left (slices, temp files)."""
    for folder in slice_folders(out):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            temp = _TEMP_FILE.fullmatch(path.name)
            name = Path(temp["name"] if temp else path.name)
            origin = parse_slice_stem(name.stem) if name.suffix == WRITTEN_SUFFIX else None
            if origin is not None and origin[0] == patient:
                path.unlink(missing_ok=True)


def _read_case(case: VolumeCase) -> LiverSlab:
    if case.problem:
        raise VolumeError(case.problem)
    if case.kind == "dicom":
        return read_dicom_case(case.image)
    return read_nifti_case(case.image, case.label, case.kind)


def process_case(case: VolumeCase, split: str, settings: PrepareSettings, out: str) -> dict[str, Any]:
    """Convert one patient and write its slices under ``out``; never raises for bad data.

    Returns ``{"patient", "slices": [SliceRecord], "dropped_abnormal": n, "error": str|None}``.
    """
    result: dict[str, Any] = {"patient": case.name, "slices": [], "dropped_abnormal": 0, "error": None}
    try:
        volume = _read_case(case)
        rendered = render_slices(volume, settings.window, settings.hist_eq, settings.size)
        out_dir = Path(out)
        _remove_patient_files(out_dir, case.name)
        for image, mask, abnormal, index in zip(rendered.images, rendered.masks, rendered.abnormal,
                                                rendered.slice_indices):
            if split == "train" and abnormal:  # train holds normal slices only
                result["dropped_abnormal"] += 1
                continue
            image_rel, mask_rel = slice_relpaths(split, bool(abnormal), slice_stem(case.name, int(index)))
            save_png(out_dir / image_rel, image)
            if mask_rel:
                save_png(out_dir / mask_rel, mask)
            result["slices"].append(SliceRecord(image=image_rel, mask=mask_rel, split=split, label=int(abnormal),
                                                patient=case.name, slice_index=int(index), source=volume.source))
    except VolumeError as e:
        result["error"] = str(e)
    except MemoryError:
        result["error"] = f"{case.image}: out of memory while converting (try fewer --workers)"
    except Exception as e:  # a bug or an unforeseen file problem: report it, keep going
        result["error"] = f"{case.image}: unexpected {type(e).__name__}: {e}"
    return result


def _worker_init() -> None:
    # One process per volume already; more threads per process would only oversubscribe.
    import torch

    torch.set_num_threads(1)


# --------------------------------------------------------------------------- manifest / OUT


def _read_own_manifest(out: Path) -> PrepareManifest | None:
    """The manifest of a previous prepare run in ``out``; None when ``out`` is missing or
    empty. Raises ``ValueError`` when ``out`` holds something else."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"OUT {out} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        manifest = prepare_manifest.read(out)
    except (OSError, ValueError):
        raise ValueError(f"OUT {out} is not empty and is not the output of `medad-fast prepare` "
                         f"(no valid {MANIFEST_NAME} from it); choose a new or empty folder") from None
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(f"{prepare_manifest.manifest_path(out)}: written by another version of prepare (format "
                         f"{manifest.format_version}); choose a new folder")
    return manifest


def _source_entry(manifest: PrepareManifest, kind: str, src: Path, settings: PrepareSettings,
                  cases: list[VolumeCase]) -> SourceRecord:
    """Find (resume) or create the manifest entry of this source, checking consistency."""
    patients_now = {case.name for case in cases}
    for entry in manifest.sources:
        if entry.kind == kind and entry.src == str(src):
            if entry.settings != settings:
                before, now = entry.settings.to_dict(), settings.to_dict()
                differing = sorted(k for k in now if before.get(k) != now[k])
                raise ValueError(f"OUT was prepared from {src} with other settings ({', '.join(differing)}: "
                                 f"{ {k: before.get(k) for k in differing} }); re-run with the same "
                                 "settings to resume, or choose a new OUT")
            before = set(entry.patients)
            if before != patients_now:
                added, removed = sorted(patients_now - before), sorted(before - patients_now)
                raise ValueError(f"the patients under {src} changed since OUT was prepared (new: {added[:5]}, "
                                 f"gone: {removed[:5]}); the patient split would change, choose a new OUT")
            return entry
    others = {p: e.src for e in manifest.sources for p in e.patients}
    clash = sorted(patients_now & set(others))
    if clash:
        raise ValueError(f"patient id {clash[0]!r} of {src} is already in OUT (from {others[clash[0]]}); "
                         "choose a new OUT")
    split = split_patients(sorted(patients_now), settings.val_fraction, settings.test_fraction, settings.seed)
    by_patient = {case.name: case for case in cases}
    entry = SourceRecord(kind=kind, src=str(src), settings=settings,
                         patients={p: PatientRecord(split=split[p], image=by_patient[p].image, label=by_patient[p].label)
                                   for p in sorted(patients_now)})
    manifest.sources.append(entry)
    return entry


def _record(manifest: PrepareManifest, entry: SourceRecord, result: dict[str, Any]) -> None:
    patient = result["patient"]
    manifest.slices = [s for s in manifest.slices if s.patient != patient] + result["slices"]
    info = entry.patients[patient]
    info.status, info.error = ("failed" if result["error"] else "done"), result["error"]
    info.slices, info.dropped_abnormal = len(result["slices"]), result["dropped_abnormal"]
    manifest.slices.sort(key=lambda s: (s.patient, s.slice_index))
    manifest.counts = prepare_manifest.count(manifest)


def _check_settings(window, hist_eq, val_fraction, test_fraction, seed, size, workers) -> PrepareSettings:
    lo, hi = (float(w) for w in window)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"--window: LO must be smaller than HI (finite), got {lo} {hi}")
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not (0.0 <= float(value) <= 1.0):
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if float(val_fraction) + float(test_fraction) > 1.0 + 1e-9:
        raise ValueError(f"--val-fraction + --test-fraction must be <= 1, got {val_fraction} + {test_fraction}")
    if size is not None and (isinstance(size, bool) or int(size) != size or size < 8):
        raise ValueError(f"--size must be an integer >= 8, got {size!r}")
    if isinstance(workers, bool) or int(workers) != workers or workers < 1:
        raise ValueError(f"--workers must be an integer >= 1, got {workers!r}")
    if isinstance(seed, bool) or int(seed) != seed:
        raise ValueError(f"--seed must be an integer, got {seed!r}")
    return PrepareSettings(window=(lo, hi), hist_eq=bool(hist_eq), size=None if size is None else int(size),
                           val_fraction=float(val_fraction), test_fraction=float(test_fraction), seed=int(seed))


# --------------------------------------------------------------------------- driver


def prepare_dataset(kind: str, src: str | Path, out: str | Path, *, window: tuple[float, float] = DEFAULT_WINDOW,
                    hist_eq: bool = False, val_fraction: float = DEFAULT_VAL_FRACTION,
                    test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0, size: int | None = None,
                    workers: int = 1, progress: bool = True, log=None) -> PrepareReport:
    """Convert every patient of ``kind`` under ``src`` into the BMAD layout under ``out``.

    Bad arguments, a missing/empty ``src``, an ``out`` that is not ours, or a resume with other
    settings raise ``ValueError`` / ``FileNotFoundError`` before anything is written. Per-volume
    problems do not raise: they are in ``report.failed`` (patient -> message naming the file)
    and in the manifest, and the next run with the same arguments retries them.
    ``log``: callable for per-volume messages (default: print to stderr through tqdm).

    ``workers > 1`` runs volumes in worker processes started by ``forkserver`` (clean
    processes, no inherited threads), so a calling SCRIPT needs the usual
    ``if __name__ == "__main__":`` guard (the ``medad-fast`` command has it).
    """
    from tqdm import tqdm

    settings = _check_settings(window, hist_eq, val_fraction, test_fraction, seed, size, workers)
    src_path = Path(src).expanduser().resolve()
    out_path = Path(out).expanduser().resolve()
    if out_path == src_path or src_path in out_path.parents:
        raise ValueError(f"OUT {out_path} must not be inside SRC {src_path} (the source is never modified)")
    if out_path in src_path.parents:
        raise ValueError(f"SRC {src_path} must not be inside OUT {out_path}")
    cases = discover_cases(kind, src_path)
    previous = _read_own_manifest(out_path)
    check_writable_folder(out_path, "OUT")  # before any work
    manifest = previous or PrepareManifest()
    entry = _source_entry(manifest, kind, src_path, settings, cases)
    manifest.counts = prepare_manifest.count(manifest)
    out_path.mkdir(parents=True, exist_ok=True)
    prepare_manifest.write(out_path, manifest)  # OUT is recognisably ours from now on

    report = PrepareReport(out=out_path, n_cases=len(cases))
    pending = [case for case in cases if entry.patients[case.name].status != "done"]
    report.skipped = [case.name for case in cases if entry.patients[case.name].status == "done"]
    say = log or (lambda message: tqdm.write(message, file=sys.stderr))
    if report.skipped:
        say(f"prepare {kind}: {len(report.skipped)} volume(s) already done in {out_path}, resuming")

    def handle(result: dict[str, Any]) -> None:
        _record(manifest, entry, result)
        prepare_manifest.write(out_path, manifest)
        if result["error"]:
            report.failed[result["patient"]] = result["error"]
            say(f"prepare {kind}: FAILED {result['patient']}: {result['error']}")
        else:
            report.converted.append(result["patient"])

    with tqdm(total=len(pending), desc=f"prepare {kind}", unit="volume", disable=not progress) as bar:
        if workers == 1 or len(pending) <= 1:
            for case in pending:
                bar.set_postfix_str(case.name)
                handle(process_case(case, entry.patients[case.name].split, settings, str(out_path)))
                bar.update(1)
        else:
            # forkserver: workers start from a clean process (no inherited threads/locks from
            # tqdm or torch), and the preload makes each start cheap.
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=context,
                                     initializer=_worker_init) as pool:
                futures = {pool.submit(process_case, case, entry.patients[case.name].split, settings,
                                       str(out_path)): case for case in pending}
                for future in as_completed(futures):
                    case = futures[future]
                    try:
                        result = future.result()
                    except Exception as e:  # a worker died (e.g. killed for memory)
                        result = {"patient": case.name, "slices": [], "dropped_abnormal": 0,
                                  "error": f"{case.image}: worker process failed ({type(e).__name__}: {e})"}
                    handle(result)
                    bar.set_postfix_str(case.name)
                    bar.update(1)
    report.counts = manifest.counts
    return report
