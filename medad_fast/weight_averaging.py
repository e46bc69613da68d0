"""Weight averaging during training: an exponential moving average (EMA) of a method's
weights (``medad-fast train --ema DECAY``, ``RunConfig.ema``).

After every optimiser step the trainer updates (:meth:`ExponentialMovingAverage.update`)::

    average <- d_t * average + (1 - d_t) * weights           (torch._foreach_lerp_)
    d_t = min(decay, (1 + t) / (10 + t))                    (t = updates so far)

The first update (t = 0) copies the weights, as ``torch.optim.swa_utils.AveragedModel``
does, so the random initial weights are not in the average. ``d_t`` is the warm-up of
TensorFlow's ``tf.train.ExponentialMovingAverage(decay, num_updates=t)`` (timm's
``ModelEmaV3(use_warmup=True)`` warms up too, on another schedule): early in a run the average forgets quickly, and it
holds about the last ``1 / (1 - decay)`` steps once ``t`` is past ``9 / (1 - decay)``
(0.99: about 100 steps, from step 900 on; before that about the last ``(10 + t) / 9``).
Why: without it the first step's tensors keep the share ``decay ** (steps - 1)`` of the
average (12 % after 210 steps at 0.99), and a BatchNorm running variance starts at 1 while
the trained one can be 1e-5 (the first layer after the Butterworth high-pass); 12 % of the
start then makes the averaged variance 10^4 times too large, and the averaged network's
maps were noise (measured on the phantom's few-slices case: pixel AP 0.003 against 0.23 of
the last weights, the same run). With the warm-up the first step's share after ``t`` updates
is ``prod d_s``: 2e-12 after 100 updates, 4e-15 after 210 (:meth:`ExponentialMovingAverage.first_step_share`).

What is averaged (:func:`averaged_entries`), for every method alike: every parameter of the
method (all its networks), and the running statistics (``running_mean``, ``running_var``)
of its BatchNorm layers: the statistics are EMA'd with the weights, as
``AveragedModel(use_buffers=True)`` does, not recomputed on the training data as SWA's
``update_bn`` does. They are themselves a moving average (momentum 0.1) of the batch
statistics under the weights of the last steps; with a decay close to 1 the averaged
weights move slowly, so the averaged statistics fit them closely, and no pass over the
training data is needed at each validation and checkpoint. Every other buffer keeps its
live value: ``num_batches_tracked`` (a counter), and SQUID's memory queue (a FIFO of
encoded training features, not a learned weight: averaging a slot would blend the
features of the different patches written into it over time). Per method:

* ``frequency_aware``, ``draem``: the reconstruction and segmentation networks;
* ``ae``: the autoencoder, with its BatchNorm statistics;
* ``ddad``: both autoencoder ensembles and the refinement net. The stages train one at a
  time: during the autoencoder stage the refiner does not change, so its average stays at
  its initial weights until the refinement stage starts; during that stage the frozen
  autoencoders' average converges on their final weights (the residual share of their
  earlier weights decays as ``decay ** steps``), and the refiner, trained on the maps of
  the live autoencoders, scores with the averaged ones;
* ``squid``: every network, the discriminator included: SQUID's image score
  (``image_score = discriminator``, the default) is ``-D(I_s)``, so the discriminator
  scores too.

Several processes (DDP): the parameters are the same on every rank after each step (the
gradients are all-reduced), so their average is too. The BatchNorm statistics are not:
each rank's forward updates its own from its batch, and DDP makes rank 0's authoritative by
broadcasting them before the next forward. The trainer broadcasts the averaged statistics
from rank 0 just before each update (:meth:`ExponentialMovingAverage.update` with
``broadcast``), which changes nothing DDP would not overwrite, so every rank averages the
same values and holds the same average after every step.

Checkpoint (:meth:`ExponentialMovingAverage.state_dict`): the entry ``"ema"`` of the
trainer's checkpoint, ``{"decay", "updates", "weights": {state-dict name: tensor}}`` (the
averaged entries only); a resumed run restores it exactly, so it ends bitwise as an
uninterrupted one. A run without ``--ema`` has no such entry. Scoring:
:func:`averaged_state_dict` is the method's state dict with the averaged entries in place of
the live ones, which :func:`medad_fast.inference.load_method` loads (so ``evaluate``,
``predict``, ``export`` and ``compare`` score with the average), and the trainer's
synthetic validation scores with the average swapped in
(:meth:`ExponentialMovingAverage.applied`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from . import distributed

__all__ = ["EMA_KEY", "ExponentialMovingAverage", "averaged_entries", "averaged_state_dict", "scoring_weights"]

#: the checkpoint entry of the average (absent without ``--ema``)
EMA_KEY = "ema"
#: the running statistics of a normalisation layer that are averaged with the weights
_RUNNING_STATISTICS = ("running_mean", "running_var")


def averaged_entries(module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``module.state_dict()`` that the average covers (module docstring):
    every parameter and the running statistics of every BatchNorm (or InstanceNorm with
    running statistics) layer, by state-dict name, as the module's own tensors (in
    state-dict order)."""
    statistics = set()
    for prefix, layer in module.named_modules():
        # _NormBase: BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm (running_mean None unless tracked)
        if isinstance(layer, nn.modules.batchnorm._NormBase) and layer.running_mean is not None:
            statistics.update(f"{prefix}.{name}" if prefix else name for name in _RUNNING_STATISTICS)
    parameters = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return {name: tensor for name, tensor in module.state_dict(keep_vars=True).items()
            if name in parameters or name in statistics}


class ExponentialMovingAverage:
    """The EMA of ``module``'s :func:`averaged_entries` (module docstring).

    Args:
        module: the method (its tensors are read at every update and written only inside
            :meth:`applied`).
        decay: in (0, 1); ``ValueError`` naming ``ema`` otherwise.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"ema (--ema) must be a decay in (0, 1), e.g. 0.999; got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self._sources = averaged_entries(module)
        # the running statistics: what DDP broadcasts from rank 0 (module docstring)
        self._statistics = [t for name, t in self._sources.items() if name.rsplit(".", 1)[-1] in _RUNNING_STATISTICS]
        self.weights: dict[str, torch.Tensor] = {name: t.detach().clone() for name, t in self._sources.items()}

    @property
    def horizon(self) -> float:
        """About how many of the last steps the average holds once warmed up: ``1 / (1 - decay)``."""
        return 1.0 / (1.0 - self.decay)

    def decay_at(self, update: int) -> float:
        """The decay of update number ``update`` (0: the first, which copies):
        ``min(decay, (1 + update) / (10 + update))`` (module docstring)."""
        return min(self.decay, (1.0 + update) / (10.0 + update))

    @property
    def warm_after(self) -> int:
        """The first update whose decay is :attr:`decay` (the warm-up's end)."""
        # (1 + t) / (10 + t) >= decay from t = (10 decay - 1) / (1 - decay) on (less rounding)
        return max(1, math.ceil((10.0 * self.decay - 1.0) / (1.0 - self.decay) - 1e-9))

    @torch.no_grad()
    def update(self, broadcast: bool = False) -> None:
        """Average the module's current weights in (the first update copies them).
        ``broadcast``: first make every rank's running statistics rank 0's (a collective:
        call it on every rank; DDP training)."""
        if broadcast:
            distributed.broadcast_tensors_(self._statistics)
        live = [t.detach() for t in self._sources.values()]
        average = list(self.weights.values())
        if self.updates == 0:
            torch._foreach_copy_(average, live)
        else:
            torch._foreach_lerp_(average, live, 1.0 - self.decay_at(self.updates))
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the module's current weights (no update counted)."""
        torch._foreach_copy_(list(self.weights.values()), [t.detach() for t in self._sources.values()])
        self.updates = 0

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within: the module holds the averaged weights; afterwards exactly its own again."""
        live = [t.detach() for t in self._sources.values()]
        with torch.no_grad():
            saved = [t.clone() for t in live]
            torch._foreach_copy_(live, list(self.weights.values()))
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entry (tensors and plain values: loads with ``weights_only=True``)."""
        return {"decay": self.decay, "updates": self.updates,
                "weights": {name: t.contiguous() for name, t in self.weights.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the decay stays this average's: the run's setting);
        ``ValueError`` when the saved entries are not this module's."""
        saved = state["weights"]
        if saved.keys() != self.weights.keys():
            missing, unexpected = sorted(self.weights.keys() - saved.keys()), sorted(saved.keys() - self.weights.keys())
            raise ValueError(f"the checkpoint's EMA weights do not fit the method (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        for name, tensor in self.weights.items():
            tensor.copy_(saved[name])
        self.updates = int(state["updates"])

    def first_step_share(self, steps: int) -> float:
        """The share of the first step's weights in the average after ``steps`` updates:
        the product of the decays of updates 1 .. steps - 1."""
        share = 1.0
        for update in range(1, steps):
            share *= self.decay_at(update)
            if share < 1e-300:  # stays 0 in floating point
                return 0.0
        return share


def averaged_state_dict(model: Mapping[str, torch.Tensor], ema: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A method's state dict ``model`` (a checkpoint's ``"model"``) with the entries of the
    checkpoint's ``"ema"`` entry in place of the live ones; ``ValueError`` for an entry the
    model does not have."""
    weights = ema["weights"]
    unknown = sorted(set(weights) - set(model))
    if unknown:
        raise ValueError(f"the checkpoint's EMA weights name entries its model does not have: {unknown[:5]}")
    return {**model, **weights}


def scoring_weights(checkpoint: Mapping[str, Any]) -> str:
    """Which weights a checkpoint scores with: ``"ema"`` (it holds an average) or ``"last"``."""
    return "ema" if checkpoint.get(EMA_KEY) else "last"
