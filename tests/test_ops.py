"""The fused ops against the pure-PyTorch reference (the oracle; its Butterworth is the textbook form),
gradcheck, opcheck, torch.compile and argument errors. CPU; the CUDA versions are in
test_ops_cuda.py."""

from __future__ import annotations

import math

import pytest
import torch

from medad_fast import HAS_EXTENSION, ops, reference

from conftest import TOLERANCES, random_lattice

SIZES = [(1, 1), (17, 31), (256, 256), (255, 257)]
BATCHES = [0, 1, 3]
DTYPES = [torch.float32, torch.float64]

needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="opcheck/compile need the compiled ops")


def _relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    denom = expected.double().norm().item()
    diff = (actual.double() - expected.double()).norm().item()
    return diff / denom if denom > 0 else diff


def _liver_like(batch: int, height: int, width: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """Images in [0, 1] with a zero background (about a third of the pixels) like BMAD slices."""
    images = torch.rand(batch, 1, height, width, generator=generator, dtype=torch.float64)
    images[torch.rand(batch, 1, height, width, generator=generator, dtype=torch.float64) < 0.35] = 0
    return images.to(dtype)


# --------------------------------------------------------------------------- perlin_noise


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("rotate", [False, True])
def test_perlin_noise_matches_reference(size, batch, dtype, rotate, generator):
    H, W = size
    angles, res, rotation = random_lattice(batch, generator, dtype, rotate=rotate)
    out = ops.perlin_noise(angles, res, H, W, rotation)
    expected = reference.perlin_noise(angles, res, H, W, rotation)
    assert out.shape == (batch, H, W) and out.dtype == dtype
    atol, _ = TOLERANCES[dtype]
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)


def test_perlin_noise_statistics_and_rotation_zero_fill(generator):
    angles, res, _ = random_lattice(16, generator)
    flat = ops.perlin_noise(angles, res, 64, 96)
    # sqrt(2)-scaled Perlin lies in [-1, 1] and is not degenerate
    assert flat.abs().max() <= 1.0 + 1e-6 and flat.std() > 0.1
    # lattice nodes are zeros of gradient noise: pixel (0, 0) sits on node (0, 0)
    assert flat[:, 0, 0].abs().max() < 1e-6
    # a 45 degree rotation of a wide field leaves the corners uncovered -> exactly 0
    rotated = ops.perlin_noise(angles, res, 64, 96, torch.full((16,), math.pi / 4))
    assert (rotated[:, 0, 0] == 0).all() and (rotated[:, -1, -1] == 0).all()
    # rotation by 0 is the identity
    torch.testing.assert_close(ops.perlin_noise(angles, res, 64, 96, torch.zeros(16)), flat, atol=1e-6, rtol=0)


def test_perlin_noise_non_contiguous_inputs(generator):
    angles, res, rotation = random_lattice(4, generator, torch.float64)
    angles_nc = angles.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strided
    res_nc = torch.stack([res[:, 0], res[:, 1]], dim=0).t()  # [B, 2] transposed view
    rot_nc = torch.stack([rotation, rotation], dim=1)[:, 0]
    assert not angles_nc.is_contiguous() and not res_nc.is_contiguous() and not rot_nc.is_contiguous()
    torch.testing.assert_close(ops.perlin_noise(angles_nc, res_nc, 33, 20, rot_nc),
                               reference.perlin_noise(angles, res, 33, 20, rotation), atol=1e-12, rtol=0)


def test_perlin_noise_any_size_no_divisibility(generator):
    # DRAEM needs size % res == 0; here a 32-cell lattice on a 7 x 5 image is fine
    angles, _, _ = random_lattice(1, generator)
    out = ops.perlin_noise(angles, torch.tensor([[32, 32]]), 7, 5)
    assert out.shape == (1, 7, 5) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- synthesize_anomalies


def _synthesis_inputs(batch, H, W, generator, dtype, rotate=True):
    images = _liver_like(batch, H, W, generator, dtype)
    sources = torch.rand(batch, 1, H, W, generator=generator, dtype=torch.float64).to(dtype)
    angles, res, rotation = random_lattice(batch, generator, dtype, rotate=rotate)
    beta = (0.1 + 0.9 * torch.rand(batch, generator=generator, dtype=torch.float64)).to(dtype)
    anomalous = torch.rand(batch, generator=generator) < 0.7
    return images, sources, angles, res, rotation, beta, anomalous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES)
def test_synthesize_anomalies_matches_reference(size, batch, dtype, generator):
    H, W = size
    args = _synthesis_inputs(batch, H, W, generator, dtype)
    args[-1][:-1] = True  # all anomalous but the last sample
    augmented, mask = ops.synthesize_anomalies(*args)
    ref_augmented, ref_mask = reference.synthesize_anomalies(*args)
    assert augmented.shape == mask.shape == (batch, 1, H, W)
    # masks identical except where the noise is within 1e-5 of the threshold
    images, _, angles, res, rotation, _, _ = args
    noise = reference.perlin_noise(angles.double(), res, H, W, rotation.double()).unsqueeze(1)
    ambiguous = (noise - 0.5).abs() < 1e-5
    assert torch.equal(mask[~ambiguous], ref_mask[~ambiguous])
    agree = (mask == ref_mask).expand_as(augmented)
    atol, _ = TOLERANCES[dtype]
    torch.testing.assert_close(augmented[agree], ref_augmented[agree], atol=atol, rtol=0)
    if batch >= 3 and H * W > 100:
        assert mask.sum() > 0  # the test exercises the blend, not just copies


def test_synthesize_anomalies_contract(generator):
    images, sources, angles, res, rotation, beta, anomalous = _synthesis_inputs(8, 64, 80, generator,
                                                                                torch.float64)
    anomalous[:3] = False
    anomalous[3:] = True
    augmented, mask = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous)
    outside = images <= 0.0
    # outside the liver: never changed, never in the mask
    assert torch.equal(augmented[outside], images[outside])
    assert (mask[outside] == 0).all()
    # samples with anomalous=False: unchanged, empty mask
    assert torch.equal(augmented[:3], images[:3]) and (mask[:3] == 0).all()
    # the paper's blend: I_a = (1 - M) I + (1 - beta) M I + beta M A = I + beta M (A - I)
    expected = images + beta.view(-1, 1, 1, 1) * mask * (sources - images)
    torch.testing.assert_close(augmented, expected, atol=1e-12, rtol=0)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask[3:].sum() > 0


def test_synthesize_anomalies_roi_switch_and_threshold(generator):
    images, sources, angles, res, rotation, beta, _ = _synthesis_inputs(4, 48, 48, generator, torch.float32)
    anomalous = torch.ones(4, dtype=torch.bool)
    _, with_roi = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous)
    _, no_roi = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous,
                                         roi_threshold=-math.inf)
    noise = ops.perlin_noise(angles, res, 48, 48, rotation).unsqueeze(1)
    assert torch.equal(no_roi, (noise > 0.5).float())
    assert torch.equal(with_roi, no_roi * (images > 0).float())
    _, strict = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous, threshold=0.9)
    assert strict.sum() < with_roi.sum()


def test_synthesize_anomalies_non_contiguous(generator):
    images, sources, angles, res, rotation, beta, anomalous = _synthesis_inputs(3, 40, 60, generator,
                                                                                torch.float64)
    wide_images = torch.zeros(3, 1, 40, 120, dtype=torch.float64)
    wide_images[..., ::2] = images
    images_nc = wide_images[..., ::2]
    sources_nc = sources.transpose(2, 3).contiguous().transpose(2, 3)
    beta_nc = torch.stack([beta, beta], 1)[:, 1]
    assert not images_nc.is_contiguous() and not sources_nc.is_contiguous() and not beta_nc.is_contiguous()
    out = ops.synthesize_anomalies(images_nc, sources_nc, angles, res, rotation, beta_nc, anomalous)
    ref = reference.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous)
    torch.testing.assert_close(out[0], ref[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)


# --------------------------------------------------------------------------- butterworth_highpass


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES + [(64, 48), (2, 3)])
@pytest.mark.parametrize("order", [1, 2, 4])
def test_butterworth_matches_textbook_reference(size, batch, dtype, order, generator):
    H, W = size
    x = torch.randn(batch, 2, H, W, generator=generator, dtype=torch.float64).to(dtype)
    d0 = 30.0 * min(H, W) / 256 + 0.5
    out = ops.butterworth_highpass(x, d0, order)
    textbook = reference.butterworth_highpass(x, d0, order)
    assert out.shape == x.shape and out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert _relative_l2(out, textbook) <= tol


def test_butterworth_removes_dc_and_keeps_high_frequencies(generator):
    H, W = 64, 64
    flat = torch.full((1, H, W), 3.0, dtype=torch.float64)
    assert ops.butterworth_highpass(flat, 5.0).abs().max() < 1e-12  # H(0, 0) = 0
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    high = torch.cos(2 * math.pi * (20 * yy + 24 * xx) / 64).double().unsqueeze(0)  # D = sqrt(976) ~ 31.2
    low = torch.cos(2 * math.pi * 2 * xx / 64).double().unsqueeze(0)  # D = 2
    gain_high = 1 / (1 + (5.0 ** 2 / 976) ** 2)
    gain_low = 1 / (1 + (5.0 / 2) ** 4)
    torch.testing.assert_close(ops.butterworth_highpass(high, 5.0), gain_high * high, atol=1e-10, rtol=0)
    torch.testing.assert_close(ops.butterworth_highpass(low, 5.0), gain_low * low, atol=1e-10, rtol=0)


def test_butterworth_non_contiguous_and_leading_dims(generator):
    x = torch.randn(2, 3, 4, 30, 22, generator=generator, dtype=torch.float64)
    x_nc = x.transpose(-1, -2)
    assert not x_nc.is_contiguous()
    out = ops.butterworth_highpass(x_nc, 4.0)
    assert out.shape == x_nc.shape
    assert _relative_l2(out, reference.butterworth_highpass(x_nc, 4.0)) < 1e-12
    assert ops.butterworth_highpass(torch.randn(5, 9, dtype=torch.float64), 2.0).shape == (5, 9)


@pytest.mark.parametrize("size", [(5, 7), (6, 4), (1, 1)])
@pytest.mark.parametrize("order", [1, 2])
def test_butterworth_gradcheck(size, order, generator):
    x = torch.randn(2, *size, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.butterworth_highpass(t, 1.5, order), (x,))
    if size == (5, 7):  # the backward is the op itself, so it is differentiable again
        assert torch.autograd.gradgradcheck(lambda t: ops.butterworth_highpass(t, 1.5, order), (x,))


# --------------------------------------------------------------------------- skip_merge


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 1, 1, 1), (2, 5, 17, 31), (3, 8, 32, 32)])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_skip_merge_matches_reference(shape, dtype, alpha, generator):
    e = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    d = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    e_ref, d_ref = e.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    out = ops.skip_merge(e, d, alpha)
    ref = reference.skip_merge(e_ref, d_ref, alpha)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(e.grad, e_ref.grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(d.grad, d_ref.grad, atol=atol, rtol=rtol)


def test_skip_merge_gradients_follow_the_contract(generator):
    e = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    d = torch.randn(2, 3, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    out = ops.skip_merge(e, d, 0.25)
    g = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grad_e, grad_d = torch.autograd.grad(out, (e, d), g)
    torch.testing.assert_close(grad_e, 0.25 * g[:, :3], atol=0, rtol=0)
    torch.testing.assert_close(grad_d, 0.75 * g[:, :3], atol=1e-15, rtol=0)  # the copy is detached
    # no gradient at all through the copied half
    grad_e, grad_d = torch.autograd.grad(out[:, 3:].sum() * 1.0 + 0 * out[:, :3].sum(), (e, d))
    assert grad_e.abs().max() == 0 and grad_d.abs().max() == 0


def test_skip_merge_gradcheck_on_merged_half(generator):
    e = torch.randn(2, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    d = torch.randn(2, 2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    # the merged half is an ordinary differentiable function; the copy half is detached on purpose
    assert torch.autograd.gradcheck(lambda a, b: ops.skip_merge(a, b, 0.3)[:, :2], (e, d))


def test_skip_merge_non_contiguous(generator):
    e = torch.randn(2, 4, 6, 5, generator=generator, dtype=torch.float64).to(memory_format=torch.channels_last)
    d = torch.randn(2, 4, 5, 6, generator=generator, dtype=torch.float64).transpose(2, 3)
    assert not e.is_contiguous() and not d.is_contiguous()
    torch.testing.assert_close(ops.skip_merge(e, d, 0.6), reference.skip_merge(e, d, 0.6), atol=1e-15, rtol=0)


# channels_last: the networks run channels_last, so the op takes and returns it natively.
CL = torch.channels_last
CL_SHAPES = [(0, 3, 4, 4), (1, 1, 1, 1), (1, 5, 17, 31), (3, 8, 32, 32), (2, 7, 13, 1), (1, 16, 1, 9)]


def _random_cl(shape, generator, dtype=torch.float64, requires_grad=False) -> torch.Tensor:
    t = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype).contiguous(memory_format=CL)
    return t.requires_grad_(requires_grad)


def _assert_channels_last(t: torch.Tensor) -> None:
    """An empty tensor has no layout to keep (suggest_memory_format, hence torch.cat and the
    op, call it NCHW); every other one must be channels_last."""
    assert t.numel() == 0 or t.is_contiguous(memory_format=CL), t.stride()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CL_SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_skip_merge_channels_last_in_channels_last_out(shape, dtype, alpha, generator):
    e, d = _random_cl(shape, generator, dtype, True), _random_cl(shape, generator, dtype, True)
    e_ref, d_ref = e.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()  # clone keeps the layout
    out = ops.skip_merge(e, d, alpha)
    ref = reference.skip_merge(e_ref, d_ref, alpha)
    B, C, H, W = shape
    assert out.shape == (B, 2 * C, H, W) and out.dtype == dtype
    _assert_channels_last(out)
    if B == 0:
        assert out.stride() == ref.stride()
    elif C > 1:  # with C = 1 the reference's sum has ambiguous strides and comes out NCHW
        assert ref.is_contiguous(memory_format=CL)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    grad = _random_cl(out.shape, generator, dtype)
    grad_e, grad_d = torch.autograd.grad(out, (e, d), grad)
    ref_e, ref_d = torch.autograd.grad(ref, (e_ref, d_ref), grad)
    _assert_channels_last(grad_e)
    _assert_channels_last(grad_d)
    torch.testing.assert_close(grad_e, ref_e, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_d, ref_d, atol=atol, rtol=rtol)


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 7), (2, 6, 9, 4)])
def test_skip_merge_backward_op_keeps_the_gradient_layout(shape, dtype, generator):
    B, C, H, W = shape
    for grad in (_random_cl((B, 2 * C, H, W), generator, dtype),
                 torch.randn(B, 2 * C, H, W, generator=generator, dtype=torch.float64).to(dtype)):
        grad_e, grad_d = torch.ops.medad_fast.skip_merge_backward(grad, 0.3)
        expected_layout = CL if grad.is_contiguous(memory_format=CL) else torch.contiguous_format
        assert grad_e.is_contiguous(memory_format=expected_layout)
        assert grad_d.is_contiguous(memory_format=expected_layout)
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(grad_e, 0.3 * grad[:, :C], atol=atol, rtol=rtol)
        torch.testing.assert_close(grad_d, 0.7 * grad[:, :C], atol=atol, rtol=rtol)


@pytest.mark.parametrize("encoder_cl,decoder_cl", [(True, False), (False, True)])
def test_skip_merge_mixed_layouts_give_nchw_like_torch_cat(encoder_cl, decoder_cl, generator):
    shape = (2, 5, 9, 7)
    e = _random_cl(shape, generator) if encoder_cl else torch.randn(shape, generator=generator, dtype=torch.float64)
    d = _random_cl(shape, generator) if decoder_cl else torch.randn(shape, generator=generator, dtype=torch.float64)
    e.requires_grad_()
    d.requires_grad_()
    out = ops.skip_merge(e, d, 0.45)
    ref = reference.skip_merge(e, d, 0.45)
    assert out.is_contiguous() and out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, atol=1e-15, rtol=0)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    for mine, theirs in zip(torch.autograd.grad(out, (e, d), grad), torch.autograd.grad(ref, (e, d), grad)):
        torch.testing.assert_close(mine, theirs, atol=1e-15, rtol=0)


def test_skip_merge_non_contiguous_channels_last_views(generator):
    # channels_last-strided views (a crop and a batch slice) are still channels_last: NHWC path
    e = _random_cl((3, 6, 11, 13), generator)[:, :, 2:9, 1:12]
    d = _random_cl((4, 6, 7, 11), generator)[1:]
    assert not e.is_contiguous(memory_format=CL)
    out = ops.skip_merge(e, d, 0.2)
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out, reference.skip_merge(e, d, 0.2), atol=1e-15, rtol=0)


@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (2, 2, 3, 5)])
def test_skip_merge_gradcheck_channels_last(shape, generator):
    B, C, H, W = shape
    e, d = _random_cl(shape, generator, requires_grad=True), _random_cl(shape, generator, requires_grad=True)
    # zero the detached copy half with a channels_last mask: the gradient reaching the op stays
    # channels_last (a slice would hand it an NCHW one)
    keep = torch.zeros(1, 2 * C, 1, 1, dtype=torch.float64)
    keep[:, :C] = 1
    keep = keep.expand(B, 2 * C, H, W).contiguous(memory_format=CL)

    def merged_half(a, b):
        out = ops.skip_merge(a, b, 0.3)
        assert out.is_contiguous(memory_format=CL)
        return out * keep

    assert torch.autograd.gradcheck(merged_half, (e, d))
    assert torch.autograd.gradcheck(lambda a, b: ops.skip_merge(a, b, 0.3)[:, :C], (e, d))


# --------------------------------------------------------------------------- opcheck / compile


@needs_extension
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (1, 3, 7, 5), (2, 5, 6, 9)])
@pytest.mark.parametrize("layouts", ["channels_last", "encoder channels_last", "decoder channels_last"])
def test_opcheck_skip_merge_channels_last(shape, layouts, generator):
    B, C, H, W = shape

    def make(channels_last, shape):
        t = torch.randn(shape, generator=generator)
        return t.contiguous(memory_format=CL) if channels_last else t

    e = make(layouts != "decoder channels_last", shape).requires_grad_()
    d = make(layouts != "encoder channels_last", shape).requires_grad_()
    torch.library.opcheck(torch.ops.medad_fast.skip_merge.default, (e, d, 0.4))
    torch.library.opcheck(torch.ops.medad_fast.skip_merge_backward.default, (make(True, (B, 2 * C, H, W)), 0.4))



@needs_extension
def test_opcheck_all_ops(generator):
    angles, res, rotation = random_lattice(3, generator)
    images, sources, _, _, _, beta, anomalous = _synthesis_inputs(3, 19, 23, generator, torch.float32)
    x = torch.randn(2, 3, 17, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    e = torch.randn(2, 3, 7, 5, generator=generator, requires_grad=True)
    d = torch.randn(2, 3, 7, 5, generator=generator, requires_grad=True)
    g = torch.randn(2, 6, 7, 5, generator=generator)
    cases = [
        (torch.ops.medad_fast.perlin_noise.default, (angles, res, 19, 23, rotation)),
        (torch.ops.medad_fast.perlin_noise.default, (angles, res, 8, 9, None)),
        (torch.ops.medad_fast.synthesize_anomalies.default,
         (images, sources, angles, res, rotation, beta, anomalous, 0.5, 0.0)),
        (torch.ops.medad_fast.synthesize_anomalies.default,
         (images, sources, angles, res, None, beta, anomalous, 0.3, -1.0)),
        (torch.ops.medad_fast.butterworth_highpass.default, (x, 3.0, 2)),
        (torch.ops.medad_fast.butterworth_highpass.default, (x.detach()[0, 0], 1.0, 1)),
        (torch.ops.medad_fast.skip_merge.default, (e, d, 0.4)),
        (torch.ops.medad_fast.skip_merge_backward.default, (g, 0.4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@needs_extension
def test_torch_compile_fullgraph_matches_eager(generator):
    torch._dynamo.reset()
    images, sources, angles, res, rotation, beta, anomalous = _synthesis_inputs(2, 24, 20, generator,
                                                                                torch.float32)

    def pipeline(images, sources, angles, res, rotation, beta, anomalous, x, e, d):
        augmented, mask = ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous)
        noise = ops.perlin_noise(angles, res, 24, 20, rotation)
        high = ops.butterworth_highpass(x, 3.0, 2)
        merged = ops.skip_merge(e, d, 0.3)
        loss = (high * high).sum() + (merged * merged).sum()
        return augmented, mask, noise, high, merged, loss

    def run(fn):
        x = torch.randn(2, 1, 24, 20, generator=torch.Generator().manual_seed(7), requires_grad=True)
        e = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(8), requires_grad=True)
        d = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(9), requires_grad=True)
        outs = fn(images, sources, angles, res, rotation, beta, anomalous, x, e, d)
        grads = torch.autograd.grad(outs[-1], (x, e, d))
        return outs, grads

    eager_outs, eager_grads = run(pipeline)
    compiled_outs, compiled_grads = run(torch.compile(pipeline, fullgraph=True))
    for a, b in zip(eager_outs + eager_grads, compiled_outs + compiled_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@needs_extension
@pytest.mark.parametrize("shape", [(1, 5, 9, 7), (3, 4, 6, 6)])
def test_torch_compile_fullgraph_channels_last(shape):
    torch._dynamo.reset()

    def step(e, d, w):
        merged = ops.skip_merge(e, d, 0.3)
        loss = (torch.nn.functional.conv2d(merged, w, padding=1) ** 2).sum()
        return merged, loss

    def run(fn):
        g = torch.Generator().manual_seed(11)
        e = torch.randn(shape, generator=g).contiguous(memory_format=CL).requires_grad_()
        d = torch.randn(shape, generator=g).contiguous(memory_format=CL).requires_grad_()
        w = torch.randn(3, 2 * shape[1], 3, 3, generator=g).contiguous(memory_format=CL)
        merged, loss = fn(e, d, w)
        grads = torch.autograd.grad(loss, (e, d))
        return merged, loss, grads

    eager_merged, eager_loss, eager_grads = run(step)
    merged, loss, grads = run(torch.compile(step, fullgraph=True))
    assert eager_merged.is_contiguous(memory_format=CL) and merged.is_contiguous(memory_format=CL)
    torch.testing.assert_close(merged, eager_merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, eager_loss, atol=1e-3, rtol=1e-5)
    for a, b in zip(grads, eager_grads):
        assert b.is_contiguous(memory_format=CL)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def _good_synthesis_args(generator):
    return list(_synthesis_inputs(2, 8, 8, generator, torch.float32))


@pytest.mark.parametrize("index,bad,match", [
    (0, lambda a: a.to(torch.uint8), "images must have dtype"),
    (1, lambda a: a.double(), "sources must have dtype float32"),
    (1, lambda a: a[..., :4], r"sources must have shape"),
    (1, lambda a: a.to("meta"), "sources is on meta"),
    (2, lambda a: a.long(), "angles must have dtype"),
    (2, lambda a: a[:, :1], "angles needs at least 2 lattice nodes"),
    (3, lambda a: a * 0, "res must be >= 1"),
    (3, lambda a: a.float(), "res must have dtype"),
    (3, lambda a: a * 64, "needs angles of at least"),
    (4, lambda a: a[:1], "rotation must have shape"),
    (5, lambda a: a[:1], "beta must have shape"),
    (6, lambda a: a.float(), "anomalous must have dtype bool"),
])
def test_synthesize_anomalies_bad_input_names_the_argument(index, bad, match, generator):
    args = _good_synthesis_args(generator)
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=match):
        ops.synthesize_anomalies(*args)


def test_synthesize_anomalies_with_res_bounds_reads_no_value_and_gives_the_same_result(generator):
    args = _good_synthesis_args(generator)  # res = 2^k, k in [0, 5]; angles [B, 33, 33]
    expected = ops.synthesize_anomalies(*args)
    reads = []
    original = torch.Tensor.tolist
    try:
        torch.Tensor.tolist = lambda t: reads.append(t) or original(t)
        got = ops.synthesize_anomalies(*args, res_bounds=(1, 32))
    finally:
        torch.Tensor.tolist = original
    assert not reads
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # bounds that could not hold for these angles are refused like values that do not
    with pytest.raises(ValueError, match="needs angles of at least"):
        ops.synthesize_anomalies(*args, res_bounds=(1, 64))
    with pytest.raises(ValueError, match="res_bounds must be two ints"):
        ops.synthesize_anomalies(*args, res_bounds=(0, 4))


@needs_extension
def test_a_wrong_res_bounds_guarantee_is_still_caught_by_the_cpu_kernel(generator):
    args = _good_synthesis_args(generator)
    args[3] = args[3] * 0
    with pytest.raises(RuntimeError, match="res must be >= 1"):
        ops.synthesize_anomalies(*args, res_bounds=(1, 32))


def test_synthesize_anomalies_wrong_image_shape(generator):
    args = _good_synthesis_args(generator)
    args[0] = args[0].expand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"images must have shape \[B, 1, H, W\]"):
        ops.synthesize_anomalies(*args)


def test_perlin_noise_bad_input(generator):
    angles, res, rotation = random_lattice(2, generator)
    with pytest.raises(ValueError, match="res must be >= 1"):
        ops.perlin_noise(angles, torch.tensor([[0, 2], [2, 2]]), 8, 8)
    with pytest.raises(ValueError, match="height must be an int >= 1"):
        ops.perlin_noise(angles, res, 0, 8)
    with pytest.raises(ValueError, match="angles must have dtype"):
        ops.perlin_noise(angles.half(), res, 8, 8)
    with pytest.raises(ValueError, match=r"res must have shape \[2, 2\]"):
        ops.perlin_noise(angles, res[:1], 8, 8)
    with pytest.raises(ValueError, match="rotation is on meta"):
        ops.perlin_noise(angles, res, 8, 8, rotation.to("meta"))


def test_butterworth_bad_input():
    x = torch.randn(4, 4)
    with pytest.raises(ValueError, match="d0 must be a finite number > 0"):
        ops.butterworth_highpass(x, 0.0)
    with pytest.raises(ValueError, match="d0 must be a finite number > 0"):
        ops.butterworth_highpass(x, -3.0)
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        ops.butterworth_highpass(x, 3.0, 0)
    with pytest.raises(ValueError, match="x must have dtype"):
        ops.butterworth_highpass(x.long(), 3.0)
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        ops.butterworth_highpass(torch.randn(5), 3.0)


def test_skip_merge_bad_input():
    e = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        ops.skip_merge(e, e, 1.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        ops.skip_merge(e, e, -0.1)
    with pytest.raises(ValueError, match="decoder must have shape"):
        ops.skip_merge(e, e[:, :1], 0.5)
    with pytest.raises(ValueError, match="decoder must have dtype float32"):
        ops.skip_merge(e, e.double(), 0.5)
    with pytest.raises(ValueError, match="decoder is on meta"):
        ops.skip_merge(e, e.to("meta"), 0.5)
    with pytest.raises(ValueError, match="encoder must have dtype"):
        ops.skip_merge(e.int(), e.int(), 0.5)


@needs_extension
def test_compiled_ops_check_arguments_too():
    """Calling torch.ops directly (bypassing medad_fast.ops) still gets errors naming the argument."""
    e = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match=r"alpha must be in \[0, 1\]"):
        torch.ops.medad_fast.skip_merge(e, e, 2.0)
    with pytest.raises(RuntimeError, match="d0 must be a finite number > 0"):
        torch.ops.medad_fast.butterworth_highpass(e, -1.0, 2)
    with pytest.raises(RuntimeError, match="order must be >= 1"):
        torch.ops.medad_fast.butterworth_highpass(e, 1.0, 0)
    angles = torch.rand(1, 3, 3)
    with pytest.raises(RuntimeError, match="res must be >= 1"):
        torch.ops.medad_fast.perlin_noise(angles, torch.tensor([[0, 1]]), 4, 4, None)
    with pytest.raises(RuntimeError, match="sources must have the shape of images"):
        torch.ops.medad_fast.synthesize_anomalies(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5), angles,
                                                  torch.tensor([[1, 1]]), None, torch.rand(1),
                                                  torch.ones(1, dtype=torch.bool), 0.5, 0.0)
