"""Small file helpers shared by every module: atomic writers, image readers, resizing.

Writes are atomic: the data goes to a temporary file in the destination directory, which
then replaces the destination with ``os.replace`` (atomic on POSIX and Windows), so a
reader never sees a half-written file and an interrupted run leaves either the old file
or the new one. Temporary files are created with mode ``0o666 & ~umask`` (what ``open``
gives), not the ``0o600`` of :mod:`tempfile`, so outputs stay readable by the group.

Images are handled as grayscale throughout the package:

- :func:`read_image_gray` -> ``float32 [H, W]`` in ``[0, 1]`` from any mode PIL reads
  (8-bit, 16-bit, RGB(A), palette, 1-bit).
- :func:`read_png_gray` -> ``uint8 [H, W]``.
- :func:`read_mask` -> ``bool [H, W]``, any nonzero value (in any colour channel) is True.
- :func:`resize_images` / :func:`resize_masks` resize ``[N, 1, H, W]`` tensors the one
  way used everywhere: area averaging to shrink, bilinear to enlarge, nearest for masks.

Output folders: every command checks its output with :func:`check_writable_folder` (or
:func:`check_writable_file`) BEFORE any work, so that a folder it cannot write is an
:class:`OutputNotWritableError` (a ``ValueError``: exit code 2 from the CLI) naming the option
and the folder, not a ``PermissionError`` after minutes of scoring; :func:`output_folder`
also removes the folder again when the command created it and fails before writing into it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

PathLike = str | os.PathLike

__all__ = [
    "OutputNotWritableError",
    "check_writable_folder",
    "check_writable_file",
    "output_folder",
    "atomic_write_bytes",
    "fsync_directory",
    "atomic_write_text",
    "atomic_write_json",
    "save_png",
    "read_image_gray",
    "read_png_gray",
    "read_mask",
    "quantize_uint8",
    "resize_images",
    "resize_masks",
]


# --------------------------------------------------------------------------- output folders


class OutputNotWritableError(ValueError):
    """An output folder or file that cannot be created or written; the message names the
    option and the path."""


def check_writable_folder(path: PathLike, what: str = "--out") -> Path:
    """Raise :class:`OutputNotWritableError` unless files can be written in the folder
    ``path``: it must be a folder or not exist yet, and a file must be creatable in it (or,
    when it does not exist, in its nearest existing ancestor, where it will be made). The
    check writes and removes a hidden temporary file (``os.access`` is wrong for root, ACLs
    and read-only mounts). Creates nothing that stays. Returns ``Path(path)``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputNotWritableError(f"{what} {path} exists and is not a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritableError(f"{what} {path}: cannot be created, {existing} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".medad-fast-write-check-"):
            pass
    except OSError as e:
        where = "" if existing == path else f" (it would be created in {existing})"
        raise OutputNotWritableError(f"{what} {path} cannot be written{where}: {e.strerror or e}; choose a folder "
                                     "you can write to") from None
    return path


def check_writable_file(path: PathLike, what: str = "--out") -> Path:
    """:func:`check_writable_folder` for the folder of the file ``path`` (written atomically,
    so the folder must be writable); ``path`` itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputNotWritableError(f"{what} {path} is a folder; name the file to write")
    check_writable_folder(path.parent, f"{what} {path}: its folder")
    return path


def _remove_empty_folders(path: Path, stop: Path | None) -> None:
    """Remove ``path`` and then its ancestors up to (not including) ``stop`` while empty."""
    while path != stop and path != path.parent:
        try:
            path.rmdir()
        except OSError:  # not empty (or gone): leave it
            return
        path = path.parent


@contextlib.contextmanager
def output_folder(path: PathLike, what: str = "--out", create: bool = True) -> Iterator[Path]:
    """Check ``path`` (:func:`check_writable_folder`), create it (``create``) and yield it; on
    an error inside the block, the folders this call created are removed again when they
    are still empty, so a failed command leaves no empty output folder behind."""
    path = check_writable_folder(path, what)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        yield path
    except BaseException:
        if existing != path:
            _remove_empty_folders(path, existing)
        raise


# --------------------------------------------------------------------------- writers


def fsync_directory(path: PathLike) -> None:
    """Flush a directory's entries (a rename or unlink inside it) to disk.

    Needed after ``os.replace`` for the new name to survive a power loss on POSIX file
    systems. A no-op where directories cannot be opened (Windows).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (PermissionError, IsADirectoryError, NotADirectoryError):
        return
    except OSError:
        if os.name == "nt":
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + os.replace).

    The parent directory is created if needed. ``fsync=True`` also makes the write durable
    across a power loss or kernel crash: the file is flushed and fsynced before the rename,
    and the directory after it (slower, so off by default; checkpoints use it).
    Returns the destination path.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write file {path}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_directory(path.parent)
    except BaseException:
        # Leave no temp file behind, whatever went wrong (including KeyboardInterrupt).
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8", fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: PathLike, obj: Any, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON (indent 2, trailing newline) to ``path`` atomically.

    Raises ``TypeError`` naming the file when ``obj`` is not JSON-serialisable; nothing is
    written in that case.
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    except TypeError as e:
        raise TypeError(f"cannot write {path} as JSON: {e}") from e
    return atomic_write_text(path, text, fsync=fsync)


def quantize_uint8(image: np.ndarray, keep_positive: bool = False) -> np.ndarray:
    """Float image in [0, 1] -> uint8 (``round(255 x)``, clipped to 0..255).

    ``keep_positive=True`` maps every strictly positive value to at least 1, so that the
    liver convention ``image > 0`` survives quantisation of very dark liver pixels
    (e.g. from a 16-bit source). NaN raises ``ValueError``.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    values = image.astype(np.float32, copy=False)
    if np.isnan(values).any():
        raise ValueError("image contains NaN; cannot quantise to uint8")
    q = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
    if keep_positive:
        q[(values > 0) & (q == 0)] = 1
    return q


def save_png(path: PathLike, image: np.ndarray, fsync: bool = False) -> Path:
    """Save a 2-D grayscale image as an 8-bit PNG, atomically.

    ``image``: ``[H, W]`` uint8 (written as is), bool (0/255), or float in [0, 1]
    (``round(255 x)``, clipped). Anything else raises ``ValueError`` naming the file.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"cannot save {path}: expected a 2-D [H, W] image, got shape {image.shape}")
    if image.dtype != np.uint8 and image.dtype != np.bool_ and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"cannot save {path}: expected uint8, bool or float in [0, 1], got {image.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(quantize_uint8(image), mode="L").save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue(), fsync=fsync)


# --------------------------------------------------------------------------- readers


def _open_image(path: PathLike) -> Image.Image:
    """Open and fully decode an image; clear errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an image file, got a directory: {path}")
    try:
        img = Image.open(path)
        img.load()  # decode now, so truncated files fail here and not later
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return img


def _gray_float(img: Image.Image, path: PathLike) -> np.ndarray:
    """PIL image of any mode -> float32 [H, W] in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return np.asarray(img, dtype=np.float32) / 65535.0
    if mode == "I":
        # 32-bit integer mode: what PIL gives for some 16-bit PNGs/TIFFs. Read as 16-bit.
        return np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if mode == "F":
        return np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
    if mode == "L":
        return np.asarray(img, dtype=np.float32) / 255.0
    try:
        # RGB(A), LA, P, 1, CMYK, YCbCr...: PIL's luma conversion (ITU-R 601-2), alpha ignored.
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert image {path} (mode {mode}) to grayscale: {e}") from e


def read_image_gray(path: PathLike) -> np.ndarray:
    """Read any image PIL understands as grayscale ``float32 [H, W]`` in ``[0, 1]``.

    8-bit is divided by 255, 16-bit by 65535, colour is converted with PIL's luma formula.
    Missing file -> ``FileNotFoundError``; unreadable/corrupt -> ``ValueError``, both naming it.
    """
    with _open_image(path) as img:
        return _gray_float(img, path)


def read_png_gray(path: PathLike) -> np.ndarray:
    """Read an image as grayscale ``uint8 [H, W]``.

    8-bit grayscale is returned exactly; other modes go through :func:`read_image_gray`
    and are rounded, with strictly positive pixels kept >= 1 (the liver convention).
    """
    with _open_image(path) as img:
        if img.mode == "L":
            return np.array(img, dtype=np.uint8)
        return quantize_uint8(_gray_float(img, path), keep_positive=True)


def read_mask(path: PathLike) -> np.ndarray:
    """Read a mask image as ``bool [H, W]``: True where any colour channel is nonzero.

    Works on the raw stored values (palette indices for palette images, alpha ignored), so
    a 16-bit mask holding 1 or a mask drawn in pure red count as lesion too.
    """
    with _open_image(path) as img:
        mode = img.mode
        if mode in ("RGBA", "LA", "PA"):
            img = img.convert(mode[:-1] if mode != "PA" else "P")
        raw = np.asarray(img)
    if raw.ndim == 3:
        return (raw != 0).any(axis=-1)
    return raw != 0


# --------------------------------------------------------------------------- resizing


def _check_batch(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [N, C, H, W] tensor, got {shape}")


def _target_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return height, width


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize float images ``[N, C, H, W]`` to ``size`` (an int means square).

    Shrinking in both directions uses area averaging (``mode="area"``); anything else uses
    bilinear interpolation with antialiasing (so a direction that shrinks is still averaged).
    Same size -> returned unchanged. Output dtype = input dtype (float).
    """
    _check_batch(images, "images")
    height, width = _target_hw(size)
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (height, width):
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point to resize, got {images.dtype}")
    if images.shape[0] == 0:
        return images.new_zeros(*images.shape[:2], height, width)
    if height <= in_h and width <= in_w:
        return F.interpolate(images, size=(height, width), mode="area")
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=True)


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize masks ``[N, C, H, W]`` (any dtype) to ``size`` with nearest-neighbour
    (``nearest-exact``: pixel centres map to pixel centres, like PIL/OpenCV). Dtype kept."""
    _check_batch(masks, "masks")
    height, width = _target_hw(size)
    if tuple(masks.shape[-2:]) == (height, width):
        return masks
    if masks.shape[0] == 0:
        return masks.new_zeros(*masks.shape[:2], height, width)
    resized = F.interpolate(masks.to(torch.float32), size=(height, width), mode="nearest-exact")
    return resized.to(masks.dtype)
