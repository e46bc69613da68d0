"""Inference throughput: slices per second of every method, eager vs compiled vs exported.

    .venv/bin/python benchmarks/inference_throughput.py          # small + paper presets, batch 1 and 32
    .venv/bin/python benchmarks/inference_throughput.py --quick  # tiny preset, 1 round: checks that it runs

For every registered method and preset (the method's own image side), with untrained
weights (the work does not depend on their values), the same scoring call a user makes,
:func:`medad_fast.inference.score_batch` (``predict``: maps and image scores), timed four ways:

* ``eager``: the method as :func:`~medad_fast.inference.load_method` builds it;
* ``compiled``: its networks under ``torch.compile`` (:func:`~medad_fast.runtime.compile_networks`,
  inductor); the compile time (the first call) is reported apart;
* ``pt2``: the ``medad-fast export --format pt2`` file (``torch.export``), loaded as
  :class:`~medad_fast.exported.ExportedModel`;
* ``onnx``: the ``--format onnx`` file run by ONNX Runtime (CPU provider, the same thread
  count); skipped when onnxruntime is not installed.

ddad is timed with both ensembles and its refinement net (``unlabeled_split`` set, stage 1):
the path a trained run scores with. Batches 1 and 32; the paper preset's large batch is
``--paper-batch`` (default 8 on the CPU; the table says so). Time: the best of ``--rounds``
calls after a warm-up call, wall time. Writes ``benchmarks/inference_throughput.json`` and the
"Inference throughput" section of ``benchmarks/RESULTS.md`` (kept by ``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import sections  # this folder's RESULTS.md sections and paths
from sections import BENCH_DIR, RESULTS_MD

RESULTS_JSON = BENCH_DIR / "inference_throughput.json"
SECTION = "## Inference throughput: eager vs compiled vs exported"
VARIANTS = ("eager", "compiled", "pt2", "onnx")


def best_time(fn: Callable[[], object], rounds: int) -> float:
    """Fastest of ``rounds`` calls of ``fn`` in seconds (wall time), after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def untrained_method(name: str, preset: str):
    """``name`` at ``preset`` with fresh weights, on the CPU in eval mode, as
    :func:`~medad_fast.inference.load_method` sets a loaded one up; ddad with its UDM
    ensemble and at its refinement stage (its full inference)."""
    from medad_fast.methods import create_method, resolve_config

    overrides = {"unlabeled_split": "test"} if name == "ddad" else {}
    config = resolve_config(name, preset, **overrides)
    method = create_method(config)
    if name == "ddad":
        method.load_method_state({"stage": 1})
    method.configure_runtime(torch.device("cpu"), amp=False, channels_last=config.run.channels_last)
    return method.eval()


def scorers(name: str, preset: str, folder: Path, variants: tuple[str, ...]) -> dict[str, tuple[object, float]]:
    """``variant -> (scorer, seconds to build it)`` (export time for pt2 and onnx; the
    compile time of ``compiled`` is its first call's, measured in :func:`measure`)."""
    from medad_fast.export import export_method
    from medad_fast.exported import ExportedModel
    from medad_fast.runtime import compile_networks

    built = {}
    for variant in variants:
        start = time.perf_counter()
        if variant == "eager":
            scorer = untrained_method(name, preset)
        elif variant == "compiled":
            scorer = compile_networks(untrained_method(name, preset))
        else:
            path = export_method(untrained_method(name, preset), folder / f"{name}-{preset}.{variant}", variant)
            scorer = ExportedModel.load(path)
        built[variant] = (scorer, time.perf_counter() - start)
    return built


def measure(name: str, preset: str, batches: list[int], rounds: int, variants: tuple[str, ...]) -> list[dict]:
    """The rows of ``name`` at ``preset``: one per variant and batch."""
    from medad_fast.inference import score_batch

    torch._dynamo.reset()  # each method's compiled graphs start from nothing
    rows = []
    with tempfile.TemporaryDirectory(prefix="throughput-") as folder:
        for variant, (scorer, build_seconds) in scorers(name, preset, Path(folder), variants).items():
            side = scorer.config.run.image_size
            for batch in batches:
                images = torch.rand(batch, 1, side, side, generator=torch.Generator().manual_seed(0))
                first = time.perf_counter()
                score_batch(scorer, images)  # the warm-up: compiles the compiled variant for this batch
                first = time.perf_counter() - first
                seconds = best_time(lambda: score_batch(scorer, images), rounds)
                rows.append({"method": name, "preset": preset, "side": side, "variant": variant, "batch": batch,
                             "seconds": seconds, "slices_per_s": batch / seconds, "first_call_s": first,
                             "build_s": build_seconds})
                print(f"  {name} {preset} {variant} batch {batch}: {batch / seconds:,.1f} slices/s "
                      f"(first call {first:.1f} s)", flush=True)
    return rows


def render_section(data: dict) -> str:
    """The RESULTS.md section of an ``inference_throughput.json``."""
    lines = [SECTION, "",
             f"`{data['command']}` ({data['date']}, commit {data['commit']}, {data['cpu']}, torch {data['torch']}, "
             f"{data['threads']} thread{'s' if data['threads'] != 1 else ''}, onnxruntime "
             f"{data.get('onnxruntime') or 'not installed'}). Slices per second of `score_batch` (pixel maps and "
             f"image scores of one batch), best of {data['rounds']} call{'s' if data['rounds'] != 1 else ''} after a "
             "warm-up call, wall time, untrained weights at the method's own side. compiled: `torch.compile` "
             "(inductor) of the networks; pt2: the `torch.export` file; onnx: the ONNX file in ONNX Runtime (CPU). "
             "x eager: the variant's rate / eager's. First call: the warm-up (compiling, for compiled).", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    lines += ["| method | preset | side | batch | variant | slices/s | x eager | first call s |",
              "|---|---|---|---|---|---|---|---|"]
    eager = {(r["method"], r["preset"], r["batch"]): r["slices_per_s"] for r in data["rows"] if r["variant"] == "eager"}
    for row in data["rows"]:
        base = eager.get((row["method"], row["preset"], row["batch"]))
        ratio = f"{row['slices_per_s'] / base:.2f}" if base else "-"
        lines.append(f"| {row['method']} | {row['preset']} | {row['side']} | {row['batch']} | {row['variant']} | "
                     f"{row['slices_per_s']:,.1f} | {ratio} | {row['first_call_s']:.2f} |")
    lines.append("")
    return "\n".join(lines)


def saved_section() -> str | None:
    """The section of the saved ``inference_throughput.json``, if any (for ``report.py``)."""
    return sections.saved_section(RESULTS_JSON, render_section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sections.add_run_arguments(parser, RESULTS_JSON, RESULTS_MD,
                               "tiny preset, batches 1 and 4, 1 round; writes nothing unless --out-* given")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated (default {','.join(VARIANTS)})")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--paper-batch", type=int, default=8,
                        help="the paper preset's largest batch on the CPU (default 8; 0 = as --batches)")
    parser.add_argument("--threads", type=int, default=2, help="torch (and ONNX Runtime) threads (default 2)")
    args = parser.parse_args(argv)
    presets, methods, rounds, write = sections.run_selection(args, parser)
    sys.path.insert(0, str(BENCH_DIR))
    from report import _cpu_model, _git  # noqa: E402 (this folder's report script)

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}; choose from {list(VARIANTS)}")
    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
        if "onnx" in variants:
            print("onnxruntime is not installed: the onnx rows are skipped (pip install 'medad-fast[onnx]')")
            variants = tuple(v for v in variants if v != "onnx")
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",") if b.strip()]
    torch.set_num_threads(args.threads)

    rows = []
    for preset in presets:
        preset_batches = batches
        if preset == "paper" and args.paper_batch:
            preset_batches = sorted({min(b, args.paper_batch) for b in batches})
        for method in methods:
            rows += measure(method, preset, preset_batches, rounds, variants)

    command = "benchmarks/inference_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    note = None
    if "paper" in presets and args.paper_batch and max(batches) > args.paper_batch:
        note = (f"The paper preset runs at batch {args.paper_batch} at most here (not {max(batches)}): a 2-core CPU "
                "takes seconds per paper-size slice.")
    data = {"command": command.strip(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _git("rev-parse", "--short", "HEAD"), "cpu": _cpu_model(), "torch": torch.__version__,
            "onnxruntime": ort_version, "python": platform.python_version(), "threads": args.threads,
            "rounds": rounds, "note": note, "rows": rows}
    section = render_section(data)
    print()
    print(section)
    if write:
        sections.write_section(data, args.out_json or RESULTS_JSON, args.out_md or RESULTS_MD, render_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
