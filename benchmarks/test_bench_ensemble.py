"""Seed ensembles at inference (:mod:`medad_fast.ensemble`, ``predict --ensemble``): the cost
per CT scan of an N-member ensemble, N = 1 and 3.

The scan is a small synthetic CT (``volume_throughput.write_scan``: 256 x 256 x 40, a liver
over 24 axial slices), read once; the timed call is
:func:`medad_fast.volume_inference.score_volume` of the in-memory scan (window, resize,
score every liver slice in batches of 16, maps back on the scan's grid), as ``predict``
runs it between reading the files and writing its outputs. The members are untrained
``frequency_aware`` checkpoints at the ``small`` preset, one per seed (the weights do not
change the work done), loaded by :func:`medad_fast.inference.load_ensemble`. A 1-member
ensemble scores as its member alone (``tests/test_ensemble.py``); the members run one after
another, so the time is expected to grow about N-fold, with the map sums as the only
extra work.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from conftest import measure
from medad_fast.checkpoint import checkpoint_bytes
from medad_fast.data.scan import open_liver_mask, read_geometry, read_volume
from medad_fast.inference import load_ensemble
from medad_fast.methods import create_method, resolve_config
from medad_fast.preprocessing import decide_preprocessing
from medad_fast.volume_inference import score_volume
from volume_throughput import write_scan

METHOD, PRESET = "frequency_aware", "small"
SIDE, SLICES, LIVER_SLICES = 256, 40, 24
BATCH = 16


@pytest.fixture(scope="module")
def case():
    """``(checkpoint paths of seeds 0, 1, 2, scan, liver mask bool)``."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        scan_path, liver_path = write_scan(folder, SIDE, SLICES, LIVER_SLICES)
        checkpoints = []
        for seed in range(3):
            torch.manual_seed(seed)
            config = resolve_config(METHOD, PRESET)
            config = config.with_preprocessing(decide_preprocessing(config.run))
            path = folder / f"seed{seed}.pt"
            path.write_bytes(checkpoint_bytes({"method": METHOD, "config": config.to_dict(),
                                               "model": create_method(config).state_dict(), "method_state": {}}))
            checkpoints.append(path)
        geometry = read_geometry(scan_path, modality="CT")
        scan = read_volume(geometry)
        liver = open_liver_mask(liver_path, geometry).read(None)
        yield checkpoints, scan, liver


@pytest.mark.parametrize("members", [1, 3])
def test_ensemble_per_scan(benchmark, case, members):
    device = torch.device("cpu")  # scripts/gpu_check.sh runs the CUDA benchmarks; this one is a CPU figure
    checkpoints, scan, liver = case
    ensemble, _ = load_ensemble(checkpoints[:members], device)
    group = (f"seed ensemble per scan ({METHOD} {PRESET}, {SIDE}x{SIDE}x{SLICES} CT, {LIVER_SLICES} liver slices, "
             f"batch {BATCH}) cpu")
    measure(benchmark, lambda: score_volume(ensemble, scan, liver, batch_size=BATCH, device=device), device,
            group=group, impl=f"{members} member{'s' if members > 1 else ''}", images=LIVER_SLICES, min_rounds=3)
