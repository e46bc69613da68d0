"""Resolved training / model configuration, presets and ablation switches.

One flat dataclass, :class:`Config`, holds everything a run needs; it is written to the run
directory as JSON and stored in every checkpoint, so a checkpoint alone rebuilds its model.
A preset fills the defaults; command-line options override single fields.

Presets:

* ``paper``: the paper's setting (DESIGN §1): recon width 128, seg width 64, 256 x 256,
  batch 8, 230 epochs, alpha decay over 20 epochs, Adam lr 1e-4.
* ``small``: sized for a 2-core CPU (the demo and the end-to-end tests): widths 16/16 at
  96 x 96, a 3-pool segmentation U-Net, 70 epochs at lr 1e-3, alpha decaying over 140
  epochs; set so that ``make demo`` trains in about 9 minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Config", "PRESETS", "MODES", "preset_config"]

#: what the model trains and scores with
MODES = ("full", "recon_only", "seg_only")


@dataclass
class Config:
    """Every setting of a run. Field names are the JSON keys of ``config.json``."""

    preset: str = "paper"
    # data / model size
    image_size: int = 256
    recon_width: int = 128
    seg_width: int = 64
    seg_depth: int = 5  # max-pools of the segmentation U-Net (DRAEM's discriminative: 5)
    # optimisation (DESIGN §1.5)
    batch_size: int = 8
    epochs: int = 230
    lr: float = 1e-4
    lr_milestones: tuple[float, ...] = (0.8, 0.9)  # fractions of the epochs
    lr_gamma: float = 0.2
    alpha_decay_epochs: float = 20.0
    ssim_weight: float = 1.0  # lambda of L_rec
    focal_gamma: float = 2.0
    # anomaly synthesis (DESIGN §1.1)
    synthesis: bool = True
    p_anomaly: float = 0.5
    max_retries: int = 10
    perlin_threshold: float = 0.5
    roi: bool = True  # liver localisation M_L = I > roi_threshold
    roi_threshold: float = 0.0
    source_pool_size: int = 256  # anomaly-source images kept on the device
    # Break module (DESIGN §1.2)
    highpass: bool = True
    d0: float = 30.0  # cut-off at 256 x 256, scaled with the side
    butterworth_order: int = 2
    # which sub-networks train and score
    mode: str = "full"
    # image score: max of a mean filter of this size over the pixel map; None: DRAEM's 21 at
    # 256 x 256, scaled with the side like d0 (see effective_score_filter)
    score_filter: int | None = None
    # runtime
    seed: int = 0
    max_train_images: int | None = None
    checkpoint_every: int = 1  # epochs
    reference_ops: bool = False
    amp: bool = True  # only takes effect on CUDA
    channels_last: bool = True  # memory format of the activations (CPU and CUDA)
    anomaly_source: str | None = None
    data: str | None = None

    def __post_init__(self) -> None:
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any value the method cannot run with."""
        def need(condition: bool, name: str, what: str) -> None:
            if not condition:
                raise ValueError(f"config {name}={getattr(self, name)!r}: {what}")

        need(self.preset in PRESETS or self.preset == "custom", "preset",
             f"must be one of {sorted(PRESETS)} (or 'custom')")
        need(isinstance(self.image_size, int) and self.image_size >= 8, "image_size", "must be an int >= 8")
        need(self.recon_width >= 1, "recon_width", "must be >= 1")
        need(self.seg_width >= 1, "seg_width", "must be >= 1")
        need(isinstance(self.seg_depth, int) and 1 <= self.seg_depth <= 8, "seg_depth", "must be an int in 1..8")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a finite number > 0")
        need(all(0.0 < m <= 1.0 for m in self.lr_milestones), "lr_milestones", "fractions in (0, 1]")
        need(0.0 < self.lr_gamma <= 1.0, "lr_gamma", "must be in (0, 1]")
        need(self.alpha_decay_epochs >= 0, "alpha_decay_epochs", "must be >= 0")
        need(self.ssim_weight >= 0, "ssim_weight", "must be >= 0")
        need(self.focal_gamma >= 0, "focal_gamma", "must be >= 0")
        need(0.0 <= self.p_anomaly <= 1.0, "p_anomaly", "must be in [0, 1]")
        need(self.max_retries >= 0, "max_retries", "must be >= 0")
        need(self.source_pool_size >= 1, "source_pool_size", "must be >= 1")
        need(self.d0 > 0, "d0", "must be > 0")
        need(isinstance(self.butterworth_order, int) and self.butterworth_order >= 1,
             "butterworth_order", "must be an int >= 1")
        need(self.mode in MODES, "mode", f"must be one of {MODES}")
        need(self.score_filter is None or (self.score_filter >= 1 and self.score_filter % 2 == 1),
             "score_filter", "must be None or an odd int >= 1")
        need(self.max_train_images is None or self.max_train_images >= 1, "max_train_images", "must be >= 1")
        need(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")

    # ------------------------------------------------------------ derived values
    @property
    def effective_roi_threshold(self) -> float:
        """``roi_threshold``, or ``-inf`` (every pixel is "liver") with ``roi`` off."""
        return self.roi_threshold if self.roi else -math.inf

    @property
    def effective_score_filter(self) -> int:
        """Side of the mean filter of the image score: ``score_filter``, or DRAEM's 21 at
        256 x 256 scaled with the image side and made odd (128 -> 11, 96 -> 9, 64 -> 5), so
        the window covers the same fraction of the slice at every training size."""
        if self.score_filter is not None:
            return self.score_filter
        return max(1, int(round(21 * self.image_size / 256)) | 1)

    @property
    def variant(self) -> str:
        """The mode and the ablation switches that are on, e.g. ``"full, no ROI"``."""
        ablated = [name for name, on in (("no ROI", self.roi), ("no high-pass", self.highpass),
                                         ("no synthesis", self.synthesis)) if not on]
        return ", ".join([self.mode, *ablated])

    def architecture(self) -> dict[str, Any]:
        """The fields that decide the shapes of the weights: a checkpoint only loads into a
        model whose architecture matches."""
        return {"preset": self.preset, "image_size": self.image_size, "recon_width": self.recon_width,
                "seg_width": self.seg_width, "seg_depth": self.seg_depth, "mode": self.mode}

    # ------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lr_milestones"] = list(self.lr_milestones)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in values.items() if k not in _RETIRED_KEYS}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


#: keys older versions wrote into config.json / checkpoints; ignored when read back
_RETIRED_KEYS = frozenset({"extra"})

#: preset name -> field overrides of the dataclass defaults (which are the paper's)
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "small": {
        # measured on a 2-core CPU (see scripts/demo.sh): ~0.3 s per step of 8 slices
        "image_size": 96,
        "recon_width": 16,
        "seg_width": 16,
        "seg_depth": 3,  # bottleneck 12 x 12: a 96-pixel slice keeps its localisation
        "batch_size": 8,
        "epochs": 70,
        "lr": 1e-3,  # short schedule: 10x the paper's lr (Adam, still decayed at 80 / 90 %)
        # alpha only reaches 0.5 by the end: in a short run the deep decoder path cannot
        # take over the localisation from the encoder skips (measured: alpha -> 0 early
        # costs most of the pixel AP: with 20 epochs the demo gives image/pixel AUROC
        # 0.781/0.937, pixel AP 0.277, against 0.950/0.975, 0.663 with 140)
        "alpha_decay_epochs": 140.0,
        "source_pool_size": 64,
    },
}


def preset_config(name: str, **overrides: Any) -> Config:
    """The config of preset ``name`` with ``overrides`` (fields set to None are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values: dict[str, Any] = {"preset": name, **PRESETS[name]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Config.from_dict(values)
