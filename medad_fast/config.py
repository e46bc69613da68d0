"""Configuration of a run: the run's own settings plus the chosen method's.

A run is configured in two parts that travel together (:class:`Config`) into
``config.json`` and into every checkpoint, so a checkpoint alone rebuilds its method:

* :class:`RunConfig`: what every method shares: which method and preset, the data, the
  training side, epochs, batch, lr, seed, checkpoint policy and runtime switches;
* the method's own dataclass, a subclass of :class:`MethodConfig` declared next to the
  method in :mod:`medad_fast.methods` (widths, losses, schedules, ablation switches...).

A method's presets (``paper``, ``small``, ``tiny``, and any of its own such as
``medianomaly``) fill both parts;
command-line options override single fields (:func:`config_from_preset`).
Configs written before methods existed (one flat dict, checkpoint format 1) are read as
the ``frequency_aware`` method (:meth:`Config.from_dict`).

Which dataclass holds a method's settings, and what its presets are, the method registry
knows; this module does not import it (the methods import this module), so the two readers
take them from their caller. Callers use the registry's wrappers,
:func:`medad_fast.methods.resolve_config` and :func:`medad_fast.methods.config_from_dict`,
which look the method up by name.

A third, optional part is the run's preprocessing record
(:class:`medad_fast.preprocessing.Preprocessing`: HU window, hist-eq, crop, side), decided
when the run trains and written beside the other two (``"preprocessing"``); configs written
before it existed have none (None).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .preprocessing import Preprocessing

__all__ = ["RunConfig", "MethodConfig", "Config", "config_from_preset", "setting", "CONFIG_FORMAT", "PRESET_NAMES",
           "OPTIONAL_PRESET_NAMES"]

#: version of the dict written by :meth:`Config.to_dict` (format 1: the flat dict of ef63857)
CONFIG_FORMAT = 2
#: presets every method provides (a method may declare more, e.g. ``medianomaly``)
PRESET_NAMES = ("paper", "small", "tiny")
#: presets some methods provide (the published MedIAnomaly / DDAD-ASR protocol)
OPTIONAL_PRESET_NAMES = ("medianomaly",)


def setting(default: Any, help: str, choices: tuple[Any, ...] | None = None,
            shortcuts: dict[str, tuple[Any, str]] | None = None) -> Any:
    """A dataclass field of a method's config that is a command-line option of that method
    (``medad-fast train --method M --FIELD-NAME``, :mod:`medad_fast.method_options`), with
    its help, its ``choices`` (checked for every config of the method; None is also
    accepted when the default is None) and ``shortcuts``: extra switches that set one value
    (``{"recon-only": ("recon_only", help)}`` -> ``--recon-only``)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if shortcuts:
        metadata["shortcuts"] = dict(shortcuts)
    return field(default=default, metadata=metadata)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _need(owner: Any, condition: bool, name: str, what: str) -> None:
    if not condition:
        raise ValueError(f"config {name}={getattr(owner, name)!r}: {what}")


@dataclass
class RunConfig:
    """Settings every method shares. Field names are the JSON keys of ``config.json["run"]``."""

    method: str = "frequency_aware"
    preset: str = "paper"
    image_size: int = 256  # training side in pixels
    batch_size: int = 8
    epochs: int = 230
    lr: float = 1e-4
    seed: int = 0
    max_train_images: int | None = None
    # training slices without liver (all black): refused unless skipped (train.load_training_images)
    skip_empty_slices: bool = False
    # checkpoints: every `checkpoint_every` epochs and/or when `checkpoint_minutes` have passed
    # since the last one (the last epoch and a stop signal always write one)
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 10.0
    reference_ops: bool = False
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # memory format of the activations (CPU and CUDA)
    # torch.compile of the method's networks (runtime.compile_networks); off by default: on a
    # CPU inductor compiles for minutes and the compiled step was not faster (benchmarks)
    compile: bool = False
    anomaly_source: str | None = None
    data: str | None = None
    # small training sets (medad_fast.augment, medad_fast.validation); all off by default
    augment: bool = False  # random flips, rotations, scales and intensity changes of the normal slices
    augment_strength: float = 1.0  # in [0, 1]: scales every augmentation range (0: the identity)
    val_fraction: float = 0.0  # normal slices held back for a synthetic validation set (not trained on)
    patience: int | None = None  # stop after this many epochs without a better validation score
    # liver-box cropping (medad_fast.data.crop): "liver", "none", or "auto" (crop liver-masked
    # data: prepare's, or 0 outside one connected foreground); training saves the resolved value
    crop: str = "auto"
    # exponential moving average of the weights, its decay in (0, 1) (medad_fast.weight_averaging);
    # None: off. With it, validation and everything that scores a checkpoint use the average
    ema: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value no run can use."""
        need = lambda condition, name, what: _need(self, condition, name, what)  # noqa: E731
        need(isinstance(self.method, str) and bool(self.method), "method", "must name a method")
        need(self.preset in PRESET_NAMES + OPTIONAL_PRESET_NAMES or self.preset == "custom", "preset",
             f"must be one of {list(PRESET_NAMES + OPTIONAL_PRESET_NAMES)} (or 'custom')")
        need(isinstance(self.image_size, int) and self.image_size >= 8, "image_size", "must be an int >= 8")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a finite number > 0")
        need(self.max_train_images is None or self.max_train_images >= 1, "max_train_images", "must be >= 1")
        need(isinstance(self.skip_empty_slices, bool), "skip_empty_slices", "must be true or false")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        need(self.checkpoint_minutes is None or self.checkpoint_minutes >= 0, "checkpoint_minutes", "must be >= 0")
        need(isinstance(self.augment, bool), "augment", "must be true or false")
        need(isinstance(self.compile, bool), "compile", "must be true or false")
        need(_is_number(self.augment_strength) and 0.0 <= self.augment_strength <= 1.0, "augment_strength",
             "must be a number in [0, 1] (--augment-strength)")
        need(_is_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0, "val_fraction",
             "must be a number in [0, 1) (--val-fraction; 0: no validation)")
        need(self.patience is None or (isinstance(self.patience, int) and not isinstance(self.patience, bool)
                                       and self.patience >= 1), "patience", "must be None or an int >= 1 (--patience)")
        need(self.crop in ("auto", "liver", "none"), "crop", "must be 'auto', 'liver' or 'none' (--crop)")
        need(self.ema is None or (_is_number(self.ema) and 0.0 < self.ema < 1.0), "ema",
             "must be None (off) or a decay in (0, 1), e.g. 0.999 (--ema)")
        need(self.patience is None or self.val_fraction > 0, "patience",
             "early stopping needs a validation set: set --val-fraction > 0 too")


@dataclass
class MethodConfig:
    """Base of every method's own settings (a dataclass subclass per method).

    ``architecture_fields``: the fields that decide the shapes of the weights; a checkpoint
    only loads into a method whose architecture matches."""

    architecture_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and not (value is None and f.default is None):
                self.need(value in choices, f.name,
                          f"must be {'None or ' if f.default is None else ''}one of {list(choices)}")
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a value the method cannot run with
        (the ``choices`` of its settings are checked before)."""

    def need(self, condition: bool, name: str, what: str) -> None:
        _need(self, condition, name, what)

    def need_score_filter(self) -> None:
        """``score_filter`` (the image score's mean filter): None or an odd int >= 1."""
        size = self.score_filter
        self.need(size is None or (size >= 1 and size % 2 == 1), "score_filter", "must be None or an odd int >= 1")

    def need_synthesis_settings(self) -> None:
        """The anomaly-synthesis fields of the methods that train on synthetic anomalies
        (``p_anomaly``, ``max_retries``, ``perlin_threshold``, ``source_pool_size``)."""
        self.need(0.0 <= self.p_anomaly <= 1.0, "p_anomaly", "must be in [0, 1]")
        self.need(isinstance(self.max_retries, int) and self.max_retries >= 0, "max_retries", "must be an int >= 0")
        self.need(0.0 <= self.perlin_threshold < 1.0, "perlin_threshold", "must be in [0, 1)")
        self.need(self.source_pool_size >= 1, "source_pool_size", "must be >= 1")

    def variant(self) -> str:
        """Short words for the switches that are on, e.g. ``"full, no ROI"`` ("" for none)."""
        return ""


def _to_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {where} config keys {unknown}; known keys: {sorted(known)}")
    typed = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            # tuples are written to JSON as lists
            typed[f.name] = tuple(value) if isinstance(f.default, tuple) and isinstance(value, list) else value
    return cls(**typed)


#: keys of format-1 (flat) configs that no longer exist; ignored when read back
_RETIRED_KEYS = frozenset({"extra"})


@dataclass
class Config:
    """A run's whole configuration: :class:`RunConfig` + the method's :class:`MethodConfig`."""

    run: RunConfig = field(default_factory=RunConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    #: how the model's inputs are made (None: a run saved before the record existed)
    preprocessing: Preprocessing | None = None

    def __post_init__(self) -> None:
        record = self.preprocessing
        if record is not None and (record.image_size != self.run.image_size
                                   or self.run.crop in ("liver", "none") and record.crop != self.run.crop):
            raise ValueError(f"config preprocessing (side {record.image_size}, crop {record.crop}) does not match "
                             f"the run (image_size {self.run.image_size}, crop {self.run.crop})")

    @property
    def method_name(self) -> str:
        return self.run.method

    def architecture(self) -> dict[str, Any]:
        """What decides the shapes of the weights: method, preset, side, the method's fields."""
        return {"method": self.run.method, "preset": self.run.preset, "image_size": self.run.image_size,
                **{name: getattr(self.method, name) for name in self.method.architecture_fields}}

    @property
    def variant(self) -> str:
        """e.g. ``"frequency_aware (full, no ROI)"`` or ``"ae"``: log lines and plot titles."""
        words = self.method.variant()
        return f"{self.run.method} ({words})" if words else self.run.method

    def to_dict(self) -> dict[str, Any]:
        return {"format": CONFIG_FORMAT, "method": self.run.method,
                "run": {k: _to_json(v) for k, v in dataclasses.asdict(self.run).items()},
                "method_config": {k: _to_json(v) for k, v in dataclasses.asdict(self.method).items()},
                **({"preprocessing": self.preprocessing.to_dict()} if self.preprocessing is not None else {})}

    @classmethod
    def from_dict(cls, values: dict[str, Any], method_config: Callable[[str], type[MethodConfig]]) -> Config:
        """Inverse of :meth:`to_dict`; also reads the flat dict of format 1 (one method).
        ``method_config``: a method's name -> its settings' dataclass, ``ValueError`` for an
        unknown name (:func:`medad_fast.methods.config_from_dict` passes the registry's)."""
        if "run" not in values:
            return cls._from_flat(values, method_config)
        # a run saved before cropping existed was trained on whole slices
        run = _from_dict(RunConfig, {"crop": "none", **values["run"]}, "run")
        record = values.get("preprocessing")
        return cls(run, _from_dict(method_config(run.method), values.get("method_config", {}), run.method),
                   None if record is None else Preprocessing.from_dict(record, "config preprocessing"))

    @classmethod
    def _from_flat(cls, values: dict[str, Any], method_config: Callable[[str], type[MethodConfig]]) -> Config:
        """Format 1: every field of the paper's method and of the run in one dict."""
        method_cls = method_config("frequency_aware")
        run_keys = {f.name for f in dataclasses.fields(RunConfig)}
        values = {k: v for k, v in values.items() if k not in _RETIRED_KEYS}
        run_values = {k: v for k, v in values.items() if k in run_keys}
        method_values = {k: v for k, v in values.items() if k not in run_keys}
        run_values.update(method="frequency_aware")
        run_values.setdefault("crop", "none")  # format 1 predates cropping: whole slices
        return cls(_from_dict(RunConfig, run_values, "run"), _from_dict(method_cls, method_values, "frequency_aware"))

    def replace(self, **changes: Any) -> Config:
        """A copy with fields of either part changed (each name belongs to one part)."""
        run_keys = {f.name for f in dataclasses.fields(self.run)}
        method_keys = {f.name for f in dataclasses.fields(self.method)}
        unknown = sorted(set(changes) - run_keys - method_keys)
        if unknown:
            raise ValueError(f"unknown config fields {unknown} for method {self.run.method!r}")
        run = dataclasses.replace(self.run, **{k: v for k, v in changes.items() if k in run_keys})
        method = dataclasses.replace(self.method, **{k: v for k, v in changes.items() if k in method_keys})
        return Config(run, method, self.preprocessing)

    def with_preprocessing(self, record: Preprocessing | None) -> Config:
        """A copy with the preprocessing record ``record``."""
        return dataclasses.replace(self, preprocessing=record)


def config_from_preset(method: str, preset: str, presets: Mapping[str, dict[str, Any]],
                       method_config: type[MethodConfig], overrides: Mapping[str, Any]) -> Config:
    """The config of ``method`` (whose settings' dataclass is ``method_config`` and whose
    presets are ``presets``) at ``preset`` with ``overrides`` (fields of either part; None
    values are ignored). ``ValueError`` names an unknown preset or field.
    :func:`medad_fast.methods.resolve_config` looks ``presets`` and ``method_config`` up by name."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for method {method!r}; choose one of "
                         f"{sorted(presets)}")
    values = {**presets[preset], **{k: v for k, v in overrides.items() if v is not None}}
    run_keys = {f.name for f in dataclasses.fields(RunConfig)} - {"method", "preset"}
    method_keys = {f.name for f in dataclasses.fields(method_config)}
    unknown = sorted(set(values) - run_keys - method_keys)
    if unknown:
        raise ValueError(f"method {method!r} has no setting {', '.join(unknown)}; its settings: "
                         f"{sorted(method_keys)}; run settings: {sorted(run_keys)}")
    run = _from_dict(RunConfig, {"method": method, "preset": preset,
                                 **{k: v for k, v in values.items() if k in run_keys}}, "run")
    return Config(run, _from_dict(method_config, {k: v for k, v in values.items() if k in method_keys}, method))
