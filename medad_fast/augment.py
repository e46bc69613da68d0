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

DRAEM's loader (``MVTecDRAEMTrainDataset`` in VitjanZ/DRAEM's ``data_loader.py``), used by
:mod:`medad_fast.methods.draem`, on the training device with the same randomness rule:

* :func:`rotate_normal_images`: with probability 0.3 (``torch.rand(1) > 0.7``) a normal
  training image is rotated by ``U(-90, 90)`` degrees (``iaa.Affine``: bilinear, 0 outside,
  about the centre) before the anomaly is synthesised into it; the rotated image is also
  the reconstruction target, as in DRAEM.
* :func:`augment_anomaly_sources`: DRAEM's ``randAugmenter``, 3 of its 10 imgaug ops drawn
  without replacement per sample and applied in the drawn order, each with DRAEM's (or
  imgaug's default) ranges: ``GammaContrast((0.5, 2))``, ``MultiplyAndAddToBrightness(mul=
  (0.8, 1.2), add=(-30, 30))``, ``pillike.EnhanceSharpness((0, 2))``,
  ``AddToHueAndSaturation((-50, 50))``, ``Solarize(0.5, threshold=(32, 128))``,
  ``Posterize((1, 8) bits)``, ``Invert()``, ``pillike.Autocontrast((0, 20) %)``,
  ``pillike.Equalize()``, ``Affine(rotate=(-45, 45))``. DRAEM applies them to uint8 images,
  so they run here on 8-bit grey levels (the source times 255, rounded) with imgaug's and
  PIL's integer rounding (each function says which), and the result goes back to [0, 1].

  The package's images are single-channel; DRAEM's are BGR. A grey image is an RGB image
  with ``R = G = B``, and every op here is what DRAEM's op does to such an image: the
  per-channel draws of GammaContrast coincide on one channel; MultiplyAndAddToBrightness
  changes the brightness channel of a random colour space, which is the grey level itself in
  YCrCb, HSV, HLS and YUV and the CIE lightness ``L*`` (a non-linear function of the grey
  level, tabulated from the sRGB and CIE formulas) in Lab and Luv. AddToHueAndSaturation is
  the identity: a grey pixel has saturation 0 and an undefined hue, and the op changes
  hue and saturation only, never HSV's value ``V = max(R, G, B)``, which is the grey level;
  on a colour image it can tint a grey pixel (saturation up to 50 / 255), which a single
  channel cannot hold, and its luma would then drop by up to about 17 %, a brightness
  change the op does not make. It still counts as one of the 3 ops when drawn, so every
  other op keeps DRAEM's probability (3 / 10) and its place in the order.

  What differs from DRAEM's numbers, and why: the rotations use float bilinear sampling
  (``grid_sample``) where imgaug calls OpenCV's fixed-point ``warpAffine`` (1/32-pixel
  positions): a pixel can differ by one grey level. Lab / Luv use the textbook sRGB and CIE
  formulas where OpenCV's 8-bit conversion uses fixed-point tables (again up to one level).
  Equalize is imgaug's own equalisation, which imgaug uses at DRAEM's 256 x 256 (images of
  ``H W C >= 64 * 64``; below it calls PIL, whose ``step`` ignores the highest present level
  instead of level 255).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["augment_normal_slices", "NormalSliceAugmentation", "MAX_ROTATION_DEGREES", "MAX_SCALE_CHANGE",
           "MAX_LOG_CONTRAST", "MAX_BRIGHTNESS", "MAX_GAMMA_CHANGE", "MAX_NOISE_STD", "LIVER_FLOOR",
           "DRAEM_SOURCE_OPS", "DRAEM_OPS_PER_SAMPLE", "DRAEM_ROTATION_PROBABILITY", "DRAEM_NORMAL_MAX_DEGREES",
           "DRAEM_SOURCE_MAX_DEGREES", "rotate_normal_images", "augment_anomaly_sources",
           "apply_source_augmentation", "SourceAugmentationDraw", "gamma_contrast", "multiply_and_add_to_brightness",
           "enhance_sharpness", "solarize", "posterize", "invert", "autocontrast", "equalize", "rotate"]

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


def _check_images(images: torch.Tensor, generator: torch.Generator) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor [B, 1, H, W]; got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be float in [0, 1]; got {images.dtype}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator; got {type(generator).__name__}")
    if generator.device.type != images.device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {images.device}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[n]`` float32 draws from ``U(low, high)``."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def _warp(images: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor | float = 1.0,
          sign_x: torch.Tensor | float = 1.0, sign_y: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``images [B, C, H, W]`` rotated by ``angle [B]`` (radians) and scaled by ``scale``
    about the image centre, then flipped where ``sign_x`` / ``sign_y`` is -1: one
    ``affine_grid`` / ``grid_sample`` (bilinear, zero outside, ``align_corners=False``, so
    the centre is pixel ``((W - 1) / 2, (H - 1) / 2)`` as imgaug's and OpenCV's)."""
    B, _, H, W = images.shape
    # output -> input sampling positions in normalised coordinates: x_in = A x_out with
    # A = flips * rotation / scale; H / W and W / H keep it a rotation in pixels when H != W
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(B, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = sign_x * cos, -sign_x * sin * (H / W)
    theta[:, 1, 0], theta[:, 1, 1] = sign_y * sin * (W / H), sign_y * cos
    grid = F.affine_grid(theta, [B, images.shape[1], H, W], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
    _check_images(images, generator)
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

    x = images.float()
    liver = (x > 0).float()
    warped = _warp(torch.cat([x * liver, liver], dim=1), angle, scale, 1.0 - 2.0 * flip_x.float(),
                   1.0 - 2.0 * flip_y.float())
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


# ----------------------------------------------------------------------------------------------
# DRAEM's loader (VitjanZ/DRAEM data_loader.py, MVTecDRAEMTrainDataset): the anomaly-source
# augmentation and the rotation of the normal training images
# ----------------------------------------------------------------------------------------------

#: DRAEM's ``self.augmenters``, in its order; ``randAugmenter`` applies 3 distinct ones
DRAEM_SOURCE_OPS = ("gamma_contrast", "multiply_and_add_to_brightness", "enhance_sharpness",
                    "add_to_hue_and_saturation", "solarize", "posterize", "invert", "autocontrast",
                    "equalize", "rotate")
#: ops per sample (``np.random.choice(10, 3, replace=False)``)
DRAEM_OPS_PER_SAMPLE = 3
#: ``transform_image``: ``torch.rand(1) > 0.7`` rotates the normal image
DRAEM_ROTATION_PROBABILITY = 0.3
#: ``self.rot = iaa.Affine(rotate=(-90, 90))`` on the normal image
DRAEM_NORMAL_MAX_DEGREES = 90.0
#: ``iaa.Affine(rotate=(-45, 45))`` among the source ops
DRAEM_SOURCE_MAX_DEGREES = 45.0
#: imgaug's Lab / Luv are 2 of MultiplyAndAddToBrightness's 6 colour spaces (YCrCb, HSV,
#: HLS, Lab, Luv, YUV); their brightness channel is CIE L*, the others' is the grey level
_LIGHTNESS_SPACES = (3, 4)
#: PIL's ImageFilter.SMOOTH, ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13``: ImageEnhance.Sharpness's
#: degenerate image
_SMOOTH_CENTRE = 5.0


def rotate_normal_images(images: torch.Tensor, generator: torch.Generator,
                         probability: float = DRAEM_ROTATION_PROBABILITY,
                         max_degrees: float = DRAEM_NORMAL_MAX_DEGREES) -> torch.Tensor:
    """DRAEM's rotation of the normal training images: each image, with ``probability``, is
    rotated by ``U(-max_degrees, max_degrees)`` degrees about its centre (bilinear, 0
    outside, as ``iaa.Affine``'s defaults); the others come back bit-identical.

    Draws ``rand(B)`` (rotate where ``> 1 - probability``, DRAEM's ``> 0.7``), then
    ``rand(B)`` for the angles, from ``generator``, for every image."""
    _check_images(images, generator)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1]; got {probability}")
    B, device = images.shape[0], images.device
    rotate = torch.rand(B, generator=generator, device=device) > 1.0 - probability
    angle = _uniform(B, -1.0, 1.0, generator, device) * math.radians(max_degrees)
    rotated = _warp(images.float(), angle).to(images.dtype)
    return torch.where(rotate.view(B, 1, 1, 1), rotated, images)


def _grey_levels(x: torch.Tensor) -> torch.Tensor:
    """Clamped to [0, 255] and rounded: what a uint8 array holds after an op."""
    return x.clamp(0.0, 255.0).round()


def gamma_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``iaa.GammaContrast``: ``floor(255 (v / 255)^gamma)`` (imgaug's uint8 table, cast by
    truncation). ``x``: grey levels ``[B, 1, H, W]`` (float, integer values 0..255);
    ``gamma [B]``."""
    return (x / 255.0).pow(gamma.view(-1, 1, 1, 1)).mul(255.0).clamp(0.0, 255.0).floor()


@functools.lru_cache(maxsize=None)
def _lightness_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grey -> 8-bit L*, 8-bit L* -> grey)``, each ``[256]``: OpenCV's 8-bit Lab / Luv
    lightness ``L = L* 255 / 100`` of a grey pixel (sRGB decoding, D65: ``Y`` = the linear
    grey), and its inverse for a neutral colour (``a = b = 0``), both rounded."""
    grey = torch.arange(256, dtype=torch.float64) / 255.0
    linear = torch.where(grey > 0.04045, ((grey + 0.055) / 1.055) ** 2.4, grey / 12.92)
    l_star = torch.where(linear > 0.008856, 116.0 * linear ** (1.0 / 3.0) - 16.0, 903.3 * linear)
    to_lightness = (l_star * 2.55).round()
    l_star = torch.arange(256, dtype=torch.float64) / 2.55
    linear = torch.where(l_star > 903.3 * 0.008856, ((l_star + 16.0) / 116.0) ** 3, l_star / 903.3)
    encoded = torch.where(linear > 0.0031308, 1.055 * linear ** (1.0 / 2.4) - 0.055, 12.92 * linear)
    from_lightness = (encoded.clamp(0.0, 1.0) * 255.0).round()
    return to_lightness.to(device, torch.float32), from_lightness.to(device, torch.float32)


def _lookup(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return table[x.long()]


def multiply_and_add_to_brightness(x: torch.Tensor, mul: torch.Tensor, add: torch.Tensor,
                                   multiply_first: torch.Tensor, lightness: torch.Tensor) -> torch.Tensor:
    """``iaa.MultiplyAndAddToBrightness`` on a grey image: the brightness channel ``b`` of
    the drawn colour space (the grey level itself for YCrCb, HSV, HLS and YUV; the 8-bit
    CIE lightness for Lab and Luv, where ``lightness`` is True) becomes
    ``clip(round(b mul))`` and ``clip(b + add)`` (``add`` already rounded, as imgaug's
    ``Add`` on uint8) in the drawn order (``multiply_first``), then goes back to grey."""
    view = (-1, 1, 1, 1)
    to_lightness, from_lightness = _lightness_tables(x.device)
    lightness = lightness.view(view)
    b = torch.where(lightness, _lookup(to_lightness, x), x)
    mul, add = mul.view(view), add.view(view)

    def multiply(v: torch.Tensor) -> torch.Tensor:
        return _grey_levels(v * mul)  # cv2.multiply: saturate_cast rounds to nearest

    def add_to(v: torch.Tensor) -> torch.Tensor:
        return _grey_levels(v + add)

    b = torch.where(multiply_first.view(view), add_to(multiply(b)), multiply(add_to(b)))
    return torch.where(lightness, _lookup(from_lightness, b), b)


def enhance_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``iaa.pillike.EnhanceSharpness`` (= ``PIL.ImageEnhance.Sharpness``): the degenerate
    image ``d`` is ``x`` filtered with PIL's SMOOTH kernel (``[[1,1,1],[1,5,1],[1,1,1]] /
    13``, rounded; the one-pixel border keeps ``x``, as PIL's 3 x 3 filter), and
    ``Image.blend(d, x, factor)`` = ``clip(trunc(d + factor (x - d)))``."""
    kernel = torch.ones(1, 1, 3, 3, device=x.device, dtype=x.dtype)  # built on the device: no host copy
    kernel[..., 1, 1] = _SMOOTH_CENTRE
    kernel = kernel / 13.0
    degenerate = x.clone()
    if x.shape[-2] > 2 and x.shape[-1] > 2:
        degenerate[..., 1:-1, 1:-1] = (F.conv2d(x, kernel) + 0.5).floor()
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0.0, 255.0).floor()


def solarize(x: torch.Tensor, threshold: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``iaa.Solarize(0.5, threshold=(32, 128))``: where ``apply`` (drawn with probability
    0.5), every ``v >= int(threshold)`` becomes ``255 - v`` (imgaug's uint8 table)."""
    view = (-1, 1, 1, 1)
    inverted = apply.view(view) & (x >= threshold.floor().view(view))
    return torch.where(inverted, 255.0 - x, x)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``iaa.Posterize()`` (``UniformColorQuantizationToNBits``, ``bits`` in 1..8): the
    ``8 - bits`` low bits set to 0, ``v & ~(2^(8 - bits) - 1)``."""
    step = torch.pow(2.0, 8.0 - bits.to(x.dtype)).view(-1, 1, 1, 1)
    return (x / step).floor() * step


def invert(x: torch.Tensor) -> torch.Tensor:
    """``iaa.Invert()`` (``p = 1``): ``255 - v``."""
    return 255.0 - x


def _histograms(x: torch.Tensor) -> torch.Tensor:
    """``int64 [B, 256]``: the grey-level counts of each image."""
    levels = x.flatten(1).long()
    return torch.zeros(x.shape[0], 256, dtype=torch.int64, device=x.device).scatter_add_(
        1, levels, torch.ones_like(levels))


def _apply_tables(x: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """``tables [B, 256]`` (one lookup table per image) applied to grey levels ``x``."""
    return torch.gather(tables.to(x.dtype), 1, x.flatten(1).long()).view_as(x)


def autocontrast(x: torch.Tensor, cutoff: torch.Tensor) -> torch.Tensor:
    """``iaa.pillike.Autocontrast()`` (= ``PIL.ImageOps.autocontrast``, ``cutoff`` in
    0..20 percent): ``cut = n cutoff // 100`` pixels are removed from each end of the
    histogram; ``lo`` / ``hi``, the lowest / highest level left, map to 0 / 255:
    ``int(v scale - lo scale)``, ``scale = 255 / (hi - lo)``, in float64 as PIL (float32 on
    MPS, which has no float64), clipped; the identity where ``hi <= lo``."""
    histogram = _histograms(x)
    n = x.shape[-2] * x.shape[-1]
    cut = (n * cutoff.long() // 100).view(-1, 1)
    below = histogram.cumsum(1)  # pixels <= v
    at_or_above = histogram.flip(1).cumsum(1).flip(1)  # pixels >= v
    lo = (below <= cut).sum(1, keepdim=True)  # first level with more than `cut` pixels at or below it
    hi = (at_or_above > cut).sum(1, keepdim=True) - 1  # last level with more than `cut` at or above it
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    # a correctly rounded 255 / (hi - lo) as PIL's (``255.0 / tensor`` multiplies by a reciprocal)
    scale = torch.full_like(lo, 255, dtype=dtype) / (hi - lo).clamp_min(1).to(dtype)
    levels = torch.arange(256, device=x.device, dtype=dtype).view(1, 256)
    stretched = (levels * scale - lo.to(dtype) * scale).trunc().clamp(0.0, 255.0)
    tables = torch.where(hi > lo, stretched, levels)
    return _apply_tables(x, tables)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """``iaa.pillike.Equalize()`` at DRAEM's sizes (imgaug's own equalisation, used for
    images of ``H W C >= 64 * 64``): ``step = (n - count(255)) // 255``,
    ``table[v] = min(255, (step // 2 + count(< v)) // step)``; the identity for an image
    of one level or ``step = 0``."""
    histogram = _histograms(x)
    n = x.shape[-2] * x.shape[-1]
    step = ((n - histogram[:, 255:]) // 255)
    below = F.pad(histogram.cumsum(1)[:, :-1], (1, 0))  # pixels < v
    tables = ((step // 2 + below) // step.clamp_min(1)).clamp_max(255)
    identity = (step == 0) | ((histogram > 0).sum(1, keepdim=True) <= 1)
    levels = torch.arange(256, device=x.device).view(1, 256)
    return _apply_tables(x, torch.where(identity, levels, tables))


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """``iaa.Affine(rotate=(-45, 45))``: rotated about the centre, bilinear, 0 outside,
    rounded to grey levels."""
    return _grey_levels(_warp(x, torch.deg2rad(degrees)))


class SourceAugmentationDraw:
    """Every random value of one batch of DRAEM's source augmentation (drawn by
    :meth:`draw`, applied by :func:`apply_source_augmentation`).

    ``ops [B, 3]`` (int64): indices into :data:`DRAEM_SOURCE_OPS`, distinct per row, applied
    left to right; the rest are ``[B]`` parameters of each op, drawn for every sample
    (so the number of draws does not depend on which ops were chosen)."""

    def __init__(self, ops: torch.Tensor, gamma: torch.Tensor, colour_space: torch.Tensor, mul: torch.Tensor,
                 add: torch.Tensor, multiply_first: torch.Tensor, sharpness: torch.Tensor,
                 solarize_apply: torch.Tensor, solarize_threshold: torch.Tensor, posterize_bits: torch.Tensor,
                 autocontrast_cutoff: torch.Tensor, rotation_degrees: torch.Tensor) -> None:
        self.ops, self.gamma, self.colour_space, self.mul, self.add = ops, gamma, colour_space, mul, add
        self.multiply_first, self.sharpness = multiply_first, sharpness
        self.solarize_apply, self.solarize_threshold = solarize_apply, solarize_threshold
        self.posterize_bits, self.autocontrast_cutoff = posterize_bits, autocontrast_cutoff
        self.rotation_degrees = rotation_degrees

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, device: torch.device) -> SourceAugmentationDraw:
        """DRAEM's ranges (data_loader.py and imgaug's defaults), in this fixed order."""
        def uniform(low: float, high: float) -> torch.Tensor:
            return _uniform(n, low, high, generator, device)

        def integers(low: int, high: int) -> torch.Tensor:  # low..high inclusive
            return torch.randint(low, high + 1, (n,), generator=generator, device=device)

        # 3 of the 10 without replacement, in a random order: a random permutation's head
        ops = torch.rand(n, len(DRAEM_SOURCE_OPS), generator=generator, device=device).argsort(dim=1)
        return cls(
            ops=ops[:, :DRAEM_OPS_PER_SAMPLE],
            gamma=uniform(0.5, 2.0),  # GammaContrast((0.5, 2.0))
            colour_space=integers(0, 5),  # YCrCb, HSV, HLS, Lab, Luv, YUV
            mul=uniform(0.8, 1.2),  # MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))
            add=uniform(-30.0, 30.0).round(),
            multiply_first=torch.rand(n, generator=generator, device=device) < 0.5,  # random_order=True
            sharpness=uniform(0.0, 2.0),  # EnhanceSharpness(factor=(0.0, 2.0))
            solarize_apply=torch.rand(n, generator=generator, device=device) < 0.5,  # Solarize(0.5, ...)
            solarize_threshold=uniform(32.0, 128.0),  # threshold=(32, 128)
            posterize_bits=integers(1, 8),  # Posterize(nb_bits=(1, 8))
            autocontrast_cutoff=integers(0, 20),  # Autocontrast(cutoff=(0, 20))
            rotation_degrees=uniform(-DRAEM_SOURCE_MAX_DEGREES, DRAEM_SOURCE_MAX_DEGREES),
        )

    def apply_op(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Op ``DRAEM_SOURCE_OPS[index]`` with this draw's parameters, on every sample."""
        name = DRAEM_SOURCE_OPS[index]
        if name == "gamma_contrast":
            return gamma_contrast(x, self.gamma)
        if name == "multiply_and_add_to_brightness":
            lightness = (self.colour_space == _LIGHTNESS_SPACES[0]) | (self.colour_space == _LIGHTNESS_SPACES[1])
            return multiply_and_add_to_brightness(x, self.mul, self.add, self.multiply_first, lightness)
        if name == "enhance_sharpness":
            return enhance_sharpness(x, self.sharpness)
        if name == "add_to_hue_and_saturation":
            return x  # a colour-only op: the identity on grey images (module docstring)
        if name == "solarize":
            return solarize(x, self.solarize_threshold, self.solarize_apply)
        if name == "posterize":
            return posterize(x, self.posterize_bits)
        if name == "invert":
            return invert(x)
        if name == "autocontrast":
            return autocontrast(x, self.autocontrast_cutoff)
        if name == "equalize":
            return equalize(x)
        return rotate(x, self.rotation_degrees)


def apply_source_augmentation(sources: torch.Tensor, draw: SourceAugmentationDraw) -> torch.Tensor:
    """``sources [B, 1, H, W]`` in [0, 1] -> the same, augmented by ``draw``: quantised to
    8-bit grey levels (DRAEM's sources are uint8 images), each sample's 3 ops applied in
    its drawn order, back to [0, 1] (multiples of 1/255)."""
    x = _grey_levels(sources.float() * 255.0)
    view = (-1, 1, 1, 1)
    for slot in range(draw.ops.shape[1]):
        chosen = draw.ops[:, slot].view(view)
        for index in range(len(DRAEM_SOURCE_OPS)):
            # every op runs on the whole batch and is kept where chosen: no host sync
            x = torch.where(chosen == index, draw.apply_op(index, x), x)
    return (x / 255.0).to(sources.dtype)


def augment_anomaly_sources(sources: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DRAEM's anomaly-source augmentation (``randAugmenter``): 3 of its 10 imgaug ops per
    sample, drawn from ``generator``. ``sources``: ``float [B, 1, H, W]`` in [0, 1]."""
    _check_images(sources, generator)
    if sources.shape[0] == 0:
        return sources
    return apply_source_augmentation(sources, SourceAugmentationDraw.draw(sources.shape[0], generator,
                                                                          sources.device))
