"""``--reproducible``: the CPU kernels pinned to AVX2, so that one command gives the same
figures on AVX2 and AVX-512 machines (medad_fast/cpu_isa.py says which libraries and why).

The suite itself runs pinned (tests/conftest.py); the tests here start fresh processes to
compare a pinned run with one on the machine's best kernels."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medad_fast import cpu_isa

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "medad_fast.cli", *args], env=environment, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def info(env: dict[str, str], *flags: str) -> dict:
    return json.loads(run(["info", *flags], env).stdout)["cpu_isa"]


# ----------------------------------------------------------------------------- the switch

def test_environment_helpers():
    base = {"PATH": "/bin", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}
    pinned = cpu_isa.pinned_environment(base)
    assert cpu_isa.is_pinned(pinned) and not cpu_isa.is_pinned(base)
    assert pinned["ONEDNN_MAX_CPU_ISA"] == "AVX2" and pinned["ATEN_CPU_CAPABILITY"] == "avx2"
    assert pinned["NPY_DISABLE_CPU_FEATURES"] == "X86_V4 AVX512_ICL AVX512_SPR"  # numpy dispatches too
    assert pinned["MEDAD_FAST_REPRODUCIBLE"] == "1" and pinned["PATH"] == "/bin"
    assert "MKL_CBWR" not in pinned  # MKL's CNR mode takes a path no machine takes by default
    unpinned = cpu_isa.unpinned_environment(pinned)
    assert unpinned == {"PATH": "/bin"} and not cpu_isa.reproducible_requested(unpinned)
    assert cpu_isa.reproducible_requested({"MEDAD_FAST_REPRODUCIBLE": "1"})
    assert not cpu_isa.reproducible_requested({"MEDAD_FAST_REPRODUCIBLE": "0"})


def test_the_suite_runs_pinned():
    # conftest pins before torch computes: ATen must not have chosen AVX-512 kernels
    assert cpu_isa.is_pinned()
    from numpy.lib.introspect import opt_func_info

    loops = opt_func_info(func_name="exp", signature="float32.*")["exp"]["ff"]
    assert "X86_V4" not in loops["current"]  # numpy's AVX-512 loops are off
    assert not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


@pytest.mark.skipif(cpu_isa.machine_isa() not in ("avx2", "avx512"), reason="needs an x86-64 CPU with AVX2")
def test_info_reports_the_kernels_in_use_and_the_flag_pins_them():
    machine = cpu_isa.unpinned_environment()
    best = info(machine)
    assert best["pinned"] is False and best["onednn_max_cpu_isa"] == "machine's best"
    assert best["cpu"] == cpu_isa.machine_isa()
    assert best["aten_cpu_capability"] == {"avx512": "AVX512", "avx2": "AVX2"}[best["cpu"]]
    # the CLI flag re-executes with the pin; the variable pins at import
    for pinned in (info(machine, "--reproducible"), info({**machine, "MEDAD_FAST_REPRODUCIBLE": "1"})):
        assert pinned["pinned"] is True
        assert (pinned["aten_cpu_capability"], pinned["onednn_max_cpu_isa"], pinned["mkl_enable_instructions"]) \
            == ("AVX2", "AVX2", "AVX2")
        assert pinned["numpy_disabled_features"] == cpu_isa.PINNED_ENV["NPY_DISABLE_CPU_FEATURES"]


# ----------------------------------------------------------------------------- same figures

# The paper's method, tiny preset (32 x 32, its convolutions run in oneDNN), 2 epochs on one
# thread, seed 0, whole slices (`--crop none`: recorded before --crop auto cropped the phantom;
# the figures check the kernels, not the crop). Recorded with torch 2.13.0+cpu under the pin: the SHA-256 of the trained
# weights (every parameter and buffer, in state_dict order) and the last epoch's loss.
# Measured on a 2-core AMD EPYC with AVX-512: the unpinned run ends with other weights
# (cbc752ed5af590a8..., loss 1.50457445).
RECORDED_TORCH = "2.13.0"
RECORDED_WEIGHTS = "acda193765a08d39a86408bf40921c888a52cda74900d7a5334884972a59f8bf"
RECORDED_LOSS = "1.50467083"


def short_training(data: Path, out: Path, env: dict[str, str], *flags: str) -> tuple[str, str]:
    run(["train", "--data", str(data), "--preset", "tiny", "--epochs", "2", "--seed", "0", "--out", str(out),
         "--crop", "none", "--no-progress", *flags], env)
    from medad_fast.checkpoint import load_checkpoint

    state = load_checkpoint(out / "checkpoint.pt", map_location="cpu")["model"]
    digest = hashlib.sha256()
    for key, tensor in state.items():
        digest.update(key.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    loss = [r for r in records if "loss" in r][-1]["loss"]
    return digest.hexdigest(), f"{loss:.9g}"


@pytest.mark.skipif(cpu_isa.machine_isa() not in ("avx2", "avx512"), reason="needs an x86-64 CPU with AVX2")
@pytest.mark.skipif(torch.__version__.split("+")[0] != RECORDED_TORCH,
                    reason=f"the recorded figures are torch {RECORDED_TORCH}'s (kernels change between releases)")
def test_pinned_training_gives_the_recorded_figures_on_any_x86_cpu(data, tmp_path):
    machine = cpu_isa.unpinned_environment()
    pinned = short_training(data, tmp_path / "pinned", machine, "--reproducible")
    best = short_training(data, tmp_path / "best", machine)
    print(f"pinned: weights {pinned[0][:16]} loss {pinned[1]}; machine's best ({cpu_isa.machine_isa()}): "
          f"weights {best[0][:16]} loss {best[1]}")
    assert pinned == (RECORDED_WEIGHTS, RECORDED_LOSS)
    if cpu_isa.machine_isa() == "avx2":
        assert best == pinned  # on an AVX2 machine the pin changes nothing
    else:
        assert best != pinned  # AVX-512 kernels round otherwise: the pin is what makes the figures agree
