"""Pure-PyTorch versions of every op: the test oracle, the benchmark baseline, and the
fallback when the compiled extension is missing.

Written to be obviously correct rather than fast. The compiled kernels in ``csrc/`` must
match these to float rounding; the math they share lives in ``csrc/include/medad_fast/``.
Argument checking is done once, in :mod:`medad_fast.ops`; the functions here assume valid
arguments (``ops`` calls them as the fallback after its checks).
"""

from __future__ import annotations

import math

import torch

__all__ = ["perlin_noise", "synthesize_anomalies", "butterworth_highpass", "skip_merge"]


def _fade(t: torch.Tensor) -> torch.Tensor:
    # DRAEM's quintic fade 6t^5 - 15t^4 + 10t^3
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(angles: torch.Tensor, res: torch.Tensor, height: int, width: int,
                 rotation: torch.Tensor | None = None) -> torch.Tensor:
    """2-D Perlin noise per sample, evaluated at continuous coordinates.

    Args:
        angles: ``[B, Ry+1, Rx+1]`` gradient angles (radians) of the lattice nodes; sample
            ``b`` uses the top-left ``[ry+1, rx+1]`` corner.
        res: ``[B, 2]`` integer lattice resolution ``(ry, rx)`` in cells per axis.
        height, width: output size; any size works.
        rotation: ``[B]`` angle (radians) the noise field is rotated by about the image
            centre, or None. Output pixels whose pre-image lies outside the field
            (``[-0.5, H-0.5] x [-0.5, W-0.5]``, the pixel squares) get 0.

    Returns:
        ``[B, H, W]`` noise of the dtype of ``angles``.

    Pixel ``(i, j)`` samples the lattice at ``(i * ry / H, j * rx / W)`` (DRAEM's grid).
    The field's half-pixel border (a pre-image in ``[-0.5, 0)``) lies outside the lattice
    ``[0, r]``; the lattice coordinate is clamped into ``[0, r]`` there, so the border
    repeats the edge noise (the quintic fade is bounded only on ``[0, 1]``: extrapolating
    the edge cell gave values of 20-80 at ``r = 32`` on small images) and
    ``|noise| <= sqrt(2)``. Points inside the lattice are unaffected.
    """
    dtype, device = angles.dtype, angles.device
    B = angles.shape[0]
    ys = torch.arange(height, dtype=dtype, device=device).view(1, height, 1).expand(B, height, width)
    xs = torch.arange(width, dtype=dtype, device=device).view(1, 1, width).expand(B, height, width)
    inside = torch.ones(B, height, width, dtype=torch.bool, device=device)
    if rotation is not None:
        cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
        c = torch.cos(rotation.to(dtype)).view(B, 1, 1)
        s = torch.sin(rotation.to(dtype)).view(B, 1, 1)
        dy, dx = ys - cy, xs - cx
        ys, xs = cy + (c * dy - s * dx), cx + (s * dy + c * dx)
        inside = (ys >= -0.5) & (ys <= height - 0.5) & (xs >= -0.5) & (xs <= width - 0.5)
    ry = res[:, 0].to(dtype).view(B, 1, 1)
    rx = res[:, 1].to(dtype).view(B, 1, 1)
    u = torch.minimum(torch.clamp(ys * (ry / height), min=0), ry)
    v = torch.minimum(torch.clamp(xs * (rx / width), min=0), rx)
    cell_y = torch.minimum(torch.clamp(torch.floor(u), min=0), ry - 1)
    cell_x = torch.minimum(torch.clamp(torch.floor(v), min=0), rx - 1)
    ty, tx = u - cell_y, v - cell_x
    iy, ix = cell_y.long(), cell_x.long()
    b = torch.arange(B, device=device).view(B, 1, 1).expand(B, height, width)

    def dot(oy: int, ox: int) -> torch.Tensor:
        a = angles[b, iy + oy, ix + ox]
        return torch.cos(a) * (ty - oy) + torch.sin(a) * (tx - ox)

    fy, fx = _fade(ty), _fade(tx)
    n0 = torch.lerp(dot(0, 0), dot(1, 0), fy)
    n1 = torch.lerp(dot(0, 1), dot(1, 1), fy)
    noise = math.sqrt(2.0) * torch.lerp(n0, n1, fx)
    return torch.where(inside, noise, torch.zeros((), dtype=dtype, device=device))


def synthesize_anomalies(images: torch.Tensor, sources: torch.Tensor, angles: torch.Tensor,
                         res: torch.Tensor, rotation: torch.Tensor | None, beta: torch.Tensor,
                         anomalous: torch.Tensor, threshold: float = 0.5,
                         roi_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Liver-aware Perlin anomaly synthesis (the paper's synthesis), unfused.

    ``M = [P > threshold] * [I > roi_threshold] * anomalous``,
    ``I_a = I + beta * M * (A - I)``.

    Shapes: images, sources ``[B, 1, H, W]``; beta ``[B]``; anomalous ``[B]`` bool.
    Returns ``(augmented [B,1,H,W], mask [B,1,H,W])`` in the dtype of ``images``.
    """
    B, _, H, W = images.shape
    noise = perlin_noise(angles.to(images.dtype), res, H, W,
                         None if rotation is None else rotation.to(images.dtype))
    mask = (noise > threshold).unsqueeze(1) & (images > roi_threshold) & anomalous.view(B, 1, 1, 1)
    mask = mask.to(images.dtype)
    augmented = images + beta.to(images.dtype).view(B, 1, 1, 1) * mask * (sources - images)
    return augmented, mask


def butterworth_highpass(x: torch.Tensor, d0: float, order: int = 2) -> torch.Tensor:
    """Butterworth high-pass of the last two dims in its textbook form:
    ``real(ifft2(ifftshift(H * fftshift(fft2(x)))))`` with ``H = 1 / (1 + (d0 / D)^(2 order))``
    built on the centred grid (``D`` = distance from the centre index ``(H//2, W//2)``),
    ``H = 0`` at the centre. No renormalisation.

    Shape: ``[..., H, W]`` -> same shape and dtype (real).
    """
    H, W = x.shape[-2:]
    if x.numel() == 0:
        return torch.empty_like(x)
    real_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cy, cx = H // 2, W // 2
    yy = (torch.arange(H, dtype=real_dtype, device=x.device) - cy).view(H, 1)
    xx = (torch.arange(W, dtype=real_dtype, device=x.device) - cx).view(1, W)
    distance = torch.sqrt(yy * yy + xx * xx)
    gain = torch.where(distance > 0, 1.0 / (1.0 + (d0 / distance.clamp_min(1e-12)) ** (2 * order)),
                       torch.zeros_like(distance))
    centred = torch.fft.fftshift(torch.fft.fft2(x.to(real_dtype)), dim=(-2, -1))
    out = torch.fft.ifft2(torch.fft.ifftshift(gain * centred, dim=(-2, -1)))
    return out.real.to(x.dtype)


def skip_merge(encoder: torch.Tensor, decoder: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weight-decay skip connection ``concat(alpha E + (1 - alpha) D, stopgrad(D))``.

    Shapes: encoder, decoder ``[B, C, H, W]`` -> ``[B, 2C, H, W]``. Layout: ``torch.cat``'s
    rule, channels_last when both inputs are channels_last (as the compiled op; with C = 1
    the sum's strides are ambiguous and the result comes out NCHW).
    """
    return torch.cat([alpha * encoder + (1.0 - alpha) * decoder, decoder.detach()], dim=1)
