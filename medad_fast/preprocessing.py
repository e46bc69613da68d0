"""The preprocessing record: how a model's input is made, decided once, when it is trained.

A model scores correctly only what is made the way its training slices were made. The
record (:class:`Preprocessing`) holds every setting between a slice or a CT scan and the
model's input:

- ``window`` (HU ``[lo, hi]``) and ``hist_eq``: how CT voxels become 0..255 slices
  (:func:`medad_fast.data.scan.apply_window`, :func:`medad_fast.data.scan.liver_image`): as
  ``medad-fast prepare`` wrote the training slices;
- ``crop``: ``"liver"`` (each slice cut to its liver box, :mod:`medad_fast.data.crop`) or
  ``"none"``;
- ``image_size``: the model's side in pixels;
- ``intensity_range``: the model's input range, onto which a slice's 0..255 is mapped
  linearly (this version: ``[0, 1]``, :func:`medad_fast.inference.score_batch`);
- ``window_from``: where training took the window and hist-eq from (the training data's
  prepare manifest, or ``"default"``); a note, not a setting.

Training decides it (:func:`decide_preprocessing`): window and hist-eq from the prepare
manifest of its data (the settings of the sources that hold its ``train`` patients), else
prepare's defaults; crop and side from the run. It is stored in ``config.json`` and every
checkpoint (``Config.preprocessing``) and in exported files (ONNX ``metadata_props`` and
the pt2 archive, under :data:`PREPROCESSING_KEY`), and every scoring path (2-D and CT
``predict``, ``evaluate``, the exported files) takes it from the model, never from the
training data: deleting or moving the data changes no predicted value.

Runs trained before the record existed have none: :func:`legacy_preprocessing` assumes what
scoring did then (the manifest of the run's data when it is still readable, else prepare's
defaults) and says so with a :class:`LegacyPreprocessingWarning` naming the assumed window.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .data.scan import DEFAULT_WINDOW

__all__ = ["Preprocessing", "PREPROCESSING_KEY", "INTENSITY_RANGE", "LegacyPreprocessingWarning",
           "decide_preprocessing", "legacy_preprocessing", "preprocessing_of", "scoring_window"]

#: name of the record inside an exported file (pt2 extra file, ONNX metadata key)
PREPROCESSING_KEY = "medad_fast_preprocessing.json"
#: the model input range of this version: a slice's 0..255 mapped linearly onto it
INTENSITY_RANGE = (0.0, 1.0)
#: window_from of a record whose window is prepare's default
DEFAULT_FROM = "default"


class LegacyPreprocessingWarning(UserWarning):
    """A model without a preprocessing record was loaded: its window is assumed (named)."""


def _window(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers LO HI, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name}: LO must be smaller than HI (finite), got {lo:g} {hi:g}")
    return lo, hi


@dataclass(frozen=True)
class Preprocessing:
    """See the module docstring. ``ValueError`` naming the field for a value no model uses."""

    window: tuple[float, float] = DEFAULT_WINDOW
    hist_eq: bool = False
    crop: str = "none"
    image_size: int = 256
    intensity_range: tuple[float, float] = INTENSITY_RANGE
    window_from: str = DEFAULT_FROM

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _window(self.window, "preprocessing window"))
        object.__setattr__(self, "intensity_range", tuple(float(v) for v in self.intensity_range))
        if not isinstance(self.hist_eq, bool):
            raise ValueError(f"preprocessing hist_eq must be true or false, got {self.hist_eq!r}")
        if self.crop not in ("liver", "none"):
            raise ValueError(f"preprocessing crop must be 'liver' or 'none', got {self.crop!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"preprocessing image_size must be an int >= 8, got {self.image_size!r}")
        if self.intensity_range != INTENSITY_RANGE:
            raise ValueError(f"preprocessing intensity_range {list(self.intensity_range)}: this version feeds "
                             f"models {list(INTENSITY_RANGE)} only")

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(window=list(self.window), intensity_range=list(self.intensity_range))
        return values

    @classmethod
    def from_dict(cls, values: Any, where: str = "preprocessing") -> Preprocessing:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming ``where`` for anything else."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: the preprocessing record must be a JSON object, got {values!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown preprocessing keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None

    def describe(self) -> str:
        """e.g. ``"window -100 300 HU, hist-eq off, crop liver, side 64"``."""
        return (f"window {self.window[0]:g} {self.window[1]:g} HU, hist-eq {'on' if self.hist_eq else 'off'}, "
                f"crop {self.crop}, side {self.image_size}")


def _manifest_window(data: str | None, train_only: bool) -> tuple[tuple[float, float], bool, str] | None:
    """``(window, hist_eq, manifest path)`` of the prepare manifest of ``data`` when it is
    readable and its sources agree (``train_only``: the sources holding ``train`` patients,
    all of them when none does); None when there is no readable prepare manifest.
    ``ValueError`` naming the manifest when the sources disagree and ``train_only``."""
    from .data import manifest as prepare_manifest

    if not data:
        return None
    found = prepare_manifest.find(data)
    manifest = prepare_manifest.manifest_path(data)
    if found is None:
        return None
    sources = found.sources
    training = [s for s in sources if any(p.split == "train" for p in s.patients.values())]
    if train_only and training:
        sources = training
    if any(s.settings.window is None or s.settings.hist_eq is None for s in sources):
        return None  # a source without its settings recorded: nothing to read a window from
    settings = {(s.settings.window, bool(s.settings.hist_eq)) for s in sources}
    if len(settings) != 1:
        if train_only and settings:
            raise ValueError(f"{manifest}: the training slices were prepared with different windows / hist-eq "
                             f"({sorted(settings)}); a model has one preprocessing: prepare them with one setting")
        return None
    (window, hist_eq), = settings
    return window, hist_eq, str(manifest.resolve())


def decide_preprocessing(run) -> Preprocessing:
    """The record of a run about to train (:class:`medad_fast.config.RunConfig`, its crop
    resolved or not): window and hist-eq from the prepare manifest of ``run.data`` (see the
    module docstring), else prepare's defaults."""
    from .data.crop import resolve_crop

    found = _manifest_window(run.data, train_only=True)
    window, hist_eq, where = found if found is not None else (DEFAULT_WINDOW, False, DEFAULT_FROM)
    return Preprocessing(window, hist_eq, resolve_crop(run.crop, run.data), run.image_size, INTENSITY_RANGE, where)


def legacy_preprocessing(run, where: str | Path) -> Preprocessing:
    """The record assumed for a model (``where``: its file) saved without one: the settings
    of the prepare manifest of ``run.data`` when it is readable and its sources agree (what
    scoring used before records existed), else prepare's defaults; warns
    (:class:`LegacyPreprocessingWarning`) naming the assumed window and where it came from."""
    from .data.crop import resolve_crop

    found = _manifest_window(run.data, train_only=False)
    if found is not None:
        window, hist_eq, origin = found
        why = f"the settings in {origin}, the training data's manifest"
    else:
        window, hist_eq, origin = DEFAULT_WINDOW, False, DEFAULT_FROM
        why = ("prepare's defaults: " + (f"the training data's manifest {Path(run.data) / 'manifest.json'} is not "
                                         "readable or not prepare's" if run.data else "the run names no data"))
    record = Preprocessing(window, hist_eq, resolve_crop(run.crop, run.data), run.image_size, INTENSITY_RANGE,
                           f"assumed: {origin}")
    warnings.warn(f"{where} has no preprocessing record (saved before medad-fast stored one); assuming HU window "
                  f"{window[0]:g} {window[1]:g}, hist-eq {'on' if hist_eq else 'off'} ({why}), crop {record.crop}, "
                  f"side {record.image_size}. If its training slices were prepared otherwise, pass --window / "
                  "--hist-eq when scoring CT, or retrain", LegacyPreprocessingWarning, stacklevel=2)
    return record


def preprocessing_of(config, where: str = "a method built without a loaded checkpoint") -> Preprocessing:
    """The record of a :class:`medad_fast.config.Config`: its own, else (a method built in
    code from a config, not loaded: loading supplies one) :func:`legacy_preprocessing`'s."""
    record = config.preprocessing
    return record if record is not None else legacy_preprocessing(config.run, where)


def scoring_window(record: Preprocessing, window: tuple[float, float] | None = None, hist_eq: bool | None = None
                   ) -> tuple[tuple[float, float], bool, str]:
    """``(window, hist_eq, where from)`` that CT scoring uses: the record's, or the given
    overrides (``--window`` / ``--hist-eq``). ``ValueError`` naming ``--window`` for a bad one."""
    overridden = [name for name, value in (("--window", window), ("--hist-eq", hist_eq)) if value is not None]
    window = record.window if window is None else _window(window, "--window")
    hist_eq = record.hist_eq if hist_eq is None else bool(hist_eq)
    where = f"the model's preprocessing record ({record.window_from})"
    if overridden:
        where = f"{' and '.join(overridden)}" + (f", the rest from {where}" if len(overridden) == 1 else "")
    return window, hist_eq, where
