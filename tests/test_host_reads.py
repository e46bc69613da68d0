"""Host reads of tensor values in one training step, for EVERY registered method.

On a GPU every read of a device value on the host (``Tensor.item``, ``float(t)``,
``bool(t)``, ``.tolist()``, ``.cpu()``, a data-dependent shape such as ``nonzero``)
waits for all queued kernels: the GPU idles while Python catches up. A step may make ONE
such read, the trainer's non-finite-loss check (it must come before backward, so no
weights are updated from a bad loss), plus the synthesis' one read per redraw of empty
anomaly masks (``AnomalySynthesizer.last_retries``; usually zero or one try).

On the CPU every tensor is host memory, so the test counts the *value reads* a GPU would
have to synchronise for: the dispatcher calls ``aten._local_scalar_dense`` (what
``item``/``float``/``int``/``bool`` all call), ``aten.equal``, ``aten.is_nonzero``, the
ops with data-dependent output shapes (``nonzero``, ``masked_select``, ``unique``, boolean
indexing), and device-to-host copies (on CUDA); plus ``Tensor.tolist``/``Tensor.numpy``,
which read CPU memory without going through the dispatcher. Values that live on the host
on every device are not counted: the optimiser's ``step`` counters (``torch.optim.Adam``
keeps them as CPU tensors unless ``capturable``) and the CPU batch indices.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medad_fast.data.phantom import ellipse_slices
from medad_fast.methods import create_method, method_names, resolve_config
from medad_fast.train import Trainer

from conftest import requires_cuda

aten = torch.ops.aten
PACKAGE = str(Path(__file__).resolve().parents[1] / "medad_fast")
#: reads of values allowed per step, besides the synthesis' one per redraw
ALLOWED_READS = 1

# ops whose result needs a device value on the host (a scalar, or an output shape)
VALUE_READS = {aten._local_scalar_dense, aten.equal, aten.is_nonzero, aten.nonzero, aten.masked_select,
               aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.repeat_interleave}


@dataclass
class HostRead:
    """One read: the op (or Tensor method) and where in the package it came from."""

    what: str
    where: str  # innermost frame in medad_fast, else the innermost frame outside torch and this file

    def __str__(self) -> str:
        return f"{self.what} at {self.where}"


_COUNTER_FRAMES = {"_caller", "_record", "__torch_dispatch__", "counted"}


def _caller() -> str:
    frames = [f for f in traceback.extract_stack() if not (f.filename == __file__ and f.name in _COUNTER_FRAMES)]
    ours = [f for f in frames if f.filename.startswith(PACKAGE)]
    outside = [f for f in frames if "/torch/" not in f.filename]
    frame = (ours or outside or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


@dataclass
class HostReadCounter(TorchDispatchMode):
    """Records every read of a tensor value on the host while active (see the module doc).

    ``host_resident``: data pointers of tensors that stay on the host on every device.
    ``device_only``: count only reads of tensors on a device other than the CPU (a step
    on CUDA: reading a CPU tensor, e.g. a step counter, does not wait for the GPU)."""

    host_resident: set[int] = field(default_factory=set)
    device_only: bool = False
    reads: list[HostRead] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def _record(self, what: str, tensor: torch.Tensor | None) -> None:
        if tensor is not None and (tensor.data_ptr() in self.host_resident
                                   or (self.device_only and tensor.device.type == "cpu")):
            return
        self.reads.append(HostRead(what, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if packet in VALUE_READS:
            self._record(str(packet), first)
        elif packet in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
            self._record(f"{packet} (boolean mask)", first)
        elif packet in (aten._to_copy, aten.copy_):
            source = args[1] if packet is aten.copy_ else args[0]
            target = args[0].device if packet is aten.copy_ else kwargs.get("device")
            if source.device.type != "cpu" and target is not None and torch.device(target).type == "cpu":
                self._record(f"{packet} (device to host)", source)
        return func(*args, **kwargs)

    def __enter__(self):
        # tolist/numpy read CPU memory directly, without a dispatcher call
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self._saved.items():
            def counted(tensor, *a, _method=method, _name=name, **k):
                self._record(f"Tensor.{_name}", tensor)
                return _method(tensor, *a, **k)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)


def host_reads_of_a_step(name: str, device: torch.device, preset: str = "tiny"
                         ) -> tuple[list[HostRead], int]:
    """``(reads, synthesis tries)`` of the second training step of ``name`` (the first
    one warms up: lazy initialisation and the optimiser's state are not per-step costs)."""
    config = resolve_config(name, preset)
    images = ellipse_slices(4 * config.run.batch_size, config.run.image_size)
    trainer = Trainer(create_method(config), images, device)
    batches = trainer.epoch_order()
    trainer.train_step(batches[0])
    steps = {t.data_ptr() for optimizer in trainer.optimizers for state in optimizer.state.values()
             for key, t in state.items() if key == "step" and isinstance(t, torch.Tensor) and t.device.type == "cpu"}
    with HostReadCounter(host_resident=steps, device_only=device.type != "cpu") as counter:
        trainer.train_step(batches[1])
    synthesizer = getattr(trainer.method, "synthesizer", None)
    tries = synthesizer.last_retries if synthesizer is not None else 0
    return counter.reads, tries


def _is_synthesis_try(read: HostRead) -> bool:
    return read.what == "aten.nonzero" and read.where.startswith("synthesis.py:")


def check_reads(reads: list[HostRead], tries: int) -> None:
    """At most :data:`ALLOWED_READS` reads besides the synthesis' ``tries`` redraw checks."""
    redraw_checks = [r for r in reads if _is_synthesis_try(r)]
    others = [r for r in reads if not _is_synthesis_try(r)]
    assert len(redraw_checks) <= tries + 1, "\n".join(map(str, redraw_checks))
    assert len(others) <= ALLOWED_READS, (
        f"{len(others)} host reads of tensor values in one step (at most {ALLOWED_READS}):\n  "
        + "\n  ".join(map(str, others)))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", method_names())
def test_one_training_step_reads_at_most_one_value_on_the_host(name):
    reads, tries = host_reads_of_a_step(name, torch.device("cpu"))
    check_reads(reads, tries)


@requires_cuda
@pytest.mark.parametrize("name", method_names())
def test_one_cuda_training_step_reads_at_most_one_value_on_the_host(name):
    # the paper preset as users train it on a GPU: AMP + channels_last (the presets' default)
    reads, tries = host_reads_of_a_step(name, torch.device("cuda"), preset="paper")
    check_reads(reads, tries)


def test_the_counter_sees_item_bool_tolist_and_nonzero():
    t = torch.arange(6.0)
    with HostReadCounter() as counter:
        t.sum().item(), bool(t[1]), float(t[2]), int(t[3]), t.tolist(), t.numpy(), t.nonzero()
        t[t > 2]
        t.mul(2).add(1)  # no read
    kinds = [r.what for r in counter.reads]
    assert kinds.count("aten._local_scalar_dense") + kinds.count("aten.is_nonzero") == 4, kinds
    assert {"Tensor.tolist", "Tensor.numpy", "aten.nonzero", "aten.index (boolean mask)"} <= set(kinds), kinds
    assert len(kinds) == 8, kinds
    assert all("test_host_reads.py" in r.where for r in counter.reads)
