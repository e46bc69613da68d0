"""Augmentation of the normal training slices, for small training sets (``--augment``).

With a few dozen normal slices a network sees the same livers every epoch and over-fits to
them; random small geometric and intensity changes of the normal slices make every epoch's
livers a little different. The augmentation runs on the training device, on the batch of
normal slices, BEFORE the method's step (:class:`medad_fast.train.Trainer`), so it serves
every method alike; the method then synthesises its anomalies into the augmented slices.

Per slice, with ``s`` = ``strength`` in [0, 1] scaling every range (0: the identity):

* geometric, in one ``affine_grid`` / ``grid_sample`` for the whole batch: a left-right and
  an up-down flip, each with probability ``s / 2``; a rotation ``U(-15 s, 15 s)`` degrees;
  an isotropic scale log-uniform in ``[1 / (1 + 0.15 s), 1 + 0.15 s]``;
* intensity, inside the liver only: a window-like linear map ``0.5 + k (x - 0.5) + b``
  (contrast ``k`` log-uniform in ``[e^{-0.2 s}, e^{0.2 s}]``, brightness ``b ~ U(-0.05 s,
  0.05 s)``: what a slightly different HU window does to the 8-bit slice), a gamma ``x^g``
  with ``g`` log-uniform in ``[1 / (1 + 0.3 s), 1 + 0.3 s]``, and Gaussian noise of a
  standard deviation ``U(0, 0.02 s)``.

The liver stays where ``image > 0`` (the package's liver ROI: BMAD's slices are 0 outside
the liver, and the liver-aware synthesis and evaluation read it so). The image and its liver
mask ``[image > 0]`` are warped together (two channels, one ``grid_sample``, bilinear, zero
padding); the warped liver is where the warped mask is >= 1/2, and its intensities are
the warped image divided by the warped mask (normalised interpolation: a border pixel is the
average of the liver pixels around it only, so the liver neither darkens along its border
nor bleeds into the background). Outside the warped liver the slice is exactly 0; inside,
after the intensity changes, it is clamped to ``[1/255, 1]`` so that every liver pixel
stays > 0.

Randomness: every draw comes from the ``torch.Generator`` passed in (the run's step
generator, on the training device), in a fixed order, so the same generator state gives
the same batch and an exact resume stays exact. ``strength`` 0 returns the input unchanged
and draws nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["augment_normal_slices", "NormalSliceAugmentation", "MAX_ROTATION_DEGREES", "MAX_SCALE_CHANGE",
           "MAX_LOG_CONTRAST", "MAX_BRIGHTNESS", "MAX_GAMMA_CHANGE", "MAX_NOISE_STD", "LIVER_FLOOR"]

# the ranges at strength 1 (each scales linearly with the strength)
MAX_ROTATION_DEGREES = 15.0
MAX_SCALE_CHANGE = 0.15  # scale in [1 / 1.15, 1.15]
MAX_LOG_CONTRAST = 0.2  # contrast factor in [e^-0.2, e^0.2] = [0.82, 1.22]
MAX_BRIGHTNESS = 0.05  # about 13 grey levels of 255
MAX_GAMMA_CHANGE = 0.3  # gamma in [1 / 1.3, 1.3]
MAX_NOISE_STD = 0.02
#: the smallest liver intensity (one 8-bit grey level): the liver stays > 0
LIVER_FLOOR = 1.0 / 255.0


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength (--augment-strength) must be a number in [0, 1]; got {strength!r}")
    return float(strength)


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[n]`` float32 draws from ``U(low, high)``."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def augment_normal_slices(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Randomly flipped, rotated, scaled and intensity-jittered copies of normal slices.

    Args:
        images: ``float [B, 1, H, W]`` in [0, 1], 0 outside the liver (as the trainer hands
            them to a method).
        generator: ``torch.Generator`` on the device of ``images``; every draw comes from it.
        strength: in [0, 1], scales every range (module docstring); 0 returns ``images``
            itself and draws nothing.

    Returns:
        ``float [B, 1, H, W]`` (contiguous, dtype of ``images``): exactly 0 outside the warped
        liver, in ``[1/255, 1]`` inside it.
    """
    strength = _check_strength(strength)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [B, 1, H, W]; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1]; got {images.dtype}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {images.device}")
    if strength == 0.0 or images.shape[0] == 0:
        return images
    B, device, dtype = images.shape[0], images.device, images.dtype

    # every draw, in a fixed order: flips, rotation, scale, contrast, brightness, gamma, noise
    flip_x = torch.rand(B, generator=generator, device=device) < 0.5 * strength
    flip_y = torch.rand(B, generator=generator, device=device) < 0.5 * strength
    angle = _uniform(B, -1.0, 1.0, generator, device) * math.radians(MAX_ROTATION_DEGREES * strength)
    log_scale_limit = math.log1p(MAX_SCALE_CHANGE * strength)
    scale = torch.exp(_uniform(B, -log_scale_limit, log_scale_limit, generator, device))
    contrast = torch.exp(_uniform(B, -MAX_LOG_CONTRAST * strength, MAX_LOG_CONTRAST * strength, generator, device))
    brightness = _uniform(B, -MAX_BRIGHTNESS * strength, MAX_BRIGHTNESS * strength, generator, device)
    log_gamma_limit = math.log1p(MAX_GAMMA_CHANGE * strength)
    gamma = torch.exp(_uniform(B, -log_gamma_limit, log_gamma_limit, generator, device))
    noise_std = _uniform(B, 0.0, MAX_NOISE_STD * strength, generator, device)
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=torch.float32)

    # output -> input sampling positions (normalised coordinates, align_corners=False):
    # x_in = A x_out with A = flips * rotation / scale, about the image centre
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    sign_x = 1.0 - 2.0 * flip_x.float()
    sign_y = 1.0 - 2.0 * flip_y.float()
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = sign_x * cos, -sign_x * sin
    theta[:, 1, 0], theta[:, 1, 1] = sign_y * sin, sign_y * cos
    grid = F.affine_grid(theta, [B, 2, *images.shape[-2:]], align_corners=False)
    x = images.float()
    liver = (x > 0).float()
    warped = F.grid_sample(torch.cat([x * liver, liver], dim=1), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    weight = warped[:, 1:]
    inside = weight >= 0.5  # the warped liver (a bilinear mask re-thresholded at 1/2)
    x = warped[:, :1] / weight.clamp_min(0.5)  # normalised interpolation inside the liver

    view = (B, 1, 1, 1)
    x = 0.5 + contrast.view(view) * (x - 0.5) + brightness.view(view)
    x = x.clamp(LIVER_FLOOR, 1.0).pow(gamma.view(view))
    x = x + noise_std.view(view) * noise
    x = torch.where(inside, x.clamp(LIVER_FLOOR, 1.0), torch.zeros((), device=device))
    return x.to(dtype).contiguous()


class NormalSliceAugmentation(nn.Module):
    """:func:`augment_normal_slices` as a module: ``augmentation(images, generator)``.

    No parameters or buffers (nothing to checkpoint); the randomness is the caller's
    generator. ``strength`` in [0, 1] (0: the identity)."""

    def __init__(self, strength: float = 1.0) -> None:
        super().__init__()
        self.strength = _check_strength(strength)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment_normal_slices(images, generator, self.strength)

    def extra_repr(self) -> str:
        return f"strength={self.strength}"
