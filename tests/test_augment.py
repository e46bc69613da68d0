"""Augmentation of the normal slices (medad_fast.augment): seeded, liver-preserving,
strength 0 = identity, applied by the trainer before every method's step, bad values refused."""

from __future__ import annotations

import math

import pytest
import torch

from medad_fast import augment
from medad_fast.augment import LIVER_FLOOR, NormalSliceAugmentation, augment_normal_slices
from medad_fast.config import RunConfig
from medad_fast.methods import create_method, method_names, resolve_config
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


# ----------------------------------------------------------------------------------------------
# DRAEM's loader: its anomaly-source augmentation (3 of 10 imgaug ops) and its 30 % rotated
# normal images. Each op on a tiny tensor of grey levels against its definition (imgaug's
# uint8 tables, PIL's ImageEnhance / ImageOps), values worked out by hand in the comments.
# ----------------------------------------------------------------------------------------------

def levels(*values: float) -> torch.Tensor:
    """``[1, 1, 1, N]`` grey levels."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def one(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor([value], dtype=dtype)


def test_gamma_contrast_is_imgaugs_truncated_table():
    x = levels(0, 64, 128, 255)
    # 255 (v / 255)^2 = v^2 / 255: 16.06 -> 16, 64.25 -> 64; gamma 1/2: sqrt(255 v) = 127.75 -> 127, 180.67 -> 180
    assert augment.gamma_contrast(x, one(2.0)).flatten().tolist() == [0, 16, 64, 255]
    assert augment.gamma_contrast(x, one(0.5)).flatten().tolist() == [0, 127, 180, 255]


def test_multiply_and_add_to_brightness_in_grey_and_in_lightness_spaces():
    x = levels(100, 250, 128)
    linear, lab = torch.tensor([False]), torch.tensor([True])
    # YCrCb / HSV / HLS / YUV: the brightness channel is the grey level
    # multiply first: 100 * 1.1 = 110, + 10 = 120; 250 * 1.1 = 275 -> 255 -> 255; 128 * 1.1 = 140.8 -> 141 -> 151
    out = augment.multiply_and_add_to_brightness(x, one(1.1), one(10.0), torch.tensor([True]), linear)
    assert out.flatten().tolist() == [120, 255, 151]
    # add first: (100 + 10) * 1.1 = 121; (128 + 10) * 1.1 = 151.8 -> 152
    out = augment.multiply_and_add_to_brightness(x, one(1.1), one(10.0), torch.tensor([False]), linear)
    assert out.flatten().tolist() == [121, 255, 152]
    # Lab / Luv: grey 128 -> linear 0.2159 -> L* 53.59 -> 8-bit 137 (L* 255 / 100); x 1.2 = 164.4 -> 164
    # -> L* 64.31 -> Y 0.3319 -> sRGB 0.6113 -> 155.9 -> 156, where the grey-level spaces give 153.6 -> 154
    x = levels(128)
    out = augment.multiply_and_add_to_brightness(x, one(1.2), one(0.0), torch.tensor([True]), lab)
    assert out.item() == 156
    out = augment.multiply_and_add_to_brightness(x, one(1.2), one(0.0), torch.tensor([True]), linear)
    assert out.item() == 154
    # the identity parameters give grey 128 back through L* (137 -> 53.73 -> 128.4 -> 128)
    out = augment.multiply_and_add_to_brightness(x, one(1.0), one(0.0), torch.tensor([True]), lab)
    assert out.item() == 128


def test_enhance_sharpness_is_pils_smooth_blend():
    # 3 x 3: the border keeps x (PIL's 3 x 3 filter copies it); the centre's SMOOTH value is
    # (5 * 131 + 8 * 0) / 13 = 50.38 -> 50; blend d + f (x - d), truncated
    x = torch.zeros(1, 1, 3, 3)
    x[..., 1, 1] = 131.0
    expected = {0.0: 50, 0.1: 58, 0.5: 90, 1.0: 131, 2.0: 212}  # 50 + 0.1 * 81 = 58.1 -> 58; 50 + 2 * 81 = 212
    for factor, centre in expected.items():
        out = augment.enhance_sharpness(x, one(factor))
        assert out[0, 0, 1, 1].item() == centre, factor
        assert out.sum().item() == centre  # the border stays 0
    x[..., 1, 1] = 200.0  # 1000 / 13 = 76.9 -> 77; 77 + 2 * 123 = 323 -> 255
    assert augment.enhance_sharpness(x, one(2.0))[0, 0, 1, 1].item() == 255


def test_solarize_posterize_invert_are_imgaugs_tables():
    x = levels(31, 32, 99, 100, 127, 128, 200)
    # threshold 100.7: int() -> 100; v >= 100 -> 255 - v
    out = augment.solarize(x, one(100.7), torch.tensor([True]))
    assert out.flatten().tolist() == [31, 32, 99, 155, 128, 127, 55]
    assert torch.equal(augment.solarize(x, one(100.7), torch.tensor([False])), x)  # p = 0.5 drew "no"
    x = levels(0, 31, 32, 100, 255)
    # 3 bits: v & 0b11100000
    assert augment.posterize(x, torch.tensor([3])).flatten().tolist() == [0, 0, 32, 96, 224]
    assert augment.posterize(x, torch.tensor([1])).flatten().tolist() == [0, 0, 0, 0, 128]
    assert torch.equal(augment.posterize(x, torch.tensor([8])), x)
    assert augment.invert(x).flatten().tolist() == [255, 224, 223, 155, 0]


def test_autocontrast_cuts_the_histogram_ends_as_pil():
    x = levels(50, 60, 60, 70, 80, 80, 90, 100, 110, 200)
    # cutoff 0: lo 50, hi 200, scale 255 / 150 = 1.7: (v - 50) 1.7
    assert augment.autocontrast(x, torch.tensor([0])).flatten().tolist() == [0, 17, 17, 34, 51, 51, 68, 85, 102, 255]
    # cutoff 10 %: 1 pixel off each end -> lo 60, hi 110, scale 5.1; PIL evaluates int(v scale -
    # lo scale) in float64, where 90 * 5.1 - 306 = 152.99999999999994 -> 152 (exactly: 153) and
    # 100 -> 203.99999999999994 -> 203: PIL's values, not the exact ones
    assert augment.autocontrast(x, torch.tensor([10])).flatten().tolist() == [0, 0, 0, 51, 102, 102, 152, 203, 255,
                                                                               255]
    # cutoff 20 %: 2 pixels off each end -> lo 60 (one of its two pixels is left), hi 100; scale 6.375:
    # 63.75 -> 63, 127.5 -> 127, 191.25 -> 191
    assert augment.autocontrast(x, torch.tensor([20])).flatten().tolist() == [0, 0, 0, 63, 127, 127, 191, 255, 255,
                                                                               255]
    flat = levels(7, 7, 7)
    assert torch.equal(augment.autocontrast(flat, torch.tensor([0])), flat)  # hi <= lo: the identity


def test_equalize_is_imgaugs_equalisation():
    # 512 pixels: 128 at 10, 256 at 20, 128 at 30; step = 512 // 255 = 2;
    # table[v] = (1 + pixels below v) // 2: 10 -> 0, 20 -> 129 // 2 = 64, 30 -> 385 // 2 = 192
    x = torch.cat([torch.full((128,), 10.0), torch.full((256,), 20.0), torch.full((128,), 30.0)]).view(1, 1, 16, 32)
    out = augment.equalize(x)
    assert out.unique().tolist() == [0, 64, 192]
    assert torch.equal(out, torch.where(x == 10, 0.0, torch.where(x == 20, 64.0, 192.0)))
    # 256 at 0 and 256 at 255: step = (512 - 256) // 255 = 1; 255 -> 256 -> clipped to 255
    x = torch.cat([torch.zeros(256), torch.full((256,), 255.0)]).view(1, 1, 16, 32)
    assert torch.equal(augment.equalize(x), x)
    small = levels(0, 100, 200)  # 3 pixels: step = 0 -> the identity
    assert torch.equal(augment.equalize(small), small)
    flat = torch.full((1, 1, 16, 32), 40.0)  # one level -> the identity
    assert torch.equal(augment.equalize(flat), flat)


def test_rotate_by_90_degrees_is_a_pixel_permutation_and_45_clears_the_corners():
    x = torch.arange(25, dtype=torch.float32).view(1, 1, 5, 5)
    quarter = augment.rotate(x, one(90.0))
    assert torch.equal(quarter, torch.rot90(x, 1, dims=(-2, -1))) or torch.equal(quarter, torch.rot90(x, -1, dims=(-2, -1)))
    flat = torch.full((1, 1, 9, 9), 200.0)
    out = augment.rotate(flat, one(45.0))
    assert out[0, 0, 4, 4] == 200 and out[0, 0, 0, 0] == 0 and out[0, 0, 8, 8] == 0  # zero fill (cval 0)


def test_each_sample_gets_exactly_three_distinct_ops_each_op_with_probability_three_tenths():
    n = 3000
    draw = augment.SourceAugmentationDraw.draw(n, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert draw.ops.shape == (n, augment.DRAEM_OPS_PER_SAMPLE) == (n, 3)
    assert draw.ops.min() >= 0 and draw.ops.max() < len(augment.DRAEM_SOURCE_OPS) == 10
    assert (draw.ops.sort(dim=1).values.diff(dim=1) != 0).all(), "an op drawn twice for one sample"
    # each op is in a sample's 3 with probability 3/10: binomial(n, 0.3), 4.5 standard deviations
    counts = torch.bincount(draw.ops.flatten(), minlength=10).double()
    tolerance = 4.5 * math.sqrt(n * 0.3 * 0.7)
    assert ((counts - 0.3 * n).abs() <= tolerance).all(), counts.tolist()
    # the ranges: DRAEM's and imgaug's defaults
    assert 0.5 <= draw.gamma.min() and draw.gamma.max() <= 2.0
    assert 0.8 <= draw.mul.min() and draw.mul.max() <= 1.2
    assert set(draw.add.unique().tolist()) <= set(range(-30, 31)) and draw.add.min() <= -29 and draw.add.max() >= 29
    assert set(draw.colour_space.unique().tolist()) == set(range(6))
    assert set(draw.posterize_bits.unique().tolist()) == set(range(1, 9))
    assert set(draw.autocontrast_cutoff.unique().tolist()) == set(range(21))
    assert 32 <= draw.solarize_threshold.min() and draw.solarize_threshold.max() <= 128
    assert 0 <= draw.sharpness.min() and draw.sharpness.max() <= 2
    assert -45 <= draw.rotation_degrees.min() and draw.rotation_degrees.max() <= 45


def test_the_drawn_ops_are_applied_in_their_order_and_hue_saturation_is_the_identity_on_grey():
    draw = augment.SourceAugmentationDraw.draw(1, torch.Generator().manual_seed(0), torch.device("cpu"))
    draw.posterize_bits, draw.gamma = torch.tensor([3]), one(2.0)
    sources = levels(51, 200) / 255.0  # grey levels 51 and 200
    # invert, posterize 3 bits, gamma 2: 204, 55 -> 192, 32 -> 144 (36864 / 255 = 144.6), 4 (4.02)
    draw.ops = torch.tensor([[6, 5, 0]])
    assert (augment.apply_source_augmentation(sources, draw) * 255).round().flatten().tolist() == [144, 4]
    # the reverse order: gamma 10 (10.2), 156 (156.9) -> 0, 128 -> 255, 127
    draw.ops = torch.tensor([[0, 5, 6]])
    assert (augment.apply_source_augmentation(sources, draw) * 255).round().flatten().tolist() == [255, 127]
    draw.ops = torch.tensor([[3, 3, 3]])  # AddToHueAndSaturation (only to test the op itself)
    assert torch.equal(augment.apply_source_augmentation(sources, draw), sources)


def test_source_augmentation_is_determined_by_the_generator_and_stays_8_bit():
    sources = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    a = augment.augment_anomaly_sources(sources, torch.Generator().manual_seed(1))
    b = augment.augment_anomaly_sources(sources, torch.Generator().manual_seed(1))
    c = augment.augment_anomaly_sources(sources, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == sources.shape and a.dtype == sources.dtype
    assert a.min() >= 0 and a.max() <= 1 and torch.equal(a * 255, (a * 255).round())
    with pytest.raises(ValueError, match="images must be a tensor"):
        augment.augment_anomaly_sources(torch.rand(2, 3, 8, 8), torch.Generator())


def test_about_three_in_ten_normal_images_are_rotated_the_rest_are_untouched():
    n = 4000
    images = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    out = augment.rotate_normal_images(images, torch.Generator().manual_seed(3))
    changed = (out != images).flatten(1).any(dim=1)
    # binomial(n, 0.3): within 4.5 standard deviations (about 0.03 of n)
    tolerance = 4.5 * math.sqrt(n * 0.3 * 0.7)
    assert abs(changed.sum().item() - 0.3 * n) <= tolerance, changed.sum().item()
    # what the draws say: rand > 0.7 rotates, by U(-90, 90) degrees; the others are bit-identical
    g = torch.Generator().manual_seed(3)
    rotate = torch.rand(n, generator=g) > 0.7
    degrees = (torch.rand(n, generator=g) * 2 - 1) * 90
    assert torch.equal(changed, rotate)
    assert torch.equal(out[~rotate], images[~rotate])
    k = int(rotate.nonzero()[0])
    torch.testing.assert_close(out[k:k + 1], augment.rotate(images[k:k + 1] * 255, degrees[k:k + 1]) / 255,
                               atol=0.5 / 255, rtol=0)
    same = augment.rotate_normal_images(images, torch.Generator().manual_seed(3))
    assert torch.equal(out, same)
    assert torch.equal(augment.rotate_normal_images(images, torch.Generator().manual_seed(3), probability=0.0), images)


@requires_cuda
def test_on_cuda_draems_source_augmentation_is_determined_by_the_generator():
    sources = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    a = augment.augment_anomaly_sources(sources, torch.Generator("cuda").manual_seed(1))
    b = augment.augment_anomaly_sources(sources, torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a * 255, (a * 255).round())
