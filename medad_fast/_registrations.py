"""Fake (meta) kernels and autograd formulas of the compiled ops, registered the
PyTorch way (``torch.library.register_fake`` / ``register_autograd``) so the ops work
under ``torch.compile`` and in training. Imported by :mod:`medad_fast._extension`
once ``_C`` has registered the schemas.
"""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

_lib = "medad_fast::"


@torch.library.register_fake(_lib + "perlin_noise")
def _perlin_noise_fake(angles, res, height, width, rotation):
    return angles.new_empty((angles.shape[0], height, width))


@torch.library.register_fake(_lib + "synthesize_anomalies")
def _synthesize_anomalies_fake(images, sources, angles, res, rotation, beta, anomalous,
                               threshold=0.5, roi_threshold=0.0):
    return torch.empty_like(images, memory_format=torch.contiguous_format), \
        torch.empty_like(images, memory_format=torch.contiguous_format)


@torch.library.register_fake(_lib + "butterworth_highpass")
def _butterworth_highpass_fake(x, d0, order=2):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _is_channels_last(t: torch.Tensor) -> bool:
    """``t.suggest_memory_format() == ChannelsLast`` in C++ (the test the kernels apply)."""
    return suggest_memory_format(t) == torch.channels_last


# skip_merge's layout rule (skip_merge_memory_format in csrc/checks.h): channels_last when
# both inputs are channels_last, as torch.cat decides; NCHW otherwise, mixed layouts included.
@torch.library.register_fake(_lib + "skip_merge")
def _skip_merge_fake(encoder, decoder, alpha):
    B, C, H, W = encoder.shape
    channels_last = _is_channels_last(encoder) and _is_channels_last(decoder)
    return torch.empty((B, 2 * C, H, W), dtype=encoder.dtype, device=encoder.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# The gradients take the layout of the incoming gradient (skip_merge_grad_memory_format).
@torch.library.register_fake(_lib + "skip_merge_backward")
def _skip_merge_backward_fake(grad, alpha):
    B, C2, H, W = grad.shape
    fmt = torch.channels_last if _is_channels_last(grad) else torch.contiguous_format
    return (torch.empty((B, C2 // 2, H, W), dtype=grad.dtype, device=grad.device, memory_format=fmt),
            torch.empty((B, C2 // 2, H, W), dtype=grad.dtype, device=grad.device, memory_format=fmt))


# butterworth_highpass is linear and self-adjoint: backward = the same filter.
def _butterworth_setup(ctx, inputs, output):
    _, ctx.d0, ctx.order = inputs


def _butterworth_backward(ctx, grad):
    return torch.ops.medad_fast.butterworth_highpass(grad, ctx.d0, ctx.order), None, None


torch.library.register_autograd(_lib + "butterworth_highpass", _butterworth_backward,
                                setup_context=_butterworth_setup)


def _skip_merge_setup(ctx, inputs, output):
    ctx.alpha = inputs[2]


def _skip_merge_backward(ctx, grad):
    grad_encoder, grad_decoder = torch.ops.medad_fast.skip_merge_backward(grad, ctx.alpha)
    return grad_encoder, grad_decoder, None


torch.library.register_autograd(_lib + "skip_merge", _skip_merge_backward,
                                setup_context=_skip_merge_setup)


# skip_merge with alpha as a 0-d CPU tensor, for torch.compile: the training loop changes
# alpha every step, and a float would be a constant of the compiled graph (a recompilation
# per step). Opaque to the compiler, so reading the CPU scalar inside is no graph break and
# no device synchronisation; the same kernels as skip_merge.
@torch.library.custom_op(_lib + "skip_merge_alpha_tensor", mutates_args=())
def _skip_merge_alpha_tensor(encoder: torch.Tensor, decoder: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return torch.ops.medad_fast.skip_merge(encoder, decoder, float(alpha))


@torch.library.custom_op(_lib + "skip_merge_backward_alpha_tensor", mutates_args=())
def _skip_merge_backward_alpha_tensor(grad: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.medad_fast.skip_merge_backward(grad, float(alpha))


_skip_merge_alpha_tensor.register_fake(lambda encoder, decoder, alpha: _skip_merge_fake(encoder, decoder, 0.0))
_skip_merge_backward_alpha_tensor.register_fake(lambda grad, alpha: _skip_merge_backward_fake(grad, 0.0))


def _skip_merge_alpha_tensor_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])


def _skip_merge_alpha_tensor_backward(ctx, grad):
    alpha, = ctx.saved_tensors
    grad_encoder, grad_decoder = torch.ops.medad_fast.skip_merge_backward_alpha_tensor(grad, alpha)
    return grad_encoder, grad_decoder, None


_skip_merge_alpha_tensor.register_autograd(_skip_merge_alpha_tensor_backward,
                                           setup_context=_skip_merge_alpha_tensor_setup)
