"""A thresholded anomaly map as a DICOM Segmentation object (SEG) that references its CT series.

PACS viewers and research archives (OHIF, 3D Slicer, XNAT, Orthanc) load a DICOM SEG next to
the series it was made from; a NIfTI file they do not. :func:`write_dicom_seg` writes one
binary segment, "anomaly map >= threshold", with one frame per source CT slice (frames
without a voxel above the threshold are omitted), in the same study as the source, referencing
every source image (Referenced Series Sequence, Derivation Image Sequence) and carrying each
frame's plane position and orientation from the source slice. The object is built with
highdicom (Herrmann et al., "Highdicom: a Python library for standardized encoding of image
annotations and machine learning model outputs in pathology and radiology", J Digit Imaging
2022), an optional dependency: ``pip install medad_fast[dicom-seg]`` (or ``pip install
highdicom``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data.scan import Geometry, VolumeError
from .io import atomic_write_bytes

__all__ = ["write_dicom_seg", "require_highdicom", "HIGHDICOM_MISSING"]

HIGHDICOM_MISSING = ("--dicom-seg needs the optional package highdicom: pip install 'medad_fast[dicom-seg]' "
                     "(or pip install highdicom)")


# Patient and General Study module attributes of type 2 (present, may be empty; DICOM PS3.3 C.7.1.1, C.7.2.1)
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "StudyID", "AccessionNumber")


def require_highdicom():
    """The highdicom module (``ImportError`` saying how to install it when it is missing)."""
    try:
        import highdicom
    except ImportError:
        raise ImportError(HIGHDICOM_MISSING) from None
    return highdicom


def write_dicom_seg(path: str | Path, geometry: Geometry, lesions: np.ndarray, *, threshold: float, method: str,
                    software_version: str, series_number: int = 9001) -> Path:
    """Write ``lesions`` (bool, ``geometry.shape`` = ``[column, row, slice]`` of the DICOM
    series ``geometry``) as a binary DICOM SEG to ``path`` (atomically). ``threshold`` and
    ``method`` go into the segment's description. Returns ``path``.

    ``VolumeError`` when the scan did not come as DICOM, or when the mask does not fit it."""
    if geometry.format != "dicom" or geometry.series is None:
        raise VolumeError(f"{geometry.path}: a DICOM SEG references a DICOM series; this scan is {geometry.format}")
    if tuple(lesions.shape) != tuple(geometry.shape):
        raise VolumeError(f"lesion mask of shape {tuple(lesions.shape)} does not fit series {geometry.path} "
                          f"{tuple(geometry.shape)}")
    hd = require_highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in geometry.files]
    if "FrameOfReferenceUID" not in sources[0]:
        raise VolumeError(f"{geometry.path}: the series has no FrameOfReferenceUID, which a DICOM SEG must share "
                          f"with its source (e.g. {geometry.files[0].name})")
    for source in sources:  # type-2 attributes a SEG copies; de-identified series often drop them
        for keyword in _PATIENT_STUDY_TYPE2:
            if keyword not in source:
                setattr(source, keyword, None)
        if source.get("SliceThickness") in (None, ""):  # type 2 too; the SEG's pixel measures need a value
            source.SliceThickness = f"{geometry.zooms[2]:.6g}"
    # frame k is source slice k: voxel [column, row, k] -> pixel [row, column]
    frames = np.ascontiguousarray(np.asarray(lesions, dtype=bool).transpose(2, 1, 0)).astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medad_fast {method}", version=software_version, family=codes.cid7162.ArtificialIntelligence)
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label=f"anomaly >= {threshold:.6g}",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=hd.UID(), tracking_id=f"medad_fast anomaly map >= {threshold:.6g}")
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medad_fast", manufacturer_model_name=method, software_versions=software_version,
        device_serial_number="none", series_description=f"medad_fast {method} anomaly >= {threshold:.6g}",
        omit_empty_frames=True)
    import io

    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return atomic_write_bytes(Path(path), buffer.getvalue())
