"""Property test: sqrt(2)-scaled Perlin noise with unit gradients stays within [-sqrt(2), sqrt(2)]
for every output size, lattice resolution and rotation, in the compiled op and the reference.

The danger zone is the half-pixel border of a rotated field on a lattice with about as many
cells as pixels: there the lattice coordinate leaves [0, R], and evaluating the edge cell's
quintic fade outside [0, 1] used to give values of 20-80 (issue: 17 x 31 output, res 32) and
up to ~1e5 on a 1 x 7 image. Without rotation the border is never reached (those cases
passed before the fix too; they guard the fast path's run splitting).
"""

from __future__ import annotations

import math

import pytest
import torch

from medad_fast import ops, reference

from conftest import TOLERANCES, requires_cuda

BOUND = math.sqrt(2.0)
# float rounding on top of the bound (noise values are O(1))
EPS = {torch.float32: 1e-5, torch.float64: 1e-12}


def _draw(generator: torch.Generator, batch: int, dtype, rotate: bool, max_log2: int = 5):
    """Random unit-gradient lattices: angles [B, 33, 33], res 2^k per sample and axis,
    k ~ U{0..max_log2}, rotation U(-pi/2, pi/2) or None."""
    side = 2 ** max_log2 + 1
    angles = torch.rand(batch, side, side, generator=generator, dtype=torch.float64) * (2 * math.pi)
    res = 2 ** torch.randint(0, max_log2 + 1, (batch, 2), generator=generator)
    rotation = (torch.rand(batch, generator=generator, dtype=torch.float64) - 0.5) * math.pi if rotate else None
    return angles.to(dtype), res, None if rotation is None else rotation.to(dtype)


def _check(angles, res, height, width, rotation, dtype):
    out = ops.perlin_noise(angles, res, height, width, rotation)
    expected = reference.perlin_noise(angles, res, height, width, rotation)
    limit = BOUND + EPS[dtype]
    context = f"{height}x{width}, res {res.tolist()}, rotation {None if rotation is None else rotation.tolist()}"
    assert torch.isfinite(out).all(), context
    op_max, ref_max = out.abs().max().item(), expected.abs().max().item()
    assert op_max <= limit, f"op max |noise| {op_max:.4g} at {context}"
    assert ref_max <= limit, f"reference max |noise| {ref_max:.4g} at {context}"
    atol, _ = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_defect_case_17x31_res_up_to_32(dtype):
    # the exact configuration: [16, 33, 33] angles, res 2^k, rotation in (-pi/2, pi/2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        angles, res, rotation = _draw(generator, 16, dtype, rotate=True)
        _check(angles, res, 17, 31, rotation, dtype)
        _check(angles, res, 32, 32, rotation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rotate", [True, False])
def test_random_sizes_resolutions_rotations(dtype, rotate):
    generator = torch.Generator().manual_seed(2024 + int(rotate))
    for _ in range(40):
        height, width = (int(v) for v in torch.randint(1, 65, (2,), generator=generator))
        angles, res, rotation = _draw(generator, 8, dtype, rotate)
        _check(angles, res, height, width, rotation, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_rotations_and_finest_lattice(dtype):
    # res 32 on both axes (the most cells per pixel), rotations at the ends of the range and
    # the diagonal, on tiny and odd sizes where the border is a large part of the field
    generator = torch.Generator().manual_seed(7)
    eps = 1e-3
    # (tiny rotations put whole first rows/columns a fraction of a pixel outside the lattice)
    rotation = torch.tensor([-math.pi / 2 + eps, math.pi / 2 - eps, -math.pi / 4, math.pi / 4, 0.3, -1.1,
                             1e-3, -1e-3, 1e-6, -1e-6], dtype=torch.float64).to(dtype)
    res = torch.tensor([[32, 32], [32, 1], [1, 32], [32, 32], [16, 32], [32, 8], [32, 32], [32, 32], [1, 1],
                        [32, 32]])
    for height, width in [(1, 1), (1, 7), (5, 1), (2, 3), (7, 5), (17, 31), (31, 17), (33, 33), (64, 63)]:
        angles, _, _ = _draw(generator, len(res), dtype, rotate=False)
        _check(angles, res, height, width, rotation, dtype)


def test_synthesis_mask_never_exceeds_the_noise_bound():
    # a threshold at the bound must give an empty mask (the old border values of 20-80 did
    # not), and the mask stays the thresholded perlin_noise inside the liver
    generator = torch.Generator().manual_seed(11)
    B, H, W = 16, 17, 31
    angles, res, rotation = _draw(generator, B, torch.float32, rotate=True)
    images = torch.rand(B, 1, H, W, generator=generator) + 0.01  # all "liver"
    sources = torch.rand(B, 1, H, W, generator=generator)
    beta = torch.rand(B, generator=generator)
    anomalous = torch.ones(B, dtype=torch.bool)
    augmented, mask = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous,
                                               threshold=BOUND)
    assert mask.sum() == 0 and torch.equal(augmented, images)
    ref_augmented, ref_mask = reference.synthesize_anomalies(images, sources, angles, res, rotation, beta,
                                                             anomalous, threshold=BOUND)
    assert ref_mask.sum() == 0 and torch.equal(ref_augmented, images)
    # at the usual threshold: a 0/1 mask equal to [noise > 0.5], a blend between image and source
    augmented, mask = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous)
    noise = ops.perlin_noise(angles, res, H, W, rotation).unsqueeze(1)
    assert torch.equal(mask, (noise > 0.5).float())
    low, high = torch.minimum(images, sources), torch.maximum(images, sources)
    assert (augmented >= low - 1e-6).all() and (augmented <= high + 1e-6).all()


@requires_cuda
def test_cuda_bound_and_parity():
    generator = torch.Generator().manual_seed(5)
    for height, width in [(17, 31), (1, 1), (33, 64), (64, 5)]:
        angles, res, rotation = _draw(generator, 16, torch.float32, rotate=True)
        out = ops.perlin_noise(angles.cuda(), res.cuda(), height, width, rotation.cuda()).cpu()
        assert out.abs().max().item() <= BOUND + EPS[torch.float32]
        expected = reference.perlin_noise(angles, res, height, width, rotation)
        torch.testing.assert_close(out, expected, atol=TOLERANCES[torch.float32][0], rtol=0)
