"""``medad-fast info``: the build and runtime facts (:func:`medad_fast._extension.build_info`) as JSON."""

from __future__ import annotations

import argparse
import json

from .._extension import build_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # `medad-fast info` takes no arguments


def main(args: argparse.Namespace) -> int:
    del args
    print(json.dumps(build_info(), indent=2))
    return 0
