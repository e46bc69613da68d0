"""Lesion-wise detection in 3-D (recall at false-positive components per scan), the best-Dice
threshold and pixel metrics restricted to a region: hand-made volumes, hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medad_fast import metrics


def two_scans():
    """Scan A: lesion L1 (map 0.9), lesion L2 (map 0.4), false-positive blobs F1 (0.8) and
    F2 (0.6). Scan B, no lesion: blobs G1 (0.7) and G2 (0.5). Everything else 0."""
    shape = (12, 12, 12)
    lesions_a, map_a = np.zeros(shape, bool), np.zeros(shape, np.float32)
    lesions_a[2:4, 2:4, 2:4] = True
    map_a[2:4, 2:4, 2:4] = 0.9
    lesions_a[8:10, 8:10, 8:10] = True
    map_a[8:10, 8:10, 8:10] = 0.4
    map_a[2:4, 8:10, 2:4] = 0.8
    map_a[8:10, 2:4, 8:10] = 0.6
    lesions_b, map_b = np.zeros(shape, bool), np.zeros(shape, np.float32)
    map_b[5:7, 5:7, 5:7] = 0.7
    map_b[1:3, 1:3, 9:11] = 0.5
    return [lesions_a, lesions_b], [map_a, map_b]


def test_recall_at_each_false_positive_budget_by_hand():
    lesions, maps = two_scans()
    result = metrics.lesion_recall_at_fp(lesions, maps)
    assert result["n_scans"] == 2 and result["n_lesions"] == 2 and result["fp_budgets"] == [1.0, 2.0, 5.0]
    overlap, peak = result["overlap"], result["peak"]
    thresholds = np.float32([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0]).astype(np.float64)
    assert overlap["curve"]["threshold"] == pytest.approx(thresholds)
    # t:        0.9  0.8  0.7  0.6  0.5  0.4  0 (each scan one component)
    # FP A:      0    1    1    2    2    2   0 (the component overlaps the lesions)
    # FP B:      0    0    1    1    2    2   1
    assert overlap["curve"]["mean_fp_per_scan"] == pytest.approx([0, 0.5, 1, 1.5, 2, 2, 0.5])
    assert overlap["curve"]["recall"] == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5, 1, 1])
    # overlap: the degenerate lowest threshold (one component per scan) finds everything
    assert overlap["recall_at_fp"] == {"1": 1.0, "2": 1.0, "5": 1.0}
    assert overlap["threshold_at_fp"]["1"] == 0.0
    # peak: at 0 scan A's single component peaks in L1 only, scan B's is a false positive
    assert peak["curve"]["mean_fp_per_scan"] == pytest.approx([0, 0.5, 1, 1.5, 2, 2, 0.5])
    assert peak["curve"]["recall"] == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5, 1, 0.5])
    assert peak["recall_at_fp"] == {"1": 0.5, "2": 1.0, "5": 1.0}
    assert peak["threshold_at_fp"]["1"] == pytest.approx(0.9) and peak["threshold_at_fp"]["2"] == pytest.approx(0.4)


def test_region_ignores_predictions_outside_and_budget_below_every_point():
    lesions, maps = two_scans()
    regions = [np.ones_like(lesion) for lesion in lesions]
    regions[1][:, :, 9:] = False  # G2 lies outside scan B's region
    result = metrics.lesion_recall_at_fp(lesions, maps, regions, fp_budgets=(0.25, 1))
    # thresholds from the values inside the regions: 0.5 is gone
    assert 0.5 not in result["peak"]["curve"]["threshold"]
    # at 0.4 scan A has F1, F2 and scan B G1 only: 1.5 per scan; peak recall 1 needs 0.4
    assert result["peak"]["recall_at_fp"] == {"0.25": 0.5, "1": 0.5}
    shifted = [m + 1.0 for m in maps]
    shifted[1][:] = 5.0  # scan B: one false positive at every threshold
    result = metrics.lesion_recall_at_fp(lesions, shifted, fp_budgets=(0.25,))
    assert result["overlap"]["recall_at_fp"] == {"0.25": 0.0} and result["overlap"]["threshold_at_fp"]["0.25"] is None


def test_one_component_over_two_lesions_and_corner_connectivity():
    shape = (10, 10, 10)
    lesions = np.zeros(shape, bool)
    lesions[1, 1, 1] = lesions[2, 2, 2] = True  # touching at a corner: one lesion (26-connectivity)
    lesions[6, 6, 6] = True
    anomaly_map = np.zeros(shape, np.float32)
    anomaly_map[1:8, 1:8, 1:8] = 0.3  # one component over both lesions
    anomaly_map[6, 6, 6] = 0.9
    hits = metrics.lesion_hits(lesions, anomaly_map, [0.9, 0.3])
    assert hits.n_lesions == 2
    assert hits.found["overlap"].tolist() == [1, 2] and hits.false_positives["overlap"].tolist() == [0, 0]
    assert hits.found["peak"].tolist() == [1, 1] and hits.false_positives["peak"].tolist() == [0, 0]
    assert hits.n_components.tolist() == [1, 1]
    assert hits.lesion_peaks.tolist() == pytest.approx([0.3, 0.9])


def test_bad_input_is_named():
    lesions, maps = two_scans()
    with pytest.raises(ValueError, match="no lesion"):
        metrics.lesion_recall_at_fp([lesions[1]], [maps[1]])
    with pytest.raises(ValueError, match="lesions has shape"):
        metrics.lesion_hits(lesions[0][:-1], maps[0], [0.5])
    with pytest.raises(ValueError, match="outside region"):
        metrics.lesion_hits(lesions[0], maps[0], [0.5], region=np.zeros_like(lesions[0]))
    with pytest.raises(ValueError, match="one label, map"):
        metrics.lesion_recall_at_fp(lesions, maps[:1])
    a = metrics.lesion_hits(lesions[0], maps[0], [0.5])
    b = metrics.lesion_hits(lesions[1], maps[1], [0.4])
    with pytest.raises(ValueError, match="other thresholds"):
        metrics.lesion_froc([a, b])


def test_detection_thresholds_cap_and_include():
    values = np.arange(1000, dtype=np.float32)
    thresholds = metrics.detection_thresholds(values, max_thresholds=11, include=[0.5])
    assert thresholds[0] == 999 and thresholds[-1] == 0 and 0.5 in thresholds and thresholds.size == 12
    assert (np.diff(thresholds) < 0).all()


def test_best_dice_threshold_matches_brute_force():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 16, 16)) < 0.2
    maps = np.round(masks * rng.uniform(0, 1, masks.shape) + rng.normal(0, 0.4, masks.shape), 1)
    dice, threshold = metrics.best_dice_threshold(masks, maps)
    brute = {t: 2 * (masks & (maps >= t)).sum() / (masks.sum() + (maps >= t).sum()) for t in np.unique(maps)}
    best = max(brute.values())
    assert dice == pytest.approx(best) and dice == pytest.approx(metrics.best_dice(masks, maps))
    assert threshold == max(t for t, d in brute.items() if np.isclose(d, best))


def test_pixel_stream_counts_only_the_region():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 12, 10), bool)
    masks[1, 3:6, 3:6] = masks[3, 5:8, 2:4] = True
    region = np.zeros_like(masks)
    region[:, 2:10, 1:8] = True
    maps = (rng.normal(size=masks.shape) + 2 * masks).astype(np.float32)
    stream = metrics.PixelMetricsStream()
    stream.add(masks[:2], maps[:2], region[:2])
    stream.add(masks[2:], maps[2:], region[2:])
    result = stream.metrics()
    inside_masks, inside_maps = masks[region], maps[region]
    assert result["n_pixels"] == int(region.sum()) and result["n_abnormal_pixels"] == int(masks.sum())
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(inside_masks, inside_maps))
    assert result["pixel_ap"] == pytest.approx(average_precision_score(inside_masks, inside_maps))
    assert result["best_dice"] == pytest.approx(metrics.best_dice(inside_masks, inside_maps))
    assert stream.max == pytest.approx(float(maps[region].max()))
    with pytest.raises(ValueError, match="outside region"):
        stream.add(masks, maps, np.zeros_like(region))


def test_peak_rule_with_the_peak_outside_any_lesion_and_tied():
    shape = (8, 8, 8)
    lesions = np.zeros(shape, bool)
    lesions[1:3, 1:3, 1:3] = True
    lesions[5:7, 5:7, 5:7] = True
    anomaly_map = np.zeros(shape, np.float32)
    anomaly_map[1:7, 1:7, 1:7] = 0.5  # one component over both lesions...
    anomaly_map[4, 4, 4] = 0.8  # ...peaking outside them: a false positive that finds nothing
    hits = metrics.lesion_hits(lesions, anomaly_map, [0.5])
    assert hits.found["peak"].tolist() == [0] and hits.false_positives["peak"].tolist() == [1]
    assert hits.found["overlap"].tolist() == [2] and hits.false_positives["overlap"].tolist() == [0]
    anomaly_map[4, 4, 4] = 0.5
    anomaly_map[1, 1, 1] = anomaly_map[6, 6, 6] = 0.8  # the peak tied in both lesions: both found
    hits = metrics.lesion_hits(lesions, anomaly_map, [0.5])
    assert hits.found["peak"].tolist() == [2] and hits.false_positives["peak"].tolist() == [0]
