"""`medad-fast train`: train a method on the normal slices of a BMAD-layout folder.

The engine (:class:`Trainer`) is the same for every method; it knows a method only through
the interface of :mod:`medad_fast.methods.base`. One training step, all on the device:

1. a batch of normal images (uint8 tensors kept on the device, shuffled by a seeded
   generator; with ``--crop liver`` each cut to its volume's liver box before the resize,
   :mod:`medad_fast.data.crop`) -> float in [0, 1]; with ``--augment`` randomly flipped, rotated, scaled and
   intensity-jittered (:mod:`medad_fast.augment`, drawn from the step generator); in the
   activations' memory format;
2. the method's per-step hook (e.g. the alpha schedule), then its ``forward(images,
   generator)``: the loss and a dict of loss terms (anomaly synthesis, networks, losses:
   the method's business; all its randomness comes from the step generator);
3. a non-finite loss stops the run; backward; every optimiser steps. The loss terms are
   summed on the device and read back once per epoch;
4. with ``--ema DECAY``, the exponential moving average of the weights is updated
   (:mod:`medad_fast.weight_averaging`: every network's parameters and BatchNorm
   statistics). It is saved in every checkpoint (``"ema"``) and restored on resume, the
   validation below scores with it, and so do evaluate, predict and export.

The normal slices are listed by index (:mod:`medad_fast.data.training_slices`) after the run
folder is checked to be writable; slices without liver (all black) are refused, or left out
with ``--skip-empty-slices`` (one warning saying how many), and the ``--max-train-images``
subset and the ``--val-fraction`` held-back slices are chosen by index
(:func:`select_training_slices`). One process then reads every slice once (cached:
:func:`~medad_fast.data.bmad.load_split`). Under torchrun a rank reads only what it trains
on: at the start of every epoch (and of a resumed one) the images of its own batches
(:meth:`Trainer.hold`: about N / world, those it already held kept), plus the held-back
slices; the empty-slice check reads 1/world of the slices on each rank. A method that draws
its own orders of the whole pool (DDAD) declares it needs every image
(:class:`~medad_fast.methods.base.NormalImages`) and every rank then reads them all.

A method declares the data it needs beyond the batches (:meth:`Method.training_data`:
the whole normal pool, an unlabeled pool); the engine reads it and hands it over
(:func:`supply_training_data`; the unlabeled pool: :mod:`medad_fast.data.unlabeled`).

With ``--val-fraction F`` a fraction F of the normal slices is held back (not trained on)
and made, once, into a synthetic validation set (:mod:`medad_fast.validation`); after every
epoch the method scores it (with ``--ema``: its averaged weights; ``val_pixel_ap``,
``val_image_auroc``, their mean ``val_score``, in the log), the epoch with the best
``val_score`` is kept as ``checkpoint-best.pt``, and ``--patience P`` stops the run after P
epochs without a better score.

Run directory (``--out``)::

    config.json               the resolved configuration (method, run part, method part, preprocessing
                              record: :mod:`medad_fast.preprocessing`)
    log.jsonl                 one JSON record per epoch: losses, the method's values
                              (e.g. alpha), lr, images/s, seconds
    checkpoint-eE-sS.pt       the last ``--keep-checkpoints`` checkpoints (atomic, fsynced;
                              weights, method state, optimisers, schedulers, scaler, epoch,
                              step, the position inside an interrupted epoch, every
                              generator's state on every rank, config; with ``--ema`` the
                              average of the weights), see
                              :mod:`medad_fast.checkpoint`; written every
                              ``--checkpoint-every`` epochs and/or after
                              ``--checkpoint-minutes`` (default 10), and at the end
    checkpoint.pt             the newest of them: what evaluate and predict read without
                              a validation set
    checkpoint-best.pt        with ``--val-fraction``: the checkpoint of the epoch with the
                              best validation score (a hard link to its numbered checkpoint,
                              which is written when the score improves; pruning keeps it);
                              what evaluate and predict read when it exists

Everything written goes through :class:`RunDirectory`, whose writes only happen on the
main process (rank 0).

Several processes (``torchrun --nproc_per_node N -m medad_fast.cli train ...``, see
:mod:`medad_fast.distributed`): the method is wrapped in ``DistributedDataParallel``, every
rank draws the same epoch permutation and trains on its own strided share of it
(``DistributedSampler(drop_last=True)``: ``N // world`` images per rank and epoch, batch
``batch_size`` per rank; only those are held in its memory), and the step generator is
seeded per rank, so the ranks draw different anomalies. Logged losses are the mean over the
ranks.

Faults: a non-finite loss stops the run before the optimiser step (on every rank) with the
step named; the checkpoints on disk are the last good ones. SIGINT/SIGTERM set a flag that
is checked after every step: the run then writes a checkpoint of its exact position inside
the epoch and exits (a second Ctrl-C stops at once). ``--resume`` continues from the newest
readable checkpoint; with ``--deterministic`` a resumed run ends in the same weights as an
uninterrupted one (bitwise on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, ops
from .augment import NormalSliceAugmentation
from .checkpoint import (BEST_NAME, DEFAULT_KEEP, LATEST_NAME, global_rng_states, latest_valid_checkpoint,
                         list_checkpoints, point_best_checkpoint, restore_global_rng_states, save_checkpoint)
from .config import Config, RunConfig
from .data.crop import CropChoice, choose_crop, crops_liver
from .data.training_slices import TrainingSlices
from .data.unlabeled import load_unlabeled_pool
from .preprocessing import decide_preprocessing
from .distributed import DistributedContext, is_main_process
from .io import atomic_write_json, atomic_write_text, check_writable_folder
from .methods import Method, create_method
from .methods.base import NormalImages, UnlabeledImages
from .runtime import compile_networks, deterministic_mode, needs_grad_scaler, ops_mode, resolve_device
from .validation import SyntheticValidationSet, ValidationState, held_back_mask
from .weight_averaging import EMA_KEY, ExponentialMovingAverage

__all__ = ["RunDirectory", "TrainState", "Trainer", "TrainingInterrupted", "train", "load_training_images",
           "training_slices", "select_training_slices", "supply_training_data", "needs_whole_normal_pool",
           "default_run_directory"]

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = LATEST_NAME  # the newest checkpoint (see medad_fast.checkpoint)


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (``checkpoint``: its
    path on the main process, None on the others)."""

    def __init__(self, signal_name: str, checkpoint: Path | None, epoch: int, step: int) -> None:
        self.signal_name, self.checkpoint, self.epoch, self.step = signal_name, checkpoint, epoch, step
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "a checkpoint"
        super().__init__(f"{signal_name} received: stopped after step {step} ({epoch} epochs complete) and "
                         f"wrote {where}; continue with --resume")

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by this signal (130 for SIGINT, 143 for SIGTERM)."""
        number = getattr(signal, self.signal_name, None)
        return 128 + int(number) if number is not None else 1


class _StopOnSignal:
    """While active, SIGINT and SIGTERM only set ``trainer.stop_requested``; the training loop
    checks it after each step. A second SIGINT raises KeyboardInterrupt at once. Handlers
    can only be installed from the main thread; elsewhere the signals keep their handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
        self.trainer.stop_requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class RunDirectory:
    """Every file a training run writes, behind one gate: only the main process writes."""

    def __init__(self, path: str | Path, writer: bool | None = None, keep_checkpoints: int = DEFAULT_KEEP) -> None:
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints (--keep-checkpoints) must be >= 1; got {keep_checkpoints}")
        self.path = Path(path)
        self.writer = is_main_process() if writer is None else writer
        self.keep_checkpoints = keep_checkpoints

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def log_path(self) -> Path:
        return self.path / LOG_NAME

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def best_path(self) -> Path:
        return self.path / BEST_NAME

    def write_config(self, config: Config) -> None:
        if self.writer:
            atomic_write_json(self.config_path, config.to_dict())

    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]

    def write_log(self, records: list[dict[str, Any]]) -> None:
        """Rewrite the whole JSONL log atomically (it is small: one line per epoch)."""
        if self.writer:
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in records))

    def save_checkpoint(self, state: dict[str, Any]) -> Path | None:
        """Write a numbered checkpoint, point ``checkpoint.pt`` at it, keep the newest
        ``keep_checkpoints``; returns its path (None on a process that does not write)."""
        if self.writer:
            return save_checkpoint(self.path, state, keep=self.keep_checkpoints)
        return None

    def point_best(self, checkpoint: Path | None) -> None:
        """Make ``checkpoint-best.pt`` the checkpoint file ``checkpoint`` (main process only)."""
        if self.writer and checkpoint is not None:
            point_best_checkpoint(self.path, checkpoint)


@dataclass
class TrainState:
    """Progress counters saved in the checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed iterations


@dataclass
class EpochProgress:
    """Where the current epoch stands: its permutation of the training images (the same on
    every rank), the batches done, and this rank's sums (on the device) that its log record
    will average. Saved in a checkpoint written inside an epoch (the sums of every rank), so
    that a resumed run finishes that epoch exactly."""

    permutation: torch.Tensor
    position: int = 0  # batches of this rank done
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        """Add one step's scalar terms (no host synchronisation)."""
        for key, value in terms.items():
            value = value.detach().to(torch.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def rank_sums(self) -> dict[str, Any]:
        """What differs between the ranks (read back to the host: a checkpoint is written)."""
        return {"sums": {k: float(v) for k, v in self.sums.items()}}

    def to_dict(self, rank_sums: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint entry; ``rank_sums``: :meth:`rank_sums` of every rank, in rank order."""
        return {"permutation": self.permutation, "position": self.position, "seconds": self.seconds,
                "rank_sums": rank_sums}

    @classmethod
    def from_dict(cls, values: dict[str, Any], rank: int, device: torch.device) -> EpochProgress:
        mine = values["rank_sums"][rank]
        sums = {k: torch.tensor(float(v), dtype=torch.float64, device=device) for k, v in mine["sums"].items()}
        return cls(values["permutation"], int(values["position"]), sums, float(values["seconds"]))


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """The loop around any :class:`~medad_fast.methods.base.Method`: data order, devices,
    mixed precision, DDP, optimiser steps, NaN stop, signals, checkpoints and logging.

    Args:
        method: a fresh method (:func:`medad_fast.methods.create_method`); its config's run
            part sets the batch, epochs, seed, memory format and mixed precision.
        train_images: ``uint8 [N, 1, S, S]`` normal slices (S = ``run.image_size``), all held
            on the device; or a :class:`~medad_fast.data.training_slices.TrainingSlices` view of
            N slices, of which each rank holds only those of its own batches, read at the start
            of every epoch (:meth:`hold`), unless the method needs the whole pool
            (:func:`needs_whole_normal_pool`: then all are read at once).
        device: training device.
        context: this process's place in a torchrun world (default: a single process). With
            more than one process the method is wrapped in ``DistributedDataParallel``.
        validation: the synthetic validation set (:mod:`medad_fast.validation`) scored by
            :meth:`validate` after every epoch; None: no validation.
    """

    def __init__(self, method: Method, train_images: torch.Tensor | TrainingSlices, device: torch.device,
                 context: DistributedContext | None = None,
                 validation: SyntheticValidationSet | None = None) -> None:
        if isinstance(train_images, TrainingSlices) and needs_whole_normal_pool(method):
            train_images = train_images.read_all()
        # the slices to read an epoch's share from (None: every image is held, in self.images)
        self.slices = train_images if isinstance(train_images, TrainingSlices) else None
        if self.slices is None and (train_images.dim() != 4 or train_images.shape[1] != 1
                                    or train_images.dtype != torch.uint8):
            raise ValueError(f"train_images must be uint8 [N, 1, S, S]; got {train_images.dtype} "
                             f"{list(train_images.shape)}")
        #: N: the training images of the run (over all ranks)
        self.n_images = len(train_images)
        if self.n_images == 0:
            raise ValueError("no training images")
        self.context = context if context is not None else DistributedContext(device=device)
        if self.n_images < self.context.world_size:
            raise ValueError(f"{self.n_images} training images cannot be shared by "
                             f"{self.context.world_size} processes (each needs at least one)")
        self.config: Config = method.config
        run = self.config.run
        self.device = device
        # generators: data order on the CPU (the same on every rank: each takes its share of
        # one permutation), the method's randomness on the training device (per rank)
        self.data_generator = torch.Generator().manual_seed(run.seed)
        self.method_generator = torch.Generator(device=device).manual_seed(
            distributed.rank_seed(run.seed + 1, self.context.rank))
        side = method.config.run.image_size
        # the images held on the device: all of them, or (slices given) the ones of this
        # rank's batches, image i at images[slot[i]] (slot -1: not held)
        self.images = (train_images.to(device) if self.slices is None
                       else torch.empty(0, 1, side, side, dtype=torch.uint8, device=device))
        self.slot = None if self.slices is None else torch.full((self.n_images,), -1, dtype=torch.int64)
        self.held = torch.zeros(0, dtype=torch.int64)  # with slices: the image indices held, ascending
        # augmentation of the normal slices (no state: its randomness is the method generator's)
        self.augmentation = NormalSliceAugmentation(run.augment_strength) if run.augment else None
        self.validation = validation.to(device) if validation is not None else None
        self.validation_state = ValidationState()
        # channels_last also speeds up oneDNN convolutions on the CPU (~20 %), so it is used everywhere
        self.method = method.configure_runtime(device, run.amp, run.channels_last)
        if run.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if run.compile and not method.compile_training:
            warnings.warn(f"--compile: {method.name} trains eager ({method.compile_training_note})", stacklevel=2)
        elif run.compile:
            compile_networks(self.method)
        supply_training_data(self.method, self.images if self.slices is None else None)
        self.method.setup_training(device)
        # the module that runs the step: DDP averages the gradients over the ranks
        self.network: nn.Module = self.method
        if self.context.is_distributed:
            self.network = nn.parallel.DistributedDataParallel(
                self.method, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.method.find_unused_parameters)
        self.optimizers, self.schedulers = self.method.configure_optimizers()
        # --ema: the moving average of the weights, updated after every optimiser step
        self.ema = ExponentialMovingAverage(self.method, run.ema) if run.ema is not None else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, run.amp))
        self.state = TrainState()
        self.epoch_progress: EpochProgress | None = None  # set while an epoch is under way
        self.stop_requested = False  # set by a signal handler; checked after every step
        self._stop_agreed = False  # some rank was asked to stop (agreed on in the step's all-reduce)

    # ------------------------------------------------------------------ schedule
    @property
    def images_per_rank(self) -> int:
        """Images each rank sees per epoch (all of them in a single process)."""
        return self.n_images // self.context.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch and rank (the last partial batch is dropped, unless a rank's
        share holds less than one batch)."""
        return max(1, self.images_per_rank // self.config.run.batch_size)

    # ---------------------------------------------------------------- one step
    def train_step(self, batch_index: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on the images ``batch_index`` (CPU int64 ``[B]``).

        Returns the loss and the method's terms (detached tensors on the device)."""
        held = batch_index if self.slot is None else self.slot[batch_index]
        if self.slot is not None and bool((held < 0).any()):  # CPU indices: no device synchronisation
            raise RuntimeError(f"train_step: images {batch_index[held < 0].tolist()} are not held by this rank "
                               f"(Trainer.hold them first: train_epoch does)")
        images = self.images[held.to(self.device)].float().div_(255.0)
        if self.augmentation is not None:
            images = self.augmentation(images, self.method_generator)
        images = self.method.to_memory_format(images)
        self.method.on_train_step(self.state.step, self.steps_per_epoch)
        loss, terms = self.network(images, self.method_generator)
        loss_value = loss.detach()
        self._check_step(loss_value)  # before backward: no rank updates its weights with a bad loss

        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for optimizer in self.optimizers:
            # staged methods (DDAD) leave one optimiser's parameters without gradients; Adam
            # would skip them anyway, but GradScaler.step refuses an optimiser with none
            if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                self.scaler.step(optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(broadcast=self.context.is_distributed)
        self.state.step += 1
        return loss_value, terms

    def _check_step(self, total: torch.Tensor) -> None:
        """Raise ``FloatingPointError`` naming the step when the loss of this step is not
        finite on any rank, and note whether any rank was asked to stop. With several
        processes both facts travel in one all-reduce of two numbers, so every rank takes
        the same decision at the same step."""
        if self.context.is_distributed:
            flags = torch.stack([(~torch.isfinite(total)).to(torch.float32),
                                 torch.tensor(float(self.stop_requested), device=total.device)])
            bad_ranks, stopping = distributed.all_reduce_sum(flags).tolist()
            self._stop_agreed = stopping > 0
        else:
            bad_ranks = 0.0 if bool(torch.isfinite(total)) else 1.0
        if bad_ranks > 0:
            where = (f"on {int(bad_ranks)} of {self.context.world_size} processes (this one: {float(total)})"
                     if self.context.is_distributed else f"({float(total)})")
            position = self.epoch_progress.position + 1 if self.epoch_progress is not None else 0
            raise FloatingPointError(f"non-finite loss {where} at step {self.state.step + 1} (epoch "
                                     f"{self.state.epoch + 1}, batch {position} of {self.steps_per_epoch}); "
                                     f"lower --lr or check the data")

    @property
    def stop_now(self) -> bool:
        """A signal asked this run to stop (on any rank): checked after every step."""
        return self._stop_agreed if self.context.is_distributed else self.stop_requested

    def epoch_permutation(self) -> torch.Tensor:
        """A new permutation of all training images from the data generator (the same on every rank)."""
        return torch.randperm(self.n_images, generator=self.data_generator)

    def rank_batches(self, permutation: torch.Tensor) -> torch.Tensor:
        """This rank's batches of an epoch permutation, ``[steps_per_epoch, B]`` (CPU).

        The permutation is cut to a multiple of the world size and rank ``r`` takes every
        ``world``-th image from position ``r`` (``DistributedSampler(drop_last=True)``);
        then the last partial batch is dropped. A single process takes the whole permutation."""
        world, batch = self.context.world_size, self.config.run.batch_size
        per_rank = self.images_per_rank
        mine = permutation[: per_rank * world].view(per_rank, world)[:, self.context.rank]
        if per_rank < batch:
            return mine.view(1, per_rank)
        return mine[: self.steps_per_epoch * batch].view(self.steps_per_epoch, batch)

    @property
    def resident_images(self) -> int:
        """Training images this rank holds on the device now (its share of an epoch when
        the trainer reads from slices, else all N)."""
        return int(self.images.shape[0])

    def hold(self, batches: torch.Tensor) -> None:
        """Hold exactly the images of ``batches`` (image indices, any shape; CPU) on the device
        when the trainer reads from slices (a no-op when it holds all): the ones already held
        are kept, the others read (:meth:`TrainingSlices.read`), the rest let go."""
        if self.slices is None:
            return
        needed = batches.flatten().unique()  # ascending
        where = self.slot[needed]
        kept = where >= 0
        images = torch.empty(needed.shape[0], *self.images.shape[1:], dtype=torch.uint8, device=self.device)
        images[kept.to(self.device)] = self.images[where[kept].to(self.device)]
        if not bool(kept.all()):
            images[(~kept).to(self.device)] = self.slices.read(needed[~kept]).to(self.device)
        self.slot[self.held] = -1
        self.slot[needed] = torch.arange(needed.shape[0])
        self.images, self.held = images, needed

    def epoch_order(self) -> torch.Tensor:
        """Batch indices of a new epoch for this rank, ``[steps_per_epoch, B]`` (CPU)."""
        return self.rank_batches(self.epoch_permutation())

    def train_epoch(self, progress: Any = None) -> dict[str, Any] | None:
        """Run (the rest of) one epoch; returns its log record, or None when a signal
        stopped it after a step (:attr:`epoch_progress` then says where, for a checkpoint)."""
        self.network.train()
        if self.epoch_progress is None:
            self.epoch_progress = EpochProgress(self.epoch_permutation())
        epoch = self.epoch_progress
        order = self.rank_batches(epoch.permutation)
        self.hold(order[epoch.position:])  # this rank's share of the epoch (a resumed epoch: of its rest)
        start = time.perf_counter()
        for batch_index in order[epoch.position:]:
            loss, terms = self.train_step(batch_index)
            epoch.add({"loss": loss, **terms})
            epoch.position += 1
            if progress is not None:
                progress.update(1)
            if self.stop_now and epoch.position < order.shape[0]:
                epoch.seconds += time.perf_counter() - start
                return None
        seconds = epoch.seconds + time.perf_counter() - start
        n_steps, world = order.shape[0], self.context.world_size
        # the epoch's sums read back once, as a mean over the ranks' steps (one all-reduce)
        keys = list(epoch.sums)
        totals = distributed.all_reduce_sum(torch.stack([epoch.sums[k] for k in keys]).cpu()).tolist()
        lr = self.optimizers[0].param_groups[0]["lr"]
        for scheduler in self.schedulers:
            scheduler.step()
        self.state.epoch += 1
        self.epoch_progress = None
        record: dict[str, Any] = {"epoch": self.state.epoch, "step": self.state.step}
        record.update({k: v / (n_steps * world) for k, v in zip(keys, totals)})
        record.update(self.method.log_values())
        record.update({"lr": lr, "images_per_s": order.numel() * world / seconds, "seconds": seconds})
        if progress is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", **{k: f"{v:.3f}" for k, v in
                                                                  self.method.log_values().items()})
        return record

    # ------------------------------------------------------------ validation
    @property
    def stopped_early(self) -> bool:
        """Early stopping (``--patience``) ended this run."""
        return self.validation_state.stopped_early

    def validate(self) -> tuple[dict[str, Any], bool]:
        """Score the validation set after an epoch: ``(values for the log record, improved)``,
        ``improved`` True when this epoch's ``val_score`` is the best so far. Updates
        :attr:`validation_state` (and the early stop). The main process scores and broadcasts,
        so every rank takes the same decisions. With ``--ema`` the averaged weights are scored
        (``val_weights`` "ema" in the values), then the live ones put back."""
        if self.validation is None:
            raise RuntimeError("validate() needs a validation set (--val-fraction > 0)")
        values = None
        if self.context.is_main:
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                values = self.validation.score(self.method, self.config.run.batch_size)
        values = distributed.broadcast_object(values)
        run = self.config.run
        improved = self.validation_state.update(values["val_score"], self.state.epoch, run.patience, run.epochs)
        values = {**values, "val_best_score": self.validation_state.best_score,
                  "val_best_epoch": self.validation_state.best_epoch}
        if self.ema is not None:
            values["val_weights"] = "ema"
        if self.validation_state.stopped_early:
            values["stopped_early"] = True
        return values, improved

    # ------------------------------------------------------------ checkpoints
    def _rank_generator_states(self) -> dict[str, torch.Tensor | None]:
        return {"method": self.method_generator.get_state().cpu(), **global_rng_states(self.device)}

    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs (tensors and plain values only: loads with
        ``weights_only=True``). With several processes this is a collective (the ranks'
        generator states are gathered): call it on every rank."""
        progress = self.epoch_progress
        per_rank = distributed.gather_objects({"generators": self._rank_generator_states(),
                                               "epoch": progress.rank_sums() if progress is not None else None})
        return {
            "method": self.config.run.method,
            "config": self.config.to_dict(),
            "model": {k: v.contiguous() for k, v in self.method.state_dict().items()},
            "method_state": self.method.method_state(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "generators": {"data": self.data_generator.get_state(),
                           "method": self.method_generator.get_state().cpu()},
            # per rank: the method's generator, torch's global CPU and CUDA generators
            "rank_generators": [r["generators"] for r in per_rank],
            "world_size": self.context.world_size,
            "epoch_progress": progress.to_dict([r["epoch"] for r in per_rank]) if progress is not None else None,
            # the best validation score so far, its epoch, the early stop (--val-fraction)
            "validation": self.validation_state.to_dict(),
            # --ema: the moving average of the weights (absent without it)
            **({EMA_KEY: self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state["model"])
        self.method.load_method_state(state.get("method_state", {}))
        for kind, mine, saved in (("optimizers", self.optimizers, state["optimizers"]),
                                  ("schedulers", self.schedulers, state["schedulers"])):
            if len(mine) != len(saved):
                raise ValueError(f"the checkpoint holds {len(saved)} {kind} and the method has {len(mine)}")
            for item, item_state in zip(mine, saved):
                item.load_state_dict(item_state)
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            # a checkpoint without an average (written without --ema): it starts from these weights
            if state.get(EMA_KEY):
                self.ema.load_state_dict(state[EMA_KEY])
            else:
                self.ema.reset()
        self.state = TrainState(epoch=int(state["epoch"]), step=int(state["step"]))
        self.validation_state = ValidationState.from_dict(state.get("validation"))
        self.data_generator.set_state(state["generators"]["data"])
        rank, world = self.context.rank, self.context.world_size
        saved_world = int(state.get("world_size", 1))
        progress = state.get("epoch_progress")
        self.epoch_progress = None
        if progress is not None:
            self.epoch_progress = (EpochProgress.from_dict(progress, rank, self.device) if saved_world == world
                                   else EpochProgress(progress["permutation"]))
        rank_generators = state.get("rank_generators") or [{"method": state["generators"]["method"]}]
        if rank < len(rank_generators):
            self.method_generator.set_state(rank_generators[rank]["method"])
            if "torch_cpu" in rank_generators[rank]:
                restore_global_rng_states(rank_generators[rank], self.device)
        if saved_world != world:
            # The shares of the data and the per-rank random streams depend on the world
            # size: an interrupted epoch starts over (same permutation) and the run goes on
            # correctly, but not bit for bit as the original world would have.
            self.state.step = self.state.epoch * self.steps_per_epoch


# ----------------------------------------------------------------------------- entry

class EmptySlicesSkippedWarning(UserWarning):
    """Training slices without liver were left out (``--skip-empty-slices``)."""


def training_slices(config: Config) -> TrainingSlices:
    """Every normal training slice of ``run.data`` (``train/good``, or ``train["0"]`` of a
    MedIAnomaly ``data.json``), by index, each cut to its liver box when the run crops
    (:mod:`medad_fast.data.crop`); nothing is read yet."""
    run = config.run
    return TrainingSlices(run.data, run.image_size, crop=crops_liver(run))


def select_training_slices(config: Config, slices: TrainingSlices, images: torch.Tensor | None = None
                           ) -> TrainingSlices:
    """The view of ``slices`` training may use: a seeded subset of ``run.max_train_images``
    when set (before ``run.val_fraction`` holds some of them back:
    :func:`medad_fast.validation.held_back_mask`), of the slices with liver. ``images``: the
    slices' pixels when already read (else each rank reads its share to find the empty ones:
    :meth:`TrainingSlices.empty_flags`).

    A slice without liver (every pixel 0: ``image > 0`` is the liver) teaches the method
    nothing and, many of them, a loss of zero: such slices raise ``ValueError`` naming how
    many and some of their files, or with ``run.skip_empty_slices`` are left out with one
    :class:`EmptySlicesSkippedWarning` saying how many."""
    run = config.run
    empty = slices.empty_flags(images)
    n_empty = int(empty.sum())
    if n_empty:
        paths = slices.paths
        named = [paths[i] for i in torch.nonzero(empty).flatten()[:3].tolist()]
        seen = (f"{n_empty} of {len(slices)} training slices of {run.data} have no liver (every pixel is 0), "
                f"e.g. {', '.join(named)}")
        if not run.skip_empty_slices:
            raise ValueError(f"{seen}; remove them, or pass --skip-empty-slices to leave them out")
        if n_empty == len(slices):
            raise ValueError(f"{seen}: none is left to train on")
        warnings.warn(EmptySlicesSkippedWarning(f"{seen}: left out (--skip-empty-slices)"), stacklevel=2)
    usable = torch.nonzero(~empty).flatten()
    if run.max_train_images is not None and usable.shape[0] > run.max_train_images:
        keep = torch.randperm(usable.shape[0], generator=torch.Generator().manual_seed(run.seed))
        usable = usable[keep[: run.max_train_images].sort().values]
    return slices.subset(usable)


def load_training_images(config: Config) -> torch.Tensor:
    """``uint8 [N, 1, S, S]``: the normal training slices of ``run.data`` that training may
    use (:func:`select_training_slices`: every one read, in one process), before
    ``run.val_fraction`` holds some of them back."""
    slices = training_slices(config)
    images = slices.read_all()
    return images[select_training_slices(config, slices, images).chosen]


def needs_whole_normal_pool(method: Method) -> bool:
    """The method declares it needs every normal training image on every rank
    (:class:`~medad_fast.methods.base.NormalImages`)."""
    return any(isinstance(need, NormalImages) for need in method.training_data().values())


def supply_training_data(method: Method, normal_images: torch.Tensor | None) -> None:
    """Read what ``method`` declares it needs (:meth:`Method.training_data`) and hand it over
    (:meth:`Method.attach_training_data`): ``normal_images`` (the trainer's, on its device;
    None outside a trainer) for :class:`~medad_fast.methods.base.NormalImages`, the pool of
    :func:`medad_fast.data.unlabeled.load_unlabeled_pool` for
    :class:`~medad_fast.methods.base.UnlabeledImages` (errors name ``--unlabeled``,
    ``--unlabeled-split``, ``data.json``)."""
    run = method.config.run
    data: dict[str, torch.Tensor | None] = {}
    for name, need in method.training_data().items():
        if isinstance(need, NormalImages):
            data[name] = normal_images
        elif isinstance(need, UnlabeledImages):
            data[name] = load_unlabeled_pool(run.data, need.folder, need.split, need.data_json, run.image_size,
                                              crop=crops_liver(run))
        else:
            raise TypeError(f"{type(method).__name__}.training_data() asks for {name!r} = {need!r}, which the "
                            f"engine cannot supply (NormalImages or UnlabeledImages)")
    method.attach_training_data(data)


class _CheckpointPolicy:
    """When an epoch's end writes a checkpoint: every ``checkpoint_every`` epochs, when
    ``checkpoint_minutes`` have passed since the last one, and after the last epoch. The
    clock is rank 0's (broadcast), so every rank takes part in the same collective."""

    def __init__(self, run: RunConfig) -> None:
        self.every, self.minutes = run.checkpoint_every, run.checkpoint_minutes
        self.last = time.monotonic()

    def due(self, epoch: int, last_epoch: bool) -> bool:
        due = last_epoch or (self.every is not None and epoch % self.every == 0) or (
            self.minutes is not None and time.monotonic() - self.last >= 60.0 * self.minutes)
        return bool(distributed.broadcast_object(due))

    def written(self) -> None:
        self.last = time.monotonic()


def train(config: Config, out: str | Path, *, resume: bool = False, device: str | torch.device | None = None,
          progress: bool = True, log: Any = None, keep_checkpoints: int = DEFAULT_KEEP,
          deterministic: bool = False) -> dict[str, Any]:
    """Train a run into ``out``; returns the last epoch's log record.

    ``config.run.data`` names the BMAD-layout folder. ``resume=True`` continues from the
    newest readable checkpoint of ``out`` (an unreadable newer one is skipped with a
    message; its method and architecture must match ``config``); without it, a run
    directory that already holds a checkpoint is refused. ``log`` is a callable for
    one-line messages (default: print to stderr); only the main process says anything.
    ``keep_checkpoints``: how many checkpoints stay on disk. ``deterministic``: see
    :func:`medad_fast.runtime.deterministic_mode`.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; it joins the process
    group (made once per process) and trains its share (module docstring). Raises
    :class:`TrainingInterrupted` after SIGINT/SIGTERM (a checkpoint was written) and
    ``FloatingPointError`` on a non-finite loss (naming the step and the last good checkpoint).
    """
    if config.run.data is None:
        raise ValueError("config.run.data (--data) must name a BMAD-layout data folder")
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints (--keep-checkpoints) must be >= 1; got {keep_checkpoints}")
    check_writable_folder(out)  # before any work
    # "auto" cropping is decided once, here, from the data; config.json and the checkpoints
    # keep the decision, which evaluate and predict follow
    crop = choose_crop(config.run.crop, config.run.data)
    auto_crop = crop if config.run.crop == "auto" else None  # said in the log: what the data looked like
    config = config.replace(crop=crop.crop)
    # so is the preprocessing record (window, hist-eq, crop, side): scoring takes it from the
    # run, never from the data again
    config = config.with_preprocessing(decide_preprocessing(config.run))
    context = distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    with deterministic_mode(deterministic, context.device):
        return _train(config, Path(out), resume, context, progress, log, keep_checkpoints, auto_crop)


def _restore_best_link(run: RunDirectory, trainer: Trainer, found: Any) -> None:
    """After a resume: when the resumed checkpoint is itself the best epoch's (written at the
    end of that epoch) and ``checkpoint-best.pt`` is not that file (a crash between the two
    writes), point it there, so the best file always matches the best score the run remembers."""
    state = trainer.validation_state
    if (trainer.validation is None or state.best_score is None or state.best_epoch != trainer.state.epoch
            or trainer.epoch_progress is not None or not run.writer):
        return
    if run.best_path.is_file() and os.path.samefile(run.best_path, found.path):
        return
    run.point_best(found.path)


def _train(config: Config, out: Path, resume: bool, context: DistributedContext, progress: bool, log: Any,
           keep_checkpoints: int, auto_crop: CropChoice | None = None) -> dict[str, Any]:
    """The training of :func:`train` (its arguments); ``auto_crop``: what ``--crop auto``
    resolved to and why, said in the log (None: the crop was given)."""
    device, run_config = context.device, config.run
    run = RunDirectory(out, writer=context.is_main, keep_checkpoints=keep_checkpoints)
    emit = log or (lambda message: print(message, file=sys.stderr))

    def say(message: str) -> None:
        if run.writer:
            emit(message)

    found = None
    if resume:
        # every rank reads the same file (the run directory must be visible to all nodes)
        found = latest_valid_checkpoint(run.path, expected=config, log=say)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint to resume in {run.path} "
                                    f"(no checkpoint-*.pt or {CHECKPOINT_NAME})")
    elif list_checkpoints(run.path) or run.checkpoint_path.exists() or run.best_path.exists():
        raise FileExistsError(f"{run.path} already holds a checkpoint; pass --resume to continue "
                              f"that run or choose another --out")

    with ops_mode(run_config.reference_ops):
        method = create_method(config)
        # one process reads every slice once (cached); DDP ranks read only their shares of
        # each epoch (and the held-back slices), unless the method needs the whole pool
        slices = training_slices(config)
        everything = slices.read_all() if not context.is_distributed or needs_whole_normal_pool(method) else None
        usable = select_training_slices(config, slices, everything)
        held_mask = held_back_mask(len(usable), run_config.val_fraction, run_config.seed)
        if everything is not None:
            images, held_back = everything[usable.chosen[~held_mask]], everything[usable.chosen[held_mask]]
            del everything  # the trainer holds its own copy
        else:
            images, held_back = usable.subset(~held_mask), usable.subset(held_mask)
            held_back = held_back.read(torch.arange(len(held_back)))  # few: every rank reads them
        # made once from the run's seed: the same set at every epoch and after a resume
        validation = SyntheticValidationSet.build(held_back, config) if held_back.shape[0] else None
        trainer = Trainer(method, images, device, context, validation)
        records = run.read_log()
        if found is not None:
            saved_world = int(found.state.get("world_size", 1))
            trainer.load_state_dict(found.state)
            records = [r for r in records if r.get("epoch", 0) <= trainer.state.epoch]
            say(f"resuming {run.path} from {found.path.name}: epoch {trainer.state.epoch}, "
                f"step {trainer.state.step} of {run_config.epochs} epochs")
            if saved_world != context.world_size:
                say(f"the checkpoint was written by {saved_world} process(es) and {context.world_size} resume it: "
                    f"the data shares and random draws differ from an uninterrupted run")
            _restore_best_link(run, trainer, found)
            saved_ema = found.state.get(EMA_KEY)
            if trainer.ema is not None and not saved_ema:
                say(f"--ema {trainer.ema.decay:g}: the checkpoint holds no average of the weights; it starts from "
                    f"the resumed weights")
            elif trainer.ema is None and saved_ema:
                say(f"the checkpoint's average of the weights (--ema {saved_ema['decay']:g}) is dropped: resumed "
                    f"without --ema")
            elif trainer.ema is not None and saved_ema["decay"] != trainer.ema.decay:
                say(f"the average of the weights continues with --ema {trainer.ema.decay:g} (the checkpoint's: "
                    f"{saved_ema['decay']:g})")
        run.write_config(config)
        world = f", {context.world_size} processes ({context.backend})" if context.is_distributed else ""
        held = (f" ({held_back.shape[0]} held back for validation: {len(validation)} synthetic-validation slices)"
                if validation is not None else "")
        extras = f", augmented (strength {run_config.augment_strength:g})" if run_config.augment else ""
        if crops_liver(run_config):
            extras += ", cropped to the liver box"
        if auto_crop is not None:
            say(f"--crop auto -> {auto_crop.crop}: {auto_crop.reason}")
        say(f"training {config.variant}, {run_config.preset} preset, on {trainer.n_images} images{held} of "
            f"{run_config.image_size}x{run_config.image_size}{extras}, {run_config.epochs} epochs x "
            f"{trainer.steps_per_epoch} steps, device {device}{world}, "
            f"ops: {'reference' if ops.using_reference() else 'extension'}")
        if trainer.ema is not None:
            total_steps = run_config.epochs * trainer.steps_per_epoch
            say(f"exponential moving average of the weights, decay {trainer.ema.decay:g} (about the last "
                f"{trainer.ema.horizon:.0f} steps once warmed up, from step {trainer.ema.warm_after}): validation, "
                f"evaluate, predict and export use the average")
            if trainer.ema.warm_after > total_steps:
                last = trainer.ema.decay_at(total_steps - 1)
                say(f"warning: --ema {trainer.ema.decay:g} is still warming up when the run ends: its last decay is "
                    f"{last:.3g}, an average of about the last {1.0 / (1.0 - last):.0f} steps rather than "
                    f"{trainer.ema.horizon:.0f} (the warm-up ends at step {trainer.ema.warm_after}, the run at "
                    f"{total_steps})")
        if trainer.stopped_early:
            say(f"{run.path} was stopped early at epoch {trainer.state.epoch} (--patience): nothing to train")

        bar = None
        if progress and run.writer:
            from tqdm import tqdm
            total = run_config.epochs * trainer.steps_per_epoch
            bar = tqdm(total=total, initial=min(trainer.state.step, total), desc="train", unit="step",
                       dynamic_ncols=True)
        record: dict[str, Any] = records[-1] if records else {}
        policy = _CheckpointPolicy(run_config)
        stop = _StopOnSignal(trainer)
        try:
            with stop:
                while trainer.state.epoch < run_config.epochs and not trainer.stopped_early:
                    epoch_record = trainer.train_epoch(bar)
                    if epoch_record is not None:
                        record = epoch_record
                        improved = False
                        if trainer.validation is not None:
                            values, improved = trainer.validate()
                            record.update(values)
                        records.append(record)
                        run.write_log(records)
                        last = trainer.state.epoch == run_config.epochs or trainer.stopped_early
                        # a better epoch gets a numbered checkpoint (even between the policy's),
                        # which checkpoint-best.pt then links to: a resume always knows its best
                        if policy.due(trainer.state.epoch, last) or improved:
                            path = run.save_checkpoint(trainer.state_dict())
                            policy.written()
                            if improved:
                                run.point_best(path)
                        if bar is None:
                            values = "".join(f" {k} {v:.3f}" for k, v in trainer.method.log_values().items())
                            if "val_score" in record:
                                weights = " (ema)" if trainer.ema is not None else ""
                                values += f" val_score{weights} {record['val_score']:.4f}"
                            say(f"epoch {record['epoch']}/{run_config.epochs} loss {record['loss']:.4f}{values} "
                                f"lr {record['lr']:.2e} {record['images_per_s']:.1f} img/s")
                        if trainer.stopped_early:
                            state = trainer.validation_state
                            best = (f"the best, {state.best_score:.4f} at epoch {state.best_epoch}, is {run.best_path}"
                                    if state.best_score is not None else "no epoch had a finite score")
                            say(f"early stop after epoch {trainer.state.epoch}: no better validation score for "
                                f"{run_config.patience} epochs; {best}")
                    if trainer.stop_now and trainer.state.epoch < run_config.epochs and not trainer.stopped_early:
                        path = run.save_checkpoint(trainer.state_dict())
                        # name the signal even on ranks that did not receive it themselves
                        received = [s for s in distributed.gather_objects(stop.received) if s is not None]
                        name = signal.Signals(received[0]).name if received else "a stop request"
                        raise TrainingInterrupted(name, path, trainer.state.epoch, trainer.state.step)
        except FloatingPointError as exc:
            written = list_checkpoints(run.path)
            kept = (f"the last good checkpoint is {written[0]}" if written
                    else "no checkpoint had been written yet")
            raise FloatingPointError(f"{exc}. Training stopped; {kept}") from None
        finally:
            if bar is not None:
                bar.close()
        if found is not None and not run.checkpoint_path.exists():
            run.save_checkpoint(trainer.state_dict())
    return record


def default_run_directory(config: Config, device: str | torch.device | None = None) -> Path:
    """``runs/<method>-<preset>-<time>``: where a run goes when no folder is named. Under
    torchrun it joins the process group (as :func:`train` does) and every rank gets rank 0's
    name (their clocks may disagree on the second)."""
    distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    name = f"{config.run.method}-{config.run.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return distributed.broadcast_object(Path("runs") / name)
