"""The split names of a data folder and the record of one slice in a split.

Shared by both layouts' readers: the BMAD reader (:mod:`medad_fast.data.layout`, which
re-exports these names and dispatches to the MedIAnomaly reader) and the MedIAnomaly reader
(:mod:`medad_fast.data.medianomaly`); they live here so that neither reader imports the other
back.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

__all__ = ["SPLITS", "SliceFile", "check_split"]

SPLITS = ("train", "valid", "test")


class SliceFile(NamedTuple):
    """One slice of a split: its image, its mask (None for a normal slice) and its label."""

    image: Path
    mask: Path | None
    abnormal: bool


def check_split(split: str) -> str:
    """``split`` itself; ``ValueError`` naming it when it is not one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split
