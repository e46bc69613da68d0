"""Score one real CT volume with a trained run: the LiTS case shipped in the PyPI package
``liver-ct-segmentation-package==1.6.0`` (volume 117, cropped around the liver, 128^3 voxels,
MRC files with a liver + tumour label map). Needs network access for ``pip download``; the
volume is never committed and no test depends on it.

    .venv/bin/python scripts/real_ct_check.py RUN --work /tmp/lits

It downloads the wheel into ``--work``, converts the two MRC volumes to NIfTI (the MRC
header carries no spacing: 1 mm voxels; the first MRC axis is the axial one), then runs
``medad-fast predict`` (map, lesions at the run's operating point, review montage) and
``medad-fast evaluate --scans`` (without ``--calibrate``: it writes nothing into the run) on
a copy of the run, and prints where the map peaks relative to the tumour label.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

PACKAGE = "liver-ct-segmentation-package==1.6.0"
MRC_HEADER_BYTES = 1024
SIDE = 128


def read_mrc(path: Path, dtype: str) -> np.ndarray:
    """A 128^3 MRC volume (no extended header) as ``[x, y, z]`` with z the MRC's first (axial) axis."""
    header = np.fromfile(path, dtype="<i4", count=4)
    if tuple(header[:3]) != (SIDE, SIDE, SIDE):
        raise ValueError(f"{path}: expected a {SIDE}^3 MRC volume, header says {tuple(header[:3])}")
    data = np.fromfile(path, dtype=dtype, offset=MRC_HEADER_BYTES).reshape(SIDE, SIDE, SIDE)
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="trained run directory (or checkpoint's folder)")
    parser.add_argument("--work", type=Path, default=Path("real_ct_check"), help="working folder")
    args = parser.parse_args(argv)
    import nibabel as nib

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    wheels = list(work.glob("liver_ct_segmentation_package-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(work)], check=True)
        wheels = list(work.glob("liver_ct_segmentation_package-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        image = np.frombuffer(wheel.read("liver_ct_segmentation_package/data/img_117.mrc"), dtype=np.uint8)
        label = np.frombuffer(wheel.read("liver_ct_segmentation_package/data/lab_117.mrc"), dtype=np.uint8)
    (work / "img_117.mrc").write_bytes(image.tobytes())
    (work / "lab_117.mrc").write_bytes(label.tobytes())
    hu = read_mrc(work / "img_117.mrc", "<f4")
    labels = read_mrc(work / "lab_117.mrc", "<u2")  # 0 background, 1 liver, 2 tumour
    affine = np.eye(4)
    paths = {}
    for name, data in (("ct", np.rint(hu).astype(np.int16)), ("liver", (labels > 0).astype(np.uint8)),
                       ("tumour", (labels == 2).astype(np.uint8))):
        nifti = nib.Nifti1Image(data, affine)
        nifti.set_qform(affine, code=1)
        nifti.set_sform(affine, code=1)
        paths[name] = work / f"lits117_{name}.nii.gz"
        nib.save(nifti, str(paths[name]))

    run_copy = work / "run"
    shutil.rmtree(run_copy, ignore_errors=True)
    shutil.copytree(args.run, run_copy)
    cli = [sys.executable, "-m", "medad_fast.cli"]
    subprocess.run([*cli, "predict", str(run_copy), str(paths["ct"]), "--liver-mask", str(paths["liver"]),
                    "--out", str(work / "scored"), "--no-progress"], check=True)
    subprocess.run([*cli, "evaluate", str(run_copy), "--scans", str(paths["ct"]), "--masks", str(paths["liver"]),
                    "--labels", str(paths["tumour"]), "--out", str(work / "evaluated"), "--no-progress"], check=True)

    anomaly = np.asarray(nib.load(str(work / "scored" / "lits117_ct_anomaly.nii.gz")).dataobj)
    tumour, liver = labels == 2, labels > 0
    peak = np.unravel_index(np.argmax(anomaly), anomaly.shape)
    top = (anomaly >= np.quantile(anomaly[liver], 0.99)) & liver
    print(f"map peak at voxel {tuple(int(i) for i in peak)}: {'inside' if tumour[peak] else 'outside'} the tumour label")
    print(f"top 1 % of the liver's map values: {(top & tumour).sum() / top.sum():.1%} inside tumour "
          f"(tumour is {tumour[liver].mean():.1%} of the liver)")
    print(f"review montage: {work / 'scored' / 'lits117_ct_review.png'}; metrics: {work / 'evaluated' / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
