"""`medad-fast compare --seeds`: every method once per seed, the table's mean +- sd over the
seeds (checked against numpy on the per-seed rows), the per-seed rows in compare.json, reuse
of finished seeds, and the refused values of --seeds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from medad_fast.cli import main as cli
from medad_fast.compare import COLUMNS, seed_summary, table

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = ("ae", "frequency_aware")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from medad_fast.data.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("phantom")
    os.environ.setdefault("MEDAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    write_phantom_dataset(root, n_train=8, n_test=4, size=32, seed=3, progress=False)
    return root


def compare(data: Path, out: Path, *extra: str) -> int:
    return cli(["compare", "--data", str(data), "--methods", ",".join(METHODS), "--preset", "tiny", "--epochs", "1",
                "--out", str(out), "--device", "cpu", "--no-progress", *extra])


@pytest.fixture(scope="module")
def compared(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare-seeds")
    assert compare(data, out, "--seeds", "0,1") == 0
    return out


def test_each_method_has_one_run_and_evaluation_per_seed_and_its_rows_in_compare_json(compared):
    saved = json.loads((compared / "compare.json").read_text())
    assert "--seeds 0,1" in saved["command"]
    for name in METHODS:
        row = saved["rows"][name]
        assert row["n"] == 2 and row["seeds"] == [0, 1]
        assert [r["seed"] for r in row["per_seed"]] == [0, 1]
        assert not (compared / name / "run").exists()  # the per-seed folders only
        for seed_row in row["per_seed"]:
            folder = compared / name / f"seed{seed_row['seed']}"
            config = json.loads((folder / "run" / "config.json").read_text())
            metrics = json.loads((folder / "eval" / "metrics.json").read_text())
            assert config["run"]["seed"] == seed_row["seed"] and config["run"]["epochs"] == 1
            assert all(seed_row[key] == metrics[key] for key, _ in COLUMNS)
        # two seeds train two different models (one tiny epoch may rank the slices alike: the scores differ)
        scores = [(compared / name / f"seed{seed}" / "eval" / "scores.csv").read_text() for seed in (0, 1)]
        assert scores[0].count("\n") == 1 + 4 and scores[0] != scores[1]
    assert (compared / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_table_gives_the_mean_and_sample_sd_of_the_per_seed_rows(compared):
    markdown = (compared / "compare.md").read_text()
    lines = markdown.splitlines()
    assert lines[0].startswith("| method | switches | n | image AUROC |")
    rows = json.loads((compared / "compare.json").read_text())["rows"]
    spreads = []
    for name in METHODS:
        cells = [c.strip() for c in next(l for l in lines if l.startswith(f"| {name} |")).split("|")[1:-1]]
        assert cells[2] == "2"
        for (key, _), cell in zip(COLUMNS, cells[3:9]):
            values = np.array([r[key] for r in rows[name]["per_seed"]])
            assert cell == f"{values.mean():.3f} +- {values.std(ddof=1):.3f}", key
            spreads.append(values.std(ddof=1))
        # the per-seed table: one line per seed, its figures as evaluated
        for seed_row in rows[name]["per_seed"]:
            line = f"| {name} | {seed_row['seed']} | `--method {name}` | " + " | ".join(
                f"{seed_row[key]:.3f}" for key, _ in COLUMNS)
            assert line in markdown
    assert max(spreads) > 0.01  # the check above is not only of sd 0
    assert "Mean +- sample sd (n - 1) over the n seeds" in markdown and "Per seed:" in markdown


def test_a_rerun_reuses_every_finished_seed(compared, data, capsys):
    capsys.readouterr()
    stamps = {path: path.stat().st_mtime_ns for path in compared.glob("*/seed*/*/*")
              if path.name in ("log.jsonl", "metrics.json")}
    assert len(stamps) == 2 * 2 * 2
    assert compare(data, compared, "--seeds", "0,1") == 0
    output = capsys.readouterr().out
    steps = [line for line in output.splitlines() if line.startswith("== ")]
    assert len(steps) == 4 and all(line.endswith("/eval/metrics.json)") for line in steps), steps
    assert [line.split(":")[0] for line in steps] == ["== ae, seed 0", "== ae, seed 1", "== frequency_aware, seed 0",
                                                       "== frequency_aware, seed 1"]
    assert all("already trained and evaluated" in line for line in steps)
    assert stamps == {path: path.stat().st_mtime_ns for path in stamps}


@pytest.mark.parametrize("seeds, message", [("", "empty list"), ("0,a", "'a' is not an integer"),
                                            ("1,2,1", "seed 1 is given twice")])
def test_bad_seeds_exit_2_naming_the_option(data, tmp_path, capsys, seeds, message):
    assert compare(data, tmp_path / "out", "--seeds", seeds) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and message in err
    assert not (tmp_path / "out").exists()  # refused before any training


def test_seed_and_seeds_together_are_refused(data, tmp_path, capsys):
    assert compare(data, tmp_path / "out", "--seed", "1", "--seeds", "0,1") == 2
    assert "--seed 1 and --seeds 0,1" in capsys.readouterr().err


def test_spread_of_an_image_level_split_and_of_one_seed():
    def row(seed, auroc):
        return {"image_auroc": auroc, "pixel_auroc": None, "image_ap": 0.5, "pixel_ap": None, "aupro_0.3": None,
                "best_dice": None, "training_minutes": 1.0 + seed, "slices_per_s": 10.0, "method": "ae",
                "switches": "", "n_images": 4, "seed": seed}
    summary = seed_summary([row(0, 0.5), row(1, 0.75), row(2, 1.0)])
    assert summary["image_auroc"] == 0.75 and summary["sd"]["image_auroc"] == 0.25
    assert summary["pixel_auroc"] is None and summary["training_minutes"] == 2.0
    assert table({"ae": summary}).splitlines()[2] == \
        "| ae | `-` | 3 | 0.750 +- 0.250 | n/a | 0.500 +- 0.000 | n/a | n/a | n/a | 2.0 | 10 |"
    one = seed_summary([row(4, 0.5)])
    assert one["n"] == 1 and one["sd"]["image_auroc"] is None
    assert "| 1 | 0.500 +- n/a |" in table({"ae": one})
