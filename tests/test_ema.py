"""``train --ema DECAY``: the exponential moving average of the weights
(:mod:`medad_fast.weight_averaging`): the update by hand, the checkpoint entry, exact resume,
DDP ranks, validation and :func:`~medad_fast.inference.load_method` scoring with it, and
runs without it unchanged (tiny phantom data, CPU, one thread)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from medad_fast.cli import main as cli
from medad_fast.config import RunConfig
from medad_fast.data.bmad import load_split
from medad_fast.inference import load_method, score_images
from medad_fast.methods import config_from_dict, get_method, resolve_config
from medad_fast.train import Trainer, load_training_images, train
from medad_fast.validation import SyntheticValidationSet, split_validation
from medad_fast.weight_averaging import ExponentialMovingAverage, averaged_entries
from test_methods import TINY_ARGS, run_driver, steps

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the average itself

class LinearAndNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.norm = nn.BatchNorm1d(1)


def test_update_by_hand_two_steps_decay_one_half():
    net = LinearAndNorm()
    with torch.no_grad():
        net.linear.weight.fill_(1.0)
        net.linear.bias.fill_(0.0)
    ema = ExponentialMovingAverage(net, 0.5)
    assert list(ema.weights) == ["linear.weight", "linear.bias", "norm.weight", "norm.bias", "norm.running_mean",
                                 "norm.running_var"]  # num_batches_tracked (a counter) keeps its live value
    optimizer = torch.optim.SGD(net.linear.parameters(), lr=0.25)
    x, y = torch.tensor([[2.0]]), torch.tensor([[1.0], [3.0]])  # y: batch mean 2, unbiased variance 2

    def step() -> None:
        optimizer.zero_grad()
        net.linear(x).sum().backward()  # d/dw = x = 2, d/db = 1: w -= 0.5, b -= 0.25
        optimizer.step()
        net.norm(y)  # running_mean <- 0.9 m + 0.1 * 2, running_var <- 0.9 v + 0.1 * 2
        ema.update()

    step()  # weights w 0.5, b -0.25, mean 0.2, var 1.1: the first update copies them
    assert ema.updates == 1
    assert ema.weights["linear.weight"].item() == 0.5 and ema.weights["linear.bias"].item() == -0.25
    assert ema.weights["norm.running_mean"].item() == pytest.approx(0.2)
    assert ema.weights["norm.running_var"].item() == pytest.approx(1.1)
    step()  # weights w 0, b -0.5, mean 0.38, var 1.19; the warm-up's decay min(0.5, 2/11) = 2/11:
    # average = (2 first + 9 second) / 11
    assert ema.updates == 2
    assert ema.weights["linear.weight"].item() == pytest.approx(1 / 11)
    assert ema.weights["linear.bias"].item() == pytest.approx(-5 / 11)
    assert ema.weights["norm.running_mean"].item() == pytest.approx(3.82 / 11)
    assert ema.weights["norm.running_var"].item() == pytest.approx(12.91 / 11)
    assert ema.weights["norm.weight"].item() == 1.0 and ema.weights["norm.bias"].item() == 0.0  # never trained
    # applied(): the module holds the average inside, exactly its own weights afterwards
    with ema.applied():
        assert net.linear.weight.item() == pytest.approx(1 / 11)
        assert net.norm.running_mean.item() == pytest.approx(3.82 / 11)
    assert net.linear.weight.item() == 0.0 and net.linear.bias.item() == -0.5
    assert net.norm.running_mean.item() == pytest.approx(0.38) and int(net.norm.num_batches_tracked) == 2


def test_the_warm_up_decay_and_the_first_steps_share():
    """d_t = min(decay, (1 + t) / (10 + t)) (TensorFlow's num_updates warm-up): the decay is
    reached at t = (10 decay - 1) / (1 - decay); the first step's share is the product."""
    ema = ExponentialMovingAverage(nn.Linear(1, 1), 0.5)
    assert [ema.decay_at(t) for t in (1, 2, 7, 8, 100)] == [2 / 11, 3 / 12, 8 / 17, 0.5, 0.5]
    assert ema.warm_after == 8 and ExponentialMovingAverage(nn.Linear(1, 1), 0.99).warm_after == 890
    assert ema.first_step_share(1) == 1.0 and ema.first_step_share(3) == pytest.approx(2 / 11 * 3 / 12)
    # 0.99 over the 210 steps of a few-slices run: without the warm-up 0.99 ** 209 = 12 %
    assert ExponentialMovingAverage(nn.Linear(1, 1), 0.99).first_step_share(210) == pytest.approx(3.7e-15, rel=1e-2)


def test_what_each_method_averages():
    """Every parameter and BatchNorm statistic; SQUID's memory queue and the counters keep theirs."""
    for name in ("frequency_aware", "ae", "squid"):
        method = get_method(name)(resolve_config(name, "tiny"))
        left = {k for k in method.state_dict() if k not in averaged_entries(method)}
        expected = {"inpainting.memory.memory"} if name == "squid" else set()
        assert {k for k in left if not k.endswith("num_batches_tracked")} == expected, name
        if name == "squid":  # the discriminator scores (-D(I_s)): averaged too
            assert any(k.startswith("discriminator.") for k in averaged_entries(method))


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, -0.1, float("nan")])
def test_decay_outside_zero_one_is_refused_naming_ema(decay):
    with pytest.raises(ValueError, match=r"config ema=.*decay in \(0, 1\).*--ema"):
        RunConfig(ema=decay)
    with pytest.raises(ValueError, match=r"ema \(--ema\) must be a decay in \(0, 1\)"):
        ExponentialMovingAverage(nn.Linear(1, 1), decay)


def test_cli_ema_1_5_exits_2_naming_it(data, tmp_path, capsys):
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--ema", "1.5", *TINY_ARGS]) == 2
    err = capsys.readouterr().err
    assert "config ema=1.5" in err and "(--ema)" in err
    assert not (tmp_path / "run").exists()


def test_help_names_the_option(capsys):
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--ema DECAY" in help_text and "moving average of the weights" in help_text


# ----------------------------------------------------------------------------- training with it

def _train(data: Path, out: Path, name: str = "frequency_aware", epochs: int = 3, log=None, resume: bool = False,
           **run) -> dict:
    config = resolve_config(name, "tiny", data=str(data), seed=3, epochs=epochs, **run)
    train(config, out, deterministic=True, progress=False, log=log or (lambda message: None), resume=resume)
    return torch.load(out / "checkpoint.pt", weights_only=True)


def test_checkpoint_holds_the_average_updated_after_every_step(data, tmp_path):
    said = []
    state = _train(data, tmp_path / "run", ema=0.9, log=said.append)
    # 12 steps end inside the warm-up (0.9 is reached at update 80): the log says so
    warning = next(line for line in said if line.startswith("warning: --ema 0.9"))
    assert "last decay is 0.571" in warning and "warm-up ends at step 80, the run at 12" in warning
    ema = state["ema"]
    assert ema["decay"] == 0.9 and ema["updates"] == state["step"] == 12  # 3 epochs x 4 steps
    method = get_method("frequency_aware")(config_from_dict(state["config"]))
    assert list(ema["weights"]) == list(averaged_entries(method))
    differ = [k for k, v in ema["weights"].items() if not torch.equal(v, state["model"][k])]
    assert differ, "the average equals the last weights"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["run"]["ema"] == 0.9


def test_without_ema_nothing_changes(data, tmp_path):
    """No checkpoint entry, the same weights as a run with --ema (the average never feeds
    back into training), and load_method loads the last weights as before."""
    plain = _train(data, tmp_path / "plain")
    averaged = _train(data, tmp_path / "averaged", ema=0.9)
    assert "ema" not in plain and plain["config"]["run"]["ema"] is None
    for key, value in plain["model"].items():
        assert torch.equal(value, averaged["model"][key]), f"--ema changed the training: {key}"
    method, state = load_method(tmp_path / "plain")
    assert "ema" not in state
    for key, value in method.state_dict().items():
        assert torch.equal(value, plain["model"][key]), key
    # a config written before the setting existed reads as "off"
    old = {**plain["config"], "run": {k: v for k, v in plain["config"]["run"].items() if k != "ema"}}
    assert config_from_dict(old).run.ema is None


@pytest.mark.parametrize("name", ["frequency_aware", "ae"])
def test_interrupted_run_resumes_to_the_average_of_an_uninterrupted_one(name, data, tmp_path):
    args = ["train", "--method", name, "--data", str(data), "--ema", "0.9", *TINY_ARGS]  # 3 epochs x 4 steps
    straight = run_driver(tmp_path / "rec-a", [*args, "--out", str(tmp_path / "a")])
    assert straight.returncode == 0, straight.stderr
    stopped = run_driver(tmp_path / "rec-b", [*args, "--out", str(tmp_path / "b")], signal_at=(6, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["ema"]["updates"] == 6
    resumed = run_driver(tmp_path / "rec-b", [*args, "--out", str(tmp_path / "b"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12 and a["ema"]["weights"].keys() == b["ema"]["weights"].keys()
    for key, value in a["ema"]["weights"].items():
        assert torch.equal(value, b["ema"]["weights"][key]), f"{name}: average differs after resume: {key}"
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{name}: weights differ after resume: {key}"
    # and after every step on the way
    assert [s["ema"] for s in steps(tmp_path / "rec-a")] == [s["ema"] for s in steps(tmp_path / "rec-b")]


def test_resume_with_ema_of_a_run_without_starts_from_the_resumed_weights(data, tmp_path):
    run, messages = tmp_path / "run", []
    _train(data, run, epochs=1)
    state = _train(data, run, epochs=2, ema=0.9, resume=True, log=messages.append)
    assert state["ema"]["updates"] == 4  # the second epoch's steps only
    assert any("the checkpoint holds no average of the weights; it starts from the resumed weights" in m
               for m in messages)


def test_ddp_ranks_hold_the_same_average(data, tmp_path):
    """ae has BatchNorm: each rank's forward moves its own running statistics (DDP syncs
    them from rank 0 before the next forward); the averages still agree after every step."""
    records = tmp_path / "records"
    result = run_driver(records, ["train", "--method", "ae", "--data", str(data), "--out", str(tmp_path / "run"),
                                  "--epochs", "2", "--ema", "0.5", *TINY_ARGS], torchrun=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rank0, rank1 = steps(records, 0), steps(records, 1)
    assert [s["step"] for s in rank0] == [s["step"] for s in rank1] == [1, 2, 3, 4]
    for a, b in zip(rank0, rank1):
        assert a["ema"] == b["ema"], f"the averages differ between the ranks after step {a['step']}"
    assert len({s["ema"] for s in rank0}) == 4, "the average did not change"


# ----------------------------------------------------------------------------- scoring with it

@pytest.fixture(scope="module")
def ema_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ema") / "run"
    _train(data, out, name="ae", ema=0.9)
    return out


def test_load_method_scores_with_the_average(ema_run, data):
    images = load_split(data, "test", size=32).images
    method, state = load_method(ema_run)
    maps, scores = score_images(method, images)
    config = config_from_dict(state["config"])
    by_hand = get_method("ae")(config)
    by_hand.load_state_dict(state["model"])  # the last weights
    by_hand.eval()
    last_maps, _ = score_images(by_hand, images)
    assert not torch.equal(maps, last_maps), "load_method scored with the last weights"
    by_hand.load_state_dict({**state["model"], **state["ema"]["weights"]})  # the average, loaded by hand
    by_hand.configure_runtime(torch.device("cpu"), False, config.run.channels_last)
    ema_maps, ema_scores = score_images(by_hand, images)
    assert torch.equal(maps, ema_maps) and torch.equal(scores, ema_scores)


def test_evaluate_says_which_weights(ema_run, data, tmp_path):
    assert cli(["evaluate", str(ema_run), "--data", str(data), "--out", str(tmp_path / "eval"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["weights"] == "ema"


def test_validation_scores_the_average_and_puts_the_weights_back(data, tmp_path):
    run = tmp_path / "run"
    state = _train(data, run, name="ae", epochs=1, ema=0.5, val_fraction=0.25)
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert record["val_weights"] == "ema"
    config = config_from_dict(state["config"])
    _, held_back = split_validation(load_training_images(config), config.run.val_fraction, config.run.seed)
    validation = SyntheticValidationSet.build(held_back, config)
    method, _ = load_method(run / "checkpoint.pt")  # the average
    assert validation.score(method, config.run.batch_size)["val_score"] == record["val_score"]
    # the trainer's own validate(): the average is scored, the live weights are back afterwards
    images, held = split_validation(load_training_images(config), 0.25, config.run.seed)
    trainer = Trainer(get_method("ae")(config), images, torch.device("cpu"),
                      validation=SyntheticValidationSet.build(held, config))
    trainer.load_state_dict(state)
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    values, _ = trainer.validate()
    assert values["val_score"] == record["val_score"] and values["val_weights"] == "ema"
    for key, value in trainer.method.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_exported_file_carries_the_average(ema_run, data, tmp_path):
    from medad_fast.inference import load_scorer

    images = load_split(data, "test", size=32).images
    path = tmp_path / "ae.pt2"
    assert cli(["export", str(ema_run), "--format", "pt2", "--out", str(path)]) == 0
    exported_maps, _ = score_images(load_scorer(path), images)
    method, state = load_method(ema_run)
    ema_maps, _ = score_images(method, images)
    method.load_state_dict(state["model"])  # the last weights
    last_maps, _ = score_images(method, images)
    to_average, to_last = ((exported_maps - other).abs().max().item() for other in (ema_maps, last_maps))
    # measured: 0 to the average, 2.2e-4 to the last weights (this tiny run's averages differ little)
    assert to_average <= 1e-5
    assert to_last > 10 * max(to_average, 1e-5)
