"""Shared machinery of the benchmark suites (run by ``benchmarks/report.py``).

Every benchmark is one implementation of one job; the implementations of a job share a
pytest-benchmark *group*, so they are timed side by side in one run and ``report.py``
divides their times. ``extra_info`` carries what the report needs besides the time:

* ``impl``: ``extension``, ``reference``, a peer name or a floor (``memcpy``, ``rfft2+irfft2``);
* ``bytes``: bytes the job must read + write at least (memory-bound jobs: gives GB/s);
* ``images``: images per call (gives images/s).

Timing: one warm-up call, then as many rounds as its time says fit in ``ROUND_BUDGET_S``
(``MEDAD_BENCH_BUDGET_S``; at least ``MIN_ROUNDS``, at most ``MAX_ROUNDS``; 2 for calls slower
than ``SLOW_CALL_S``), one call per round; on CUDA the timed function synchronises the device before returning.
``MEDAD_BENCH_THREADS`` (default 2, the targets' thread count) sets ``torch.set_num_threads``;
``MEDAD_BENCH_CPU_TIME=1`` marks a run timed in process CPU time (CPU only).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROUND_BUDGET_S = float(os.environ.get("MEDAD_BENCH_BUDGET_S", "1.0"))
MIN_ROUNDS = 3
MAX_ROUNDS = 60
SLOW_CALL_S = 3.0  # calls slower than this get 2 rounds (a busy machine can make a call take 20 s)

THREADS = int(os.environ.get("MEDAD_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)
# report.py times 1-thread runs in process CPU time (--benchmark-timer=time.process_time),
# which a busy machine cannot inflate by descheduling us; GPU timing needs wall time.
CPU_TIME = os.environ.get("MEDAD_BENCH_CPU_TIME") == "1"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not CPU_TIME else [])


def pytest_sessionstart(session: pytest.Session) -> None:
    # "extension" timed through the reference fallback would be a meaningless ratio of 1
    from medad_fast._extension import EXTENSION_ERROR, HAS_EXTENSION

    if not HAS_EXTENSION:
        pytest.exit(f"benchmarks need the compiled extension (medad_fast._C): {EXTENSION_ERROR}", returncode=2)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(benchmark, fn: Callable[[], object], device: torch.device, *, group: str, impl: str,
            bytes_moved: int | None = None, images: int | None = None, budget_s: float = ROUND_BUDGET_S,
            max_rounds: int = MAX_ROUNDS, min_rounds: int = MIN_ROUNDS, warmup_calls: int = 1,
            setup: Callable[[], object] | None = None) -> None:
    """Time ``fn`` (one call per round) into ``benchmark`` under ``group`` / ``impl``.
    ``min_rounds`` overrides the budget for jobs whose implementations differ by a few %;
    ``warmup_calls`` untimed calls first (the first implementation of a group in a fresh
    process otherwise pays the allocator's growth in its early rounds); ``setup``: an untimed
    call before every round (e.g. a call of the other implementation, so that both are
    timed in the same state of caches and allocator: interleaved pairs)."""

    def call() -> None:
        fn()
        synchronize(device)

    for _ in range(warmup_calls - 1):
        call()
    start = time.perf_counter()
    call()  # warm-up (allocator, FFT plans, lazy init), timed as a generous estimate of one call
    estimate = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(max_rounds, math.ceil(budget_s / max(estimate, 1e-6))))
    if estimate > SLOW_CALL_S:
        rounds = 2
    rounds = max(rounds, min_rounds)
    benchmark.group = group
    benchmark.extra_info.update({"impl": impl, "device": device.type, "threads": torch.get_num_threads(),
                                 "timer": "process CPU time" if CPU_TIME else "wall time"})
    if bytes_moved is not None:
        benchmark.extra_info["bytes"] = int(bytes_moved)
    if images is not None:
        benchmark.extra_info["images"] = int(images)
    def before() -> None:  # pytest-benchmark reads a returned value as the call's arguments
        if setup is not None:
            setup()
            synchronize(device)

    benchmark.pedantic(call, setup=before, rounds=rounds, iterations=1, warmup_rounds=0)
