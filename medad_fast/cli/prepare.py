"""``medad-fast prepare``: the options of :func:`medad_fast.data.volumes.prepare_dataset` and
what it prints."""

from __future__ import annotations

import argparse
import sys

from ..data.cases import KINDS
from ..data.scan import DEFAULT_WINDOW
from ..data.volumes import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, PrepareReport, prepare_dataset


def _summary(kind: str, report: PrepareReport) -> str:
    """What ``prepare`` prints: the counts, and each failed volume with its message."""
    c = report.counts
    lines = [
        f"prepare {kind}: {report.n_cases} volume(s): {len(report.converted)} converted, "
        f"{len(report.skipped)} already done, {len(report.failed)} failed",
        f"  {report.out}: {c['slices']} slices; train {c['train']['good']} good; "
        f"valid {c['valid']['good']} good / {c['valid']['Ungood']} Ungood; "
        f"test {c['test']['good']} good / {c['test']['Ungood']} Ungood; patients train {c['patients']['train']}, "
        f"valid {c['patients']['valid']}, test {c['patients']['test']}; "
        f"{c['train_abnormal_dropped']} abnormal slice(s) of train patients left out",
    ]
    if report.failed:
        lines.append(f"FAILED ({len(report.failed)}); fix them and run the same command again to resume:")
        lines.extend(f"  {patient}: {message}" for patient, message in sorted(report.failed.items()))
    return "\n".join(lines)


# `prepare --help`: the layouts it reads and writes (medad_fast.data.volumes's docstring has the details).
_LAYOUTS_HELP = """\
input layouts (SRC; only read):
  lits   volume-N.nii[.gz] + segmentation-N.nii[.gz] anywhere under SRC (LiTS ships
         them in several "Training Batch" folders); labels 1 = liver, 2 = tumour
  btcv   img/imgXXXX.nii.gz + label/labelXXXX.nii.gz (or both flat in SRC, or anywhere
         below it); label 6 = liver; BTCV has no tumour labels: every slice is normal
  dicom  3D-IRCADb-style patient folders (SRC is one of them or holds them), each with
         PATIENT_DICOM/ (the CT series) and MASKS_DICOM/liver/ (the liver mask series,
         required) plus optional MASKS_DICOM/livertumor*/ (tumour mask series, united);
         a mask voxel is inside when its stored value is nonzero. Unzip
         PATIENT_DICOM.zip and MASKS_DICOM.zip first.

output (OUT, the BMAD layout; file stem <patient>_<slice index, 4 digits>):
  OUT/train/good/*.png                normal liver slices of the train patients
  OUT/{valid,test}/good/img/*.png     liver slices without tumour
  OUT/{valid,test}/Ungood/img/*.png   slices with tumour; masks (0/255) in Ungood/label/
  OUT/manifest.json                   every slice, its source and patient; settings; split

Only axial slices holding liver are written, windowed to 0..255, 0 outside the liver.
The split is by patient. Running the same command again resumes; a second source may
be added to the same OUT, e.g. BTCV normals for training and LiTS for valid/test:
  medad-fast prepare btcv BTCV/ data --val-fraction 0 --test-fraction 0
  medad-fast prepare lits LiTS/ data --val-fraction 0.2 --test-fraction 0.8
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the layout table's lines
    parser.epilog = _LAYOUTS_HELP
    parser.add_argument("kind", choices=KINDS, metavar="{lits,btcv,dicom}",
                        help="source format: LiTS NIfTI, BTCV NIfTI, or 3D-IRCADb-style DICOM series")
    parser.add_argument("src", metavar="SRC", help="folder holding the source data (only read)")
    parser.add_argument("out", metavar="OUT",
                        help="output folder: missing, empty, or a previous prepare output (resumed / extended)")
    parser.add_argument("--window", type=float, nargs=2, default=list(DEFAULT_WINDOW), metavar=("LO", "HI"),
                        help="HU window mapped to 0..255 (default -200 250)")
    parser.add_argument("--hist-eq", action="store_true", help="histogram-equalise the liver pixels (BMAD style)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, metavar="F",
                        help=f"fraction of PATIENTS for validation (default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION, metavar="F",
                        help=f"fraction of PATIENTS for test (default {DEFAULT_TEST_FRACTION})")
    parser.add_argument("--seed", type=int, default=0, metavar="K", help="seed of the patient split (default 0)")
    parser.add_argument("--size", type=int, default=None, metavar="S",
                        help="resize slices to S x S (default: keep the source size)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="volumes converted in parallel (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Exit code: 0 all volumes converted, 1 some failed (summary printed), 2 bad arguments/OUT."""
    try:
        report = prepare_dataset(args.kind, args.src, args.out, window=tuple(args.window), hist_eq=args.hist_eq,
                                 val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                                 size=args.size, workers=args.workers, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"medad-fast prepare: error: {e}", file=sys.stderr)
        return 2
    print(_summary(args.kind, report))
    return 0 if report.ok else 1
