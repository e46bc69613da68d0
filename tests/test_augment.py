"""Augmentation of the normal slices (medad_fast.augment): seeded, liver-preserving,
strength 0 = identity, applied by the trainer before every method's step, bad values refused."""

from __future__ import annotations

import math

import pytest
import torch

from medad_fast import augment
from medad_fast.augment import LIVER_FLOOR, NormalSliceAugmentation, augment_normal_slices
from medad_fast.config import RunConfig, resolve_config
from medad_fast.methods import create_method, method_names
from medad_fast.train import Trainer

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SIDE = 64


def disc_livers(batch: int = 6, radius: float = 18.0, seed: int = 0, constant: float | None = None) -> torch.Tensor:
    """``[B, 1, S, S]``: a centred disc of liver (textured, or ``constant``), exactly 0 outside."""
    coords = torch.arange(SIDE, dtype=torch.float32) - (SIDE - 1) / 2
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2) <= radius ** 2
    texture = torch.rand(batch, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2
    values = texture if constant is None else torch.full_like(texture, constant)
    return torch.where(inside, values, torch.zeros(()))


def radius_map() -> torch.Tensor:
    coords = torch.arange(SIDE, dtype=torch.float32) - (SIDE - 1) / 2
    return (coords[:, None] ** 2 + coords[None, :] ** 2).sqrt()


def test_same_generator_state_gives_the_same_batch_and_another_seed_another():
    images = disc_livers()
    a = augment_normal_slices(images, torch.Generator().manual_seed(5))
    b = augment_normal_slices(images, torch.Generator().manual_seed(5))
    c = augment_normal_slices(images, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, images)
    # the module draws the same as the function
    module = NormalSliceAugmentation(1.0)
    assert torch.equal(module(images, torch.Generator().manual_seed(5)), a)


def test_background_stays_exactly_zero_and_the_liver_does_not_bleed():
    radius = 18.0
    images = disc_livers(batch=16, radius=radius)
    out = augment_normal_slices(images, torch.Generator().manual_seed(1))
    r = radius_map()
    largest = radius * (1 + augment.MAX_SCALE_CHANGE) + 1.0  # the disc scaled up, plus a pixel of rounding
    smallest = radius / (1 + augment.MAX_SCALE_CHANGE) - 1.0
    assert (out[:, :, r > largest] == 0).all(), "liver intensity outside the warped liver"
    assert (out[:, :, r < smallest] >= LIVER_FLOOR).all(), "a liver pixel became background"
    positive = out[out != 0]
    assert (positive >= LIVER_FLOOR).all() and (positive <= 1).all()
    # the liver is warped, not kept: areas differ from slice to slice
    areas = (out > 0).flatten(1).sum(1)
    assert len(set(areas.tolist())) > 1


def test_border_is_not_darkened_by_the_interpolation(monkeypatch):
    # intensity changes off: a liver of one value keeps exactly that value, up to its new border
    for name in ("MAX_LOG_CONTRAST", "MAX_BRIGHTNESS", "MAX_GAMMA_CHANGE", "MAX_NOISE_STD"):
        monkeypatch.setattr(augment, name, 0.0)
    images = disc_livers(batch=8, constant=0.4)
    out = augment_normal_slices(images, torch.Generator().manual_seed(2))
    liver = out[out > 0]
    assert torch.allclose(liver, torch.full_like(liver, 0.4), atol=1e-5)


def test_intensity_changes_stay_inside_the_liver_and_vary_between_slices():
    images = disc_livers(batch=8, constant=0.5)
    out = augment_normal_slices(images, torch.Generator().manual_seed(3))
    means = torch.stack([o[o > 0].mean() for o in out])
    assert means.std() > 0.01  # contrast / brightness / gamma differ per slice
    assert (out[:, :, radius_map() > 18.0 * 1.15 + 1] == 0).all()


def test_strength_zero_is_the_identity_and_draws_nothing():
    images = disc_livers()
    generator = torch.Generator().manual_seed(4)
    state = generator.get_state()
    assert augment_normal_slices(images, generator, 0.0) is images
    assert torch.equal(generator.get_state(), state)
    # smaller strengths change less
    weak = augment_normal_slices(images, torch.Generator().manual_seed(4), 0.1)
    strong = augment_normal_slices(images, torch.Generator().manual_seed(4), 1.0)
    assert (weak - images).abs().mean() < (strong - images).abs().mean()


@pytest.mark.parametrize("strength", [-0.1, 1.5, math.nan, True, "1"])
def test_bad_strength_is_refused_naming_the_option(strength):
    with pytest.raises(ValueError, match="--augment-strength"):
        augment_normal_slices(disc_livers(), torch.Generator(), strength)


def test_bad_inputs_are_refused_naming_them():
    with pytest.raises(ValueError, match="images"):
        augment_normal_slices(torch.rand(2, 3, 8, 8), torch.Generator())
    with pytest.raises(ValueError, match="float"):
        augment_normal_slices(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.Generator())
    with pytest.raises(ValueError, match="generator"):
        augment_normal_slices(torch.rand(2, 1, 8, 8), None)


@pytest.mark.parametrize("field, value", [("augment_strength", 1.5), ("augment_strength", -1.0),
                                          ("augment", "yes"), ("val_fraction", 1.0), ("val_fraction", -0.1),
                                          ("patience", 0)])
def test_bad_run_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        RunConfig(**{field: value, "val_fraction": 0.2} if field == "patience" else {field: value})


def test_patience_needs_a_validation_set():
    with pytest.raises(ValueError, match="patience.*--val-fraction"):
        resolve_config("frequency_aware", "tiny", patience=3)


def test_existing_presets_keep_augmentation_and_validation_off():
    for name in method_names():
        for preset in ("paper", "small", "tiny"):
            run = resolve_config(name, preset).run
            assert (run.augment, run.val_fraction, run.patience) == (False, 0.0, None)


def _recorded_inputs(monkeypatch, config, images):
    """The images the method's training step receives in one trainer step."""
    method = create_method(config)
    seen = []
    forward = type(method).forward

    def recording(self, batch, generator):
        seen.append(batch.detach().clone())
        return forward(self, batch, generator)

    monkeypatch.setattr(type(method), "forward", recording)
    trainer = Trainer(method, images, torch.device("cpu"))
    trainer.train_step(torch.arange(4))
    return seen[0]


@pytest.mark.usefixtures("one_thread")
def test_the_trainer_augments_the_normal_batch_before_the_method(monkeypatch):
    images = (disc_livers(batch=4, radius=12.0)[..., 16:48, 16:48] * 255).round().to(torch.uint8)
    plain = _recorded_inputs(monkeypatch, resolve_config("ae", "tiny"), images)
    assert torch.equal(plain, images.float() / 255)
    augmented = _recorded_inputs(monkeypatch, resolve_config("ae", "tiny", augment=True), images)
    assert not torch.equal(augmented, plain)
    assert (augmented[images == 0] == 0).float().mean() > 0.9  # the background stays background
    zero = _recorded_inputs(monkeypatch, resolve_config("ae", "tiny", augment=True, augment_strength=0.0), images)
    assert torch.equal(zero, plain)


@requires_cuda
def test_on_cuda_the_same_seed_gives_the_same_batch():
    images = disc_livers().cuda()
    a = augment_normal_slices(images, torch.Generator(device="cuda").manual_seed(5))
    b = augment_normal_slices(images, torch.Generator(device="cuda").manual_seed(5))
    assert torch.equal(a, b) and (a[:, :, radius_map().cuda() > 18.0 * 1.15 + 1] == 0).all()
