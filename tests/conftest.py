"""Shared fixtures: dtype-keyed tolerances, random Perlin parameters, devices."""

from __future__ import annotations

import math
import os

# The suite runs with the CPU kernels pinned to AVX2 (`--reproducible`, medad_fast/cpu_isa.py),
# so that the end-to-end figures are the same on AVX2 and AVX-512 machines. It must be in the
# environment before torch first computes: importing medad_fast pins when this is set.
# MEDAD_FAST_REPRODUCIBLE=0 runs the suite on the machine's best kernels.
os.environ.setdefault("MEDAD_FAST_REPRODUCIBLE", "1")
import medad_fast  # noqa: E402,F401  (pins)

import pytest  # noqa: E402
import torch  # noqa: E402

# dtype -> (atol, rtol) for element-wise parity with the reference
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def requires_cuda(test):
    """Mark ``test`` as a CUDA test (``pytest -m cuda`` selects them: scripts/gpu_check.sh),
    skipped where there is no CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def random_lattice(batch: int, generator: torch.Generator, dtype=torch.float32, device="cpu",
                   max_log2: int = 5, rotate: bool = True):
    """Random Perlin parameters as the synthesizer draws them: angles [B, 2^max+1, 2^max+1],
    res [B, 2] = 2^k with k ~ U{0..max_log2} per axis, rotation U(-pi/2, pi/2)."""
    side = 2 ** max_log2 + 1
    angles = torch.rand(batch, side, side, generator=generator, dtype=torch.float64) * (2 * math.pi)
    res = 2 ** torch.randint(0, max_log2 + 1, (batch, 2), generator=generator)
    rotation = (torch.rand(batch, generator=generator, dtype=torch.float64) - 0.5) * math.pi if rotate else None
    angles = angles.to(device=device, dtype=dtype)
    res = res.to(device)
    if rotation is not None:
        rotation = rotation.to(device=device, dtype=dtype)
    return angles, res, rotation


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def one_thread():
    """Tiny training runs on one thread: the CI machine has 2 cores shared with other jobs,
    and two OpenMP threads that wait for each other make these tiny steps ~100x slower.
    Subprocesses get OMP_NUM_THREADS=1 too, so in-process and subprocess runs compute with
    the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The tiny phantom the engine-level tests train on (16 normal training slices, 8 test
    slices, 32 px, seed 4), once per test module; a module with a ``data`` fixture of its
    own uses that instead. Sets ``MEDAD_FAST_CACHE`` to a temporary folder."""
    import os

    from medad_fast.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    os.environ.setdefault("MEDAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    write_phantom_dataset(root, n_train=16, n_test=8, size=32, seed=4, progress=False)
    return root


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """A disk cache folder of the test's own (``MEDAD_FAST_CACHE``, yielded) and an empty
    in-process cache of decoded images, before and after the test."""
    from medad_fast.data import bmad

    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(cache))
    bmad.clear_memory_cache()
    yield cache
    bmad.clear_memory_cache()
