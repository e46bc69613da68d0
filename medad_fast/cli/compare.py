"""``medad-fast compare``: the options of :func:`medad_fast.compare.compare_entries` and
:func:`medad_fast.compare.sweep` (which prints the table), and the notes on shared-out
options."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..compare import compare_entries, parse_seeds, sweep
from ..config import OPTIONAL_PRESET_NAMES, PRESET_NAMES
from ..method_options import MethodOption, option_name, option_owners
from ..methods import method_names
from ._arguments import add_small_data_arguments, anomaly_source_method_names, small_data_values


#: how compare shares out the method options (its --help says it)
_METHOD_OPTIONS_NOTE = ("each goes to the methods of --methods that have it, as that method's option (its own "
                       "type and choices); one line names the methods that ignore it (no such setting); a method "
                       "that has it but not the value given is refused (exit 2), so a table never holds a "
                       "setting silently dropped")


def _owners_help(owners: dict[str, MethodOption]) -> str:
    """The help of an option several methods may have: each method's own, grouped."""
    texts: dict[str, list[str]] = {}
    for method, option in owners.items():
        text = option.help + (f" {{{','.join(map(str, option.choices))}}}" if option.choices else "")
        texts.setdefault(text, []).append(method)
    return "; ".join(f"{', '.join(methods)}: {text}" for text, methods in texts.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, metavar="DIR",
                        help="BMAD-layout folder (trains on train/good, evaluates on test) or MedIAnomaly "
                             "dataset (its data.json folder: train[\"0\"], test)")
    parser.add_argument("--methods", default=",".join(method_names()), metavar="A,B,...",
                        help=f"comma-separated methods (default all: {','.join(method_names())})")
    parser.add_argument("--preset", choices=PRESET_NAMES + OPTIONAL_PRESET_NAMES, default="small", help="preset of every method (default small)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default compare-<preset>)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g = parser.add_argument_group("run overrides for every method (default: each preset's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--seeds", metavar="S,S,...",
                   help="comma-separated seeds: every method is trained and evaluated once per seed "
                        "(<out>/<method>/seed<S>/), and the table gives mean +- sd over them (and the per-seed rows)")
    g.add_argument("--image-size", type=int)
    g.add_argument("--max-train-images", type=int)
    g.add_argument("--anomaly-source", type=Path, metavar="DIR",
                   help="folder of anomaly-source images (default: Perlin textures) for the methods that train on "
                        "them (" + ", ".join(anomaly_source_method_names())
                        + "); with --val-fraction for every method (its validation set is made from them), so that "
                          "every row selects its epoch on the same set")
    add_small_data_arguments(parser)
    m = parser.add_argument_group("method options", _METHOD_OPTIONS_NOTE)
    for owners in option_owners().values():
        option = next(iter(owners.values()))
        if option.is_switch:
            m.add_argument(option.option, action=argparse.BooleanOptionalAction, default=None,
                           help=_owners_help(owners))
        else:
            m.add_argument(option.option, default=None, metavar=option.setting.upper(), help=_owners_help(owners))
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _option(name: str, value: Any) -> str:
    """``name=value`` as a command-line option (``--no-roi`` for a False switch)."""
    option = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{option}" if value else f"--no-{option}"
    return f"--{option} {value}"


def main(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in method_names()]
    if unknown or not methods:
        print(f"medad-fast compare: error: --methods: unknown {unknown or 'empty list'}; choose from "
              f"{','.join(method_names())}", file=sys.stderr)
        return 2
    seeds = None
    if args.seeds is not None:
        try:
            seeds = parse_seeds(args.seeds)
        except ValueError as exc:
            print(f"medad-fast compare: error: {exc}", file=sys.stderr)
            return 2
        if args.seed is not None:
            print(f"medad-fast compare: error: --seed {args.seed} and --seeds {args.seeds}: give one of them",
                  file=sys.stderr)
            return 2
    common = {"epochs": args.epochs, "seed": args.seed, "image_size": args.image_size,
              "max_train_images": args.max_train_images, **small_data_values(args)}
    common = {k: v for k, v in common.items() if v is not None}
    given = {name: getattr(args, name) for name in option_owners() if getattr(args, name, None) is not None}
    try:
        entries, ignored = compare_entries(methods, given, args.anomaly_source, args.val_fraction)
    except ValueError as exc:
        print(f"medad-fast compare: error: {exc}", file=sys.stderr)
        return 2
    if args.anomaly_source is not None:
        given["anomaly_source"] = args.anomaly_source
    for name, methods_without in ignored.items():
        users = [m for m in methods if m not in methods_without]
        why = ("they do not train on anomaly sources; with --val-fraction their validation sets use them"
               if name == "anomaly_source" else "no such setting")
        if users:
            print(f"medad-fast compare: {option_name(name)} goes to {', '.join(users)}; ignored by "
                  f"{', '.join(methods_without)} ({why})")
        else:
            print(f"medad-fast compare: error: {option_name(name)}: ignored by every method of --methods ({why})",
                  file=sys.stderr)
            return 2
    out = args.out or Path(f"compare-{args.preset}")
    options = " ".join(_option(k, v) for k, v in {**common, **given}.items())
    if seeds is not None:
        options = f"--seeds {','.join(map(str, seeds))} {options}"
    command = f"medad-fast compare --data {args.data} --methods {','.join(methods)} --preset {args.preset} {options}".strip()
    try:
        return sweep(entries, args.data, out, args.preset, common, "compare", command,
                     device=args.device, progress=not args.no_progress, seeds=seeds)
    except (ValueError, FileNotFoundError) as exc:
        print(f"medad-fast compare: error: {exc}", file=sys.stderr)
        return 2
