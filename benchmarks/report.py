"""Run the benchmark suites and write ``benchmarks/RESULTS.md`` (what ``make bench`` runs).

    .venv/bin/python benchmarks/report.py                 # everything at 2 and 1 threads -> RESULTS.md
    .venv/bin/python benchmarks/report.py -k highpass     # a subset (pytest -k expression)
    .venv/bin/python benchmarks/report.py --threads 2     # one thread count
    .venv/bin/python benchmarks/report.py --json-dir runs/ --no-run   # re-render saved runs

The suites are pytest-benchmark files in this folder (``test_bench_*.py``); every
implementation of a job shares a benchmark group, so the ratios come from one run, side
by side. ratio = peer time / extension time, using each implementation's fastest round
(the least disturbed by other work on a shared machine; medians are in the tables too).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "RESULTS.md"
DEFAULT_THREADS = "2,1"

sys.path.insert(0, str(REPO))


# ----------------------------------------------------------------------------- results

class Results:
    """Benchmarks of one pytest-benchmark JSON, looked up by (group, impl)."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.rows: dict[tuple[str, str], dict] = {}
        self.groups: list[str] = []
        for bench in data.get("benchmarks", []):
            group, impl = bench.get("group") or bench["name"], bench["extra_info"].get("impl", bench["name"])
            if group not in self.groups:
                self.groups.append(group)
            self.rows[group, impl] = bench

    def time(self, group: str, impl: str) -> float | None:
        """Fastest round in seconds, or None when that benchmark did not run."""
        bench = self.rows.get((group, impl))
        return None if bench is None else bench["stats"]["min"]

    def timer(self) -> str:
        timers = {bench["extra_info"].get("timer", "wall time") for bench in self.rows.values()}
        return ", ".join(sorted(timers)) or "—"

    def impls(self, group: str) -> list[str]:
        return [impl for (g, impl) in self.rows if g == group]


# ----------------------------------------------------------------------------- targets

@dataclass
class Target:
    """One target of issue 5: ``value(results)`` compared with ``threshold``."""

    name: str
    what: str  # how the figure is formed
    value: Callable[[Results], float | None]
    at_least: bool
    threshold: float
    percent: bool = False  # show the figure and the threshold as percentages

    def show(self, value: float) -> str:
        return f"{100 * value:.1f} %" if self.percent else f"{value:.2f}"

    def evaluate(self, results: Results) -> tuple[float | None, str]:
        value = self.value(results)
        if value is None:
            return None, "not run"
        ok = value >= self.threshold if self.at_least else value <= self.threshold
        return value, "PASS" if ok else "MISS"


def _ratio(group: str, numerator: str, denominator: str) -> Callable[[Results], float | None]:
    def value(results: Results) -> float | None:
        top, bottom = results.time(group, numerator), results.time(group, denominator)
        return None if top is None or bottom is None else top / bottom
    return value


def _step_group(results: Results, method: str, device: str) -> str | None:
    """The ``train step <method> ...`` group measured on ``device`` (its preset and size vary)."""
    return next((g for g in results.groups if g.startswith(f"train step {method} ") and g.endswith(device)), None)


def _step_ratio(method: str, device: str) -> Callable[[Results], float | None]:
    def value(results: Results) -> float | None:
        group = _step_group(results, method, device)
        return None if group is None else _ratio(group, "reference", "extension")(results)
    return value


def _step_share(device: str) -> Callable[[Results], float | None]:
    def value(results: Results) -> float | None:
        step_group = _step_group(results, "frequency_aware", device)
        if step_group is None:
            return None
        parts_group = step_group.replace("train step ", "train step parts ", 1)
        step = results.time(step_group, "extension")
        synthesis = results.time(parts_group, "synthesis (extension)")
        highpass = results.time(parts_group, "high-pass (extension)")
        if None in (step, synthesis, highpass):
            return None
        return (synthesis + highpass) / step
    return value


def _ddad_ratio() -> Callable[[Results], float | None]:
    """sequential / batched of the ``ddad step of ...`` group (its sizes follow the preset)."""
    def value(results: Results) -> float | None:
        group = next((g for g in results.groups if g.startswith("ddad step of ") and g.endswith(" cpu")), None)
        return None if group is None else _ratio(group, "sequential", "batched")(results)
    return value


def cpu_targets() -> list[Target]:
    targets = []
    group = "synthesis B=32 256x256 cpu"
    for peer, threshold in (("reference", 10), ("draem", 30), ("anomalib", 10)):
        targets.append(Target(f"synthesis B=32 256x256: extension vs {peer}", f"{peer} / extension",
                              _ratio(group, peer, "extension"), True, threshold))
    for batch, side in ((8, 256), (32, 256), (8, 512), (32, 512)):
        group = f"butterworth_highpass B={batch} {side}x{side} cpu"
        targets.append(Target(f"high-pass B={batch} {side}x{side}: vs reference", "reference / extension",
                              _ratio(group, "reference", "extension"), True, 2))
        targets.append(Target(f"high-pass B={batch} {side}x{side}: vs FAIR", "fair / extension",
                              _ratio(group, "fair", "extension"), True, 3))
        targets.append(Target(f"high-pass B={batch} {side}x{side}: vs rfft2+irfft2 floor",
                              "extension / (rfft2+irfft2)", _ratio(group, "extension", "rfft2+irfft2"), False, 1.3))
    for shape in ("B=8 C=64 128x128", "B=8 C=256 64x64"):
        targets.append(Target(f"skip_merge fwd+bwd {shape}: vs reference", "reference / extension",
                              _ratio(f"skip_merge forward+backward {shape} cpu", "reference", "extension"), True, 2))
        targets.append(Target(f"skip_merge forward {shape}: share of memcpy rate",
                              "memcpy / extension (same bytes)",
                              _ratio(f"skip_merge forward {shape} cpu", "memcpy", "extension"), True, 0.6))
    targets.append(Target("train step (small): synthesis + high-pass share", "(synthesis + high-pass) / step",
                          _step_share("cpu"), False, 0.05, percent=True))
    # the whole step with the compiled ops must be faster than with the reference
    targets.append(Target("train step frequency_aware (small): extension vs reference", "reference / extension",
                          _step_ratio("frequency_aware", "cpu"), True, 1.0))
    # the autoencoder calls no fused op: both runs execute the same code, so the ratio is 1
    # up to timing noise; the target only guards against the engine adding a cost
    targets.append(Target("train step ae (small, no fused op): extension vs reference", "reference / extension",
                          _step_ratio("ae", "cpu"), True, 0.97))
    # --compile is on by default only where it is faster: this target says whether it is
    def compiled_ratio(results: Results) -> float | None:
        group = _step_group(results, "frequency_aware", "cpu")
        return None if group is None else _ratio(group, "extension", "extension, compiled")(results)
    targets.append(Target("train step frequency_aware (small): --compile vs eager", "eager / compiled",
                          compiled_ratio, True, 1.0))
    # --ema's moving-average update after every optimiser step: its share of the step
    for method in ("frequency_aware", "ae"):
        def ema_cost(results: Results, method: str = method) -> float | None:
            group = next((g for g in results.groups if g.startswith(f"train step --ema {method} ")
                          and g.endswith(" cpu")), None)
            return None if group is None else _ratio(group, "ema update", "extension")(results)
        targets.append(Target(f"train step {method} (small): cost of --ema", "ema update / step",
                              ema_cost, False, 0.03, percent=True))
    # DDAD's 2K autoencoders in grouped-convolution passes vs one at a time (small preset)
    targets.append(Target("ddad autoencoder step (small): batched vs sequential", "sequential / batched",
                          _ddad_ratio(), True, 1.0))
    return targets


# ----------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_facts() -> dict:
    import numpy
    import scipy
    import torch

    from medad_fast._extension import build_info

    info = build_info()
    facts = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "numpy / scipy": f"{numpy.__version__} / {scipy.__version__}",
        "python": platform.python_version(),
        "extension loaded": info["extension_loaded"],
        "extension OpenMP": info["openmp"],
        "CUDA kernels built": info["cuda_kernels_built"],
        "kernel ISA (ATen / oneDNN cap)": f"{info['cpu_isa']['aten_cpu_capability']} / "
                                          f"{info['cpu_isa']['onednn_max_cpu_isa']} (CPU: {info['cpu_isa']['cpu']})",
        "GPU": ", ".join(d for d in info["devices"] if d != "cpu") or "none",
        "git commit": _git("rev-parse", "--short", "HEAD") + (" (+ uncommitted changes)"
                                                            if _git("status", "--porcelain", "--", "csrc",
                                                                    "medad_fast", "benchmarks") else ""),
    }
    return facts


# ----------------------------------------------------------------------------- formatting

def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:,.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


IMPL_ORDER = ["extension", "reference", "draem", "anomalib", "fair", "cupy", "rfft2+irfft2", "memcpy", "clone"]


def _impl_key(impl: str) -> tuple[int, str]:
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


def group_table(results: Results, group: str, copy_rate: float | None) -> str:
    base = results.time(group, "extension")
    rows = []
    for impl in sorted(results.impls(group), key=_impl_key):
        bench = results.rows[group, impl]
        stats, extra = bench["stats"], bench["extra_info"]
        t = stats["min"]
        ratio = "—" if base is None else f"{t / base:.2f}x"
        rate = "—"
        if "bytes" in extra:
            gbs = extra["bytes"] / t / 1e9
            rate = f"{gbs:.1f}" + (f" ({100 * gbs / copy_rate:.0f} %)" if copy_rate else "")
        per_s = "—" if "images" not in extra else f"{extra['images'] / t:,.1f}"
        rows.append([impl, _ms(t), _ms(stats["median"]), str(stats["rounds"]), ratio, rate, per_s])
    header = ["implementation", "min ms", "median ms", "rounds", "time / extension",
              "GB/s" + (" (% of copy)" if copy_rate else ""), "images/s"]
    return f"**{group}**\n\n" + _table(header, rows)


def copy_rates(results: Results) -> dict[str, float]:
    """Best plain-copy bandwidth (GB/s, bytes read + written) per device, from the memcpy
    floors of the skip_merge groups."""
    rates: dict[str, float] = {}
    for (group, impl), bench in results.rows.items():
        if impl == "memcpy" and "bytes" in bench["extra_info"]:
            device = bench["extra_info"].get("device", "cpu")
            rates[device] = max(rates.get(device, 0.0), bench["extra_info"]["bytes"] / bench["stats"]["min"] / 1e9)
    return rates


@dataclass
class Run:
    """One run of the suites at one torch thread count."""

    threads: int
    results: Results
    pytest_command: str
    load_before: float  # 1-minute load average
    load_after: float
    wall_s: float
    saved: bool = False  # rendered from a saved JSON: load and wall time unknown

    def busy(self, cores: int) -> bool:
        return not self.saved and max(self.load_before, self.load_after) > cores


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def render(runs: list[Run], facts: dict, command: str) -> str:
    """RESULTS.md: how to read it, the machine and runs, the targets, every group."""
    targets = cpu_targets()
    main_run = runs[0]  # the targets' thread count
    cores = int(facts.get("usable cores") or 1)
    target_rows, verdicts = [], []
    for target in targets:
        need = (">= " if target.at_least else "<= ") + (f"{100 * target.threshold:g} %" if target.percent
                                                       else f"{target.threshold:g}")
        row = [target.name, target.what, need]
        for run in runs:
            value, verdict = target.evaluate(run.results)
            row += ["—" if value is None else target.show(value), verdict]
            if run is main_run:
                verdicts.append(verdict)
        target_rows.append(row)
    header = ["target", "figure", "required"]
    for run in runs:
        header += [f"{_plural(run.threads, 'thread')}", ""]
    counts = {v: verdicts.count(v) for v in ("PASS", "MISS", "not run") if verdicts.count(v)}

    out = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/report.py` from measured runs; do not edit by hand",
        "(regenerate with `make bench`).",
        "",
        "## How to run, and what the figures mean",
        "",
        "* `make bench` runs `.venv/bin/python benchmarks/report.py`, which runs the suites with",
        "  pytest-benchmark once per thread count (`--threads 2,1`: 2 is the targets' setting) and",
        "  writes this file. A subset: `benchmarks/report.py -k highpass`; the suites alone:",
        "  `pytest benchmarks/ --benchmark-only` (not part of `make test`: pytest's `testpaths` is",
        "  `tests/`).",
        "* Each job is one benchmark group; its implementations run side by side in one process.",
        "  **time / extension** = implementation time / extension time, each the fastest of its",
        "  rounds (the least disturbed by other work on a shared machine); a ratio above 1 means",
        "  the extension is that many times faster. Medians are given too.",
        "* Implementations: `extension` = the compiled `medad_fast` op; `reference` = the same",
        "  call under `ops.use_reference()` (pure PyTorch, `medad_fast/reference.py`);",
        "  `draem`, `anomalib`, `fair` = faithful re-implementations of the code users run today",
        "  (`benchmarks/peers.py`, checked against our reference by `tests/test_peers.py`);",
        "  floors: `rfft2+irfft2` (the bare FFT round trip any FFT filter pays), `memcpy`",
        "  (`dst.copy_(src)` moving the same bytes the op must read + write, `dst` preallocated),",
        "  `clone` (the same copy into a fresh allocation, as a functional op must).",
        "* Synthesis: the trainer's `AnomalySynthesizer` (parameter draws, fused op, redraws of",
        "  empty masks), every sample anomalous, every pixel inside the liver (the fused kernel's",
        "  worst case); `synthesize_anomalies op` groups time the op alone. The peers leave out",
        "  DRAEM's / anomalib's random colour augmentation of the anomaly source (our op has none",
        "  either), so the synthesis ratios are a lower bound of the real speed-up; the DRAEM peer",
        "  rotates with `scipy.ndimage.rotate` where imgaug uses OpenCV's `warpAffine`.",
        "* GB/s: bytes the job must read + write at least, divided by the time",
        "  (synthesis: image + source in, augmented + mask out; skip_merge forward: `4N` floats,",
        "  forward+backward `7N`). On CUDA, `% of copy` compares with the device-to-device copy.",
        "* Train step: `Trainer.train_step` of the `small` preset (synthesis -> high-pass ->",
        "  reconstruction + segmentation forward -> losses -> backward -> Adam), images/s; the",
        "  `train step parts` group times the step's synthesis and high-pass alone.",
        "* Thread counts: the targets are set for 2 threads, timed in wall time. On a machine whose",
        "  cores are busy with other work, every OpenMP parallel region can wait a scheduler time",
        "  slice for its second thread, which distorts 2-thread timings by up to orders of",
        "  magnitude (worst for code made of many small ops). The 1-thread run is timed in process",
        "  CPU time (`--benchmark-timer=time.process_time`, helper thread pools held to 1), which",
        "  time spent descheduled does not inflate: it measures the work each implementation",
        "  does. Since the per-sample peers (numpy, scipy) are single-threaded anyway, its ratios",
        "  against them are a lower bound of the 2-thread ones on an idle machine.",
        "",
        "## Machine and runs",
        "",
        _table(["", ""], [[k, str(v)] for k, v in facts.items()] + [
            ["date (UTC)", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")],
            ["command", f"`{command}`"],
        ]),
        "",
        _table(["threads", "timer", "load average (1 min) before / after", "wall time", "suites run as"],
               [[str(r.threads), r.results.timer(), "—" if r.saved else f"{r.load_before:.2f} / {r.load_after:.2f}"
                 + (" **(busy)**" if r.busy(cores) else ""), "—" if r.saved else f"{r.wall_s:.0f} s",
                 f"`{r.pytest_command}`"] for r in runs]),
        "",
    ]
    if any(r.busy(cores) for r in runs):
        busy = ", ".join(_plural(r.threads, "thread") for r in runs if r.busy(cores))
        out += [
            f"> **The machine was busy** during the {busy} run (load average above its {cores} cores):",
            "> other processes held the CPUs. Multi-threaded timings are then distorted (see above);",
            "> quote the 1-thread ratios, or re-run on an idle machine.",
            "",
        ]
    out += [
        f"## Targets (CPU; verdict at {_plural(main_run.threads, 'thread')})",
        "",
        _table(header, target_rows),
        "",
        ", ".join(f"{n} {v}" for v, n in counts.items()) + f" at {_plural(main_run.threads, 'thread')}.",
        "",
    ]
    for run in runs:
        rates = copy_rates(run.results)
        for device in ("cpu", "cuda"):
            groups = [g for g in run.results.groups if g.endswith(" " + device)]
            if not groups:
                continue
            title = f"{device.upper()}, {_plural(run.threads, 'thread')}" if device == "cpu" else "CUDA"
            if device == "cuda" and run is not main_run:
                continue  # the GPU groups do not depend on the host thread count
            out += [f"## All groups: {title}", ""]
            if device in rates:
                out += [f"Best plain copy on this device: {rates[device]:.1f} GB/s (bytes read + written).", ""]
            for group in groups:
                out += [group_table(run.results, group, rates.get(device) if device == "cuda" else None), ""]
    if not any(g.endswith(" cuda") for r in runs for g in r.results.groups):
        out += ["## CUDA", "", "No GPU in this run (`torch.cuda.is_available()` is false): the CUDA suites",
                "(same groups on the device, synchronised timing, cupy's FFT as an extra high-pass peer",
                "when cupy imports, GB/s against the device's copy bandwidth) were skipped.", ""]
    # the sections of this folder's benchmarks that run on their own, from their saved JSON
    from averaging_cost import saved_section as averaging_section
    from inference_throughput import saved_section as inference_section
    from reproducible_cost import saved_section as reproducible_section
    from roofline import saved_section as roofline_section
    from volume_throughput import saved_section as volume_section

    for section in (volume_section(), roofline_section(), inference_section(), reproducible_section(),
                    averaging_section()):
        if section:
            out += [section]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

def run_suites(json_path: Path, keyword: str | None, threads: int) -> tuple[str, int]:
    """One pytest-benchmark run at ``threads`` torch threads. A 1-thread run is timed in
    process CPU time, with every helper thread pool held to one thread, so time the
    process spends descheduled on a busy machine does not count."""
    command = [sys.executable, "-m", "pytest", str(BENCH_DIR.relative_to(REPO)), "--benchmark-only",
               f"--benchmark-json={json_path}", "--benchmark-columns=min,median,rounds",
               "--benchmark-sort=name", "--continue-on-collection-errors", "-q", "-p", "no:cacheprovider"]
    settings = {"MEDAD_BENCH_THREADS": str(threads)}
    if threads == 1:
        command.append("--benchmark-timer=time.process_time")
        settings.update(MEDAD_BENCH_CPU_TIME="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if keyword:
        command += ["-k", keyword]
    env = dict(os.environ, **settings)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    shown = " ".join(shlex.quote(os.path.relpath(c, REPO) if c == sys.executable else c) for c in command)
    shown = " ".join(f"{k}={v}" for k, v in settings.items()) + " " + shown.replace(str(json_path), "RUN.json")
    print(f"$ {shown}", flush=True)
    return shown, subprocess.run(command, cwd=REPO, env=env).returncode


def parse_threads(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads must be comma-separated integers; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--threads needs counts >= 1; got {text!r}")
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="keyword", help="pytest -k expression selecting a subset of the benchmarks")
    parser.add_argument("--threads", type=parse_threads, default=parse_threads(DEFAULT_THREADS),
                        help=f"torch thread counts, one run each; the first is the targets' (default {DEFAULT_THREADS})")
    parser.add_argument("--json-dir", type=Path,
                        help="keep each run's pytest-benchmark JSON here (bench-<threads>t.json), or read them with --no-run")
    parser.add_argument("--no-run", action="store_true", help="render the JSONs of --json-dir without running")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"Markdown output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if args.no_run and (args.json_dir is None or not args.json_dir.is_dir()):
        parser.error("--no-run needs --json-dir DIR of a previous run")

    command = "make bench" if os.environ.get("MAKELEVEL") else " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO), "benchmarks/report.py",
                                 *(sys.argv[1:] if argv is None else argv)])
    runs, status = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        json_dir = args.json_dir or Path(tmp)
        json_dir.mkdir(parents=True, exist_ok=True)
        for threads in args.threads:
            json_path = (json_dir / f"bench-{threads}t.json").resolve()
            load_before, start = os.getloadavg()[0], time.perf_counter()
            if args.no_run:
                if not json_path.is_file():
                    parser.error(f"--no-run: {json_path} not found")
                pytest_command = "(rendered from a saved run)"
            else:
                pytest_command, run_status = run_suites(json_path, args.keyword, threads)
                status = status or run_status
                if not json_path.is_file():
                    print(f"report: the {threads}-thread run wrote no results (pytest exit status {run_status})",
                          file=sys.stderr)
                    return run_status or 1
            results = Results(json.loads(json_path.read_text()))
            runs.append(Run(threads, results, pytest_command, load_before, os.getloadavg()[0],
                            time.perf_counter() - start, saved=args.no_run))

    from medad_fast.io import atomic_write_text

    text = render(runs, machine_facts(), command)
    print()
    print(text)
    atomic_write_text(args.out, text + "\n")
    print(f"\nwrote {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
