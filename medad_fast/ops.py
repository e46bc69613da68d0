"""Public fused ops of medad_fast.

Each function checks its arguments (errors name the argument), then calls the compiled
op through the dispatcher (``torch.ops.medad_fast.*``: CPU or CUDA kernel, autograd,
``torch.compile`` support) or, when the extension is not built, the pure-PyTorch version
in :mod:`medad_fast.reference`. ``use_reference()`` forces the reference path, which is
how the benchmarks and ``--reference-ops`` training compare the two.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from . import reference
from ._extension import HAS_EXTENSION

__all__ = [
    "perlin_noise", "synthesize_anomalies", "butterworth_highpass", "skip_merge",
    "scaled_cutoff", "ButterworthHighpass", "SkipMerge", "use_reference", "using_reference",
]

_force_reference = False


@contextlib.contextmanager
def use_reference(enabled: bool = True) -> Iterator[None]:
    """Run the ops with the pure-PyTorch reference inside this block."""
    global _force_reference
    previous, _force_reference = _force_reference, enabled
    try:
        yield
    finally:
        _force_reference = previous


def using_reference() -> bool:
    """True when the ops currently run the pure-PyTorch reference."""
    return _force_reference or not HAS_EXTENSION


_FLOAT = (torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def _check_tensor(t: object, name: str, *, dtypes: tuple[torch.dtype, ...] = _FLOAT,
                  device: torch.device | None = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other inputs are on {device}")
    return t


def _check_shape(t: torch.Tensor, name: str, shape: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)} ({what}); got {list(t.shape)}")


def _check_lattice(angles: torch.Tensor, res: torch.Tensor, batch: int,
                   res_bounds: tuple[int, int] | None = None) -> None:
    """Shape checks of the Perlin lattice, and value checks of ``res``.

    The values: with ``res_bounds = (lo, hi)``, the caller's guarantee that every entry of
    ``res`` lies in ``[lo, hi]`` (e.g. the range it drew them from), the bounds are checked
    instead of the tensor, with no read of device memory. Without, ``res`` is read back
    in ONE transfer (a host synchronisation on CUDA), and not at all under torch.compile
    (it would break a full graph). The CPU kernel checks the values itself and the CUDA
    kernel clamps them, so a wrong guarantee cannot read outside ``angles``."""
    if angles.dim() != 3 or angles.shape[0] != batch:
        raise ValueError(f"angles must have shape [B={batch}, Ry+1, Rx+1]; got {list(angles.shape)}")
    if angles.shape[1] < 2 or angles.shape[2] < 2:
        raise ValueError(f"angles needs at least 2 lattice nodes per axis (res >= 1); got {list(angles.shape)}")
    _check_shape(res, "res", (batch, 2), "cells (ry, rx) per sample")
    if res_bounds is not None:
        lo, hi = res_bounds
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"res_bounds must be two ints 1 <= lo <= hi; got {res_bounds!r}")
        ry_max = rx_max = hi
    elif not torch.compiler.is_compiling() and batch > 0:
        # min and per-axis max in one device-to-host transfer
        lo, ry_max, rx_max = torch.cat([res.min().view(1), res.max(dim=0).values]).tolist()
    else:
        return
    if lo < 1:
        raise ValueError(f"res must be >= 1 in every entry; got min {lo}")
    if ry_max + 1 > angles.shape[1] or rx_max + 1 > angles.shape[2]:
        raise ValueError(
            f"res up to ({ry_max}, {rx_max}) needs angles of at least "
            f"[B, {ry_max + 1}, {rx_max + 1}]; got {list(angles.shape)}")


def perlin_noise(angles: torch.Tensor, res: torch.Tensor, height: int, width: int,
                 rotation: torch.Tensor | None = None) -> torch.Tensor:
    """2-D Perlin noise per sample at continuous coordinates (any ``height x width``).

    Args:
        angles: ``[B, Ry+1, Rx+1]`` float32/float64, lattice gradient angles in radians.
        res: ``[B, 2]`` integer, cells ``(ry, rx)`` per sample, ``1 <= ry <= Ry``.
        height, width: output size (>= 1).
        rotation: ``[B]`` rotation of the field about the image centre in radians, or None.

    Returns:
        ``[B, height, width]`` noise in the dtype of ``angles``; 0 where the rotated
        field does not cover the pixel.
    """
    _check_tensor(angles, "angles")
    device = angles.device
    _check_tensor(res, "res", dtypes=(torch.int32, torch.int64), device=device)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    B = angles.shape[0] if angles.dim() == 3 else -1
    _check_lattice(angles, res, B)
    if rotation is not None:
        _check_tensor(rotation, "rotation", device=device)
        _check_shape(rotation, "rotation", (B,), "one angle per sample")
        rotation = rotation.to(angles.dtype)
    res = res.to(torch.int64)
    if using_reference():
        return reference.perlin_noise(angles, res, height, width, rotation)
    return torch.ops.medad_fast.perlin_noise(angles, res, height, width, rotation)


def synthesize_anomalies(images: torch.Tensor, sources: torch.Tensor, angles: torch.Tensor,
                         res: torch.Tensor, rotation: torch.Tensor | None, beta: torch.Tensor,
                         anomalous: torch.Tensor, threshold: float = 0.5, roi_threshold: float = 0.0,
                         *, res_bounds: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused liver-aware Perlin anomaly synthesis: one pass per pixel computes the noise,
    rotation, threshold, liver mask and blend (the paper's liver-aware synthesis).

    ``M = [P > threshold] * [I > roi_threshold] * anomalous``; ``I_a = I + beta M (A - I)``.

    Args:
        images: ``[B, 1, H, W]`` normal images (float32/float64).
        sources: ``[B, 1, H, W]`` anomaly-source images, same dtype and device.
        angles, res, rotation: the Perlin lattice, as for :func:`perlin_noise`.
        beta: ``[B]`` opacity of the anomaly in ``[0, 1]``.
        anomalous: ``[B]`` bool; False leaves the sample unchanged with an empty mask.
        threshold: Perlin threshold (0.5). roi_threshold: liver mask ``I > roi_threshold``
            (0.0; pass ``-inf`` to switch the liver localisation off).
        res_bounds: ``(lo, hi)`` such that ``lo <= res <= hi`` everywhere, when the caller
            knows it (the range it drew ``res`` from): then ``res`` is not read back to check
            it, which on CUDA saves a host synchronisation per call. Default: read and check.

    Returns:
        ``(augmented [B,1,H,W], mask [B,1,H,W])`` in the dtype of ``images``.
    """
    _check_tensor(images, "images")
    dtype, device = images.dtype, images.device
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
    B, _, H, W = images.shape
    _check_tensor(sources, "sources", dtypes=(dtype,), device=device)
    _check_shape(sources, "sources", tuple(images.shape), "same as images")
    _check_tensor(angles, "angles", device=device)
    _check_tensor(res, "res", dtypes=(torch.int32, torch.int64), device=device)
    _check_lattice(angles, res, B, res_bounds)
    if rotation is not None:
        _check_tensor(rotation, "rotation", device=device)
        _check_shape(rotation, "rotation", (B,), "one angle per sample")
        rotation = rotation.to(dtype)
    _check_tensor(beta, "beta", device=device)
    _check_shape(beta, "beta", (B,), "one opacity per sample")
    _check_tensor(anomalous, "anomalous", dtypes=(torch.bool,), device=device)
    _check_shape(anomalous, "anomalous", (B,), "one flag per sample")
    for name, value in (("threshold", threshold), ("roi_threshold", roi_threshold)):
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number; got {value!r}")
    angles, beta, res = angles.to(dtype), beta.to(dtype), res.to(torch.int64)
    if using_reference():
        return reference.synthesize_anomalies(images, sources, angles, res, rotation, beta, anomalous,
                                              float(threshold), float(roi_threshold))
    return torch.ops.medad_fast.synthesize_anomalies(images, sources, angles, res, rotation, beta,
                                                     anomalous, float(threshold), float(roi_threshold))


def butterworth_highpass(x: torch.Tensor, d0: float, order: int = 2) -> torch.Tensor:
    """Butterworth high-pass filter of the last two dims (the method's "Break" module).

    ``H(u, v) = 1 / (1 + (d0 / D(u, v))^(2 order))`` with ``D`` the distance from the zero
    frequency (wrapped integer frequencies), ``H(0, 0) = 0``; rfft2 -> gain -> irfft2,
    real output, no renormalisation. Linear and self-adjoint: the backward pass is the
    same filter applied to the gradient.

    Args:
        x: ``[..., H, W]`` float32/float64 (CUDA: also float16/bfloat16, filtered in float32).
        d0: cut-off frequency (> 0), in cycles per image side; see :func:`scaled_cutoff`.
        order: Butterworth order ``n`` (>= 1); 2 is the textbook second order (exponent 4),
            1 the paper's printed formula (exponent 2).

    Returns:
        Tensor of the shape and dtype of ``x``.
    """
    _check_tensor(x, "x", dtypes=_FLOAT + _HALF)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims [..., H, W]; got shape {list(x.shape)}")
    if not isinstance(d0, (int, float)) or not d0 > 0 or math.isinf(d0):
        raise ValueError(f"d0 must be a finite number > 0; got {d0!r}")
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1; got {order!r}")
    if x.dtype in _HALF:
        # cuFFT handles half precision only for power-of-two sizes; filter in float32
        return butterworth_highpass(x.float(), d0, order).to(x.dtype)
    if using_reference():
        return reference.butterworth_highpass(x, float(d0), order)
    return torch.ops.medad_fast.butterworth_highpass(x, float(d0), order)


def skip_merge(encoder: torch.Tensor, decoder: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weight-decay skip connection: ``concat(alpha E + (1 - alpha) D, stopgrad(D))``.

    Backward: ``grad_E = alpha g[:, :C]``, ``grad_D = (1 - alpha) g[:, :C]`` (the copy in
    the second half is detached).

    Args:
        encoder: ``[B, C, H, W]`` encoder feature ``E``.
        decoder: ``[B, C, H, W]`` up-sampled decoder feature ``D`` (same dtype/device).
        alpha: weight of the encoder feature in ``[0, 1]``.

    Returns:
        ``[B, 2C, H, W]``, channels_last when both inputs are channels_last (by
        ``suggest_memory_format``, the rule of ``torch.cat``; computed in one pass over the
        NHWC memory), NCHW-contiguous otherwise, mixed layouts included. The gradients take
        the layout of the incoming gradient.
    """
    _check_tensor(encoder, "encoder", dtypes=_FLOAT + _HALF)
    _check_tensor(decoder, "decoder", dtypes=(encoder.dtype,), device=encoder.device)
    if encoder.dim() != 4:
        raise ValueError(f"encoder must have shape [B, C, H, W]; got {list(encoder.shape)}")
    _check_shape(decoder, "decoder", tuple(encoder.shape), "same as encoder")
    if isinstance(alpha, torch.Tensor) and torch.compiler.is_dynamo_compiling():
        # a graph input of the compiled graph (SkipMerge's alpha under torch.compile): not
        # read here, so the graph holds for every alpha; its range is the setter's check
        if using_reference() or (encoder.dtype in _HALF and encoder.device.type == "cpu"):
            return reference.skip_merge(encoder, decoder, alpha)
        return torch.ops.medad_fast.skip_merge_alpha_tensor(encoder, decoder, alpha)
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha)
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha!r}")
    if encoder.dtype in _HALF and encoder.device.type == "cpu":
        return reference.skip_merge(encoder, decoder, float(alpha))
    if using_reference():
        return reference.skip_merge(encoder, decoder, float(alpha))
    return torch.ops.medad_fast.skip_merge(encoder, decoder, float(alpha))


def scaled_cutoff(d0: float, height: int, width: int, reference_side: int = 256) -> float:
    """``d0`` is defined at ``reference_side`` (30 at 256 x 256); scale it with the image
    side (the shorter one for non-square images) so the filter keeps the same relative
    cut-off at any resolution."""
    return d0 * min(height, width) / reference_side


class ButterworthHighpass(nn.Module):
    """Module form of :func:`butterworth_highpass` with ``d0`` given at ``reference_side``
    and scaled to the input size. Input ``[..., H, W]`` -> same shape."""

    def __init__(self, d0: float = 30.0, order: int = 2, reference_side: int = 256) -> None:
        super().__init__()
        self.d0, self.order, self.reference_side = d0, order, reference_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        return butterworth_highpass(x, scaled_cutoff(self.d0, H, W, self.reference_side), self.order)

    def extra_repr(self) -> str:
        return f"d0={self.d0}, order={self.order}, reference_side={self.reference_side}"


class SkipMerge(nn.Module):
    """Module form of :func:`skip_merge`; ``alpha`` is a plain attribute the training loop
    sets each iteration (a float, not a parameter). ``[B,C,H,W] x2 -> [B,2C,H,W]``.

    Under ``torch.compile`` the op reads alpha from a 0-d CPU tensor that the setter
    updates in place (not a buffer: not in the state dict, not moved by ``.to()``), so the
    compiled graph takes alpha as an input and holds for every value: a float would be
    a constant of the graph, and a new alpha every step a recompilation every step."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self._alpha_tensor = torch.zeros((), dtype=torch.float64)
        self.alpha = alpha

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = float(value)
        self._alpha_tensor.fill_(self._alpha)

    def forward(self, encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_dynamo_compiling():
            return skip_merge(encoder, decoder, self._alpha_tensor)
        return skip_merge(encoder, decoder, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
