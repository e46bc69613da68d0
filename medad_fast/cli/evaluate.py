"""``medad-fast evaluate``: the options of :func:`medad_fast.evaluate.evaluate` (BMAD slices)
and :func:`medad_fast.volume_evaluate.evaluate_volumes` (CT volumes), and what they print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..evaluate import evaluate
from ..operating_point import check_calibration_split
from ..volume_evaluate import (DEFAULT_LESION_THRESHOLDS, cases_from_arguments, cases_from_manifest,
                               evaluate_volumes)
from ..volume_inference import DEFAULT_TOP_K
from ._arguments import add_display_arguments, add_ensemble_argument, add_value_check_arguments, int_at_least

#: printed for the pixel metrics of an image-level split
_NO_MASKS = "n/a (no masks)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_or_checkpoint", metavar="RUN_OR_CKPT", nargs="?",
                        help="run directory, checkpoint file or a file of `medad-fast export` (.pt2, .onnx); "
                             "or none, with --ensemble")
    add_ensemble_argument(parser, "no --calibrate; default --out <first run>-ensemble<N>-eval-<split>")
    parser.add_argument("--data", metavar="DIR", help="BMAD-layout folder or MedIAnomaly dataset (its data.json "
                                                      "folder) (or --scans / --manifest for CT volumes)")
    parser.add_argument("--split", default=None, choices=("test", "valid", "train"),
                        help="default test; valid with --calibrate (with --manifest: the patients of that split)")
    parser.add_argument("--out", metavar="DIR",
                        help="output folder (default <run>-eval-<split> beside the run folder; volumes: "
                             "<run>-eval-volumes[-<split>]); nothing is written into the run folder without --calibrate")
    parser.add_argument("--calibrate", action="store_true",
                        help="choose the operating point (95%% specificity slice threshold, best-Dice pixel threshold) "
                             "on the evaluated validation data and store it in the run folder as operating_point.json, "
                             "which predict then uses; refused with --split test or train")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--cases", type=int_at_least(0), default=4, metavar="K",
                        help="heatmaps of the K worst and K best slices per class (of volumes: liver slices; default 4)")
    parser.add_argument("--reference-ops", action="store_true", help="use the pure-PyTorch reference ops")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the method's networks (compiling takes minutes on a CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    volumes = parser.add_argument_group("CT volumes")
    volumes.add_argument("--scans", nargs="+", metavar="SCAN", default=None,
                         help="CT scans: NIfTI files or DICOM series folders")
    volumes.add_argument("--masks", nargs="+", metavar="MASK", default=None,
                         help="liver mask of each scan, in the same order (on the scan's grid)")
    volumes.add_argument("--labels", nargs="+", metavar="LABEL", default=None,
                         help="tumour label volume of each scan, in the same order (on the scan's grid)")
    volumes.add_argument("--liver-label", nargs="+", type=float, metavar="V", default=None,
                         help="mask values that are liver (default: any nonzero value)")
    volumes.add_argument("--tumour-label", nargs="+", type=float, metavar="V", default=None,
                         help="label values that are tumour (default: any nonzero value; 2 for LiTS)")
    volumes.add_argument("--manifest", metavar="FILE", default=None,
                         help="a `medad-fast prepare` manifest.json: evaluate the source volumes of --split")
    add_display_arguments(volumes)
    add_value_check_arguments(volumes)
    volumes.add_argument("--top-k", type=int_at_least(1), default=DEFAULT_TOP_K, metavar="K",
                         help=f"slices in a volume's top-k mean score (default {DEFAULT_TOP_K})")
    volumes.add_argument("--lesion-thresholds", type=int_at_least(2), default=DEFAULT_LESION_THRESHOLDS,
                         metavar="N", help="map quantiles swept for the lesion-wise metrics, besides every lesion's "
                                           f"peak (default {DEFAULT_LESION_THRESHOLDS})")


def _volume_inputs(args: argparse.Namespace) -> str | None:
    """The problem with the input options, or None: exactly one of --data, --scans, --manifest."""
    given = [name for name, value in (("--data", args.data), ("--scans", args.scans), ("--manifest", args.manifest))
             if value]
    if len(given) != 1:
        return (f"pass one of --data (BMAD slices), --scans (CT volumes) or --manifest (a prepare manifest); got "
                f"{' and '.join(given) if given else 'none'}")
    volume_only = [name for name, value in (("--masks", args.masks), ("--labels", args.labels),
                                            ("--liver-label", args.liver_label),
                                            ("--tumour-label", args.tumour_label)) if value]
    if not args.scans and volume_only:
        return f"{volume_only[0]} goes with --scans"
    if args.scans and (not args.masks or not args.labels):
        return ("CT volumes need a liver mask (--masks) and a tumour label volume (--labels) per scan, in the same "
                "order")
    return None


def _main_volumes(args: argparse.Namespace) -> int:
    try:
        if args.manifest:
            cases, skipped = cases_from_manifest(args.manifest, args.split)
            split, source = args.split, str(Path(args.manifest).resolve())
        else:
            cases = cases_from_arguments(args.scans, args.masks, args.labels, args.liver_label, args.tumour_label)
            skipped, split, source = [], None, None
        metrics = evaluate_volumes(args.scorer, cases, args.out, device=args.device,
                                   batch_size=args.batch_size, progress=not args.no_progress, window=args.window,
                                   hist_eq=args.hist_eq, top_k=args.top_k, lesion_thresholds=args.lesion_thresholds,
                                   split=split, source=source, skipped=skipped, calibrate=args.calibrate,
                                   allow_nonfinite=args.allow_nonfinite, allow_non_hu=args.allow_non_hu,
                                   reference_ops=args.reference_ops, compile=args.compile, n_cases=args.cases)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"medad-fast evaluate: error: {exc}", file=sys.stderr)
        return 2
    if not distributed.is_main_process():  # under torchrun only rank 0 prints
        return 0

    def number(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    print(f"{metrics['n_volumes']} volume(s) ({metrics['n_volumes_with_tumour']} with tumour), "
          f"{metrics['n_slices']} liver slices ({metrics['n_abnormal_slices']} with tumour)")
    print(f"slice AUROC {number(metrics['image_auroc'])}  pixel AUROC (liver) {number(metrics['pixel_auroc'])}  "
          f"AUPRO@0.3 {number(metrics['aupro_0.3'])}  best Dice {number(metrics['best_dice'])}  "
          f"volume AUROC {number(metrics['volume_auroc'])}")
    lesions = metrics["lesions"]
    if lesions:
        for rule, key in (("overlap", "lesion_recall_at_fp"), ("peak", "lesion_recall_at_fp_peak")):
            recalls = ", ".join(f"{recall:.3f} at {budget} FP" for budget, recall in metrics[key].items())
            print(f"lesion recall ({rule}, {lesions['n_lesions']} lesions): {recalls}")
    for name, reason in metrics["undefined"].items():
        print(f"{name} metrics undefined: {reason}")
    for entry in metrics["skipped"]:
        print(f"skipped {entry['patient']} ({entry['status']} in the manifest)")
    point = metrics.get("operating_point")
    if point:
        print(f"calibrated on {point['source']}: slice threshold {point['slice_threshold']:.6g} "
              f"(score > it; specificity {point['slice_specificity']:.3f}), pixel threshold "
              f"{point['pixel_threshold']:.6g} (map >= it; Dice {point['pixel_dice']:.3f}) -> "
              f"{metrics['operating_point_file']} (predict uses it)")
    out = Path(metrics["out"])
    print(f"wrote {out / 'metrics.json'}, {out / 'volumes.csv'}, {out / 'slices.csv'}"
          + (f", {out / 'froc.png'}" if lesions else "") + (f", {out / 'heatmaps'}/" if args.cases else ""))
    return 0


def _scorer_input(args: argparse.Namespace) -> str | None:
    """The problem with RUN_OR_CKPT / --ensemble, or None: exactly one of them."""
    if args.run_or_checkpoint and args.ensemble:
        return f"pass RUN_OR_CKPT ({args.run_or_checkpoint}) or --ensemble RUN..., not both"
    if not args.run_or_checkpoint and not args.ensemble:
        return "pass the model: RUN_OR_CKPT, or --ensemble RUN1 RUN2 ..."
    return None


def main(args: argparse.Namespace) -> int:
    problem = _scorer_input(args) or _volume_inputs(args)
    if problem:
        print(f"medad-fast evaluate: error: {problem}", file=sys.stderr)
        return 2
    if not args.scans:  # --scans: the volumes named are the data, there is no split
        args.split = args.split or ("valid" if args.calibrate else "test")
    try:
        check_calibration_split(args.split if args.calibrate else None)
    except ValueError as exc:
        print(f"medad-fast evaluate: error: {exc}", file=sys.stderr)
        return 2
    args.scorer = args.ensemble or args.run_or_checkpoint
    if args.scans or args.manifest:
        return _main_volumes(args)
    try:
        metrics = evaluate(args.scorer, args.data, args.split, args.out, args.device,
                           args.batch_size, args.cases, not args.no_progress, args.reference_ops, args.compile,
                           args.calibrate)
    except (ValueError, FileNotFoundError) as exc:
        print(f"medad-fast evaluate: error: {exc}", file=sys.stderr)
        return 2
    if not distributed.is_main_process():  # under torchrun only rank 0 prints
        return 0
    out = Path(metrics["out"])
    if metrics["image_level"]:
        print(f"image AUROC {metrics['image_auroc']:.4f}  image AP {metrics['image_ap']:.4f}  "
              f"({metrics['n_images']} images, {metrics['n_abnormal_images']} abnormal; image-level split)")
        print(f"pixel AUROC, pixel AP, AUPRO@0.3, best Dice: {_NO_MASKS}")
    else:
        print(f"image AUROC {metrics['image_auroc']:.4f}  pixel AUROC {metrics['pixel_auroc']:.4f}  "
              f"(image AP {metrics['image_ap']:.4f}, pixel AP {metrics['pixel_ap']:.4f}, "
              f"AUPRO@0.3 {metrics['aupro_0.3']:.4f}, best Dice {metrics['best_dice']:.4f}; "
              f"{metrics['n_images']} slices)")
    point = metrics["operating_point"]
    if point:
        pixel_threshold = (_NO_MASKS if point["pixel_threshold"] is None
                           else f"{point['pixel_threshold']:.6g} (map >= it)")
        print(f"calibrated on {point['source']}: slice threshold {point['slice_threshold']:.6g} (score > "
              f"it), pixel threshold {pixel_threshold} -> {metrics['operating_point_file']} (predict uses it)")
    print(f"wrote {out / 'metrics.json'}, {out / 'roc.png'}, {out / 'heatmaps'}/")
    return 0
