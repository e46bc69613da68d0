"""The benchmark peers (benchmarks/peers.py) compute what our ops compute.

The ratios in benchmarks/RESULTS.md only mean something if every peer does the same job
as our op. Checked here against the pure-PyTorch reference (and the public op):
deterministic pieces exactly on the same lattice / input, the random pipelines by the
statistics of many draws (mask coverage, noise mean and spread), each within a tolerance
of 4 standard errors of the difference.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from medad_fast import ops, reference

from conftest import random_lattice

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

SIZE = 128
DRAWS = 160


def _padded_angles(angles: np.ndarray, nodes: int = 33) -> torch.Tensor:
    """One sample's ``[ry+1, rx+1]`` angles as our ops' ``[1, nodes, nodes]`` float64 tensor."""
    padded = torch.zeros(1, nodes, nodes, dtype=torch.float64)
    padded[0, :angles.shape[0], :angles.shape[1]] = torch.as_tensor(angles)
    return padded


@pytest.mark.parametrize("res", [(1, 1), (2, 8), (32, 4), (32, 32)])
def test_draem_perlin_equals_reference_on_the_same_lattice(res):
    rng = np.random.default_rng(7)
    angles = 2 * math.pi * rng.random((res[0] + 1, res[1] + 1))
    draem = peers.rand_perlin_2d_np((SIZE, SIZE), res, rng, angles=angles)
    ours = reference.perlin_noise(_padded_angles(angles), torch.tensor([res]), SIZE, SIZE)[0]
    assert draem.shape == (SIZE, SIZE)
    np.testing.assert_allclose(draem, ours.numpy(), rtol=0, atol=1e-12)


def test_draem_perlin_needs_a_size_divisible_by_the_resolution():
    with pytest.raises(ValueError, match="divisible"):
        peers.rand_perlin_2d_np((100, 128), (8, 8), np.random.default_rng(0))


@pytest.mark.parametrize("size", [(128, 128), (100, 120)])
def test_anomalib_perlin_is_the_reference_at_the_next_power_of_two_cropped(size):
    height, width = size
    res = (4, 16)
    angles = 2 * math.pi * np.random.default_rng(3).random((res[0] + 1, res[1] + 1))
    noise = peers.generate_perlin_noise(height, width, torch.Generator(), scale=res,
                                        angles=torch.as_tensor(angles, dtype=torch.float32))
    # anomalib evaluates the 128 x 128 field and crops it, so pixel i sits at i * ry / 128
    full = reference.perlin_noise(_padded_angles(angles), torch.tensor([res]), 128, 128)[0]
    assert noise.shape == (height, width) and noise.dtype == torch.float32
    torch.testing.assert_close(noise, full[:height, :width].float(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("degrees", [-73.0, 25.0, 90.0])
def test_peer_rotations_match_our_rotated_field(degrees):
    """scipy's (DRAEM) and the grid_sample (anomalib) rotation by ``degrees`` resample the
    field that our op evaluates exactly at ``rotation = -radians(degrees)``: the masks
    agree except near the threshold and at the border (bilinear vs exact, zero fill edge)."""
    res = (8, 8)
    angles = 2 * math.pi * np.random.default_rng(11).random((res[0] + 1, res[1] + 1))
    lattice, res_t = _padded_angles(angles), torch.tensor([res])
    field = reference.perlin_noise(lattice, res_t, SIZE, SIZE)[0]
    ours = reference.perlin_noise(lattice, res_t, SIZE, SIZE,
                                  torch.tensor([-math.radians(degrees)], dtype=torch.float64))[0].numpy()
    draem = scipy.ndimage.rotate(field.numpy(), degrees, reshape=False, order=1, mode="constant", cval=0.0)
    anomalib = peers.anomalib_rotate(field.float(), degrees).numpy()
    # pixels whose pre-image lies a pixel or more inside the field, away from the edge
    # where the zero fill starts (bilinear blends it in over a pixel, our op cuts at 0.5)
    rotation = -math.radians(degrees)
    centre = (SIZE - 1) / 2
    dy, dx = np.meshgrid(np.arange(SIZE) - centre, np.arange(SIZE) - centre, indexing="ij")
    y = centre + math.cos(rotation) * dy - math.sin(rotation) * dx
    x = centre + math.sin(rotation) * dy + math.cos(rotation) * dx
    interior = (y >= 1) & (y <= SIZE - 2) & (x >= 1) & (x <= SIZE - 2)
    for name, rotated in (("draem", draem), ("anomalib", anomalib)):
        agree = ((rotated > 0.5) == (ours > 0.5)).mean()
        assert agree >= 0.995, f"{name}: masks agree on only {agree:.4f} of the pixels"
        error = np.abs(rotated - ours)[interior]
        assert np.median(error) < 5e-3 and error.max() < 0.02, f"{name}: interpolation error too large"
    # a rotation actually happened: the unrotated field disagrees with it
    assert ((field.numpy() > 0.5) != (ours > 0.5)).mean() > 0.01


def _standard_error_of_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return math.sqrt(a.var().item() / a.numel() + b.var().item() / b.numel())


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(5)
    images = 0.1 + 0.9 * torch.rand(DRAWS, 1, SIZE, SIZE, generator=g)
    images[:, :, : SIZE // 4] = 0.0  # a quarter of every image is outside the "liver"
    sources = torch.rand(DRAWS, 1, SIZE, SIZE, generator=g)
    return images, sources


@pytest.fixture(scope="module")
def ours(batch):
    images, sources = batch
    angles, res, rotation = random_lattice(DRAWS, torch.Generator().manual_seed(6))
    noise = ops.perlin_noise(angles, res, SIZE, SIZE, rotation)
    beta = torch.full((DRAWS,), 0.5)
    _, mask = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta,
                                       torch.ones(DRAWS, dtype=torch.bool))
    return noise, mask


def _check_blend(images, sources, augmented, mask, opacity_range):
    """Outside the mask nothing changes; inside, ``I_a = I + opacity (A - I)`` with one
    opacity per sample inside ``opacity_range``; the liver mask is respected."""
    inside = mask.bool()
    assert not inside[images <= 0].any(), "mask outside the liver"
    torch.testing.assert_close(augmented[~inside], images[~inside], rtol=0, atol=1e-6)
    for b in range(images.shape[0]):
        m = inside[b]
        if not m.any():
            continue
        image, source = images[b][m].double(), sources[b][m].double()
        usable = (source - image).abs() > 0.05
        opacity = (augmented[b][m].double() - image)[usable] / (source - image)[usable]
        assert opacity.max() - opacity.min() < 1e-4, "opacity varies inside one sample"
        assert opacity_range[0] - 1e-5 <= opacity.mean() <= opacity_range[1] + 1e-5


def _check_coverage_and_noise(name, peer_mask, peer_noise, our_mask, our_noise, nonempty_only=False):
    peer_cov = peer_mask.flatten(1).mean(1)
    our_cov = our_mask.flatten(1).mean(1)
    if nonempty_only:  # the peer redraws empty masks: compare with our non-empty draws
        our_cov = our_cov[our_cov > 0]
    diff = abs(peer_cov.mean().item() - our_cov.mean().item())
    assert diff < 4 * _standard_error_of_difference(peer_cov, our_cov), (
        f"{name}: mean coverage {peer_cov.mean():.4f} vs ours {our_cov.mean():.4f}")
    # per-draw mean and spread of the rotated field
    for stat in (lambda n: n.flatten(1).mean(1), lambda n: n.flatten(1).std(1)):
        a, b = stat(peer_noise.double()), stat(our_noise.double())
        assert abs(a.mean().item() - b.mean().item()) < 4 * _standard_error_of_difference(a, b), (
            f"{name}: noise statistic {a.mean():.4f} vs ours {b.mean():.4f}")


def test_draem_peer_statistics_match_ours(batch, ours):
    images, sources = batch
    augmented, mask, noise = peers.draem_synthesize(images, sources, np.random.default_rng(8), return_noise=True)
    assert augmented.shape == mask.shape == images.shape and augmented.dtype == torch.float32
    _check_blend(images, sources, augmented, mask, (0.2, 1.0))
    our_noise, our_mask = ours
    _check_coverage_and_noise("draem", mask, noise, our_mask, our_noise)


def test_anomalib_peer_statistics_match_ours(batch, ours):
    images, sources = batch
    augmented, mask, noise = peers.anomalib_synthesize(images, sources, torch.Generator().manual_seed(9),
                                                       return_noise=True)
    assert augmented.shape == mask.shape == images.shape and augmented.dtype == torch.float32
    _check_blend(images, sources, augmented, mask, (0.2, 1.0))
    # anomalib redraws an empty mask (and stretches a field that never crosses 0.5), so
    # its coverage is that of our non-empty draws; the noise statistics are unchanged
    # except for the rare stretched field.
    our_noise, our_mask = ours
    _check_coverage_and_noise("anomalib", mask, noise, our_mask, our_noise, nonempty_only=True)


@pytest.mark.parametrize("shape", [(3, 64, 64), (2, 1, 65, 48)])
@pytest.mark.parametrize("order", [1, 2])
def test_fair_highpass_equals_our_op(shape, order):
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(2))
    d0 = 30.0 * shape[-1] / 256
    fair = peers.fair_highpass(x, d0, order)
    assert fair.shape == x.shape and fair.dtype == x.dtype
    for name, ours in (("op", ops.butterworth_highpass(x, d0, order)),
                       ("reference (textbook)", reference.butterworth_highpass(x, d0, order))):
        relative_l2 = ((fair - ours).norm() / ours.norm()).item()
        assert relative_l2 < 1e-6, f"FAIR vs {name}: relative L2 {relative_l2:.2e}"
