"""Losses of the method: reconstruction (MSE + SSIM), segmentation (L1 + focal).

* ``L_rec = MSE(I_r, I) + lambda (1 - SSIM(I_r, I))``, SSIM with an 11x11 Gaussian window
  (sigma 1.5), zero padding of 5 (DRAEM's ``padding = window // 2``), ``C1 = (0.01 L)^2``,
  ``C2 = (0.03 L)^2`` with data range ``L = 1`` (images are in [0, 1]).
* ``L_seg = L1(p, M) + Focal(p, M)`` on the softmax probabilities, gamma 2 (DRAEM's focal
  loss without class weights).

All losses are computed in float32 (also under autocast) and averaged over every element.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel_1d", "gaussian_window", "ssim", "reconstruction_loss", "focal_loss", "segmentation_loss"]


def gaussian_kernel_1d(size: int, sigma: float, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian ``[size]`` centred on the middle sample."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """Normalised 2-D Gaussian window ``[1, 1, size, size]`` (outer product of 1-D ones)."""
    g = gaussian_kernel_1d(size, sigma, dtype=torch.float64)
    return torch.outer(g, g).to(dtype=dtype, device=device).view(1, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Structural similarity of ``x`` and ``y`` (``[B, C, H, W]``, channels treated apart).

    Returns the mean SSIM (a scalar) with ``reduction="mean"``, or the SSIM map
    ``[B, C, H, W]`` with ``reduction="none"``. Identical images give exactly 1.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"x and y must have the same shape [B, C, H, W]; got {list(x.shape)} and {list(y.shape)}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")
    x, y = x.float(), y.float()
    channels = x.shape[1]
    window = gaussian_window(window_size, sigma, device=x.device).expand(channels, 1, window_size, window_size)
    pad = window_size // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, padding=pad, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    sigma_x = blur(x * x) - mu_x * mu_x
    sigma_y = blur(y * y) - mu_y * mu_y
    sigma_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (sigma_x + sigma_y + c2))
    return ssim_map.mean() if reduction == "mean" else ssim_map


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor,
                        ssim_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_rec = MSE + ssim_weight * (1 - SSIM)``; ``[B, 1, H, W]`` each.

    Returns ``(L_rec, mse, 1 - ssim)`` (scalars)."""
    reconstruction, target = reconstruction.float(), target.float()
    mse = F.mse_loss(reconstruction, target)
    ssim_term = 1.0 - ssim(reconstruction, target)
    return mse + ssim_weight * ssim_term, mse, ssim_term


def focal_loss(probability: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0,
               eps: float = 1e-6) -> torch.Tensor:
    """Binary focal loss on the anomaly probability ``p`` (softmax channel 1).

    ``p_t = p`` where ``M = 1`` else ``1 - p``; loss ``= mean(-(1 - p_t)^gamma log(p_t))``.
    ``p_t`` is clamped to ``[eps, 1]`` so a confident wrong pixel gives a large finite loss.
    Shapes: ``probability`` and ``mask`` broadcastable, e.g. ``[B, 1, H, W]`` each.
    """
    probability, mask = probability.float(), mask.float()
    p_t = mask * probability + (1.0 - mask) * (1.0 - probability)
    p_t = p_t.clamp(min=eps, max=1.0)
    return (-(1.0 - p_t) ** gamma * torch.log(p_t)).mean()


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``L_seg = L1(p, M) + Focal(p, M)`` with ``p = softmax(logits)[:, 1:2]``.

    Args:
        logits: ``[B, 2, H, W]`` (channel 1 = anomaly).
        mask: ``[B, 1, H, W]`` in {0, 1}.

    Returns ``(L_seg, l1, focal)`` (scalars).
    """
    if logits.dim() != 4 or logits.shape[1] != 2:
        raise ValueError(f"logits must have shape [B, 2, H, W]; got {list(logits.shape)}")
    if mask.shape != (logits.shape[0], 1, *logits.shape[2:]):
        raise ValueError(f"mask must have shape [B, 1, H, W] = {[logits.shape[0], 1, *logits.shape[2:]]}; "
                         f"got {list(mask.shape)}")
    probability = torch.softmax(logits.float(), dim=1)[:, 1:2]
    mask = mask.float()
    l1 = (probability - mask).abs().mean()
    focal = focal_loss(probability, mask, gamma)
    return l1 + focal, l1, focal
