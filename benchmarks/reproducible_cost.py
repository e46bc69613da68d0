"""What ``--reproducible`` costs: training steps of the demo's run (the paper's method, small
preset, 96 x 96, batch 8, 2 threads) on the machine's best kernels and pinned to AVX2, in
separate processes, side by side in rounds (these machines are shared and noisy: the ratio
within a round is what counts).

    python benchmarks/reproducible_cost.py [--data DIR] [--epochs 3] [--rounds 3] [--out DIR]

Without ``--data`` it writes the demo's phantom (200 normal training slices) to OUT. The time
per step is each run's median epoch time (``log.jsonl``'s ``seconds``) over its steps per
epoch, the first epoch left out (start-up). Writes ``benchmarks/reproducible_cost.json`` and
the "What --reproducible costs" section of ``benchmarks/RESULTS.md`` (kept by report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import sections  # this folder's RESULTS.md sections and paths
from sections import BENCH_DIR, REPO, RESULTS_MD

sys.path.insert(0, str(REPO))  # medad_fast from this checkout
from medad_fast import cpu_isa  # noqa: E402

RESULTS_JSON = BENCH_DIR / "reproducible_cost.json"
SECTION = "## What --reproducible costs"

#: (row title, environment change, extra train flags)
MODES = (
    ("machine's best kernels", {}, []),
    ("--reproducible (AVX2)", {}, ["--reproducible"]),
)


def seconds_per_step(data: Path, out: Path, epochs: int, env_change: dict[str, str], flags: list[str]) -> float:
    env = {**cpu_isa.unpinned_environment(), "OMP_NUM_THREADS": "2", **env_change, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "medad_fast.cli", "train", "--data", str(data), "--preset", "small",
               "--epochs", str(epochs), "--seed", "0", "--out", str(out), "--no-progress", *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs_done = [r for r in records if "seconds" in r and "step" in r]
    steps_per_epoch = epochs_done[0]["step"]
    return statistics.median(r["seconds"] for r in epochs_done[1:]) / steps_per_epoch


def render_section(data: dict) -> str:
    """The RESULTS.md section of a ``reproducible_cost.json``."""
    times = data["seconds_per_step"]
    best = times[MODES[0][0]]
    lines = [SECTION, "",
             f"A training step of the demo's run (frequency_aware, small preset, 96 x 96, batch 8, 2 threads) on "
             f"the machine's best kernels and with `--reproducible`, in separate processes, {data['rounds']} rounds "
             f"side by side of {data['epochs']} epochs each (the first epoch left out); CPU: {data['cpu']}. "
             f"`{data['command']}`", "",
             "| kernels | median ms/step | x of the machine's best (per round) |", "|---|---|---|"]
    for title, _, _ in MODES:
        ratios = ", ".join(f"{t / b:.2f}" for t, b in zip(times[title], best))
        lines.append(f"| {title} | {statistics.median(times[title]) * 1000:.0f} | {ratios} |")
    return "\n".join(lines) + "\n"


def saved_section() -> str | None:
    """The section of the saved ``reproducible_cost.json``, if any (for ``report.py``)."""
    return sections.saved_section(RESULTS_JSON, render_section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="BMAD folder (default: the demo's phantom, written to OUT)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (>= 2; the first is start-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch is left out)")
    out = args.out or Path(tempfile.mkdtemp(prefix="reproducible-cost-"))
    data = args.data
    if data is None:
        data = out / "data"
        if not (data / "train").is_dir():
            subprocess.run([sys.executable, "-m", "medad_fast.cli", "phantom", str(data), "--train", "200", "--test",
                            "100", "--seed", "0", "--no-progress"], check=True, env={**os.environ,
                                                                                 "PYTHONPATH": str(REPO)})
    times: dict[str, list[float]] = {title: [] for title, _, _ in MODES}
    for round_index in range(args.rounds):
        for index, (title, env_change, flags) in enumerate(MODES):
            run = out / f"run-{round_index}-{index}"
            subprocess.run(["rm", "-rf", str(run)], check=True)
            times[title].append(seconds_per_step(data, run, args.epochs, env_change, flags))
            print(f"round {round_index + 1}: {title}: {times[title][-1] * 1000:.0f} ms/step", file=sys.stderr)
    data = {"cpu": cpu_isa.machine_isa(), "rounds": args.rounds, "epochs": args.epochs,
            "seconds_per_step": times,
            "command": f"python benchmarks/reproducible_cost.py --epochs {args.epochs} --rounds {args.rounds}"}
    sections.write_section(data, RESULTS_JSON, RESULTS_MD, render_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
