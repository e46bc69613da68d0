"""Metrics against independent oracles: scikit-learn, brute force, slow per-threshold references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from medad_fast import metrics


# --------------------------------------------------------------------------- #
# Random inputs
# --------------------------------------------------------------------------- #
def _random_binary_problem(rng: np.random.Generator, n: int, kind: str):
    """labels [n] bool with both classes, scores [n] of the given kind (ties in all but 'continuous')."""
    positive_rate = rng.uniform(0.05, 0.95)
    labels = rng.random(n) < positive_rate
    labels[0], labels[1] = True, False  # both classes always present
    signal = labels * rng.uniform(0.0, 2.0)
    noise = rng.normal(size=n)
    if kind == "continuous":
        scores = (signal + noise).astype(np.float32)
    elif kind == "heavy_ties":  # a handful of distinct values
        scores = np.round(signal + noise).astype(np.float64)
    elif kind == "integer":
        scores = np.round(3 * (signal + noise)).astype(np.int64)
    elif kind == "constant":  # every score tied
        scores = np.full(n, 0.25, dtype=np.float32)
    else:
        raise AssertionError(kind)
    return labels, scores


SCORE_KINDS = ["continuous", "heavy_ties", "integer", "constant"]


@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("n", [2, 3, 7, 50, 1000])
def test_roc_auc_and_ap_match_sklearn(kind, n):
    rng = np.random.default_rng(1000 * n + SCORE_KINDS.index(kind))
    for _ in range(20):
        labels, scores = _random_binary_problem(rng, n, kind)
        assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert metrics.average_precision(labels, scores) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )


def test_hand_computed_values():
    # Positives 0.9, 0.5; negatives 0.5, 0.1: pairs (0.9>0.5), (0.9>0.1), (0.5=0.5 -> 1/2), (0.5>0.1) -> 3.5/4.
    labels = [1, 1, 0, 0]
    scores = [0.9, 0.5, 0.5, 0.1]
    assert metrics.roc_auc(labels, scores) == 3.5 / 4
    # Thresholds 0.9 (P=1, R=1/2) and 0.5 (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3.
    assert metrics.average_precision(labels, scores) == pytest.approx(0.5 + 1 / 3, abs=1e-15)
    # Best Dice at 0.9: 2/(2+0+1) = 2/3; at 0.5: 4/(4+1+0) = 4/5; at 0.1: 4/(4+2) = 2/3.
    assert metrics.best_dice(labels, scores) == pytest.approx(0.8, abs=1e-15)
    # Perfect and inverted rankings.
    assert metrics.roc_auc([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0
    assert metrics.roc_auc([1, 0, 0], [0.1, 0.2, 0.3]) == 0.0


def test_inputs_any_shape_dtype_and_torch():
    rng = np.random.default_rng(5)
    labels, scores = _random_binary_problem(rng, 4 * 6 * 5, "heavy_ties")
    expected_auc = roc_auc_score(labels, scores)
    expected_ap = average_precision_score(labels, scores)
    shaped_labels, shaped_scores = labels.reshape(4, 6, 5), scores.reshape(4, 6, 5)
    variants = [
        (shaped_labels, shaped_scores),
        (shaped_labels.astype(np.uint8), shaped_scores.astype(np.float32)),
        (shaped_labels.astype(np.float64), shaped_scores),
        (torch.from_numpy(shaped_labels), torch.from_numpy(shaped_scores)),
        (torch.from_numpy(shaped_labels).long(), torch.from_numpy(shaped_scores).to(torch.bfloat16)),
        (torch.from_numpy(shaped_labels), torch.from_numpy(shaped_scores).half().requires_grad_()),
        (labels.tolist(), scores.tolist()),
    ]
    for variant_labels, variant_scores in variants:  # rounded scores are exact in (b)float16
        assert metrics.roc_auc(variant_labels, variant_scores) == pytest.approx(expected_auc, abs=1e-12)
        assert metrics.average_precision(variant_labels, variant_scores) == pytest.approx(expected_ap, abs=1e-12)


def test_infinite_and_extreme_integer_scores():
    labels = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    float_scores = np.array([np.inf, -np.inf, 0.0, -0.0, -np.inf, 1e300])
    expected = roc_auc_score(labels, rankdata(float_scores))  # sklearn refuses infinite scores; ranks keep the order
    assert metrics.roc_auc(labels, float_scores) == pytest.approx(expected, abs=1e-12)
    big = np.array([2**62, -(2**62), 2**62 - 1, 2**62 - 1, 0, 1], dtype=np.int64)
    expected = roc_auc_score(labels, rankdata(big))  # ranks: sklearn would lose the int64 precision
    assert metrics.roc_auc(labels, big) == pytest.approx(expected, abs=1e-12)


def test_large_input_matches_rank_formula():
    """10^7 float32 pixels, 2 % positives, with ties: exact against the Mann-Whitney rank formula."""
    rng = np.random.default_rng(7)
    n = 10_000_000
    labels = rng.random(n) < 0.02
    scores = rng.random(n, dtype=np.float32) + 0.05 * labels.astype(np.float32)
    scores[: n // 2] = np.round(scores[: n // 2], 3)  # many ties, between and within the classes
    n_positive = int(labels.sum())
    n_negative = n - n_positive
    ranks = rankdata(scores)  # float64 average ranks: ties count 1/2
    rank_sum = float(ranks[labels].sum())
    expected = (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)
    assert metrics.roc_auc(torch.from_numpy(labels), torch.from_numpy(scores)) == pytest.approx(expected, abs=1e-12)
    # And against scikit-learn on a 10^6 slice (sklearn is slow beyond that).
    head = slice(0, 1_000_000)
    assert metrics.roc_auc(labels[head], scores[head]) == pytest.approx(
        roc_auc_score(labels[head], scores[head]), abs=1e-12
    )
    assert metrics.average_precision(labels[head], scores[head]) == pytest.approx(
        average_precision_score(labels[head], scores[head]), abs=1e-12
    )


# --------------------------------------------------------------------------- #
# ROC curve (plotting)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_roc_curve_is_exact_when_not_subsampled(kind):
    rng = np.random.default_rng(11 + SCORE_KINDS.index(kind))
    labels, scores = _random_binary_problem(rng, 300, kind)
    fpr, tpr = metrics.roc_curve(labels, scores, max_points=10_000)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # Every vertex is a vertex of scikit-learn's full curve (ours skips only collinear ones).
    sk_fpr, sk_tpr, _ = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    sk_points = set(zip(np.round(sk_fpr, 12), np.round(sk_tpr, 12)))
    assert set(zip(np.round(fpr, 12), np.round(tpr, 12))) <= sk_points


def test_roc_curve_subsamples_for_plotting():
    rng = np.random.default_rng(12)
    labels, scores = _random_binary_problem(rng, 5000, "continuous")
    fpr, tpr = metrics.roc_curve(labels, scores, max_points=50)
    assert 2 <= fpr.size <= 50 and fpr.shape == tpr.shape
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    with pytest.raises(ValueError, match="max_points"):
        metrics.roc_curve(labels, scores, max_points=1)


# --------------------------------------------------------------------------- #
# AUPRO against a slow per-threshold reference
# --------------------------------------------------------------------------- #
def _slow_aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float) -> float:
    """MVTec AD's definition, one threshold at a time, written independently of the module."""
    regions = []  # boolean [N, H, W] per connected component
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        for region_id in range(1, count + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[index] = labelled == region_id
            regions.append(region)
    normal = ~masks
    points = [(0.0, 0.0)]  # threshold +inf
    for threshold in np.unique(maps)[::-1]:
        detected = maps >= threshold
        fpr = (detected & normal).sum() / normal.sum()
        pro = np.mean([(detected & region).sum() / region.sum() for region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:  # cut the segment at max_fpr
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def _random_masks_and_maps(rng: np.random.Generator, n: int, size: int, levels: int | None):
    masks = np.zeros((n, size, size), dtype=bool)
    for index in range(n):
        for _ in range(rng.integers(0, 4)):  # 0-3 blobs of different sizes, some touching diagonally
            y, x = rng.integers(0, size, 2)
            radius = rng.integers(0, 4)
            masks[index, max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1] = True
    masks[0, 0, 0], masks[0, 1, 1] = True, True  # diagonal neighbours: one 8-connected region
    maps = rng.random(masks.shape) + masks * rng.uniform(0.0, 1.0, masks.shape)
    if levels is not None:
        maps = np.round(maps * levels) / levels  # heavy ties
    return masks, maps


@pytest.mark.parametrize("levels", [None, 4, 20])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(levels, max_fpr):
    rng = np.random.default_rng(21 + (levels or 0))
    masks, maps = _random_masks_and_maps(rng, n=4, size=12, levels=levels)
    expected = _slow_aupro(masks, maps, max_fpr)
    assert metrics.aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-12)
    # Channel dimension and torch input accepted.
    assert metrics.aupro(torch.from_numpy(masks[:, None]), torch.from_numpy(maps[:, None]), max_fpr) == pytest.approx(
        expected, abs=1e-12
    )


def test_aupro_hand_computed():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True  # region A: 1 pixel
    masks[1, 1:3, 1:3] = True  # region B: 4 pixels (in another slice)
    perfect = masks.astype(np.float32)
    assert metrics.aupro(masks, perfect) == 1.0
    assert metrics.aupro(masks, 1.0 - perfect) == 0.0
    # A detected alone at FPR 0 (PRO 1/2); B ties with every normal pixel, so the curve goes
    # straight from (0, 1/2) to (1, 1): PRO(0.3) = 0.65, area 0.3 * (0.5 + 0.65) / 2, / 0.3 -> 0.575.
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.575, abs=1e-15)
    # Same, but the normal pixels now rank strictly above B (FPR 1 reached before B): PRO 1/2 up to 0.3.
    maps = np.where(masks, 0.0, 0.5).astype(np.float32)
    maps[0, 0, 0] = 1.0
    assert metrics.aupro(masks, maps) == pytest.approx(0.5, abs=1e-15)
    # With one region, PRO is the TPR: AUPRO over the full FPR range is the AUROC.
    rng = np.random.default_rng(3)
    one_region = np.zeros((3, 8, 8), dtype=bool)
    one_region[1, 2:6, 3:5] = True
    scores = rng.random(one_region.shape) + 0.3 * one_region
    assert metrics.aupro(one_region, scores, max_fpr=1.0) == pytest.approx(
        roc_auc_score(one_region.ravel(), scores.ravel()), abs=1e-12
    )


# --------------------------------------------------------------------------- #
# Best Dice against brute force
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("levels", [None, 3, 10])
def test_best_dice_matches_brute_force(levels):
    rng = np.random.default_rng(31 + (levels or 0))
    for _ in range(5):
        masks, maps = _random_masks_and_maps(rng, n=3, size=10, levels=levels)
        brute_force = max(
            2 * (masks & (maps >= t)).sum() / (masks.sum() + (maps >= t).sum()) for t in np.unique(maps)
        )
        assert metrics.best_dice(masks, maps) == pytest.approx(brute_force, abs=1e-15)
    assert metrics.best_dice(masks, masks * 0.7) == 1.0


# --------------------------------------------------------------------------- #
# compute_metrics
# --------------------------------------------------------------------------- #
def test_compute_metrics_values_and_json():
    rng = np.random.default_rng(41)
    masks, maps = _random_masks_and_maps(rng, n=10, size=16, levels=50)
    masks[5:] = False  # normal slices included in the pixel metrics
    image_labels = masks.any(axis=(1, 2))
    image_scores = maps.max(axis=(1, 2)) + 0.3 * image_labels * rng.random(10)
    result = metrics.compute_metrics(
        torch.from_numpy(image_labels), torch.from_numpy(image_scores), masks[:, None], torch.from_numpy(maps[:, None])
    )
    assert set(result) == {
        "image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "aupro_0.3", "best_dice",
        "n_images", "n_pixels", "n_abnormal_images", "n_abnormal_pixels",
    }  # fmt: skip
    assert json.loads(json.dumps(result)) == result
    assert result["image_auroc"] == pytest.approx(roc_auc_score(image_labels, image_scores), abs=1e-12)
    assert result["image_ap"] == pytest.approx(average_precision_score(image_labels, image_scores), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert result["aupro_0.3"] == pytest.approx(_slow_aupro(masks, maps, 0.3), abs=1e-12)
    assert result["best_dice"] == metrics.best_dice(masks, maps)
    assert (result["n_images"], result["n_pixels"]) == (10, 10 * 16 * 16)
    assert result["n_abnormal_images"] == int(image_labels.sum())
    assert result["n_abnormal_pixels"] == int(masks.sum())
    assert all(type(result[key]) is int for key in ("n_images", "n_pixels", "n_abnormal_images", "n_abnormal_pixels"))
    assert all(type(result[key]) is float for key in ("image_auroc", "pixel_auroc", "aupro_0.3", "best_dice"))


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_one_class_errors_name_the_argument():
    maps = np.random.default_rng(0).random((3, 4, 4))
    no_lesion = np.zeros((3, 4, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"image_labels contains only normal samples.*AUROC is undefined"):
        metrics.compute_metrics(np.zeros(3, dtype=bool), np.arange(3.0), no_lesion, maps)
    with pytest.raises(ValueError, match=r"image_labels contains only abnormal samples"):
        metrics.compute_metrics(np.ones(3, dtype=bool), np.arange(3.0), no_lesion, maps)
    with pytest.raises(ValueError, match=r"masks contains only normal samples"):
        metrics.compute_metrics(np.array([0, 1, 1]), np.arange(3.0), no_lesion, maps)
    with pytest.raises(ValueError, match=r"masks contains only abnormal samples"):
        metrics.compute_metrics(np.array([0, 1, 1]), np.arange(3.0), ~no_lesion, maps)
    for function in (metrics.roc_auc, metrics.average_precision, metrics.roc_curve):
        with pytest.raises(ValueError, match=r"labels contains only normal samples"):
            function([0, 0, 0], [0.1, 0.2, 0.3])
        with pytest.raises(ValueError, match=r"labels contains only abnormal samples"):
            function([1, 1], [0.1, 0.2])
    for function in (metrics.aupro, metrics.best_dice):
        with pytest.raises(ValueError, match=r"masks contains only normal samples"):
            function(no_lesion, maps)


def test_bad_input_errors():
    labels, scores = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"labels and scores must have the same shape"):
        metrics.roc_auc(labels, scores[:3])
    with pytest.raises(ValueError, match=r"labels is empty"):
        metrics.roc_auc([], [])
    with pytest.raises(ValueError, match=r"scores is empty"):
        metrics.average_precision([0, 1], [])
    with pytest.raises(ValueError, match=r"scores contains NaN"):
        metrics.roc_auc(labels, np.array([0.1, np.nan, 0.3, 0.4]))
    with pytest.raises(ValueError, match=r"maps contains NaN"):
        metrics.best_dice(labels, torch.tensor([0.1, 0.2, float("nan"), 0.4]))
    with pytest.raises(ValueError, match=r"labels must hold bool or 0/1 values, found 255"):
        metrics.roc_auc(np.array([0, 255, 0, 255], dtype=np.uint8), scores)
    with pytest.raises(ValueError, match=r"scores must be real-valued"):
        metrics.roc_auc(labels, scores.astype(np.complex128))

    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 1, 1] = True
    maps = np.random.default_rng(0).random((2, 3, 3))
    with pytest.raises(ValueError, match=r"masks must have shape \[N, H, W\]"):
        metrics.aupro(masks[0], maps[0])
    with pytest.raises(ValueError, match=r"masks and maps must have the same shape"):
        metrics.aupro(masks, maps[:, :2])
    with pytest.raises(ValueError, match=r"maps contains NaN"):
        metrics.aupro(masks, np.where(masks, np.nan, maps))
    with pytest.raises(ValueError, match=r"max_fpr must be in \(0, 1\]"):
        metrics.aupro(masks, maps, max_fpr=0.0)
    with pytest.raises(ValueError, match=r"masks must hold one slice per image"):
        metrics.compute_metrics([0, 1, 1], [0.1, 0.2, 0.3], masks, maps)
    with pytest.raises(ValueError, match=r"image_labels and image_scores must have the same shape"):
        metrics.compute_metrics([0, 1], [0.1, 0.2, 0.3], masks, maps)
    with pytest.raises(ValueError, match=r"image_labels must have shape \[N\]"):
        metrics.compute_metrics([[0, 1]], [[0.1, 0.2]], masks, maps)


# --------------------------------------------------------------------------- streaming

def _stream_data(seed: int, n: int = 23, side: int = 19):
    rng = np.random.default_rng(seed)
    maps = rng.random((n, side, side)).astype(np.float32)
    maps[rng.random(maps.shape) < 0.2] = 0.5  # ties across and within classes
    masks = np.zeros(maps.shape, dtype=bool)
    for i in rng.choice(n, size=n // 2, replace=False):  # blobs and single pixels, several per slice
        y, x = rng.integers(0, side - 5, 2)
        masks[i, y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = True
        masks[i, rng.integers(0, side), rng.integers(0, side)] = True
    maps[masks] += 0.3 * rng.random(int(masks.sum())).astype(np.float32)
    return masks, maps


@pytest.mark.parametrize("spill", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_stream_equals_the_whole_array_computation_bitwise(tmp_path, spill, seed):
    from medad_fast.metrics import PixelMetricsStream, compute_metrics
    masks, maps = _stream_data(seed)
    labels = masks.reshape(masks.shape[0], -1).any(axis=1)
    expected = compute_metrics(labels, maps.reshape(maps.shape[0], -1).max(axis=1), masks, maps)
    # uneven batches, chunks of a few slices: the counts of every piece must add up exactly
    stream = PixelMetricsStream(str(tmp_path / "spill") if spill else None, chunk_pixels=3 * 19 * 19 + 5)
    for start, stop in ((0, 1), (1, 8), (8, 8), (8, 20), (20, 23)):
        if stop > start:
            stream.add(masks[start:stop], maps[start:stop])
    got = stream.metrics()
    for key in ("pixel_auroc", "pixel_ap", "aupro_0.3", "best_dice", "n_pixels", "n_abnormal_pixels"):
        assert got[key] == expected[key], key  # exact, not approximately
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert np.array_equal(stream.map(9), maps[9]) and stream.max == float(maps.max())
    stream.close()
    assert not spill or not list((tmp_path / "spill").iterdir())


def test_pixel_stream_errors_name_the_argument(tmp_path):
    from medad_fast.metrics import PixelMetricsStream
    stream = PixelMetricsStream(str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        stream.counts()
    stream.add(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="masks contains only normal"):
        stream.metrics()
    with pytest.raises(ValueError, match="maps must all be"):
        stream.add(np.zeros((1, 5, 4), bool), np.zeros((1, 5, 4), np.float32))
    bad = np.zeros((1, 4, 4), np.float32)
    bad[0, 0, 0] = np.nan
    stream.add(np.ones((1, 4, 4), bool) & (np.arange(16).reshape(1, 4, 4) == 3), bad)
    with pytest.raises(ValueError, match="maps contains NaN"):
        stream.metrics()
    stream.close()
