"""`medad-fast evaluate` on CT volumes: slice, pixel, volume and lesion-wise metrics.

Two ways to name the volumes:

- ``medad-fast evaluate CKPT --scans S... --masks M... --labels L...``: every SCAN is a NIfTI
  file or a DICOM series folder, with its liver mask and its tumour label volume (NIfTI or
  DICOM series, on the scan's voxel grid: checked as ``predict`` checks a liver mask, errors
  naming both files), in the same order. Liver = any nonzero mask value (or
  ``--liver-label``), tumour = any nonzero label value (or ``--tumour-label``): a LiTS
  segmentation is both, ``--masks seg.nii.gz --labels seg.nii.gz --liver-label 1 2
  --tumour-label 2``.
- ``medad-fast evaluate CKPT --manifest DATA/manifest.json [--split test]``: the patients of a
  split that ``medad-fast prepare`` converted (its manifest lists each patient's source files
  and split), read with the label codes and folder names prepare used (one case source per
  kind, :mod:`medad_fast.data.cases`: LiTS liver 1 and 2, tumour 2; BTCV liver 6, no tumour;
  3D-IRCADb DICOM ``PATIENT_DICOM``, ``MASKS_DICOM/liver``, ``MASKS_DICOM/livertumor*``
  united). Patients that ``prepare`` could not convert are skipped and listed.

The region scored is the liver mask united with the tumour label (tumour counts as liver, as
``prepare`` writes slices). Each volume is scored as ``predict`` scores it
(:func:`medad_fast.volume_inference.score_volume`: the liver slices, a batch at a time), then:

- **slices** (pooled over all scans): a liver slice is abnormal when it holds a tumour voxel;
  image AUROC / AP of the slice scores;
- **pixels** (pooled, inside the region only): pixel AUROC, AP, AUPRO@0.3 (regions 8-connected
  within a slice), best Dice, exactly as ``evaluate`` computes them on BMAD slices but without
  the pixels outside the liver (:class:`medad_fast.metrics.PixelMetricsStream` with a region;
  slices of different sizes are padded with pixels outside it);
- **volumes**: score = max of the slice scores (as ``predict``), has tumour = any tumour voxel;
  volume AUROC when there are two or more scans of both kinds;
- **lesions in 3-D** (:func:`medad_fast.metrics.lesion_hits`, :func:`~medad_fast.metrics.lesion_froc`):
  lesion recall at 1, 2 and 5 false-positive components per scan, under the ``overlap`` and
  the ``peak`` hit rule (see :mod:`medad_fast.metrics`). The thresholds swept are every
  lesion's peak value and up to ``--lesion-thresholds`` quantiles of the maps' values inside
  the liver (exact when the maps hold no more distinct values than that). Each threshold is one
  ``scipy.ndimage.label`` of the liver's bounding box: about 0.5 s for 6 million voxels on one
  busy CPU core, so a minute per volume at the default 100.

The model is a checkpoint, a run directory or a file of ``medad-fast export`` (``.pt2``,
``.onnx``; ``metrics.json`` says which: ``scorer``); ``--reference-ops`` and ``--compile``
work as on slices. Each volume is windowed as the model's training slices were (its
preprocessing record, :mod:`medad_fast.preprocessing`, unless ``--window`` / ``--hist-eq``
say otherwise).

Writes into ``--out`` (default ``<run>-eval-volumes`` or ``<run>-eval-volumes-<split>``
beside the run folder)::

    metrics.json          all of the above, the operating point, the FROC curves, skipped
                          patients, ``heatmap_scale`` (the heatmaps' colour scale: the largest
                          map value inside the liver)
    volumes.csv           one row per scan: name, scan, has_tumour, n_lesions, tumour_voxels,
                          n_liver_slices, n_tumour_slices, score, top_k_mean
    slices.csv            one row per liver slice: name, slice, z_mm, label, score
    froc.png              lesion recall against false-positive components per scan
    heatmaps/worst-*.png  the liver slices with tumour with the lowest scores and those without
                          with the highest (``--cases K`` of each, default 4), named
                          ``<quality>-<abnormal|normal>-<rank>-<scan name>-slice<index>-score<s>.png``
    heatmaps/best-*.png   the opposite (the method's best cases)

Each heatmap PNG shows the liver slice windowed as it was scored (display orientation, 0
outside the liver, padded at the bottom and right to the largest slice of the scans) and,
beside it, the same with the anomaly map blended in (jet, from 0 to ``heatmap_scale``) and
the tumour label's outline in green; the slice is read again from its scan for it.

and, with ``--calibrate`` only (the manifest's ``valid`` patients, or volumes given with
``--scans``; refused on the test and train splits), ``operating_point.json`` chosen on the
evaluated volumes into the run folder (:mod:`medad_fast.operating_point`); without it
nothing is written into the run folder. Every file is written atomically; maps are spilled to temporary files inside ``--out`` (deleted at the
end), so memory holds one volume at a time.

The loop is the one evaluation driver that slices run too (:mod:`medad_fast.evaluation`);
this module is its volume source (:class:`VolumeSource`) with the per-volume aggregation.
Under torchrun (``torchrun --nproc_per_node N -m medad_fast.cli evaluate ... --scans ...``)
every rank scores its contiguous share of the volumes; their liver slices (maps, tumour
masks, regions, scores) are gathered to rank 0 in volume order (held in memory there until
all ranks are done), each rank spills its volumes' lesion arrays into the one spill folder
inside ``--out`` (so ``--out`` must be on a file system every rank sees), and rank 0 alone
computes the metrics (the same as one process's) and writes the files.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from .cpu_isa import isa_report
from .data import manifest as prepare_manifest
from .data.cases import CASE_SOURCES, LabelSource, VolumeCase
from .data.scan import (Geometry, LiverMaskSource, Volume, VolumeError, check_scan_values, display_slice,
                        open_liver_mask, read_geometry, read_volume, require_liver)
from .evaluation import (EvaluationSource, ScoredBatch, evaluation_dir, resolve_evaluated, run_evaluation,
                         scorer_paths)
from .inference import scorer_facts
from .io import atomic_write_json, atomic_write_text, check_writable_folder
from .metrics import (DEFAULT_FP_BUDGETS, HIT_RULES, LESION_STRUCTURE, PixelMetricsStream, detection_thresholds,
                      image_metrics, lesion_froc, lesion_hits, roc_auc)
from .preprocessing import scoring_window
from .visualize import plot_froc
from .volume_inference import DEFAULT_TOP_K, aggregate_slice_scores, display_images, read_ahead, score_volume

__all__ = ["LabelSource", "VolumeCase", "VolumeSource", "cases_from_arguments", "cases_from_manifest", "evaluate_volumes",
           "DEFAULT_LESION_THRESHOLDS"]

#: quantiles of the maps' liver values swept for the lesion-wise metrics (besides every lesion's peak)
DEFAULT_LESION_THRESHOLDS = 100
# at least this many of each volume's liver map values are kept to choose the thresholds from
_SAMPLES_PER_VOLUME = 1001


def _values(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def cases_from_arguments(scans: Sequence[str | Path], masks: Sequence[str | Path], labels: Sequence[str | Path],
                         liver_labels: Sequence[float] | None = None,
                         tumour_labels: Sequence[float] | None = None) -> list[VolumeCase]:
    """``--scans`` / ``--masks`` / ``--labels``: one liver mask and one tumour label per scan."""
    if not scans:
        raise ValueError("no scan to evaluate: pass --scans S1 S2 ... (or --manifest)")
    if len(masks) != len(scans) or len(labels) != len(scans):
        raise ValueError(f"{len(scans)} scan(s), {len(masks)} liver mask(s) (--masks) and {len(labels)} tumour "
                         "label(s) (--labels): pass one of each per scan, in the same order")
    from .data.scan import scan_name

    names = [scan_name(s) for s in scans]
    if len(set(names)) != len(names):  # two scans called ct.nii.gz in different folders
        width = max(3, len(str(len(names))))
        names = [f"{i:0{width}d}-{name}" for i, name in enumerate(names)]
    return [VolumeCase(name, Path(scan), (LabelSource(Path(mask), _values(liver_labels)),),
                       (LabelSource(Path(label), _values(tumour_labels)),))
            for name, scan, mask, label in zip(names, scans, masks, labels)]


def cases_from_manifest(manifest: str | Path, split: str) -> tuple[list[VolumeCase], list[dict[str, Any]]]:
    """The patients of ``split`` in a ``medad-fast prepare`` manifest: ``(cases, skipped)``,
    ``skipped`` the patients of the split that prepare did not convert (``patient``,
    ``status``, ``error``). ``ValueError`` naming the file when it is not such a manifest."""
    path = Path(manifest)
    try:
        record = prepare_manifest.read(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--manifest {path}: file not found") from None
    except ValueError as e:  # the message names the file
        raise ValueError(f"--manifest {e}") from None
    cases, skipped = [], []
    for source in record.sources:
        case_source = CASE_SOURCES.get(source.kind)
        for patient, info in sorted(source.patients.items()):
            if info.split != split:
                continue
            if info.status != "done":
                skipped.append({"patient": patient, "status": info.status, "error": info.error})
                continue
            if case_source is None:
                raise ValueError(f"--manifest {path}: unknown source kind {source.kind!r} of patient {patient}")
            try:
                cases.append(case_source.case(patient, info.image, info.label))
            except VolumeError as e:
                raise VolumeError(f"{e} (listed in {path})") from None
    return cases, skipped


# --------------------------------------------------------------------------- scoring


@dataclass
class _Opened:
    """A case whose headers are checked: the scan's geometry and its label sources on its grid."""

    case: VolumeCase
    geometry: Geometry
    liver: list[tuple[LiverMaskSource, tuple[float, ...] | None]]
    tumour: list[tuple[LiverMaskSource, tuple[float, ...] | None]]

    @property
    def display_shape(self) -> tuple[int, int]:
        """(rows, cols) of its axial slices in display orientation (rows anterior-posterior)."""
        ornt = self.geometry.orientation
        rows_axis = int(np.flatnonzero(ornt[:, 0] == 1)[0])
        cols_axis = int(np.flatnonzero(ornt[:, 0] == 0)[0])
        return int(self.geometry.shape[rows_axis]), int(self.geometry.shape[cols_axis])


def _open(case: VolumeCase) -> _Opened:
    geometry = read_geometry(case.scan, modality="CT")
    liver = [(open_liver_mask(s.path, geometry, "liver mask"), s.values) for s in case.liver]
    tumour = [(open_liver_mask(s.path, geometry, "tumour label"), s.values) for s in case.tumour]
    return _Opened(case, geometry, liver, tumour)


def _united(sources, shape) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    for source, values in sources:
        inside |= source.read(values)
    return inside


def _padded(images: list[np.ndarray], shape: tuple[int, int], fill) -> np.ndarray:
    """[n, *shape] with each image at the top left, ``fill`` elsewhere."""
    out = np.full((len(images), *shape), fill, dtype=images[0].dtype)
    for i, image in enumerate(images):
        out[i, :image.shape[0], :image.shape[1]] = image
    return out


def _read_case(item: _Opened, allow_nonfinite: bool = False, allow_non_hu: bool = False
               ) -> tuple[Volume, np.ndarray, np.ndarray, np.ndarray]:
    """``(scan, liver, tumour, region)`` of a case; ``VolumeError`` when its liver mask is
    empty (as ``predict`` refuses it, whatever the tumour label holds) or its values cannot be
    scored (:func:`~medad_fast.data.scan.check_scan_values`)."""
    scan = read_volume(item.geometry)
    liver = _united(item.liver, scan.shape)
    require_liver(liver, [s.path for s in item.case.liver], scan.path, item.case.liver[0].values)
    tumour = _united(item.tumour, scan.shape)
    region = liver | tumour  # tumour counts as liver, as prepare writes slices
    check_scan_values(scan, region, allow_nonfinite=allow_nonfinite, allow_non_hu=allow_non_hu)
    return scan, liver, tumour, region


@dataclass
class _Scored:
    """What the scoring of some volumes leaves besides the slices: per volume rows and the
    lesion arrays' files, per slice rows (the records a rank hands to rank 0)."""

    volumes: list[dict[str, Any]] = field(default_factory=list)
    slice_rows: list[tuple] = field(default_factory=list)  # (name, slice, z_mm, label, score)
    lesion_files: list[Path] = field(default_factory=list)
    samples: list[np.ndarray] = field(default_factory=list)
    peaks: list[np.ndarray] = field(default_factory=list)

    def extend(self, other: _Scored) -> None:
        for name in ("volumes", "slice_rows", "lesion_files", "samples", "peaks"):
            getattr(self, name).extend(getattr(other, name))


def _or_reason(compute):
    """``(value, None)`` or ``(None, the reason it is undefined)``."""
    try:
        return compute(), None
    except ValueError as e:
        return None, str(e)


class VolumeSource(EvaluationSource):
    """CT volumes for :func:`medad_fast.evaluation.run_evaluation`: its units are the volumes.

    Each volume is scored as ``predict`` scores it (:func:`~medad_fast.volume_inference.score_volume`)
    and its liver slices handed over in display orientation, padded to the largest slice of
    all the volumes (``map_shape``) with pixels outside the region; its map, tumour and region,
    cropped to the region, are spilled for the lesion-wise metrics, with up to
    ``sample_size`` of its liver map values to choose the thresholds from. :meth:`finish` is
    the per-volume aggregation: volumes.csv, slices.csv, volume AUROC, lesion FROC, froc.png."""

    score_dtype = np.dtype(np.float64)
    has_region = True
    image_level = False  # volumes always have tumour labels

    def __init__(self, opened: list[_Opened], config: Any, window: tuple[float, float], hist_eq: bool,
                 window_from: str, batch_size: int, top_k: int, fp_budgets, lesion_thresholds: int,
                 split: str | None, source: str | None, skipped: list[dict[str, Any]] | None,
                 allow_nonfinite: bool, allow_non_hu: bool) -> None:
        self.opened, self.config, self.window, self.hist_eq, self.window_from = opened, config, window, hist_eq, window_from
        self.batch_size, self.top_k, self.fp_budgets, self.lesion_thresholds = batch_size, top_k, fp_budgets, lesion_thresholds
        self.split, self.source, self.skipped = split, source, skipped
        self.allow_nonfinite, self.allow_non_hu = allow_nonfinite, allow_non_hu
        self.sample_size = max(_SAMPLES_PER_VOLUME, lesion_thresholds)
        self.n_units = len(opened)
        self.map_shape = tuple(np.max([o.display_shape for o in opened], axis=0).tolist())
        self.calibration_split = split or "volumes"
        self.calibration_source = (f"the {len(opened)} evaluated volume(s)"
                                   + (f" of {source}" if source else " (--scans)"))
        self.point_facts = {}
        self.scored = _Scored()  # this rank's; on rank 0, after merge, every rank's
        self._heatmap_case: tuple[int, tuple] | None = None

    def _load(self, index: int):
        return _read_case(self.opened[index], self.allow_nonfinite, self.allow_non_hu)

    def score(self, method, start: int, stop: int, spill: Path, progress: bool, device) -> Any:
        lesion_dir = spill / "lesions"
        lesion_dir.mkdir(exist_ok=True)
        loaders = [functools.partial(self._load, k) for k in range(start, stop)]
        for k, (scan, liver, tumour, region) in enumerate(read_ahead(loaders), start=start):
            yield from self._score_case(method, k, scan, tumour, region, lesion_dir, progress, device)
            del scan, liver, tumour, region

    def _score_case(self, method, k: int, scan: Volume, tumour: np.ndarray, region: np.ndarray, lesion_dir: Path,
                    progress: bool, device) -> Any:
        item, scored = self.opened[k], self.scored
        result = score_volume(method, scan, region, self.window, self.hist_eq, self.batch_size, device, progress)
        ornt, axis = scan.orientation, scan.axial_axis
        other = tuple(a for a in range(3) if a != axis)
        tumour_slices = tumour.any(axis=other)[result.slice_indices]
        for start in range(0, result.slice_indices.size, self.batch_size):
            batch = result.slice_indices[start:start + self.batch_size]
            yield ScoredBatch(
                masks=_padded([display_slice(tumour, ornt, int(i)) for i in batch], self.map_shape, False),
                maps=_padded([display_slice(result.anomaly_map, ornt, int(i)) for i in batch], self.map_shape, 0.0),
                labels=tumour_slices[start:start + batch.size],
                # as float64 as the slice rows hold them
                scores=np.array([float(s) for s in result.slice_scores[start:start + batch.size]], dtype=np.float64),
                region=_padded([display_slice(region, ornt, int(i)) for i in batch], self.map_shape, False))
        box = ndimage.find_objects(region.astype(np.uint8))[0]
        crop_map, crop_tumour, crop_region = result.anomaly_map[box], tumour[box], region[box]
        path = lesion_dir / f"{k:05d}.npz"  # in the spill folder every rank sees
        np.savez(path, anomaly_map=crop_map, lesions=crop_tumour, region=crop_region)
        scored.lesion_files.append(path)
        # the distinct liver values, or that many of their quantiles (values of the map)
        values = np.unique(crop_map[crop_region])
        if values.size > self.sample_size:
            values = np.quantile(values, np.linspace(0.0, 1.0, self.sample_size), method="inverted_cdf")
        scored.samples.append(values)
        labelled, n_lesions = ndimage.label(crop_tumour, structure=LESION_STRUCTURE)
        if n_lesions:
            scored.peaks.append(np.asarray(ndimage.maximum(crop_map, labelled, np.arange(1, n_lesions + 1)),
                                           dtype=np.float64).reshape(-1))
        scored.volumes.append({
            "name": item.case.name, "scan": str(scan.path),
            "liver_mask": [str(s.path) for s in item.case.liver],
            "tumour_label": [str(s.path) for s in item.case.tumour],
            "has_tumour": bool(tumour.any()), "n_lesions": int(n_lesions), "tumour_voxels": int(tumour.sum()),
            "n_liver_slices": int(result.slice_indices.size), "n_tumour_slices": int(tumour_slices.sum()),
            **aggregate_slice_scores(result.slice_scores, self.top_k)})
        scored.slice_rows.extend((item.case.name, int(i), float(z), bool(t), float(s)) for i, z, t, s in
                                 zip(result.slice_indices, result.z_mm, tumour_slices, result.slice_scores))

    def records(self) -> _Scored:
        return self.scored

    def merge(self, records: list[_Scored]) -> None:
        self.scored = _Scored()
        for scored in records:
            self.scored.extend(scored)
        sizes = [v["n_liver_slices"] for v in self.scored.volumes]
        self._volume_of_slice = np.repeat(np.arange(len(sizes)), sizes)

    # ---- heatmaps: a liver slice of volume v, read again (one volume kept at a time)

    def _case_slice(self, index: int) -> tuple[Volume, np.ndarray, np.ndarray, int]:
        volume = int(self._volume_of_slice[index])
        if self._heatmap_case is None or self._heatmap_case[0] != volume:
            scan, _, tumour, region = self._load(volume)
            self._heatmap_case = (volume, (scan, tumour, region))
        scan, tumour, region = self._heatmap_case[1]
        return scan, tumour, region, self.scored.slice_rows[index][1]

    def heatmap_image(self, index: int) -> np.ndarray:
        """The liver slice windowed as it was scored (0 outside the region), uint8 ``map_shape``."""
        scan, _, region, k = self._case_slice(index)
        images, _ = display_images(scan, region, [k], self.window, self.hist_eq)
        return _padded([images[0]], self.map_shape, 0)[0]

    def heatmap_mask(self, index: int) -> np.ndarray:
        scan, tumour, _, k = self._case_slice(index)
        return _padded([display_slice(tumour, scan.orientation, k)], self.map_shape, False)[0]

    def heatmap_names(self) -> list[str]:
        return [f"{name}-slice{k:04d}" for name, k, *_ in self.scored.slice_rows]

    # ---- the per-volume aggregation

    def finish(self, out: Path, checkpoint: Path, state: dict[str, Any], stream: PixelMetricsStream,
               labels: np.ndarray, scores: np.ndarray, scoring_seconds: float, heatmap_scale: float,
               calibration: dict[str, Any]) -> dict[str, Any]:
        scored, config, fp_budgets = self.scored, self.config, self.fp_budgets
        slice_metrics, slice_reason = _or_reason(lambda: image_metrics(labels, scores))
        counts, pixel_reason = _or_reason(lambda: stream.counts("the pixel metrics"))
        pixel_metrics = stream.metrics(counts) if counts is not None else None
        lesion_metrics, lesion_reason = None, None
        if any(v["n_lesions"] for v in scored.volumes):
            thresholds = detection_thresholds(np.concatenate(scored.samples), self.lesion_thresholds,
                                              np.concatenate(scored.peaks))
            hits = []
            for path in scored.lesion_files:
                with np.load(path) as arrays:
                    hits.append(lesion_hits(arrays["lesions"], arrays["anomaly_map"], thresholds, arrays["region"]))
            lesion_metrics = lesion_froc(hits, fp_budgets)
        else:
            lesion_reason = "no tumour in any volume: lesion recall is undefined"
        volume_labels = np.array([v["has_tumour"] for v in scored.volumes], dtype=bool)
        volume_scores = np.array([v["score"] for v in scored.volumes], dtype=np.float64)
        volume_auroc, volume_reason = None, None
        if len(scored.volumes) >= 2 and volume_labels.any() and not volume_labels.all():
            volume_auroc = roc_auc(volume_labels, volume_scores)
        else:
            volume_reason = (f"needs two or more scans with and without tumour; got {int(volume_labels.sum())} "
                             f"with and {int((~volume_labels).sum())} without")
        record = config.preprocessing
        metrics: dict[str, Any] = {
            "checkpoint": scorer_paths(checkpoint), "method": config.run.method,
            "variant": config.variant, "preset": config.run.preset,
            "image_size": config.run.image_size, **scorer_facts(checkpoint, state),
            "crop": record.crop, "preprocessing": record.to_dict(),
            "split": self.split, "source": self.source, "window": list(self.window), "hist_eq": self.hist_eq,
            "window_from": self.window_from, "top_k": self.top_k, "n_volumes": len(scored.volumes),
            "n_volumes_with_tumour": int(volume_labels.sum()), "n_slices": int(labels.size),
            "n_abnormal_slices": int(labels.sum()),
            **(slice_metrics or {"image_auroc": None, "image_ap": None}),
            **(pixel_metrics or {"pixel_auroc": None, "pixel_ap": None, "aupro_0.3": None, "best_dice": None}),
            "pixel_region": "liver mask united with the tumour label (pixels outside it are not counted)",
            "volume_auroc": volume_auroc,
            "volume_score": "max of the slice scores; has_tumour = any tumour voxel",
            "lesion_recall_at_fp": (lesion_metrics["overlap"]["recall_at_fp"] if lesion_metrics else None),
            "lesion_recall_at_fp_peak": (lesion_metrics["peak"]["recall_at_fp"] if lesion_metrics else None),
            "lesions": lesion_metrics,
            "lesion_rules": {"overlap": "a lesion is found when some predicted component (26-connected, map >= t, "
                                        "inside the liver) overlaps it; a component overlapping no lesion is a "
                                        "false positive",
                             "peak": "a component finds the lesion holding its highest voxel; it is a false "
                                     "positive when that voxel lies in no lesion"},
            "undefined": {name: reason for name, reason in (("slice", slice_reason), ("pixel", pixel_reason),
                                                             ("volume", volume_reason), ("lesion", lesion_reason))
                          if reason},
            "skipped": self.skipped or [],
            # rank 0's read-and-score loop (with torchrun: its share and the gather)
            "scoring_seconds": scoring_seconds,
            "volumes": scored.volumes,
            **calibration,
            "heatmap_scale": heatmap_scale,
        }
        if lesion_metrics:
            plot_froc(out / "froc.png", [(f"{rule} (recall@1FP {lesion_metrics[rule]['recall_at_fp']['1']:.2f})"
                                          if "1" in lesion_metrics[rule]["recall_at_fp"] else rule,
                                          lesion_metrics[rule]["curve"]["mean_fp_per_scan"],
                                          lesion_metrics[rule]["curve"]["recall"]) for rule in HIT_RULES],
                      [float(b) for b in fp_budgets],
                      f"{config.variant}: {lesion_metrics['n_lesions']} lesion(s) in {len(scored.volumes)} scan(s)")
        metrics["cpu_isa"] = isa_report()
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_text(out / "volumes.csv", _volumes_csv(scored.volumes))
        atomic_write_text(out / "slices.csv", _slices_csv(scored.slice_rows))
        return metrics


# --------------------------------------------------------------------------- driver


def evaluate_volumes(checkpoint: str | Path, cases: list[VolumeCase], out: str | Path | None = None,
                     device: str | torch.device | None = None,
                     batch_size: int = 16, progress: bool = True, window: tuple[float, float] | None = None,
                     hist_eq: bool | None = None, top_k: int = DEFAULT_TOP_K, fp_budgets=DEFAULT_FP_BUDGETS,
                     lesion_thresholds: int = DEFAULT_LESION_THRESHOLDS, split: str | None = None,
                     source: str | None = None, skipped: list[dict[str, Any]] | None = None,
                     calibrate: bool = False, allow_nonfinite: bool = False,
                     allow_non_hu: bool = False, reference_ops: bool = False,
                     compile: bool = False, n_cases: int = 4) -> dict[str, Any]:
    """Evaluate ``checkpoint`` (a checkpoint, run directory or a ``.pt2`` / ``.onnx`` file of
    ``medad-fast export``, or a list of runs: their seed ensemble, which never calibrates) on CT volumes (see the module docstring). ``reference_ops``: score
    with the pure-PyTorch reference ops; ``compile``: compile the method's networks
    (:func:`~medad_fast.runtime.compile_networks`), as ``evaluate`` on slices. ``split`` /
    ``source``: what the cases are (for the output). ``calibrate``: choose the operating
    point on these volumes and store it in the run folder (``ValueError`` on the test or train
    split, or when the volumes cannot give one). ``allow_nonfinite`` / ``allow_non_hu``: as in
    :func:`medad_fast.predict.predict_volumes`. ``n_cases``: heatmaps of that many worst and
    best liver slices per class. Returns the metrics written to
    ``metrics.json``. ``out`` is checked to be writable before any work, and removed again
    when this call made it and an error leaves it empty. Every header is checked before
    anything is scored; errors raise
    ``ValueError`` (:class:`~medad_fast.data.scan.VolumeError`) or ``FileNotFoundError``
    naming the files. Under torchrun each rank scores its share of the volumes (the loop of
    :func:`medad_fast.evaluation.run_evaluation`)."""
    checkpoint = resolve_evaluated(checkpoint, calibrate, split)
    out = Path(out) if out is not None else evaluation_dir(
        checkpoint, "eval-volumes" if split is None else f"eval-volumes-{split}")
    check_writable_folder(out)  # before any work, the checks of the arguments included
    if not cases:
        raise ValueError("no volumes to evaluate" + (f" in the {split} split of {source}" if source else ""))
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    if lesion_thresholds < 2:
        raise ValueError(f"--lesion-thresholds must be >= 2, got {lesion_thresholds}")
    opened = [_open(case) for case in cases]  # headers first: a wrong label is reported before any scoring

    def open_source(method) -> VolumeSource:
        chosen_window, chosen_hist_eq, settings_from = scoring_window(method.config.preprocessing, window, hist_eq)
        return VolumeSource(opened, method.config, chosen_window, chosen_hist_eq, settings_from, batch_size, top_k,
                            fp_budgets, lesion_thresholds, split, source, skipped, allow_nonfinite, allow_non_hu)

    return run_evaluation(checkpoint, out, open_source, device=device, n_cases=n_cases, progress=progress,
                          reference_ops=reference_ops, compile=compile, calibrate=calibrate)


def _volumes_csv(volumes: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    columns = ["name", "scan", "has_tumour", "n_lesions", "tumour_voxels", "n_liver_slices", "n_tumour_slices",
               "score", "top_k_mean"]
    writer.writerow(columns)
    for v in volumes:
        writer.writerow([v["name"], v["scan"], int(v["has_tumour"]), v["n_lesions"], v["tumour_voxels"],
                         v["n_liver_slices"], v["n_tumour_slices"], f"{v['score']:.6f}", f"{v['top_k_mean']:.6f}"])
    return text.getvalue()


def _slices_csv(rows: list[tuple]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["name", "slice", "z_mm", "label", "score"])
    writer.writerows([name, k, f"{z:.3f}", int(label), f"{score:.6f}"] for name, k, z, label, score in rows)
    return text.getvalue()
