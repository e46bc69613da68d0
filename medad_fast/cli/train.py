"""``medad-fast train``: the options of :func:`medad_fast.train.train` (the engine, run folder
and signal handling live there) and what it prints."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .. import distributed
from ..checkpoint import BEST_NAME, DEFAULT_KEEP
from ..config import OPTIONAL_PRESET_NAMES, PRESET_NAMES
from ..methods import DEFAULT_METHOD, method_names
from ..train import CHECKPOINT_NAME, TrainingInterrupted, default_run_directory, train
from ._arguments import add_small_data_arguments, anomaly_source_method_names, config_from_args
from ._method_options import MethodAction, MethodHelpAction, add_method_option_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # -h/--help shows the options of --method (the generic options' help, then the method's);
    # it replaces argparse's own help option ("resolve": of this group's option strings only)
    parser.add_argument_group("help", conflict_handler="resolve").add_argument(
        "-h", "--help", action=MethodHelpAction, help="show this help (after --method M: with M's options) and exit")
    parser.add_argument("--data", required=True, metavar="DIR",
                        help="BMAD-layout folder (uses train/good) or MedIAnomaly dataset (the folder of its "
                             "data.json; uses train[\"0\"])")
    parser.add_argument("--method", default=DEFAULT_METHOD, choices=method_names(), action=MethodAction,
                        help=f"what to train (default {DEFAULT_METHOD}; `medad-fast methods` lists them); each "
                             f"method has its own options: `--method M --help` lists them")
    parser.add_argument("--anomaly-source", metavar="DIR",
                        help="folder of anomaly-source images (default: Perlin-texture fallback), for the methods "
                             f"that train on them ({', '.join(anomaly_source_method_names())}) and for the "
                             "--val-fraction validation set of every method")
    parser.add_argument("--preset", choices=PRESET_NAMES + OPTIONAL_PRESET_NAMES, default="paper",
                        help="paper: the published setting; small: sized for a CPU; tiny: for tests; medianomaly: the "
                             "MedIAnomaly benchmark protocol, 64 x 64 (methods that have it) (default paper)")
    parser.add_argument("--out", metavar="RUN", help="run directory (default runs/<method>-<preset>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g = parser.add_argument_group("run overrides (default: the preset's)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--image-size", type=int, help="training side in pixels")
    g.add_argument("--max-train-images", type=int, help="use at most N training slices (seeded subset)")
    g.add_argument("--seed", type=int)
    g.add_argument("--checkpoint-every", type=int, metavar="E", help="write a checkpoint every E epochs")
    g.add_argument("--checkpoint-minutes", type=float, metavar="M",
                   help="write a checkpoint when M minutes have passed since the last one (default 10)")
    g.add_argument("--keep-checkpoints", type=int, default=DEFAULT_KEEP, metavar="K",
                   help=f"keep the newest K checkpoints in the run directory (default {DEFAULT_KEEP})")
    add_small_data_arguments(parser)
    add_method_option_arguments(parser)
    r = parser.add_argument_group("runtime")
    r.add_argument("--reference-ops", action="store_true",
                   help="use the pure-PyTorch reference ops instead of the compiled extension")
    r.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    r.add_argument("--no-channels-last", action="store_true", help="no channels_last memory format")
    r.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the method's networks (the synthesis, losses and optimiser stay eager; "
                        "compiling takes minutes on a CPU)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch)")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: with the same --seed, identical loss logs and weights "
                        "(bitwise on the CPU), also across --resume")


def main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        out = Path(args.out) if args.out else default_run_directory(config, args.device)
        start = time.perf_counter()
        try:
            record = train(config, out, resume=args.resume, device=args.device, progress=not args.no_progress,
                           keep_checkpoints=args.keep_checkpoints, deterministic=args.deterministic)
        except TrainingInterrupted as exc:
            if distributed.is_main_process():
                print(f"medad-fast train: {exc}", file=sys.stderr)
            return exc.exit_code
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as exc:
        print(f"medad-fast train: error: {exc}", file=sys.stderr)
        return 2
    if not distributed.is_main_process():
        return 0
    minutes = (time.perf_counter() - start) / 60
    if record:
        print(f"trained {out} to epoch {record['epoch']}: loss {record['loss']:.4f} ({minutes:.1f} min)")
    print(f"checkpoint: {out / CHECKPOINT_NAME}")
    best = out / BEST_NAME
    if best.is_file() and record.get("val_best_epoch") is not None:
        print(f"best checkpoint: {best} (epoch {record['val_best_epoch']}, validation score "
              f"{record['val_best_score']:.4f}; what evaluate and predict use)")
    return 0
