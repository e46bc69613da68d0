"""Roofline of the training step and of inference: counted floating-point work / measured
time, against the machine's measured matmul rate, and where the time of a step goes.

    .venv/bin/python benchmarks/roofline.py            # every method, small + paper, 2 and 1 threads
    .venv/bin/python benchmarks/roofline.py --quick    # tiny preset, 1 round: checks that it runs

For every registered method and preset, two jobs:

* ``train step``: :meth:`medad_fast.train.Trainer.train_step` (synthesis, forward, losses,
  backward, optimiser step) on one batch;
* ``inference``: :meth:`medad_fast.methods.base.Method.predict` of one batch (eval mode).

Work = the floating-point operations ``torch.utils.flop_counter.FlopCounterMode`` counts
for one call: matrix products and convolutions, forward and backward (2 per
multiply-add); elementwise work, FFTs, pooling, the optimiser and the fused ops count 0,
so the rate is that of the convolutions, in the time of the whole job. Time = the best
of N calls (after a warm-up call: the counted one). The achievable rate = the best of 20
``torch.mm`` of two float32 ``2048 x 2048`` matrices (``2 * 2048^3`` flops), 10 before and
10 after the jobs, in the same run at the same thread count; ``% of matmul`` = job rate / matmul rate. Timed in wall time; the
1-thread run in process CPU time (see :func:`clock_for`). The paper preset is
timed at a smaller batch on the CPU (``--paper-batch``, default 2; the table says so).

The per-part breakdown times the ``frequency_aware`` small-preset step under
``torch.profiler``: synthesis, high-pass, each network's forward and the losses, and
the backward of each (the backward nodes of the autograd graph, attributed to the part
whose forward ops created them), the rest of the backward, the optimiser (``zero_grad`` +
``step``), and what remains of the step (Python, the engine, framework overhead).

Writes ``benchmarks/roofline.json`` and the "Roofline" section of ``benchmarks/RESULTS.md``
(which ``benchmarks/report.py`` keeps when it rewrites the file).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import sections  # this folder's RESULTS.md sections and paths
from sections import BENCH_DIR, RESULTS_MD
from sections import merge_section  # noqa: F401 (re-exported for tests/test_roofline.py)

RESULTS_JSON = BENCH_DIR / "roofline.json"
SECTION = "## Roofline: counted work / time vs the matmul rate"
MATMUL_SIDE = 2048
BREAKDOWN_METHOD = "frequency_aware"


# ----------------------------------------------------------------------------- work and time

def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call of ``fn`` as ``FlopCounterMode`` counts them
    (matmuls and convolutions, forward and backward, 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def best_time(fn: Callable[[], object], rounds: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Fastest of ``rounds`` calls of ``fn`` in seconds of ``clock``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(max(1, rounds)):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def clock_for(threads: int) -> Callable[[], float]:
    """Wall time, except at one thread: process CPU time, which time spent descheduled on
    a busy machine does not inflate (as ``benchmarks/report.py`` times its 1-thread runs)."""
    return time.process_time if threads == 1 else time.perf_counter


def matmul_rate(side: int = MATMUL_SIDE, rounds: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """Best float32 ``torch.mm`` rate in flop/s of two ``side x side`` matrices."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(side, side, generator=g), torch.randn(side, side, generator=g)
    out = torch.empty(side, side)
    return 2 * side**3 / best_time(lambda: torch.mm(a, b, out=out), rounds, clock=clock)


def make_trainer(method: str, preset: str, batch_size: int | None = None):
    """A :class:`~medad_fast.train.Trainer` of ``method`` at ``preset`` on the CPU, with
    ``batch_size`` in place of the preset's when given; 4 batches of images."""
    from medad_fast.data.phantom import ellipse_slices
    from medad_fast.methods import create_method, resolve_config
    from medad_fast.train import Trainer

    config = resolve_config(method, preset, **({"batch_size": batch_size} if batch_size else {}))
    images = ellipse_slices(4 * config.run.batch_size, config.run.image_size)
    return Trainer(create_method(config), images, torch.device("cpu"))


def measure_jobs(method: str, preset: str, batch_size: int | None, rounds: int,
                 clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """The train-step and inference rows of ``method`` at ``preset`` at the current thread count."""
    trainer = make_trainer(method, preset, batch_size)
    run = trainer.config.run
    batch_index = torch.arange(run.batch_size)
    images = trainer.images[: run.batch_size].float().div(255.0)
    images = trainer.method.to_memory_format(images)
    jobs = {"train step": lambda: trainer.train_step(batch_index),
            "inference": lambda: trainer.method.predict(images)}
    rows = []
    for job, fn in jobs.items():
        flops = count_flops(fn)  # also the warm-up call (lazy initialisation, optimiser state)
        seconds = best_time(fn, rounds, warmup=0, clock=clock)
        rows.append({"method": method, "preset": preset, "job": job, "batch": run.batch_size,
                     "preset_batch": _preset_batch(method, preset), "side": run.image_size,
                     "flops": flops, "seconds": seconds})
    return rows


def _preset_batch(method: str, preset: str) -> int:
    from medad_fast.methods import resolve_config

    return resolve_config(method, preset).run.batch_size


# ----------------------------------------------------------------------------- step breakdown

@contextlib.contextmanager
def _labelled(owner: object, name: str, label: str) -> Iterator[None]:
    """``owner.name`` (a module's ``forward``, a module-level function) runs inside a
    profiler range ``label`` for the duration of the block."""
    original = getattr(owner, name)
    is_module = isinstance(owner, torch.nn.Module)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        if is_module:
            del owner.__dict__[name]  # back to the class's forward
        else:
            setattr(owner, name, original)


FORWARD_PARTS = ("synthesis", "high-pass", "reconstruction forward", "segmentation forward", "losses")
OPTIMISER_RANGES = ("Optimizer.step#", "Optimizer.zero_grad#")
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def step_breakdown(preset: str = "small", steps: int = 5) -> dict:
    """Seconds per step of each part of the ``frequency_aware`` step at ``preset``, the mean
    over ``steps`` profiled steps (after 2 warm-up steps): ``{"parts": {part: seconds},
    "step": seconds, "unprofiled_step": seconds}``."""
    import medad_fast.methods.frequency_aware as fa_module

    trainer = make_trainer(BREAKDOWN_METHOD, preset)
    method, model = trainer.method, trainer.method.model
    batch_index = torch.arange(trainer.config.run.batch_size)
    for _ in range(2):
        trainer.train_step(batch_index)
    unprofiled = best_time(lambda: trainer.train_step(batch_index), steps, warmup=0)
    with contextlib.ExitStack() as stack:
        synthesizer = method.synthesizer
        method.synthesizer = _Labelled(synthesizer, "synthesis")
        stack.callback(setattr, method, "synthesizer", synthesizer)
        for module, label in ((model.highpass, "high-pass"), (model.reconstruction, "reconstruction forward"),
                              (model.segmentation, "segmentation forward")):
            stack.enter_context(_labelled(module, "forward", label))
        for loss in ("reconstruction_loss", "segmentation_loss"):
            stack.enter_context(_labelled(fa_module, loss, "losses"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            start = time.perf_counter()
            for _ in range(steps):
                with torch.profiler.record_function("step"):
                    trainer.train_step(batch_index)
            profiled = (time.perf_counter() - start) / steps
    parts = attribute_events(profiler.events())
    return {"parts": {k: v / steps for k, v in parts.items()}, "step": profiled, "unprofiled_step": unprofiled,
            "steps": steps}


class _Labelled:
    """A callable object run inside a profiler range (``__call__`` is looked up on the
    type, so an instance attribute cannot relabel it)."""

    def __init__(self, target: Callable, label: str) -> None:
        self.target, self.label = target, label

    def __call__(self, *args, **kwargs):
        with torch.profiler.record_function(self.label):
            return self.target(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.target, name)


#: forward ranges whose ops' backward nodes are attributed to "<part> backward"
BACKWARD_OWNERS = {"reconstruction forward": "reconstruction backward",
                   "segmentation forward": "segmentation backward", "losses": "losses backward"}


def attribute_events(events) -> dict[str, float]:
    """Seconds (summed over the profiled steps) of each part, from the profiler's events.

    Forward parts: the ranges of :data:`FORWARD_PARTS`. Backward: every top-level
    ``autograd::engine::evaluate_function`` node goes to the part whose forward op has
    its sequence number (:data:`BACKWARD_OWNERS`), else to ``backward, other``
    (concatenation, casts, gradient accumulation). Optimiser: the ``Optimizer.step`` /
    ``zero_grad`` ranges. ``other`` = the ``step`` ranges minus all of these."""
    seconds: dict[str, float] = {part: 0.0 for part in FORWARD_PARTS}
    seconds.update({part: 0.0 for part in BACKWARD_OWNERS.values()})
    seconds.update({"backward, other": 0.0, "optimiser": 0.0})
    step_total = 0.0
    for event in events:
        if event.name == "step":
            step_total += event.time_range.elapsed_us() / 1e6
        elif event.name in FORWARD_PARTS:
            seconds[event.name] += event.time_range.elapsed_us() / 1e6
        elif event.name.startswith(OPTIMISER_RANGES):
            seconds["optimiser"] += event.time_range.elapsed_us() / 1e6
    owner: dict[int, str] = {}  # forward sequence number -> backward part
    by_thread: dict[int, list] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith(BACKWARD_PREFIX):
            by_thread.setdefault(event.thread, []).append(event)
    for forward_range in (e for e in events if e.name in BACKWARD_OWNERS):
        for event in by_thread.get(forward_range.thread, []):
            if forward_range.time_range.start <= event.time_range.start <= forward_range.time_range.end:
                owner[event.sequence_nr] = BACKWARD_OWNERS[forward_range.name]
    for event in events:
        if event.name.startswith(BACKWARD_PREFIX) and not _inside_backward_node(event):
            seconds[owner.get(event.sequence_nr, "backward, other")] += event.time_range.elapsed_us() / 1e6
    seconds["other"] = max(0.0, step_total - sum(seconds.values()))
    return seconds


def _inside_backward_node(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(BACKWARD_PREFIX):
            return True
        parent = parent.cpu_parent
    return False


# ----------------------------------------------------------------------------- the section

def render_section(data: dict) -> str:
    """The RESULTS.md section of a ``roofline.json``."""
    lines = [SECTION, "",
             f"`{data['command']}` ({data['date']}, commit {data['commit']}, {data['cpu']}, torch {data['torch']}). "
             "Work: the flops `torch.utils.flop_counter.FlopCounterMode` counts for one call (matrix products "
             "and convolutions, forward and backward, 2 per multiply-add; elementwise work, FFTs and the fused "
             "ops count 0). Time: the best of "
             f"{data['rounds']} call{'s' if data['rounds'] != 1 else ''} after a warm-up. % of matmul: the job's "
             f"rate / the best float32 `torch.mm` of two {data['matmul_side']} x {data['matmul_side']} matrices "
             "(10 calls before and 10 after the jobs) in the same run at the same thread count. Training step: synthesis, forward, losses, backward and Adam step; inference: "
             "`predict` of one batch.", "",
             "Above 100 %: the convolutions do more counted flops per second than this torch's float32 matmul "
             "(oneDNN's convolution kernels against the GEMM library; a Winograd kernel would also do fewer "
             "multiplications than counted: not checked), so the matmul rate is a floor of the machine's limit, not "
             "its peak; the share of the theoretical peak (cores x clock x FMA width) is lower. Measured while "
             "other jobs shared the machine unless the note says otherwise.", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    for run in data["runs"]:
        threads = run["threads"]
        timer = run.get("timer", "wall time")
        lines += [f"### {threads} thread{'s' if threads != 1 else ''} ({timer}): matmul "
                  f"{run['matmul_flops'] / 1e9:.1f} GFLOP/s",
                  "", "| method | preset | job | batch | side | GFLOP / call | best ms | GFLOP/s | % of matmul |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in run["rows"]:
            rate = row["flops"] / row["seconds"]
            batch = str(row["batch"]) + ("" if row["batch"] == row["preset_batch"]
                                         else f" (preset: {row['preset_batch']})")
            lines.append(f"| {row['method']} | {row['preset']} | {row['job']} | {batch} | {row['side']} | "
                         f"{row['flops'] / 1e9:.3f} | {row['seconds'] * 1e3:,.1f} | {rate / 1e9:.2f} | "
                         f"{100 * rate / run['matmul_flops']:.1f} % |")
        lines.append("")
    breakdown = data.get("breakdown")
    if breakdown:
        step = breakdown["step"]
        lines += [f"### Where the {BREAKDOWN_METHOD} {breakdown['preset']} step goes "
                  f"({breakdown['threads']} thread{'s' if breakdown['threads'] != 1 else ''}, torch.profiler, "
                  "wall time)", "",
                  f"Mean of {breakdown['steps']} profiled steps: {step * 1e3:,.1f} ms per step under the profiler "
                  f"({breakdown['unprofiled_step'] * 1e3:,.1f} ms best without it). Backward nodes are attributed to "
                  "the part whose forward ops created them; `other` = the step minus the parts (Python, the "
                  "trainer, autograd engine and profiler overhead).", "",
                  "| part | ms / step | share of the step |", "|---|---|---|"]
        for part, seconds in breakdown["parts"].items():
            lines.append(f"| {part} | {seconds * 1e3:,.2f} | {100 * seconds / step:.1f} % |")
        lines.append("")
    return "\n".join(lines)


def saved_section() -> str | None:
    """The section of the saved ``roofline.json``, if any (for ``report.py``)."""
    return sections.saved_section(RESULTS_JSON, render_section)


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections.add_run_arguments(parser, RESULTS_JSON, RESULTS_MD,
                               "tiny preset, 1 round, 2 profiled steps, 512 x 512 matmul; writes nothing unless "
                               "--out-* given")
    parser.add_argument("--threads", default="2,1", help="torch thread counts (default 2,1)")
    parser.add_argument("--paper-batch", type=int, default=2,
                        help="batch of the paper preset on the CPU (default 2; 0 = the preset's)")
    args = parser.parse_args(argv)
    presets, methods, rounds, write = sections.run_selection(args, parser)
    sys.path.insert(0, str(BENCH_DIR))
    from report import _cpu_model, _git  # noqa: E402 (this folder's report script)

    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    side = 512 if args.quick else MATMUL_SIDE

    runs = []
    for count in threads:
        torch.set_num_threads(count)
        clock = clock_for(count)
        rate = matmul_rate(side, rounds=10, clock=clock)
        print(f"{count} thread(s): matmul {rate / 1e9:.1f} GFLOP/s", flush=True)
        rows = []
        for method in methods:
            for preset in presets:
                batch = args.paper_batch if preset == "paper" and args.paper_batch else None
                for row in measure_jobs(method, preset, batch, rounds, clock):
                    print(f"  {method} {preset} {row['job']}: {row['flops'] / 1e9:.3f} GFLOP in "
                          f"{row['seconds'] * 1e3:.1f} ms = {100 * row['flops'] / row['seconds'] / rate:.1f} % of matmul",
                          flush=True)
                    rows.append(row)
        # the matmul again after the jobs: the better of the two is the achievable rate
        # (another process that held the cores during one of them cannot lower it)
        rate = max(rate, matmul_rate(side, rounds=10, clock=clock))
        print(f"{count} thread(s): matmul {rate / 1e9:.1f} GFLOP/s (best of before and after the jobs)", flush=True)
        runs.append({"threads": count, "matmul_flops": rate, "rows": rows,
                     "timer": "process CPU time" if clock is time.process_time else "wall time"})

    torch.set_num_threads(threads[0])
    breakdown_preset = "tiny" if args.quick else "small"
    breakdown = step_breakdown(breakdown_preset, steps=2 if args.quick else 5)
    breakdown.update(preset=breakdown_preset, threads=threads[0])

    command = "benchmarks/roofline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = None
    if "paper" in presets and args.paper_batch:
        note = (f"The paper preset runs at batch {args.paper_batch} here (its own batch in brackets): a 2-core CPU "
                "takes seconds per paper step; the work per image does not depend on the batch.")
    data = {"command": command.strip(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git("rev-parse", "--short", "HEAD"), "cpu": _cpu_model(), "torch": torch.__version__,
            "python": platform.python_version(), "rounds": rounds, "matmul_side": side, "note": note,
            "runs": runs, "breakdown": breakdown}
    section = render_section(data)
    print()
    print(section)
    if write:
        sections.write_section(data, args.out_json or RESULTS_JSON, args.out_md or RESULTS_MD, render_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
