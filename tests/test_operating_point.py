"""Operating points: the 95 %-specificity slice threshold and the best-Dice pixel threshold that
`medad-fast evaluate --calibrate` chooses on a validation split and stores in the run folder
(plain `evaluate` leaves the run folder byte-identical), and `medad-fast predict --threshold` /
the stored point writing NAME_lesions.nii.gz."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ct_data import identity_maps, liver_phantom, tiny_checkpoint, write_nifti
from medad_fast.cli import main as cli
from medad_fast.data.phantom import write_phantom_dataset
from medad_fast import operating_point as operating_point_module
from medad_fast.metrics import PixelMetricsStream
from medad_fast.operating_point import choose_operating_point, read_operating_point, slice_threshold_at_specificity


def test_slice_threshold_by_hand():
    scores = np.arange(1.0, 21.0)[::-1]  # 20 normal slices scoring 1..20
    assert slice_threshold_at_specificity(scores) == 19.0  # 19 of 20 (95 %) score <= 19
    assert slice_threshold_at_specificity(scores[:10]) == 20.0  # 10 slices: 95 % needs all 10
    assert slice_threshold_at_specificity([3.0, 1.0, 2.0], 0.5) == 2.0
    with pytest.raises(ValueError, match="normal slices"):
        slice_threshold_at_specificity([])
    with pytest.raises(ValueError, match="specificity"):
        slice_threshold_at_specificity([1.0], 0.0)


def test_choose_operating_point_by_hand(tmp_path):
    labels = [False, False, False, False, True, True]
    scores = [4.0, 1.0, 3.0, 2.0, 5.0, 0.5]  # 4 normal slices: 95 % needs all 4, so the threshold is 4
    with PixelMetricsStream(str(tmp_path / "spill")) as stream:
        mask = np.zeros((1, 2, 3), bool)
        mask[0, 0, :2] = True  # two lesion pixels scoring 0.9 and 0.7; the background 0.1 .. 0.8
        stream.add(mask, np.array([[[0.9, 0.7, 0.1], [0.8, 0.2, 0.1]]], np.float32))
        purposes = []
        point = choose_operating_point(labels, scores, lambda purpose: purposes.append(purpose) or
                                       stream.counts(purpose), "valid", "the valid split of here")
    assert purposes == ["the operating point"]
    assert point["slice_threshold"] == 4.0 and point["slice_sensitivity"] == 0.5 and point["slice_specificity"] == 1.0
    # map >= 0.9: Dice 2*1/(1+2) = 2/3; >= 0.8: 2*1/(2+2) = 0.5; >= 0.7: 2*2/(3+2) = 0.8, the best
    assert point["pixel_threshold"] == pytest.approx(0.7) and point["pixel_dice"] == pytest.approx(0.8)
    assert point["source"] == "the valid split of here" and point["on_evaluated_split"] is True
    image_level = choose_operating_point(labels, scores, None, "valid", "x")  # no masks: no pixel threshold
    assert image_level["pixel_threshold"] is None and image_level["slice_threshold"] == 4.0
    with pytest.raises(ValueError, match=r"^--calibrate: no operating point from the 2 volumes: .*normal slices"):
        choose_operating_point([True, True], [1.0, 2.0], None, "volumes", "the 2 volumes")


def test_slice_and_volume_evaluation_choose_the_operating_point_in_one_place(tmp_path, monkeypatch, capsys):
    """Both drivers go through :func:`choose_operating_point`: the same rule, the same
    error when the data cannot give a point (here: no lesion pixel)."""
    calls = []
    chosen = operating_point_module.operating_point
    monkeypatch.setattr(operating_point_module, "operating_point",
                        lambda *args, **kwargs: calls.append(args[3]) or chosen(*args, **kwargs))
    run = run_folder(tmp_path)
    data = tmp_path / "normal-only"
    write_phantom_dataset(data, n_train=2, n_test=2, n_valid=4, size=32, seed=5, progress=False)
    for folder in (data / "valid").iterdir():
        if folder.name != "good":  # a valid split of normal slices only: no lesion pixel
            shutil.rmtree(folder)
    assert cli(["evaluate", str(run), "--data", str(data), "--calibrate", "--out", str(tmp_path / "slices"),
                "--no-progress", "--cases", "0"]) == 2
    assert (f"--calibrate: no operating point from the valid split of {data.resolve()}: "
            in capsys.readouterr().err)
    identity_maps(monkeypatch)
    hu, liver = liver_phantom((30, 28, 12), 2, (14, 12, 4))  # liver slices 2..9, the lesion's 2..6
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    scan = write_nifti(tmp_path / "in" / "ct.nii.gz", hu, affine)
    mask = write_nifti(tmp_path / "in" / "liver.nii.gz", liver, affine, dtype=np.uint8)
    no_tumour = write_nifti(tmp_path / "in" / "tumour.nii.gz", np.zeros_like(liver), affine, dtype=np.uint8)
    assert cli(["evaluate", str(run), "--scans", str(scan), "--masks", str(mask), "--labels", str(no_tumour),
                "--calibrate", "--out", str(tmp_path / "volumes"), "--no-progress"]) == 2
    assert "--calibrate: no operating point from the 1 evaluated volume(s) (--scans): " in capsys.readouterr().err
    assert calls == []  # both stopped at the pixel counts, before the thresholds
    assert not (run / "operating_point.json").exists()
    phantom = tmp_path / "phantom"
    write_phantom_dataset(phantom, n_train=2, n_test=2, n_valid=8, size=32, seed=5, progress=False)
    assert cli(["evaluate", str(run), "--data", str(phantom), "--calibrate", "--out", str(tmp_path / "ok"),
                "--no-progress", "--cases", "0"]) == 0
    tumour = write_nifti(tmp_path / "in" / "tumour2.nii.gz", (hu > 150) & liver, affine, dtype=np.uint8)
    assert cli(["evaluate", str(run), "--scans", str(scan), "--masks", str(mask), "--labels", str(tumour),
                "--calibrate", "--out", str(tmp_path / "ok-volumes"), "--no-progress"]) == 0
    assert calls == ["valid", "volumes"]  # the split each was chosen on


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
