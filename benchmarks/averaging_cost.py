"""What weight averaging and seed ensembles cost (issue 26): ``train --ema``'s update per
training step, and an N-member ensemble per CT scan, from the pytest-benchmark groups
``train step --ema ...`` (benchmarks/test_bench_train_step.py) and ``seed ensemble per
scan ...`` (benchmarks/test_bench_ensemble.py), run at one thread in process CPU time (which
a busy machine cannot inflate by descheduling us).

    python benchmarks/averaging_cost.py [--json FILE]

``--json``: render the saved pytest-benchmark JSON of such a run instead of running it.
Writes ``benchmarks/averaging_cost.json`` and the "What weight averaging and seed ensembles
cost" section of ``benchmarks/RESULTS.md`` (kept by report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import sections  # this folder's RESULTS.md sections and paths
from sections import BENCH_DIR, REPO, RESULTS_MD

sys.path.insert(0, str(REPO))  # medad_fast from this checkout
from medad_fast import cpu_isa  # noqa: E402

RESULTS_JSON = BENCH_DIR / "averaging_cost.json"
SECTION = "## What weight averaging and seed ensembles cost"
KEYWORD = "train_step_ema or ensemble"
COMMAND = "python benchmarks/averaging_cost.py"


def summarize(bench_json: dict) -> dict:
    """``{"ema": {group: {impl: (min s, median s)}}, "ensemble": {...}}`` of a pytest-benchmark JSON."""
    out: dict[str, dict] = {"ema": {}, "ensemble": {}}
    for bench in bench_json["benchmarks"]:
        group, impl, stats = bench["group"], bench["extra_info"]["impl"], bench["stats"]
        kind = "ema" if group.startswith("train step --ema ") else "ensemble" if group.startswith("seed ensemble") \
            else None
        if kind:
            out[kind].setdefault(group, {})[impl] = (stats["min"], stats["median"], stats["rounds"])
    return out


def render_section(data: dict) -> str:
    lines = [SECTION, "",
             f"One thread, process CPU time (fastest / median round); CPU: {data['cpu']}; `{data['command']}` "
             "(pytest-benchmark groups of `test_bench_train_step.py::test_train_step_ema` and "
             "`test_bench_ensemble.py`).", "",
             "**`train --ema`** (`medad_fast.weight_averaging`): the moving-average update after every optimiser "
             "step, against the step it follows (steps with and without `--ema` timed as interleaved pairs).", "",
             "| step | step ms | step with --ema ms | update ms | update / step |", "|---|---|---|---|---|"]
    for group, impls in data["summary"]["ema"].items():
        step, with_ema, update = impls["extension"], impls["extension, --ema 0.999"], impls["ema update"]
        lines.append(f"| {group.removeprefix('train step --ema ')} | {1000 * step[0]:.0f} / {1000 * step[1]:.0f} | "
                     f"{1000 * with_ema[0]:.0f} / {1000 * with_ema[1]:.0f} | {1000 * update[0]:.2f} / "
                     f"{1000 * update[1]:.2f} | {100 * update[0] / step[0]:.2f} % |")
    lines += ["", "**Seed ensembles** (`predict` / `evaluate --ensemble`): scoring one CT scan, the members one "
                  "after another on each batch.", "",
              "| job | members | s per scan | x of 1 member |", "|---|---|---|---|"]
    for group, impls in data["summary"]["ensemble"].items():
        one = impls.get("1 member")
        for impl, (low, median, _) in sorted(impls.items()):
            ratio = f"{low / one[0]:.2f}" if one else "-"
            lines.append(f"| {group.removeprefix('seed ensemble per scan ')} | {impl} | {low:.2f} / {median:.2f} | "
                         f"{ratio} |")
    return "\n".join(lines) + "\n"


def saved_section() -> str | None:
    """The section of the saved ``averaging_cost.json``, if any (for ``report.py``)."""
    return sections.saved_section(RESULTS_JSON, render_section)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="a saved pytest-benchmark JSON of these groups (no run)")
    args = parser.parse_args()
    if args.json is None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.json"
            subprocess.run([sys.executable, "-m", "pytest", str(BENCH_DIR), "--benchmark-only", "-q", "-k", KEYWORD,
                            "--benchmark-timer=time.process_time", f"--benchmark-json={path}", "-p", "no:cacheprovider"],
                           check=True, cwd=REPO, env={**os.environ, "MEDAD_BENCH_THREADS": "1",
                                                      "MEDAD_BENCH_CPU_TIME": "1", "OMP_NUM_THREADS": "1"})
            bench = json.loads(path.read_text())
    else:
        bench = json.loads(args.json.read_text())
    data = {"cpu": cpu_isa.machine_isa(), "command": COMMAND, "summary": summarize(bench)}
    sections.write_section(data, RESULTS_JSON, RESULTS_MD, render_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
