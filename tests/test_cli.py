"""`medad-fast train / evaluate / predict` on tiny phantom data (in-process CLI calls)."""

import json
from pathlib import Path

import pytest
import torch

from medad_fast.cli import COMMANDS, main as cli
from medad_fast.data.phantom import write_phantom_dataset

TINY = ["--preset", "small", "--image-size", "32", "--recon-width", "2", "--seg-width", "2",
        "--batch-size", "4", "--source-pool-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_train=8, n_test=6, size=48, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "2", *TINY]) == 0
    return out


def test_train_writes_config_log_and_checkpoint(run):
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "frequency_aware"
    assert config["run"]["preset"] == "small" and config["run"]["image_size"] == 32 and config["run"]["epochs"] == 2
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("loss", "loss_rec", "loss_seg", "alpha", "lr", "images_per_s"):
        assert key in records[-1]
    assert records[0]["step"] == 2 and records[1]["step"] == 4  # 8 images / batch 4
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4
    assert 0.0 <= state["method_state"]["alpha"] < 1.0
    assert {"method", "model", "optimizers", "schedulers", "generators"} <= set(state)


def test_evaluate_writes_metrics_roc_and_heatmaps(run, data, capsys):
    assert cli(["evaluate", str(run), "--data", str(data), "--no-progress", "--cases", "2"]) == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "pixel AUROC" in printed
    out = run.parent / f"{run.name}-eval-test"  # beside the run: evaluate writes nothing into it
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "aupro_0.3", "best_dice", "n_images",
                "n_pixels"):
        assert key in metrics
    assert metrics["n_images"] == 6 and metrics["n_pixels"] == 6 * 32 * 32
    assert (out / "roc.png").stat().st_size > 1000
    heatmaps = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert any(n.startswith("worst-abnormal") for n in heatmaps)
    assert any(n.startswith("best-normal") for n in heatmaps)
    from PIL import Image
    with Image.open(out / "heatmaps" / heatmaps[0]) as im:
        assert im.mode == "RGB" and im.size == (512, 256)  # slice | overlay, 32 px enlarged 8x


def test_predict_scores_files_and_folders(run, data, tmp_path, capsys):
    files = sorted((data / "test" / "Ungood" / "img").glob("*.png"))[:2]
    out = tmp_path / "pred"
    assert cli(["predict", str(run / "checkpoint.pt"), str(files[0]), str(data / "test" / "good"),
                "--out", str(out), "--no-progress"]) == 0
    rows = json.loads((out / "scores.json").read_text())["images"]
    n_good = len(list((data / "test" / "good").rglob("*.png")))
    assert len(rows) == 1 + n_good
    assert rows[0]["path"] == str(files[0])
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert csv_lines[0] == "path,score" and len(csv_lines) == len(rows) + 1
    assert all((out / r["heatmap"]).is_file() for r in rows)
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)
    # the same image scored by evaluate's path gives the same score (one inference path)
    from medad_fast.data.dataset import ImageFileDataset
    from medad_fast.inference import load_method, score_batch
    method, _ = load_method(run / "checkpoint.pt")
    _, scores = score_batch(method, ImageFileDataset([files[0]], method.config.run.image_size)[0].image[None])
    assert float(scores[0]) == pytest.approx(rows[0]["score"], abs=1e-5)


def test_resume_continues_and_refuses_another_preset(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    # without --resume an existing run is not overwritten
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "2", *TINY]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "2", "--resume", *TINY]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 4
    # a paper-preset model refuses the small checkpoint, with the reason
    paper = ["--preset", "paper", "--image-size", "32", "--recon-width", "2", "--seg-width", "2",
             "--batch-size", "4", "--no-progress"]
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "3", "--resume", *paper]) == 2
    err = capsys.readouterr().err
    assert "preset 'small'" in err and "preset 'paper'" in err


def test_resume_is_exact(data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli(["train", "--data", str(data), "--out", str(straight), "--epochs", "2", *TINY]) == 0
    assert cli(["train", "--data", str(data), "--out", str(split), "--epochs", "1", *TINY]) == 0
    assert cli(["train", "--data", str(data), "--out", str(split), "--epochs", "2", "--resume", *TINY]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key


def test_bad_input_gives_clear_errors(data, tmp_path, capsys):
    assert cli(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "missing" in capsys.readouterr().err
    assert cli(["evaluate", str(tmp_path / "nothing"), "--data", str(data)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli(["train", "--data", str(data), "--out", str(tmp_path / "r2"), "--epochs", "0", *TINY]) == 2
    assert "epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: the mode switches exclude each other
        cli(["train", "--data", str(data), "--recon-only", "--seg-only"])


@pytest.mark.parametrize("switch", ["--no-roi", "--no-highpass", "--recon-only", "--seg-only", "--no-synthesis",
                                    "--reference-ops"])
def test_every_ablation_switch_trains_and_evaluates(switch, data, tmp_path):
    out = tmp_path / "run"
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "1", switch, *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    expected = {"--no-roi": ("roi", False), "--no-highpass": ("highpass", False),
                "--recon-only": ("mode", "recon_only"), "--seg-only": ("mode", "seg_only"),
                "--no-synthesis": ("synthesis", False), "--reference-ops": ("reference_ops", True)}[switch]
    part = "run" if expected[0] == "reference_ops" else "method_config"
    assert config[part][expected[0]] == expected[1]
    assert cli(["evaluate", str(out), "--data", str(data), "--no-progress", "--cases", "1"]) == 0
    metrics = json.loads((out.parent / f"{out.name}-eval-test" / "metrics.json").read_text())
    assert metrics["variant"].startswith(f"frequency_aware ({config['method_config']['mode']}")


@pytest.mark.parametrize("command, option, value", [("evaluate", "--batch-size", "0"), ("evaluate", "--cases", "-1"),
                                                    ("predict", "--batch-size", "0")])
def test_bad_counts_are_refused_naming_the_option(command, option, value, tmp_path, capsys):
    inputs = ["--data", str(tmp_path)] if command == "evaluate" else [str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        cli([command, str(tmp_path), *inputs, option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be >= " in capsys.readouterr().err


def test_default_policy_writes_the_last_epoch_and_not_every_epoch(data, tmp_path):
    out = tmp_path / "run"
    args = [a for a in TINY if a not in ("--checkpoint-every", "1")]
    assert cli(["train", "--data", str(data), "--out", str(out), "--epochs", "3", *args]) == 0
    written = sorted(p.name for p in out.glob("checkpoint-*.pt"))
    assert len(written) == 1 and written[0].startswith("checkpoint-e00003-")  # 3 epochs, one write


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_verb_prints_its_help(command, capsys):
    # argparse formats every option's help with %-formatting: a stray "%" crashes --help
    with pytest.raises(SystemExit) as exit_info:
        cli([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: medad-fast {command}" in capsys.readouterr().out


def test_prepare_help_shows_the_input_layouts(capsys):
    # the layouts prepare reads must be in its --help, line by line (not re-wrapped by argparse)
    with pytest.raises(SystemExit) as exit_info:
        cli(["prepare", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "\n  lits   volume-N.nii[.gz] + segmentation-N.nii[.gz] anywhere under SRC" in out
    assert "\n  btcv   img/imgXXXX.nii.gz + label/labelXXXX.nii.gz" in out
    assert "MASKS_DICOM/liver/" in out and "PATIENT_DICOM/" in out
    assert "\n  OUT/{valid,test}/Ungood/img/*.png" in out
