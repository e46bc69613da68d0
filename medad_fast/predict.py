"""`medad-fast predict`: score images or CT volumes with a checkpoint of any method.

Two kinds of input, one kind per call:

- **2-D images**: ``medad-fast predict CKPT INPUT... --out DIR``: every INPUT is an image
  file or a folder (its images, recursively);
- **CT volumes**: ``medad-fast predict CKPT SCAN... --liver-mask MASK... --out DIR``: every
  SCAN is a NIfTI file (``.nii``, ``.nii.gz``) or a DICOM series folder, with one liver mask
  per scan, in the same order (see :func:`predict_volumes`).

Either kind scores with a seed ensemble instead of one checkpoint: ``medad-fast predict
INPUT... --ensemble RUN RUN... --out DIR`` (the library calls: a list of runs as
``checkpoint``) scores with the mean of the runs' maps (:mod:`medad_fast.ensemble`: the
averaging, the image score, the runs it refuses). An ensemble has no stored operating point:
its CT lesion masks need ``--threshold``.

Images: each is read as grayscale, resized to the model's side (area averaging to shrink,
bilinear to enlarge, as the BMAD loader does) and scored. When the run crops to the liver box
(``--crop``, :mod:`medad_fast.data.crop`), each image is cut to its liver box (``image > 0``;
one box per volume for ``<volume>_<index>`` file names) before the resize, and its map is
pasted back into the whole image; an image without liver is scored whole, with a warning.

Writes into ``--out``::

    scores.csv    path,score (one row per image, in input order)
    scores.json   [{"path", "score", "heatmap"}...] plus the checkpoint (an ensemble: the
                  list of its members' checkpoints) and its preset
    heatmaps/     <index>-<stem>.png: the slice beside the slice with its anomaly map
                  (colour scale 0 .. the largest pixel value of the call, heatmap_scale)

Under torchrun every rank reads and scores its contiguous share of the images; rank 0
gathers them and writes every file.

Every input is made as the model's training slices were: its preprocessing record
(:mod:`medad_fast.preprocessing`: HU window, hist-eq, crop, side), stored in the checkpoint
or the exported file, never read from the training data (which may be gone). A checkpoint
saved before records existed is scored with an assumed one, and a warning names it.

CT volumes (:mod:`medad_fast.volume_inference` scores them): the axial slices holding liver
are windowed as ``prepare`` wrote the training slices (the record's window and hist-eq, or
``--window`` / ``--hist-eq``), scored at the model's side in batches, and the maps put back on
the scan's grid. Writes into ``--out``, per scan (``NAME`` = the file name without
``.nii[.gz]``, or the DICOM folder's name; prefixed with the scan's index in the call when two
scans share a name)::

    NAME_anomaly.nii.gz   the pixel anomaly map, float32, on the scan's grid: same shape,
                          affine, qform/sform and codes as the input; 0 outside the liver
    NAME_slices.csv       slice,z_mm,liver_pixels,score: one row per scored (liver) slice,
                          ``slice`` the voxel index along the axial axis, ``z_mm`` the RAS z
                          of the slice's centre
    NAME_review.png       the --top-k highest-scoring slices with their maps (one colour
                          scale per scan: 0 .. the map's maximum), slice number and z on each
    NAME_lesions.nii.gz   with a pixel threshold (``--threshold T``, else the run's calibrated
                          operating point: ``operating_point.json`` beside the checkpoint or
                          exported file, written by ``evaluate --calibrate``,
                          :mod:`medad_fast.operating_point`): uint8, 1 where the map >= T, on
                          the scan's grid (same header geometry as the map). Neither: no
                          lesion masks (maps, tables and montages only), and a line says so
    NAME_seg.dcm          with ``--dicom-seg``, for scans that came as DICOM series: the same
                          mask as a DICOM Segmentation object referencing the series
                          (:mod:`medad_fast.dicom_seg`, needs the optional highdicom)
    scores.json           per scan: ``score`` (max of the slice scores), ``top_k_mean`` (mean
                          of the --top-k highest), every slice's score, the outputs' names;
                          the pixel threshold and where it came from (``threshold_from``);
                          with a stored operating point also its slice threshold and, per
                          slice, ``flagged`` (score > slice threshold)

Nothing is half-written: every output goes to a hidden staging folder inside ``--out`` and is
moved into place only once every scan has been scored; any error (a mask off the scan's grid,
an empty liver mask, a truncated file...) leaves ``--out`` as it was, and an ``--out`` that
cannot be written is reported before any work. Scans with NaN or infinite voxels, or not in
Hounsfield units, and liver masks holding NaN are refused naming the file
(:func:`medad_fast.data.scan.check_scan_values`; ``--allow-nonfinite`` / ``--allow-non-hu``
go on with a named warning). Volumes are scored in one process (not under torchrun).
"""

from __future__ import annotations

import csv
import functools
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import __version__, distributed
from .config import Config
from .inference import ScorerPath, load_scorer, resolve_scorer, score_dataset
from .data.dataset import ImageFileDataset
from .data.layout import collect_image_files
from .data.scan import (check_scan_values, display_slice, is_dicom_folder, is_nifti_path, nifti_like,
                        Volume, open_liver_mask, read_geometry, read_volume, require_liver)
from .io import atomic_write_json, atomic_write_text, check_writable_folder, fsync_directory
from .operating_point import CALIBRATE_HINT, OPERATING_POINT_NAME, read_operating_point
from .preprocessing import preprocessing_of, scoring_window
from .runtime import resolve_device
from .visualize import overlay_heatmap, plot_review, save_rgb_png
from .dicom_seg import require_highdicom, write_dicom_seg
from .volume_inference import DEFAULT_TOP_K, aggregate_slice_scores, display_images, read_ahead, score_volume

__all__ = ["predict", "predict_volumes", "is_volume_input"]


def predict(checkpoint: ScorerPath, inputs: list[str | Path], out: str | Path,
            device: str | torch.device | None = None, batch_size: int = 16, progress: bool = True,
            compile: bool = False) -> list[dict]:
    """Score the images of ``inputs`` with ``checkpoint`` (a checkpoint, run directory or a
    file of ``medad-fast export``; a list of runs: their seed ensemble,
    :mod:`medad_fast.ensemble`); write scores and heatmaps into ``out``. ``compile``:
    compile the method's networks (:func:`~medad_fast.runtime.compile_networks`). Returns
    ``[{"path", "score", "heatmap"}]`` in input order."""
    checkpoint = resolve_scorer(checkpoint)
    check_writable_folder(out)  # before any work
    files = collect_image_files(inputs)
    world = distributed.init_distributed(resolve_device(device))  # a no-op without torchrun
    method = load_scorer(checkpoint, world.device, compile)
    record = preprocessing_of(method.config)
    dataset = ImageFileDataset(files, size=record.image_size, crop=record.crop == "liver")
    start, stop = distributed.shard_bounds(len(files))  # this rank's share, gathered back in order
    results = [(maps, scores) for _, maps, scores in
               score_dataset(method, dataset, batch_size, start, stop, progress and world.is_main, world.device)]
    size = method.config.run.image_size
    maps = torch.cat([m for m, _ in results]) if results else torch.empty(0, size, size)
    scores = torch.cat([s for _, s in results]) if results else torch.empty(0)
    maps, scores = distributed.all_gather_uneven(maps), distributed.all_gather_uneven(scores)
    rows = _write_predictions(Path(out), checkpoint, method.config, dataset, maps, scores) if world.is_main else None
    return distributed.broadcast_object(rows)


def _checkpoint_record(checkpoint: Path | list[Path]) -> str | list[str]:
    """``scores.json``'s ``checkpoint``: the resolved path; an ensemble's: its members'."""
    return str(checkpoint.resolve()) if isinstance(checkpoint, Path) else [str(p.resolve()) for p in checkpoint]


def _write_predictions(out: Path, checkpoint: Path | list[Path], config: Config, dataset: ImageFileDataset,
                       maps: torch.Tensor, scores: torch.Tensor) -> list[dict]:
    """Heatmaps, scores.csv and scores.json of the gathered predictions."""
    # one colour scale for all heatmaps of this call: 0 .. the largest pixel value
    heatmap_scale = float(maps.max()) if maps.numel() else 1.0
    rows = []
    files = [entry.image for entry in dataset.files]
    width = max(3, len(str(len(files))))
    for i, path in enumerate(files):
        # the index prefix keeps names unique when two inputs share a stem
        name = f"{i:0{width}d}-{path.stem}.png"
        overlay = overlay_heatmap(dataset[i].image[0].numpy(), maps[i].numpy(), vmax=heatmap_scale)
        save_rgb_png(out / "heatmaps" / name, overlay)
        rows.append({"path": str(path), "score": float(scores[i]), "heatmap": f"heatmaps/{name}"})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "score"])
    writer.writerows([r["path"], f"{r['score']:.6f}"] for r in rows)
    atomic_write_text(out / "scores.csv", text.getvalue())
    atomic_write_json(out / "scores.json", {"checkpoint": _checkpoint_record(checkpoint),
                                            "method": config.run.method,
                                            "variant": config.variant, "preset": config.run.preset,
                                            "image_size": config.run.image_size,
                                            "crop": "liver" if dataset.crop else "none",
                                            "preprocessing": preprocessing_of(config).to_dict(),
                                            "heatmap_scale": heatmap_scale, "images": rows})
    return rows


def is_volume_input(path: str | Path) -> bool:
    """True for a CT volume input: a NIfTI file name or a DICOM series folder."""
    return is_nifti_path(path) or is_dicom_folder(path)


def _output_names(geometries) -> list[str]:
    """Output name per scan: its name, or ``<index>-<name>`` for all when two names clash."""
    names = [g.name for g in geometries]
    if len(set(names)) == len(names):
        return names
    width = max(3, len(str(len(names))))
    return [f"{i:0{width}d}-{name}" for i, name in enumerate(names)]


def _slices_csv(result) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slice", "z_mm", "liver_pixels", "score"])
    writer.writerows([int(k), f"{z:.3f}", int(n), f"{score:.6f}"]
                     for k, z, n, score in zip(result.slice_indices, result.z_mm, result.liver_pixels,
                                               result.slice_scores))
    return text.getvalue()


def _write_review(path: Path, scan, liver, result, top_k: int, window, hist_eq: bool) -> None:
    """The montage of the ``top_k`` highest-scoring slices (ranked by score)."""
    ranked = np.argsort(-result.slice_scores, kind="stable")[:top_k]
    indices = result.slice_indices[ranked]
    images, _ = display_images(scan, liver, indices, window, hist_eq)
    ornt = scan.orientation
    tiles = [(image, display_slice(result.anomaly_map, ornt, int(k)),
              f"slice {int(k)}  z = {z:.1f} mm  score {score:.3f}")
             for image, k, z, score in zip(images, indices, result.z_mm[ranked], result.slice_scores[ranked])]
    vmax = float(result.anomaly_map.max())
    plot_review(path, tiles, vmax, f"{scan.path.name}: the {len(tiles)} highest-scoring slices "
                f"(radiological view: patient right on the left; colour scale 0 .. {vmax:.3g})")


def _read_scan_and_liver(geometry, source, liver_labels: list[float] | None, allow_nonfinite: bool = False,
                         allow_non_hu: bool = False) -> tuple[Volume, np.ndarray]:
    """The scan's voxels and its liver mask, checked (``VolumeError`` naming the files when the
    mask is empty or the scan's values cannot be scored: :func:`~medad_fast.data.scan.check_scan_values`)."""
    scan = read_volume(geometry)
    liver = source.read(liver_labels)
    require_liver(liver, [source.path], scan.path, liver_labels)
    check_scan_values(scan, liver, allow_nonfinite=allow_nonfinite, allow_non_hu=allow_non_hu)
    return scan, liver


def predict_volumes(checkpoint: ScorerPath, scans: list[str | Path], liver_masks: list[str | Path],
                    out: str | Path, device: str | torch.device | None = None, batch_size: int = 16,
                    progress: bool = True, window: tuple[float, float] | None = None, hist_eq: bool | None = None,
                    top_k: int = DEFAULT_TOP_K, liver_labels: list[float] | None = None,
                    threshold: float | None = None, dicom_seg: bool = False, compile: bool = False,
                    allow_nonfinite: bool = False, allow_non_hu: bool = False) -> dict:
    """Score CT volumes with ``checkpoint`` and write their maps, slice tables, review
    montages and ``scores.json`` into ``out`` (see the module docstring). Returns the
    ``scores.json`` content.

    ``liver_masks[i]`` is the liver mask of ``scans[i]``: on the scan's voxel grid, liver =
    any nonzero value, or one of ``liver_labels``. ``window`` / ``hist_eq`` None: the
    model's preprocessing record's (:mod:`medad_fast.preprocessing`). ``threshold``: the
    pixel threshold of the ``_lesions`` masks; None: the run's stored operating point when it
    has one (``operating_point.json`` beside the checkpoint; an ensemble, a list of runs, has
    none), else no masks. ``dicom_seg``: also
    write each DICOM scan's mask as a DICOM SEG (needs a threshold). ``allow_nonfinite`` /
    ``allow_non_hu``: score NaN/infinite voxels as air, and scans that do not look like
    Hounsfield units as they are, with a warning, instead of refusing them
    (:func:`~medad_fast.data.scan.check_scan_values`). ``out`` is checked to be writable
    before any work. Every scan and
    mask header is checked before anything is scored; errors raise ``ValueError`` (a
    :class:`~medad_fast.data.scan.VolumeError`) or ``FileNotFoundError`` naming the files,
    and leave ``out`` as it was."""
    checkpoint = resolve_scorer(checkpoint)
    check_writable_folder(out)  # before any work
    scans, liver_masks = [Path(p) for p in scans], [Path(p) for p in liver_masks]
    if not scans:
        raise ValueError("no scan to score")
    if len(liver_masks) != len(scans):
        raise ValueError(f"{len(scans)} scan(s) but {len(liver_masks)} liver mask(s): pass one --liver-mask per "
                         "scan, in the same order")
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    world = distributed.init_distributed(resolve_device(device))
    if world.is_distributed:
        raise ValueError("CT volumes are scored in one process: run `medad-fast predict` without torchrun")
    if dicom_seg:
        require_highdicom()  # a missing optional package is reported before any scoring
    try:
        # a broken file is reported before any scoring; an ensemble has no calibrated point of its own
        point = read_operating_point(checkpoint.parent) if isinstance(checkpoint, Path) else None
    except ValueError:
        if threshold is None:
            raise
        point = None  # --threshold given: the stored point is not needed
    if threshold is not None:
        threshold, threshold_from = float(threshold), "--threshold"
        if not np.isfinite(threshold):
            raise ValueError(f"--threshold must be a finite number, got {threshold}")
    elif point is not None:
        threshold = float(point["pixel_threshold"])
        threshold_from = (f"{checkpoint.parent / OPERATING_POINT_NAME} (calibrated on "
                          f"{point.get('source') or 'split ' + str(point.get('split'))})")
    else:
        threshold_from = None
    slice_threshold = float(point["slice_threshold"]) if point is not None and "slice_threshold" in point else None
    if dicom_seg and threshold is None:
        raise ValueError(f"--dicom-seg needs a pixel threshold: pass --threshold T, or {CALIBRATE_HINT}")
    # headers first: a wrong mask or a broken series is reported before any scoring
    geometries = [read_geometry(scan, modality="CT") for scan in scans]
    if dicom_seg and not any(g.format == "dicom" for g in geometries):
        raise ValueError(f"--dicom-seg: none of the scans is a DICOM series ({scans[0]} is {geometries[0].format}); "
                         "a DICOM SEG references the series it was made from")
    sources = [open_liver_mask(mask, geometry) for mask, geometry in zip(liver_masks, geometries)]
    method = load_scorer(checkpoint, world.device, compile)
    record = preprocessing_of(method.config)
    window, hist_eq, settings_from = scoring_window(record, window, hist_eq)
    names = _output_names(geometries)

    out = Path(out)  # checked by check_writable_folder above
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".predict-", suffix=".partial", dir=out))
    try:
        entries = []
        loaders = [functools.partial(_read_scan_and_liver, geometry, source, liver_labels, allow_nonfinite,
                                     allow_non_hu)
                   for geometry, source in zip(geometries, sources)]
        for (scan, liver), source, name in zip(read_ahead(loaders), sources, names):
            result = score_volume(method, scan, liver, window, hist_eq, batch_size, world.device, progress)
            outputs = {"anomaly_map": f"{name}_anomaly.nii.gz", "slices_csv": f"{name}_slices.csv",
                       "review": f"{name}_review.png"}
            if threshold is not None:
                outputs["lesions"] = f"{name}_lesions.nii.gz"
                lesions = (result.anomaly_map >= np.float32(threshold)) & liver
                nifti_like(scan, lesions.astype(np.uint8)).to_filename(str(stage / outputs["lesions"]))
                if dicom_seg and scan.format == "dicom":
                    outputs["dicom_seg"] = f"{name}_seg.dcm"
                    write_dicom_seg(stage / outputs["dicom_seg"], scan, lesions, threshold=threshold,
                                    method=method.config.run.method, software_version=__version__)
            nifti_like(scan, result.anomaly_map).to_filename(str(stage / outputs["anomaly_map"]))
            (stage / outputs["slices_csv"]).write_text(_slices_csv(result))
            _write_review(stage / outputs["review"], scan, liver, result, top_k, window, hist_eq)
            entries.append({
                "scan": str(scan.path), "liver_mask": str(source.path), "format": scan.format,
                **aggregate_slice_scores(result.slice_scores, top_k),
                "shape": list(scan.shape), "axial_axis": scan.axial_axis, "n_slices": int(scan.shape[scan.axial_axis]),
                "n_liver_slices": int(result.slice_indices.size), "map_max": float(result.anomaly_map.max()),
                **({"lesion_voxels": int(lesions.sum())} if threshold is not None else {}),
                **({"n_flagged_slices": int((result.slice_scores > slice_threshold).sum())}
                   if slice_threshold is not None else {}),
                "outputs": outputs,
                "slices": [{"slice": int(k), "z_mm": round(float(z), 3), "liver_pixels": int(n), "score": float(v),
                            **({"flagged": bool(v > slice_threshold)} if slice_threshold is not None else {})}
                           for k, z, n, v in zip(result.slice_indices, result.z_mm, result.liver_pixels,
                                                 result.slice_scores)]})
            del scan, liver, result
        summary = {"checkpoint": _checkpoint_record(checkpoint), "method": method.config.run.method,
                   "variant": method.config.variant, "preset": method.config.run.preset,
                   "image_size": method.config.run.image_size, "window": list(window), "hist_eq": hist_eq,
                   "crop": record.crop, "window_from": settings_from, "preprocessing": record.to_dict(), "top_k": top_k,
                   "liver_labels": None if liver_labels is None else list(liver_labels),
                   "threshold": threshold, "threshold_from": threshold_from,
                   "threshold_rule": "lesion voxel: anomaly map >= threshold (inside the liver)",
                   "slice_threshold": slice_threshold,
                   "aggregation": "score = max of the slice scores; top_k_mean = mean of the top_k highest slice "
                                  "scores (all of them when fewer); a slice score is the method's image score",
                   "scans": entries}
        atomic_write_json(stage / "scores.json", summary)
        for path in sorted(stage.iterdir()):
            os.replace(path, out / path.name)
        fsync_directory(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    return summary
