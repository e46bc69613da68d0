"""`--compile` (:func:`medad_fast.runtime.compile_networks`): the compiled networks train to
the eager losses and score the eager maps, with the fused ops inside one graph per network,
and the skip weight alpha (a new value every step) does not recompile the graph."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from medad_fast.methods import create_method, method_names, resolve_config
from medad_fast.ops import SkipMerge
from medad_fast.runtime import compile_networks
from medad_fast.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class _SkipBlock(torch.nn.Module):
    """A convolution after a weight-decay skip: ``[B, 1, H, W] -> [B, 2, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = SkipMerge(1.0)
        self.conv = torch.nn.Conv2d(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.skip(x, 2 * x))


def test_a_new_alpha_does_not_recompile_the_graph():
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _SkipBlock(), _SkipBlock()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True, backend="aot_eager")  # the graph and autograd, without inductor's C++
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    for alpha in (1.0, 0.75, 0.5, 0.0):
        eager.skip.alpha = compiled.skip.alpha = alpha
        y, y_eager = compiled(x), eager(x)
        grad, = torch.autograd.grad(y.square().sum(), x)
        grad_eager, = torch.autograd.grad(y_eager.square().sum(), x)
        assert torch.equal(y, y_eager) and torch.allclose(grad, grad_eager, rtol=1e-6, atol=1e-6), alpha
    assert counters["stats"]["unique_graphs"] == 1
    assert "alpha_tensor" not in repr(compiled.state_dict().keys())  # checkpoints do not change


def train_losses(compile: bool, steps: int = 3) -> tuple[list[float], Trainer]:
    config = resolve_config("frequency_aware", "tiny", seed=3, compile=compile)
    images = (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    trainer = Trainer(create_method(config), images, torch.device("cpu"))
    losses = []
    for step in range(steps):
        trainer.method.train()
        loss, _ = trainer.train_step(torch.arange(4) + 4 * (step % 2))
        losses.append(float(loss))
    return losses, trainer


@pytest.mark.slow
def test_compiled_training_and_prediction_match_eager():
    """The paper's method (both fused ops in its networks' graph) with inductor: about a
    minute of compiling on one CPU thread."""
    torch._dynamo.reset()
    counters.clear()
    eager_losses, _ = train_losses(compile=False)
    compiled_losses, trainer = train_losses(compile=True)
    assert counters["stats"]["unique_graphs"] == 1  # one network, one graph for the 3 steps (3 alphas)
    # the first loss is the same forward pass; after it Adam's normalised steps turn rounding
    # differences of the (tiny, 2-channel) networks' gradients into small weight differences
    assert abs(compiled_losses[0] - eager_losses[0]) <= 1e-5
    for compiled, eager in zip(compiled_losses, eager_losses):
        assert compiled == pytest.approx(eager, rel=5e-3)
    # prediction: the compiled method's maps against the same weights run eagerly
    method = trainer.method
    twin = create_method(method.config)
    twin.load_state_dict(method.state_dict())
    twin.load_method_state(method.method_state())
    twin.configure_runtime(torch.device("cpu"), amp=False, channels_last=True)
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    maps, scores = method.predict(method.to_memory_format(images))
    eager_maps, eager_scores = twin.predict(twin.to_memory_format(images))
    assert (maps - eager_maps).abs().max().item() <= 1e-4
    assert (scores - eager_scores).abs().max().item() <= 1e-4


def test_compile_networks_compiles_each_network_in_place():
    method = create_method(resolve_config("draem", "tiny"))
    keys = list(method.state_dict())
    compile_networks(method)
    assert list(method.state_dict()) == keys  # checkpoints are the same with and without it
    compiled = [name for name, child in method.named_children() if child._compiled_call_impl is not None]
    assert compiled == ["reconstructive", "discriminative"]


def test_predict_and_evaluate_with_compile_write_the_eager_results(data, tmp_path):
    """The command-line switches, on the autoencoder (seconds of compiling)."""
    import csv
    import json

    from medad_fast.cli import main as cli

    run = tmp_path / "run"
    assert cli(["train", "--method", "ae", "--data", str(data), "--out", str(run), "--preset", "tiny", "--epochs",
                "1", "--no-progress", "--device", "cpu"]) == 0
    images = [str(p) for p in sorted((data / "test").rglob("img/*.png"))]
    scores = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        assert cli(["predict", str(run), *images, "--out", str(tmp_path / name), "--no-progress", *extra]) == 0
        with (tmp_path / name / "scores.csv").open() as f:
            scores[name] = [(row["path"], float(row["score"])) for row in csv.DictReader(f)]
        assert cli(["evaluate", str(run), "--data", str(data), "--out", str(tmp_path / f"eval-{name}"), "--cases",
                    "0", "--no-progress", *extra]) == 0
    assert [p for p, _ in scores["compiled"]] == [p for p, _ in scores["eager"]]
    assert all(abs(a - b) <= 2e-6 for (_, a), (_, b) in zip(scores["compiled"], scores["eager"]))
    metrics = [json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text()) for name in ("eager", "compiled")]
    assert metrics[0]["image_auroc"] == pytest.approx(metrics[1]["image_auroc"], abs=1e-6)
    assert metrics[0]["pixel_auroc"] == pytest.approx(metrics[1]["pixel_auroc"], abs=1e-6)


@pytest.mark.parametrize("name", method_names())
def test_every_method_trains_and_predicts_compiled(name):
    """Every registered method's networks trace under torch.compile (one graph each where
    the method says so: ``compile_fullgraph``), through both of ddad's stages; the
    ``aot_eager`` backend checks the graphs and autograd in seconds."""
    torch._dynamo.reset()
    config = resolve_config(name, "tiny", seed=3)
    images = (torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    trainer = Trainer(create_method(config), images, torch.device("cpu"))
    compile_networks(trainer.method, backend="aot_eager")
    for step in range(10):  # ddad: 8 steps of autoencoders (2 epochs of 4), then its refinement net
        loss, _ = trainer.train_step(torch.arange(4) + 4 * (step % 4))
        assert torch.isfinite(loss)
    maps, scores = trainer.method.predict(torch.rand(2, 1, 32, 32))
    assert maps.shape == (2, 32, 32) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_squid_trains_compiled_with_inductors_partitioner():
    """SQUID writes its memory queue in place before the backward. Under inductor the
    compiled in-painting block once saved the queue buffer itself for the backward (the
    copy it read was dropped), and the write invalidated it: "modified by an inplace
    operation" on the second step. The reads now take a snapshot outside the compiled
    graphs; the compiled losses follow the eager ones.

    Backend ``aot_eager_decomp_partition``: inductor's decompositions and min-cut partitioner
    (which chose what the backward saves) without its C++ code generation. With the suite's
    pin (AVX2 kernels) on one thread, inductor's generated code for squid's tiny training
    step gave a non-finite loss at its first step (torch 2.13, CPU; eager, two threads, or the
    AVX-512 kernels were finite): not yet understood; squid trains eager under ``train
    --compile`` anyway (``compile_training``)."""
    torch._dynamo.reset()
    config = resolve_config("squid", "tiny", seed=3)
    images = (torch.rand(16, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    eager = Trainer(create_method(config), images, torch.device("cpu"))
    compiled = Trainer(create_method(config), images, torch.device("cpu"))
    compile_networks(compiled.method, backend="aot_eager_decomp_partition")
    for step in range(3):
        batch = torch.arange(4) + 4 * step
        expected, _ = eager.train_step(batch)
        loss, _ = compiled.train_step(batch)
        torch.testing.assert_close(loss, expected, rtol=5e-3, atol=1e-5)
    torch.testing.assert_close(compiled.method.memory.memory, eager.method.memory.memory, rtol=5e-3, atol=1e-4)


def test_a_method_whose_compiled_training_fails_trains_eager_with_a_warning():
    # squid: inductor's compiled backward aborted the process at the small preset
    from medad_fast.methods import get_method

    assert not get_method("squid").compile_training and get_method("squid").compile_training_note
    config = resolve_config("squid", "tiny", seed=3, compile=True)
    images = (torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    with pytest.warns(UserWarning, match="squid trains eager"):
        trainer = Trainer(create_method(config), images, torch.device("cpu"))
    assert not any(hasattr(network, "_compiled_call_impl") and network._compiled_call_impl is not None
                   for network in trainer.method.children())
    loss, _ = trainer.train_step(torch.arange(4))
    assert torch.isfinite(loss)
