"""The paper's ablations on the demo's phantom data: one table, measured.

Runs `medad-fast train` + `medad-fast evaluate` exactly as `make demo` does (small preset,
same data, same seed), once for the full method and once per ablation switch, then writes

    <out>/ablations.md     markdown table: image/pixel AUROC, AP, AUPRO@0.3, Dice, minutes
    <out>/ablations.json   the same figures, machine-readable

A variant whose ``eval/metrics.json`` already exists is not run again, so an interrupted
sweep resumes where it stopped (delete a variant's folder to re-run it). Usage::

    make ablations                                   # after `make demo` (reuses its data)
    python scripts/ablations.py --data demo_out/data --out demo_out/ablations [--only no-roi]

Six runs of the demo's length: about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from medad_fast.io import atomic_write_bytes, atomic_write_json

#: variant name -> extra `medad-fast train` switches (the paper's ablations, Tables 3-5)
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "no-roi": ["--no-roi"],
    "no-highpass": ["--no-highpass"],
    "recon-only": ["--recon-only"],
    "seg-only": ["--seg-only"],
    "no-synthesis": ["--no-synthesis"],
}
COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("image_ap", "image AP"),
           ("pixel_ap", "pixel AP"), ("aupro_0.3", "AUPRO@0.3"), ("best_dice", "best Dice")]


def run_variant(name: str, switches: list[str], data: Path, folder: Path, train_args: list[str]) -> dict:
    metrics_path = folder / "eval" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        if metrics.get("data") != str(data.resolve()):
            raise SystemExit(f"{folder}: holds a run evaluated on {metrics.get('data')}, not on {data.resolve()}; "
                             f"delete it or choose another --out")
        print(f"== {name}: already done ({metrics_path})", flush=True)
        return metrics
    cli = [sys.executable, "-m", "medad_fast.cli"]
    start = time.perf_counter()
    print(f"== {name}: training with {' '.join(switches) or 'no switch'}", flush=True)
    # a partial run is resumed by train itself; without a checkpoint it starts afresh
    resume = ["--resume"] if any((folder / "run").glob("checkpoint*.pt")) else []
    subprocess.run([*cli, "train", "--data", str(data), "--preset", "small", "--out", str(folder / "run"),
                    "--no-progress", *resume, *switches, *train_args], check=True)
    subprocess.run([*cli, "evaluate", str(folder / "run"), "--data", str(data), "--split", "test",
                    "--out", str(folder / "eval"), "--no-progress"], check=True)
    metrics = json.loads(metrics_path.read_text())
    metrics["minutes"] = (time.perf_counter() - start) / 60
    atomic_write_json(metrics_path, metrics)
    return metrics


def table(results: dict[str, dict], variants: dict[str, list[str]], first_column: str = "variant") -> str:
    header = f"| {first_column} | switch | " + " | ".join(title for _, title in COLUMNS) + " | minutes |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, metrics in results.items():
        cells = [f"{metrics[key]:.3f}" for key, _ in COLUMNS]
        minutes = f"{metrics['minutes']:.1f}" if "minutes" in metrics else "-"
        lines.append(f"| {name} | `{' '.join(variants[name]) or '-'}` | " + " | ".join(cells) + f" | {minutes} |")
    return "\n".join(lines) + "\n"


def sweep(variants: dict[str, list[str]], name: str, argv: list[str] | None = None, description: str = "",
          first_column: str = "variant") -> int:
    """Train + evaluate every variant (``--only`` a subset) and write ``<out>/<name>.md`` and
    ``<out>/<name>.json``. Arguments this parser does not know go to `medad-fast train`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=Path("demo_out/data"), help="BMAD-layout phantom data")
    parser.add_argument("--out", type=Path, default=Path(f"demo_out/{name}"))
    parser.add_argument("--only", nargs="+", choices=sorted(variants), help="run only these")
    args, train_args = parser.parse_known_args(argv)  # the rest goes to `medad-fast train`
    if not (args.data / "train" / "good").is_dir():
        parser.error(f"--data {args.data}: no train/good folder (run `make demo` or `medad-fast phantom` first)")
    names = args.only or list(variants)
    results = {n: run_variant(n, variants[n], args.data, args.out / n, train_args) for n in names}
    markdown = table(results, variants, first_column)
    atomic_write_bytes(args.out / f"{name}.md", markdown.encode())
    atomic_write_json(args.out / f"{name}.json", results)
    print(markdown)
    return 0


def main(argv: list[str] | None = None) -> int:
    return sweep(VARIANTS, "ablations", argv, description=__doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
