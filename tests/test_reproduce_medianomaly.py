"""benchmarks/reproduce_medianomaly.py on a tiny generated BrainTumor folder in the
MedIAnomaly layout (images/ + data.json): the rows and the report it writes, a method
without a medianomaly preset skipped with a message, rows never run twice, and clear
errors for a missing data.json and for mixing epoch counts in one output folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import reproduce_medianomaly as reproduce  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def write_brain_tumor(root: Path, n_train: int = 8, n_test: int = 4) -> Path:
    """``root/BrainTumor/{images, data.json}``: dark disc 'brains', a bright square in the abnormal ones."""
    images = root / "BrainTumor" / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    names: dict[str, list[str]] = {"train": [], "test0": [], "test1": [], "unl0": [], "unl1": []}
    for group, count in (("train", n_train), ("test0", n_test), ("test1", n_test), ("unl0", 2), ("unl1", 2)):
        for index in range(count):
            image = np.where((yy - 24) ** 2 + (xx - 24) ** 2 < 400, 90, 0) + rng.integers(0, 20, (48, 48))
            if group.endswith("1"):
                image[16:28, 18:30] = 250
            name = f"{group}_{index}.png"
            Image.fromarray(image.astype(np.uint8)).save(images / name)
            names[group].append(name)
    layout = {"train": {"0": names["train"], "unlabeled": {"0": names["unl0"], "1": names["unl1"]}},
              "test": {"0": names["test0"], "1": names["test1"]}}
    (root / "BrainTumor" / "data.json").write_text(json.dumps(layout))
    return root


def test_rows_report_skips_and_resume(tmp_path, capsys, monkeypatch):
    root, out = write_brain_tumor(tmp_path / "data"), tmp_path / "out"
    args = ["--root", str(root), "--methods", "ae,frequency_aware", "--seeds", "0,1", "--out", str(out),
            "--device", "cpu", "--epochs", "1"]
    assert reproduce.main(args) == 0
    captured = capsys.readouterr()
    assert "skipping frequency_aware: no 'medianomaly' preset yet" in captured.err
    rows = json.loads((out / "reproduce.json").read_text())
    assert [(row["method"], row["seed"], row["epochs"]) for row in rows] == [("ae", 0, 1), ("ae", 1, 1)]
    for row in rows:
        assert set(row) == {"method", "seed", "image_auroc", "image_ap", "minutes", "epochs"}
        assert 0.0 <= row["image_auroc"] <= 1.0 and 0.0 <= row["image_ap"] <= 1.0 and row["minutes"] > 0
    report = (out / "reproduce.md").read_text()
    assert "| ae | 0,1 | 1 |" in report and "85.9 +- 0.3" in report and "76.9 +- 0.1" in report
    assert "AE4AD (Cai et al., MICCAI 2024), Table 1" in report
    assert "- frequency_aware: no 'medianomaly' preset yet" in report
    measured = [100 * row["image_auroc"] for row in rows]
    assert f"{np.mean(measured):.1f} +- {np.std(measured, ddof=1):.1f}" in report

    # resumable: the two rows are not run again; a new seed is the only run
    ran = []
    monkeypatch.setattr(reproduce, "run_one", lambda method, seed, *rest: ran.append((method, seed)) or
                        {"method": method, "seed": seed, "image_auroc": 0.5, "image_ap": 0.5, "minutes": 0.1,
                         "epochs": 1})
    assert reproduce.main([*args[:3], "ae", "--seeds", "0,1,2", *args[6:]]) == 0
    assert ran == [("ae", 2)]
    assert [row["seed"] for row in json.loads((out / "reproduce.json").read_text())] == [0, 1, 2]
    assert "ae seed 0: already in" in capsys.readouterr().out


def test_rows_of_another_epoch_count_are_refused(tmp_path):
    root, out = write_brain_tumor(tmp_path / "data", n_train=2, n_test=1), tmp_path / "out"
    out.mkdir()
    (out / "reproduce.json").write_text(json.dumps([{"method": "ae", "seed": 0, "image_auroc": 0.6, "image_ap": 0.6,
                                                     "minutes": 1.0, "epochs": 1}]))
    with pytest.raises(SystemExit, match="holds ae rows trained for \\[1\\] epochs, not 600; use another --out"):
        reproduce.main(["--root", str(root), "--methods", "ae", "--out", str(out)])


def test_a_root_without_data_json_is_refused_naming_it(tmp_path):
    (tmp_path / "BrainTumor" / "images").mkdir(parents=True)
    with pytest.raises(SystemExit, match=f"{tmp_path / 'BrainTumor' / 'data.json'} does not exist"):
        reproduce.main(["--root", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="--seeds must be a comma-separated list of ints; got 'a,b'"):
        reproduce.main(["--root", str(tmp_path), "--seeds", "a,b"])


def test_ddad_rows_report_the_refined_and_the_inter_discrepancy_map(tmp_path):
    # one step: the run ends in DDAD's autoencoder stage, where the run's own map IS A_inter,
    # so the two scorings (evaluate's and the forced-stage one) must agree exactly
    root, out = write_brain_tumor(tmp_path / "data"), tmp_path / "out"
    assert reproduce.main(["--root", str(root), "--methods", "ddad", "--seeds", "0", "--out", str(out),
                           "--device", "cpu", "--epochs", "1"]) == 0
    [row] = json.loads((out / "reproduce.json").read_text())
    assert set(row) == {"method", "seed", "image_auroc", "image_ap", "minutes", "epochs",
                        *(f"image_{kind}_{name}" for name in ("inter", "rec", "intra") for kind in ("auroc", "ap"))}
    assert (row["image_auroc_inter"], row["image_ap_inter"]) == (row["image_auroc"], row["image_ap"])
    report = (out / "reproduce.md").read_text()
    assert "ddad scored with its inter-discrepancy map A_inter (before the ASR), seeds 0: AUROC" in report
    assert f"| ddad | 0 | 1 | {100 * row['image_auroc']:.2f} |" in report


def test_the_inter_map_is_not_the_refined_one_once_the_asr_trains(tmp_path):
    from medad_fast.methods import resolve_config
    from medad_fast.train import train

    root = write_brain_tumor(tmp_path / "data")
    config = resolve_config("ddad", "tiny", data=str(root / "BrainTumor"), seed=0, epochs=3, data_json_pool=True)
    run = tmp_path / "run"
    train(config, run, device="cpu", progress=False)
    from medad_fast.inference import load_method
    method, _ = load_method(run, "cpu")
    assert method.stage == 1  # the tiny preset's third epoch trains the ASR
    images = torch.rand(3, 1, 32, 32)
    refined = method.predict(images)[0]
    method.stage = 0
    inter = method.predict(images)[0]
    torch.testing.assert_close(inter, method.initial_maps(images)[1].squeeze(1))
    assert not torch.allclose(refined, inter)
    # DDAD-ASR's test.py scores, by hand: every NDM member run alone, their mean / std over the members
    from sklearn.metrics import average_precision_score, roc_auc_score
    from medad_fast.data.dataset import BmadSliceDataset
    dataset = BmadSliceDataset(root / "BrainTumor", "test", size=32)
    x = torch.stack([dataset[i].image for i in range(len(dataset))]).float() / 255 * 2 - 1
    with torch.no_grad():
        members = torch.stack([method.normative.member(k)(x) for k in range(method.normative.members)])
    labels = [entry.abnormal for entry in dataset.files]
    by_hand = {"rec": (x - members.mean(dim=0)).square().flatten(1).mean(dim=1),
               "intra": members.std(dim=0).flatten(1).mean(dim=1)}
    measured = reproduce.initial_map_metrics(run, root / "BrainTumor", "cpu")
    assert set(measured) == {f"image_{kind}_{name}" for name in ("inter", "rec", "intra") for kind in ("auroc", "ap")}
    for name, scores in by_hand.items():
        assert measured[f"image_auroc_{name}"] == pytest.approx(roc_auc_score(labels, scores.numpy()), abs=1e-9)
        assert measured[f"image_ap_{name}"] == pytest.approx(average_precision_score(labels, scores.numpy()), abs=1e-9)
