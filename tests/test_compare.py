"""`medad-fast compare` (and the ablations script on the same machinery): real tiny runs of
two methods, the table and plot, reuse of finished work, resume, and refusals."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from medad_fast.cli import main as cli
from medad_fast.compare import COLUMNS

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medad_fast.data.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("phantom")
    os.environ.setdefault("MEDAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    write_phantom_dataset(root, n_train=12, n_test=8, size=32, seed=5, progress=False)
    return root


def compare(data: Path, out: Path, *extra: str) -> int:
    return cli(["compare", "--data", str(data), "--methods", "frequency_aware,ae", "--preset", "tiny",
                "--out", str(out), "--device", "cpu", "--no-progress", "--seed", "1", *extra])


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare")
    assert compare(data, out) == 0
    return out


def test_compare_writes_the_table_json_and_one_roc_plot(compared):
    lines = (compared / "compare.md").read_text().splitlines()
    assert lines[0].startswith("| method | switches | image AUROC |") and lines[0].endswith("| training min | slices/s |")
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["frequency_aware", "ae"]
    assert "Command: `medad-fast compare --data" in (compared / "compare.md").read_text()
    rows = json.loads((compared / "compare.json").read_text())["rows"]
    for name in ("frequency_aware", "ae"):
        metrics = json.loads((compared / name / "eval" / "metrics.json").read_text())
        assert rows[name]["method"] == name and metrics["method"] == name
        # the table's figures are the evaluation's, not recomputed
        assert all(rows[name][key] == metrics[key] for key, _ in COLUMNS)
        assert rows[name]["training_minutes"] > 0 and rows[name]["slices_per_s"] > 0
        assert rows[name]["n_images"] == 8
        # evaluate's per-slice scores, from which the ROC plot is drawn
        assert len((compared / name / "eval" / "scores.csv").read_text().splitlines()) == 1 + 8
    assert (compared / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_summary_names_every_method_tied_for_the_highest_image_auroc(compared):
    from medad_fast.compare import write_outputs

    rows = json.loads((compared / "compare.json").read_text())["rows"]
    rows["ae"]["image_auroc"] = rows["frequency_aware"]["image_auroc"]
    markdown = write_outputs(compared, "tied", rows, "medad-fast compare ...")
    assert "Highest image AUROC: **frequency_aware** and **ae** (tied)." in markdown
    rows["ae"]["image_auroc"] = rows["frequency_aware"]["image_auroc"] + 0.01
    assert "Highest image AUROC: **ae**. " in write_outputs(compared, "ahead", rows, "medad-fast compare ...")


def test_a_finished_method_is_reused_not_retrained(compared, data):
    logs = {n: (compared / n / "run" / "log.jsonl").stat().st_mtime_ns for n in ("frequency_aware", "ae")}
    metrics = {n: (compared / n / "eval" / "metrics.json").stat().st_mtime_ns for n in ("frequency_aware", "ae")}
    assert compare(data, compared) == 0
    assert logs == {n: (compared / n / "run" / "log.jsonl").stat().st_mtime_ns for n in logs}
    assert metrics == {n: (compared / n / "eval" / "metrics.json").stat().st_mtime_ns for n in metrics}


def test_a_run_of_another_config_is_refused_naming_the_difference(compared, data):
    with pytest.raises(SystemExit, match=r"seed: 1 -> 2.*delete"):
        compare(data, compared, "--seed", "2")
    with pytest.raises(SystemExit, match=r"epochs: 3 -> 4"):
        compare(data, compared, "--epochs", "4")


def test_an_unfinished_run_is_resumed(data, tmp_path):
    out = tmp_path / "out"
    assert cli(["train", "--method", "ae", "--data", str(data), "--preset", "tiny", "--epochs", "3", "--seed", "1",
                "--out", str(out / "ae" / "run"), "--device", "cpu", "--no-progress", "--checkpoint-every", "1",
                "--keep-checkpoints", "5"]) == 0
    # cut the run back to its first epoch, as if it had been stopped there
    run = out / "ae" / "run"
    log = (run / "log.jsonl").read_text().splitlines()
    (run / "log.jsonl").write_text(log[0] + "\n")
    for path in run.glob("checkpoint*.pt"):
        if "-e00001-" not in path.name:
            path.unlink()
    assert cli(["compare", "--data", str(data), "--methods", "ae", "--preset", "tiny", "--out", str(out),
                "--device", "cpu", "--no-progress", "--seed", "1"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert json.loads((out / "ae" / "eval" / "metrics.json").read_text())["epoch"] == 3


def test_bad_arguments_are_named(data, tmp_path, capsys):
    assert cli(["compare", "--data", str(data), "--methods", "ae,nonesuch", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--methods" in err and "nonesuch" in err
    with pytest.raises(SystemExit, match="--data .*no train/good"):
        cli(["compare", "--data", str(tmp_path / "nowhere"), "--methods", "ae", "--out", str(tmp_path)])


def test_ablations_script_runs_variants_of_the_paper_method(data, tmp_path):
    spec = importlib.util.spec_from_file_location("ablations", REPO / "scripts" / "ablations.py")
    ablations = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablations)
    assert ablations.main(["--data", str(data), "--out", str(tmp_path), "--preset", "tiny", "--epochs", "1",
                           "--only", "full", "no-roi", "--device", "cpu", "--no-progress"]) == 0
    lines = (tmp_path / "ablations.md").read_text().splitlines()
    assert lines[0].startswith("| variant | switches |")
    assert lines[3].startswith("| no-roi | `--no-roi` |")
    config = json.loads((tmp_path / "no-roi" / "run" / "config.json").read_text())
    assert config["method_config"]["roi"] is False


def test_runs_with_a_validation_set_are_evaluated_on_their_best_checkpoint_and_reused(data, tmp_path):
    out = tmp_path / "out"
    small = ["--augment", "--val-fraction", "0.25", "--patience", "1"]
    assert compare(data, out, *small) == 0
    table = (out / "compare.md").read_text()
    assert "--augment" in table and "--val-fraction 0.25" in table and "--patience 1" in table
    for name in ("frequency_aware", "ae"):
        records = [json.loads(line) for line in (out / name / "run" / "log.jsonl").read_text().splitlines()]
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert metrics["checkpoint"] == str((out / name / "run" / "checkpoint-best.pt").resolve())
        assert metrics["epoch"] == records[-1]["val_best_epoch"]
    stamps = {n: (out / n / "eval" / "metrics.json").stat().st_mtime_ns for n in ("frequency_aware", "ae")}
    assert compare(data, out, *small) == 0  # finished (or stopped early) and evaluated: nothing is redone
    assert stamps == {n: (out / n / "eval" / "metrics.json").stat().st_mtime_ns for n in stamps}
