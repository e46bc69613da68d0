"""`medad-fast export`: the pt2 (torch.export, fused ops inside) and ONNX (standard ops, run
with ONNX Runtime) files of a trained tiny checkpoint of every method score like the
checkpoint (pixel maps within 1e-4), `predict` writes the same scores with an exported file
as with the checkpoint, and bad input gets an error naming it."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from medad_fast import ops
from medad_fast.cli import main as cli
from medad_fast.data.bmad import load_split
from medad_fast.export import MatrixButterworthHighpass
from medad_fast.exported import ExportedModel
from medad_fast.inference import load_method, load_scorer, score_images
from medad_fast.methods import method_names

pytestmark = pytest.mark.usefixtures("one_thread")

#: the acceptance bound: max abs difference of the pixel maps, exported vs eager
MAP_TOLERANCE = 1e-4
TINY_ARGS = ["--preset", "tiny", "--seed", "3", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """A run directory per method, trained 3 tiny epochs on the phantom (ddad with the test
    split as its unlabeled images: both ensembles, and its refinement net scores)."""
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained = {}
        for name in method_names():
            extra = ["--unlabeled-split", "test"] if name == "ddad" else []
            assert cli(["train", "--method", name, "--data", str(data), "--out", str(root / name), *TINY_ARGS,
                        *extra]) == 0
            trained[name] = root / name
    finally:
        torch.set_num_threads(threads)
    return trained


@pytest.fixture(scope="module")
def test_images(data) -> torch.Tensor:
    """The phantom's 8 test slices, uint8 [8, 1, 32, 32]."""
    return load_split(data, "test", size=32).images


def export(run: Path, fmt: str, out: Path) -> Path:
    assert cli(["export", str(run), "--format", fmt, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("name", method_names())
def test_exported_model_matches_eager(name, fmt, runs, test_images, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    path = export(runs[name], fmt, tmp_path / f"{name}.{fmt}")
    method, _ = load_method(runs[name])
    exported = load_scorer(path)
    assert isinstance(exported, ExportedModel) and exported.config == method.config
    for batch_size in (8, 3, 1):  # the batch axis is dynamic
        eager_maps, eager_scores = score_images(method, test_images, batch_size)
        maps, scores = score_images(exported, test_images, batch_size)
        difference = (maps - eager_maps).abs().max().item()
        assert difference <= MAP_TOLERANCE, f"{name} {fmt} batch {batch_size}: max abs map difference {difference}"
        assert (scores - eager_scores).abs().max().item() <= MAP_TOLERANCE
    assert eager_maps.abs().max() > 0  # not a trivially equal pair of zero maps


def read_scores(out: Path) -> list[tuple[str, float]]:
    with (out / "scores.csv").open() as f:
        return [(row["path"], float(row["score"])) for row in csv.DictReader(f)]


def test_predict_with_an_exported_file_writes_the_checkpoints_scores(runs, data, tmp_path):
    pytest.importorskip("onnxruntime")
    images = [str(p) for p in sorted((data / "test").rglob("img/*.png"))]
    run = runs["frequency_aware"]  # both fused ops in its inference
    assert cli(["predict", str(run), *images, "--out", str(tmp_path / "ckpt"), "--no-progress"]) == 0
    expected = read_scores(tmp_path / "ckpt")
    assert len(expected) == len(images)
    for fmt in ("pt2", "onnx"):
        path = export(run, fmt, tmp_path / f"model.{fmt}")
        out = tmp_path / fmt
        assert cli(["predict", str(path), *images, "--out", str(out), "--no-progress", "--batch-size", "3"]) == 0
        got = read_scores(out)
        assert [p for p, _ in got] == [p for p, _ in expected]
        # scores.csv holds 6 decimals: equal up to the rounding of the last one
        assert all(math.isclose(a, b, abs_tol=2e-6) for (_, a), (_, b) in zip(got, expected)), (fmt, got, expected)
        assert sorted(p.name for p in (out / "heatmaps").iterdir()) == \
            sorted(p.name for p in (tmp_path / "ckpt" / "heatmaps").iterdir())


def test_bad_input_is_named(runs, data, tmp_path, capsys):
    run = runs["ae"]
    # an unknown format: argparse names the option and the choices
    with pytest.raises(SystemExit) as exc:
        cli(["export", str(run), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert exc.value.code == 2 and "--format" in capsys.readouterr().err
    # a file name that does not match the format
    assert cli(["export", str(run), "--format", "pt2", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "m.onnx: a pt2 file must end in .pt2" in capsys.readouterr().err
    # AOTInductor compiles pt2 programs only
    assert cli(["export", str(run), "--format", "onnx", "--aoti", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--aoti compiles a pt2 file; got --format onnx" in capsys.readouterr().err
    # no checkpoint
    assert cli(["export", str(tmp_path / "missing"), "--format", "pt2", "--out", str(tmp_path / "m.pt2")]) == 2
    assert f"no checkpoint at {tmp_path / 'missing'}" in capsys.readouterr().err
    image = str(sorted((data / "test").rglob("img/*.png"))[0])
    # no exported file
    assert cli(["predict", str(tmp_path / "missing.onnx"), image, "--out", str(tmp_path / "p")]) == 2
    assert str(tmp_path / "missing.onnx") in capsys.readouterr().err
    # a file that is not an export
    for name in ("broken.pt2", "broken.onnx"):
        (tmp_path / name).write_bytes(b"not a model")
        assert cli(["predict", str(tmp_path / name), image, "--out", str(tmp_path / "p"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err and ("not a pt2 file" in err or "not an ONNX model" in err
                                                  or "needs onnxruntime" in err)
    # images of another side
    exported = load_scorer(export(run, "pt2", tmp_path / "ae.pt2"))
    with pytest.raises(ValueError, match=r"scores images of shape \[B, 1, 32, 32\]; got \[1, 1, 16, 16\]"):
        exported.predict(torch.rand(1, 1, 16, 16))


@pytest.mark.parametrize("side", [(32, 32), (31, 20), (96, 96)])
def test_matrix_dft_highpass_is_the_fused_op(side):
    x = torch.rand(3, 1, *side, generator=torch.Generator().manual_seed(0))
    fused = ops.ButterworthHighpass(30.0, 2)(x)
    matrix = MatrixButterworthHighpass.replacing(ops.ButterworthHighpass(30.0, 2), *side)(x)
    assert (matrix - fused).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="built for"):
        MatrixButterworthHighpass(30.0, 2, 32, 32)(torch.rand(1, 16, 16))


@pytest.mark.slow
def test_aoti_package_matches_eager(runs, test_images, tmp_path):
    """AOTInductor on the CPU (the paper's method: both fused ops called from the compiled
    C++): about a minute of compiling on one core."""
    path = tmp_path / "model.pt2"
    assert cli(["export", str(runs["frequency_aware"]), "--format", "pt2", "--aoti", "--out", str(path)]) == 0
    method, _ = load_method(runs["frequency_aware"])
    exported = load_scorer(path)
    for batch_size in (8, 1):
        maps, scores = score_images(exported, test_images, batch_size)
        eager_maps, eager_scores = score_images(method, test_images, batch_size)
        assert (maps - eager_maps).abs().max().item() <= MAP_TOLERANCE
        assert (scores - eager_scores).abs().max().item() <= MAP_TOLERANCE
