"""The published AE as a configuration of ``ae``: MedIAnomaly's dense-latent network layer for
layer (shapes and parameter counts computed by hand from the public
``reconstruction/networks/ae.py`` at its default options), the ``medianomaly`` preset (its
intensity range, loss, map and score against hand-computed values), and presets beyond
paper/small/tiny for the methods that declare them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medad_fast.config import OPTIONAL_PRESET_NAMES, RunConfig
from medad_fast.methods import create_method, resolve_config
from medad_fast.models.autoencoder import ConvAutoencoder, DenseAutoencoder
from medad_fast.models.scoring import smoothed_residual_map

# By hand, from networks/ae.py at base_width 16, expansion 1, hidden_num 1024, ls 16, 64 x 64:
# four down_conv (4x4, stride 2, bias=False) 1->16->32->64->64, each + BN2d + ReLU; 64 x 4 x 4 = 1024
# values flattened; Linear(1024, 1024) BN1d ReLU Linear(1024, 16); Linear(16, 1024) BN1d ReLU
# Linear(1024, 1024); four up_conv (4x4 transposed, bias=False) 64->64->32->16 + BN2d + ReLU, ->1 bare.
ENCODER_CONVS = [16 * 1 * 16, 32 * 16 * 16, 64 * 32 * 16, 64 * 64 * 16]  # out x in x 4 x 4
DECODER_CONVS = [64 * 64 * 16, 64 * 32 * 16, 32 * 16 * 16, 16 * 1 * 16]  # in x out x 4 x 4
BATCH_NORMS = 2 * (16 + 32 + 64 + 64) + 2 * (64 + 32 + 16) + 2 * 2 * 1024  # weight + bias
LINEARS = (1024 * 1024 + 1024) + (1024 * 16 + 16) + (16 * 1024 + 1024) + (1024 * 1024 + 1024)
PUBLISHED_PARAMETERS = sum(ENCODER_CONVS) + sum(DECODER_CONVS) + BATCH_NORMS + LINEARS  # 2,351,184


def layer_list(module: nn.Module) -> list[tuple]:
    """The leaf layers in order, with what decides their weights."""
    described = []
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            described.append((type(layer).__name__, layer.in_channels, layer.out_channels, layer.kernel_size,
                              layer.stride, layer.padding, layer.bias is not None))
        elif isinstance(layer, nn.Linear):
            described.append(("Linear", layer.in_features, layer.out_features))
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            described.append((type(layer).__name__, layer.num_features))
        elif isinstance(layer, nn.ReLU):
            described.append(("ReLU",))
    return described


def test_the_dense_autoencoder_is_medianomalys_ae_layer_for_layer():
    net = DenseAutoencoder(image_size=64, base_width=16, latent_size=16, hidden_size=1024, depth=4)
    down = lambda i, o: [("Conv2d", i, o, (4, 4), (2, 2), (1, 1), False), ("BatchNorm2d", o), ("ReLU",)]  # noqa: E731
    up = lambda i, o: [("ConvTranspose2d", i, o, (4, 4), (2, 2), (1, 1), False), ("BatchNorm2d", o), ("ReLU",)]  # noqa: E731,E501
    expected = [*down(1, 16), *down(16, 32), *down(32, 64), *down(64, 64),
                ("Linear", 1024, 1024), ("BatchNorm1d", 1024), ("ReLU",), ("Linear", 1024, 16),
                ("Linear", 16, 1024), ("BatchNorm1d", 1024), ("ReLU",), ("Linear", 1024, 1024),
                *up(64, 64), *up(64, 32), *up(32, 16), ("ConvTranspose2d", 16, 1, (4, 4), (2, 2), (1, 1), False)]
    assert layer_list(net) == expected
    assert PUBLISHED_PARAMETERS == 2_351_184
    assert sum(p.numel() for p in net.parameters()) == PUBLISHED_PARAMETERS


def test_the_dense_latent_is_a_vector_of_latent_size():
    net = DenseAutoencoder(image_size=64, latent_size=16).eval()
    x = torch.rand(3, 1, 64, 64)
    assert net.encode(x).shape == (3, 16)
    assert net(x).shape == (3, 1, 64, 64)
    assert DenseAutoencoder(image_size=32, base_width=2, latent_size=5, hidden_size=8, depth=2).encode(
        torch.rand(2, 1, 32, 32)).shape == (2, 5)


def test_the_dense_autoencoder_refuses_a_side_it_was_not_built_for():
    with pytest.raises(ValueError, match="built for 64 x 64 images; got \\(32, 32\\)"):
        DenseAutoencoder(image_size=64)(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 2\\^depth = 16"):
        DenseAutoencoder(image_size=72)


def test_the_medianomaly_preset_is_the_published_protocol():
    config = resolve_config("ae", "medianomaly")
    run, m = config.run, config.method
    assert (run.image_size, run.batch_size, run.epochs, run.lr, run.amp, run.augment, run.crop) == \
        (64, 64, 600, 1e-3, False, False, "none")
    assert (m.latent, m.latent_size, m.hidden_size, m.ae_width, m.ae_depth) == ("dense", 16, 1024, 16, 4)
    assert (m.input_range, m.ssim_weight, m.lr_milestones) == ("symmetric", 0.0, ())
    assert (m.residual, m.residual_sigma, m.roi_threshold, m.image_score) == ("squared", 0.0, None, "mean")
    method = create_method(config)
    assert isinstance(method.autoencoder, DenseAutoencoder)
    assert sum(p.numel() for p in method.parameters()) == PUBLISHED_PARAMETERS
    # constant lr: the public scheduler is commented out
    optimizers, schedulers = method.configure_optimizers()
    assert [type(o).__name__ for o in optimizers] == ["Adam"] and optimizers[0].defaults["weight_decay"] == 0
    assert all(not scheduler.milestones for scheduler in schedulers)


def test_the_other_presets_keep_the_convolutional_autoencoder_and_its_scoring():
    for preset in ("paper", "small", "tiny"):
        m = resolve_config("ae", preset).method
        assert (m.latent, m.input_range, m.residual, m.image_score, m.ssim_weight, m.lr_milestones,
                m.residual_sigma, m.roi_threshold) == ("conv", "unit", "abs", "max_filter", 1.0, (0.8, 0.9), 4.0, 0.0)
        assert isinstance(create_method(resolve_config("ae", preset)).autoencoder, ConvAutoencoder)


def published_ae_at(size=32, **changes):
    """The medianomaly configuration at a side and width a unit test can afford."""
    return create_method(resolve_config("ae", "medianomaly", image_size=size, ae_width=2, ae_depth=2,
                                        hidden_size=8, latent_size=4, **changes))


def test_the_network_sees_intensities_in_minus_one_to_one_and_the_loss_is_their_mse(monkeypatch):
    method = published_ae_at()
    seen = {}
    # a network that outputs 0 everywhere: in [-1, 1] that is intensity 0.5
    monkeypatch.setattr(method.autoencoder, "forward", lambda x: seen.setdefault("x", x) * 0)
    images = torch.ones(2, 1, 32, 32)
    images[:, :, :16] = 0.0  # half black, half white
    loss, terms = method(images, torch.Generator())
    assert torch.equal(seen["x"], images * 2 - 1)  # ToTensor + Normalize(0.5, 0.5)
    # MSE in [-1, 1]: every pixel is 1 away from 0 -> 1.0 (it would be 0.25 in [0, 1])
    assert float(loss) == pytest.approx(1.0) and set(terms) == {"loss_mse"}


def test_the_map_is_the_squared_error_over_the_whole_image_and_the_score_its_mean(monkeypatch):
    method = published_ae_at()
    monkeypatch.setattr(method.autoencoder, "forward", lambda x: x * 0)  # reconstruction 0.5 in [0, 1]
    images = torch.zeros(2, 1, 32, 32)
    images[0, :, :8] = 1.0  # a quarter of image 0 is white; image 1 is black (no liver ROI applies)
    maps, scores = method.predict(images)
    # map in [0, 1] units: (1 - 0.5)^2 = 0.25 on white, (0 - 0.5)^2 = 0.25 on black -> 0.25 everywhere
    assert torch.allclose(maps, torch.full((2, 32, 32), 0.25))
    assert torch.allclose(scores, torch.tensor([0.25, 0.25]))
    monkeypatch.setattr(method.autoencoder, "forward", lambda x: x * 0 - 1)  # reconstruction 0 (black)
    maps, scores = method.predict(images)
    # image 0: a quarter of the pixels err by 1 -> mean 0.25; image 1 is rebuilt exactly -> 0
    assert torch.allclose(scores, torch.tensor([0.25, 0.0]))
    assert float(maps[0, :8].min()) == 1.0 and float(maps[0, 8:].max()) == 0.0


def test_squared_residual_map_with_smoothing_and_roi_off():
    image, reconstruction = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    reconstruction[0, 0, 1, 2] = -0.5
    squared = smoothed_residual_map(image, reconstruction, 0.0, None, squared=True)
    absolute = smoothed_residual_map(image, reconstruction, 0.0, None)
    assert float(squared[0, 1, 2]) == 0.25 and float(absolute[0, 1, 2]) == 0.5
    assert float(squared.sum()) == 0.25


def test_settings_that_cannot_run_are_refused_naming_them():
    with pytest.raises(ValueError, match="config latent='flat': must be one of \\['conv', 'dense'\\]"):
        resolve_config("ae", "tiny", latent="flat")
    with pytest.raises(ValueError, match="ssim_weight=1.0: must be 0 with input_range 'symmetric'"):
        resolve_config("ae", "medianomaly", ssim_weight=1.0)
    with pytest.raises(ValueError, match="image_score"):
        resolve_config("ae", "tiny", image_score="max")


def test_presets_beyond_the_shared_three_belong_to_the_methods_that_declare_them():
    from medad_fast.methods import get_method

    assert "medianomaly" in OPTIONAL_PRESET_NAMES and "medianomaly" in get_method("ae").presets
    assert "medianomaly" not in get_method("frequency_aware").presets
    with pytest.raises(ValueError, match="unknown preset 'medianomaly' for method 'frequency_aware'"):
        resolve_config("frequency_aware", "medianomaly")
    assert RunConfig(method="ae", preset="medianomaly").preset == "medianomaly"
