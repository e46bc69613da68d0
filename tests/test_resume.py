"""Fault tolerance of training: deterministic runs, SIGKILL/SIGTERM/SIGINT mid-epoch and exact
resume, truncated checkpoints, NaN losses, keep-K (tiny phantom data, CPU, one thread)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medad_fast import train as train_module
from medad_fast.checkpoint import list_checkpoints
from medad_fast.cli import main as cli
from medad_fast.methods import resolve_config
from medad_fast.data.phantom import write_phantom_dataset
from medad_fast.train import TrainingInterrupted, train

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "train_driver.py"
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 16 training images, batch 4
TINY = {"image_size": 32, "recon_width": 2, "seg_width": 2, "batch_size": 4, "source_pool_size": 4, "seed": 11}
TINY_ARGS = ["--preset", "small", "--image-size", "32", "--recon-width", "2", "--seg-width", "2",
             "--batch-size", "4", "--source-pool-size", "4", "--seed", "11", "--deterministic", "--no-progress",
             "--keep-checkpoints", "2", "--checkpoint-every", "1"]
LOGGED_VALUES = ("epoch", "step", "loss", "loss_rec", "loss_seg", "loss_mse", "loss_ssim", "loss_l1", "loss_focal",
                 "alpha", "lr", "anomalous_fraction")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("MEDAD_FAST_CACHE")
    os.environ["MEDAD_FAST_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("MEDAD_FAST_CACHE", None)
    else:
        os.environ["MEDAD_FAST_CACHE"] = previous


@pytest.fixture(scope="module")
def data(tmp_path_factory, cache) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_train=16, n_test=8, size=64, seed=1, progress=False)
    return root


def tiny_config(data: Path, epochs: int = EPOCHS):
    return resolve_config("frequency_aware", "small", epochs=epochs, data=str(data), **TINY)


def run_driver(record_dir: Path, cli_args: list[str], signal_at: tuple[int, str] | None = None
               ) -> subprocess.CompletedProcess:
    """``tests/train_driver.py`` in a fresh process (one thread), recording every step."""
    record_dir.mkdir(parents=True, exist_ok=True)
    options = ["--signal-at", str(signal_at[0]), signal_at[1]] if signal_at else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(DRIVER), str(record_dir), *options, "--", *cli_args],
                          env=env, capture_output=True, text=True, timeout=120)


def read_records(record_dir: Path, rank: int = 0) -> list[dict]:
    lines = (record_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def steps_of(records: list[dict]) -> list[dict]:
    return [r for r in records if r["event"] == "step"]


def logged(run: Path) -> list[dict]:
    """The deterministic part of log.jsonl (timings removed)."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]
    return [{k: r[k] for k in LOGGED_VALUES} for r in records]


def assert_same_training_state(run_a: Path, run_b: Path) -> None:
    """Final checkpoints bitwise equal: weights, optimizer moments, schedules, generators."""
    a = torch.load(run_a / "checkpoint.pt", weights_only=True)
    b = torch.load(run_b / "checkpoint.pt", weights_only=True)
    assert (a["epoch"], a["step"], a["method_state"]) == (b["epoch"], b["step"], b["method_state"])
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"weights differ: {name}"
    for index, state in a["optimizers"][0]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizers"][0]["state"][index][key]), f"Adam {key} of {index} differs"
    assert a["schedulers"] == b["schedulers"]
    assert torch.equal(a["generators"]["data"], b["generators"]["data"])
    assert torch.equal(a["generators"]["method"], b["generators"]["method"])


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, list[dict]]:
    """An uninterrupted deterministic run in its own process, with its per-step record."""
    base = tmp_path_factory.mktemp("reference")
    result = run_driver(base / "record", ["train", "--data", str(data), "--out", str(base / "run"),
                                          "--epochs", str(EPOCHS), *TINY_ARGS])
    assert result.returncode == 0, result.stderr
    return base / "run", steps_of(read_records(base / "record"))


def test_reference_run_keeps_the_last_two_checkpoints(reference):
    run, steps = reference
    assert [s["step"] for s in steps] == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e00003-s000000012.pt",
                                                      "checkpoint-e00002-s000000008.pt"]
    assert os.path.samefile(run / "checkpoint.pt", list_checkpoints(run)[0])


def test_two_deterministic_runs_give_identical_loss_logs(reference, data, tmp_path):
    reference_run, _ = reference
    train(tiny_config(data), tmp_path / "again", deterministic=True, progress=False, log=lambda m: None)
    assert logged(tmp_path / "again") == logged(reference_run)
    assert_same_training_state(tmp_path / "again", reference_run)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(reference, data, tmp_path):
    reference_run, reference_steps = reference
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--epochs", str(EPOCHS), *TINY_ARGS]
    killed_at = STEPS_PER_EPOCH + 2  # in the middle of epoch 2
    killed = run_driver(tmp_path / "killed", args, signal_at=(killed_at, "SIGKILL"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert steps_of(read_records(tmp_path / "killed"))[-1]["step"] == killed_at
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e00001-s000000004.pt"]

    resumed = run_driver(tmp_path / "resumed", [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    resumed_steps = steps_of(read_records(tmp_path / "resumed"))
    first = resumed_steps[0]["step"]
    assert killed_at - first + 1 <= STEPS_PER_EPOCH, "more than one epoch of work was repeated"
    assert [s["step"] for s in resumed_steps] == list(range(first, EPOCHS * STEPS_PER_EPOCH + 1))
    # the resumed run draws the same batches and the same anomalies, and ends in the same weights
    continued = reference_steps[first - 1:]
    assert [s["batch"] for s in resumed_steps] == [s["batch"] for s in continued]
    assert [s["mask"] for s in resumed_steps] == [s["mask"] for s in continued]
    assert [s["params"] for s in resumed_steps] == [s["params"] for s in continued]
    assert_same_training_state(run, reference_run)
    assert logged(run) == logged(reference_run)


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Make the training process receive ``signum`` right after step ``step``."""
    original = train_module.Trainer.train_step

    def train_step(self, batch_index):
        result = original(self, batch_index)
        if self.state.step == step:
            signal.raise_signal(signum)
        return result

    monkeypatch.setattr(train_module.Trainer, "train_step", train_step)


def test_sigterm_mid_epoch_writes_a_checkpoint_and_resume_is_exact(reference, data, tmp_path, monkeypatch):
    reference_run, _ = reference
    run = tmp_path / "run"
    config = tiny_config(data)
    previous_handler = signal.getsignal(signal.SIGTERM)
    _signal_at(monkeypatch, STEPS_PER_EPOCH + 2, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        train(config, run, deterministic=True, progress=False, log=lambda m: None)
    assert signal.getsignal(signal.SIGTERM) is previous_handler, "the signal handler was not restored"
    assert info.value.signal_name == "SIGTERM"
    assert info.value.checkpoint.name == "checkpoint-e00001-s000000006.pt"
    assert os.path.samefile(run / "checkpoint.pt", info.value.checkpoint)
    assert [r["epoch"] for r in logged(run)] == [1]  # the interrupted epoch is not logged yet
    monkeypatch.undo()

    messages = []
    train(config, run, resume=True, deterministic=True, progress=False, log=messages.append)
    assert any("epoch 1" in m and "step 6" in m for m in messages), messages
    assert logged(run) == logged(reference_run)  # the epoch-2 record includes its first two steps
    assert_same_training_state(run, reference_run)


def test_ctrl_c_exits_130_with_a_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _signal_at(monkeypatch, 3, signal.SIGINT)
    code = cli(["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY_ARGS])
    assert code == 130
    error = capsys.readouterr().err
    assert "SIGINT" in error and "--resume" in error and "checkpoint-e00000-s000000003.pt" in error
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(reference, data, tmp_path):
    reference_run, _ = reference
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    newest = run / "checkpoint-e00003-s000000012.pt"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size // 3)
    (run / "checkpoint.pt").unlink()
    os.link(newest, run / "checkpoint.pt")  # as after a crash: the latest pointer is the truncated file
    messages = []
    train(tiny_config(data), run, resume=True, deterministic=True, progress=False, log=messages.append)
    assert any(str(newest) in m and "skipping" in m for m in messages), messages
    assert any("resuming" in m and "epoch 2" in m for m in messages), messages
    # epoch 3 was trained again from the epoch-2 checkpoint: same result as the uninterrupted run
    assert_same_training_state(run, reference_run)
    assert logged(run) == logged(reference_run)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    from medad_fast.methods import frequency_aware
    original = frequency_aware.reconstruction_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        rec, mse, ssim_term = original(*args, **kwargs)
        if calls["n"] == STEPS_PER_EPOCH + 3:  # the 7th step, in epoch 2
            rec = rec * float("nan")
        return rec, mse, ssim_term

    monkeypatch.setattr(frequency_aware, "reconstruction_loss", poisoned)
    code = cli(["train", "--data", str(data), "--out", str(run), "--epochs", str(EPOCHS), *TINY_ARGS])
    assert code == 2
    error = capsys.readouterr().err
    assert "step 7" in error and "nan" in error.lower()
    assert "checkpoint-e00001-s000000004.pt" in error  # the last good checkpoint is named
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e00001-s000000004.pt"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values()
                                      if v.is_floating_point())


def test_resume_needs_the_flag_and_an_existing_checkpoint(reference, data, tmp_path):
    reference_run, _ = reference
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(data), reference_run, progress=False, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_config(data), tmp_path / "empty", resume=True, progress=False, log=lambda m: None)
    with pytest.raises(ValueError, match="keep"):
        train(tiny_config(data), tmp_path / "bad", keep_checkpoints=0, progress=False, log=lambda m: None)
