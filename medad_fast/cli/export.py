"""``medad-fast export``: the options of :func:`medad_fast.export.export_checkpoint` and what
it prints."""

from __future__ import annotations

import argparse
import sys

from ..export import export_checkpoint
from ..exported import EXPORT_FORMATS
from ._arguments import add_ensemble_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                        help="checkpoint file or run directory (or --ensemble)")
    add_ensemble_argument(parser, "written as one graph")
    parser.add_argument("--format", required=True, choices=list(EXPORT_FORMATS),
                        help="pt2: torch.export (with the fused ops); onnx: standard ops, for ONNX Runtime")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write (.pt2 or .onnx)")
    parser.add_argument("--aoti", action="store_true",
                        help="pt2 only: compile the program ahead of time with AOTInductor (C++ kernels in the file, for "
                             "this kind of machine; minutes on a CPU)")


def main(args: argparse.Namespace) -> int:
    if (args.checkpoint is None) == (args.ensemble is None):
        print("medad-fast export: error: pass a CKPT or --ensemble RUN..., not " +
              ("both" if args.checkpoint else "neither"), file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.ensemble or args.checkpoint, args.out, args.format, args.aoti)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"medad-fast export: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.format}{', AOTInductor' if args.aoti else ''}; score with: medad-fast predict {out} IMAGES... --out DIR)")
    return 0
