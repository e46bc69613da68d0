"""Multi-process (torchrun) support: process group, ranks, sharding, gathering, seeds.

Launch::

    torchrun --nproc_per_node N -m medad_fast.cli train --data DIR ...
    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:PORT \\
             --rdzv_id JOB -m medad_fast.cli train --data DIR ...

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``
in every process; :func:`init_distributed` reads them. One process drives one device:

* CUDA: process ``LOCAL_RANK`` uses ``cuda:LOCAL_RANK`` and the ``nccl`` backend;
* CPU (``--device cpu`` or no GPU): the ``gloo`` backend.

The process group is created once per process and destroyed when the process exits: a
later command in the same process (``evaluate`` after ``train`` in one script) reuses it,
because a default process group cannot be re-created reliably under torchrun once destroyed.

Without torchrun (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) nothing is initialised and every
function here is a cheap local no-op: rank 0 of a world of 1, :func:`shard` returns
everything, :func:`gather_objects` returns ``[obj]``. So the single-process code path pays
nothing for the distributed one.

Seeds (:func:`rank_seed`): rank ``r`` uses ``seed + r * RANK_SEED_STRIDE`` for the
generators that must differ between ranks (anomaly synthesis); rank 0 keeps ``seed``
itself, so a 1-process run and rank 0 of an N-process run draw the same anomalies. The
stride (a prime above a million) keeps the per-rank seeds clear of the small offsets
(``seed + 1``, ``seed + 2``) the trainer uses for its different generators. The data
order generator and the weight initialisation are NOT per rank: every rank draws the same
epoch permutation and takes its own shard of it (what ``DistributedSampler`` does).
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "RANK_SEED_STRIDE",
    "DistributedContext",
    "launched_by_torchrun",
    "init_distributed",
    "shutdown",
    "is_distributed",
    "is_main_process",
    "rank",
    "world_size",
    "barrier",
    "shard_bounds",
    "shard",
    "gather_objects",
    "broadcast_object",
    "broadcast_tensors_",
    "all_gather_uneven",
    "all_reduce_sum",
    "rank_seed",
]

#: rank r seeds its per-rank generators with ``seed + r * RANK_SEED_STRIDE``
RANK_SEED_STRIDE = 1_000_003

T = TypeVar("T")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, the device it
    drives, and the backend (None in a single process). ``owns_group`` is True when
    :func:`init_distributed` created the process group (and :func:`shutdown` destroys it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def launched_by_torchrun() -> bool:
    """True when the environment describes a world of more than one process."""
    return _env_int("WORLD_SIZE", 1) > 1


def _device_for_rank(device: torch.device, local_rank: int, world: int) -> torch.device:
    """The device process ``local_rank`` drives: ``cuda`` without an index becomes
    ``cuda:LOCAL_RANK``; an explicit index must be this rank's own under torchrun."""
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if device.index is None:
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible; "
                             f"use --nproc_per_node <= {count} (one process per GPU)")
        return torch.device("cuda", local_rank)
    if world > 1 and device.index != local_rank:
        raise ValueError(f"--device {device} under torchrun: process LOCAL_RANK={local_rank} drives "
                         f"cuda:{local_rank}; pass --device cuda (or auto) and select GPUs with "
                         f"CUDA_VISIBLE_DEVICES")
    return device


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistributedContext:
    """Set up this process from the torchrun environment.

    Args:
        device: the resolved training device (``cpu``, ``cuda`` or ``cuda:N``); under
            torchrun a bare ``cuda`` becomes ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout (a rank that dies is noticed after at most this long).

    Returns the :class:`DistributedContext`. Without torchrun (``WORLD_SIZE`` unset or 1)
    nothing is initialised. If a process group already exists (made by an earlier call or
    by the caller) it is used as is. A group created here is destroyed at process exit.
    """
    if dist.is_available() and dist.is_initialized():
        world, this_rank = dist.get_world_size(), dist.get_rank()
        local = _env_int("LOCAL_RANK", this_rank)
        device = _device_for_rank(device, local, world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistributedContext(this_rank, world, local, device, dist.get_backend(), owns_group=False)

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistributedContext(device=device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    this_rank = _env_int("RANK", -1)
    local = _env_int("LOCAL_RANK", -1)
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing or this_rank < 0 or local < 0:
        raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing) or 'RANK/LOCAL_RANK'} is missing or "
                         f"invalid: launch with torchrun, which sets them")
    device = _device_for_rank(device, local, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init, so NCCL binds this rank to its own GPU
    dist.init_process_group(backend=backend, rank=this_rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(_destroy_at_exit)
    return DistributedContext(this_rank, world, local, device, backend, owns_group=True)


#: how long the ranks wait for each other before tearing the group down
_EXIT_BARRIER_S = 60.0


def _destroy_group() -> None:
    """Meet the other ranks, then destroy the group. Without the meeting a rank that tears
    gloo down while its peer is still finishing its last collective (or already gone) can
    abort in gloo's threads ("terminate called without an active exception", seen at the
    end of 2-rank CPU runs). A peer that never comes (it crashed) is given up on after
    ``_EXIT_BARRIER_S``: the group is destroyed all the same."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=_EXIT_BARRIER_S))
            else:
                dist.barrier()
    except Exception:  # noqa: BLE001 - a failed meeting must not stop the teardown
        pass
    dist.destroy_process_group()


def _destroy_at_exit() -> None:
    _destroy_group()


def shutdown(context: DistributedContext) -> None:
    """Destroy the process group now if ``context`` created it (idempotent). Optional: a
    group made by :func:`init_distributed` is destroyed at process exit anyway."""
    if context.owns_group:
        _destroy_group()


# ----------------------------------------------------------------------------- queries

def is_distributed() -> bool:
    """A process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or a single process: the one that writes files and prints progress."""
    return rank() == 0


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- sharding

def shard_bounds(n: int, this_rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``this_rank``'s contiguous share of ``n`` items.

    Shares differ by at most one item (the first ``n % world`` ranks get one more) and, in
    rank order, tile ``0..n`` exactly, so concatenating the gathered per-rank results gives
    the original order back. A rank may get an empty share when ``n < world``.
    """
    this_rank = rank() if this_rank is None else this_rank
    world = world_size() if world is None else world
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    if world < 1 or not 0 <= this_rank < world:
        raise ValueError(f"rank {this_rank} is not in a world of {world}")
    base, extra = divmod(n, world)
    start = this_rank * base + min(this_rank, extra)
    return start, start + base + (1 if this_rank < extra else 0)


def shard(items: Sequence[T] | torch.Tensor, this_rank: int | None = None, world: int | None = None
          ) -> Sequence[T] | torch.Tensor:
    """This rank's contiguous share of ``items`` (a list, tuple or tensor along dim 0);
    see :func:`shard_bounds`. A single process gets ``items`` itself."""
    start, stop = shard_bounds(len(items), this_rank, world)
    if start == 0 and stop == len(items):
        return items
    return items[start:stop]


# ----------------------------------------------------------------------------- collectives

def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` alone."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (the same shapes and dtypes on every rank) with rank ``src``'s,
    in one broadcast; a no-op in a single process or for none."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).to(
        _communication_device(tensors[0].device))
    dist.broadcast(flat, src=src)
    start = 0
    for tensor in tensors:
        tensor.detach().copy_(flat[start:start + tensor.numel()].view(tensor.shape).to(tensor.device))
        start += tensor.numel()


def _communication_device(tensor: torch.device) -> torch.device:
    # nccl only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones through the host)
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_uneven(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order, on every rank.

    The ranks' tensors may have different lengths along dim 0 (the shares of
    :func:`shard`, possibly empty) but must agree on the trailing shape and dtype.
    ``[n_r, ...]`` per rank -> ``[sum_r n_r, ...]`` on the device of ``tensor``.
    A single process gets ``tensor`` back.
    """
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    home = tensor.device
    comm = _communication_device(home)
    lengths = torch.zeros(world, dtype=torch.int64, device=comm)
    lengths[dist.get_rank()] = tensor.shape[0]
    dist.all_reduce(lengths)
    lengths_list = [int(n) for n in lengths.tolist()]
    longest = max(lengths_list)
    is_bool = tensor.dtype == torch.bool
    payload = tensor.to(torch.uint8) if is_bool else tensor  # not every backend moves bool
    padded = payload.new_zeros((longest, *payload.shape[1:]), device=comm)
    padded[: payload.shape[0]] = payload.to(comm)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous())
    result = torch.cat([piece[:n] for piece, n in zip(pieces, lengths_list)], dim=0).to(home)
    return result.bool() if is_bool else result


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks (returns a new tensor on ``tensor``'s device; the
    tensor itself in a single process)."""
    if not is_distributed():
        return tensor
    home = tensor.device
    buffer = tensor.detach().to(_communication_device(home), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(home)


# ----------------------------------------------------------------------------- seeds

def rank_seed(seed: int, this_rank: int | None = None) -> int:
    """The seed of a per-rank generator: ``seed + rank * RANK_SEED_STRIDE`` (rank 0 keeps
    ``seed``). Raises ``ValueError`` for a negative result (torch seeds are unsigned)."""
    this_rank = rank() if this_rank is None else this_rank
    if this_rank < 0:
        raise ValueError(f"rank must be >= 0; got {this_rank}")
    derived = int(seed) + int(this_rank) * RANK_SEED_STRIDE
    if derived < 0:
        raise ValueError(f"seed {seed} gives a negative per-rank seed {derived}; use a seed >= 0")
    return derived
