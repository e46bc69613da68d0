"""Throughput of ``medad-fast predict`` on a CT volume: liver slices per second and peak memory.

    .venv/bin/python benchmarks/volume_throughput.py                      # small + paper presets
    .venv/bin/python benchmarks/volume_throughput.py --presets small --slices 200 --liver-slices 120

The scan is a synthetic 512 x 512 x 200 int16 NIfTI (1 x 1 x 2.5 mm, a liver spanning 120
axial slices, as a typical portal-venous liver CT) written to a temporary folder with its
liver mask. Each preset's checkpoint is an untrained ``frequency_aware`` model (the
weights do not change the work done). Every run is one ``medad-fast predict`` process,
timed end to end (reading the scan, scoring, writing the map NIfTI, slice table and review
montage); its peak resident memory is the child's ``ru_maxrss`` (``os.wait4``), which
includes the Python interpreter and torch (~0.4 GB on their own). The figures are written
to ``benchmarks/volume_throughput.json`` and into the "CT volume prediction" section of
``benchmarks/RESULTS.md`` (which ``benchmarks/report.py`` keeps when it rewrites the file).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import sections  # this folder's RESULTS.md sections and paths
from sections import BENCH_DIR, RESULTS_MD

RESULTS_JSON = BENCH_DIR / "volume_throughput.json"
SECTION = "## CT volume prediction"
METHOD = "frequency_aware"


def write_scan(folder: Path, side: int, slices: int, liver_slices: int) -> tuple[Path, Path]:
    """A ``side x side x slices`` CT (air, body of 40 HU, an ellipsoidal liver of ~60 HU over
    ``liver_slices`` axial slices, with noise) and its liver mask, as NIfTI files."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    c = (side - 1) / 2
    body = ((x - c) / (0.45 * side)) ** 2 + ((y - c) / (0.35 * side)) ** 2 <= 1.0
    first = (slices - liver_slices) // 2
    hu = np.full((side, side, slices), -1000, dtype=np.int16)
    liver = np.zeros((side, side, slices), dtype=np.uint8)
    for k in range(slices):
        hu[..., k][body] = 40 + rng.integers(-20, 21, size=int(body.sum()), dtype=np.int16)
        if first <= k < first + liver_slices:
            t = (k - first + 0.5) / liver_slices  # liver cross-section grows then shrinks along z
            r = 0.2 * side * np.sqrt(max(1e-3, 1.0 - (2 * t - 1) ** 2))
            inside = ((x - 0.4 * side) / (1.3 * r)) ** 2 + ((y - c) / r) ** 2 <= 1.0
            hu[..., k][inside] = 60 + rng.integers(-10, 11, size=int(inside.sum()), dtype=np.int16)
            liver[..., k][inside] = 1
    affine = np.diag([-1.0, -1.0, 2.5, 1.0])  # RAS+ of a plain axial scan, 2.5 mm slices
    paths = []
    for name, data in (("scan", hu), ("liver", liver)):
        image = nib.Nifti1Image(data, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        path = folder / f"{name}.nii.gz"
        nib.save(image, str(path))
        paths.append(path)
    assert int((liver.reshape(-1, slices).any(axis=0)).sum()) == liver_slices
    return paths[0], paths[1]


def write_checkpoint(path: Path, preset: str) -> dict:
    """An untrained checkpoint of the method at ``preset``; returns its run settings."""
    from medad_fast.checkpoint import checkpoint_bytes
    from medad_fast.methods import create_method, resolve_config

    config = resolve_config(METHOD, preset)
    method = create_method(config)
    path.write_bytes(checkpoint_bytes({"method": METHOD, "config": config.to_dict(), "model": method.state_dict(),
                                       "method_state": {}}))
    return {"image_size": config.run.image_size,
            "parameters": sum(p.numel() for p in method.parameters())}


def run_predict(checkpoint: Path, scan: Path, liver: Path, out: Path, batch_size: int) -> tuple[float, float]:
    """``(wall seconds, peak RSS in GiB)`` of one ``medad-fast predict`` process."""
    command = [sys.executable, "-m", "medad_fast.cli", "predict", str(checkpoint), str(scan), "--liver-mask",
               str(liver), "--out", str(out), "--no-progress", "--device", "cpu", "--batch-size", str(batch_size)]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status {process.returncode}")
    return seconds, usage.ru_maxrss / 2**20  # Linux: ru_maxrss in KiB


def render_section(data: dict) -> str:
    """The RESULTS.md section of a ``volume_throughput.json``."""
    lines = [SECTION, "",
             f"`{data['command']}` ({data['date']}, commit {data['commit']}, {data['cpu']}, "
             f"{data['threads']} threads, torch {data['torch']}). One `medad-fast predict` process per row, timed "
             f"end to end (read the scan, score every liver slice, write the map NIfTI, slice table and review "
             f"montage); scan {data['scan']}. Peak memory = the process's maximum resident set (torch and the "
             f"interpreter included). Untrained `{METHOD}` weights (the work does not depend on them).", "",
             "| preset | model side | parameters | liver slices | seconds | liver slices/s | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row['preset']} | {row['image_size']} | {row['parameters'] / 1e6:.2f} M | "
                     f"{row['liver_slices']} | {row['seconds']:.1f} | {row['slices_per_s']:.2f} | "
                     f"{row['peak_gib']:.2f} |")
    return "\n".join(lines) + "\n"



def saved_section() -> str | None:
    """The section of the saved ``volume_throughput.json``, if any (for ``report.py``)."""
    return sections.saved_section(RESULTS_JSON, render_section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small,paper", help="comma-separated presets (default small,paper)")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--liver-slices", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-write", action="store_true", help="print only; leave the JSON and RESULTS.md as they are")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BENCH_DIR.parent))
    import torch

    from report import _cpu_model, _git  # noqa: E402 (this folder's report script)

    rows = []
    with tempfile.TemporaryDirectory(prefix="volume-throughput-") as tmp:
        tmp = Path(tmp)
        print(f"writing a {args.side} x {args.side} x {args.slices} scan with {args.liver_slices} liver slices ...")
        scan, liver = write_scan(tmp, args.side, args.slices, args.liver_slices)
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            checkpoint = tmp / f"{preset}.pt"
            facts = write_checkpoint(checkpoint, preset)
            seconds, peak = run_predict(checkpoint, scan, liver, tmp / f"out-{preset}", args.batch_size)
            row = {"preset": preset, **facts, "liver_slices": args.liver_slices, "seconds": seconds,
                   "slices_per_s": args.liver_slices / seconds, "peak_gib": peak}
            print(f"{preset}: {seconds:.1f} s, {row['slices_per_s']:.2f} liver slices/s, peak {peak:.2f} GiB")
            rows.append(row)
    data = {"command": "benchmarks/volume_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": _git("rev-parse", "--short", "HEAD"),
            "cpu": _cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
            "scan": f"{args.side} x {args.side} x {args.slices} int16 NIfTI, {args.liver_slices} liver slices",
            "rows": rows}
    section = render_section(data)
    print()
    print(section)
    if not args.no_write:
        sections.write_section(data, RESULTS_JSON, RESULTS_MD, render_section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
