"""Anomaly synthesis of a training batch: extension vs reference vs DRAEM vs anomalib.

Group ``synthesis B=.. S x S``: the whole batch as the trainer makes it —
:class:`medad_fast.synthesis.AnomalySynthesizer` (parameter draws from a device generator,
the fused op, redraws of empty masks) with the compiled op (``extension``) or the
pure-PyTorch one (``reference``), against the per-sample peers of ``peers.py``.
Group ``synthesize_anomalies op ...``: the op alone on pre-drawn parameters.

Every sample is anomalous and every pixel inside the liver (images in [0.05, 1]): the
worst case for the fused kernel, which skips the noise outside the liver and for normal
samples, while the peers always compute the whole field.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import peers
from conftest import measure
from medad_fast import ops
from medad_fast.synthesis import AnomalySynthesizer

SIZES = [(8, 256), (32, 256), (8, 512), (32, 512)]
SLOW_PEER_BUDGET_S = 2.0  # the per-sample peers take up to seconds a call: few rounds


def make_batch(batch: int, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch * 1000 + side)
    images = 0.05 + 0.95 * torch.rand(batch, 1, side, side, generator=g)
    sources = torch.rand(batch, 1, side, side, generator=g)
    return images.to(device), sources.to(device)


def synthesis_bytes(batch: int, side: int) -> int:
    # read image + source, write augmented + mask, float32
    return 4 * batch * side * side * 4


@pytest.mark.parametrize("impl", ["extension", "reference", "draem", "anomalib"])
@pytest.mark.parametrize("batch,side", SIZES)
def test_synthesis(benchmark, device, impl, batch, side):
    images, sources = make_batch(batch, side, device)
    group = f"synthesis B={batch} {side}x{side} {device.type}"
    budget = {}
    if impl in ("extension", "reference"):
        synthesizer = AnomalySynthesizer(sources, p_anomaly=1.0)
        generator = torch.Generator(device=device).manual_seed(0)
        use_reference = impl == "reference"

        def fn():
            with ops.use_reference(use_reference):
                return synthesizer(images, generator)
    elif impl == "draem":
        rng = np.random.default_rng(0)
        budget = {"budget_s": SLOW_PEER_BUDGET_S}

        def fn():
            return peers.draem_synthesize(images, sources, rng)
    else:
        generator = torch.Generator(device=device).manual_seed(0)
        budget = {"budget_s": SLOW_PEER_BUDGET_S}

        def fn():
            return peers.anomalib_synthesize(images, sources, generator)
    measure(benchmark, fn, device, group=group, impl=impl, bytes_moved=synthesis_bytes(batch, side),
            images=batch, **budget)


@pytest.mark.parametrize("impl", ["extension", "reference"])
@pytest.mark.parametrize("batch,side", SIZES)
def test_synthesize_anomalies_op(benchmark, device, impl, batch, side):
    images, sources = make_batch(batch, side, device)
    synthesizer = AnomalySynthesizer(sources, p_anomaly=1.0)
    angles, res, rotation = synthesizer._draw_lattice(batch, torch.Generator(device=device).manual_seed(1),
                                                      torch.float32)
    beta = torch.full((batch,), 0.5, device=device)
    anomalous = torch.ones(batch, dtype=torch.bool, device=device)
    use_reference = impl == "reference"

    def fn():
        with ops.use_reference(use_reference):
            return ops.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous)
    measure(benchmark, fn, device, group=f"synthesize_anomalies op B={batch} {side}x{side} {device.type}",
            impl=impl, bytes_moved=synthesis_bytes(batch, side), images=batch)
