"""Training schedules: the skip weight ``alpha`` and the learning-rate milestones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["alpha_at", "lr_milestone_epochs", "adam_with_milestones"]


def alpha_at(step: int, steps_per_epoch: int, alpha_decay_epochs: float) -> float:
    """Skip weight ``alpha`` before iteration ``step`` (0-based): the paper's linear per-iteration decay.

    ``alpha`` starts at 1 and decays linearly per iteration to 0 over
    ``alpha_decay_epochs * steps_per_epoch`` iterations, then stays 0:
    ``alpha = max(0, 1 - step / decay_steps)``. ``alpha_decay_epochs = 0`` gives 0 from the
    start (plain decoder features, no encoder skip).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1; got {steps_per_epoch}")
    if alpha_decay_epochs < 0:
        raise ValueError(f"alpha_decay_epochs must be >= 0; got {alpha_decay_epochs}")
    decay_steps = alpha_decay_epochs * steps_per_epoch
    if decay_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / decay_steps)


def lr_milestone_epochs(epochs: int, fractions: tuple[float, ...] = (0.8, 0.9)) -> list[int]:
    """Epochs at which MultiStepLR multiplies the lr by gamma (DRAEM: 80 % and 90 % of the
    epochs), for a scheduler stepped once per epoch. Sorted, de-duplicated, each >= 1."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    return sorted({max(1, int(epochs * f)) for f in fractions})


def adam_with_milestones(parameters: Iterable[torch.nn.Parameter], lr: float, epochs: int,
                         fractions: tuple[float, ...] = (0.8, 0.9), gamma: float = 0.2
                         ) -> tuple[list[torch.optim.Optimizer], list[Any]]:
    """DRAEM's optimisation: Adam at ``lr``, multiplied by ``gamma`` at ``fractions`` of the
    epochs (MultiStepLR stepped once per epoch). Returns ``([optimizer], [scheduler])``."""
    optimizer = torch.optim.Adam(parameters, lr=lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestone_epochs(epochs, fractions), gamma=gamma)
    return [optimizer], [scheduler]
