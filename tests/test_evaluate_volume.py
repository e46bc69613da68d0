"""`medad-fast evaluate` on CT volumes: slice, pixel (inside the liver), volume and lesion-wise
metrics pooled over scans, checked against the same numbers computed directly on the maps that
`medad-fast predict` writes; the heatmaps of the liver slices; two processes under torchrun
giving one's outputs; input errors; a `prepare` manifest with a valid split.

The method is the tiny ``ae`` with its map made the windowed image (:func:`ct_data.identity_maps`),
so the bright lesions are what it finds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ct_data import AIR, LIVER, identity_maps, liver_phantom, tiny_checkpoint, write_nifti
from medad_fast import metrics
from medad_fast.cli import main as cli

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", image_size=32)


def tumour_ball(shape, centre, radius=1.6) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius ** 2


# scan 2 is stored axial axis first, on another in-plane size: its slices are padded in the pixel stream
AXIAL_AXES = (2, 2, 0)
AFFINE_AXIAL_FIRST = np.array([[0, 0.8, 0, 0], [0, 0, 0.8, 0], [2.5, 0, 0, 0], [0, 0, 0, 1.0]])


def write_cases(folder: Path) -> list[tuple[Path, Path, Path]]:
    """Three scans: two with a bright lesion labelled as tumour (the second also with an
    unlabelled bright blob: a false positive), one without tumour (axial axis first)."""
    cases = []
    for i, lesion in enumerate([(12, 12, 4), (18, 10, 6), None]):
        shape, affine = ((30, 28, 10), AFFINE) if lesion else ((8, 34, 22), AFFINE_AXIAL_FIRST)
        hu, liver = liver_phantom(shape, AXIAL_AXES[i], lesion or (4, 17, 11), seed=i)
        tumour = tumour_ball(shape, lesion) & liver if lesion else np.zeros(shape, bool)
        if lesion is None:
            hu = np.where(liver, LIVER, AIR).astype(np.float32)
        if i == 1:
            hu[tumour_ball(shape, (8, 18, 3))] = 200.0  # an unlabelled bright blob inside the liver
            hu[~liver] = AIR
        cases.append((write_nifti(folder / f"scan{i}.nii.gz", hu, affine),
                      write_nifti(folder / f"liver{i}.nii.gz", liver, affine, dtype=np.uint8),
                      write_nifti(folder / f"tumour{i}.nii.gz", tumour, affine, dtype=np.uint8)))
    return cases


def evaluate(checkpoint, cases, out, *extra) -> int:
    return cli(["evaluate", str(checkpoint), "--scans", *[str(c[0]) for c in cases],
                "--masks", *[str(c[1]) for c in cases], "--labels", *[str(c[2]) for c in cases],
                "--out", str(out), "--no-progress", "--batch-size", "4", *extra])


def test_volume_metrics_match_the_predicted_maps(checkpoint, tmp_path, monkeypatch, capsys):
    identity_maps(monkeypatch)
    cases = write_cases(tmp_path / "in")
    out = tmp_path / "eval"
    run_files = sorted(p.name for p in checkpoint.parent.iterdir())
    assert evaluate(checkpoint, cases, out, "--lesion-thresholds", "100000") == 0
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == run_files  # no operating point without --calibrate
    printed = capsys.readouterr().out
    assert "3 volume(s) (2 with tumour)" in printed and "lesion recall (peak, 2 lesions)" in printed
    assert sorted(p.name for p in out.iterdir()) == ["froc.png", "heatmaps", "metrics.json", "slices.csv",
                                                     "volumes.csv"]
    result = json.loads((out / "metrics.json").read_text())

    # the maps predict writes for the same scans: every number again, directly in 3-D
    assert cli(["predict", str(checkpoint), *[str(c[0]) for c in cases], "--liver-mask",
                *[str(c[1]) for c in cases], "--out", str(tmp_path / "pred"), "--no-progress"]) == 0
    maps = [np.asarray(nib.load(str(tmp_path / "pred" / f"scan{i}_anomaly.nii.gz")).dataobj) for i in range(3)]
    livers = [np.asarray(nib.load(str(c[1])).dataobj) > 0 for c in cases]
    tumours = [np.asarray(nib.load(str(c[2])).dataobj) > 0 for c in cases]
    inside_maps = np.concatenate([m[r] for m, r in zip(maps, livers)])
    inside_tumour = np.concatenate([t[r] for t, r in zip(tumours, livers)])
    assert result["n_pixels"] == inside_maps.size and result["n_abnormal_pixels"] == int(inside_tumour.sum())
    assert result["pixel_auroc"] == pytest.approx(metrics.roc_auc(inside_tumour, inside_maps))
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(inside_tumour, inside_maps), abs=1e-9)
    assert result["pixel_ap"] == pytest.approx(metrics.average_precision(inside_tumour, inside_maps))
    assert result["best_dice"] == pytest.approx(metrics.best_dice(inside_tumour, inside_maps))

    slices = list(csv.DictReader((out / "slices.csv").open()))
    liver_slices = [(i, k) for i, liver in enumerate(livers) for k in range(liver.shape[AXIAL_AXES[i]])
                    if np.take(liver, k, axis=AXIAL_AXES[i]).any()]
    assert [(int(r["name"][-1]), int(r["slice"])) for r in slices] == liver_slices
    assert [int(r["label"]) for r in slices] == [int(np.take(tumours[i], k, axis=AXIAL_AXES[i]).any())
                                                 for i, k in liver_slices]
    assert result["n_slices"] == len(slices) and result["n_abnormal_slices"] == sum(int(r["label"]) for r in slices)
    assert result["image_auroc"] == pytest.approx(metrics.roc_auc([int(r["label"]) for r in slices],
                                                                  [float(r["score"]) for r in slices]), abs=1e-6)

    volumes = list(csv.DictReader((out / "volumes.csv").open()))
    assert [(v["name"], int(v["has_tumour"]), int(v["n_lesions"])) for v in volumes] == [
        ("scan0", 1, 1), ("scan1", 1, 1), ("scan2", 0, 0)]
    predicted = json.loads((tmp_path / "pred" / "scores.json").read_text())["scans"]
    assert [float(v["score"]) for v in volumes] == pytest.approx([e["score"] for e in predicted], abs=1e-6)
    assert result["volume_auroc"] == pytest.approx(
        metrics.roc_auc([1, 1, 0], [e["score"] for e in predicted]))

    expected = metrics.lesion_recall_at_fp(tumours, maps, livers)  # every distinct value: exact
    for rule, key in (("overlap", "lesion_recall_at_fp"), ("peak", "lesion_recall_at_fp_peak")):
        assert result[key] == expected[rule]["recall_at_fp"]
    assert result["lesion_recall_at_fp_peak"]["1"] == 1.0  # both lesions are the brightest spots
    assert result["lesions"]["n_lesions"] == 2 and result["undefined"] == {}

    assert result["operating_point"] is None and result["calibrated"] is False
    # calibrated on the volumes named with --scans: the thresholds of these very maps
    assert evaluate(checkpoint, cases, tmp_path / "calibration", "--calibrate") == 0
    point = json.loads((checkpoint.parent / "operating_point.json").read_text())
    (checkpoint.parent / "operating_point.json").unlink()  # the module's checkpoint is shared
    assert point == json.loads((tmp_path / "calibration" / "metrics.json").read_text())["operating_point"]
    assert point["split"] == "volumes" and point["on_evaluated_split"] is True
    normal = np.sort([float(r["score"]) for r in slices if r["label"] == "0"])
    assert point["slice_threshold"] == pytest.approx(normal[int(np.ceil(0.95 * normal.size)) - 1], abs=1e-6)
    assert point["pixel_threshold"] == pytest.approx(metrics.best_dice_threshold(inside_tumour, inside_maps)[1])


def test_bad_volume_input_is_named(checkpoint, tmp_path, capsys):
    cases = write_cases(tmp_path / "in")
    scan, liver, tumour = cases[0]
    moved = AFFINE.copy()
    moved[:3, 3] += 4.0
    shifted = write_nifti(tmp_path / "in" / "shifted_tumour.nii.gz", np.asarray(nib.load(str(tumour)).dataobj),
                          moved, dtype=np.uint8)
    out = tmp_path / "eval"
    assert evaluate(checkpoint, [(scan, liver, shifted)], out) == 2
    err = capsys.readouterr().err
    assert "tumour label" in err and "shifted_tumour.nii.gz" in err and "scan0.nii.gz" in err and "affine" in err
    assert not out.exists()
    assert cli(["evaluate", str(checkpoint), "--scans", str(scan), "--masks", str(liver), "--labels", str(tumour),
                str(tumour), "--out", str(out)]) == 2
    assert "1 scan(s), 1 liver mask(s) (--masks) and 2 tumour label(s)" in capsys.readouterr().err
    assert cli(["evaluate", str(checkpoint), "--scans", str(scan), "--masks", str(liver)]) == 2
    assert "--labels" in capsys.readouterr().err
    assert cli(["evaluate", str(checkpoint), "--data", str(tmp_path), "--scans", str(scan)]) == 2
    assert "--data and --scans" in capsys.readouterr().err
    assert cli(["evaluate", str(checkpoint), "--manifest", str(tmp_path / "nothing.json")]) == 2
    assert "nothing.json" in capsys.readouterr().err


def test_manifest_of_prepare_with_a_valid_split(checkpoint, tmp_path, monkeypatch, capsys):
    """LiTS-style volumes through `prepare`, then `evaluate --manifest`: the test patients are
    evaluated and the run is left alone; `--calibrate` takes the operating point from the
    valid patients (and is refused on the test ones)."""
    identity_maps(monkeypatch)
    src = tmp_path / "lits"
    shape = (26, 24, 9)
    for n in range(4):
        lesion = (10 + n, 12, 3 + n % 3)
        hu, liver = liver_phantom(shape, 2, lesion, seed=n)
        labels = liver.astype(np.uint8)
        labels[tumour_ball(shape, lesion) & liver] = 2
        write_nifti(src / f"volume-{n}.nii.gz", hu, AFFINE)
        write_nifti(src / f"segmentation-{n}.nii.gz", labels, AFFINE, dtype=np.uint8)
    data = tmp_path / "data"
    assert cli(["prepare", "lits", str(src), str(data), "--val-fraction", "0.25", "--test-fraction", "0.25",
                "--no-progress"]) == 0
    manifest = json.loads((data / "manifest.json").read_text())
    splits = {p: info["split"] for p, info in manifest["sources"][0]["patients"].items()}
    capsys.readouterr()
    assert cli(["evaluate", str(checkpoint), "--manifest", str(data / "manifest.json"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    out = checkpoint.parent.parent / f"{checkpoint.parent.name}-eval-volumes-test"  # beside the run
    result = json.loads((out / "metrics.json").read_text())
    assert [v["name"] for v in result["volumes"]] == sorted(p for p, s in splits.items() if s == "test")
    assert result["split"] == "test" and result["n_volumes_with_tumour"] == result["n_volumes"]
    assert result["volumes"][0]["n_lesions"] == 1
    assert result["operating_point"] is None and "calibrated on" not in printed
    assert not (checkpoint.parent / "operating_point.json").exists()

    manifest_args = ["evaluate", str(checkpoint), "--manifest", str(data / "manifest.json"), "--no-progress"]
    assert cli([*manifest_args, "--calibrate", "--split", "test"]) == 2
    assert "--calibrate on --split test" in capsys.readouterr().err
    assert not (checkpoint.parent / "operating_point.json").exists()
    assert cli([*manifest_args, "--calibrate", "--out", str(tmp_path / "calibration")]) == 0  # --split valid
    printed = capsys.readouterr().out
    point = json.loads((checkpoint.parent / "operating_point.json").read_text())
    (checkpoint.parent / "operating_point.json").unlink()  # the module's checkpoint is shared
    assert point["split"] == "valid" and point["on_evaluated_split"] is True
    assert "calibrated on the 1 evaluated volume(s) of" in printed


def test_dicom_scan_with_dicom_liver_and_a_nifti_tumour_in_another_voxel_order(checkpoint, tmp_path, monkeypatch):
    from ct_data import DicomGrid, rotation, write_dicom_series

    identity_maps(monkeypatch)
    grid = DicomGrid(rotation(0.2, -0.1, 0.3), spacing=(0.8, 0.7), step=2.0)
    shape, lesion = (32, 28, 9), (14, 12, 4)  # [column, row, slice]
    hu, liver = liver_phantom(shape, 2, lesion)
    tumour = tumour_ball(shape, lesion) & liver
    write_dicom_series(tmp_path / "CT", hu, grid)
    write_dicom_series(tmp_path / "liver", liver, grid, modality="OT", label=True, seed=1)
    stored = write_nifti(tmp_path / "tumour.nii.gz", tumour.transpose(2, 1, 0), grid.affine(shape[2])[:, [2, 1, 0, 3]],
                         dtype=np.uint8)
    out = tmp_path / "eval"
    assert evaluate(checkpoint, [(tmp_path / "CT", tmp_path / "liver", stored)], out) == 0
    result = json.loads((out / "metrics.json").read_text())
    volume, = result["volumes"]
    assert volume["tumour_voxels"] == int(tumour.sum()) and volume["n_lesions"] == 1
    assert volume["n_tumour_slices"] == int(tumour.any(axis=(0, 1)).sum())
    assert result["n_abnormal_pixels"] == int(tumour.sum()) and result["lesion_recall_at_fp_peak"]["1"] == 1.0
    assert result["undefined"]["volume"].startswith("needs two or more scans")


def test_volume_heatmaps_show_the_worst_and_best_liver_slices(checkpoint, tmp_path, monkeypatch):
    from PIL import Image

    identity_maps(monkeypatch)
    cases = write_cases(tmp_path / "in")
    out = tmp_path / "eval"
    assert evaluate(checkpoint, cases, out, "--cases", "2") == 0
    slices = list(csv.DictReader((out / "slices.csv").open()))
    labels = np.array([r["label"] == "1" for r in slices])
    scores = np.array([float(r["score"]) for r in slices])
    names = [f"{r['name']}-slice{int(r['slice']):04d}" for r in slices]
    expected = []
    for kind, index in (("abnormal", np.flatnonzero(labels)), ("normal", np.flatnonzero(~labels))):
        ranked = index[np.argsort(scores[index], kind="stable")]  # ascending
        worst, best = (ranked, ranked[::-1]) if kind == "abnormal" else (ranked[::-1], ranked)
        for quality, order in (("worst", worst), ("best", best)):
            expected += [f"{quality}-{kind}-{rank:02d}-{names[i]}-score{scores[i]:.3f}.png"
                         for rank, i in enumerate(order[:2], start=1)]
    written = sorted(p.name for p in (out / "heatmaps").iterdir())
    assert written == sorted(expected) and len(written) == 8
    for name in written:
        tile = np.asarray(Image.open(out / "heatmaps" / name).convert("RGB"))
        half = tile.shape[1] // 2
        image, overlay = tile[:, :half], tile[:, half:]
        assert image.max() > 0  # the windowed liver slice, read again from its scan
        outline = (overlay == (0, 255, 0)).all(axis=-1).any()
        assert outline == ("-abnormal-" in name), name  # the tumour outline on slices with tumour only
    assert json.loads((out / "metrics.json").read_text())["heatmap_scale"] > 0


def test_torchrun_volume_evaluation_equals_one_process(checkpoint, tmp_path):
    """3 volumes over 2 gloo processes (2 + 1): the same files as one process, bit for bit."""
    import textwrap

    from test_distributed import run_torchrun

    cases = write_cases(tmp_path / "in")
    args = ["--scans", *[str(c[0]) for c in cases], "--masks", *[str(c[1]) for c in cases],
            "--labels", *[str(c[2]) for c in cases], "--no-progress", "--batch-size", "4", "--cases", "1",
            "--device", "cpu", "--lesion-thresholds", "50"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process computes
    try:
        assert cli(["evaluate", str(checkpoint), *args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "evaluate.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from medad_fast.cli import main
        sys.exit(main(["evaluate", {str(checkpoint)!r}, *{args!r}, "--out", {str(tmp_path / "two")!r}]))
    """))
    result = run_torchrun(script)
    assert result.stdout.count("volume AUROC") == 1, "only rank 0 prints"
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no spill left
    for name in ("volumes.csv", "slices.csv"):
        assert (two / name).read_text() == (one / name).read_text(), name
    metrics_one, metrics_two = (json.loads((folder / "metrics.json").read_text()) for folder in (one, two))
    for timing in ("scoring_seconds", "cpu_isa"):
        del metrics_one[timing], metrics_two[timing]
    assert metrics_two == metrics_one
    assert metrics_one["lesions"]["n_lesions"] == 2 and metrics_one["n_volumes"] == 3
    assert sorted(p.name for p in (two / "heatmaps").iterdir()) == sorted(p.name for p in (one / "heatmaps").iterdir())
