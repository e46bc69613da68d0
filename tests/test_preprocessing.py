"""The preprocessing record travels with the model (issue 23, acceptance 1): a run trained on
`prepare`d CT with a non-default window predicts the same map, to the last bit, once its
training data is gone; its ONNX and pt2 exports give that map without any manifest; a
checkpoint saved before records existed loads with a warning naming the window it assumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ct_data import liver_phantom, tiny_checkpoint, write_nifti
from medad_fast.cli import main as cli
from medad_fast.methods import config_from_dict, resolve_config
from medad_fast.preprocessing import (PREPROCESSING_KEY, LegacyPreprocessingWarning, Preprocessing,
                                      decide_preprocessing)

pytestmark = pytest.mark.usefixtures("one_thread")

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
WINDOW = ["-100", "300"]  # not prepare's default (-200 250)


def write_lits(src: Path, n: int = 4, shape=(26, 24, 9)) -> None:
    """LiTS-style volumes (label 1 liver, 2 tumour), one bright lesion each."""
    for k in range(n):
        lesion = (10 + k, 12, 3 + k % 3)
        hu, liver = liver_phantom(shape, 2, lesion, seed=k)
        labels = liver.astype(np.uint8)
        labels[lesion] = 2
        write_nifti(src / f"volume-{k}.nii.gz", hu, AFFINE)
        write_nifti(src / f"segmentation-{k}.nii.gz", labels, AFFINE, dtype=np.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny ``ae`` trained 1 epoch on prepare'd CT windowed -100 300, and a scan to score."""
    root = tmp_path_factory.mktemp("windowed")
    write_lits(root / "lits")
    data = root / "data"
    assert cli(["prepare", "lits", str(root / "lits"), str(data), "--window", *WINDOW, "--val-fraction", "0.25",
                "--test-fraction", "0.25", "--no-progress"]) == 0
    run = root / "run"
    assert cli(["train", "--method", "ae", "--preset", "tiny", "--image-size", "32", "--epochs", "1", "--data",
                str(data), "--out", str(run), "--seed", "0", "--no-progress", "--device", "cpu"]) == 0
    hu, liver = liver_phantom((30, 28, 8), 2, (14, 12, 4), seed=9)
    scan = write_nifti(root / "in" / "ct.nii.gz", hu, AFFINE)
    mask = write_nifti(root / "in" / "liver.nii.gz", liver, AFFINE, dtype=np.uint8)
    return {"root": root, "data": data, "run": run, "scan": scan, "mask": mask}


def predict_map(model: Path, trained: dict[str, Path], out: Path) -> tuple[np.ndarray, dict]:
    assert cli(["predict", str(model), str(trained["scan"]), "--liver-mask", str(trained["mask"]), "--out", str(out),
                "--no-progress", "--device", "cpu"]) == 0
    return (np.asarray(nib.load(str(out / "ct_anomaly.nii.gz")).dataobj),
            json.loads((out / "scores.json").read_text()))


def test_the_record_travels_with_the_run_and_its_exports(trained, tmp_path, recwarn):
    run, data = trained["run"], trained["data"]
    record = json.loads((run / "config.json").read_text())["preprocessing"]
    assert record["window"] == [-100.0, 300.0] and record["hist_eq"] is False
    assert record["crop"] == "liver" and record["image_size"] == 32 and record["intensity_range"] == [0.0, 1.0]
    assert record["window_from"] == str((data / "manifest.json").resolve())
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["preprocessing"] == record

    before, scores = predict_map(run, trained, tmp_path / "before")
    assert scores["window"] == [-100.0, 300.0] and scores["preprocessing"] == record
    assert "preprocessing record" in scores["window_from"]
    assert np.abs(before).max() > 0
    # the window matters: prepare's default one (what scoring fell back to without the data) moves the map
    assert cli(["predict", str(run), str(trained["scan"]), "--liver-mask", str(trained["mask"]), "--out",
                str(tmp_path / "default"), "--no-progress", "--window", "-200", "250"]) == 0
    default = np.asarray(nib.load(str(tmp_path / "default" / "ct_anomaly.nii.gz")).dataobj)
    assert np.abs(default - before).max() > 1e-3
    exports = {}
    for fmt in ("pt2", "onnx"):
        exports[fmt] = tmp_path / f"model.{fmt}"
        assert cli(["export", str(run), "--format", fmt, "--out", str(exports[fmt])]) == 0

    moved = trained["root"] / "moved-data"
    shutil.move(str(data), str(moved))  # the training data is gone from where the run names it
    try:
        after, scores = predict_map(run, trained, tmp_path / "after")
        assert after.tobytes() == before.tobytes()  # every bit
        assert scores["window"] == [-100.0, 300.0]
        for fmt, path in exports.items():
            exported, scores = predict_map(path, trained, tmp_path / fmt)
            assert scores["preprocessing"] == record, fmt
            assert np.abs(exported - before).max() <= 1e-5, fmt
    finally:
        shutil.move(str(moved), str(data))
    assert not [w for w in recwarn if issubclass(w.category, LegacyPreprocessingWarning)]


def test_exported_files_carry_the_record_readable_without_medad_fast(trained, tmp_path):
    import zipfile

    import onnx

    record = json.loads((trained["run"] / "config.json").read_text())["preprocessing"]
    assert cli(["export", str(trained["run"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(props[PREPROCESSING_KEY]) == record
    assert cli(["export", str(trained["run"]), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 0
    with zipfile.ZipFile(tmp_path / "m.pt2") as archive:
        name, = [n for n in archive.namelist() if n.endswith(f"/extra/{PREPROCESSING_KEY}")]
        assert json.loads(archive.read(name)) == record


def test_an_old_checkpoint_warns_with_the_window_it_assumes(tmp_path):
    from medad_fast.inference import load_method

    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"generator": "medad_fast.prepare", "sources": [
        {"settings": {"window": [-100.0, 200.0], "hist_eq": True}, "patients": {}}]}))
    old = tiny_checkpoint(tmp_path / "run" / "checkpoint.pt", record=False, data=str(data))
    with pytest.warns(LegacyPreprocessingWarning, match=r"checkpoint.pt has no preprocessing record.*assuming HU "
                      r"window -100 200, hist-eq on \(the settings in .*manifest.json"):
        method, _ = load_method(old)
    assert method.config.preprocessing.window == (-100.0, 200.0) and method.config.preprocessing.hist_eq

    shutil.rmtree(data)  # what scoring assumed before records existed: prepare's defaults, said so
    with pytest.warns(LegacyPreprocessingWarning, match=r"assuming HU window -200 250, hist-eq off \(prepare's "
                      r"defaults: the training data's manifest .*manifest.json is not readable"):
        method, _ = load_method(old)
    assert method.config.preprocessing.window == (-200.0, 250.0)


def test_the_record_is_decided_from_the_training_slices_and_checked(tmp_path):
    run = resolve_config("ae", "tiny", image_size=32).run
    assert decide_preprocessing(run) == Preprocessing(image_size=32)  # no data: prepare's defaults
    data = tmp_path / "data"
    data.mkdir()
    sources = [{"settings": {"window": [-100.0, 200.0], "hist_eq": False}, "patients": {"a": {"split": "train"}}},
               {"settings": {"window": [-50.0, 150.0], "hist_eq": True}, "patients": {"b": {"split": "test"}}}]
    manifest = {"generator": "medad_fast.prepare", "sources": sources}
    (data / "manifest.json").write_text(json.dumps(manifest))
    run = resolve_config("ae", "tiny", image_size=32, data=str(data)).run
    record = decide_preprocessing(run)  # the settings of the source holding the train patients
    assert (record.window, record.hist_eq, record.crop) == ((-100.0, 200.0), False, "liver")
    sources[1]["patients"]["b"]["split"] = "train"
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest.json: the training slices were prepared with different windows"):
        decide_preprocessing(run)

    with pytest.raises(ValueError, match="preprocessing crop must be 'liver' or 'none'"):
        Preprocessing(crop="auto")
    with pytest.raises(ValueError, match="preprocessing window: LO must be smaller than HI"):
        Preprocessing(window=(300.0, -100.0))
    with pytest.raises(ValueError, match=r"intensity_range \[0.0, 255.0\]"):
        Preprocessing.from_dict({"intensity_range": [0, 255]})
    with pytest.raises(ValueError, match=r"unknown preprocessing keys \['gamma'\]"):
        Preprocessing.from_dict({"gamma": 2.0})
    config = resolve_config("ae", "tiny", image_size=32)
    with pytest.raises(ValueError, match="does not match the run"):
        config.with_preprocessing(Preprocessing(image_size=64))
    saved = config.with_preprocessing(Preprocessing(window=(-100.0, 300.0), image_size=32))
    assert config_from_dict(json.loads(json.dumps(saved.to_dict()))) == saved
