"""`medad-fast train`: train the method on the normal slices of a BMAD-layout folder.

One training step (DESIGN §1), all on the training device:

1. a batch of normal images ``I`` (uint8 tensors kept on the device, shuffled by a seeded
   generator) -> float in [0, 1];
2. anomaly synthesis (:class:`AnomalySynthesizer`, fused op, device generator) -> ``I_a, M``;
3. ``alpha`` of the skip connections from :func:`schedules.alpha_at` (per iteration);
4. forward ``R(highpass(I_a))``, ``S(concat(I_r, I_a))``; ``L_rec + L_seg``; Adam step.

Run directory (``--out``)::

    config.json               the resolved configuration (preset + overrides)
    log.jsonl                 one JSON record per epoch: losses, alpha, lr, images/s, seconds
    checkpoint-eE-sS.pt       the last ``--keep-checkpoints`` checkpoints (atomic, fsynced;
                              model, optimizer, scheduler, scaler, alpha, epoch, step, the
                              position inside an interrupted epoch, every generator's state
                              on every rank, config), see :mod:`medad_fast.checkpoint`
    checkpoint.pt             the newest of them: what evaluate and predict read

Everything written goes through :class:`RunDirectory`, whose writes only happen on the
main process (rank 0).

Several processes (``torchrun --nproc_per_node N -m medad_fast.cli train ...``, see
:mod:`medad_fast.distributed`): the model is wrapped in ``DistributedDataParallel``, every
rank draws the same epoch permutation and trains on its own strided share of it
(``DistributedSampler(drop_last=True)``: ``N // world`` images per rank and epoch, batch
``batch_size`` per rank), and the synthesis generator is seeded per rank, so the ranks draw
different anomalies. Logged losses are the mean over the ranks.

Faults: a non-finite loss stops the run before the optimiser step (on every rank) with the
step named; the checkpoints on disk are the last good ones. SIGINT/SIGTERM set a flag that
is checked after every step: the run then writes a checkpoint of its exact position inside
the epoch and exits (a second Ctrl-C stops at once). ``--resume`` continues from the newest
readable checkpoint; with ``--deterministic`` a resumed run ends in the same weights as an
uninterrupted one (bitwise on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed, ops
from .checkpoint import (DEFAULT_KEEP, LATEST_NAME, global_rng_states, latest_valid_checkpoint, list_checkpoints,
                         restore_global_rng_states, save_checkpoint)
from .config import PRESETS, Config, preset_config
from .distributed import DistributedContext, is_main_process
from .io import atomic_write_json, atomic_write_text
from .losses import LossTerms, reconstruction_loss, segmentation_loss
from .models.model import FrequencyAwareModel
from .schedules import alpha_at, lr_milestone_epochs
from .synthesis import AnomalySynthesizer

__all__ = ["RunDirectory", "TrainState", "Trainer", "TrainingInterrupted", "train", "resolve_device",
           "deterministic_mode", "config_from_args", "add_arguments", "main"]

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = LATEST_NAME  # the newest checkpoint (see medad_fast.checkpoint)


# ----------------------------------------------------------------------------- helpers

def resolve_device(name: str | None) -> torch.device:
    """``"auto"``/None -> cuda if available else cpu; otherwise ``torch.device(name)``,
    with a clear error for a device that is not there."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a valid torch device ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch build/machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """float16 autocast needs loss scaling; bfloat16 does not."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """``--deterministic``: deterministic kernels (``torch.use_deterministic_algorithms``,
    cuDNN deterministic, no cuDNN benchmarking) for the duration; the previous settings are
    restored afterwards. Bitwise reproducible on the CPU. On CUDA an op without a
    deterministic kernel (PyTorch's bilinear up-sampling backward) only warns, instead of
    stopping the run."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2], previous[3]


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


@dataclass
class TrainState:
    """Progress counters saved in the checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed iterations
    alpha: float = 1.0


@dataclass
class EpochProgress:
    """Where the current epoch stands: its permutation of the training images (the same on
    every rank), the batches done, and this rank's sums that its log record will average.
    Saved in a checkpoint written inside an epoch (the sums of every rank), so that a resumed
    run finishes that epoch exactly."""

    permutation: torch.Tensor
    position: int = 0  # batches of this rank done
    sums: dict[str, float] = field(default_factory=dict)
    anomalous_sum: float = 0.0
    seconds: float = 0.0

    def rank_sums(self) -> dict[str, Any]:
        """What differs between the ranks."""
        return {"sums": dict(self.sums), "anomalous_sum": self.anomalous_sum}

    def to_dict(self, rank_sums: list[dict[str, Any]]) -> dict[str, Any]:
        """The checkpoint entry; ``rank_sums``: :meth:`rank_sums` of every rank, in rank order."""
        return {"permutation": self.permutation, "position": self.position, "seconds": self.seconds,
                "rank_sums": rank_sums}

    @classmethod
    def from_dict(cls, values: dict[str, Any], rank: int) -> EpochProgress:
        mine = values["rank_sums"][rank]
        return cls(values["permutation"], int(values["position"]), {k: float(v) for k, v in mine["sums"].items()},
                   float(mine["anomalous_sum"]), float(values["seconds"]))


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Holds the model, optimiser, schedules, data and generators of one run.

    Args:
        config: resolved configuration.
        train_images: ``uint8 [N, 1, S, S]`` normal slices (S = ``config.image_size``).
        sources: ``float32 [K, 1, S, S]`` anomaly-source pool, or None to draw the Perlin
            texture fallback from the seed.
        device: training device.
        context: this process's place in a torchrun world (default: a single process). With
            more than one process the model is wrapped in ``DistributedDataParallel``.
    """

    def __init__(self, config: Config, train_images: torch.Tensor, sources: torch.Tensor | None,
                 device: torch.device, context: DistributedContext | None = None) -> None:
        if train_images.dim() != 4 or train_images.shape[1] != 1 or train_images.dtype != torch.uint8:
            raise ValueError(f"train_images must be uint8 [N, 1, S, S]; got {train_images.dtype} "
                             f"{list(train_images.shape)}")
        if train_images.shape[0] == 0:
            raise ValueError("no training images")
        self.context = context if context is not None else DistributedContext(device=device)
        if train_images.shape[0] < self.context.world_size:
            raise ValueError(f"{train_images.shape[0]} training images cannot be shared by "
                             f"{self.context.world_size} processes (each needs at least one)")
        self.config = config
        self.device = device
        # channels_last also speeds up oneDNN convolutions on the CPU (~20 %), so it is used everywhere
        self.use_channels_last = config.channels_last
        self.use_amp = config.amp and device.type == "cuda"

        # generators: data order on the CPU (the same on every rank: each takes its share of
        # one permutation), synthesis on the training device (per rank: different anomalies)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.synthesis_generator = torch.Generator(device=device).manual_seed(
            distributed.rank_seed(config.seed + 1, self.context.rank))

        self.images = train_images.to(device)
        if sources is None:
            from .data.sources import perlin_texture_sources
            texture_generator = torch.Generator().manual_seed(config.seed + 2)
            sources = perlin_texture_sources(config.source_pool_size, config.image_size, texture_generator)
        self.synthesizer = AnomalySynthesizer(
            sources.to(device=device, dtype=torch.float32), p_anomaly=config.p_anomaly,
            max_retries=config.max_retries, threshold=config.perlin_threshold,
            roi_threshold=config.effective_roi_threshold) if config.synthesis else None

        torch.manual_seed(config.seed)  # weight initialisation
        self.model = FrequencyAwareModel(config).to(device)
        if self.use_channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # the module that runs the forward pass: DDP averages the gradients over the ranks
        self.network: nn.Module = self.model
        if self.context.is_distributed:
            self.network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, lr_milestone_epochs(config.epochs, config.lr_milestones), gamma=config.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, config.amp))
        self.state = TrainState()
        self.epoch_progress: EpochProgress | None = None  # set while an epoch is under way
        self.stop_requested = False  # set by a signal handler; checked after every step
        self._stop_agreed = False  # some rank was asked to stop (agreed on in the step's all-reduce)

    # ------------------------------------------------------------------ schedule
    @property
    def images_per_rank(self) -> int:
        """Images each rank sees per epoch (all of them in a single process)."""
        return self.images.shape[0] // self.context.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch and rank (the last partial batch is dropped, unless a rank's
        share holds less than one batch)."""
        return max(1, self.images_per_rank // self.config.batch_size)

    def current_alpha(self) -> float:
        return alpha_at(self.state.step, self.steps_per_epoch, self.config.alpha_decay_epochs)

    # ---------------------------------------------------------------- one step
    def train_step(self, batch_index: torch.Tensor) -> tuple[LossTerms, float]:
        """One optimisation step on the images ``batch_index`` (CPU int64 ``[B]``).

        Returns the loss terms and the fraction of samples that got an anomaly."""
        config = self.config
        images = self.images[batch_index.to(self.device)].float().div_(255.0)
        if self.synthesizer is not None:
            augmented, mask = self.synthesizer(images, self.synthesis_generator)
        else:
            augmented, mask = images, torch.zeros_like(images)
        if self.use_channels_last:
            images, augmented = (t.contiguous(memory_format=torch.channels_last) for t in (images, augmented))
        self.model.alpha = self.state.alpha = self.current_alpha()

        with autocast_context(self.device, self.use_amp):
            output = self.network(augmented)
        terms = LossTerms()
        loss = torch.zeros((), device=self.device)
        if output.reconstruction is not None:
            rec, mse, ssim_term = reconstruction_loss(output.reconstruction, images, config.ssim_weight)
            loss = loss + rec
            terms.rec, terms.mse, terms.ssim = rec.detach(), mse.detach(), ssim_term.detach()
        if output.logits is not None:
            seg, l1, focal = segmentation_loss(output.logits, mask, config.focal_gamma)
            loss = loss + seg
            terms.seg, terms.l1, terms.focal = seg.detach(), l1.detach(), focal.detach()
        terms.total = loss.detach()
        self._check_step(terms.total)  # before backward: no rank updates its weights with a bad loss

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        anomalous = (mask.flatten(1).amax(dim=1) > 0).float().mean()
        return terms, float(anomalous)

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
        return torch.randperm(self.images.shape[0], generator=self.data_generator)

    def rank_batches(self, permutation: torch.Tensor) -> torch.Tensor:
        """This rank's batches of an epoch permutation, ``[steps_per_epoch, B]`` (CPU).

        The permutation is cut to a multiple of the world size and rank ``r`` takes every
        ``world``-th image from position ``r`` (``DistributedSampler(drop_last=True)``);
        then the last partial batch is dropped. A single process takes the whole permutation."""
        world, batch = self.context.world_size, self.config.batch_size
        per_rank = self.images_per_rank
        mine = permutation[: per_rank * world].view(per_rank, world)[:, self.context.rank]
        if per_rank < batch:
            return mine.view(1, per_rank)
        return mine[: self.steps_per_epoch * batch].view(self.steps_per_epoch, batch)

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
        start = time.perf_counter()
        for batch_index in order[epoch.position:]:
            terms, anomalous = self.train_step(batch_index)
            for key, value in vars(terms).items():
                epoch.sums[key] = epoch.sums.get(key, 0.0) + float(value)
            epoch.anomalous_sum += anomalous
            epoch.position += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(terms.total):.4f}", alpha=f"{self.state.alpha:.3f}")
            if self.stop_now and epoch.position < order.shape[0]:
                epoch.seconds += time.perf_counter() - start
                return None
        seconds = epoch.seconds + time.perf_counter() - start
        n_steps, world = order.shape[0], self.context.world_size
        # mean over the ranks' steps (one all-reduce per epoch; a no-op in a single process)
        keys = list(epoch.sums)
        totals = distributed.all_reduce_sum(
            torch.tensor([epoch.sums[k] for k in keys] + [epoch.anomalous_sum], dtype=torch.float64)).tolist()
        sums, anomalous_sum = dict(zip(keys, totals[:-1])), totals[-1]
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.epoch += 1
        self.epoch_progress = None
        record = {"epoch": self.state.epoch, "step": self.state.step}
        record.update({f"loss_{k}" if k != "total" else "loss": v / (n_steps * world) for k, v in sums.items()})
        record.update({"alpha": self.state.alpha, "lr": lr, "anomalous_fraction": anomalous_sum / (n_steps * world),
                       "images_per_s": order.numel() * world / seconds, "seconds": seconds})
        return record

    # ------------------------------------------------------------ checkpoints
    def _rank_generator_states(self) -> dict[str, torch.Tensor | None]:
        return {"synthesis": self.synthesis_generator.get_state().cpu(), **global_rng_states(self.device)}

    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs (tensors and plain values only: loads with
        ``weights_only=True``). With several processes this is a collective (the ranks'
        generator states are gathered): call it on every rank."""
        progress = self.epoch_progress
        per_rank = distributed.gather_objects({"generators": self._rank_generator_states(),
                                               "epoch": progress.rank_sums() if progress is not None else None})
        return {
            "config": self.config.to_dict(),
            "model": {k: v.contiguous() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "alpha": self.state.alpha,
            "generators": {"data": self.data_generator.get_state(),
                           "synthesis": self.synthesis_generator.get_state().cpu()},
            # per rank: synthesis generator, torch's global CPU and CUDA generators
            "rank_generators": [r["generators"] for r in per_rank],
            "world_size": self.context.world_size,
            "epoch_progress": progress.to_dict([r["epoch"] for r in per_rank]) if progress is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(epoch=int(state["epoch"]), step=int(state["step"]), alpha=float(state["alpha"]))
        self.model.alpha = self.state.alpha
        self.data_generator.set_state(state["generators"]["data"])
        rank, world = self.context.rank, self.context.world_size
        saved_world = int(state.get("world_size", 1))
        progress = state.get("epoch_progress")
        self.epoch_progress = None
        if progress is not None:
            self.epoch_progress = (EpochProgress.from_dict(progress, rank) if saved_world == world
                                   else EpochProgress(progress["permutation"]))
        rank_generators = state.get("rank_generators") or [{"synthesis": state["generators"]["synthesis"]}]
        if rank < len(rank_generators):
            self.synthesis_generator.set_state(rank_generators[rank]["synthesis"])
            if "torch_cpu" in rank_generators[rank]:
                restore_global_rng_states(rank_generators[rank], self.device)
        if saved_world != world:
            # The shares of the data and the per-rank anomaly streams depend on the world
            # size: an interrupted epoch starts over (same permutation) and the run goes on
            # correctly, but not bit for bit as the original world would have.
            self.state.step = self.state.epoch * self.steps_per_epoch


# ----------------------------------------------------------------------------- entry

def _load_training_data(config: Config, data: str | Path, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    from .data.bmad import load_split
    slices = load_split(data, "train", size=config.image_size)
    images = slices.images
    if config.max_train_images is not None and images.shape[0] > config.max_train_images:
        keep = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(config.seed))
        images = images[keep[: config.max_train_images].sort().values]
    sources = None
    if config.anomaly_source:
        from .data.sources import load_anomaly_sources
        sources = load_anomaly_sources(config.anomaly_source, config.image_size,
                                       max_images=config.source_pool_size)
    return images, sources


def train(config: Config, out: str | Path, *, resume: bool = False, device: str | torch.device | None = None,
          progress: bool = True, log: Any = None, keep_checkpoints: int = DEFAULT_KEEP,
          deterministic: bool = False) -> dict[str, Any]:
    """Train a run into ``out``; returns the last epoch's log record.

    ``config.data`` names the BMAD-layout folder. ``resume=True`` continues from the newest
    readable checkpoint of ``out`` (an unreadable newer one is skipped with a message; its
    architecture must match ``config``); without it, a run directory that already holds a
    checkpoint is refused. ``log`` is a callable for one-line messages (default: print to
    stderr); only the main process says anything. ``keep_checkpoints``: how many checkpoints
    stay on disk. ``deterministic``: see :func:`deterministic_mode`.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; it joins the process
    group (made once per process) and trains its share (module docstring). Raises
    :class:`TrainingInterrupted` after SIGINT/SIGTERM (a checkpoint was written) and
    ``FloatingPointError`` on a non-finite loss (naming the step and the last good checkpoint).
    """
    if config.data is None:
        raise ValueError("config.data (--data) must name a BMAD-layout data folder")
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints (--keep-checkpoints) must be >= 1; got {keep_checkpoints}")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    context = distributed.init_distributed(device)  # a no-op without torchrun
    with deterministic_mode(deterministic, context.device):
        return _train(config, Path(out), resume, context, progress, log, keep_checkpoints)


def _train(config: Config, out: Path, resume: bool, context: DistributedContext, progress: bool, log: Any,
           keep_checkpoints: int) -> dict[str, Any]:
    device = context.device
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
    elif list_checkpoints(run.path) or run.checkpoint_path.exists():
        raise FileExistsError(f"{run.path} already holds a checkpoint; pass --resume to continue "
                              f"that run or choose another --out")

    ops_context = ops.use_reference() if config.reference_ops else contextlib.nullcontext()
    with ops_context:
        images, sources = _load_training_data(config, config.data, device)
        trainer = Trainer(config, images, sources, device, context)
        records = run.read_log()
        if found is not None:
            saved_world = int(found.state.get("world_size", 1))
            trainer.load_state_dict(found.state)
            records = [r for r in records if r.get("epoch", 0) <= trainer.state.epoch]
            say(f"resuming {run.path} from {found.path.name}: epoch {trainer.state.epoch}, "
                f"step {trainer.state.step} of {config.epochs} epochs")
            if saved_world != context.world_size:
                say(f"the checkpoint was written by {saved_world} process(es) and {context.world_size} resume it: "
                    f"the data shares and anomaly draws differ from an uninterrupted run")
        run.write_config(config)
        world = f", {context.world_size} processes ({context.backend})" if context.is_distributed else ""
        say(f"training {config.preset} preset ({config.variant}) on {images.shape[0]} images of "
            f"{config.image_size}x{config.image_size}, {config.epochs} epochs x {trainer.steps_per_epoch} "
            f"steps, device {device}{world}, ops: {'reference' if ops.using_reference() else 'extension'}")

        bar = None
        if progress and run.writer:
            from tqdm import tqdm
            total = config.epochs * trainer.steps_per_epoch
            bar = tqdm(total=total, initial=min(trainer.state.step, total), desc="train", unit="step",
                       dynamic_ncols=True)
        record: dict[str, Any] = records[-1] if records else {}
        stop = _StopOnSignal(trainer)
        try:
            with stop:
                while trainer.state.epoch < config.epochs:
                    epoch_record = trainer.train_epoch(bar)
                    if epoch_record is not None:
                        record = epoch_record
                        records.append(record)
                        run.write_log(records)
                        last = trainer.state.epoch == config.epochs
                        if last or trainer.state.epoch % config.checkpoint_every == 0:
                            run.save_checkpoint(trainer.state_dict())
                        if bar is None:
                            say(f"epoch {record['epoch']}/{config.epochs} loss {record['loss']:.4f} "
                                f"alpha {record['alpha']:.3f} lr {record['lr']:.2e} "
                                f"{record['images_per_s']:.1f} img/s")
                    if trainer.stop_now and trainer.state.epoch < config.epochs:
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


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="BMAD-layout folder (uses train/good)")
    parser.add_argument("--anomaly-source", metavar="DIR",
                        help="folder of anomaly-source images (default: Perlin-texture fallback)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                        help="paper: the published setting; small: sized for a CPU (default paper)")
    parser.add_argument("--out", metavar="RUN", help="run directory (default runs/<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g = parser.add_argument_group("training overrides (default: the preset's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--image-size", type=int, help="training side in pixels")
    g.add_argument("--recon-width", type=int, help="base width w of the reconstruction network")
    g.add_argument("--seg-width", type=int, help="base width of the segmentation network")
    g.add_argument("--seg-depth", type=int, help="max-pools of the segmentation U-Net (paper 5)")
    g.add_argument("--alpha-decay-epochs", type=float, help="epochs over which alpha decays 1 -> 0")
    g.add_argument("--butterworth-order", type=int, help="2: textbook 2nd order (default); 1: paper's formula")
    g.add_argument("--d0", type=float, help="Butterworth cut-off at 256x256 (default 30)")
    g.add_argument("--p-anomaly", type=float, help="probability a training sample gets an anomaly")
    g.add_argument("--max-train-images", type=int, help="use at most N training slices (seeded subset)")
    g.add_argument("--source-pool-size", type=int, help="anomaly-source images kept on the device")
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint-every", type=int, metavar="E", help="write the checkpoint every E epochs")
    g.add_argument("--keep-checkpoints", type=int, default=DEFAULT_KEEP, metavar="K",
                   help=f"keep the newest K checkpoints in the run directory (default {DEFAULT_KEEP})")
    a = parser.add_argument_group("ablations (paper Tables 3-5)")
    a.add_argument("--no-roi", action="store_true", help="no liver localisation in the synthesis")
    a.add_argument("--no-highpass", action="store_true", help="reconstruct from the image, not its high-pass")
    modes = a.add_mutually_exclusive_group()
    modes.add_argument("--recon-only", action="store_true",
                       help="reconstruction network only; score = multi-scale gradient-magnitude similarity")
    modes.add_argument("--seg-only", action="store_true", help="segmentation network only")
    a.add_argument("--no-synthesis", action="store_true", help="train without anomaly synthesis")
    r = parser.add_argument_group("runtime")
    r.add_argument("--reference-ops", action="store_true",
                   help="use the pure-PyTorch reference ops instead of the compiled extension")
    r.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    r.add_argument("--no-channels-last", action="store_true", help="no channels_last memory format")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: with the same --seed, identical loss logs and weights "
                        "(bitwise on the CPU), also across --resume")


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved :class:`Config` of the parsed command line."""
    mode = "recon_only" if args.recon_only else "seg_only" if args.seg_only else "full"
    overrides = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        recon_width=args.recon_width, seg_width=args.seg_width, seg_depth=args.seg_depth,
        alpha_decay_epochs=args.alpha_decay_epochs,
        butterworth_order=args.butterworth_order, d0=args.d0, p_anomaly=args.p_anomaly,
        max_train_images=args.max_train_images, source_pool_size=args.source_pool_size, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        anomaly_source=str(args.anomaly_source) if args.anomaly_source else None, data=str(args.data),
        mode=mode, roi=not args.no_roi, highpass=not args.no_highpass, synthesis=not args.no_synthesis,
        reference_ops=args.reference_ops, amp=not args.no_amp, channels_last=not args.no_channels_last)
    return preset_config(args.preset, **overrides)


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        device = resolve_device(args.device)
        context = distributed.init_distributed(device)  # a no-op without torchrun
        # every rank uses rank 0's default run directory (their clocks may disagree on the second)
        default_out = Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(args.out) if args.out else distributed.broadcast_object(default_out)
        start = time.perf_counter()
        try:
            record = train(config, out, resume=args.resume, device=context.device, progress=not args.no_progress,
                           keep_checkpoints=args.keep_checkpoints, deterministic=args.deterministic)
        except TrainingInterrupted as exc:
            if context.is_main:
                print(f"medad-fast train: {exc}", file=sys.stderr)
            return exc.exit_code
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"medad-fast train: error: {exc}", file=sys.stderr)
        return 2
    if not context.is_main:
        return 0
    minutes = (time.perf_counter() - start) / 60
    if record:
        print(f"trained {out} to epoch {record['epoch']}: loss {record['loss']:.4f}, alpha {record['alpha']:.3f} "
              f"({minutes:.1f} min)")
    print(f"checkpoint: {out / CHECKPOINT_NAME}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="medad-fast train")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
