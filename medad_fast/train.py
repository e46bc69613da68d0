"""`medad-fast train`: train the method on the normal slices of a BMAD-layout folder.

One training step (DESIGN §1), all on the training device:

1. a batch of normal images ``I`` (uint8 tensors kept on the device, shuffled by a seeded
   generator) -> float in [0, 1];
2. anomaly synthesis (:class:`AnomalySynthesizer`, fused op, device generator) -> ``I_a, M``;
3. ``alpha`` of the skip connections from :func:`schedules.alpha_at` (per iteration);
4. forward ``R(highpass(I_a))``, ``S(concat(I_r, I_a))``; ``L_rec + L_seg``; Adam step.

Run directory (``--out``)::

    config.json       the resolved configuration (preset + overrides)
    log.jsonl         one JSON record per epoch: losses, alpha, lr, images/s, seconds
    checkpoint.pt     latest checkpoint (atomic write; model, optimizer, scheduler, scaler,
                      alpha, epoch, step, generator states): what --resume, evaluate and
                      predict read

Everything written goes through :class:`RunDirectory`, whose writes only happen on the
main process (rank 0), so adding DDP (torchrun) later only needs a process group, a
``DistributedDataParallel`` wrap and a per-rank shard of the batch order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import ops
from .config import PRESETS, Config, preset_config
from .io import atomic_write_bytes, atomic_write_json, atomic_write_text
from .losses import LossTerms, reconstruction_loss, segmentation_loss
from .models.model import FrequencyAwareModel, checkpoint_bytes, load_checkpoint
from .schedules import alpha_at, lr_milestone_epochs
from .synthesis import AnomalySynthesizer

__all__ = ["RunDirectory", "TrainState", "Trainer", "train", "resolve_device", "config_from_args",
           "add_arguments", "main"]

CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = "checkpoint.pt"


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


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes files and shows progress."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bfloat16 where supported, else float16); a no-op on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def needs_grad_scaler(device: torch.device, amp: bool) -> bool:
    """float16 autocast needs loss scaling; bfloat16 does not."""
    return amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()


class RunDirectory:
    """Every file a training run writes, behind one gate: only the main process writes."""

    def __init__(self, path: str | Path, writer: bool | None = None) -> None:
        self.path = Path(path)
        self.writer = is_main_process() if writer is None else writer

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

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_bytes(self.checkpoint_path, checkpoint_bytes(state))


@dataclass
class TrainState:
    """Progress counters saved in the checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed iterations
    alpha: float = 1.0


# ----------------------------------------------------------------------------- trainer

class Trainer:
    """Holds the model, optimiser, schedules, data and generators of one run.

    Args:
        config: resolved configuration.
        train_images: ``uint8 [N, 1, S, S]`` normal slices (S = ``config.image_size``).
        sources: ``float32 [K, 1, S, S]`` anomaly-source pool, or None to draw the Perlin
            texture fallback from the seed.
        device: training device.
    """

    def __init__(self, config: Config, train_images: torch.Tensor, sources: torch.Tensor | None,
                 device: torch.device) -> None:
        if train_images.dim() != 4 or train_images.shape[1] != 1 or train_images.dtype != torch.uint8:
            raise ValueError(f"train_images must be uint8 [N, 1, S, S]; got {train_images.dtype} "
                             f"{list(train_images.shape)}")
        if train_images.shape[0] == 0:
            raise ValueError("no training images")
        self.config = config
        self.device = device
        # channels_last also speeds up oneDNN convolutions on the CPU (~20 %), so it is used everywhere
        self.use_channels_last = config.channels_last
        self.use_amp = config.amp and device.type == "cuda"

        # generators: data order on the CPU, synthesis on the training device
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.synthesis_generator = torch.Generator(device=device).manual_seed(config.seed + 1)

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
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, lr_milestone_epochs(config.epochs, config.lr_milestones), gamma=config.lr_gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=needs_grad_scaler(device, config.amp))
        self.state = TrainState()

    # ------------------------------------------------------------------ schedule
    @property
    def steps_per_epoch(self) -> int:
        """Full batches per epoch (the last partial batch is dropped, unless the data holds
        less than one batch)."""
        return max(1, self.images.shape[0] // self.config.batch_size)

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
            output = self.model(augmented)
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
        if not torch.isfinite(terms.total):
            raise FloatingPointError(f"loss is {float(terms.total)} at step {self.state.step}; "
                                     f"lower --lr or check the data")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state.step += 1
        anomalous = (mask.flatten(1).amax(dim=1) > 0).float().mean()
        return terms, float(anomalous)

    def epoch_order(self) -> torch.Tensor:
        """Batch indices of one epoch, ``[steps_per_epoch, B]`` (CPU)."""
        n, batch = self.images.shape[0], self.config.batch_size
        order = torch.randperm(n, generator=self.data_generator)
        if n < batch:
            return order.view(1, n)
        return order[: self.steps_per_epoch * batch].view(self.steps_per_epoch, batch)

    def train_epoch(self, progress: Any = None) -> dict[str, Any]:
        """Run one epoch; returns its log record."""
        self.model.train()
        start = time.perf_counter()
        sums: dict[str, float] = {}
        anomalous_sum = 0.0
        order = self.epoch_order()
        for batch_index in order:
            terms, anomalous = self.train_step(batch_index)
            for key, value in vars(terms).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            anomalous_sum += anomalous
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(terms.total):.4f}", alpha=f"{self.state.alpha:.3f}")
        seconds = time.perf_counter() - start
        n_steps = order.shape[0]
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.epoch += 1
        record = {"epoch": self.state.epoch, "step": self.state.step}
        record.update({f"loss_{k}" if k != "total" else "loss": v / n_steps for k, v in sums.items()})
        record.update({"alpha": self.state.alpha, "lr": lr, "anomalous_fraction": anomalous_sum / n_steps,
                       "images_per_s": order.numel() / seconds, "seconds": seconds})
        return record

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything exact resume needs (tensors and plain values only: loads with
        ``weights_only=True``)."""
        model = self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model
        return {
            "config": self.config.to_dict(),
            "model": {k: v.contiguous() for k, v in model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.state.epoch,
            "step": self.state.step,
            "alpha": self.state.alpha,
            "generators": {"data": self.data_generator.get_state(),
                           "synthesis": self.synthesis_generator.get_state().cpu()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(epoch=int(state["epoch"]), step=int(state["step"]), alpha=float(state["alpha"]))
        self.model.alpha = self.state.alpha
        self.data_generator.set_state(state["generators"]["data"])
        self.synthesis_generator.set_state(state["generators"]["synthesis"])


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
          progress: bool = True, log: Any = None) -> dict[str, Any]:
    """Train a run into ``out``; returns the last epoch's log record.

    ``config.data`` names the BMAD-layout folder. ``resume=True`` continues from
    ``out/checkpoint.pt`` (its architecture must match ``config``); without it, a run
    directory that already holds a checkpoint is refused. ``log`` is a callable for
    one-line messages (default: print to stderr on the main process).
    """
    if config.data is None:
        raise ValueError("config.data (--data) must name a BMAD-layout data folder")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    run = RunDirectory(out)
    say = log or (lambda message: print(message, file=sys.stderr) if run.writer else None)

    checkpoint = None
    if run.checkpoint_path.exists():
        if not resume:
            raise FileExistsError(f"{run.checkpoint_path} already exists; pass --resume to continue "
                                  f"that run or choose another --out")
        checkpoint = load_checkpoint(run.checkpoint_path, map_location="cpu", expected=config)
    elif resume:
        raise FileNotFoundError(f"--resume: no checkpoint to resume in {run.path} ({CHECKPOINT_NAME} missing)")

    context = ops.use_reference() if config.reference_ops else contextlib.nullcontext()
    with context:
        images, sources = _load_training_data(config, config.data, device)
        trainer = Trainer(config, images, sources, device)
        records = run.read_log()
        if checkpoint is not None:
            trainer.load_state_dict(checkpoint)
            records = [r for r in records if r.get("epoch", 0) <= trainer.state.epoch]
            say(f"resuming {run.path} at epoch {trainer.state.epoch}/{config.epochs}")
        run.write_config(config)
        say(f"training {config.preset} preset ({config.mode}) on {images.shape[0]} images of "
            f"{config.image_size}x{config.image_size}, {config.epochs} epochs x {trainer.steps_per_epoch} "
            f"steps, device {device}, ops: {'reference' if ops.using_reference() else 'extension'}")

        bar = None
        if progress and run.writer:
            from tqdm import tqdm
            total = config.epochs * trainer.steps_per_epoch
            bar = tqdm(total=total, initial=min(trainer.state.step, total), desc="train", unit="step",
                       dynamic_ncols=True)
        record: dict[str, Any] = records[-1] if records else {}
        try:
            while trainer.state.epoch < config.epochs:
                record = trainer.train_epoch(bar)
                records.append(record)
                run.write_log(records)
                last = trainer.state.epoch == config.epochs
                if last or trainer.state.epoch % config.checkpoint_every == 0:
                    run.save_checkpoint(trainer.state_dict())
                if bar is None:
                    say(f"epoch {record['epoch']}/{config.epochs} loss {record['loss']:.4f} "
                        f"alpha {record['alpha']:.3f} lr {record['lr']:.2e} "
                        f"{record['images_per_s']:.1f} img/s")
        finally:
            if bar is not None:
                bar.close()
        if checkpoint is not None and not run.checkpoint_path.exists():
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


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved :class:`Config` of the parsed command line."""
    mode = "recon_only" if args.recon_only else "seg_only" if args.seg_only else "full"
    overrides = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        recon_width=args.recon_width, seg_width=args.seg_width, seg_depth=args.seg_depth, alpha_decay_epochs=args.alpha_decay_epochs,
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
        out = Path(args.out) if args.out else Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        start = time.perf_counter()
        record = train(config, out, resume=args.resume, device=args.device, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"medad-fast train: error: {exc}", file=sys.stderr)
        return 2
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
