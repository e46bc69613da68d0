"""Butterworth high-pass of a batch ``[B, 1, S, S]``: extension vs reference vs FAIR's
per-image numpy filter vs the bare ``rfft2`` + ``irfft2`` round trip (the floor: any
FFT filter does at least that), and cupy's FFT on a GPU when cupy is installed.

The cut-off is the trainer's: ``d0 = 30 * S / 256``, order 2.
"""

from __future__ import annotations

import pytest
import torch

import peers
from conftest import measure
from medad_fast import ops

SIZES = [(8, 256), (32, 256), (8, 512), (32, 512)]
ORDER = 2


def cupy_or_none():
    try:
        import cupy
    except Exception:  # not installed, or no usable CUDA runtime
        return None
    return cupy


IMPLS = ["extension", "reference", "fair", "rfft2+irfft2"]
CUDA_IMPLS = ["cupy"] if torch.cuda.is_available() and cupy_or_none() is not None else []


@pytest.mark.parametrize("impl", IMPLS + CUDA_IMPLS)
@pytest.mark.parametrize("batch,side", SIZES)
def test_highpass(benchmark, device, impl, batch, side):
    if impl == "cupy" and device.type != "cuda":
        pytest.skip("cupy's FFT is a GPU peer")
    x = torch.rand(batch, 1, side, side, generator=torch.Generator().manual_seed(side)).to(device)
    d0 = ops.scaled_cutoff(30.0, side, side)
    if impl in ("extension", "reference"):
        use_reference = impl == "reference"

        def fn():
            with ops.use_reference(use_reference):
                return ops.butterworth_highpass(x, d0, ORDER)
    elif impl == "fair":
        def fn():
            return peers.fair_highpass(x, d0, ORDER)
    elif impl == "rfft2+irfft2":
        def fn():
            return torch.fft.irfft2(torch.fft.rfft2(x), s=(side, side))
    else:
        cupy = cupy_or_none()
        gain = cupy.asarray(peers.fair_butterworth_filter(side, side, d0, ORDER), dtype=cupy.float32)
        gain = cupy.fft.ifftshift(gain)[:, : side // 2 + 1]  # the same filter on the rfft half-plane
        x_cupy = cupy.asarray(x)

        def fn():
            spectrum = cupy.fft.rfft2(x_cupy)
            return cupy.fft.irfft2(spectrum * gain, s=(side, side))
    measure(benchmark, fn, device, group=f"butterworth_highpass B={batch} {side}x{side} {device.type}",
            impl=impl, images=batch)
