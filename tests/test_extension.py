"""The compiled extension must be what the tests exercise (never the reference against itself)."""

import json
import os
import subprocess
import sys

import torch

import medad_fast
from medad_fast import ops


def test_extension_is_loaded_unless_reference_is_allowed():
    if os.environ.get("MEDAD_FAST_ALLOW_REFERENCE") == "1":
        return
    assert medad_fast.HAS_EXTENSION, (
        "medad_fast._C did not load, so the ops silently fall back to the reference: "
        f"{medad_fast._extension.EXTENSION_ERROR}. Build it with `pip install --no-build-isolation -e .` "
        "or set MEDAD_FAST_ALLOW_REFERENCE=1 to test the reference alone.")
    assert not ops.using_reference()


def test_every_op_has_a_cpu_kernel():
    if not medad_fast.HAS_EXTENSION:
        return
    for name in ("perlin_noise", "synthesize_anomalies", "butterworth_highpass", "skip_merge",
                 "skip_merge_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"medad_fast::{name}", "CPU"), name


def test_info_command_reports_json():
    out = subprocess.run([sys.executable, "-m", "medad_fast.cli", "info"], check=True, capture_output=True,
                         text=True).stdout
    info = json.loads(out)
    assert info["version"] == medad_fast.__version__
    assert info["torch"] == torch.__version__
    assert info["extension_loaded"] is medad_fast.HAS_EXTENSION
    assert info["threads"] >= 1
    if medad_fast.HAS_EXTENSION:
        assert info["cuda_kernels_built"] in (True, False)
        assert info["compiled_with_torch"] == torch.__version__.split("+")[0]


def test_use_reference_switches_the_path():
    with ops.use_reference():
        assert ops.using_reference()
    assert ops.using_reference() is (not medad_fast.HAS_EXTENSION)
