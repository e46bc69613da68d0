"""Runtime facts shared by training, evaluation and prediction: which device, mixed
precision, deterministic kernels, and whether the ops run the compiled extension or the
pure-PyTorch reference. Nothing here knows about a method."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from . import ops

__all__ = ["resolve_device", "autocast_context", "amp_dtype", "needs_grad_scaler", "deterministic_mode",
           "ops_mode", "compile_networks"]


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; otherwise ``torch.device(name)``,
    with a clear error for a device that is not there."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a valid torch device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype of mixed precision: bfloat16 where the GPU has it, else float16;
    None on the CPU or when ``enabled`` is False (the CPU runs float32)."""
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (:func:`amp_dtype`); a no-op on CPU."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """float16 autocast needs loss scaling; bfloat16 does not."""
    return amp_dtype(device, amp) == torch.float16


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """``--deterministic``: deterministic kernels (``torch.use_deterministic_algorithms``,
    cuDNN deterministic, no cuDNN benchmarking) for the duration; the previous settings are
    restored afterwards. Bitwise reproducible on the CPU. On CUDA an op without a
    deterministic kernel (PyTorch's bilinear up-sampling backward) only warns, instead of
    stopping the run."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


def ops_mode(reference: bool) -> contextlib.AbstractContextManager:
    """``--reference-ops``: run the ops with the pure-PyTorch reference inside the block;
    otherwise leave the choice to :mod:`medad_fast.ops` (the extension when it loaded)."""
    return ops.use_reference() if reference else contextlib.nullcontext()


def compile_networks(method: torch.nn.Module, fullgraph: bool | None = None,
                     backend: str = "inductor") -> torch.nn.Module:
    """``--compile``: ``torch.compile`` every network of ``method`` (each direct sub-module
    that holds parameters), in place (``nn.Module.compile``: the state dict keeps its keys,
    so checkpoints are the same with and without it). The fused ops are traced through their
    fake kernels and stay single nodes of the graph. The synthesis, losses and optimiser
    step stay eager: the step's ``torch.Generator`` is not a graph input. ``fullgraph``:
    a graph break is an error; None: the method's ``compile_fullgraph`` (True but for
    squid, whose in-painting block draws its training mask from the step's generator,
    which dynamo cannot trace). ``backend``: torch.compile's (tests use ``aot_eager``: the
    graphs and autograd without inductor's code generation). Returns ``method``."""
    if fullgraph is None:
        fullgraph = getattr(method, "compile_fullgraph", True)
    for network in method.children():
        if next(network.parameters(), None) is not None:
            network.compile(fullgraph=fullgraph, backend=backend)
    return method
