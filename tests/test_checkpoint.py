"""Checkpoint files: atomic durable writes, keep-K pruning, newest-readable selection."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from medad_fast import checkpoint as ckpt
from medad_fast.methods import resolve_config


def make_state(epoch: int, step: int, preset: str = "small") -> dict:
    """A small checkpoint dict with every required key (the weights encode the step)."""
    return {"config": resolve_config("frequency_aware", preset).to_dict(), "model": {"w": torch.full((3,), float(step))},
            "optimizers": [{"state": {}, "param_groups": []}], "schedulers": [{"last_epoch": epoch}],
            "epoch": epoch, "step": step}


def saved_names(run_dir) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


def test_filename_sorts_by_progress_and_rejects_negative():
    assert ckpt.checkpoint_filename(3, 120) == "checkpoint-e00003-s000000120.pt"
    names = [ckpt.checkpoint_filename(e, s) for e, s in ((1, 9), (2, 10), (10, 100))]
    assert names == sorted(names)
    with pytest.raises(ValueError, match="step"):
        ckpt.checkpoint_filename(1, -1)


def test_save_writes_numbered_file_and_latest_pointer_loadable_weights_only(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, make_state(1, 4))
    assert path.name == "checkpoint-e00001-s000000004.pt"
    assert saved_names(tmp_path) == ["checkpoint-e00001-s000000004.pt", "checkpoint.pt"]
    for file in (path, tmp_path / "checkpoint.pt"):
        state = torch.load(file, weights_only=True)
        assert state["step"] == 4 and torch.equal(state["model"]["w"], torch.full((3,), 4.0))
    assert (tmp_path / "checkpoint.pt").read_bytes() == path.read_bytes()


def test_keeps_only_the_newest_k_and_latest_points_at_the_newest(tmp_path):
    for epoch in range(1, 6):
        ckpt.save_checkpoint(tmp_path, make_state(epoch, 4 * epoch), keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "checkpoint-e00005-s000000020.pt", "checkpoint-e00004-s000000016.pt", "checkpoint-e00003-s000000012.pt"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 20
    ckpt.save_checkpoint(tmp_path, make_state(6, 24), keep=1)
    assert saved_names(tmp_path) == ["checkpoint-e00006-s000000024.pt", "checkpoint.pt"]


def test_mid_epoch_checkpoints_order_by_step(tmp_path):
    ckpt.save_checkpoint(tmp_path, make_state(1, 4))
    ckpt.save_checkpoint(tmp_path, make_state(1, 6))  # interrupted in epoch 2 after 2 steps
    assert ckpt.list_checkpoints(tmp_path)[0].name == "checkpoint-e00001-s000000006.pt"


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        ckpt.save_checkpoint(tmp_path, make_state(1, 1), keep=0)
    state = make_state(1, 1)
    del state["optimizers"]
    with pytest.raises(ValueError, match="optimizers"):
        ckpt.save_checkpoint(tmp_path, state)
    assert list(tmp_path.iterdir()) == []


def test_write_is_fsynced_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    ckpt.save_checkpoint(tmp_path, make_state(1, 4))
    assert False in synced, "the checkpoint file itself was not fsynced"
    assert True in synced, "the run directory was not fsynced after the rename"


def test_failed_write_keeps_previous_checkpoints_and_leaves_no_temp(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, make_state(1, 4))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_replace = os.replace

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, make_state(2, 8))
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_stale_temp_files_of_a_killed_writer_are_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".checkpoint-e00002-s000000008.pt.0123456789ab.tmp"
    stale.write_bytes(b"half a checkpoint")
    ckpt.save_checkpoint(tmp_path, make_state(2, 8))
    assert not stale.exists()


def test_latest_valid_none_for_an_empty_or_missing_directory(tmp_path):
    assert ckpt.latest_valid_checkpoint(tmp_path) is None
    assert ckpt.latest_valid_checkpoint(tmp_path / "missing") is None


def test_truncated_newest_falls_back_to_previous_with_a_message(tmp_path):
    for epoch in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, make_state(epoch, 4 * epoch))
    newest = ckpt.list_checkpoints(tmp_path)[0]
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    messages = []
    found = ckpt.latest_valid_checkpoint(tmp_path, log=messages.append)
    assert found.path.name == "checkpoint-e00002-s000000008.pt" and found.state["step"] == 8
    assert [p for p, _ in found.skipped] == [newest]
    # checkpoint.pt is a link to the truncated file: it must not be tried a second time
    assert len(messages) == 1 and str(newest) in messages[0] and "skipping" in messages[0]


def test_garbage_and_incomplete_files_are_skipped(tmp_path):
    ckpt.save_checkpoint(tmp_path, make_state(1, 4))
    (tmp_path / ckpt.checkpoint_filename(3, 12)).write_bytes(b"\x00" * 100)
    incomplete = make_state(2, 8)
    del incomplete["schedulers"]
    from medad_fast.checkpoint import checkpoint_bytes
    (tmp_path / ckpt.checkpoint_filename(2, 8)).write_bytes(checkpoint_bytes(incomplete))
    messages = []
    found = ckpt.latest_valid_checkpoint(tmp_path, log=messages.append)
    assert found.state["step"] == 4
    assert len(messages) == 2 and "schedulers" in messages[1]


def test_all_unreadable_raises_naming_the_files(tmp_path):
    bad = tmp_path / ckpt.checkpoint_filename(1, 4)
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="no readable checkpoint") as info:
        ckpt.latest_valid_checkpoint(tmp_path, log=None)
    assert str(bad) in str(info.value)


def test_a_file_that_needs_code_to_unpickle_is_refused(tmp_path):
    import argparse

    state = make_state(1, 4)
    state["extra"] = argparse.Namespace(x=1)  # weights_only=True does not unpickle arbitrary classes
    torch.save({"format": "medad_fast.checkpoint/1", **state}, tmp_path / ckpt.checkpoint_filename(1, 4))
    with pytest.raises(ValueError, match="no readable checkpoint"):
        ckpt.latest_valid_checkpoint(tmp_path, log=None)


def test_architecture_mismatch_is_an_error_not_a_skip(tmp_path):
    ckpt.save_checkpoint(tmp_path, make_state(1, 4, preset="paper"))
    with pytest.raises(ValueError, match="recon_width"):
        ckpt.latest_valid_checkpoint(tmp_path, expected=resolve_config("frequency_aware", "small"))
    found = ckpt.latest_valid_checkpoint(tmp_path, expected=resolve_config("frequency_aware", "paper"))
    assert found.state["step"] == 4


def test_legacy_single_checkpoint_file_is_found(tmp_path):
    from medad_fast.checkpoint import checkpoint_bytes
    (tmp_path / "checkpoint.pt").write_bytes(checkpoint_bytes(make_state(2, 8)))
    found = ckpt.latest_valid_checkpoint(tmp_path)
    assert found.path.name == "checkpoint.pt" and found.state["epoch"] == 2


def test_global_rng_states_round_trip():
    states = ckpt.global_rng_states(torch.device("cpu"))
    assert states["cuda"] is None
    expected = torch.rand(5)
    torch.rand(100)  # move the generator on
    ckpt.restore_global_rng_states(states, torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)


def test_checkpoint_policy_every_k_epochs_by_the_clock_and_always_at_the_end(monkeypatch):
    from medad_fast import train as train_module
    from medad_fast.config import RunConfig

    clock = {"now": 1000.0}
    monkeypatch.setattr(train_module.time, "monotonic", lambda: clock["now"])
    only_last = train_module._CheckpointPolicy(RunConfig(checkpoint_every=None, checkpoint_minutes=None))
    assert [only_last.due(e, e == 5) for e in range(1, 6)] == [False, False, False, False, True]
    every_two = train_module._CheckpointPolicy(RunConfig(checkpoint_every=2, checkpoint_minutes=None))
    assert [every_two.due(e, e == 5) for e in range(1, 6)] == [False, True, False, True, True]
    timed = train_module._CheckpointPolicy(RunConfig(checkpoint_every=None, checkpoint_minutes=10.0))
    clock["now"] += 9 * 60
    assert not timed.due(1, False)
    clock["now"] += 61
    assert timed.due(2, False)
    timed.written()
    clock["now"] += 60
    assert not timed.due(3, False)
