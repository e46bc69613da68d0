"""Argument helpers shared by the verbs' parsers (argparse only; no library logic)."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import Config
from ..data.crop import CROP_MODES
from ..data.scan import HU_AIR_CEILING, NONFINITE_FILL_HU
from ..methods import get_method, method_names, resolve_config
from ._method_options import check_method_options, method_setting_values


def int_at_least(minimum: int):
    """An argparse ``type`` for integers >= ``minimum`` (argparse names the option in the error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
        return value
    parse.__name__ = "int"  # argparse's message for a non-integer: "invalid int value"
    return parse


def add_ensemble_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--ensemble RUN...``: a seed ensemble (:mod:`medad_fast.ensemble`) instead of one
    model; ``what``: what the verb does with it (the end of the help)."""
    parser.add_argument("--ensemble", nargs="+", metavar="RUN", default=None,
                        help="instead of one model, the seed ensemble of these runs (run directories or checkpoints "
                             f"of one method and preprocessing): the mean of their maps; {what}")


def add_display_arguments(group) -> None:
    """``--window LO HI`` and ``--hist-eq``: how CT slices are turned into the model's input
    (``evaluate`` and ``predict`` on volumes)."""
    group.add_argument("--window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                       help="HU window (default: the model's preprocessing record, decided at training from its "
                            "data's prepare settings)")
    group.add_argument("--hist-eq", action=argparse.BooleanOptionalAction, default=None,
                       help="histogram-equalise the liver pixels (default: the model's preprocessing record)")


def add_value_check_arguments(group) -> None:
    """``--allow-nonfinite`` and ``--allow-non-hu``: go on with scans that
    :func:`medad_fast.data.scan.check_scan_values` refuses (``evaluate`` and ``predict`` on
    volumes)."""
    group.add_argument("--allow-nonfinite", action="store_true",
                       help=f"score NaN or infinite voxels as air ({NONFINITE_FILL_HU:g} HU), with a warning, instead "
                            "of refusing the scan")
    group.add_argument("--allow-non-hu", action="store_true",
                       help=f"score a scan that does not look like Hounsfield units (no voxel below "
                            f"{HU_AIR_CEILING:g}: e.g. an 8-bit image) as it is, with a warning, instead of refusing "
                            "it")


def add_small_data_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--augment/--no-augment``, ``--augment-strength``, ``--val-fraction``, ``--patience``,
    ``--ema`` (default None: the preset's, all off), ``--crop`` (default auto) and
    ``--skip-empty-slices``; shared by ``train`` and ``compare``."""
    g = parser.add_argument_group("small training sets and real CT (default: off; --crop auto)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="randomly flip, rotate, scale and jitter the intensities of the normal slices "
                        "(inside the liver) before each step")
    g.add_argument("--augment-strength", type=float, metavar="S",
                   help="in [0, 1]: scales every augmentation range (default 1; 0 = no change)")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="hold back this fraction of the normal slices as a synthetic validation set; keep "
                        "the best epoch as checkpoint-best.pt (default 0: off)")
    g.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights with this decay in (0, 1), e.g. 0.999 "
                        "(about the last 1/(1-DECAY) steps; BatchNorm statistics averaged too), updated after every "
                        "step and saved in the checkpoints; validation, evaluate, predict and export then use the "
                        "average (default: off)")
    g.add_argument("--patience", type=int, metavar="P",
                   help="stop after P epochs without a better validation score (needs --val-fraction)")
    g.add_argument("--crop", choices=CROP_MODES,
                   help="liver: cut every slice to its (volume's) liver box plus a margin before resizing it to "
                        "the model's side, and paste the maps back into the whole slice; none: resize the whole "
                        "slice; auto (default): liver when the training slices are liver-masked (written by "
                        "`medad-fast prepare`, or 0 outside one connected foreground), else none; the log says "
                        "which and why")
    g.add_argument("--skip-empty-slices", action="store_true", default=None,
                   help="leave out training slices without liver (all black), with one warning saying how many "
                        "(default: refuse them)")
    return g


def small_data_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings of :func:`add_small_data_arguments` (None: not given)."""
    return {"augment": args.augment, "augment_strength": args.augment_strength, "val_fraction": args.val_fraction,
            "patience": args.patience, "ema": args.ema, "crop": args.crop, "skip_empty_slices": args.skip_empty_slices}


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved :class:`Config` of a parsed ``train`` command line; ``ValueError`` names a
    method option the chosen method does not have or a value it does not take."""
    check_method_options(args)
    overrides = dict(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, image_size=args.image_size,
        max_train_images=args.max_train_images, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        checkpoint_minutes=args.checkpoint_minutes,
        anomaly_source=str(args.anomaly_source) if args.anomaly_source else None, data=str(args.data),
        reference_ops=args.reference_ops or None, amp=False if args.no_amp else None,
        channels_last=False if args.no_channels_last else None, compile=args.compile,
        **small_data_values(args))
    overrides.update(method_setting_values(args))
    return resolve_config(args.method, args.preset, **overrides)


def anomaly_source_method_names() -> list[str]:
    """The methods whose training uses ``--anomaly-source`` (named in its help)."""
    return [name for name in method_names() if get_method(name).uses_anomaly_sources]
