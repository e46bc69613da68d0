"""The prepare manifest's owner (medad_fast.data.manifest) and the case sources per kind
(medad_fast.data.cases): round trip, errors naming the file, older manifests, counts, and
the label codes / folder names that prepare and volume evaluation share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medad_fast.data import manifest
from medad_fast.data.cases import CASE_SOURCES, KINDS, LabelSource, VolumeCase
from medad_fast.data.manifest import (ManifestError, PatientRecord, PrepareManifest, PrepareSettings, SliceRecord,
                                      SourceRecord)
from medad_fast.data.scan import VolumeError


def full_manifest() -> PrepareManifest:
    """A manifest with every field set to something other than its default."""
    settings = PrepareSettings(window=(-100.0, 300.0), hist_eq=True, size=64, val_fraction=0.25, test_fraction=0.5,
                               seed=3)
    patients = {"lits-0": PatientRecord(split="test", status="done", image="/src/volume-0.nii", label="/src/seg-0.nii",
                                        error=None, slices=2, dropped_abnormal=0),
                "lits-1": PatientRecord(split="train", status="failed", image="/src/volume-1.nii",
                                        label="/src/seg-1.nii", error="/src/seg-1.nii: broken", slices=0,
                                        dropped_abnormal=4)}
    slices = [SliceRecord(image="test/Ungood/img/lits-0_0007.png", mask="test/Ungood/label/lits-0_0007.png",
                          split="test", label=1, patient="lits-0", slice_index=7, source="/src/volume-0.nii"),
              SliceRecord(image="test/good/img/lits-0_0008.png", mask=None, split="test", label=0, patient="lits-0",
                          slice_index=8, source="/src/volume-0.nii")]
    record = PrepareManifest(sources=[SourceRecord(kind="lits", src="/src", settings=settings, patients=patients)],
                             slices=slices)
    record.counts = manifest.count(record)
    return record


def test_round_trip_keeps_every_field(tmp_path):
    record = full_manifest()
    path = manifest.write(tmp_path, record)
    assert path == tmp_path / "manifest.json"
    assert manifest.read(tmp_path) == record and manifest.read(path) == record  # the folder or the file
    on_disk = json.loads(path.read_text())
    assert list(on_disk) == ["generator", "format_version", "layout", "sources", "slices", "counts"]
    assert (on_disk["generator"], on_disk["format_version"], on_disk["layout"]) == ("medad_fast.prepare", 1, "bmad")
    source, = on_disk["sources"]
    assert source["settings"] == {"window": [-100.0, 300.0], "hist_eq": True, "size": 64, "val_fraction": 0.25,
                                  "test_fraction": 0.5, "seed": 3}
    assert source["patients"]["lits-1"] == {"split": "train", "status": "failed", "image": "/src/volume-1.nii",
                                            "label": "/src/seg-1.nii", "error": "/src/seg-1.nii: broken",
                                            "slices": 0, "dropped_abnormal": 4}
    assert set(on_disk["slices"][0]) == {"image", "mask", "split", "label", "patient", "slice_index", "source"}
    # counted by hand: one abnormal and one normal test slice; one test and one train patient
    assert on_disk["counts"] == {"train": {"good": 0}, "valid": {"good": 0, "Ungood": 0},
                                 "test": {"good": 1, "Ungood": 1}, "slices": 2,
                                 "patients": {"train": 1, "valid": 0, "test": 1},
                                 "volumes": {"done": 1, "failed": 1, "pending": 0}, "train_abnormal_dropped": 4}
    assert manifest.slice_origins(tmp_path) == {"test/Ungood/img/lits-0_0007.png": ("lits-0", 7),
                                                "test/good/img/lits-0_0008.png": ("lits-0", 8)}


def test_what_prepare_writes_reads_back_unchanged(tmp_path):
    from test_volumes import run_prepare, write_lits

    write_lits(tmp_path / "src", [0, 1])
    assert run_prepare("lits", str(tmp_path / "src"), str(tmp_path / "out")) == 0
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    record = manifest.read(tmp_path / "out")
    assert record.to_dict() == written
    assert sorted(record.sources[0].patients) == ["lits-0", "lits-1"] and record.counts == written["counts"]


def test_a_missing_or_foreign_manifest_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest.json: no prepare manifest"):
        manifest.read(tmp_path)
    assert manifest.find(tmp_path) is None and not manifest.written_by_prepare(tmp_path)
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=r"manifest.json: not readable as a prepare manifest \(JSONDecodeError"):
        manifest.read(tmp_path)
    path.write_text(json.dumps({"generator": "medad_fast.phantom", "slices": []}))
    with pytest.raises(ManifestError, match=r"manifest.json: not written by `medad-fast prepare` "
                                            r"\(generator 'medad_fast.phantom'\)"):
        manifest.read(tmp_path)
    assert manifest.find(tmp_path) is None and not manifest.written_by_prepare(tmp_path)
    path.write_text(json.dumps({"generator": "medad_fast.prepare", "sources": [{"patients": {"a": 3}}]}))
    with pytest.raises(ManifestError, match=r"manifest.json: not readable as a prepare manifest \(TypeError"):
        manifest.read(tmp_path)
    assert manifest.find(tmp_path) is None
    assert manifest.written_by_prepare(tmp_path)  # still prepare's folder (cropping follows the generator)
    other = tmp_path / "elsewhere.json"  # `evaluate --manifest FILE` may name any file
    other.write_text("[]")
    with pytest.raises(ManifestError, match=r"elsewhere.json: not written by"):
        manifest.read(other)


def test_older_manifests_still_read(tmp_path):
    """The forms the readers accepted before the manifest had an owner: the generator alone
    (cropping), sources holding only their window (preprocessing), slice entries only."""
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"generator": "medad_fast.prepare"}))
    record = manifest.read(tmp_path)
    assert (record.sources, record.slices, record.counts, record.format_version) == ([], [], {}, None)
    path.write_text(json.dumps({"generator": "medad_fast.prepare", "sources": [
        {"settings": {"window": [-100, 200], "hist_eq": True}, "patients": {"a": {"split": "train"}}}]}))
    source, = manifest.read(tmp_path).sources
    assert source.settings == PrepareSettings(window=(-100.0, 200.0), hist_eq=True)
    assert (source.kind, source.src, source.settings.size, source.settings.seed) == (None, None, None, None)
    assert source.patients == {"a": PatientRecord(split="train")} and source.patients["a"].status == "pending"
    path.write_text(json.dumps({"generator": "medad_fast.prepare", "future_key": 1, "slices": [
        {"image": "test/good/img/x.png", "mask": None, "patient": "dicom-p7", "slice_index": 12}]}))
    slice_, = manifest.read(tmp_path).slices
    assert (slice_.image, slice_.patient, slice_.slice_index, slice_.split, slice_.label) == (
        "test/good/img/x.png", "dicom-p7", 12, None, 0)


def test_one_case_source_per_kind_says_the_label_codes(tmp_path):
    assert KINDS == ("lits", "btcv", "dicom")
    lits = CASE_SOURCES["lits"].case("lits-3", "/d/volume-3.nii", "/d/segmentation-3.nii")
    label = Path("/d/segmentation-3.nii")
    assert lits == VolumeCase("lits-3", Path("/d/volume-3.nii"), (LabelSource(label, (1.0, 2.0)),),
                              (LabelSource(label, (2.0,)),), "lits", "/d/volume-3.nii", "/d/segmentation-3.nii")
    btcv = CASE_SOURCES["btcv"].case("btcv-1", "/b/img0001.nii.gz", "/b/label0001.nii.gz")
    assert btcv.liver == (LabelSource(Path("/b/label0001.nii.gz"), (6.0,)),) and btcv.tumour == ()

    patient = tmp_path / "3Dircadb1.1"
    for folder in ("patient_dicom", "MASKS_DICOM/Liver", "MASKS_DICOM/livertumor02", "MASKS_DICOM/livertumor01",
                   "MASKS_DICOM/portalvein"):
        (patient / folder).mkdir(parents=True)
    case = CASE_SOURCES["dicom"].case("dicom-3Dircadb1.1", patient, None)
    assert case.scan == patient / "patient_dicom"  # folder names match in any case
    assert case.liver == (LabelSource(patient / "MASKS_DICOM/Liver"),)
    assert [s.path.name for s in case.tumour] == ["livertumor01", "livertumor02"]
    assert (case.kind, case.image, case.label, case.problem) == ("dicom", str(patient), None, None)
    (patient / "MASKS_DICOM/Liver").rmdir()
    with pytest.raises(VolumeError, match=r"3Dircadb1.1: no MASKS_DICOM/liver folder"):
        CASE_SOURCES["dicom"].case("dicom-3Dircadb1.1", patient, None)
