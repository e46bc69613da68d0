"""Small training sets: the synthetic validation set (--val-fraction), checkpoint-best.pt (kept
across pruning and resume, read by evaluate and predict), early stopping (--patience), and
exact resume with --augment (tiny phantom data, CPU, one thread)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from medad_fast import train as train_module
from medad_fast import validation as validation_module
from medad_fast.checkpoint import BEST_NAME, list_checkpoints
from medad_fast.cli import main as cli
from medad_fast.methods import resolve_config
from medad_fast.evaluate import evaluate
from medad_fast.inference import resolve_checkpoint
from medad_fast.predict import predict
from medad_fast.train import TrainingInterrupted, train
from medad_fast.validation import VALIDATION_DRAWS, SyntheticValidationSet, held_back_count, split_validation

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False, log=lambda message: None)
# 16 normal slices, a quarter held back: 12 trained on, 3 steps of 4 per epoch
STEPS_PER_EPOCH = 3
DETERMINISTIC_VALUES = ("epoch", "step", "loss", "alpha", "lr", "val_pixel_ap", "val_image_auroc", "val_score",
                        "val_best_score", "val_best_epoch")




def config(data: Path, epochs: int = 3, **settings):
    return resolve_config("frequency_aware", "tiny", data=str(data), epochs=epochs, seed=3,
                          **{"val_fraction": 0.25, **settings})


def scripted_scores(monkeypatch, scores: list[float]) -> list[int]:
    """Make the validation return ``scores[i]`` as val_score at its i-th call; returns the
    list of call numbers (so a test can see how often it ran)."""
    calls: list[int] = []

    def score(self, method, batch_size=16):
        calls.append(len(calls))
        value = scores[len(calls) - 1]
        return {"val_pixel_ap": value, "val_image_auroc": value, "val_score": value}

    monkeypatch.setattr(SyntheticValidationSet, "score", score)
    return calls


def log_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


# ----------------------------------------------------------------------------- the validation set

def test_held_back_slices_are_a_seeded_subset_not_trained_on():
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 1, 4, 4).contiguous()
    train_a, held_a = split_validation(images, 0.25, seed=3)
    train_b, held_b = split_validation(images, 0.25, seed=3)
    _, held_c = split_validation(images, 0.25, seed=4)
    assert held_a.shape[0] == 5 and train_a.shape[0] == 15
    assert torch.equal(held_a, held_b) and not torch.equal(held_a, held_c)
    assert set(held_a[:, 0, 0, 0].tolist()).isdisjoint(train_a[:, 0, 0, 0].tolist())
    assert split_validation(images, 0.0, seed=3)[0] is images
    assert held_back_count(24, 0.01) == 1  # at least one
    with pytest.raises(ValueError, match="--val-fraction"):
        held_back_count(2, 0.9)


def test_validation_set_is_fixed_paired_and_inside_the_liver(data):
    from medad_fast.train import load_training_images
    run_config = config(data)
    _, held = split_validation(load_training_images(run_config), 0.25, 3)
    a = SyntheticValidationSet.build(held, run_config)
    b = SyntheticValidationSet.build(held, run_config)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    n, draws = held.shape[0], VALIDATION_DRAWS
    assert draws > 1
    assert len(a) == (1 + draws) * n and a.images.shape == ((1 + draws) * n, 1, 32, 32)
    assert torch.equal(a.images[:n], held.float() / 255)  # the normal copies are the slices themselves
    assert not a.masks[:n].any() and a.labels[n:].any() and not a.labels[:n].any()
    liver = (a.images[n:, 0] > 0)
    assert not (a.masks[n:] & ~liver).any(), "a synthetic anomaly outside the liver"
    originals = a.images[:n].repeat(draws, 1, 1, 1)  # copy d of slice i sits at n + d n + i
    changed = (a.images[n:] != originals)[:, 0]
    assert not (changed & ~a.masks[n:]).any()  # only the anomaly's pixels differ
    copies = a.masks[n:].view(draws, n, 32, 32)
    assert any(not torch.equal(copies[0], copies[d]) for d in range(1, draws))  # separate draws


def test_a_tiny_run_logs_finite_validation_scores(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(run), "--preset", "tiny", "--epochs", "2", "--seed", "3",
                "--val-fraction", "0.25", "--augment", "--augment-strength", "0.5", "--no-progress",
                "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "4 held back for validation" in out.err and "augmented (strength 0.5)" in out.err
    assert "best checkpoint" in out.out
    records = log_of(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert 0.0 <= record["val_pixel_ap"] <= 1.0 and 0.0 <= record["val_image_auroc"] <= 1.0
        assert record["val_score"] == pytest.approx((record["val_pixel_ap"] + record["val_image_auroc"]) / 2)
    saved = json.loads((run / "config.json").read_text())["run"]
    assert (saved["augment"], saved["augment_strength"], saved["val_fraction"]) == (True, 0.5, 0.25)
    assert (run / BEST_NAME).is_file()


def test_bad_options_are_refused_naming_them(data, tmp_path, capsys):
    base = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--preset", "tiny", "--no-progress"]
    assert cli([*base, "--augment-strength", "2"]) == 2
    assert "augment_strength" in capsys.readouterr().err
    assert cli([*base, "--val-fraction", "1"]) == 2
    assert "val_fraction" in capsys.readouterr().err
    assert cli([*base, "--patience", "2"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert cli([*base, "--max-train-images", "2", "--val-fraction", "0.9"]) == 2
    assert "--val-fraction" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the best checkpoint

def test_best_checkpoint_is_the_best_epoch_and_survives_pruning(data, tmp_path, monkeypatch):
    scripted_scores(monkeypatch, [0.2, 0.5, 0.4, 0.6, 0.3])
    run = tmp_path / "run"
    train(config(data, epochs=5), run, keep_checkpoints=1, **QUIET)
    best = load(run / BEST_NAME)
    assert best["epoch"] == 4 and best["step"] == 4 * STEPS_PER_EPOCH
    assert best["validation"]["best_score"] == 0.6 and best["validation"]["best_epoch"] == 4
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-e00005-s000000015.pt"]  # e4's name was pruned
    assert load(run / "checkpoint.pt")["epoch"] == 5
    records = log_of(run)
    assert [r["val_best_epoch"] for r in records] == [1, 2, 2, 4, 4]
    assert [r["val_score"] for r in records] == [0.2, 0.5, 0.4, 0.6, 0.3]


def test_resume_keeps_the_best_score_so_far(data, tmp_path, monkeypatch):
    # epoch 2 is the best; the run stops in epoch 3; the resumed epochs score lower and must not replace it
    scripted_scores(monkeypatch, [0.2, 0.9, 0.5, 0.4])
    run = tmp_path / "run"
    original = train_module.Trainer.train_step

    def train_step(self, batch_index):
        result = original(self, batch_index)
        if self.state.step == 2 * STEPS_PER_EPOCH + 1:
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(train_module.Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted):
        train(config(data, epochs=4), run, **QUIET)
    monkeypatch.setattr(train_module.Trainer, "train_step", original)
    assert load(run / "checkpoint.pt")["validation"]["best_epoch"] == 2
    train(config(data, epochs=4), run, resume=True, **QUIET)
    assert load(run / BEST_NAME)["epoch"] == 2
    assert [r["val_best_epoch"] for r in log_of(run)] == [1, 2, 2, 2]


def test_a_lost_best_link_is_restored_on_resume(data, tmp_path, monkeypatch):
    # as after a crash between the best epoch's checkpoint and its checkpoint-best.pt link
    scripted_scores(monkeypatch, [0.2, 0.5, 0.1])
    run = tmp_path / "run"
    train(config(data, epochs=2), run, **QUIET)
    (run / BEST_NAME).unlink()
    train(config(data, epochs=3), run, resume=True, **QUIET)
    assert load(run / BEST_NAME)["epoch"] == 2


def test_patience_stops_the_run_and_a_resume_does_not_train_on(data, tmp_path, monkeypatch):
    calls = scripted_scores(monkeypatch, [0.5, 0.6, 0.4, 0.3, 0.2, 0.1])
    run = tmp_path / "run"
    messages: list[str] = []
    record = train(config(data, epochs=6, patience=2), run, progress=False, log=messages.append)
    assert record["epoch"] == 4 and record["stopped_early"] is True and len(calls) == 4
    assert any("early stop after epoch 4" in m and "epoch 2" in m for m in messages), messages
    assert [r["epoch"] for r in log_of(run)] == [1, 2, 3, 4]
    assert load(run / "checkpoint.pt")["validation"]["stopped_early"] is True
    assert load(run / BEST_NAME)["epoch"] == 2
    train(config(data, epochs=6, patience=2), run, resume=True, **QUIET)
    assert len(calls) == 4 and [r["epoch"] for r in log_of(run)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- evaluate / predict use it

def test_evaluate_and_predict_use_the_best_checkpoint_of_a_run(data, tmp_path, monkeypatch, capsys):
    scripted_scores(monkeypatch, [0.7, 0.2])
    run = tmp_path / "run"
    train(config(data, epochs=2), run, **QUIET)
    assert resolve_checkpoint(run) == run / BEST_NAME
    assert "checkpoint-best.pt" in capsys.readouterr().err
    assert resolve_checkpoint(run / "checkpoint.pt") == run / "checkpoint.pt"  # an explicit file is that file
    metrics = evaluate(run, data, out=tmp_path / "eval", progress=False, n_cases=0)
    assert metrics["checkpoint"] == str((run / BEST_NAME).resolve()) and metrics["epoch"] == 1
    last = evaluate(run / "checkpoint.pt", data, out=tmp_path / "eval-last", progress=False, n_cases=0)
    assert last["epoch"] == 2
    images = sorted((data / "test").rglob("img/*.png"))[:2]
    predict(run, images, tmp_path / "pred", progress=False)
    assert json.loads((tmp_path / "pred" / "scores.json").read_text())["checkpoint"] == str((run / BEST_NAME).resolve())


def test_without_a_validation_set_a_run_has_no_best_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    train(config(data, epochs=1, val_fraction=0.0), run, **QUIET)
    assert not (run / BEST_NAME).exists()
    assert resolve_checkpoint(run) == run / "checkpoint.pt"
    assert "val_score" not in log_of(run)[0]


# ----------------------------------------------------------------------------- exact resume

def test_resume_with_augmentation_and_validation_is_bitwise(data, tmp_path, monkeypatch):
    settings = dict(epochs=3, augment=True, augment_strength=0.8)
    train(config(data, **settings), tmp_path / "straight", deterministic=True, **QUIET)
    run = tmp_path / "interrupted"
    original = train_module.Trainer.train_step

    def train_step(self, batch_index):
        result = original(self, batch_index)
        if self.state.step == STEPS_PER_EPOCH + 2:  # mid epoch 2
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(train_module.Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted):
        train(config(data, **settings), run, deterministic=True, **QUIET)
    monkeypatch.undo()
    train(config(data, **settings), run, resume=True, deterministic=True, **QUIET)

    for name in ("checkpoint.pt", BEST_NAME):
        a, b = load(tmp_path / "straight" / name), load(run / name)
        assert (a["epoch"], a["step"], a["validation"]) == (b["epoch"], b["step"], b["validation"])
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"{name}: weights differ: {key}"
        assert torch.equal(a["generators"]["method"], b["generators"]["method"])
    keep = lambda records: [{k: r.get(k) for k in DETERMINISTIC_VALUES} for r in records]  # noqa: E731
    assert keep(log_of(run)) == keep(log_of(tmp_path / "straight"))


def test_augmentation_changes_training_and_strength_zero_does_not(data, tmp_path):
    base = dict(epochs=1, val_fraction=0.0)
    train(config(data, **base), tmp_path / "plain", deterministic=True, **QUIET)
    train(config(data, **base, augment=True, augment_strength=0.0), tmp_path / "zero", deterministic=True, **QUIET)
    train(config(data, **base, augment=True), tmp_path / "augmented", deterministic=True, **QUIET)
    weights = {name: load(tmp_path / name / "checkpoint.pt")["model"] for name in ("plain", "zero", "augmented")}
    assert all(torch.equal(weights["plain"][k], weights["zero"][k]) for k in weights["plain"])
    assert not all(torch.equal(weights["plain"][k], weights["augmented"][k]) for k in weights["plain"])


def test_the_validation_seed_is_not_a_training_seed():
    # the generators of the run are seeded with seed, seed + 1 and seed + 2
    assert validation_module.VALIDATION_SEED_OFFSET > 2
