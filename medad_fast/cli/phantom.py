"""``medad-fast phantom``: the options of :func:`medad_fast.data.phantom.write_phantom_dataset`
and what it prints."""

from __future__ import annotations

import argparse
import sys

from ..data.phantom import FEW_SLICES, write_phantom_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (created; must be empty or a previous phantom output)")
    parser.add_argument("--train", type=int, metavar="N",
                        help=f"normal training slices (default 200; {FEW_SLICES['n_train']} with --few-slices)")
    parser.add_argument("--test", type=int, default=100, metavar="N", help="test slices (default 100)")
    parser.add_argument("--valid", type=int, default=0, metavar="N", help="validation slices (default 0)")
    parser.add_argument("--size", type=int, default=256, metavar="S", help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="random seed (default 0)")
    parser.add_argument("--difficulty", type=float, metavar="D",
                        help=f"> 0; larger allows subtler lesions (default 1.0; {FEW_SLICES['difficulty']:g} with "
                             f"--few-slices)")
    parser.add_argument("--lesion-scale", type=float, metavar="F",
                        help=f"multiplies the lesion radii, in (0, 4] (default 1; {FEW_SLICES['lesion_scale']:g} with "
                             f"--few-slices)")
    parser.add_argument("--liver-scale", type=float, default=1.0, metavar="F",
                        help="multiplies the liver's size, in [0.3, 1] (default 1: 25-50 %% of the slice's area); "
                             "0.65 gives a liver box about half the slice wide, as on 512 x 512 CT, the case for "
                             "train --crop liver")
    parser.add_argument("--few-slices", action="store_true",
                        help=f"the hard case of few normal scans: --train {FEW_SLICES['n_train']} --lesion-scale "
                             f"{FEW_SLICES['lesion_scale']:g} --difficulty {FEW_SLICES['difficulty']:g} (small faint "
                             f"lesions; options given explicitly win)")
    parser.add_argument("--abnormal-fraction", type=float, default=0.5, metavar="F",
                        help="fraction of valid/test slices with lesions (default 0.5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    try:
        given = {"n_train": args.train, "lesion_scale": args.lesion_scale, "difficulty": args.difficulty}
        # options given explicitly win over --few-slices; the rest: write_phantom_dataset's defaults
        chosen = {**(FEW_SLICES if args.few_slices else {}), **{k: v for k, v in given.items() if v is not None}}
        counts = write_phantom_dataset(
            args.out, n_test=args.test, n_valid=args.valid, size=args.size, seed=args.seed,
            abnormal_fraction=args.abnormal_fraction, progress=not args.no_progress, liver_scale=args.liver_scale,
            **chosen,
        )
    except (ValueError, FileExistsError, NotADirectoryError) as e:
        print(f"medad-fast phantom: error: {e}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{split} {c.get('good', 0)} good / {c.get('Ungood', 0)} Ungood"
                        for split, c in counts.items() if sum(c.values()))
    print(f"wrote phantom dataset to {args.out}: {summary}")
    return 0
