"""Operating points: the 95 %-specificity slice threshold and the best-Dice pixel threshold that
`medad-fast evaluate --calibrate` chooses on a validation split and stores in the run folder
(plain `evaluate` leaves the run folder byte-identical), and `medad-fast predict --threshold` /
the stored point writing NAME_lesions.nii.gz."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ct_data import identity_maps, liver_phantom, tiny_checkpoint, write_nifti
from medad_fast.cli import main as cli
from medad_fast.data.phantom import write_phantom_dataset
from medad_fast.operating_point import read_operating_point, slice_threshold_at_specificity


def test_slice_threshold_by_hand():
    scores = np.arange(1.0, 21.0)[::-1]  # 20 normal slices scoring 1..20
    assert slice_threshold_at_specificity(scores) == 19.0  # 19 of 20 (95 %) score <= 19
    assert slice_threshold_at_specificity(scores[:10]) == 20.0  # 10 slices: 95 % needs all 10
    assert slice_threshold_at_specificity([3.0, 1.0, 2.0], 0.5) == 2.0
    with pytest.raises(ValueError, match="normal slices"):
        slice_threshold_at_specificity([])
    with pytest.raises(ValueError, match="specificity"):
        slice_threshold_at_specificity([1.0], 0.0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_train=2, n_test=8, n_valid=8, size=32, seed=5, progress=False)
    return root


def run_folder(tmp_path: Path) -> Path:
    return tiny_checkpoint(tmp_path / "run" / "checkpoint.pt", image_size=32).parent


def run_files(run: Path) -> dict[str, str]:
    """Every file under the run folder, hidden ones included, with its SHA-256."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_evaluate_on_test_leaves_the_run_byte_identical(phantom, tmp_path, capsys):
    run = run_folder(tmp_path)
    (run / "config.json").write_text("{}")  # a run folder holds more than the checkpoint
    before = run_files(run)
    assert cli(["evaluate", str(run), "--data", str(phantom), "--no-progress", "--cases", "1"]) == 0
    assert "calibrated" not in capsys.readouterr().out
    assert run_files(run) == before
    metrics = json.loads((tmp_path / "run-eval-test" / "metrics.json").read_text())  # the default --out: beside it
    assert metrics["split"] == "test" and metrics["operating_point"] is None and metrics["calibrated"] is False
    # calibrating on the test (or train) split is refused before anything is scored
    for split in ("test", "train"):
        out = tmp_path / f"calibrate-{split}"
        assert cli(["evaluate", str(run), "--data", str(phantom), "--split", split, "--calibrate", "--out", str(out),
                    "--no-progress"]) == 2
        assert f"--calibrate on --split {split}" in capsys.readouterr().err
        assert run_files(run) == before and not out.exists()


def test_calibrate_stores_the_operating_point_of_valid_and_predict_uses_it(phantom, tmp_path, monkeypatch, capsys):
    run = run_folder(tmp_path)
    out = tmp_path / "calibration"
    assert cli(["evaluate", str(run), "--data", str(phantom), "--calibrate", "--out", str(out), "--no-progress",
                "--cases", "0"]) == 0  # --split valid: the default with --calibrate
    assert f"calibrated on the valid split of {phantom.resolve()}" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    point = metrics["operating_point"]
    assert point == json.loads((run / "operating_point.json").read_text())
    assert metrics["split"] == point["split"] == "valid" and point["on_evaluated_split"] is True
    assert point["target_specificity"] == 0.95 and point["slice_specificity"] >= 0.95
    rows = list(csv.DictReader((out / "scores.csv").open()))
    normal = np.sort([float(r["score"]) for r in rows if r["label"] == "0"])
    assert point["slice_threshold"] == pytest.approx(normal[int(np.ceil(0.95 * normal.size)) - 1], rel=1e-6)
    assert point["pixel_dice"] == pytest.approx(metrics["best_dice"])
    assert read_operating_point(run)["pixel_threshold"] == point["pixel_threshold"]

    # predict on a CT scan takes the calibrated pixel threshold and says where it came from
    identity_maps(monkeypatch)
    hu, liver = liver_phantom((30, 28, 8), 2, (14, 12, 4))
    affine = np.diag([-0.8, 0.9, 2.0, 1.0])
    scan = write_nifti(tmp_path / "in" / "ct.nii.gz", hu, affine)
    mask = write_nifti(tmp_path / "in" / "liver.nii.gz", liver, affine, dtype=np.uint8)
    assert cli(["predict", str(run), str(scan), "--liver-mask", str(mask), "--out", str(tmp_path / "pred"),
                "--no-progress"]) == 0
    assert f"from {run / 'operating_point.json'} (calibrated on the valid split" in capsys.readouterr().out
    scores = json.loads((tmp_path / "pred" / "scores.json").read_text())
    assert scores["threshold"] == point["pixel_threshold"] and scores["slice_threshold"] == point["slice_threshold"]
    anomaly = np.asarray(nib.load(str(tmp_path / "pred" / "ct_anomaly.nii.gz")).dataobj)
    lesions = np.asarray(nib.load(str(tmp_path / "pred" / "ct_lesions.nii.gz")).dataobj) == 1
    assert np.array_equal(lesions, (anomaly >= np.float32(point["pixel_threshold"])) & liver)


def test_predict_writes_lesion_masks_at_the_threshold(tmp_path, monkeypatch, capsys):
    identity_maps(monkeypatch)
    run = run_folder(tmp_path)
    affine = np.diag([-0.8, 0.9, 2.0, 1.0])
    hu, liver = liver_phantom((30, 28, 8), 2, (14, 12, 4))
    scan = write_nifti(tmp_path / "in" / "ct.nii.gz", hu, affine)
    mask = write_nifti(tmp_path / "in" / "liver.nii.gz", liver, affine, dtype=np.uint8)

    def predict(out, *extra):
        return cli(["predict", str(run), str(scan), "--liver-mask", str(mask), "--out", str(tmp_path / out),
                    "--no-progress", *extra])

    assert predict("plain") == 0  # no threshold, no stored point: no lesion masks, and a line says why
    assert "no lesion masks: no --threshold and the run is not calibrated" in capsys.readouterr().out
    assert not (tmp_path / "plain" / "ct_lesions.nii.gz").exists()
    assert json.loads((tmp_path / "plain" / "scores.json").read_text())["threshold"] is None
    anomaly = np.asarray(nib.load(str(tmp_path / "plain" / "ct_anomaly.nii.gz")).dataobj)

    threshold = float(np.quantile(anomaly[liver], 0.99))
    assert predict("given", "--threshold", str(threshold)) == 0
    lesions = nib.load(str(tmp_path / "given" / "ct_lesions.nii.gz"))
    assert lesions.get_data_dtype() == np.uint8 and np.allclose(lesions.affine, nib.load(str(scan)).affine)
    expected = (anomaly >= np.float32(threshold)) & liver
    assert np.array_equal(np.asarray(lesions.dataobj) == 1, expected) and expected.any()
    scores = json.loads((tmp_path / "given" / "scores.json").read_text())
    assert scores["threshold"] == threshold and scores["threshold_from"] == "--threshold"
    assert scores["scans"][0]["lesion_voxels"] == int(expected.sum())

    stored = {"pixel_threshold": threshold, "slice_threshold": 0.5, "split": "valid"}
    (run / "operating_point.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert predict("stored") == 0
    assert "from " + str(run / "operating_point.json") in capsys.readouterr().out
    scores = json.loads((tmp_path / "stored" / "scores.json").read_text())
    assert scores["threshold"] == threshold and "operating_point.json" in scores["threshold_from"]
    assert scores["slice_threshold"] == 0.5
    assert [s["flagged"] for s in scores["scans"][0]["slices"]] == [s["score"] > 0.5 for s in
                                                                    scores["scans"][0]["slices"]]
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "stored" / "ct_lesions.nii.gz")).dataobj) == 1, expected)

    (run / "operating_point.json").write_text("{not json")
    assert predict("broken") == 2
    assert "operating_point.json" in capsys.readouterr().err and not (tmp_path / "broken").exists()
    assert predict("override", "--threshold", "0.5") == 0  # --threshold needs no stored point...
