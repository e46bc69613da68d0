"""`medad-fast` command line: argument parsing and printing only.

Each verb is one short module of this package (``medad_fast.cli.<verb>``) with
``add_arguments(parser)`` and ``main(args) -> int`` (the exit code): it parses its options,
calls the library (``medad_fast.train``, ``medad_fast.evaluate``...) and prints. The library
modules know nothing of the command line; this package imports them, never the reverse.
``python -m medad_fast.cli`` and ``torchrun -m medad_fast.cli`` run :func:`main`
(``__main__.py``), as the ``medad-fast`` console script does.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import cpu_isa

# command -> one-line help; its module is medad_fast.cli.<command>
COMMANDS = {
    "info": "print build and runtime facts as JSON",
    "phantom": "write a procedural liver-CT phantom dataset (BMAD layout)",
    "prepare": "convert LiTS/BTCV NIfTI or DICOM series to the BMAD layout",
    "methods": "list the methods, one line each",
    "train": "train a method on BMAD-layout data",
    "evaluate": "evaluate a run or checkpoint: metrics.json, heatmaps, ROC plot",
    "predict": "score images or CT volumes with a checkpoint; write heatmaps / map volumes",
    "export": "write a checkpoint as one file for inference: pt2 (torch.export) or ONNX",
    "compare": "train and evaluate several methods on the same data: one table",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that verb's module is imported
    (start-up stays fast and one command does not depend on another's imports)."""
    parser = argparse.ArgumentParser(
        prog="medad-fast",
        description="Frequency-aware self-supervised lesion detection (liver CT).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            module = importlib.import_module(f"{__name__}.{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
        p.add_argument("--reproducible", action="store_true",
                       help="pin the CPU kernels to AVX2 (torch's ATen, oneDNN, MKL, and numpy's), so that the "
                            "same command gives the same figures on AVX2 and AVX-512 machines (with the same thread "
                            "count); slower on AVX-512 CPUs. Same as MEDAD_FAST_REPRODUCIBLE=1")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    if args.reproducible:
        # the libraries read the pin when they first compute: start again with it in the environment
        cpu_isa.reexec_pinned(argv)
    return int(args._module.main(args) or 0)
