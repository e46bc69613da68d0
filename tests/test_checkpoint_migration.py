"""Checkpoints written before the method interface (format 1, commit ef63857) still load,
evaluate to the metrics that code computed, and resume training.

The fixture was made by the old code with the commands recorded next to it
(``tests/fixtures/checkpoint-ef63857-tiny.json``); the phantom data is regenerated here
from the same seed (the phantom generator is deterministic)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medad_fast.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from medad_fast.cli import main as cli
from medad_fast.data.phantom import write_phantom_dataset

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint-ef63857-tiny.pt"
RECORD = json.loads((FIXTURES / "checkpoint-ef63857-tiny.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    p = RECORD["phantom"]
    write_phantom_dataset(root, n_train=p["n_train"], n_test=p["n_test"], size=p["size"], seed=p["seed"],
                          progress=False)
    return root


def test_format_1_checkpoint_is_migrated_on_load():
    raw = torch.load(CHECKPOINT, weights_only=True)
    assert raw["format"] == "medad_fast.checkpoint/1" and "alpha" in raw and "optimizer" in raw
    state = load_checkpoint(CHECKPOINT)
    assert state["format"] == CHECKPOINT_FORMAT and state["method"] == "frequency_aware"
    assert state["method_state"] == {"alpha": pytest.approx(raw["alpha"])}
    assert len(state["optimizers"]) == len(state["schedulers"]) == 1
    assert set(state["model"]) == {f"model.{k}" for k in raw["model"]}
    assert state["config"]["run"]["preset"] == "small" and state["config"]["method_config"]["recon_width"] == 2


def test_format_1_checkpoint_evaluates_to_the_old_codes_metrics(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "eval"
    run = tmp_path / "run"  # evaluate stores an operating point beside the checkpoint: not in the sources
    run.mkdir()
    shutil.copy(CHECKPOINT, run / "checkpoint.pt")
    assert cli(["evaluate", str(run / "checkpoint.pt"), "--data", str(data), "--out", str(out), "--device", "cpu",
                "--no-progress", "--cases", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    exact = ("n_images", "n_pixels", "epoch", "alpha")  # counts, and a value no convolution touches
    for key, expected in RECORD["metrics"].items():
        # the rest go through the networks: oneDNN picks AVX2 or AVX-512 convolution kernels by CPU,
        # which moves the maps' last bits (a pixel AUROC by 5e-6 between two EPYC machines); a
        # wrongly migrated weight or alpha moves them by orders of magnitude more
        tolerance = dict(rel=1e-12, abs=1e-12) if key in exact else dict(rel=1e-4, abs=1e-4)
        assert metrics[key] == pytest.approx(expected, **tolerance), key


def test_format_1_checkpoint_resumes_training(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(CHECKPOINT, run / "checkpoint.pt")
    args = ["train", "--data", str(data), "--out", str(run), "--preset", "small", "--image-size", "32",
            "--recon-width", "2", "--seg-width", "2", "--batch-size", "4", "--source-pool-size", "4", "--seed", "11",
            "--lr", "0.005", "--epochs", "13", "--no-progress", "--device", "cpu"]
    assert cli(args) == 2  # a run directory with a checkpoint needs --resume
    assert cli([*args, "--resume"]) == 0
    state = load_checkpoint(run / "checkpoint.pt")
    assert (state["epoch"], state["step"]) == (13, 52) and state["format"] == CHECKPOINT_FORMAT
    assert state["method_state"]["alpha"] < RECORD["metrics"]["alpha"]  # alpha went on decaying


def test_format_1_mid_epoch_sums_get_todays_names():
    from medad_fast.checkpoint import migrate_checkpoint
    raw = torch.load(CHECKPOINT, weights_only=True)
    raw["epoch_progress"] = {"permutation": torch.arange(16), "position": 2, "seconds": 1.0,
                             "rank_sums": [{"sums": {"total": 3.0, "rec": 1.0, "focal": 0.5}, "anomalous_sum": 1.5}]}
    sums = migrate_checkpoint(raw)["epoch_progress"]["rank_sums"][0]["sums"]
    assert sums == {"loss": 3.0, "loss_rec": 1.0, "loss_focal": 0.5, "anomalous_fraction": 1.5}
