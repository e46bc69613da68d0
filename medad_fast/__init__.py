"""medad_fast: frequency-aware self-supervised lesion detection with fused C++/CUDA ops."""

from ._version import __version__
from . import cpu_isa as _cpu_isa  # (imports no torch)

# MEDAD_FAST_REPRODUCIBLE=1: pin the kernels' instruction set before torch first computes
if _cpu_isa.reproducible_requested():
    _cpu_isa.pin()

from ._extension import HAS_EXTENSION, build_info  # noqa: E402
from . import ops, reference  # noqa: E402

_cpu_isa.check_pinned()

__all__ = ["__version__", "HAS_EXTENSION", "build_info", "ops", "reference"]
