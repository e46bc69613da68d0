"""The MedIAnomaly / DDAD-ASR layout: a folder of images and a ``data.json`` that splits them.

MedIAnomaly (Cai et al., "MedIAnomaly: A comparative study of anomaly detection in medical
images", arXiv:2404.04518; github.com/caiyu6666/MedIAnomaly) and DDAD-ASR (Cai et al., "Dual-
distribution discrepancy with self-supervised refinement for anomaly detection in medical
images"; github.com/caiyu6666/DDAD-ASR) store each benchmark (RSNA, VinCXR, BrainTumor,
LAG) as::

    <Dataset>/images/<name>.png|.jpg   every image of the set
    <Dataset>/data.json                {"train": {"0": [names],                  normal training images
                                                  "unlabeled": {"0": [names],    the unlabeled pool
                                                                "1": [names]}},
                                        "test": {"0": [names], "1": [names]}}   normal / abnormal test images

Labels are image-level: there are no pixel masks, so a test split of this layout is an
image-level split (:func:`medad_fast.data.layout.is_image_level`). ``--data`` names the
dataset folder (the one holding ``data.json``), or its parent when that holds exactly one such
dataset folder and no BMAD split folders (:func:`dataset_root`).

:func:`list_split` gives the split as :class:`~medad_fast.data.layout.SliceFile` s, in the
order of the file (normal ``"0"`` first, then abnormal ``"1"``: the order of the public
loaders, ``reconstruction/dataloaders/dataload.py:MedAD`` and ``anomaly_data.py``), so that
:func:`medad_fast.data.layout.list_split` dispatches here when a folder has a ``data.json``.
Images are read as every image of the package is (:func:`medad_fast.io.read_image_gray`:
colour converted with PIL's ITU-R 601-2 luma, as the public loaders' ``convert("L")``).

:func:`unlabeled_files` gives the unlabeled pool (``train["unlabeled"]``) without its labels,
the data of DDAD's unlabeled-distribution module; its labels are read only to compose the
pool as DDAD-ASR's loader does (``extra_data`` images, ``ar`` of them abnormal) when asked to.

A name in ``data.json`` that has no file is an error naming ``data.json`` and the missing
files (the first :data:`MISSING_LIMIT`, then a count), never skipped: a silently smaller test
split would change the benchmark's figures.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from medad_fast.data.splits import SPLITS, SliceFile, check_split

__all__ = ["DATA_JSON", "IMAGES_FOLDER", "MISSING_LIMIT", "dataset_root", "read_data_json", "splits", "list_split",
           "unlabeled_files"]

DATA_JSON = "data.json"
IMAGES_FOLDER = "images"
MISSING_LIMIT = 10  # missing files named in one error; the rest are counted
NORMAL_KEY, ABNORMAL_KEY, UNLABELED_KEY = "0", "1", "unlabeled"


def dataset_root(root: str | os.PathLike) -> Path | None:
    """The dataset folder that ``root`` names: ``root`` itself when it holds ``data.json``;
    else, when ``root`` has no BMAD split folder (``train``/``valid``/``test``), its one
    sub-folder that holds a ``data.json``; else None (not this layout). ``ValueError`` naming
    them when ``root`` holds several such datasets (which one is meant cannot be guessed)."""
    root = Path(root).expanduser()
    if (root / DATA_JSON).is_file():
        return root
    if not root.is_dir() or any((root / split).is_dir() for split in SPLITS):
        return None
    found = sorted(child for child in root.iterdir()
                   if not child.name.startswith(".") and (child / DATA_JSON).is_file())
    if len(found) > 1:
        raise ValueError(f"{root} holds {len(found)} MedIAnomaly datasets ({', '.join(p.name for p in found)}); "
                         f"pass one of them (the folder with {DATA_JSON}) as --data")
    return found[0] if found else None


def _require_root(root: str | os.PathLike) -> Path:
    dataset = dataset_root(root)
    if dataset is None:
        raise FileNotFoundError(f"no {DATA_JSON} in {Path(root).expanduser()} or in one dataset folder below it "
                                f"(the MedIAnomaly / DDAD-ASR layout)")
    return dataset


def read_data_json(root: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``data.json`` of the dataset ``root`` names (:func:`dataset_root`).
    ``ValueError`` naming the file when it is not JSON or not an object of splits."""
    path = _require_root(root) / DATA_JSON
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object of splits (train, test), got {type(content).__name__}")
    return content


def splits(root: str | os.PathLike) -> tuple[str, ...]:
    """The splits of :data:`~medad_fast.data.layout.SPLITS` that ``data.json`` has."""
    content = read_data_json(root)
    return tuple(split for split in SPLITS if isinstance(content.get(split), dict))


def _names(section: dict[str, Any], key: str, where: str, path: Path) -> list[str]:
    """The file names under ``section[key]`` ([] when absent); ``ValueError`` naming ``path``
    and ``where`` unless they are relative paths inside the images folder."""
    names = section.get(key, [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{path}: {where}[{key!r}] must be a list of file names")
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if not name or PurePosixPath(name).is_absolute() or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"{path}: {where}[{key!r}] holds {name!r}, not a file name inside {IMAGES_FOLDER}/")
    return names


def _files(dataset: Path, names: list[str], what: str) -> list[Path]:
    """``dataset/images/<name>`` of every name; ``FileNotFoundError`` naming ``data.json``
    and every missing file (up to :data:`MISSING_LIMIT`, then a count)."""
    images = dataset / IMAGES_FOLDER
    if names and not images.is_dir():
        raise FileNotFoundError(f"images folder not found: {images} (the images that {dataset / DATA_JSON} lists)")
    files = [images / name for name in names]
    missing = [name for name, file in zip(names, files) if not file.is_file()]
    if missing:
        shown = ", ".join(missing[:MISSING_LIMIT])
        more = f" and {len(missing) - MISSING_LIMIT} more" if len(missing) > MISSING_LIMIT else ""
        raise FileNotFoundError(f"{dataset / DATA_JSON}: {len(missing)} of the {len(names)} images of {what} are "
                                f"missing from {images}: {shown}{more}")
    return files


def _section(content: dict[str, Any], key: str, path: Path) -> dict[str, Any]:
    section = content.get(key)
    if not isinstance(section, dict):
        present = ", ".join(k for k in content if isinstance(content[k], dict)) or "none"
        raise FileNotFoundError(f"{path} has no {key!r} split (its splits: {present})")
    return section


def list_split(root: str | os.PathLike, split: str) -> list[SliceFile]:
    """The images of ``split`` as :class:`~medad_fast.data.layout.SliceFile` s, masks None:
    ``train``: ``train["0"]`` (normal; the unlabeled pool is not part of it, see
    :func:`unlabeled_files`); ``valid``/``test``: ``["0"]`` normal, then ``["1"]`` abnormal
    (image-level). Paths are ``<dataset>/images/<name>``, in the order of the file.

    ``FileNotFoundError`` naming ``data.json`` for a split it lacks, an empty split or missing
    files (all named, up to :data:`MISSING_LIMIT`); ``ValueError`` for a malformed file or an
    unknown split name."""
    check_split(split)
    dataset = _require_root(root)
    path = dataset / DATA_JSON
    section = _section(read_data_json(dataset), split, path)
    normal = _names(section, NORMAL_KEY, split, path)
    abnormal = [] if split == "train" else _names(section, ABNORMAL_KEY, split, path)
    if split == "train" and ABNORMAL_KEY in section:  # one-class training: an abnormal list cannot be used
        raise ValueError(f"{path}: train[{ABNORMAL_KEY!r}] lists abnormal training images; the train split holds "
                         f"normal images only (train[{NORMAL_KEY!r}]; unlabeled ones go in train[{UNLABELED_KEY!r}])")
    if not normal and not abnormal:
        raise FileNotFoundError(f"{path}: the {split} split lists no images")
    files = _files(dataset, normal + abnormal, f"the {split} split")
    return [SliceFile(file, None, i >= len(normal)) for i, file in enumerate(files)]


def unlabeled_files(root: str | os.PathLike, count: int | None = None, anomaly_rate: float | None = None
                    ) -> list[Path]:
    """The unlabeled pool of the dataset ``root`` names (``train["unlabeled"]``), as image
    paths without labels: the ``"0"`` names, then the ``"1"`` names, as DDAD-ASR's loader
    concatenates them (callers shuffle).

    ``count`` and ``anomaly_rate`` (together) compose the pool as DDAD-ASR's
    ``AnomalyDetectionDataset(extra_data=count, ar=anomaly_rate)`` does: the first
    ``int(count * anomaly_rate)`` abnormal names and the first ``count`` minus that normal
    ones; ``ValueError`` when the file has fewer. Without them, the whole pool (BrainTumor's
    published pool, 400 + 600, is the whole of DDAD-ASR's file).

    ``FileNotFoundError`` naming ``data.json`` when it has no pool or files are missing."""
    dataset = _require_root(root)
    path = dataset / DATA_JSON
    train = _section(read_data_json(dataset), "train", path)
    pool = train.get(UNLABELED_KEY)
    if not isinstance(pool, dict):
        raise FileNotFoundError(f"{path} has no train[{UNLABELED_KEY!r}] pool")
    where = f"train[{UNLABELED_KEY!r}]"
    normal, abnormal = _names(pool, NORMAL_KEY, where, path), _names(pool, ABNORMAL_KEY, where, path)
    if (count is None) != (anomaly_rate is None):
        raise ValueError("count and anomaly_rate go together (DDAD-ASR's extra_data and ar); pass both or neither")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an integer >= 1, got {count!r}")
        if not 0.0 <= anomaly_rate <= 1.0:
            raise ValueError(f"anomaly_rate must be in [0, 1], got {anomaly_rate!r}")
        n_abnormal = int(count * anomaly_rate)
        n_normal = count - n_abnormal
        if n_abnormal > len(abnormal) or n_normal > len(normal):
            raise ValueError(f"{path}: a pool of {count} images, {n_abnormal} abnormal (anomaly_rate "
                             f"{anomaly_rate}), needs {n_normal} normal and {n_abnormal} abnormal unlabeled "
                             f"images; the file has {len(normal)} and {len(abnormal)}")
        normal, abnormal = normal[:n_normal], abnormal[:n_abnormal]
    if not normal and not abnormal:
        raise FileNotFoundError(f"{path}: the train[{UNLABELED_KEY!r}] pool lists no images")
    return _files(dataset, normal + abnormal, "the unlabeled pool")
