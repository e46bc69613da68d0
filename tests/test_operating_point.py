"""Operating points: the 95 %-specificity slice threshold and the best-Dice pixel threshold that
`medad-fast evaluate` stores in the run folder (from valid/ when there is one), and
`medad-fast predict --threshold` / the stored point writing NAME_lesions.nii.gz."""

from __future__ import annotations

import csv
import json
import shutil
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


def test_evaluate_stores_the_operating_point_from_valid(phantom, tmp_path, capsys):
    run = run_folder(tmp_path)
    assert cli(["evaluate", str(run), "--data", str(phantom), "--no-progress", "--cases", "0"]) == 0
    assert "operating point from the valid split" in capsys.readouterr().out
    test_metrics = json.loads((run / "eval-test" / "metrics.json").read_text())
    point = test_metrics["operating_point"]
    assert point == json.loads((run / "operating_point.json").read_text())
    assert point["split"] == "valid" and point["on_evaluated_split"] is False
    assert point["target_specificity"] == 0.95 and point["slice_specificity"] >= 0.95

    # evaluating valid itself: its scores give the same slice threshold, its pixels the same pixel threshold
    assert cli(["evaluate", str(run), "--data", str(phantom), "--split", "valid", "--no-progress", "--cases", "0"]) == 0
    rows = list(csv.DictReader((run / "eval-valid" / "scores.csv").open()))
    normal = np.sort([float(r["score"]) for r in rows if r["label"] == "0"])
    assert point["slice_threshold"] == pytest.approx(normal[int(np.ceil(0.95 * normal.size)) - 1], rel=1e-6)
    again = read_operating_point(run)
    assert again["split"] == "valid" and again["on_evaluated_split"] is True
    assert again["pixel_threshold"] == point["pixel_threshold"] and again["pixel_dice"] == point["pixel_dice"]
    assert again["pixel_dice"] == pytest.approx(
        json.loads((run / "eval-valid" / "metrics.json").read_text())["best_dice"])


def test_without_valid_the_evaluated_split_is_used(phantom, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(phantom, data)
    shutil.rmtree(data / "valid")
    run = run_folder(tmp_path)
    assert cli(["evaluate", str(run), "--data", str(data), "--no-progress", "--cases", "0"]) == 0
    point = read_operating_point(run)
    assert point["split"] == "test" and point["on_evaluated_split"] is True
    best_dice = json.loads((run / "eval-test" / "metrics.json").read_text())["best_dice"]
    assert point["pixel_dice"] == pytest.approx(best_dice)


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

    assert predict("plain") == 0  # no threshold, no stored point: no lesion masks
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
