"""From network outputs to anomaly maps and image scores, shared by every method.

* :func:`image_scores`: max of the mean-filtered pixel map (DRAEM's image score);
* :func:`score_filter_size`: that filter's side at a given training size;
* :func:`msgms_anomaly_map`: ``1 - MSGMS`` of an image and its reconstruction (RIAD);
* :func:`smoothed_residual_map`: Gaussian-smoothed absolute or squared residual (autoencoders).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import gaussian_kernel_1d

__all__ = ["image_scores", "score_filter_size", "msgms_anomaly_map", "smoothed_residual_map"]


def score_filter_size(image_size: int, override: int | None = None) -> int:
    """Side of the mean filter of the image score: ``override``, or DRAEM's 21 at 256 x 256
    scaled with the image side and made odd (128 -> 11, 96 -> 9, 64 -> 5), so the window
    covers the same fraction of the slice at every training size."""
    if override is not None:
        return override
    return max(1, int(round(21 * image_size / 256)) | 1)


def image_scores(maps: torch.Tensor, filter_size: int = 21) -> torch.Tensor:
    """Image score = max of the ``filter_size`` mean filter of the pixel map, zero padding
    counted (DRAEM's ``avg_pool2d(p, 21, 1, 10)``). ``[B, H, W] -> [B]`` (float32)."""
    if maps.dim() != 3:
        raise ValueError(f"maps must have shape [B, H, W]; got {list(maps.shape)}")
    smoothed = F.avg_pool2d(maps.float().unsqueeze(1), filter_size, stride=1, padding=filter_size // 2)
    return smoothed.flatten(1).amax(dim=1)


def _gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    # Prewitt filters (RIAD's MSGMS), zero padding; x [B, 1, H, W]
    prewitt = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=x.dtype, device=x.device) / 3.0
    kernels = torch.stack([prewitt, prewitt.t()]).unsqueeze(1)  # [2, 1, 3, 3]
    gradients = F.conv2d(x, kernels, padding=1)
    return torch.sqrt((gradients * gradients).sum(dim=1, keepdim=True) + 1e-12)


def msgms_anomaly_map(image: torch.Tensor, reconstruction: torch.Tensor, scales: int = 4,
                      c: float = 0.0026) -> torch.Tensor:
    """``1 - MSGMS``: one minus the gradient-magnitude similarity
    ``(2 g_I g_R + c) / (g_I^2 + g_R^2 + c)`` averaged over ``scales`` dyadic scales
    (2x2 average pooling between scales, bilinear up-sampling back). ``[B, 1, H, W]`` x2
    -> ``[B, H, W]`` in [0, 1] (0 where the gradients agree)."""
    H, W = image.shape[-2:]
    x, y = image.float(), reconstruction.float()
    total = torch.zeros_like(x)
    for scale in range(scales):
        if scale > 0:
            if min(x.shape[-2:]) < 2:
                scales = scale
                break
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        gx, gy = _gradient_magnitude(x), _gradient_magnitude(y)
        gms = (2 * gx * gy + c) / (gx * gx + gy * gy + c)
        total = total + F.interpolate(gms, size=(H, W), mode="bilinear", align_corners=False)
    return (1.0 - total / scales).squeeze(1).clamp(0.0, 1.0)


def smoothed_residual_map(image: torch.Tensor, reconstruction: torch.Tensor, sigma: float,
                          roi_threshold: float | None = 0.0, squared: bool = False) -> torch.Tensor:
    """``G_sigma * |I - I_r|`` (``squared``: ``G_sigma * (I - I_r)^2``) restricted to the
    region of interest ``I > roi_threshold`` (the liver; None: everywhere).
    ``[B, 1, H, W]`` x2 -> ``float32 [B, H, W]``.

    The Gaussian is separable, truncated at 3 sigma, zero padded; ``sigma <= 0`` gives the
    raw residual."""
    x, y = image.float(), reconstruction.float()
    residual = (x - y).square() if squared else (x - y).abs()
    roi = (x > roi_threshold).float() if roi_threshold is not None else torch.ones_like(x)
    residual = residual * roi
    if sigma > 0:
        size = 2 * max(1, int(round(3 * sigma))) + 1
        kernel = gaussian_kernel_1d(size, sigma, dtype=residual.dtype, device=residual.device)
        residual = F.conv2d(residual, kernel.view(1, 1, size, 1), padding=(size // 2, 0))
        residual = F.conv2d(residual, kernel.view(1, 1, 1, size), padding=(0, size // 2))
        residual = residual * roi
    return residual.squeeze(1)
