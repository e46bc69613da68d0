"""The CUDA kernels against the CPU reference: parity, CPU/GPU agreement of the
synthesis masks for the same parameters, half precision of skip_merge, autograd and
opcheck on the device. Skipped cleanly where there is no CUDA device or the extension was
built without CUDA kernels."""

from __future__ import annotations

import pytest
import torch

import medad_fast
from medad_fast import ops, reference

from conftest import TOLERANCES, random_lattice

_CUDA_KERNELS = medad_fast.HAS_EXTENSION and medad_fast.build_info()["cuda_kernels_built"]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not _CUDA_KERNELS,
                       reason="extension built without CUDA kernels"),
]

SIZES = [(1, 1), (17, 31), (256, 256), (255, 257)]


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("batch", [0, 1, 5])
def test_perlin_and_synthesis_cuda_match_cpu(size, batch, dtype, generator):
    H, W = size
    angles, res, rotation = random_lattice(batch, generator, dtype)
    images = torch.rand(batch, 1, H, W, generator=generator, dtype=dtype)
    images[images < 0.3] = 0
    sources = torch.rand(batch, 1, H, W, generator=generator, dtype=dtype)
    beta = 0.1 + 0.9 * torch.rand(batch, generator=generator, dtype=dtype)
    anomalous = torch.ones(batch, dtype=torch.bool)
    cpu_args = (images, sources, angles, res, rotation, beta, anomalous)
    gpu_args = tuple(t.cuda() for t in cpu_args)
    atol, _ = TOLERANCES[dtype]
    noise_gpu = ops.perlin_noise(angles.cuda(), res.cuda(), H, W, rotation.cuda())
    noise_ref = reference.perlin_noise(angles, res, H, W, rotation)
    torch.testing.assert_close(noise_gpu.cpu(), noise_ref, atol=atol, rtol=0)
    aug_gpu, mask_gpu = ops.synthesize_anomalies(*gpu_args)
    aug_cpu, mask_cpu = ops.synthesize_anomalies(*cpu_args)
    # same parameters -> same masks on CPU and GPU, except where the noise ties the threshold
    ambiguous = ((noise_ref - 0.5).abs() < 1e-5).unsqueeze(1)
    assert torch.equal(mask_gpu.cpu()[~ambiguous], mask_cpu[~ambiguous])
    agree = mask_gpu.cpu() == mask_cpu
    torch.testing.assert_close(aug_gpu.cpu()[agree], aug_cpu[agree], atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES)
def test_butterworth_cuda_matches_textbook(size, dtype, generator):
    H, W = size
    x = torch.randn(3, H, W, generator=generator, dtype=torch.float64)
    # half inputs are rounded before filtering: the oracle filters the rounded input
    expected = reference.butterworth_highpass(x.to(dtype).double(), 4.0, 2)
    out = ops.butterworth_highpass(x.to("cuda", dtype), 4.0, 2)
    assert out.dtype == dtype and out.device.type == "cuda"
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    diff = (out.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)
    assert diff <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (1, 1, 1, 1), (2, 7, 17, 31)])
def test_skip_merge_cuda_forward_backward(shape, dtype, generator):
    e = torch.randn(shape, generator=generator).to("cuda", dtype).requires_grad_()
    d = torch.randn(shape, generator=generator).to("cuda", dtype).requires_grad_()
    out = ops.skip_merge(e, d, 0.3)
    # the oracle runs in float64 on the (rounded) inputs: float32 would miss float64's tolerance
    ref = reference.skip_merge(e.detach().double(), d.detach().double(), 0.3)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    g = torch.randn(out.shape, generator=generator).to("cuda", dtype)
    out.backward(g)
    torch.testing.assert_close(e.grad.double(), 0.3 * g[:, : shape[1]].double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(d.grad.double(), 0.7 * g[:, : shape[1]].double(), atol=atol, rtol=rtol)


CL = torch.channels_last


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (1, 1, 1, 1), (1, 5, 17, 31), (2, 7, 13, 1), (3, 64, 16, 16)])
def test_skip_merge_cuda_channels_last(shape, dtype, generator):
    B, C, H, W = shape
    e = torch.randn(shape, generator=generator).to("cuda", dtype).contiguous(memory_format=CL).requires_grad_()
    d = torch.randn(shape, generator=generator).to("cuda", dtype).contiguous(memory_format=CL).requires_grad_()
    out = ops.skip_merge(e, d, 0.3)
    assert out.shape == (B, 2 * C, H, W) and out.dtype == dtype
    if B > 0:  # an empty tensor has no layout (NCHW by suggest_memory_format, as for torch.cat)
        assert out.is_contiguous(memory_format=CL)
    ref = reference.skip_merge(e.detach().cpu().double(), d.detach().cpu().double(), 0.3)  # float64 oracle
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)
    g = torch.randn(out.shape, generator=generator).to("cuda", dtype).contiguous(memory_format=CL)
    grad_e, grad_d = torch.autograd.grad(out, (e, d), g)
    if B > 0:
        assert grad_e.is_contiguous(memory_format=CL) and grad_d.is_contiguous(memory_format=CL)
    torch.testing.assert_close(grad_e.double(), 0.3 * g[:, :C].double(), atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_d.double(), 0.7 * g[:, :C].double(), atol=atol, rtol=rtol)


def test_skip_merge_cuda_mixed_layouts_and_views(generator):
    e = torch.randn(2, 5, 9, 7, generator=generator, dtype=torch.float64).cuda()
    d = e.flip(0).contiguous(memory_format=CL)
    for a, b in ((e, d), (d, e)):  # mixed layouts: NCHW, like torch.cat
        out = ops.skip_merge(a, b, 0.45)
        assert out.is_contiguous()
        torch.testing.assert_close(out.cpu(), reference.skip_merge(a.cpu(), b.cpu(), 0.45), atol=1e-15, rtol=0)
    crop = torch.randn(3, 6, 11, 13, generator=generator).cuda().contiguous(memory_format=CL)[:, :, 2:9, 1:12]
    out = ops.skip_merge(crop, crop * 2, 0.2)  # a channels_last view: NHWC path after one copy
    assert out.is_contiguous(memory_format=CL)
    torch.testing.assert_close(out.cpu(), reference.skip_merge(crop.cpu(), crop.cpu() * 2, 0.2))


def test_skip_merge_cuda_gradcheck_and_opcheck_channels_last():
    e = torch.randn(2, 3, 5, 4, dtype=torch.float64, device="cuda").contiguous(memory_format=CL).requires_grad_()
    d = torch.randn(2, 3, 5, 4, dtype=torch.float64, device="cuda").contiguous(memory_format=CL).requires_grad_()
    keep = torch.zeros(1, 6, 1, 1, dtype=torch.float64, device="cuda")
    keep[:, :3] = 1  # zero the detached copy half; the gradient reaching the op stays channels_last
    keep = keep.expand(2, 6, 5, 4).contiguous(memory_format=CL)
    assert torch.autograd.gradcheck(lambda a, b: ops.skip_merge(a, b, 0.3) * keep, (e, d))
    torch.library.opcheck(torch.ops.medad_fast.skip_merge.default, (e.float(), d.float(), 0.5))
    torch.library.opcheck(torch.ops.medad_fast.skip_merge.default, (e.float(), d.detach().float().contiguous(), 0.5))
    g = torch.randn(2, 6, 5, 4, device="cuda").contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.medad_fast.skip_merge_backward.default, (g, 0.5))


def test_cuda_gradcheck_and_opcheck(generator):
    x = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64, device="cpu").cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.butterworth_highpass(t, 1.5, 2), (x,))
    e = torch.randn(2, 2, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    d = torch.randn(2, 2, 3, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.skip_merge(a, b, 0.3)[:, :2], (e, d))
    angles, res, rotation = random_lattice(2, generator, device="cuda")
    images = torch.rand(2, 1, 9, 11, device="cuda")
    torch.library.opcheck(torch.ops.medad_fast.perlin_noise.default, (angles, res, 9, 11, rotation))
    torch.library.opcheck(torch.ops.medad_fast.synthesize_anomalies.default,
                          (images, torch.rand_like(images), angles, res, rotation, torch.rand(2, device="cuda"),
                           torch.ones(2, dtype=torch.bool, device="cuda"), 0.5, 0.0))
    torch.library.opcheck(torch.ops.medad_fast.butterworth_highpass.default, (x, 2.0, 2))
    torch.library.opcheck(torch.ops.medad_fast.skip_merge.default, (e.float(), d.float(), 0.5))


def test_cuda_device_mismatch_is_named(generator):
    e = torch.randn(1, 2, 3, 3, device="cuda")
    with pytest.raises(ValueError, match="decoder is on cpu"):
        ops.skip_merge(e, e.cpu(), 0.5)
    angles, res, rotation = random_lattice(1, generator, device="cuda")
    images = torch.rand(1, 1, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="sources is on cpu"):
        ops.synthesize_anomalies(images, images.cpu(), angles, res, rotation, torch.rand(1, device="cuda"),
                                 torch.ones(1, dtype=torch.bool, device="cuda"))
