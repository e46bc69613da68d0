"""Builds the extension medad_fast._C with torch.utils.cpp_extension.

CUDA sources are compiled when torch is a CUDA build and CUDA_HOME is found, or when
FORCE_CUDA=1; MEDAD_FAST_FORCE_CPU=1 forces a CPU-only build. Install with
`pip install --no-build-isolation -e .` (build isolation would pull a second torch).
"""

import glob
import os
import shutil
import sys

from setuptools import setup



def _settle_cuda_home() -> None:
    """torch guesses CUDA_HOME from the nvcc on the PATH; when that nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc) the guess has no CUDA headers. Prefer a toolkit
    that has them, unless the user set CUDA_HOME."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = home
            return


_settle_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - explained to the user
    sys.exit("medad_fast: torch must be installed before building (pip install torch), and the build "
             "must run without isolation: pip install --no-build-isolation -e .")

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _want_cuda() -> bool:
    if _flag("MEDAD_FAST_FORCE_CPU"):
        return False
    if _flag("FORCE_CUDA"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def extensions():
    with_cuda = _want_cuda()
    sources = ["csrc/medad_fast.cpp"] + _sources("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"]
    define_macros = []
    if with_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_binding.cpp")
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros += [("MEDAD_FAST_WITH_CUDA", None),
                          ("MEDAD_FAST_CUDA_ARCH_LIST", f'"{arch_list or "torch default"}"')]
        extension = CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
    else:
        extension = CppExtension
        extra = {"cxx": cxx_flags}
    print(f"medad_fast: building medad_fast._C with {'CPU + CUDA' if with_cuda else 'CPU only'} kernels "
          f"({len(sources)} sources; torch {torch.__version__}, torch CUDA {torch.version.cuda}, "
          f"CUDA_HOME {CUDA_HOME})", flush=True)
    return [extension(
        "medad_fast._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "include")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
