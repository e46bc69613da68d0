"""Re-implementations of the code users run today, as benchmark peers (see benchmarks/RESULTS.md for how they are measured).

Each peer is our own code, written to do what the original does, step for step, with the
same per-sample structure (a Python loop over the batch) and the same libraries:

* :func:`draem_synthesize` — DRAEM's dataset augmentation (``rand_perlin_2d_np`` in numpy,
  float64, lattice tiled with ``np.repeat`` so the image size must be divisible by the
  lattice resolution; imgaug ``Affine(rotate=(-90, 90))``: bilinear, zero fill, same size;
  threshold 0.5; DRAEM's blend ``I (1 - M) + (1 - beta) A M + beta I M`` with
  ``beta ~ U(0, 0.8)`` the weight of the ORIGINAL image), one sample at a time, then
  collated into a batch tensor as the DataLoader does. The rotation uses
  ``scipy.ndimage.rotate(order=1)``; imgaug itself dispatches float64 to OpenCV's
  ``warpAffine``, which is faster, so this peer's rotation share is an upper bound
  (the RESULTS note quotes the ratio with and without the rotation).
* :func:`anomalib_synthesize` — anomalib's ``PerlinAnomalyGenerator`` on a batch: a Python
  loop over the samples, ``generate_perlin_noise`` in torch (computed at the next power of
  two and cropped, ``repeat_interleave`` tiling), the rescale of an all-below-threshold
  field, rotation as torchvision's ``RandomAffine(degrees=(-90, 90), BILINEAR, fill=0)``
  does it for tensors (a pixel-unit affine grid, ``grid_sample(align_corners=False)`` on
  the image plus a ones channel, fill blended with that channel), threshold, up to 10
  redraws of an empty mask, and anomalib's blend ``I (1 - M) + beta A M + (1 - beta) I M``
  with ``beta ~ U(0.2, 1.0)`` the opacity.
* :func:`fair_highpass` — FAIR's Butterworth high-pass in numpy, per image:
  ``fft2 -> fftshift -> H(D) on a centred distance grid -> ifftshift -> ifft2 -> real``.

Neither synthesis peer augments the anomaly source (DRAEM and anomalib apply three random
imgaug / torchvision colour transforms to it first): the synthesizer measured against them
has no ``source_transform`` either (the package's ``draem`` method adds DRAEM's, batched on
the device: :func:`medad_fast.augment.augment_anomaly_sources`), so that work is left out
on both sides and the synthesis ratios are the synthesis's alone.
Both peers apply the liver mask ``M *= [I > roi_threshold]``, which the
originals lack, so all implementations compute the same thing.

Shapes: images and sources ``[B, 1, H, W]`` float tensors (CPU or CUDA; the anomalib peer
runs on their device, DRAEM and FAIR compute on the host like the originals); outputs
``(augmented [B, 1, H, W], mask [B, 1, H, W])`` float32 on the images' device.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

__all__ = ["rand_perlin_2d_np", "draem_synthesize", "generate_perlin_noise", "anomalib_rotate",
           "anomalib_synthesize", "fair_butterworth_filter", "fair_highpass", "DRAEM_MAX_LOG2_RES"]

#: DRAEM draws ``2 ** randint(0, 6)`` cells per axis: 1..32.
DRAEM_MAX_LOG2_RES = 5


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3


def rand_perlin_2d_np(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator,
                      angles: np.ndarray | None = None) -> np.ndarray:
    """DRAEM's numpy Perlin noise ``[H, W]`` float64 with ``res = (ry, rx)`` cells.

    The gradient of every lattice node is tiled over its cell with ``np.repeat``, which is
    why ``H % ry == 0`` and ``W % rx == 0`` are required. ``angles [ry+1, rx+1]`` (radians)
    may be given to compare with our op on the same lattice; else drawn from ``rng``.
    """
    height, width = shape
    ry, rx = res
    if height % ry or width % rx:
        raise ValueError(f"DRAEM's Perlin needs the size {shape} divisible by the resolution {res}")
    delta = (ry / height, rx / width)
    cell = (height // ry, width // rx)
    grid = np.mgrid[0:ry:delta[0], 0:rx:delta[1]].transpose(1, 2, 0) % 1
    if angles is None:
        angles = 2 * math.pi * rng.random((ry + 1, rx + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile_grads(rows: slice, cols: slice) -> np.ndarray:
        return np.repeat(np.repeat(gradients[rows, cols], cell[0], axis=0), cell[1], axis=1)

    def dot(grad: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        offsets = np.stack((grid[:height, :width, 0] + shift[0], grid[:height, :width, 1] + shift[1]), axis=-1)
        return (offsets * grad[:height, :width]).sum(axis=-1)

    n00 = dot(tile_grads(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tile_grads(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tile_grads(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tile_grads(slice(1, None), slice(1, None)), (-1, -1))
    t = _fade(grid[:height, :width])
    lerp = lambda a, b, w: (b - a) * w + a  # noqa: E731 (DRAEM's lerp_np)
    return math.sqrt(2) * lerp(lerp(n00, n10, t[..., 0]), lerp(n01, n11, t[..., 0]), t[..., 1])


def draem_synthesize(images: torch.Tensor, sources: torch.Tensor, rng: np.random.Generator,
                     threshold: float = 0.5, roi_threshold: float | None = 0.0,
                     return_noise: bool = False):
    """DRAEM's augmentation of a batch, one sample at a time (see the module docstring).
    CPU numpy work; on a GPU the batch is computed on the host and moved to the images'
    device, as DRAEM's DataLoader output is.

    Every sample is made anomalous (the benchmark measures the full work; DRAEM computes
    the noise before its 50 % coin flip anyway). ``roi_threshold=None`` skips the liver
    mask. With ``return_noise`` the rotated noise ``[B, H, W]`` float64 is returned too.
    """
    batch, _, height, width = images.shape
    image_planes = images[:, 0].cpu().numpy()
    source_planes = sources[:, 0].cpu().numpy()
    augmented, masks, noises = [], [], []
    for b in range(batch):
        image = image_planes[b]
        ry = 2 ** int(rng.integers(0, DRAEM_MAX_LOG2_RES + 1))
        rx = 2 ** int(rng.integers(0, DRAEM_MAX_LOG2_RES + 1))
        noise = rand_perlin_2d_np((height, width), (ry, rx), rng)
        noise = scipy.ndimage.rotate(noise, rng.uniform(-90.0, 90.0), reshape=False, order=1,
                                     mode="constant", cval=0.0)
        mask = np.where(noise > threshold, np.ones_like(noise), np.zeros_like(noise))
        if roi_threshold is not None:
            mask = mask * (image > roi_threshold)
        source_in_mask = source_planes[b].astype(np.float32) * mask
        beta = rng.random() * 0.8
        blended = image * (1 - mask) + (1 - beta) * source_in_mask + beta * image * mask
        augmented.append(blended.astype(np.float32))
        masks.append(mask.astype(np.float32))
        if return_noise:
            noises.append(noise)
    # the DataLoader's collate
    result = tuple(torch.from_numpy(np.stack(planes))[:, None].to(images.device) for planes in (augmented, masks))
    if return_noise:
        return result + (torch.from_numpy(np.stack(noises)),)
    return result


def generate_perlin_noise(height: int, width: int, generator: torch.Generator,
                          scale: tuple[int, int] | None = None, angles: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """anomalib's torch Perlin noise ``[height, width]`` float32 on the generator's device:
    computed on the next-power-of-two grid with ``repeat_interleave`` tiling, then cropped.
    ``scale = (ry, rx)`` cells; ``angles [ry+1, rx+1]`` may be given, else drawn."""
    device = generator.device
    if scale is None:
        ry = 2 ** int(torch.randint(0, DRAEM_MAX_LOG2_RES + 1, (1,), generator=generator, device=device).item())
        rx = 2 ** int(torch.randint(0, DRAEM_MAX_LOG2_RES + 1, (1,), generator=generator, device=device).item())
    else:
        ry, rx = scale

    def next_power_of_two(value: int) -> int:
        return int(2 ** torch.ceil(torch.log2(torch.tensor(value))).int().item())

    pad_h, pad_w = next_power_of_two(height), next_power_of_two(width)
    delta = (ry / pad_h, rx / pad_w)
    cell = (pad_h // ry, pad_w // rx)
    grid = torch.stack(torch.meshgrid(torch.arange(0, ry, delta[0], device=device),
                                      torch.arange(0, rx, delta[1], device=device), indexing="ij"), dim=-1) % 1
    if angles is None:
        angles = 2 * torch.pi * torch.rand(ry + 1, rx + 1, generator=generator, device=device)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)

    def tile_grads(rows: slice, cols: slice) -> torch.Tensor:
        return gradients[rows, cols].repeat_interleave(cell[0], 0).repeat_interleave(cell[1], 1)

    def dot(grad: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
        offsets = torch.stack((grid[:pad_h, :pad_w, 0] + shift[0], grid[:pad_h, :pad_w, 1] + shift[1]), dim=-1)
        return (offsets * grad[:pad_h, :pad_w]).sum(dim=-1)

    n00 = dot(tile_grads(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tile_grads(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tile_grads(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tile_grads(slice(1, None), slice(1, None)), (-1, -1))
    t = 6 * grid[:pad_h, :pad_w] ** 5 - 15 * grid[:pad_h, :pad_w] ** 4 + 10 * grid[:pad_h, :pad_w] ** 3
    noise = torch.sqrt(torch.tensor(2.0, device=device)) * torch.lerp(torch.lerp(n00, n10, t[..., 0]),
                                                       torch.lerp(n01, n11, t[..., 0]), t[..., 1])
    return noise[:height, :width]


def anomalib_rotate(field: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate ``[H, W]`` by ``degrees`` about the image centre (the sense of
    ``scipy.ndimage.rotate``, i.e. our ops' ``rotation = -radians(degrees)``), bilinear, zero fill — torchvision's tensor ``affine``: pixel-unit grid, a ones channel
    resampled alongside so the fill can be blended in, ``grid_sample(align_corners=False)``."""
    height, width = field.shape
    theta = math.radians(degrees)
    c, s = math.cos(theta), math.sin(theta)
    # output pixel centres relative to the image centre, in pixels
    ys = torch.arange(height, dtype=field.dtype, device=field.device) - (height - 1) / 2
    xs = torch.arange(width, dtype=field.dtype, device=field.device) - (width - 1) / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    # inverse map (output -> input) of a counter-clockwise rotation in image coordinates
    x_in = c * xx - s * yy
    y_in = s * xx + c * yy
    grid = torch.stack((x_in / (width / 2), y_in / (height / 2)), dim=-1)[None]
    planes = torch.stack((field, torch.ones_like(field)))[None]  # image + coverage channel
    sampled = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    coverage = sampled[1]
    fill = 0.0
    return sampled[0] * coverage + (1.0 - coverage) * fill


def anomalib_synthesize(images: torch.Tensor, sources: torch.Tensor, generator: torch.Generator,
                        threshold: float = 0.5, roi_threshold: float | None = 0.0,
                        return_noise: bool = False):
    """anomalib's ``PerlinAnomalyGenerator`` on a batch (see the module docstring); every
    sample anomalous. ``roi_threshold=None`` skips the liver mask; ``return_noise`` also
    returns the rotated noise ``[B, H, W]``."""
    batch, _, height, width = images.shape
    device = images.device
    if generator.device != device:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}")

    def perturbation() -> tuple[torch.Tensor, torch.Tensor]:
        noise = generate_perlin_noise(height, width, generator)
        if not (noise > threshold).any():  # anomalib rescales a field that never crosses 0.5
            noise = (noise - noise.min()) / (noise.max() - noise.min())
            noise = noise * 2 - 1
        degrees = float(torch.empty(1, device=device).uniform_(-90.0, 90.0, generator=generator).item())
        noise = anomalib_rotate(noise, degrees)
        mask = torch.where(noise > threshold, torch.ones_like(noise), torch.zeros_like(noise))
        return noise, mask

    augmented, masks, noises = [], [], []
    for b in range(batch):
        image = images[b].float()
        noise, mask = perturbation()
        for _ in range(10):
            if mask.max() > 0:
                break
            noise, mask = perturbation()
        mask = mask[None]
        if roi_threshold is not None:
            mask = mask * (image > roi_threshold)
        beta = torch.rand(1, generator=generator, device=device) * (1.0 - 0.2) + 0.2
        beta = beta.view(-1, 1, 1).expand_as(image)
        source_in_mask = sources[b].float() * mask
        augmented.append(image * (1 - mask) + beta * source_in_mask + (1 - beta) * image * mask)
        masks.append(mask)
        noises.append(noise)
    result = (torch.stack(augmented), torch.stack(masks))
    if return_noise:
        return result + (torch.stack(noises),)
    return result


def fair_butterworth_filter(height: int, width: int, d0: float, order: int) -> np.ndarray:
    """FAIR's centred Butterworth high-pass gain ``[H, W]``: ``D`` = distance from the
    centre index ``(H//2, W//2)``, ``H = 1 / (1 + (D0/D)^(2n))``, 0 at the centre."""
    rows = np.arange(height)[:, None] - height // 2
    cols = np.arange(width)[None, :] - width // 2
    distance = np.sqrt(rows * rows + cols * cols)
    with np.errstate(divide="ignore"):
        gain = 1.0 / (1.0 + (d0 / distance) ** (2 * order))
    gain[distance == 0] = 0.0
    return gain


def fair_highpass(x: torch.Tensor, d0: float, order: int = 2) -> torch.Tensor:
    """FAIR's per-image numpy Butterworth high-pass of ``[B, ..., H, W]`` (loop over the
    leading images): ``real(ifft2(ifftshift(H * fftshift(fft2(x)))))``; same shape and dtype."""
    height, width = x.shape[-2:]
    planes = x.reshape(-1, height, width).cpu().numpy()
    out = np.empty(planes.shape, dtype=planes.dtype)
    for k, image in enumerate(planes):
        spectrum = np.fft.fftshift(np.fft.fft2(image))
        gain = fair_butterworth_filter(height, width, d0, order)  # FAIR builds it per call
        out[k] = np.real(np.fft.ifft2(np.fft.ifftshift(spectrum * gain)))
    return torch.from_numpy(out).reshape(x.shape).to(x.device)
