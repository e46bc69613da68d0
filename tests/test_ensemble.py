"""Seed ensembles at inference (issue 26, :mod:`medad_fast.ensemble`): an ensemble's map is
the mean of its members' maps, its image score the method's score of that map (SQUID's
discriminator score: the members' mean); members that disagree on method, side,
preprocessing or score rule, or repeat a checkpoint, are refused naming both; ``predict`` and
``export`` take ``--ensemble``."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ct_data import liver_phantom, tiny_checkpoint, write_nifti
from medad_fast.cli import main as cli
from medad_fast.data.bmad import load_split
from medad_fast.ensemble import SeedEnsemble
from medad_fast.exported import ExportedModel
from medad_fast.inference import (load_ensemble, load_method, load_scorer, load_scorer_and_state, score_images,
                                  scorer_facts)
from medad_fast.methods import create_method, image_scores, resolve_config
from medad_fast.preprocessing import decide_preprocessing

pytestmark = pytest.mark.usefixtures("one_thread")

#: the acceptance bound of an exported file against eager scoring (tests/test_export.py's)
EXPORT_TOLERANCE = 1e-4
#: an ensemble against the mean computed here: the same sums, maybe in another order
MEAN_TOLERANCE = 1e-6
SEEDS = {"frequency_aware": (0, 1, 2), "ae": (0, 1)}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, list[Path]]:
    """Run directories per method, one per seed of :data:`SEEDS`, each trained one tiny epoch
    on the phantom."""
    root = tmp_path_factory.mktemp("runs")
    trained = {}
    for name, seeds in SEEDS.items():
        trained[name] = []
        for seed in seeds:
            out = root / f"{name}-{seed}"
            assert cli(["train", "--method", name, "--data", str(data), "--out", str(out), "--preset", "tiny",
                        "--epochs", "1", "--seed", str(seed), "--no-progress", "--device", "cpu"]) == 0
            trained[name].append(out)
    return trained


@pytest.fixture(scope="module")
def test_images(data) -> torch.Tensor:
    """The phantom's 8 test slices, uint8 [8, 1, 32, 32]."""
    return load_split(data, "test", size=32).images


def fresh_images(count: int = 5, side: int = 32) -> torch.Tensor:
    """Random images float [count, 1, side, side] in [0, 1], a liver-like disc in each."""
    generator = torch.Generator().manual_seed(26)
    images = torch.rand(count, 1, side, side, generator=generator)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    disc = ((yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= (0.4 * side) ** 2).float()
    return images * disc


def members_maps_and_scores(paths, images) -> tuple[torch.Tensor, torch.Tensor]:
    """Every member loaded alone: ``(maps [N, B, H, W], scores [N, B])``."""
    results = [score_images(load_method(path)[0], images) for path in paths]
    return torch.stack([maps for maps, _ in results]), torch.stack([scores for _, scores in results])


@pytest.mark.parametrize("name", list(SEEDS))
def test_the_map_is_the_mean_of_the_members_maps(name, runs, one_thread):
    images = fresh_images()
    ensemble, _ = load_ensemble(runs[name])
    assert isinstance(ensemble, SeedEnsemble) and len(ensemble.members) == len(SEEDS[name])
    maps, scores = score_images(ensemble, images)
    member_maps, _ = members_maps_and_scores(runs[name], images)
    # the seeds score differently (frequency_aware's tiny maps are nearly flat, about 0.5: by
    # ~1e-4), by far more than the tolerance
    assert (member_maps[0] - member_maps[1]).abs().max() > 20 * MEAN_TOLERANCE
    assert (maps - member_maps.mean(dim=0)).abs().max() <= MEAN_TOLERANCE
    # image score: the method's rule (max of the mean-filtered map) applied to the mean map
    method = load_method(runs[name][0])[0]
    assert torch.allclose(scores, image_scores(member_maps.mean(dim=0), method.score_filter), atol=MEAN_TOLERANCE)


def spot_members(tmp_path, image_score: str = "max_filter") -> tuple[list, list[Path]]:
    """Two ae members (untrained tiny checkpoints) whose maps are a bright 5 x 5 spot, at the
    top left for one and the bottom right for the other: the max of the mean map's filter
    is then half the members' (their spots do not overlap)."""
    members, paths = [], []
    for seed, corner in ((0, slice(2, 7)), (1, slice(25, 30))):
        torch.manual_seed(seed)
        path = tiny_checkpoint(tmp_path / f"ae-{seed}.pt", image_score=image_score)
        member = load_method(path)[0]

        def spot(images, corner=corner):
            maps = torch.zeros(images.shape[0], *images.shape[-2:])
            maps[:, corner, corner] = 1.0
            return maps

        member.anomaly_maps = spot
        members.append(member)
        paths.append(path)
    return members, paths


def test_the_image_score_is_the_methods_score_of_the_mean_map(tmp_path):
    members, paths = spot_members(tmp_path)
    images = fresh_images(2)
    maps, scores = SeedEnsemble(members, paths).predict(images)
    member_scores = torch.stack([member.predict(images)[1] for member in members])
    filter_size = members[0].score_filter  # 3 at the tiny side 32
    assert torch.allclose(scores, image_scores(maps, filter_size))
    # a spot's filtered peak: its 25 pixels of 1 in a window of filter_size**2; half in the mean map
    peak = min(25, filter_size ** 2) / filter_size ** 2
    assert torch.allclose(member_scores, torch.full_like(member_scores, peak))
    assert torch.allclose(scores, torch.full_like(scores, peak / 2))  # not the members' mean score


def test_a_mean_image_score_is_the_mean_of_the_mean_map(tmp_path):
    """ae with ``--image-score mean`` (MedIAnomaly's): the ensemble's score is the mean of
    its mean map."""
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tiny_checkpoint(tmp_path / f"ae-{seed}.pt", image_score="mean"))
    images = fresh_images()
    maps, scores = score_images(load_ensemble(paths)[0], images)
    member_maps, _ = members_maps_and_scores(paths, images)
    assert (maps - member_maps.mean(dim=0)).abs().max() <= MEAN_TOLERANCE
    assert torch.allclose(scores, member_maps.mean(dim=0).flatten(1).mean(dim=1), atol=MEAN_TOLERANCE)


def squid_members(image_score: str) -> list:
    """Two untrained squid methods at the tiny preset (seeds 0 and 1), with a record."""
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = resolve_config("squid", "tiny", image_score=image_score)
        members.append(create_method(config.with_preprocessing(decide_preprocessing(config.run))).eval())
    return members


def test_squid_discriminator_scores_are_averaged_and_its_map_scores_are_not():
    images = fresh_images()
    for image_score in ("discriminator", "max_filter"):
        members = squid_members(image_score)
        maps, scores = SeedEnsemble(members, ["squid-0.pt", "squid-1.pt"]).predict(images)
        results = [member.predict(images) for member in members]
        mean_maps = torch.stack([m for m, _ in results]).mean(dim=0)
        mean_scores = torch.stack([s for _, s in results]).mean(dim=0)
        assert (maps - mean_maps).abs().max() <= MEAN_TOLERANCE
        map_rule = image_scores(mean_maps, members[0].score_filter)
        if image_score == "discriminator":  # -D(I_s) is not a function of the map
            assert torch.allclose(scores, mean_scores, atol=MEAN_TOLERANCE)
            assert (scores - map_rule).abs().max() > 1e-3
        else:
            assert torch.allclose(scores, map_rule, atol=MEAN_TOLERANCE)


def test_one_member_is_the_member(runs):
    images = fresh_images()
    run = runs["frequency_aware"][0]
    maps, scores = score_images(load_scorer([run]), images)
    member_maps, member_scores = score_images(load_method(run)[0], images)
    assert torch.equal(maps, member_maps) and torch.equal(scores, member_scores)


def test_scorer_facts_name_the_members_and_their_weights(runs):
    paths = runs["ae"]
    ensemble, state = load_scorer_and_state(paths)
    assert isinstance(ensemble, SeedEnsemble)
    facts = scorer_facts(paths, state)
    assert facts["scorer"] == "ensemble" and facts["epoch"] is None and facts["weights"] == "last"
    assert [member["checkpoint"] for member in facts["members"]] == \
        [str((path / "checkpoint.pt").resolve()) for path in paths]
    assert [member["weights"] for member in facts["members"]] == ["last", "last"]
    assert all(member["epoch"] == 1 for member in facts["members"])
    json.dumps(facts)  # goes into metrics.json as it is


def test_members_that_disagree_are_refused_naming_both(runs, tmp_path):
    fa, ae = runs["frequency_aware"][0], runs["ae"][0]
    torch.manual_seed(0)
    base = tiny_checkpoint(tmp_path / "base.pt")
    cases = {
        "method": (ae, fa, "'ae' vs 'frequency_aware'"),
        "image side": (base, tiny_checkpoint(tmp_path / "side16.pt", image_size=16), "32 vs 16"),
        "preprocessing": (base, tiny_checkpoint(tmp_path / "cropped.pt", crop="liver"), "'crop': 'liver'"),
        "image_score": (base, tiny_checkpoint(tmp_path / "mean.pt", image_score="mean"), "'max_filter' vs 'mean'"),
        "score filter": (base, tiny_checkpoint(tmp_path / "filter.pt", score_filter=7), "vs 7"),
    }
    for field, (first, second, values) in cases.items():
        with pytest.raises(ValueError) as refusal:
            load_ensemble([first, second])
        message = str(refusal.value)
        assert f"disagree on {field}:" in message and values in message, message
        assert str(first) in message and str(second) in message, message
    # the same checkpoint twice: a run directory and its checkpoint file are one
    with pytest.raises(ValueError, match="are the same checkpoint") as refusal:
        load_ensemble([fa, runs["frequency_aware"][1], fa / "checkpoint.pt"])
    assert str(fa / "checkpoint.pt") in str(refusal.value)
    # an exported file is no member
    exported = tmp_path / "fa.pt2"
    assert cli(["export", str(fa), "--format", "pt2", "--out", str(exported)]) == 0
    with pytest.raises(ValueError, match="not exported files") as refusal:
        load_ensemble([fa, exported])
    assert str(exported) in str(refusal.value)
    with pytest.raises(ValueError, match="at least one run"):
        load_ensemble([])


def test_ddad_members_of_two_stages_are_refused():
    """ddad's first stage scores with its autoencoders' initial map, its second with the
    refinement net's probability: not one quantity to average."""
    members = []
    for stage in (0, 1):
        config = resolve_config("ddad", "tiny")
        member = create_method(config.with_preprocessing(decide_preprocessing(config.run)))
        member.stage = stage
        members.append(member)
    with pytest.raises(ValueError, match=r"ensemble members ddad-0.pt and ddad-1.pt disagree on stage: 0 vs 1"):
        SeedEnsemble(members, ["ddad-0.pt", "ddad-1.pt"])
    members[1].stage = 0
    SeedEnsemble(members, ["ddad-0.pt", "ddad-1.pt"])  # one stage: accepted


def read_scores(out: Path) -> list[tuple[str, float]]:
    with (out / "scores.csv").open() as f:
        return [(row["path"], float(row["score"])) for row in csv.DictReader(f)]


def test_predict_ensemble_on_images(runs, data, tmp_path, capsys):
    paths = runs["frequency_aware"]
    images = [str(p) for p in sorted((data / "test").rglob("img/*.png"))]
    out = tmp_path / "out"
    # the inputs before --ensemble, whose runs end at the next option
    assert cli(["predict", *images, "--ensemble", *map(str, paths), "--out", str(out), "--no-progress",
                "--batch-size", "3", "--device", "cpu"]) == 0
    got = read_scores(out)
    assert [p for p, _ in got] == images
    _, expected = score_images(load_ensemble(paths)[0], load_split(data, "test", size=32).images)
    assert all(math.isclose(a, float(b), abs_tol=2e-6) for (_, a), b in zip(got, expected))
    summary = json.loads((out / "scores.json").read_text())
    assert summary["checkpoint"] == [str((p / "checkpoint.pt").resolve()) for p in paths]
    # no checkpoint and no --ensemble: named
    assert cli(["predict", images[0], "--out", str(tmp_path / "none")]) == 2
    assert "no INPUT" in capsys.readouterr().err
    # refusals reach the command line named
    assert cli(["predict", images[0], "--ensemble", str(paths[0]), str(runs["ae"][0]), "--out",
                str(tmp_path / "mixed"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "disagree on method" in err and str(runs["ae"][0]) in err


def test_predict_ensemble_writes_the_mean_of_the_members_volume_maps(runs, tmp_path, capsys):
    """``predict --ensemble`` on a CT volume: its NIfTI map is the mean of the maps
    ``predict`` writes with each member alone."""
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    hu, liver = liver_phantom((40, 36, 8), 2, (20, 18, 4))
    scan = write_nifti(tmp_path / "in" / "scan.nii.gz", hu, affine)
    mask = write_nifti(tmp_path / "in" / "mask.nii.gz", liver, affine, dtype=np.uint8)
    paths = runs["ae"]  # residual maps: the seeds differ visibly

    def predict(out: Path, *scorer: str) -> dict:
        assert cli(["predict", *scorer, str(scan), "--liver-mask", str(mask), "--out", str(out), "--no-progress",
                    "--batch-size", "3", "--device", "cpu"]) == 0
        return json.loads((out / "scores.json").read_text())

    member_maps = []
    for i, path in enumerate(paths):
        predict(tmp_path / f"member{i}", str(path))
        member_maps.append(nib.load(tmp_path / f"member{i}" / "scan_anomaly.nii.gz").get_fdata(dtype=np.float32))
    # the inputs after the runs: --out ends --ensemble
    summary = predict(tmp_path / "ensemble", "--ensemble", *map(str, paths), "--out", str(tmp_path / "ensemble"))
    ensemble_map = nib.load(tmp_path / "ensemble" / "scan_anomaly.nii.gz").get_fdata(dtype=np.float32)
    # the members differ far beyond the tolerance (about 1e-4 after one tiny epoch), so a
    # member's map alone would fail the mean's check
    assert np.abs(member_maps[0] - member_maps[1]).max() > 10 * MEAN_TOLERANCE
    assert np.abs(ensemble_map - (member_maps[0] + member_maps[1]) / 2).max() <= MEAN_TOLERANCE
    assert summary["checkpoint"] == [str((p / "checkpoint.pt").resolve()) for p in paths]
    assert summary["threshold"] is None  # an ensemble has no calibrated operating point
    assert "an ensemble has no calibrated operating point" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
@pytest.mark.parametrize("name", list(SEEDS))
def test_the_exported_ensemble_is_the_eager_ensemble(name, fmt, runs, test_images, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    paths = runs[name]
    out = tmp_path / f"ensemble.{fmt}"
    assert cli(["export", "--ensemble", *map(str, paths), "--format", fmt, "--out", str(out)]) == 0
    exported = load_scorer(out)
    ensemble, _ = load_ensemble(paths, amp=False)
    assert isinstance(exported, ExportedModel) and exported.config == ensemble.config
    for images in (fresh_images(), test_images):
        eager_maps, eager_scores = score_images(ensemble, images, batch_size=3)
        maps, scores = score_images(exported, images, batch_size=3)
        difference = (maps - eager_maps).abs().max()
        assert difference <= EXPORT_TOLERANCE
        assert (scores - eager_scores).abs().max() <= EXPORT_TOLERANCE
    # the file is the ensemble, not its first member: far nearer the one than the other
    first_maps, _ = score_images(load_method(paths[0])[0], test_images)
    assert (maps - first_maps).abs().max() > 10 * difference


def test_export_takes_a_checkpoint_or_an_ensemble(runs, tmp_path, capsys):
    run = runs["ae"][0]
    out = str(tmp_path / "m.pt2")
    assert cli(["export", "--format", "pt2", "--out", out]) == 2
    assert "pass a CKPT or --ensemble RUN..., not neither" in capsys.readouterr().err
    assert cli(["export", str(run), "--ensemble", str(runs["ae"][1]), "--format", "pt2", "--out", out]) == 2
    assert "not both" in capsys.readouterr().err


def test_evaluate_ensemble_scores_the_mean_map(runs, data, tmp_path, capsys):
    members = runs["frequency_aware"]
    out = tmp_path / "eval"
    assert cli(["evaluate", "--ensemble", *map(str, members), "--data", str(data), "--out", str(out),
                "--no-progress", "--device", "cpu", "--cases", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scorer"] == "ensemble" and metrics["checkpoint"] == [str(p.resolve() / "checkpoint.pt")
                                                                         for p in members]
    # the slice scores are the ensemble's, scored here through the library
    ensemble, _ = load_ensemble(members)
    with open(out / "scores.csv") as table:
        written = np.array([float(row["score"]) for row in csv.DictReader(table)])
    images = load_split(data, "test", size=32)
    np.testing.assert_allclose(written, score_images(ensemble, images.images)[1].numpy(), rtol=0, atol=1e-6)
    # the default folder sits beside the first run and names the ensemble
    assert cli(["evaluate", "--ensemble", *map(str, members), "--data", str(data), "--no-progress",
                "--device", "cpu", "--cases", "0"]) == 0
    assert (members[0].parent / f"{members[0].name}-ensemble3-eval-test" / "metrics.json").is_file()


def test_ensemble_spread_scores_subsets_as_evaluate_does(runs, data, tmp_path):
    """benchmarks/ensemble_spread.py's metrics of a pool's subsets are evaluate's, bit for
    bit: the 3-run ensemble's (``evaluate --ensemble``) and each run's own."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ensemble_spread

    members = runs["frequency_aware"]
    table = tmp_path / "subsets.json"
    assert ensemble_spread.main(["--data", str(data), "--sizes", "1,3", "--json", str(table),
                                 *map(str, members)]) == 0
    found = json.loads(table.read_text())
    keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "aupro_0.3", "best_dice")
    for subset, scorer in [(found["3"][0], ["--ensemble", *map(str, members)])] + \
            [(found["1"][i], [str(run)]) for i, run in enumerate(members)]:
        out = tmp_path / f"eval-{len(subset['members'])}-{Path(subset['members'][0]).name}"
        assert cli(["evaluate", *scorer, "--data", str(data), "--out", str(out), "--no-progress", "--device",
                    "cpu", "--cases", "0"]) == 0
        evaluated = json.loads((out / "metrics.json").read_text())
        assert {k: subset[k] for k in keys} == {k: evaluated[k] for k in keys}, subset["members"]
    with pytest.raises(SystemExit):  # a size larger than the pool
        ensemble_spread.main(["--data", str(data), "--sizes", "4", *map(str, members)])


def test_evaluate_refuses_an_ensemble_with_calibrate_or_a_checkpoint(runs, data, tmp_path, capsys):
    members = [str(p) for p in runs["ae"]]
    assert cli(["evaluate", "--ensemble", *members, "--data", str(data), "--calibrate", "--out",
                str(tmp_path / "a"), "--device", "cpu"]) == 2
    assert "--calibrate with --ensemble" in capsys.readouterr().err
    assert cli(["evaluate", members[0], "--ensemble", *members, "--data", str(data), "--device", "cpu"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli(["evaluate", "--data", str(data), "--device", "cpu"]) == 2
    assert "RUN_OR_CKPT, or --ensemble" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
