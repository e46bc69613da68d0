"""scripts/gpu_check.sh on a machine without a GPU: its checks run, the GPU steps are
SKIPPED with their reason, and it exits 0 (a dry run: nothing is built or timed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
GPU_STEPS = ("cuda-tests", "cuda-ops", "train-step")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run_script(out: Path, python: str = sys.executable, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "OUT": str(out)}
    env.pop("GPU_CHECK_DRY_RUN", None)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's path without a GPU")
def test_without_a_gpu_the_gpu_steps_are_skipped_with_a_reason_and_it_exits_0(tmp_path):
    result = run_script(tmp_path / "out", sys.executable, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("PASS     environment") for line in lines), result.stdout
    reason = "CPU-only build" if torch.version.cuda is None else "no CUDA device"
    for step in GPU_STEPS:
        skipped = [line for line in lines if line.split()[:2] == ["SKIPPED", step]]
        assert skipped and reason in skipped[0], result.stdout
    if torch.version.cuda is None:
        assert any(line.split()[:2] == ["SKIPPED", "build"] for line in lines), result.stdout
    assert "gpu_check: OK" in lines[-1]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert all(f"SKIPPED  {step}" in summary for step in GPU_STEPS)
    assert "torch" in (tmp_path / "out" / "01-environment.log").read_text()


def test_a_failing_check_makes_it_exit_non_zero(tmp_path):
    # a Python that cannot import torch: the environment step fails, the rest is skipped
    result = run_script(tmp_path / "out", "false", "--dry-run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert any(line.startswith("FAIL     environment") for line in result.stdout.splitlines()), result.stdout
    assert "gpu_check: FAILED" in result.stdout


def test_unknown_arguments_are_refused(tmp_path):
    result = run_script(tmp_path / "out", sys.executable, "--fast")
    assert result.returncode == 2 and "unknown argument --fast" in result.stderr


def test_on_a_gpu_machine_the_dry_run_lists_every_step(tmp_path):
    # a stand-in Python whose torch reports a CUDA build and an H200 (the probe is its only call in a dry run)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '2.13.0+cu130 13.0 1 9.0 0'\necho 'GPU: NVIDIA H200'\n")
    fake.chmod(0o755)
    bindir = tmp_path / "bin"  # and an nvcc on the PATH
    bindir.mkdir()
    (bindir / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0'\n")
    (bindir / "nvcc").chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "PATH": f"{bindir}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    dry = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("DRY-RUN")}
    assert set(dry) == {"build", "build-info", *GPU_STEPS}, result.stdout
    assert "TORCH_CUDA_ARCH_LIST=9.0" in dry["build"] and "FORCE_CUDA=1" in dry["build"]
    assert "tests/test_ops_cuda.py" in dry["cuda-tests"] and "-m cuda" in dry["cuda-tests"]
    assert "SKIPPED" not in result.stdout
