"""The one evaluation driver (:mod:`medad_fast.evaluation`) on BMAD slices: every number of
``metrics.json`` and ``scores.csv`` against the same figures computed independently (the
slices scored again with :func:`medad_fast.inference.score_dataset`, the metrics with
scikit-learn), and the heatmaps it picks. The volume side is checked in
tests/test_evaluate_volume.py (against the maps ``predict`` writes), its torchrun run too."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ct_data import tiny_checkpoint
from medad_fast.data.dataset import BmadSliceDataset
from medad_fast.evaluate import evaluate
from medad_fast.inference import load_method, score_dataset


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    return tiny_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pt", image_size=32)


def test_slice_metrics_equal_an_independent_computation(checkpoint, data, tmp_path, one_thread):
    out = tmp_path / "eval"
    result = evaluate(checkpoint, data, "test", out, device="cpu", batch_size=3, n_cases=1, progress=False)
    written = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in result.items() if k != "out"} == written

    method, _ = load_method(checkpoint, "cpu")
    dataset = BmadSliceDataset(data, "test", size=32)
    maps, scores, masks = [], [], []
    for batch, batch_maps, batch_scores in score_dataset(method, dataset, batch_size=8):
        maps.append(batch_maps.numpy())
        scores.append(batch_scores.numpy())
        masks.append(batch.masks[:, 0].numpy() > 0)
    maps, scores, masks = np.concatenate(maps), np.concatenate(scores), np.concatenate(masks)
    labels = np.array([entry.abnormal for entry in dataset.files])
    assert 0 < labels.sum() < labels.size

    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert [r["path"] for r in rows] == dataset.paths
    assert [int(r["label"]) for r in rows] == labels.astype(int).tolist()
    # %.9g round-trips float32: the very scores, batches of 3 or 8 alike
    assert np.array_equal(np.array([float(r["score"]) for r in rows], dtype=np.float32), scores)
    assert written["n_images"] == labels.size and written["n_abnormal_images"] == int(labels.sum())
    assert written["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert written["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert written["n_pixels"] == masks.size and written["n_abnormal_pixels"] == int(masks.sum())
    assert written["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert written["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
    assert written["heatmap_scale"] == pytest.approx(float(maps.max()))

    # one heatmap per class and quality: the lowest / highest scored slice of each class
    normal, abnormal = np.flatnonzero(~labels), np.flatnonzero(labels)
    picks = {"worst-abnormal": abnormal[np.argmin(scores[abnormal])], "best-abnormal": abnormal[np.argmax(scores[abnormal])],
             "worst-normal": normal[np.argmax(scores[normal])], "best-normal": normal[np.argmin(scores[normal])]}
    expected = sorted(f"{kind}-01-{Path(dataset.paths[i]).stem}-score{scores[i]:.3f}.png" for kind, i in picks.items())
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == expected
