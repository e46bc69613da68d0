"""The BMAD folder layout, in one place: what the reader lists and what the writers write.

BMAD (Bao et al., "BMAD: Benchmarks for Medical Anomaly Detection", arXiv:2306.11876) stores
its liver slices as::

    train/good/<stem>.png                        normal training slices
    {valid,test}/good/img/<stem>.png             normal slices         (or flat: good/<stem>.png)
    {valid,test}/Ungood/img/<stem>.png           abnormal slices
    {valid,test}/Ungood/label/<stem>.png         their lesion masks    (or Ungood/anomaly_mask/)

The label of a slice is its folder (``Ungood`` = abnormal). A mask has the stem of its image
(``<stem>.png``; ``<stem>_mask.png`` is accepted too). The reader (:func:`list_split`, used
by :mod:`medad_fast.data.bmad` and :mod:`medad_fast.data.dataset`) accepts the three variants
seen in the wild: ``img`` + ``label``, ``img`` + ``anomaly_mask``, and flat ``good/*.png``.

A ``valid``/``test`` split whose abnormal images have no mask at all (no mask folder, or
none of its files matches) is an *image-level* split (:func:`is_image_level`): most public
medical AD sets have image labels only, and evaluation then reports image metrics alone. A
split where some abnormal images have masks and others do not is refused, naming the first
image without one: it is a broken export, and scoring it would count lesions as background.

A folder with a ``data.json`` (the MedIAnomaly / DDAD-ASR layout, or a folder holding exactly
one such dataset) is read by :mod:`medad_fast.data.medianomaly`; :func:`list_split` and
:func:`has_split` dispatch there, so every reader of the BMAD layout reads it too. The split names and
the slice record both readers share (:data:`SPLITS`, :class:`SliceFile`, :func:`check_split`) live in
:mod:`medad_fast.data.splits` and are re-exported here.
The writers (``medad-fast phantom``: :mod:`medad_fast.data.phantom`; ``medad-fast prepare``:
:mod:`medad_fast.data.volumes`) write ``img`` + ``label`` PNGs through :func:`slice_relpaths`
and a ``manifest.json`` at the root.

Slices cut from a volume are named ``<volume>_<slice index, 4+ digits>`` (:func:`slice_stem`),
so the volume and the position of a slice can be read back from its name
(:func:`parse_slice_stem`) or, more reliably, from the prepare manifest
(:func:`medad_fast.data.manifest.slice_origins`, the module that owns that file).

:data:`IMAGE_SUFFIXES` lists every image file the package reads (BMAD slices, anomaly
sources, ``medad-fast predict`` inputs); :func:`collect_image_files` finds them in folders.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Iterable

from medad_fast.data import medianomaly
from medad_fast.data.splits import SPLITS, SliceFile, check_split

__all__ = [
    "SPLITS",
    "EVAL_SPLITS",
    "NORMAL_FOLDER",
    "ABNORMAL_FOLDER",
    "IMAGE_FOLDER",
    "MASK_FOLDERS",
    "IMAGE_SUFFIXES",
    "WRITTEN_SUFFIX",
    "MANIFEST_NAME",
    "SliceFile",
    "check_split",
    "kind_folder",
    "slice_relpaths",
    "slice_paths",
    "slice_folders",
    "slice_stem",
    "parse_slice_stem",
    "slice_origin",
    "list_split",
    "has_split",
    "is_image_level",
    "collect_image_files",
]

EVAL_SPLITS = ("valid", "test")  # the splits that hold abnormal slices; train is normal only
NORMAL_FOLDER = "good"
ABNORMAL_FOLDER = "Ungood"
IMAGE_FOLDER = "img"
MASK_FOLDERS = ("label", "anomaly_mask")  # the writers write the first
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
WRITTEN_SUFFIX = ".png"
MANIFEST_NAME = "manifest.json"

# prepare pads the slice index to 4 digits; a longer index (a volume of >= 10^4 slices) just
# has more. Requiring >= 4 keeps a name like "img_1" from being taken for slice 1 of "img".
SLICE_INDEX_DIGITS = 4
_SLICE_STEM = re.compile(r"(?P<volume>.+)_(?P<index>\d{%d,})" % SLICE_INDEX_DIGITS)


def kind_folder(abnormal: bool) -> str:
    """The folder of a slice's label: ``Ungood`` for abnormal, ``good`` for normal."""
    return ABNORMAL_FOLDER if abnormal else NORMAL_FOLDER


# --------------------------------------------------------------------------- writing


def slice_relpaths(split: str, abnormal: bool, stem: str) -> tuple[str, str | None]:
    """Where a writer puts a slice: ``(image, mask or None)`` as POSIX paths relative to the
    root (the form the manifests store). ``ValueError`` for an unknown split or an abnormal
    training slice (train holds normal slices only)."""
    check_split(split)
    name = stem + WRITTEN_SUFFIX
    if split == "train":
        if abnormal:
            raise ValueError(f"the train split holds normal slices only; cannot place abnormal slice {stem!r}")
        return str(PurePosixPath(split, NORMAL_FOLDER, name)), None
    kind = PurePosixPath(split, kind_folder(abnormal))
    image = str(kind / IMAGE_FOLDER / name)
    return image, (str(kind / MASK_FOLDERS[0] / name) if abnormal else None)


def slice_paths(root: str | os.PathLike, split: str, abnormal: bool, stem: str) -> tuple[Path, Path | None]:
    """:func:`slice_relpaths` under ``root``: ``(image path, mask path or None)``."""
    image, mask = slice_relpaths(split, abnormal, stem)
    return Path(root) / image, (Path(root) / mask if mask is not None else None)


def slice_folders(root: str | os.PathLike) -> list[Path]:
    """Every folder the writers put slice files in (existing or not)."""
    root = Path(root)
    folders = [root / "train" / NORMAL_FOLDER]
    for split in EVAL_SPLITS:
        folders += [root / split / NORMAL_FOLDER / IMAGE_FOLDER, root / split / ABNORMAL_FOLDER / IMAGE_FOLDER,
                    root / split / ABNORMAL_FOLDER / MASK_FOLDERS[0]]
    return folders


# --------------------------------------------------------------------------- slice names


def slice_stem(volume_id: str, slice_index: int) -> str:
    """The file stem of slice ``slice_index`` of volume ``volume_id``: ``<volume>_<index:04d>``.

    ``ValueError`` for a negative index or an empty volume id."""
    if not volume_id:
        raise ValueError("volume_id must be a non-empty string")
    if isinstance(slice_index, bool) or int(slice_index) != slice_index or slice_index < 0:
        raise ValueError(f"slice_index must be an integer >= 0, got {slice_index!r} (volume {volume_id!r})")
    return f"{volume_id}_{int(slice_index):0{SLICE_INDEX_DIGITS}d}"


def parse_slice_stem(stem: str) -> tuple[str, int] | None:
    """``(volume_id, slice_index)`` of a :func:`slice_stem` name; None for any other name."""
    match = _SLICE_STEM.fullmatch(stem)
    return (match["volume"], int(match["index"])) if match else None


def slice_origin(path: str | os.PathLike) -> tuple[str, int]:
    """The volume and slice index a file's name tells: :func:`parse_slice_stem` of its stem,
    else ``(stem, -1)`` (a lone image is its own volume, position unknown)."""
    stem = Path(path).stem
    return parse_slice_stem(stem) or (stem, -1)


# --------------------------------------------------------------------------- reading


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _images_in(folder: Path) -> list[Path]:
    """The images directly inside ``folder``, sorted by name, hidden ones skipped."""
    return sorted(p for p in folder.iterdir() if _is_image_name(p.name) and p.is_file())


def _images_below(folder: Path) -> list[Path]:
    """The images anywhere below ``folder`` (hidden files and folders skipped, symlinked
    folders not followed), sorted by their path relative to ``folder``, part by part."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / f for f in filenames if _is_image_name(f) and (Path(dirpath) / f).is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)


def collect_image_files(inputs: str | os.PathLike | Iterable[str | os.PathLike], what: str = "input") -> list[Path]:
    """The image files named by ``inputs``, in order: a file as given (any suffix), a folder
    as its images (:data:`IMAGE_SUFFIXES`), recursively, sorted by relative path, hidden ones
    skipped.

    ``what`` names the inputs in errors: ``FileNotFoundError("<what> not found: <path>")``
    for a missing input, ``FileNotFoundError("no images (...) in <what> folder <path>")`` for
    a folder without images.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = _images_below(path)
            if not found:
                raise FileNotFoundError(f"no images ({_suffix_list()}) in {what} folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{what} not found: {path}")
    return files


def _find_mask(image: Path, mask_dirs: list[Path]) -> Path | None:
    """The mask file of ``image`` in the first of ``mask_dirs`` that has one; None if none does."""
    for folder in mask_dirs:
        for name in dict.fromkeys((image.name, image.stem + WRITTEN_SUFFIX, image.stem + "_mask" + WRITTEN_SUFFIX)):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _abnormal_entries(images: list[Path], mask_dirs: list[Path]) -> list[SliceFile]:
    """The abnormal slices with their masks: every one with a mask (pixel-level), or none
    (image-level, masks None). ``FileNotFoundError`` naming the first image without a mask
    when only some have one."""
    masks = [_find_mask(image, mask_dirs) for image in images]
    without = [image for image, mask in zip(images, masks) if mask is None]
    if without and len(without) < len(images):
        image = without[0]
        looked = ", ".join(str(d) for d in mask_dirs)
        raise FileNotFoundError(
            f"no mask for abnormal image {image}: expected {image.stem}{WRITTEN_SUFFIX} in {looked} "
            f"({len(images) - len(without)} of the {len(images)} abnormal images have masks, {len(without)} do not; "
            f"a split is pixel-level, every abnormal image with a mask, or image-level, none with one)")
    return [SliceFile(image, mask, True) for image, mask in zip(images, masks)]


def is_image_level(entries: Iterable[SliceFile]) -> bool:
    """Whether a split (:func:`list_split`'s entries) is image-level: it has abnormal slices
    and none of them has a mask (then pixel metrics are undefined, not zero)."""
    abnormal = [entry for entry in entries if entry.abnormal]
    return bool(abnormal) and all(entry.mask is None for entry in abnormal)


def has_split(root: str | os.PathLike, split: str) -> bool:
    """Whether the data folder ``root`` has ``split``: its folder (``train/good`` for train)
    in the BMAD layout, its key in ``data.json`` in the MedIAnomaly layout. Nothing is listed."""
    check_split(split)
    dataset = medianomaly.dataset_root(root)
    if dataset is not None:
        return split in medianomaly.splits(dataset)
    root = Path(root).expanduser()
    return (root / split / NORMAL_FOLDER).is_dir() if split == "train" else (root / split).is_dir()


def _normal_images(folder: Path) -> list[Path]:
    """``good/img/*`` if ``good/img`` exists, else flat ``good/*``."""
    return _images_in(folder / IMAGE_FOLDER) if (folder / IMAGE_FOLDER).is_dir() else _images_in(folder)


def list_split(root: str | os.PathLike, split: str) -> list[SliceFile]:
    """The files of a split: a :class:`SliceFile` ``(image, mask or None, abnormal)`` per
    slice, normal ones first, each group sorted by file name. Paths are ``root``-based
    (``~`` expanded, not resolved).

    Abnormal slices have a mask each, or (an image-level split, :func:`is_image_level`) none
    has one (mask None). A folder with a ``data.json`` is read by
    :func:`medad_fast.data.medianomaly.list_split` (its order: the file's).

    Raises ``FileNotFoundError`` naming the missing root or split folder, an empty split, or
    the first abnormal image without a mask when others have one; ``ValueError`` for an
    unknown split name.
    """
    check_split(split)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if medianomaly.dataset_root(root) is not None:
        return medianomaly.list_split(root, split)
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir} (expected the BMAD layout under {root}, or a MedIAnomaly data.json)")

    good_dir, ungood_dir = split_dir / NORMAL_FOLDER, split_dir / ABNORMAL_FOLDER
    entries: list[SliceFile] = []
    if split == "train":
        if not good_dir.is_dir():
            raise FileNotFoundError(f"training folder not found: {good_dir}")
    elif not good_dir.is_dir() and not ungood_dir.is_dir():
        raise FileNotFoundError(f"neither {good_dir} nor {ungood_dir} exists")
    if good_dir.is_dir():
        entries += [SliceFile(p, None, False) for p in _normal_images(good_dir)]
    if split != "train" and ungood_dir.is_dir():
        if not (ungood_dir / IMAGE_FOLDER).is_dir():
            raise FileNotFoundError(f"abnormal images folder not found: {ungood_dir / IMAGE_FOLDER}")
        mask_dirs = [ungood_dir / name for name in MASK_FOLDERS if (ungood_dir / name).is_dir()]
        entries += _abnormal_entries(_images_in(ungood_dir / IMAGE_FOLDER), mask_dirs)
    if not entries:
        raise FileNotFoundError(f"no images ({_suffix_list()}) found in split folder {split_dir}")
    return entries
