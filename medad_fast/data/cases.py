"""One case source per dataset kind: the file names and label codes of LiTS, BTCV and 3D-IRCADb.

A patient is a :class:`VolumeCase`, made by its source's ``case(patient, image, label)`` from
the files that name it: ``medad-fast prepare`` (:func:`medad_fast.data.volumes.discover_cases`)
makes one for each patient it finds and converts those, and volume evaluation
(:func:`medad_fast.volume_evaluate.cases_from_manifest`) makes the same ones back from the
patients a prepare manifest lists (it records ``image`` and ``label``), so which label is liver
and which is tumour, and what the folders are called, is said once:

- ``lits``: ``volume-N.nii[.gz]`` + ``segmentation-N.nii[.gz]``; label 1 = liver, 2 = tumour
  (tumour counts as liver); labels run 0..2 (a larger one means another dataset).
- ``btcv``: ``imgXXXX.nii.gz`` + ``labelXXXX.nii.gz``; label 6 = liver; no tumour label.
- ``dicom``: 3D-IRCADb-style patient folders: ``PATIENT_DICOM/`` (the CT series),
  ``MASKS_DICOM/liver/`` (required) and ``MASKS_DICOM/livertumor*/`` (optional, united); a
  mask voxel is inside when its stored value is nonzero. Folder names match in any case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medad_fast.data.scan import VolumeError

__all__ = ["LabelSource", "VolumeCase", "NiftiCaseSource", "DicomCaseSource", "CASE_SOURCES", "KINDS",
           "find_child", "unreadable_case"]


@dataclass(frozen=True)
class LabelSource:
    """A mask or label volume and the values that count as inside (None: any nonzero value)."""

    path: Path
    values: tuple[float, ...] | None = None


@dataclass(frozen=True)
class VolumeCase:
    """One patient: ``name`` (its id), ``scan`` (the CT: a NIfTI file or a DICOM series
    folder), its ``liver`` sources (united: its liver) and ``tumour`` sources (united: its
    tumour; none: a scan without tumour).

    A case made by a case source (:data:`CASE_SOURCES`) also says how it was found, as a
    prepare manifest records it (:class:`medad_fast.data.manifest.PatientRecord`): ``kind``
    (the source's key), ``image`` (the NIfTI image file, or the DICOM patient folder) and
    ``label`` (the NIfTI label file; None for DICOM, whose masks are inside the folder);
    ``problem`` is set when the case was found but cannot be read (:func:`unreadable_case`:
    no label sources then). A case given by hand (``evaluate --volume``) has none of these.
    """

    name: str
    scan: Path
    liver: tuple[LabelSource, ...]
    tumour: tuple[LabelSource, ...] = ()
    kind: str | None = None
    image: str | None = None
    label: str | None = None
    problem: str | None = None


def find_child(folder: Path | None, name: str) -> Path | None:
    """The child of ``folder`` called ``name`` (case-insensitive), or None."""
    if folder is None or not folder.is_dir():
        return None
    for child in sorted(folder.iterdir()):
        if child.name.lower() == name.lower():
            return child
    return None


@dataclass(frozen=True)
class NiftiCaseSource:
    """A NIfTI dataset: ``<image_prefix>N.nii[.gz]`` + ``<label_prefix>N.nii[.gz]`` and its label
    codes (``max_label``: the largest value its labels hold; None: not checked)."""

    kind: str
    image_prefix: str
    label_prefix: str
    liver_values: tuple[int, ...]
    tumour_values: tuple[int, ...]
    max_label: int | None

    def case(self, patient: str, image: str | Path, label: str | Path | None) -> VolumeCase:
        """The patient whose image and label files prepare found (its manifest lists them)."""
        label_path = Path(label)
        return VolumeCase(patient, Path(image),
                          (LabelSource(label_path, tuple(map(float, self.liver_values + self.tumour_values))),),
                          (LabelSource(label_path, tuple(map(float, self.tumour_values))),) if self.tumour_values else (),
                          self.kind, str(image), str(label))


@dataclass(frozen=True)
class DicomCaseSource:
    """3D-IRCADb-style DICOM patient folders (see the module docstring)."""

    kind: str = "dicom"
    ct_folder: str = "PATIENT_DICOM"
    masks_folder: str = "MASKS_DICOM"
    liver_folder: str = "liver"
    tumour_prefix: str = "livertumor"

    def folders(self, patient_dir: str | Path) -> tuple[Path, Path, list[Path]]:
        """``(CT series, liver mask series, tumour mask series)`` of a patient folder;
        ``VolumeError`` naming the folder when the CT or the liver series is missing."""
        patient_dir = Path(patient_dir)
        ct_dir = find_child(patient_dir, self.ct_folder)
        masks_dir = find_child(patient_dir, self.masks_folder)
        if ct_dir is None:
            raise VolumeError(f"{patient_dir}: no {self.ct_folder} folder")
        liver_dir = find_child(masks_dir, self.liver_folder)
        if liver_dir is None:
            raise VolumeError(f"{patient_dir}: no {self.masks_folder}/{self.liver_folder} folder (the liver mask "
                              "series is required)")
        tumours = [d for d in sorted(masks_dir.iterdir()) if d.is_dir() and d.name.lower().startswith(self.tumour_prefix)]
        return ct_dir, liver_dir, tumours

    def case(self, patient: str, image: str | Path, label: str | Path | None = None) -> VolumeCase:
        """The patient folder prepare found (``label`` unused: the masks are inside it);
        ``VolumeError`` naming the folder when its CT or liver series is missing."""
        ct_dir, liver_dir, tumours = self.folders(image)
        return VolumeCase(patient, ct_dir, (LabelSource(liver_dir),), tuple(LabelSource(d) for d in tumours),
                          self.kind, str(image), None if label is None else str(label))


CASE_SOURCES: dict[str, NiftiCaseSource | DicomCaseSource] = {
    "lits": NiftiCaseSource("lits", "volume-", "segmentation-", liver_values=(1,), tumour_values=(2,), max_label=2),
    "btcv": NiftiCaseSource("btcv", "img", "label", liver_values=(6,), tumour_values=(), max_label=None),
    "dicom": DicomCaseSource(),
}
KINDS = tuple(CASE_SOURCES)


def unreadable_case(kind: str, patient: str, image: str | Path, label: str | Path | None, problem: str) -> VolumeCase:
    """A patient found but known not to be readable (``problem``, naming the file: an image
    without its label, a zipped DICOM series, a missing mask series): no label sources;
    reading it raises ``VolumeError(problem)``."""
    return VolumeCase(patient, Path(image), (), (), kind, str(image), None if label is None else str(label), problem)
