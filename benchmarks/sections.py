"""The sections of ``RESULTS.md`` that benchmarks run on their own (``volume_throughput.py``,
``roofline.py``, ``inference_throughput.py``) write, and the options they share: each section
is a ``## Title`` block rendered from its saved JSON, replaced in place when re-measured and
kept by ``report.py`` when it rewrites the file."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

#: this folder, the checkout above it, and the report the sections go to
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def merge_section(results_md: str, section: str) -> str:
    """``results_md`` with the section titled like ``section``'s first line (``## ...``)
    replaced by ``section``, or ``section`` appended when there is none."""
    title = section.splitlines()[0]
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(results_md):
        return pattern.sub(lambda _: section + "\n", results_md, count=1).rstrip("\n") + "\n"
    return results_md.rstrip("\n") + "\n\n" + section


def saved_section(json_path: Path, render: Callable[[dict], str]) -> str | None:
    """``render`` of the saved results in ``json_path``, or None when they were never measured."""
    return render(json.loads(json_path.read_text())) if json_path.is_file() else None


def write_section(data: dict, json_path: Path, results_md: Path, render: Callable[[dict], str]) -> str:
    """Print ``render(data)``, save ``data`` to ``json_path`` and put the section into
    ``results_md`` (both written atomically). Returns the section."""
    from medad_fast.io import atomic_write_json, atomic_write_text

    section = render(data)
    atomic_write_json(json_path, data)
    atomic_write_text(results_md, merge_section(results_md.read_text() if results_md.is_file() else "", section))
    print(f"wrote {json_path} and {results_md}")
    return section


def add_run_arguments(parser: argparse.ArgumentParser, results_json: Path, results_md: Path,
                      quick_help: str) -> None:
    """The options every section-writing benchmark takes: --presets, --methods, --rounds,
    --quick, --out-json, --out-md, --no-write."""
    parser.add_argument("--presets", default="small,paper", help="comma-separated presets (default small,paper)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per job; the best counts (default 3)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out-json", type=Path, default=None, help=f"default {results_json}")
    parser.add_argument("--out-md", type=Path, default=None, help=f"default {results_md}")
    parser.add_argument("--no-write", action="store_true", help="print only")


def run_selection(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], list[str], int, bool]:
    """``(presets, methods, rounds, write)`` of :func:`add_run_arguments`' options (``--quick``:
    the tiny preset, 1 round, nothing written unless an --out-* is given); an unknown
    method is a usage error naming the registered ones."""
    repo = Path(__file__).resolve().parent.parent
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from medad_fast.methods import method_names

    presets = ["tiny"] if args.quick else [p.strip() for p in args.presets.split(",") if p.strip()]
    methods = method_names() if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(method_names()))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {method_names()}")
    rounds = 1 if args.quick else args.rounds
    write = not args.no_write and (not args.quick or bool(args.out_json) or bool(args.out_md))
    return presets, methods, rounds, write
