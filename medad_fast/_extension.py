"""Loads the compiled extension ``medad_fast._C`` and reports build facts.

Importing ``_C`` runs its static initialisers, which register the op schemas
(``TORCH_LIBRARY(medad_fast)``) and the CPU/CUDA kernels with the dispatcher. When it
cannot be loaded the package falls back to :mod:`medad_fast.reference` with a warning.
"""

from __future__ import annotations

import os
import warnings

import torch

from ._version import __version__
from .cpu_isa import isa_report

try:
    from . import _C  # noqa: F401  (registers torch.ops.medad_fast.*)

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = str(exc)
    warnings.warn(
        "medad_fast: the compiled extension medad_fast._C could not be loaded "
        f"({exc}); falling back to the slow pure-PyTorch reference ops. "
        "Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )

if HAS_EXTENSION:
    from . import _registrations  # noqa: F401,E402


def build_info() -> dict:
    """Build and runtime facts: what ``medad-fast info`` prints."""
    info = {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "extension_loaded": HAS_EXTENSION,
        "extension_error": EXTENSION_ERROR,
        "cuda_kernels_built": False,
        "cuda_arch_list": None,
        "openmp": None,
        "threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "devices": ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                              for i in range(torch.cuda.device_count())],
        "reference_fallback_allowed": os.environ.get("MEDAD_FAST_ALLOW_REFERENCE") == "1",
        "cpu_isa": isa_report(),
    }
    if HAS_EXTENSION:
        from . import _C

        built = _C.build_info()
        info["cuda_kernels_built"] = bool(built["cuda"])
        info["cuda_arch_list"] = built["cuda_arch_list"] or None
        info["openmp"] = bool(built["openmp"])
        info["compiled_with_torch"] = built["torch_version"]
    return info
