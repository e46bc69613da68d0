"""``medad-fast methods``: the registered methods (:mod:`medad_fast.methods`), one line each."""

from __future__ import annotations

import argparse

from ..methods import get_method, method_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # `medad-fast methods` takes no arguments


def main(args: argparse.Namespace) -> int:
    del args
    width = max(len(name) for name in method_names())
    for name in method_names():
        cls = get_method(name)
        print(f"{name:<{width}}  {cls.summary}  (presets: {', '.join(cls.presets)})")
    return 0
