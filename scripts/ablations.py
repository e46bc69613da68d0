"""The paper's ablations on the demo's phantom data: one table, measured.

Trains and evaluates the paper's method exactly as `make demo` does (small preset, same data,
same seed), once in full and once per ablation switch (the paper's Tables 3-5), with the
machinery of `medad-fast compare` (:mod:`medad_fast.compare`), and writes

    <out>/ablations.md     markdown table: image/pixel AUROC, AP, AUPRO@0.3, Dice, minutes, slices/s
    <out>/ablations.json   the same figures, machine-readable
    <out>/roc.png          every variant's image-level ROC curve

Resumable: a finished variant is reused (only with the same data and config), an
interrupted one resumes from its checkpoint. Usage::

    make ablations                                   # after `make demo` (reuses its data)
    python scripts/ablations.py --data demo_out/data --out demo_out/ablations [--only no-roi]

Six runs of the demo's length: about an hour and a half on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medad_fast.compare import Entry, sweep

#: the paper's ablations: (name, settings of the paper's method, the `medad-fast train` switch)
VARIANTS = [
    Entry("full", "frequency_aware", {}, ""),
    Entry("no-roi", "frequency_aware", {"roi": False}, "--no-roi"),
    Entry("no-highpass", "frequency_aware", {"highpass": False}, "--no-highpass"),
    Entry("recon-only", "frequency_aware", {"mode": "recon_only"}, "--recon-only"),
    Entry("seg-only", "frequency_aware", {"mode": "seg_only"}, "--seg-only"),
    Entry("no-synthesis", "frequency_aware", {"synthesis": False}, "--no-synthesis"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("demo_out/data"), help="BMAD-layout phantom data")
    parser.add_argument("--out", type=Path, default=Path("demo_out/ablations"))
    parser.add_argument("--only", nargs="+", choices=[v.name for v in VARIANTS], help="run only these")
    parser.add_argument("--preset", default="small", help="preset of every variant (default small)")
    parser.add_argument("--epochs", type=int, help="override the preset's epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    entries = [v for v in VARIANTS if not args.only or v.name in args.only]
    common = {"epochs": args.epochs} if args.epochs else {}
    command = "python scripts/ablations.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return sweep(entries, args.data, args.out, args.preset, common, "ablations", command.strip(),
                 device=args.device, progress=not args.no_progress, first_column="variant")


if __name__ == "__main__":
    sys.exit(main())
