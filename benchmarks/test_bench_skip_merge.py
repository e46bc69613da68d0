"""``skip_merge`` forward and forward+backward: extension vs reference vs the memory floor.

With ``N = B*C*H*W`` elements per input, the forward must read ``E`` and ``D`` and write
the ``[B, 2C, H, W]`` output: ``4N`` element transfers. Its floor is a plain copy moving the
same bytes, ``dst.copy_(src)`` with ``src``, ``dst`` of ``2N`` float32 elements each, ``dst``
allocated once outside the timing (``memcpy``); ``clone`` is the same copy into a freshly
allocated output, as every functional op has to do.
The backward reads the merged half of the gradient (``N``) and writes ``grad_E``, ``grad_D``
(``2N``): forward+backward moves ``7N`` element transfers, floor ``copy_`` of ``3.5N``.
Forward+backward is timed with ``torch.autograd.grad`` (no ``.grad`` accumulation).

Both layouts are timed: NCHW (groups ``skip_merge forward B=.. C=.. HxW cpu``) and
channels_last, the layout of the networks (groups ``... HxW channels_last cpu``: inputs,
output and gradient all channels_last, so neither implementation converts).
"""

from __future__ import annotations

import pytest
import torch

from conftest import measure
from medad_fast import ops

SHAPES = [(8, 64, 128, 128), (8, 256, 64, 64)]
ALPHA = 0.3
FLOAT32_BYTES = 4


LAYOUTS = ["nchw", "channels_last"]


def shape_name(shape) -> str:
    return "B={} C={} {}x{}".format(*shape)


def group_name(job: str, shape, layout: str, device: torch.device) -> str:
    # the NCHW groups keep their names (report.py's targets refer to them)
    suffix = "" if layout == "nchw" else f" {layout}"
    return f"skip_merge {job} {shape_name(shape)}{suffix} {device.type}"


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def inputs(shape, device, layout, requires_grad=False):
    g = torch.Generator().manual_seed(sum(shape))
    encoder = in_layout(torch.randn(*shape, generator=g).to(device), layout).requires_grad_(requires_grad)
    decoder = in_layout(torch.randn(*shape, generator=g).to(device), layout).requires_grad_(requires_grad)
    return encoder, decoder


@pytest.mark.parametrize("impl", ["extension", "reference", "memcpy", "clone"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_name)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_skip_merge_forward(benchmark, device, impl, shape, layout):
    n = torch.Size(shape).numel()
    if impl in ("extension", "reference"):
        encoder, decoder = inputs(shape, device, layout)
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
    measure(benchmark, fn, device, group=group_name("forward", shape, layout, device),
            impl=impl, bytes_moved=4 * n * FLOAT32_BYTES)


@pytest.mark.parametrize("impl", ["extension", "reference", "memcpy"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_name)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_skip_merge_forward_backward(benchmark, device, impl, shape, layout):
    n = torch.Size(shape).numel()
    if impl in ("extension", "reference"):
        encoder, decoder = inputs(shape, device, layout, requires_grad=True)
        B, C, H, W = shape
        grad = in_layout(torch.randn(B, 2 * C, H, W, generator=torch.Generator().manual_seed(3)).to(device), layout)
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
    measure(benchmark, fn, device, group=group_name("forward+backward", shape, layout, device),
            impl=impl, bytes_moved=7 * n * FLOAT32_BYTES)
