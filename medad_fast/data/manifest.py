"""The ``manifest.json`` that ``medad-fast prepare`` writes into its output folder, in one place.

:class:`PrepareManifest` is its typed record; :func:`write` and :func:`read` are the only code
that turns it into and out of JSON. Prepare (:mod:`medad_fast.data.volumes`) writes it after
every volume; cropping (:func:`medad_fast.data.crop.resolve_crop`), the preprocessing record
(:mod:`medad_fast.preprocessing`), the per-slice datasets (:func:`slice_origins`) and volume
evaluation (:func:`medad_fast.volume_evaluate.cases_from_manifest`) read it through here.

Its content::

    generator       "medad_fast.prepare" (GENERATOR_NAME: what tells prepare's output apart)
    format_version  1 (FORMAT_VERSION)
    layout          "bmad"
    sources         one per (kind, SRC) converted into the folder: kind, src, settings
                    (window, hist_eq, size, val_fraction, test_fraction, seed) and, per patient,
                    split, status (pending / done / failed), image, label, error, slices,
                    dropped_abnormal
    slices          one per written slice: image, mask (paths relative to the folder), split,
                    label (0/1), patient, slice_index, source (the file it was cut from)
    counts          images per split and folder, patients per split, volumes per status,
                    train_abnormal_dropped (:func:`count`)

Older manifests are read as they always were: every key but ``generator`` may be missing (its
field then holds its default, ``None`` for a setting not recorded), unknown keys are ignored.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medad_fast.data.layout import ABNORMAL_FOLDER, EVAL_SPLITS, MANIFEST_NAME, NORMAL_FOLDER, SPLITS, kind_folder
from medad_fast.io import atomic_write_json

__all__ = ["GENERATOR_NAME", "FORMAT_VERSION", "ManifestError", "PrepareSettings", "PatientRecord", "SourceRecord",
           "SliceRecord", "PrepareManifest", "manifest_path", "read", "find", "written_by_prepare", "write", "count",
           "slice_origins"]

#: the ``generator`` of a prepare manifest
GENERATOR_NAME = "medad_fast.prepare"
#: the format prepare writes (and resumes)
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """A ``manifest.json`` that is not a readable prepare manifest (the message names the file)."""


@dataclass(frozen=True)
class PrepareSettings:
    """The settings one source was converted with (``None``: not recorded by an older prepare)."""

    window: tuple[float, float] | None = None
    hist_eq: bool | None = None
    size: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["window"] = None if self.window is None else list(self.window)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PrepareSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in values.items() if k in known}
        if values.get("window") is not None:
            lo, hi = values["window"]
            values["window"] = (float(lo), float(hi))
        return cls(**values)


@dataclass
class PatientRecord:
    """One patient of a source: its split, where prepare stands with it, its source files
    (``image``: the NIfTI file or the DICOM patient folder; ``label``: the NIfTI label file,
    None for DICOM) and what converting it gave."""

    split: str | None = None
    status: str = "pending"
    image: str | None = None
    label: str | None = None
    error: str | None = None
    slices: int = 0
    dropped_abnormal: int = 0


@dataclass
class SourceRecord:
    """One ``prepare KIND SRC`` run into the folder."""

    kind: str | None = None
    src: str | None = None
    settings: PrepareSettings = field(default_factory=PrepareSettings)
    patients: dict[str, PatientRecord] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "src": self.src, "settings": self.settings.to_dict(),
                "patients": {p: asdict(info) for p, info in self.patients.items()}}


@dataclass
class SliceRecord:
    """One written slice; ``image`` and ``mask`` relative to the folder (POSIX)."""

    image: str
    mask: str | None = None
    split: str | None = None
    label: int = 0
    patient: str | None = None
    slice_index: int | None = None
    source: str | None = None


@dataclass
class PrepareManifest:
    """The record of a prepared folder (see the module docstring)."""

    sources: list[SourceRecord] = field(default_factory=list)
    slices: list[SliceRecord] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)
    generator: str = GENERATOR_NAME
    format_version: int | None = FORMAT_VERSION
    layout: str | None = "bmad"

    def to_dict(self) -> dict[str, Any]:
        return {"generator": self.generator, "format_version": self.format_version, "layout": self.layout,
                "sources": [s.to_dict() for s in self.sources], "slices": [asdict(s) for s in self.slices],
                "counts": self.counts}

    @classmethod
    def from_dict(cls, content: dict[str, Any]) -> PrepareManifest:
        """The record of a manifest's JSON content; ``TypeError`` / ``ValueError`` / ``KeyError``
        when its parts have the wrong shape (:func:`read` names the file)."""
        return cls(sources=[SourceRecord(kind=s.get("kind"), src=s.get("src"),
                                         settings=PrepareSettings.from_dict(s.get("settings") or {}),
                                         patients={p: PatientRecord(**_known(PatientRecord, info))
                                                   for p, info in (s.get("patients") or {}).items()})
                            for s in content.get("sources") or []],
                   slices=[SliceRecord(**_known(SliceRecord, s)) for s in content.get("slices") or []],
                   counts=dict(content.get("counts") or {}), generator=content["generator"],
                   format_version=content.get("format_version"), layout=content.get("layout"))


def _known(cls, values: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise TypeError(f"expected a JSON object, got {values!r}")
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in values.items() if k in names}


def manifest_path(folder: str | os.PathLike) -> Path:
    """The manifest file of a prepared ``folder``."""
    return Path(folder).expanduser() / MANIFEST_NAME


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no prepare manifest (file not found)") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: not readable as a prepare manifest ({type(e).__name__}: {e})") from None


def read(location: str | os.PathLike) -> PrepareManifest:
    """The prepare manifest of a folder, or the manifest file ``location`` itself.
    ``FileNotFoundError`` naming the file when there is none; :class:`ManifestError` naming it
    when it is not JSON, has parts of the wrong shape, or was not written by prepare (e.g. the
    phantom's)."""
    path = Path(location).expanduser()
    if path.is_dir():
        path = manifest_path(path)
    content = _load_json(path)
    if not isinstance(content, dict) or content.get("generator") != GENERATOR_NAME:
        generator = content.get("generator") if isinstance(content, dict) else None
        raise ManifestError(f"{path}: not written by `medad-fast prepare` (generator {generator!r})")
    try:
        return PrepareManifest.from_dict(content)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ManifestError(f"{path}: not readable as a prepare manifest ({type(e).__name__}: {e})") from None


def find(folder: str | os.PathLike | None) -> PrepareManifest | None:
    """The prepare manifest of ``folder``, or None when it has none that :func:`read` accepts
    (no folder, no file, another writer's manifest, unreadable): for the readers to whom a
    folder without one is simply not prepare's output."""
    if folder is None:
        return None
    try:
        return read(manifest_path(folder))
    except (OSError, ValueError):
        return None


def written_by_prepare(folder: str | os.PathLike | None) -> bool:
    """Whether ``folder`` holds a manifest whose generator is prepare's (whatever else it
    holds): what marks a folder as prepare's output."""
    if folder is None:
        return False
    try:
        content = _load_json(manifest_path(folder))
    except (OSError, ValueError):
        return False
    return isinstance(content, dict) and content.get("generator") == GENERATOR_NAME


def write(folder: str | os.PathLike, manifest: PrepareManifest) -> Path:
    """Write ``manifest`` as ``folder``/manifest.json, atomically; returns the file."""
    path = Path(folder) / MANIFEST_NAME
    atomic_write_json(path, manifest.to_dict())
    return path


def count(manifest: PrepareManifest) -> dict[str, Any]:
    """The ``counts`` of ``manifest``: images per split and folder, patients per split,
    volumes per status and the abnormal slices of train patients left out."""
    images = {"train": {NORMAL_FOLDER: 0}, **{split: {NORMAL_FOLDER: 0, ABNORMAL_FOLDER: 0} for split in EVAL_SPLITS}}
    for entry in manifest.slices:
        images[entry.split][kind_folder(bool(entry.label))] += 1
    patients = {split: 0 for split in SPLITS}
    volumes = {"done": 0, "failed": 0, "pending": 0}
    dropped = 0
    for source in manifest.sources:
        for info in source.patients.values():
            patients[info.split] += 1
            volumes[info.status] += 1
            dropped += info.dropped_abnormal
    return {**images, "slices": len(manifest.slices), "patients": patients, "volumes": volumes,
            "train_abnormal_dropped": dropped}


def slice_origins(root: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """``{image path relative to root (POSIX): (volume_id, slice_index)}`` from the manifest
    at ``root`` (its slice entries' ``patient`` and ``slice_index``); empty when there is no
    manifest or it names no volumes (the phantom's, whose slice entries have neither).

    The slice entries are read whichever writer's manifest it is (they share the form).
    An unreadable manifest warns (``RuntimeWarning`` naming it) and gives ``{}``: the
    folders, not the manifest, are the data, and the file names still tell the volume.
    """
    path = manifest_path(root)
    if not path.is_file():
        return {}
    try:
        slices = _load_json(path).get("slices", [])
        return {entry["image"]: (str(entry["patient"]), int(entry["slice_index"]))
                for entry in slices if "patient" in entry and "slice_index" in entry}
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as e:
        warnings.warn(f"ignoring unreadable manifest {path}: {e}", RuntimeWarning, stacklevel=2)
        return {}
