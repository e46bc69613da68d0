"""`medad-fast evaluate` scores with a file of `medad-fast export` (.pt2, .onnx) on BMAD slices
and on CT volumes, with the checkpoint's metrics; `--reference-ops` and `--compile` reach the
volume evaluation as they reach the slice one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ct_data import liver_phantom, tiny_checkpoint, write_nifti
from medad_fast import inference, ops
from medad_fast.cli import main as cli
from medad_fast.data.phantom import write_phantom_dataset

#: the bound of test_export: exported maps and scores within it of the checkpoint's
TOLERANCE = 1e-4
METRICS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro_0.3", "best_dice")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", image_size=32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_train=2, n_test=8, n_valid=2, size=32, seed=5, progress=False)
    return root


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> list[str]:
    """Two CT phantoms with a bright lesion labelled as tumour, one without: ``--scans ...
    --masks ... --labels ...``."""
    folder = tmp_path_factory.mktemp("ct")
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    scans, masks, labels = [], [], []
    for i, lesion in enumerate([(14, 12, 4), (10, 16, 6), None]):
        hu, liver = liver_phantom((30, 28, 12), 2, lesion or (14, 14, 5), seed=i)
        tumour = (hu > 150) & liver if lesion else np.zeros_like(liver)
        if lesion is None:
            hu = np.where(liver, 60.0, -1000.0).astype(np.float32)
        scans.append(str(write_nifti(folder / f"ct{i}.nii.gz", hu, affine)))
        masks.append(str(write_nifti(folder / f"liver{i}.nii.gz", liver, affine, dtype=np.uint8)))
        labels.append(str(write_nifti(folder / f"tumour{i}.nii.gz", tumour, affine, dtype=np.uint8)))
    return ["--scans", *scans, "--masks", *masks, "--labels", *labels]


def evaluated(scorer: Path, inputs: list[str], out: Path) -> dict:
    assert cli(["evaluate", str(scorer), *inputs, "--out", str(out), "--no-progress", "--cases", "1",
                "--batch-size", "3"]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_evaluate_an_exported_file_gives_the_checkpoints_metrics(fmt, run, phantom, volumes, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    exported = tmp_path / f"model.{fmt}"
    assert cli(["export", str(run), "--format", fmt, "--out", str(exported)]) == 0
    for name, inputs in (("slices", ["--data", str(phantom)]), ("volumes", volumes)):
        expected = evaluated(run, inputs, tmp_path / f"{name}-ckpt")
        got = evaluated(exported, inputs, tmp_path / f"{name}-{fmt}")
        assert expected["scorer"] == "checkpoint" and expected["epoch"] == 0 and expected["weights"] == "last"
        assert got["scorer"] == fmt and got["epoch"] is None and got["weights"] is None  # the file does not say
        assert got["checkpoint"] == str(exported.resolve())
        assert got["preprocessing"] == expected["preprocessing"]
        assert expected["pixel_auroc"] is not None and 0.0 < expected["best_dice"] < 1.0, name  # real figures
        for key in METRICS:
            assert got[key] == pytest.approx(expected[key], abs=TOLERANCE), (name, key)
        if name == "volumes":
            assert expected["n_volumes_with_tumour"] == 2 and got["volume_auroc"] == expected["volume_auroc"]
            assert [v["score"] for v in got["volumes"]] == pytest.approx(
                [v["score"] for v in expected["volumes"]], abs=TOLERANCE)


def test_volume_evaluation_takes_reference_ops_and_compile(run, volumes, tmp_path, monkeypatch):
    used, compiled = [], []
    reference = ops.use_reference

    def recording_reference():
        used.append(True)
        return reference()

    monkeypatch.setattr(ops, "use_reference", recording_reference)
    monkeypatch.setattr(inference, "compile_networks", lambda method: compiled.append(type(method).__name__))
    expected = evaluated(run, volumes, tmp_path / "plain")
    assert used == [] and compiled == []
    got = evaluated(run, [*volumes, "--reference-ops", "--compile"], tmp_path / "flags")
    assert used == [True] and compiled == ["AutoencoderMethod"]
    for key in METRICS:
        assert got[key] == pytest.approx(expected[key], abs=TOLERANCE), key
