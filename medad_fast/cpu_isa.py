"""The instruction set of torch's CPU kernels, pinned so that one command gives the same
figures on AVX2 and AVX-512 machines (``--reproducible``).

torch's CPU build picks its kernels at run time, from what the processor offers, the first
time each library computes:

==========================  ==========================  ===========================================
library                     what it runs here           variable that caps its instruction set
==========================  ==========================  ===========================================
oneDNN (MKL-DNN)            convolutions (forward and   ``ONEDNN_MAX_CPU_ISA`` (``AVX2``)
                            backward), on float32
ATen                        element-wise, reductions,   ``ATEN_CPU_CAPABILITY`` (``avx2``)
                            pooling, batch norm...
MKL                         matrix products             ``MKL_ENABLE_INSTRUCTIONS`` (``AVX2``)
numpy                       its own ufunc loops (the    ``NPY_DISABLE_CPU_FEATURES``
                            phantom generator draws     (``X86_V4 AVX512_ICL AVX512_SPR``)
                            with numpy)
==========================  ==========================  ===========================================

AVX-512 and AVX2 kernels round differently (other vector widths, other blockings of the
sums), the difference grows over a training run, and the run ends elsewhere. Measured with
torch 2.13.0+cpu on a 2-core AMD EPYC with AVX-512 (tests/test_ddad.py's brief run, seed 0):
image AUROC 0.655 by default; 0.487 with ``ONEDNN_MAX_CPU_ISA=AVX2`` alone, the same with all
three caps, and 0.4875 is what the same command gives by default on a 2-core AMD EPYC with
AVX2 only. ``ATEN_CPU_CAPABILITY=avx2`` alone left that run unchanged, and so did MKL's cap;
both are set all the same, since ATen does run AVX-512 kernels on an AVX-512 CPU and MKL may
(no run here showed a difference from either; not measured on an Intel CPU). MKL's "conditional numerical
reproducibility" (``MKL_CBWR``) is NOT set: it makes MKL take another code path than an AVX2
machine takes by default (0.547 with ``MKL_CBWR=AVX2``, 0.448 with ``COMPATIBLE``, in the same
run), so a pinned AVX-512 machine would then agree with no machine's default.

The three torch caps alone were not enough for ``make demo``: pinned so, the AVX-512 EPYC
printed image / pixel AUROC 0.9348 / 0.9712, where an AVX2 EPYC prints 0.9524 / 0.9726. The
rest was numpy: its ufuncs dispatch to AVX-512 loops as well, and the demo's phantom came out
different in 3 of its 400 PNGs (one grey level in a few pixels, one training slice among
them), enough to send training elsewhere. With numpy's AVX-512 loops disabled too, the same
``make demo`` (2 threads) on the AVX-512 EPYC printed 0.9524 / 0.9726, image AP 0.9612, pixel
AP 0.5377, AUPRO@0.3 0.9335, best Dice 0.5441: every figure equal to the AVX2 machine's.

So ``--reproducible`` caps torch's three libraries at AVX2 and switches numpy's AVX-512 loops
off; every x86-64 machine this project runs on has AVX2, so an AVX-512 machine then computes
what an AVX2 machine computes by default, and on an AVX2 machine the pin changes nothing.
The thread count must match as well (the sums are split over the threads): the figures the
README quotes are for 2 threads, the cores of the machines here. The cost is the AVX-512
speed-up of those kernels (``benchmarks/reproducible_cost.py``; the README gives it).

Each library reads its variable once, the first time it computes, so the pin must be in the
environment before that: the CLI re-executes itself with it (:func:`reexec_pinned`);
``MEDAD_FAST_REPRODUCIBLE=1`` pins when :mod:`medad_fast` is imported (before torch computes
anything in that process); the test suite pins in ``tests/conftest.py``. This module does not
import torch at import time, so it can run before torch is loaded.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping, Sequence

__all__ = ["PINNED_ENV", "REPRODUCIBLE_VARIABLE", "check_pinned", "isa_report", "is_pinned", "machine_isa", "pin",
           "pinned_environment", "reexec_pinned", "reproducible_requested", "unpinned_environment"]

#: the variables ``--reproducible`` sets: the AVX2 cap of each library
PINNED_ENV: dict[str, str] = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    # numpy's own run-time dispatch (numpy >= 2.4 names; phantom data are drawn with numpy)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
#: set to 1 to pin when medad_fast is imported (library use; what the CLI's flag sets)
REPRODUCIBLE_VARIABLE = "MEDAD_FAST_REPRODUCIBLE"


def reproducible_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``MEDAD_FAST_REPRODUCIBLE`` asks for the pinned instruction set."""
    value = (os.environ if environ is None else environ).get(REPRODUCIBLE_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def is_pinned(environ: Mapping[str, str] | None = None) -> bool:
    """Whether every variable of :data:`PINNED_ENV` is set to its pinned value."""
    environ = os.environ if environ is None else environ
    return all(environ.get(name) == value for name, value in PINNED_ENV.items())


def pinned_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default: this process's) with the pin and
    ``MEDAD_FAST_REPRODUCIBLE=1`` (so child processes pin too)."""
    return {**(os.environ if environ is None else environ), **PINNED_ENV, REPRODUCIBLE_VARIABLE: "1"}


def unpinned_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` without the pin: the machine's best kernels."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k not in PINNED_ENV and k != REPRODUCIBLE_VARIABLE}


def pin(environ: MutableMapping[str, str] | None = None) -> None:
    """Put the pin into ``environ`` (default: this process's environment). It takes effect
    only where torch has not yet computed in this process (see the module docstring)."""
    environ = os.environ if environ is None else environ
    environ.update(PINNED_ENV)
    environ[REPRODUCIBLE_VARIABLE] = "1"


def reexec_pinned(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m medad_fast.cli ARGV`` with the pin in its
    environment (same pid, so ``torchrun`` keeps track of it). Returns only when the
    environment is already pinned."""
    if is_pinned():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "medad_fast.cli", *argv], pinned_environment())


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_isa() -> str:
    """The best instruction set of this CPU as torch's kernels see it: ``avx512`` (F, BW,
    VL, DQ: what ATen's AVX512 kernels need), ``avx2`` (with FMA), ``baseline``, or
    ``unknown`` where ``/proc/cpuinfo`` cannot be read."""
    flags = _cpu_flags()
    if not flags:
        return "unknown"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline"


def isa_report() -> dict[str, object]:
    """What the kernels of this process use: the CPU's best ISA, ATen's capability (the
    one in use: ATen fixes it at its first computation), the caps in force for oneDNN and
    MKL (``"machine's best"`` when not capped), numpy's disabled dispatch targets, whether
    the run is pinned, the thread count.
    This is what ``medad-fast info`` prints and ``metrics.json`` records (``cpu_isa``)."""
    import torch

    return {
        "cpu": machine_isa(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "machine's best"),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "machine's best"),
        "numpy_disabled_features": os.environ.get("NPY_DISABLE_CPU_FEATURES", "none"),
        "pinned": is_pinned(),
        "threads": torch.get_num_threads(),
    }


def check_pinned() -> None:
    """Warn when the pin was asked for but ATen had already chosen wider kernels (torch
    computed in this process before :func:`pin`): the figures are then not the pinned ones."""
    if not reproducible_requested():
        return
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if capability.upper().startswith("AVX512"):
        warnings.warn(f"{REPRODUCIBLE_VARIABLE}=1 but torch already uses {capability} kernels in this process: "
                      f"set it before torch computes anything (before importing torch, or run "
                      f"`medad-fast ... --reproducible`)", RuntimeWarning, stacklevel=2)
