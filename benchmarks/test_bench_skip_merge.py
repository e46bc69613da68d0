"""``skip_merge`` forward and forward+backward: extension vs reference vs the memory floor.

With ``N = B*C*H*W`` elements per input, the forward must read ``E`` and ``D`` and write
the ``[B, 2C, H, W]`` output: ``4N`` element transfers. Its floor is a plain copy moving the
same bytes, ``dst.copy_(src)`` with ``src``, ``dst`` of ``2N`` float32 elements each, ``dst``
allocated once outside the timing (``memcpy``); ``clone`` is the same copy into a freshly
allocated output, as every functional op has to do.
The backward reads the merged half of the gradient (``N``) and writes ``grad_E``, ``grad_D``
(``2N``): forward+backward moves ``7N`` element transfers, floor ``copy_`` of ``3.5N``.
Forward+backward is timed with ``torch.autograd.grad`` (no ``.grad`` accumulation).
"""

from __future__ import annotations

import pytest
import torch

from conftest import measure
from medad_fast import ops

SHAPES = [(8, 64, 128, 128), (8, 256, 64, 64)]
ALPHA = 0.3
FLOAT32_BYTES = 4


def shape_name(shape) -> str:
    return "B={} C={} {}x{}".format(*shape)


def inputs(shape, device, requires_grad=False):
    g = torch.Generator().manual_seed(sum(shape))
    encoder = torch.randn(*shape, generator=g).to(device).requires_grad_(requires_grad)
    decoder = torch.randn(*shape, generator=g).to(device).requires_grad_(requires_grad)
    return encoder, decoder


@pytest.mark.parametrize("impl", ["extension", "reference", "memcpy", "clone"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_name)
def test_skip_merge_forward(benchmark, device, impl, shape):
    n = torch.Size(shape).numel()
    if impl in ("extension", "reference"):
        encoder, decoder = inputs(shape, device)
        use_reference = impl == "reference"

        def fn():
            with ops.use_reference(use_reference):
                return ops.skip_merge(encoder, decoder, ALPHA)
    else:
        src = torch.randn(2 * n, device=device)
        if impl == "memcpy":
            dst = torch.empty_like(src)

            def fn():
                return dst.copy_(src)
        else:
            def fn():
                return src.clone()
    measure(benchmark, fn, device, group=f"skip_merge forward {shape_name(shape)} {device.type}",
            impl=impl, bytes_moved=4 * n * FLOAT32_BYTES)


@pytest.mark.parametrize("impl", ["extension", "reference", "memcpy"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_name)
def test_skip_merge_forward_backward(benchmark, device, impl, shape):
    n = torch.Size(shape).numel()
    if impl in ("extension", "reference"):
        encoder, decoder = inputs(shape, device, requires_grad=True)
        B, C, H, W = shape
        grad = torch.randn(B, 2 * C, H, W, generator=torch.Generator().manual_seed(3)).to(device)
        use_reference = impl == "reference"

        def fn():
            with ops.use_reference(use_reference):
                out = ops.skip_merge(encoder, decoder, ALPHA)
            return torch.autograd.grad(out, (encoder, decoder), grad)
    else:
        src = torch.randn(7 * n // 2, device=device)
        dst = torch.empty_like(src)

        def fn():
            return dst.copy_(src)
    measure(benchmark, fn, device, group=f"skip_merge forward+backward {shape_name(shape)} {device.type}",
            impl=impl, bytes_moved=7 * n * FLOAT32_BYTES)
