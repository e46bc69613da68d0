"""``medad-fast predict``: the options of :func:`medad_fast.predict.predict` (images) and
:func:`medad_fast.predict.predict_volumes` (CT volumes), and what they print."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..operating_point import CALIBRATE_HINT
from ..predict import is_volume_input, predict, predict_volumes
from ..volume_inference import DEFAULT_TOP_K
from ._arguments import add_display_arguments, add_ensemble_argument, add_value_check_arguments, int_at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="checkpoint file, run directory, or a .pt2 / .onnx file of `medad-fast export` (with "
                             "--ensemble: none, every positional is an INPUT)")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="image files or folders of images; or CT scans: NIfTI files (.nii, .nii.gz) or DICOM "
                             "series folders (then --liver-mask is required)")
    add_ensemble_argument(parser, "e.g. predict IMAGES... --ensemble RUN1 RUN2 RUN3 --out DIR")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    volumes = parser.add_argument_group("CT volumes")
    volumes.add_argument("--liver-mask", nargs="+", metavar="MASK", default=None,
                         help="liver mask of each scan, in the same order (NIfTI or DICOM series on the scan's grid)")
    volumes.add_argument("--liver-label", nargs="+", type=float, metavar="V", default=None,
                         help="mask values that are liver (default: any nonzero value; e.g. 6 for BTCV labels)")
    add_display_arguments(volumes)
    add_value_check_arguments(volumes)
    volumes.add_argument("--top-k", type=int_at_least(1), default=DEFAULT_TOP_K, metavar="K",
                         help=f"slices in the top-k mean score and the review montage (default {DEFAULT_TOP_K})")
    volumes.add_argument("--threshold", type=float, default=None, metavar="T",
                         help="pixel threshold: write NAME_lesions.nii.gz (map >= T) per scan (default: the run's "
                              "calibrated operating_point.json from `medad-fast evaluate --calibrate`, if any; else "
                              "no lesion masks)")
    volumes.add_argument("--dicom-seg", action="store_true",
                         help="also write NAME_seg.dcm, the thresholded map as a DICOM Segmentation referencing the "
                              "series, for scans given as DICOM series (needs a threshold and highdicom)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the method's networks (pays off on many slices; compiling takes minutes "
                             "on a CPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _main_volumes(args: argparse.Namespace) -> int:
    try:
        summary = predict_volumes(args.ensemble or args.checkpoint, args.inputs, args.liver_mask or [], args.out, args.device,
                                  args.batch_size, not args.no_progress, args.window, args.hist_eq, args.top_k,
                                  args.liver_label, args.threshold, args.dicom_seg, args.compile,
                                  args.allow_nonfinite, args.allow_non_hu)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as exc:
        print(f"medad-fast predict: error: {exc}", file=sys.stderr)
        return 2
    for entry in summary["scans"]:
        print(f"{entry['score']:.4f}  (top-{summary['top_k']} mean {entry['top_k_mean']:.4f}, "
              f"{entry['n_liver_slices']} liver slices)  {entry['scan']}")
    if summary["threshold"] is not None:
        print(f"lesion masks at pixel threshold {summary['threshold']:.6g} (map >= it) from "
              f"{summary['threshold_from']}")
    elif args.ensemble:
        print("no lesion masks: no --threshold (an ensemble has no calibrated operating point)")
    else:
        print(f"no lesion masks: no --threshold and the run is not calibrated ({CALIBRATE_HINT})")
    print(f"wrote {len(summary['scans'])} anomaly map(s), slice table(s) and review montage(s) and "
          f"{Path(args.out) / 'scores.json'} (window {summary['window'][0]:g} {summary['window'][1]:g} HU, "
          f"hist-eq {'on' if summary['hist_eq'] else 'off'}: {summary['window_from']})")
    return 0


def main(args: argparse.Namespace) -> int:
    if args.ensemble:  # no CKPT: the first positional is an input
        args.inputs, args.checkpoint = [args.checkpoint, *args.inputs], None
    elif not args.inputs:
        print("medad-fast predict: error: no INPUT: pass CKPT INPUT... (or INPUT... --ensemble RUN...)",
              file=sys.stderr)
        return 2
    volume_inputs = [p for p in args.inputs if is_volume_input(p)]
    if volume_inputs or args.liver_mask:
        problem = None
        if len(volume_inputs) != len(args.inputs):
            others = [p for p in args.inputs if not is_volume_input(p)]
            problem = (f"CT volumes and 2-D images in one call ({others[0]} is not a NIfTI file or DICOM series "
                       "folder); score them in separate calls" if volume_inputs else
                       f"--liver-mask is for CT volumes (NIfTI files or DICOM series folders); {others[0]} is not one")
        elif not args.liver_mask:
            problem = (f"a liver mask is required for CT scans (the method is defined inside the liver): pass "
                       f"--liver-mask MASK for each of the {len(volume_inputs)} scan(s), in the same order")
        if problem:
            print(f"medad-fast predict: error: {problem}", file=sys.stderr)
            return 2
        return _main_volumes(args)
    if args.dicom_seg:
        print("medad-fast predict: error: --dicom-seg is for CT scans given as DICOM series", file=sys.stderr)
        return 2
    if args.threshold is not None:
        print("medad-fast predict: error: --threshold is for CT volumes (it writes NAME_lesions.nii.gz); 2-D images "
              "get heatmaps only", file=sys.stderr)
        return 2
    try:
        rows = predict(args.ensemble or args.checkpoint, args.inputs, args.out, args.device, args.batch_size,
                       not args.no_progress, args.compile)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"medad-fast predict: error: {exc}", file=sys.stderr)
        return 2
    if not distributed.is_main_process():  # under torchrun only rank 0 prints
        return 0
    for row in rows:
        print(f"{row['score']:.4f}  {row['path']}")
    print(f"wrote {Path(args.out) / 'scores.csv'}, {Path(args.out) / 'scores.json'} and "
          f"{len(rows)} heatmaps in {Path(args.out) / 'heatmaps'}/")
    return 0
