"""One training step of each method's ``small`` preset (batch 8) with the compiled ops vs
with the pure-PyTorch reference ops, and the parts of the paper's step the ops own.

A step is :meth:`medad_fast.train.Trainer.train_step`: batch -> the method's step (for the
paper's method: anomaly synthesis -> Butterworth high-pass -> reconstruction + segmentation
forward -> loss) -> backward -> Adam step. Group ``train step ...`` gives images/s; group
``train step parts ...`` times the synthesis of the step's batch and its high-pass alone,
so the report can state the share of the step they take. On CUDA, group ``paper step
(AMP, channels_last) ...`` times each method's paper-preset step as a GPU user trains it.
"""

from __future__ import annotations

import pytest
import torch

from conftest import measure
from medad_fast import ops
from medad_fast.data.phantom import ellipse_slices
from medad_fast.methods import create_method, method_names, resolve_config
from medad_fast.train import Trainer

PRESET = "small"
N_IMAGES = 32


def make_trainer(device: torch.device, method: str = "frequency_aware", compile: bool = False,
                 ema: float | None = None) -> Trainer:
    config = resolve_config(method, PRESET, compile=compile, ema=ema)
    images = ellipse_slices(N_IMAGES, config.run.image_size)
    return Trainer(create_method(config), images, device)


def step_name(trainer: Trainer, device: torch.device) -> str:
    c = trainer.config.run
    return f"{c.method} {c.preset} B={c.batch_size} {c.image_size}x{c.image_size} {device.type}"


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("impl", ["extension", "reference"])
def test_train_step(benchmark, device, impl, method):
    # The fused ops are a few % of a step (convolutions are the rest), less than what a
    # shared machine drifts between two runs: every timed step of one implementation is
    # preceded by an untimed step of the other, so both are timed as interleaved pairs.
    trainer = make_trainer(device, method)
    batch_index = torch.arange(trainer.config.run.batch_size)

    def step(reference: bool):
        with ops.use_reference(reference):
            return trainer.train_step(batch_index)

    use_reference = impl == "reference"
    measure(benchmark, lambda: step(use_reference), device, group=f"train step {step_name(trainer, device)}",
            impl=impl, images=trainer.config.run.batch_size, min_rounds=20, warmup_calls=5,
            setup=lambda: step(not use_reference))


@pytest.mark.parametrize("method", method_names())
def test_train_step_compiled(benchmark, device, method):
    # --compile (torch.compile of the method's networks, inductor) against the eager step of
    # the same group; interleaved with eager steps as above. The first calls compile (about
    # a minute per method on 2 CPU cores), so they are warm-up.
    from medad_fast.methods import get_method
    if not get_method(method).compile_training:
        pytest.skip(f"{method} trains eager under --compile: {get_method(method).compile_training_note}")
    eager, compiled = make_trainer(device, method), make_trainer(device, method, compile=True)
    batch_index = torch.arange(compiled.config.run.batch_size)
    measure(benchmark, lambda: compiled.train_step(batch_index), device,
            group=f"train step {step_name(compiled, device)}", impl="extension, compiled",
            images=compiled.config.run.batch_size, min_rounds=20, warmup_calls=3,
            setup=lambda: eager.train_step(batch_index))


EMA_IMPLS = ("extension", "extension, --ema 0.999", "ema update")


@pytest.mark.parametrize("method", ["frequency_aware", "ae"])
@pytest.mark.parametrize("impl", EMA_IMPLS)
def test_train_step_ema(benchmark, device, method, impl):
    # --ema: the step with the moving-average update after the optimiser step
    # (medad_fast.weight_averaging) against the plain step, interleaved as above, and the
    # update alone; the report divides the update by the step (the bound: < 3 % of
    # the small preset's step; the two whole steps differ by less than their noise).
    plain, averaged = make_trainer(device, method), make_trainer(device, method, ema=0.999)
    batch_index = torch.arange(plain.config.run.batch_size)
    if impl == "ema update":
        averaged.train_step(batch_index)  # the average exists (the first update copies)
        fn, other = (lambda: averaged.ema.update()), (lambda: None)
    else:
        timed, untimed = (averaged, plain) if impl != "extension" else (plain, averaged)
        fn, other = (lambda: timed.train_step(batch_index)), (lambda: untimed.train_step(batch_index))
    measure(benchmark, fn, device, group=f"train step --ema {step_name(plain, device)}", impl=impl,
            images=plain.config.run.batch_size, min_rounds=20, warmup_calls=5, setup=other)


@pytest.mark.parametrize("ops_impl", ["extension", "reference"])
@pytest.mark.parametrize("part", ["synthesis", "high-pass"])
def test_train_step_parts(benchmark, device, part, ops_impl):
    trainer = make_trainer(device)
    batch = trainer.images[: trainer.config.run.batch_size].float().div_(255.0)
    generator, synthesizer = trainer.method_generator, trainer.method.synthesizer
    use_reference = ops_impl == "reference"
    with ops.use_reference(use_reference):
        augmented, _ = synthesizer(batch, generator)
    if part == "synthesis":
        def fn():
            with ops.use_reference(use_reference):
                return synthesizer(batch, generator)
    else:
        def fn():
            with ops.use_reference(use_reference):
                return trainer.method.model.highpass(augmented)
    measure(benchmark, fn, device, group=f"train step parts {step_name(trainer, device)}",
            impl=f"{part} ({ops_impl})", images=trainer.config.run.batch_size)


@pytest.mark.parametrize("method", method_names())
def test_train_step_paper_amp_channels_last(benchmark, device, method):
    # What a GPU user trains: the paper preset with mixed precision (bfloat16 where the GPU
    # has it) and channels_last, the presets' defaults. CUDA only: on a 2-core CPU a paper
    # step takes seconds, and autocast is off on the CPU anyway.
    if device.type != "cuda":
        pytest.skip("the paper-preset step is timed on CUDA only")
    config = resolve_config(method, "paper")
    assert config.run.amp and config.run.channels_last, "the paper preset trains with AMP + channels_last"
    trainer = Trainer(create_method(config), ellipse_slices(4 * config.run.batch_size, config.run.image_size),
                      device)
    batch_index = torch.arange(config.run.batch_size)
    c = config.run
    measure(benchmark, lambda: trainer.train_step(batch_index), device,
            group=f"paper step (AMP, channels_last) {method} B={c.batch_size} {c.image_size}x{c.image_size} "
                  f"{device.type}", impl="extension", images=c.batch_size, warmup_calls=5)
