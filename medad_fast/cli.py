"""`medad-fast` command line.

Each sub-command lives in the module that does the work; that module exposes
``add_arguments(parser)`` and ``main(args) -> int`` (the exit code). The CLI only
wires them together, so `python -m medad_fast.cli` and `torchrun -m medad_fast.cli`
work the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import cpu_isa

# command -> (module, one-line help)
COMMANDS = {
    "info": ("medad_fast._extension", "print build and runtime facts as JSON"),
    "phantom": ("medad_fast.data.phantom", "write a procedural liver-CT phantom dataset (BMAD layout)"),
    "prepare": ("medad_fast.data.volumes", "convert LiTS/BTCV NIfTI or DICOM series to the BMAD layout"),
    "methods": ("medad_fast.methods", "list the methods, one line each"),
    "train": ("medad_fast.train", "train a method on BMAD-layout data"),
    "evaluate": ("medad_fast.evaluate", "evaluate a run or checkpoint: metrics.json, heatmaps, ROC plot"),
    "predict": ("medad_fast.predict", "score images or CT volumes with a checkpoint; write heatmaps / map volumes"),
    "export": ("medad_fast.export", "write a checkpoint as one file for inference: pt2 (torch.export) or ONNX"),
    "compare": ("medad_fast.compare", "train and evaluate several methods on the same data: one table"),
}


def int_at_least(minimum: int):
    """An argparse ``type`` for integers >= ``minimum`` (argparse names the option in the error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-integer: "invalid int value"
    return parse


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``command`` only that sub-command's module is imported
    (start-up stays fast and one command does not depend on another's imports)."""
    parser = argparse.ArgumentParser(
        prog="medad-fast",
        description="Frequency-aware self-supervised lesion detection (liver CT).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            module = importlib.import_module(module_name)
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


if __name__ == "__main__":
    sys.exit(main())
