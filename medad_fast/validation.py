"""Model selection without labels (``--val-fraction``): a synthetic validation set made from
held-back normal training slices.

Real CT data for this task has normal slices but no labelled lesions to validate on. So a
fraction of the normal training slices is held back (not trained on) and turned into a
validation set whose "lesions" are synthetic:

* every held-back slice appears once as it is (normal, empty mask) and
  :data:`VALIDATION_DRAWS` times with a synthetic anomaly (each its own draw and mask). The
  copies make the image AUROC a paired comparison (does the score of the same slices rise
  when an anomaly is added?), with a handful of held-back slices no slice is spent on one
  class only, and the several draws per slice keep the score from swinging with a single
  anomaly's shape and opacity (with 6 held-back slices and one draw each, the score of a
  24-slice run moved by noise alone, and the "best" epoch with it);
* the anomalies come from the package's liver-aware synthesis
  (:class:`~medad_fast.synthesis.AnomalySynthesizer`, the fused
  :func:`~medad_fast.ops.synthesize_anomalies` restricted to the liver ``image > 0``), as the
  frequency-aware method makes its training anomalies: Perlin-shaped blends of an anomaly
  source (the run's ``--anomaly-source`` images, else Perlin textures) with opacity in
  [0.1, 1);
* they are made ONCE, on the CPU, from generators seeded by the run's seed (never the
  training generators), so the set is the same at every epoch and after every resume, and
  a run with and one without ``--augment`` validate on the same set.

Each epoch the method's :meth:`~medad_fast.methods.base.Method.predict` scores the set:
``val_pixel_ap`` (average precision of the pixel maps against the synthetic masks, every
pixel of both copies, as ``medad-fast evaluate`` counts pixels), ``val_image_auroc`` (normal
vs anomalous copies) and their mean, ``val_score``, which selects the best checkpoint
(``checkpoint-best.pt``) and drives early stopping (``--patience``).

Caveat: the validation anomalies are of the kind the synthesis-based methods train on, so
the score measures how well a method finds synthetic anomalies in unseen livers, not real
lesions; it is a proxy for selecting epochs, not a test result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config
from .data.sources import anomaly_source_pool
from .metrics import average_precision, roc_auc
from .synthesis import AnomalySynthesizer

__all__ = ["VALIDATION_SEED_OFFSET", "VALIDATION_DRAWS", "held_back_count", "held_back_mask", "split_validation",
           "SyntheticValidationSet", "ValidationState"]

#: added to the run's seed for the validation generators: the held-back choice and the
#: anomalies never share a stream with the training generators (seed, seed + 1, seed + 2)
VALIDATION_SEED_OFFSET = 7_919
#: redraws of an anomaly whose Perlin blob missed the liver (the training synthesis uses 10)
VALIDATION_MAX_RETRIES = 100
#: anomalous copies of every held-back slice (each a separate draw)
VALIDATION_DRAWS = 4


def held_back_count(n_images: int, val_fraction: float) -> int:
    """How many of ``n_images`` normal slices ``val_fraction`` holds back: ``round(f N)``,
    at least 1 when ``f > 0``; ``ValueError`` naming ``--val-fraction`` when none would be
    left to train on."""
    if val_fraction <= 0:
        return 0
    n_held = max(1, int(math.floor(val_fraction * n_images + 0.5)))
    if n_held >= n_images:
        raise ValueError(f"val_fraction (--val-fraction) {val_fraction} of {n_images} training slices holds back "
                         f"{n_held} and leaves none to train on; lower it or add training slices")
    return n_held


def held_back_mask(n_images: int, val_fraction: float, seed: int) -> torch.Tensor:
    """bool ``[n_images]``: True for the slices ``val_fraction`` holds back, a random subset
    (:func:`held_back_count` of them) drawn from ``seed + VALIDATION_SEED_OFFSET``. An index
    operation: the trainer selects by it before reading any pixel (a DDP rank reads only its
    share, :mod:`medad_fast.data.training_slices`)."""
    held = torch.zeros(n_images, dtype=torch.bool)
    n_held = held_back_count(n_images, val_fraction)
    if n_held:
        order = torch.randperm(n_images, generator=torch.Generator().manual_seed(seed + VALIDATION_SEED_OFFSET))
        held[order[:n_held]] = True
    return held


def split_validation(images: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [N - n, 1, S, S], held_back [n, 1, S, S])`` of ``images`` (uint8 normal
    slices), split by :func:`held_back_mask`; both keep the original order."""
    if held_back_count(images.shape[0], val_fraction) == 0:
        return images, images[:0]
    held = held_back_mask(images.shape[0], val_fraction, seed)
    return images[~held], images[held]


@dataclass
class SyntheticValidationSet:
    """The validation slices (module docstring), on one device.

    images: float32 ``[(1 + D) n, 1, S, S]`` in [0, 1]: the n held-back slices, then
            D = :data:`VALIDATION_DRAWS` times the same n, each with a synthetic anomaly
            (copy ``d`` of slice ``i`` at ``n + d n + i``)
    masks:  bool ``[(1 + D) n, S, S]``, the synthetic anomalies (empty for the first n)
    labels: bool ``[(1 + D) n]``, True where the mask is not empty
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def build(cls, held_back: torch.Tensor, config: Config) -> SyntheticValidationSet:
        """The set of ``held_back`` (uint8 ``[n, 1, S, S]``, n >= 1), on the CPU, from
        generators seeded by ``config.run.seed`` only."""
        if held_back.dim() != 4 or held_back.shape[1] != 1 or held_back.shape[0] < 1:
            raise ValueError(f"held_back must be uint8 [n >= 1, 1, S, S]; got {list(held_back.shape)}")
        normal = held_back.float().div(255.0)
        n = normal.shape[0]
        run = config.run
        sources = anomaly_source_pool(run.anomaly_source, run.image_size, n, run.seed + VALIDATION_SEED_OFFSET + 1)
        synthesizer = AnomalySynthesizer(sources.float(), p_anomaly=1.0,
                                         max_retries=VALIDATION_MAX_RETRIES, roi_threshold=0.0)
        generator = torch.Generator().manual_seed(config.run.seed + VALIDATION_SEED_OFFSET + 2)
        anomalous, mask = synthesizer(normal.repeat(VALIDATION_DRAWS, 1, 1, 1), generator)
        images = torch.cat([normal, anomalous])
        masks = torch.cat([mask.new_zeros(n, *mask.shape[1:]), mask])[:, 0] > 0
        labels = masks.flatten(1).any(dim=1)
        if not bool(labels.any()):
            raise ValueError("the synthetic validation set holds no anomaly (no held-back slice has a liver "
                             "the synthesis could reach); raise --val-fraction")
        return cls(images, masks, labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> SyntheticValidationSet:
        return SyntheticValidationSet(self.images.to(device), self.masks.to(device), self.labels.to(device))

    @torch.no_grad()
    def score(self, method: Any, batch_size: int = 16) -> dict[str, float]:
        """``{"val_pixel_ap", "val_image_auroc", "val_score"}`` of ``method`` (any
        :class:`~medad_fast.methods.base.Method`; scored in eval mode, its mode restored)."""
        from .inference import score_images

        maps, scores = score_images(method, self.images, batch_size, device=self.images.device)
        masks, labels = self.masks.cpu().numpy(), self.labels.cpu().numpy()
        pixel_ap = average_precision(masks, maps.numpy())
        image_auroc = roc_auc(labels, scores.numpy()) if not labels.all() else float("nan")
        return {"val_pixel_ap": pixel_ap, "val_image_auroc": image_auroc,
                "val_score": 0.5 * (pixel_ap + image_auroc)}


@dataclass
class ValidationState:
    """What a run remembers of its validation (saved in every checkpoint): the best score so
    far, its epoch, the epochs since, and whether early stopping ended the run."""

    best_score: float | None = None
    best_epoch: int = 0
    epochs_since_best: int = 0
    stopped_early: bool = False

    def update(self, score: float, epoch: int, patience: int | None, last_epoch: int) -> bool:
        """Account for epoch ``epoch``'s score; True when it is the best so far (strictly
        better; a non-finite score never is). Sets ``stopped_early`` once ``patience``
        epochs passed without a better score (before the last epoch)."""
        improved = math.isfinite(score) and (self.best_score is None or score > self.best_score)
        if improved:
            self.best_score, self.best_epoch, self.epochs_since_best = float(score), int(epoch), 0
        else:
            self.epochs_since_best += 1
        if patience is not None and self.epochs_since_best >= patience and epoch < last_epoch:
            self.stopped_early = True
        return improved

    def to_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch,
                "epochs_since_best": self.epochs_since_best, "stopped_early": self.stopped_early}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ValidationState:
        values = values or {}
        best = values.get("best_score")
        return cls(None if best is None else float(best), int(values.get("best_epoch", 0)),
                   int(values.get("epochs_since_best", 0)), bool(values.get("stopped_early", False)))
