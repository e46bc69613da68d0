"""medad_fast: frequency-aware self-supervised lesion detection with fused C++/CUDA ops."""

__version__ = "0.1.0"

from ._extension import HAS_EXTENSION, build_info  # noqa: E402
from . import ops, reference  # noqa: E402

__all__ = ["__version__", "HAS_EXTENSION", "build_info", "ops", "reference"]
