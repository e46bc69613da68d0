"""The engine contract, for EVERY registered method (a new method gets these tests by
registering): the interface, training a few steps, exact resume after an interruption,
evaluate, predict, and 2-process DDP (gloo) with the weights equal on both ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medad_fast.cli import main as cli
from medad_fast.config import Config
from medad_fast.methods import Method, config_from_dict, create_method, get_method, method_names, resolve_config

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "train_driver.py"
METHODS = method_names()
TINY_ARGS = ["--preset", "tiny", "--seed", "3", "--deterministic", "--no-progress", "--device", "cpu",
             "--checkpoint-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")




def run_driver(record_dir: Path, args: list[str], signal_at: tuple[int, str] | None = None,
               torchrun: bool = False) -> subprocess.CompletedProcess:
    record_dir.mkdir(parents=True, exist_ok=True)
    options = ["--signal-at", str(signal_at[0]), signal_at[1]] if signal_at else []
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, str(DRIVER), str(record_dir), *options, "--", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def steps(record_dir: Path, rank: int = 0) -> list[dict]:
    lines = (record_dir / f"rank{rank}.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


# ----------------------------------------------------------------------------- the interface

@pytest.mark.parametrize("name", METHODS)
def test_method_declares_what_the_engine_needs(name):
    cls = get_method(name)
    assert issubclass(cls, Method) and cls.name == name and cls.summary
    assert {"paper", "small", "tiny"} <= set(cls.presets)
    for preset in cls.presets:
        config = resolve_config(name, preset)
        assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert set(cls.Config.architecture_fields) <= {f.name for f in dataclasses.fields(cls.Config)}


@pytest.mark.parametrize("name", METHODS)
def test_training_step_and_prediction_contract(name):
    method = create_method(resolve_config(name, "tiny"))
    method.configure_runtime(torch.device("cpu"), amp=True, channels_last=False)
    method.setup_training(torch.device("cpu"))
    optimizers, schedulers = method.configure_optimizers()
    assert optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers)
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    method.on_train_step(0, 4)
    loss, terms = method(images, torch.Generator().manual_seed(1))
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    assert terms and all(t.dim() == 0 and not t.requires_grad for t in terms.values())
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in method.parameters())
    method.train()
    maps, scores = method.predict(images)
    assert method.training, "predict must restore the training mode"
    assert maps.shape == (3, 32, 32) and scores.shape == (3,) and maps.dtype == scores.dtype == torch.float32
    assert torch.isfinite(maps).all() and torch.isfinite(scores).all()
    # batch of one and odd sizes
    assert method.predict(torch.rand(1, 1, 19, 27))[0].shape == (1, 19, 27)
    state = method.method_state()
    twin = create_method(resolve_config(name, "tiny", seed=9))
    twin.load_state_dict(method.state_dict())
    twin.load_method_state(state)
    method.eval(), twin.eval()
    assert torch.equal(method.predict(images)[0], twin.predict(images)[0])


def test_methods_command_lists_every_method(capsys):
    assert cli(["methods"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == METHODS


def test_a_setting_of_another_method_is_refused_naming_it(data, tmp_path, capsys):
    # an argparse error: each method's options are its own (medad_fast.method_options)
    with pytest.raises(SystemExit) as exit_info:
        cli(["train", "--method", "ae", "--data", str(data), "--out", str(tmp_path / "r"), "--no-roi", *TINY_ARGS])
    assert exit_info.value.code == 2
    assert "argument --no-roi: method ae has no option --no-roi (it is an option of frequency_aware)" in \
        capsys.readouterr().err


# ----------------------------------------------------------------------------- the engine, per method

@pytest.mark.parametrize("name", METHODS)
def test_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(name, data, tmp_path):
    args = ["train", "--method", name, "--data", str(data), *TINY_ARGS]  # 3 epochs x 4 steps
    straight = run_driver(tmp_path / "rec-a", [*args, "--out", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr
    # SIGTERM after step 6 (mid epoch 2): a checkpoint of the exact position, exit 143
    stopped = run_driver(tmp_path / "rec-b", [*args, "--out", str(tmp_path / "b")], signal_at=(6, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr
    resumed = run_driver(tmp_path / "rec-b", [*args, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["method"] == b["method"] == name and (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (3, 12)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{name}: weights differ after resume: {key}"
    assert a["method_state"] == b["method_state"]
    for opt_a, opt_b in zip(a["optimizers"], b["optimizers"]):
        for index, values in opt_a["state"].items():
            for key, value in values.items():
                assert torch.equal(value, opt_b["state"][index][key]), f"{name}: optimizer {key} of {index}"
    # the per-step records agree too (same batches, same weights after every step)
    assert [s["params"] for s in steps(tmp_path / "rec-a")] == [s["params"] for s in steps(tmp_path / "rec-b")]


@pytest.mark.parametrize("name", METHODS)
def test_trained_method_evaluates_and_predicts(name, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--method", name, "--data", str(data), "--out", str(run), "--epochs", "1", *TINY_ARGS]) == 0
    assert json.loads((run / "config.json").read_text())["method"] == name
    assert cli(["evaluate", str(run), "--data", str(data), "--no-progress", "--cases", "1"]) == 0
    report = tmp_path / "run-eval-test"  # the default --out, beside the run
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["method"] == name and metrics["n_images"] == 8
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
    assert (report / "roc.png").is_file() and any((report / "heatmaps").iterdir())
    images = sorted((data / "test").rglob("img/*.png"))
    out = tmp_path / "pred"
    assert cli(["predict", str(run), *map(str, images[:3]), "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "scores.json").read_text())
    assert rows["method"] == name and len(rows["images"]) == 3


@pytest.mark.parametrize("name", METHODS)
def test_ddp_ranks_agree_on_the_weights(name, data, tmp_path):
    records = tmp_path / "records"
    result = run_driver(records, ["train", "--method", name, "--data", str(data), "--out", str(tmp_path / "run"),
                                  "--epochs", "2", *TINY_ARGS], torchrun=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rank0, rank1 = steps(records, 0), steps(records, 1)
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == [1, 2, 3, 4]  # 8 images per rank, batch 4
    for a, b in zip(rank0, rank1):
        assert a["params"] == b["params"], f"{name}: weights differ between the ranks after step {a['step']}"
        assert set(a["batch"]).isdisjoint(b["batch"])
    assert rank0[0]["params"] != rank0[-1]["params"], "the weights did not change"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and state["method"] == name
