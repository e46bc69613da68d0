"""The interface every method implements, and what the engine does with it.

A method is an ``nn.Module`` (its networks are sub-modules, so ``state_dict``, ``.to()``,
DDP and ``channels_last`` work on it as on any model) that says, and only says:

=========================  =================================================================
``name``, ``summary``      registry name and one line for ``medad-fast methods``
``Config``                 its own settings: a :class:`~medad_fast.config.MethodConfig` dataclass
``presets``                ``paper`` / ``small`` / ``tiny``: overrides of the run's and its own fields
``training_data()``        the data it needs beyond the trainer's batches, by name: the whole
                           normal pool (:class:`NormalImages`), an unlabeled pool
                           (:class:`UnlabeledImages`); the engine reads them
``attach_training_data``   the engine hands them over (before ``setup_training``)
``setup_training(device)``  what training needs beyond the weights (anomaly sources, queues...)
``configure_optimizers()``  its optimisers and per-epoch lr schedulers
``on_train_step(step, n)``  per-iteration hook before each step (e.g. the alpha schedule)
``forward(images, gen)``    ONE training step's loss from a batch of normal images
                           ``float [B, 1, H, W]`` in [0, 1] and a ``torch.Generator`` on the
                           training device (all its randomness); returns ``(loss, terms)``,
                           ``terms`` a dict of detached scalar tensors logged as they are named
``predict(images)``         ``(maps [B, H, W], scores [B])`` float32, in eval mode, no grad
``map_image_scores(maps)``  the image scores of maps ``[B, H, W]`` by the method's rule, or None
                           when its image score is not a function of its map (SQUID's
                           discriminator); seed ensembles score their mean map with it
``method_state()``          extra state to checkpoint beyond parameters and buffers
``log_values()``            plain numbers for the log (e.g. ``alpha``)
``compile_fullgraph``       False when ``--compile`` cannot trace a network as one graph
``compile_training``        False when ``train --compile`` must train eager (with the reason)
``uses_anomaly_sources``    True when training blends anomaly-source images (``run.anomaly_source``,
                           :func:`~medad_fast.data.sources.training_sources`) into its inputs
``find_unused_parameters``  True when a step may leave some parameters without a gradient
                           (staged training: DDAD's autoencoders, then its refinement net);
                           passed to ``DistributedDataParallel``
=========================  =================================================================

The training step is ``forward`` so that ``DistributedDataParallel(method)(images, gen)``
synchronises the gradients; the engine (:class:`medad_fast.train.Trainer`) owns the
loop, devices, mixed precision, optimiser steps, checkpoints and logging. Mixed precision
is the method's to apply where it is safe: the engine sets :meth:`configure_runtime` and
the method wraps its network calls in :meth:`autocast` (losses stay in float32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import nn

from ..config import Config, MethodConfig
from ..models.scoring import image_scores, score_filter_size
from ..runtime import amp_dtype

__all__ = ["Method", "NormalImages", "TrainingData", "UnlabeledImages", "image_scores", "score_filter_size"]


@dataclass(frozen=True)
class NormalImages:
    """A method's need for the run's normal training images, every one of them on every rank
    (``uint8 [N, 1, S, S]`` on the device): for a method that draws its own orders of the data
    (DDAD's members). Without it, a DDP rank holds only the images of its own batches."""


@dataclass(frozen=True)
class UnlabeledImages:
    """A method's need for unlabeled slices (labels never read; ``uint8 [M, 1, S, S]``, or
    None when none is configured): the images of ``folder`` (``--unlabeled``), of the
    ``split`` split of the run's data (``--unlabeled-split``) and, with ``data_json``, the
    ``train["unlabeled"]`` pool of a ``data.json`` dataset; read by the engine
    (:func:`medad_fast.data.unlabeled.load_unlabeled_pool`)."""

    folder: str | None = None
    split: str | None = None
    data_json: bool = False


#: what :meth:`Method.training_data` may ask for
TrainingData = Union[NormalImages, UnlabeledImages]


class Method(nn.Module):
    """Base class of the methods (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    find_unused_parameters: ClassVar[bool] = False
    #: training draws on the run's anomaly sources (``--anomaly-source``, else Perlin textures)
    uses_anomaly_sources: ClassVar[bool] = False
    #: ``--compile`` compiles each network as one graph (``fullgraph``); False for a method
    #: whose networks cannot be (then dynamo splits them where it must)
    compile_fullgraph: ClassVar[bool] = True
    #: ``train --compile`` compiles the networks for training; a method whose compiled
    #: training is known to fail sets this False and ``compile_training_note`` to why
    #: (training then runs eager with a warning; inference still compiles)
    compile_training: ClassVar[bool] = True
    compile_training_note: ClassVar[str] = ""

    def __init__(self, config: Config) -> None:
        super().__init__()
        if not isinstance(config.method, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}; got {type(config.method).__name__}")
        self.config = config
        self._device_type = "cpu"
        self._amp_dtype: torch.dtype | None = None
        self.memory_format = torch.contiguous_format

    # ------------------------------------------------------------------ runtime
    def configure_runtime(self, device: torch.device, amp: bool, channels_last: bool) -> Method:
        """Mixed precision (CUDA only) and the memory format of the activations (inputs are
        handed to the networks in it: :meth:`to_memory_format`); moves the method to
        ``device``. The weights keep their layout: the trainer converts them for training,
        inference leaves them as loaded (so scores do not depend on the layout of the
        weights, and checkpoints of earlier versions score exactly as they did). Returns self."""
        self._device_type = device.type
        self._amp_dtype = amp_dtype(device, amp)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return self.to(device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the networks' forward passes (a no-op without it)."""
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device_type, dtype=self._amp_dtype)

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` in the activations' memory format."""
        return x.contiguous(memory_format=self.memory_format)

    @property
    def score_filter(self) -> int:
        """Side of the image score's mean filter (:func:`score_filter_size`)."""
        return score_filter_size(self.config.run.image_size, getattr(self.config.method, "score_filter", None))

    # ------------------------------------------------------------------ training
    def training_data(self) -> dict[str, TrainingData]:
        """The data training needs beyond the trainer's batches, by name (e.g. ``{"normal":
        NormalImages(), "unlabeled": UnlabeledImages(folder=...)}``); the engine reads each
        and hands them to :meth:`attach_training_data`. Default: none."""
        return {}

    def attach_training_data(self, data: dict[str, torch.Tensor | None]) -> None:
        """Called by the engine, before :meth:`setup_training`, with what
        :meth:`training_data` declared, under the same names: uint8 ``[N, 1, S, S]`` images
        (the normal ones on the training device), None for an unlabeled pool nothing was
        configured for (or when driven outside the trainer). Default: ignored."""

    def setup_training(self, device: torch.device) -> None:
        """Prepare what training needs beyond the weights (called once, after the weights
        are on ``device`` and before the first step). Default: nothing."""

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Optimisers (stepped every iteration) and lr schedulers (stepped every epoch).
        Default: Adam over all parameters at the run's lr, no schedule."""
        return [torch.optim.Adam(self.parameters(), lr=self.config.run.lr)], []

    def on_train_step(self, step: int, steps_per_epoch: int) -> None:
        """Called before training iteration ``step`` (0-based, counted over the whole run)."""

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} does not define its training step (forward)")

    def log_values(self) -> dict[str, float]:
        """Plain numbers added to every epoch's log record."""
        return {}

    # ------------------------------------------------------------------ inference
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel anomaly maps ``float32 [B, H, W]`` of test images ``[B, 1, H, W]`` in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} does not define anomaly_maps")

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps float32 [B, H, W], scores float32 [B])`` of test images ``[B, 1, H, W]``
        in [0, 1], in eval mode (the mode is restored afterwards). Image score:
        :meth:`map_image_scores` of the map."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
        was_training = self.training
        self.eval()
        try:
            maps = self.anomaly_maps(images).float()
        finally:
            self.train(was_training)
        return maps, self.map_image_scores(maps)

    def map_image_scores(self, maps: torch.Tensor) -> torch.Tensor | None:
        """The image scores ``float32 [B]`` of pixel maps ``[B, H, W]`` by this method's
        rule; None when its image score is not a function of its map (then a seed ensemble,
        :mod:`medad_fast.ensemble`, averages its members' image scores instead). Default:
        max of the mean-filtered map (:func:`image_scores`)."""
        return image_scores(maps, self.score_filter)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        """Extra state to checkpoint (tensors and plain values). Default: none."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`method_state`."""
