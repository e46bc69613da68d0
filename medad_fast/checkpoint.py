"""Crash-safe checkpoints of a training run: atomic durable writes, the last K kept,
resume from the newest readable one.

Files in the run directory::

    checkpoint-e00003-s000000120.pt   one file per checkpoint: completed epochs, completed steps
    checkpoint.pt                     the newest checkpoint (a hard link to it, or a copy where
                                      the file system has no hard links)
    checkpoint-best.pt                with a validation set (``--val-fraction``): the checkpoint
                                      of the epoch with the best validation score (a hard link
                                      or a copy, so pruning the numbered files keeps it); what
                                      evaluate and predict read when it exists
                                      (:func:`medad_fast.inference.resolve_checkpoint`)

Every write goes through :func:`medad_fast.io.atomic_write_bytes` with ``fsync=True``: the
bytes go to a temporary file in the run directory, which is flushed and fsynced, renamed
over the destination with ``os.replace`` and the directory is fsynced. A crash (SIGKILL,
power loss) at any moment leaves the previous checkpoints intact; the older ones are only
deleted (keeping the newest ``keep``) once the new one is on disk.

:func:`latest_valid_checkpoint` tries the checkpoints newest first and skips, with a
message naming it, any file that does not load with ``torch.load(weights_only=True)`` (a
truncated or corrupt file) or lacks the keys a resume needs.

The checkpoint dict itself is assembled by :meth:`medad_fast.train.Trainer.state_dict`
(format 2: ``method``, ``config`` with the run's and the method's parts, the method's
``model`` weights and ``method_state``, ``optimizers``, ``schedulers``, progress and RNG
states). Checkpoints of format 1 (one method, written up to commit ef63857) are migrated
on load (:func:`migrate_checkpoint`), so they evaluate and resume as before.
Every load uses ``torch.load(weights_only=True)``: no code runs from the file.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .io import atomic_write_bytes, fsync_directory
from .methods import config_from_dict

__all__ = [
    "CHECKPOINT_FORMAT",
    "checkpoint_bytes",
    "load_checkpoint",
    "migrate_checkpoint",
    "LATEST_NAME",
    "BEST_NAME",
    "point_best_checkpoint",
    "DEFAULT_KEEP",
    "REQUIRED_KEYS",
    "checkpoint_filename",
    "list_checkpoints",
    "save_checkpoint",
    "prune_checkpoints",
    "FoundCheckpoint",
    "latest_valid_checkpoint",
    "global_rng_states",
    "restore_global_rng_states",
]

#: the newest checkpoint under a fixed name (what a run directory resolves to)
LATEST_NAME = "checkpoint.pt"
#: the checkpoint of the epoch with the best validation score (never pruned)
BEST_NAME = "checkpoint-best.pt"
#: checkpoints kept by default (``--keep-checkpoints``)
DEFAULT_KEEP = 3
#: keys without which a checkpoint cannot resume a run
REQUIRED_KEYS = ("config", "model", "optimizers", "schedulers", "epoch", "step")
#: the format tag written now; format 1 is migrated on load
CHECKPOINT_FORMAT = "medad_fast.checkpoint/2"
_FORMAT_1 = "medad_fast.checkpoint/1"

_NAME = re.compile(r"^checkpoint-e(\d+)-s(\d+)\.pt$")
_STALE_TEMP = re.compile(r"^\.checkpoint.*\.tmp$")


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """Serialise a checkpoint dict to bytes (for an atomic write), tagged with the format."""
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT}, buffer)
    return buffer.getvalue()


def migrate_checkpoint(state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 checkpoint (the paper's method only, flat config) in format 2; a format-2
    one unchanged. Format 1 kept the model's weights at the top level, one optimizer and
    scheduler, ``alpha`` at the top and the synthesis generator under ``synthesis``."""
    if state.get("format") != _FORMAT_1:
        return state
    config = config_from_dict(state["config"])
    migrated = dict(state)
    migrated.update(
        format=CHECKPOINT_FORMAT, method=config.run.method, config=config.to_dict(),
        model={f"model.{k}": v for k, v in state["model"].items()},
        method_state={"alpha": float(state.get("alpha", 0.0))})
    for old, new in (("optimizer", "optimizers"), ("scheduler", "schedulers")):
        if old in state:
            migrated[new] = [migrated.pop(old)]
    if "generators" in state:
        generators = dict(state["generators"])
        generators["method"] = generators.pop("synthesis")
        migrated["generators"] = generators
    if state.get("rank_generators"):
        migrated["rank_generators"] = [{("method" if k == "synthesis" else k): v for k, v in r.items()}
                                       for r in state["rank_generators"]]
    progress = state.get("epoch_progress")
    if progress is not None:  # the summed loss terms of an interrupted epoch, under today's names
        names = {"total": "loss", "anomalous_sum": "anomalous_fraction"}
        migrated["epoch_progress"] = {**progress, "rank_sums": [
            {"sums": {names.get(k, f"loss_{k}"): v for k, v in
                      {**r["sums"], "anomalous_sum": r.get("anomalous_sum", 0.0)}.items()}}
            for r in progress["rank_sums"]]}
    migrated.pop("alpha", None)
    return migrated


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    expected: Config | None = None) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file), migrated
    to the current format.

    With ``expected``, refuse (``ValueError``) a checkpoint whose architecture differs,
    e.g. one trained with ``--preset paper`` loaded by a ``--preset small`` model, or one
    of another method.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that needs code to load
        raise ValueError(f"{path} is not a readable medad_fast checkpoint ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") not in (CHECKPOINT_FORMAT, _FORMAT_1):
        raise ValueError(f"{path} is not a medad_fast checkpoint (format tag "
                         f"{state.get('format') if isinstance(state, dict) else None!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    state = migrate_checkpoint(state)
    if expected is not None:
        saved = config_from_dict(state["config"]).architecture()
        wanted = expected.architecture()
        if saved != wanted:
            differences = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs requested {wanted.get(k)!r}"
                                    for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
            raise ValueError(f"checkpoint {path} was trained as {saved['method']} preset {saved['preset']!r} and "
                             f"does not fit {wanted['method']} preset {wanted['preset']!r} ({differences}); use "
                             f"the same --method/--preset/widths as the checkpoint or a new run directory")
    return state


def checkpoint_filename(epoch: int, step: int) -> str:
    """``checkpoint-e{epoch:05d}-s{step:09d}.pt`` (zero padded, so names sort by progress)."""
    if epoch < 0 or step < 0:
        raise ValueError(f"epoch and step must be >= 0; got epoch={epoch}, step={step}")
    return f"checkpoint-e{epoch:05d}-s{step:09d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The numbered checkpoint files of ``run_dir``, newest (most steps) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.append(((int(match.group(2)), int(match.group(1))), path))
    return [path for _, path in sorted(found, reverse=True)]


def _point_at(run_dir: Path, name: str, target: Path, data: bytes | None = None) -> Path:
    """Make ``run_dir/name`` the checkpoint ``target``, atomically: a hard link made under a
    temporary name and renamed over the old one (no second copy of the bytes); where hard
    links are not supported, an atomic durable copy (of ``data``, or of ``target``'s bytes)."""
    destination = run_dir / name
    temporary = run_dir / f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        os.link(target, temporary)
    except OSError:
        atomic_write_bytes(destination, data if data is not None else Path(target).read_bytes(), fsync=True)
        return destination
    try:
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(run_dir)
    return destination


def _point_latest(run_dir: Path, target: Path, data: bytes) -> None:
    """Make ``run_dir/checkpoint.pt`` the newest checkpoint (:func:`_point_at`)."""
    _point_at(run_dir, LATEST_NAME, target, data)


def point_best_checkpoint(run_dir: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make ``run_dir/checkpoint-best.pt`` the checkpoint file ``target`` (a numbered
    checkpoint of ``run_dir``), atomically and durably: a hard link, so pruning ``target``'s
    name later keeps the file, or a copy where the file system has no hard links.
    Returns the path of the best checkpoint."""
    target = Path(target)
    if not target.is_file():
        raise FileNotFoundError(f"checkpoint not found: {target}")
    return _point_at(Path(run_dir), BEST_NAME, target)


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` numbered checkpoints, and temporary files a killed
    writer left behind. Returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    run_dir = Path(run_dir)
    removed = list_checkpoints(run_dir)[keep:]
    removed += [p for p in run_dir.iterdir() if _STALE_TEMP.match(p.name)]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        fsync_directory(run_dir)
    return removed


def save_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], keep: int = DEFAULT_KEEP) -> Path:
    """Write ``state`` as ``run_dir/checkpoint-e<epoch>-s<step>.pt`` (atomic and durable),
    point ``checkpoint.pt`` at it, then delete all but the newest ``keep`` checkpoints.

    ``state`` needs at least :data:`REQUIRED_KEYS`; tensors and plain values only (it must
    load with ``weights_only=True``). Call it on one process only (rank 0).
    Returns the path of the new checkpoint.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (--keep-checkpoints); got {keep}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"checkpoint state lacks {missing}")
    run_dir = Path(run_dir)
    data = checkpoint_bytes(state)
    path = atomic_write_bytes(run_dir / checkpoint_filename(int(state["epoch"]), int(state["step"])),
                              data, fsync=True)
    _point_latest(run_dir, path, data)
    prune_checkpoints(run_dir, keep)
    return path


@dataclass
class FoundCheckpoint:
    """What :func:`latest_valid_checkpoint` found: the file, its contents, and the newer
    files it skipped with the reason."""

    path: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def latest_valid_checkpoint(run_dir: str | os.PathLike, expected: Config | None = None,
                            log: Callable[[str], None] | None = _stderr) -> FoundCheckpoint | None:
    """The newest checkpoint of ``run_dir`` that loads, or None when there is none at all.

    Candidates are the numbered checkpoints, newest first, then ``checkpoint.pt`` when it
    is not one of them (a run written before numbered checkpoints). A candidate that fails
    ``torch.load(weights_only=True)`` (truncated, corrupt, not a checkpoint) or lacks
    :data:`REQUIRED_KEYS` is skipped and ``log`` is told which file and why.

    Raises ``ValueError`` when checkpoints exist but none is readable (naming them), and
    when ``expected`` is given and the checkpoint's architecture (preset, widths, mode)
    differs from it: that is a wrong ``--out`` or ``--preset``, not a corrupt file.
    """
    run_dir = Path(run_dir)
    candidates = list_checkpoints(run_dir)
    latest = run_dir / LATEST_NAME
    if latest.is_file() and not any(os.path.samefile(latest, p) for p in candidates):
        candidates.append(latest)
    skipped: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            state = load_checkpoint(path, map_location="cpu")
        except (ValueError, FileNotFoundError, OSError) as exc:
            reason = str(exc)
        else:
            missing = [key for key in REQUIRED_KEYS if key not in state]
            if not missing:
                if expected is not None:
                    _check_architecture(path, state, expected)
                return FoundCheckpoint(path, state, skipped)
            reason = f"it lacks {missing}"
        skipped.append((path, reason))
        if log is not None:
            log(f"skipping unreadable checkpoint {path}: {reason}; trying the previous one")
    if skipped:
        names = ", ".join(str(p) for p, _ in skipped)
        raise ValueError(f"no readable checkpoint in {run_dir}: every candidate failed to load ({names})")
    return None


def _check_architecture(path: Path, state: dict[str, Any], expected: Config) -> None:
    if config_from_dict(state["config"]).architecture() != expected.architecture():
        # load_checkpoint words the refusal (which fields differ); only this error path reads twice
        load_checkpoint(path, map_location="cpu", expected=expected)
        raise ValueError(f"checkpoint {path} does not fit the requested model")  # not reached


# ----------------------------------------------------------------------------- RNG states

def global_rng_states(device: torch.device) -> dict[str, torch.Tensor | None]:
    """torch's global generators of this process: the CPU one and, on a CUDA device, that
    device's (uint8 state tensors on the CPU, ``None`` for a device without one)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch_cpu": torch.get_rng_state(), "cuda": cuda}


def restore_global_rng_states(states: dict[str, torch.Tensor | None], device: torch.device) -> None:
    """Inverse of :func:`global_rng_states` (a missing CUDA state is left alone)."""
    torch.set_rng_state(states["torch_cpu"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
