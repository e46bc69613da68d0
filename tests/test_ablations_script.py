"""scripts/ablations.py without training: the table and the refusal to mix data sets."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ablations.py"


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_metrics(folder: Path, data: Path, value: float) -> None:
    (folder / "eval").mkdir(parents=True)
    keys = ["image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "aupro_0.3", "best_dice"]
    (folder / "eval" / "metrics.json").write_text(json.dumps({"data": str(data.resolve()), **dict.fromkeys(keys, value)}))


def test_finished_variants_are_reused_and_tabulated(ablations, tmp_path):
    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    for i, name in enumerate(ablations.VARIANTS):
        fake_metrics(tmp_path / "out" / name, data, i / 10)
    assert ablations.main(["--data", str(data), "--out", str(tmp_path / "out")]) == 0  # nothing trains
    lines = (tmp_path / "out" / "ablations.md").read_text().splitlines()
    assert len(lines) == 2 + len(ablations.VARIANTS)
    assert lines[3] == "| no-roi | `--no-roi` | " + " | ".join(["0.100"] * 6) + " | - |"
    assert json.loads((tmp_path / "out" / "ablations.json").read_text())["seg-only"]["pixel_ap"] == 0.4


def test_a_variant_evaluated_on_other_data_is_refused(ablations, tmp_path):
    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    fake_metrics(tmp_path / "out" / "full", tmp_path / "elsewhere", 0.5)
    with pytest.raises(SystemExit, match="elsewhere"):
        ablations.main(["--data", str(data), "--out", str(tmp_path / "out"), "--only", "full"])


def test_missing_data_names_the_argument(ablations, tmp_path, capsys):
    with pytest.raises(SystemExit):
        ablations.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert "--data" in capsys.readouterr().err


def test_compare_tabulates_every_registered_method(tmp_path):
    from medad_fast.methods import method_names
    spec = importlib.util.spec_from_file_location("compare", SCRIPT.parent / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    data = tmp_path / "data"
    (data / "train" / "good").mkdir(parents=True)
    for i, name in enumerate(method_names()):
        fake_metrics(tmp_path / "out" / name, data, i / 10)
    assert compare.main(["--data", str(data), "--out", str(tmp_path / "out")]) == 0  # nothing trains
    lines = (tmp_path / "out" / "compare.md").read_text().splitlines()
    assert lines[0].startswith("| method | switch |") and len(lines) == 2 + len(method_names())
    assert lines[3] == "| ae | `--method ae` | " + " | ".join(["0.100"] * 6) + " | - |"
