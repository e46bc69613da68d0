"""Liver-box cropping (medad_fast.data.crop): the box, the round trip of a lesion through crop
and paste-back, empty livers, per-volume boxes, and cropping in training, evaluate, predict and
the CT volume path (tiny phantoms and synthetic volumes, CPU, one thread)."""

from __future__ import annotations

import json
import math
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from medad_fast import train as train_module
from medad_fast.config import Config
from medad_fast.data.bmad import load_split
from medad_fast.data.crop import (MIN_BOX_FRACTION, Box, EmptyLiverWarning, MaskCheck, check_liver_masked,
                                  choose_crop, crop_to_box, group_boxes, is_liver_masked, liver_box, liver_extent,
                                  paste_back, paste_back_each, resolve_crop, slice_is_liver_masked,
                                  square_box)
from medad_fast.data.dataset import BmadSliceDataset, ImageFileDataset
from medad_fast.data.phantom import write_phantom_dataset
from medad_fast.io import save_png
from medad_fast.methods import config_from_dict, method_names, resolve_config
from medad_fast.train import TrainingInterrupted, train

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = dict(progress=False, log=lambda message: None)
SIDE = 96  # the small preset's side: the case of the issue (512 px slices, a ~250 px liver)


def liver_slice(shape=(512, 512), centre=(300, 200), radii=(110, 130), lesion=(330, 250)) -> np.ndarray:
    """float32 ``shape``: an elliptical liver (0.5, exactly 0 outside) with a bright Gaussian
    lesion (peak 1.0, sigma 3 px) centred at pixel ``lesion``."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float32)
    inside = ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1
    image = np.where(inside, 0.5, 0.0).astype(np.float32)
    blob = np.exp(-((yy - lesion[0]) ** 2 + (xx - lesion[1]) ** 2) / (2 * 3.0 ** 2)).astype(np.float32)
    return np.where(inside, np.maximum(image, blob), 0.0)


# ----------------------------------------------------------------------------- the box

def test_the_box_is_square_holds_the_liver_with_a_margin_and_stays_inside():
    liver = liver_slice() > 0
    extent = liver_extent(liver)
    assert extent == Box(190, 70, 221, 261)  # rows 190..410, cols 70..330
    box = liver_box(liver)
    assert box.height == box.width == math.ceil(1.2 * 261)
    assert box.top <= extent.top and box.bottom >= extent.bottom
    assert box.left <= extent.left - 26 and box.right >= extent.right + 26  # the margin on the long side
    assert 0 <= box.top and box.bottom <= 512 and 0 <= box.left and box.right <= 512
    # at the image's edge the box is shifted inside, not cut
    corner_liver = liver_slice(centre=(120, 400), radii=(110, 130), lesion=(120, 400)) > 0
    corner, corner_extent = liver_box(corner_liver), liver_extent(corner_liver)
    assert corner_extent.right == 512 and corner_extent.width == 242
    assert corner.right == 512 and corner.top == 0 and corner.height == corner.width == math.ceil(1.2 * 242)
    # a liver filling the image: the box is the whole image, never larger
    assert square_box(Box(0, 0, 64, 64), (64, 64)) == Box(0, 0, 64, 64)
    # [N, H, W]: one box for the union of the slices
    two = np.zeros((2, 50, 50), bool)
    two[0, 10:20, 10:20] = two[1, 30:40, 30:40] = True
    assert liver_extent(two) == Box(10, 10, 30, 30)


def test_a_sliver_of_liver_gets_the_smallest_box_centred_and_clipped(tmp_path):
    assert MIN_BOX_FRACTION == 0.5
    sliver = Box(250, 250, 4, 10)  # the liver's tip, a few pixels
    assert square_box(sliver, (512, 512), min_fraction=0.0).height == 12  # unbounded: 12 px magnified to the input
    assert square_box(sliver, (512, 512)) == Box(250 + (4 - 256) // 2, 250 + (10 - 256) // 2, 256, 256)  # centred
    assert square_box(Box(2, 500, 4, 10), (512, 512)) == Box(0, 256, 256, 256)  # clipped into the slice
    assert square_box(sliver, (512, 300)).height == 256  # the slice's longer side
    large = Box(190, 70, 221, 261)  # a mid-liver slice: its own box, unchanged
    assert square_box(large, (512, 512)) == square_box(large, (512, 512), min_fraction=0.0)
    # one function for training and scoring: a dataset's box of a sliver slice is the bound's
    image = np.zeros((64, 64), np.float32)
    image[30:32, 40:45] = 0.5
    assert liver_box(image > 0) == Box(30 + (2 - 32) // 2, 40 + (5 - 32) // 2, 32, 32)
    box = ImageFileDataset([save_png(tmp_path / "sliver.png", image)], size=32, crop=True)[0].box
    assert box == liver_box(image > 0).rescaled((64, 64), (32, 32)) and box.height == 16


@pytest.mark.parametrize("lesion, centre, radii", [
    ((330, 250), (300, 200), (110, 130)),  # a liver box of ~310 px in the middle of the slice
    ((230, 130), (300, 200), (110, 130)),  # near the liver's edge
    ((70, 470), (60, 450), (50, 55)),  # a liver in the corner: the box is shifted inside the slice
])
def test_a_lesion_comes_back_at_its_pixel(lesion, centre, radii):
    image = liver_slice(centre=centre, radii=radii, lesion=lesion)
    box = liver_box(image > 0)
    crop = crop_to_box(torch.from_numpy(image)[None, None], box, SIDE)
    assert crop.shape == (1, 1, SIDE, SIDE)
    # the "map" of an identity model: the crop itself, pasted back into the 512 x 512 slice
    back = paste_back(crop[:, 0], box, image.shape)
    assert back.shape == (1, 512, 512)
    peak = np.unravel_index(int(back[0].argmax()), image.shape)
    tolerance = math.ceil(box.height / SIDE) + 1  # one model pixel covers box / side slice pixels
    assert abs(peak[0] - lesion[0]) <= tolerance and abs(peak[1] - lesion[1]) <= tolerance, (peak, lesion, box)
    # outside the box: the map's minimum (here 0, the background)
    outside = torch.ones(512, 512, dtype=torch.bool)
    outside[max(box.top, 0):box.bottom, max(box.left, 0):box.right] = False
    assert (back[0][outside] == crop.min()).all()
    # cropping magnifies: the lesion covers more model pixels than with the whole slice resized
    whole = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None], size=SIDE, mode="area")
    assert (crop > 0.75).sum() > (whole > 0.75).sum()


def test_a_box_past_the_border_is_padded_and_pasted_back():
    # a non-square slice filled by its liver: the square box is wider than the slice
    image = torch.rand(1, 1, 100, 60) + 0.1
    box = liver_box(image[0, 0] > 0)
    assert box.height == box.width == 100 and box.left == -20
    crop = crop_to_box(image, box, 50)
    assert crop.shape == (1, 1, 50, 50)
    assert (crop[..., :, :9] == 0).all() and (crop[..., :, 41:] == 0).all()  # the padding
    back = paste_back(crop[:, 0], box, (100, 60), fill=0.0)
    assert back.shape == (1, 100, 60)
    # as the slice itself shrunk and grown back, but at its edge columns, which the bilinear
    # enlargement blends with the padding
    expected = torch.nn.functional.interpolate(torch.nn.functional.interpolate(image, size=(50, 30), mode="area"),
                                               size=(100, 60), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(back[..., 1:-1], expected[..., 1:-1], atol=1e-5)


def test_paste_back_each_puts_every_map_into_its_own_box():
    maps = torch.rand(3, 16, 16)
    boxes = [Box(0, 0, 20, 20), Box(5, 7, 30, 30), Box(-4, 10, 40, 40)]
    each = paste_back_each(maps, boxes, (40, 48))
    assert each.shape == (3, 40, 48)
    for i, box in enumerate(boxes):
        assert torch.equal(each[i:i + 1], paste_back(maps[i:i + 1], box, (40, 48)))
    assert paste_back_each(maps[:0], [], (40, 48)).shape == (0, 40, 48)
    with pytest.raises(ValueError, match="3 maps but 2 boxes"):
        paste_back_each(maps, boxes[:2], (40, 48))


def test_box_rescaled_into_the_model_sized_slice():
    box = Box(100, 50, 256, 256)
    assert box.rescaled((512, 512), (96, 96)) == Box(19, 9, 48, 48)
    assert Box(0, 0, 1, 1).rescaled((512, 512), (32, 32)) == Box(0, 0, 1, 1)  # never empty


# ----------------------------------------------------------------------------- empty livers

def test_an_empty_liver_keeps_the_whole_slice_with_a_message_naming_it():
    assert liver_box(np.zeros((40, 40), bool)) is None
    with pytest.warns(EmptyLiverWarning, match=r"slice-7\.png: no liver pixel \(nothing > 0\) to crop to; "
                                               r"using the whole slice"):
        boxes = group_boxes([None, Box(5, 5, 10, 10)], [(40, 30), (40, 40)], ["a", "b"], ["slice-7.png", "x"])
    assert boxes[0] == Box(0, 0, 40, 30) and boxes[1].height == 20  # 12 px raised to the smallest box
    # a slice without liver in a volume that has some takes the volume's box, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        boxes = group_boxes([None, Box(5, 5, 10, 10)], [(40, 40)] * 2, ["v", "v"], ["v_0000.png", "v_0001.png"])
    assert boxes[0] == boxes[1]


def test_an_empty_slice_in_a_dataset_is_scored_whole(tmp_path):
    save_png(tmp_path / "empty.png", np.zeros((64, 64), np.float32))
    save_png(tmp_path / "liver.png", liver_slice((64, 64), (40, 30), (12, 14), (40, 30)))
    dataset = ImageFileDataset([tmp_path / "empty.png", tmp_path / "liver.png"], size=32, crop=True)
    with pytest.warns(EmptyLiverWarning, match="empty.png"):
        record = dataset[0]
    assert record.box == Box(0, 0, 32, 32) and torch.equal(record.crop, record.image)
    assert dataset[1].box.height < 32


# ----------------------------------------------------------------------------- datasets

def test_slices_of_one_volume_share_a_box_and_load_split_matches_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    small = liver_slice((128, 128), (50, 50), (15, 18), (50, 50))
    large = liver_slice((128, 128), (70, 60), (40, 45), (70, 60))
    for name, image in (("p1_0000", small), ("p1_0001", large), ("lone", small)):
        save_png(root / "train" / "good" / f"{name}.png", image)
    dataset = BmadSliceDataset(root, "train", size=32, crop=True)
    names = [Path(p).stem for p in dataset.paths]
    records = {name: dataset[i] for i, name in enumerate(names)}
    assert records["p1_0000"].box == records["p1_0001"].box  # the volume's box: the union
    assert records["lone"].box.height < records["p1_0000"].box.height  # a lone slice: its own
    assert dataset.crop_box(names.index("p1_0000")) == liver_box(np.stack([small, large]) > 0)
    loaded = load_split(root, "train", size=32, crop=True)
    assert torch.equal(loaded.images, torch.stack([dataset[i].crop for i in range(len(dataset))]))
    assert torch.equal(load_split(root, "train", size=32, crop=True).images, loaded.images)  # from the cache
    assert not torch.equal(load_split(root, "train", size=32).images, loaded.images)  # a different cache entry


# ----------------------------------------------------------------------------- the setting

def masked_slices(count: int, shape=(64, 64)) -> list[np.ndarray]:
    """``count`` liver-masked slices (elliptical livers at varied places, 0 outside)."""
    return [liver_slice(shape, (20 + 3 * i, 24 + 2 * i), (10 + i % 4, 14), (20 + 3 * i, 24 + 2 * i))
            for i in range(count)]


def natural_slices(count: int, shape=(64, 64)) -> list[np.ndarray]:
    """``count`` natural-background images: a bright disc on a dark, noisy background where
    most (70 %) but not all of the background pixels are exactly 0, as an 8-bit MRI export."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    out = []
    for i in range(count):
        disc = (yy - 30 - i) ** 2 + (xx - 32) ** 2 <= 14 ** 2
        noise = np.where(rng.random(shape) < 0.7, 0, rng.integers(1, 4, shape)) / 255.0
        out.append(np.where(disc, 0.6, noise).astype(np.float32))
    return out


def write_train_folder(root: Path, slices: list[np.ndarray]) -> Path:
    for i, image in enumerate(slices):
        save_png(root / "train" / "good" / f"s{i:03d}.png", image)
    return root


def test_a_slice_is_liver_masked_when_0_surrounds_one_foreground():
    assert slice_is_liver_masked(liver_slice())  # one liver, 0 around it
    assert not slice_is_liver_masked(np.zeros((64, 64)))  # nothing > 0
    assert not slice_is_liver_masked(np.full((64, 64), 0.5))  # a foreground filling the slice
    assert not slice_is_liver_masked(natural_slices(1)[0])  # exact zeros scattered through noise
    two = np.zeros((64, 64))
    two[5:20, 5:20] = two[40:55, 40:55] = 0.5
    assert not slice_is_liver_masked(two)  # two pieces of equal size are not one foreground
    two[40:55, 40:55] = 0.0
    two[40:42, 40:42] = 0.5
    assert slice_is_liver_masked(two)  # a speck beside the liver (a cut-off lobe) is allowed


def test_auto_crops_liver_masked_and_prepared_data_and_not_natural_images(tmp_path, data):
    choice = choose_crop("auto", data)  # the phantom: 0 outside its liver
    assert choice.crop == "liver" and choice.reason.startswith("16 of 16 sampled training slices of ")
    assert choice.reason.endswith(": liver-masked") and is_liver_masked(data)
    natural = write_train_folder(tmp_path / "natural", natural_slices(8))
    choice = choose_crop("auto", natural)
    assert choice.crop == "none" and "0 of 8 sampled" in choice.reason and "not liver-masked" in choice.reason
    # a few natural images among liver-masked ones: still liver-masked at 90 %, not below it
    mixed = write_train_folder(tmp_path / "mixed", masked_slices(18) + natural_slices(2))
    assert check_liver_masked(mixed) == MaskCheck(str(mixed), 20, 18) and resolve_crop("auto", mixed) == "liver"
    mixed3 = write_train_folder(tmp_path / "mixed3", masked_slices(17) + natural_slices(3))
    assert resolve_crop("auto", mixed3) == "none"
    # a larger folder: a seeded sample of MASK_CHECK_SAMPLE slices, the same each time
    many = write_train_folder(tmp_path / "many", masked_slices(70))
    assert check_liver_masked(many).sampled == 64 == check_liver_masked(many, seed=0).sampled
    # no data, no training split: nothing to crop to
    assert resolve_crop("auto", None) == "none"
    assert choose_crop("auto", tmp_path / "missing").reason.startswith("no training slices to look at (")
    # prepare's folders crop from their manifest alone
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "manifest.json").write_text(json.dumps({"generator": "medad_fast.prepare"}))
    choice = choose_crop("auto", prepared)
    assert choice.crop == "liver" and "written by medad-fast prepare" in choice.reason
    assert resolve_crop("none", prepared) == "none" and resolve_crop("liver", natural) == "liver"


def test_old_runs_read_as_whole_slices():
    with pytest.raises(ValueError, match="crop"):
        resolve_config("ae", "tiny", crop="box")
    saved = resolve_config("ae", "tiny").to_dict()
    del saved["run"]["crop"]  # a config.json written before cropping existed
    assert config_from_dict(saved).run.crop == "none"


# ----------------------------------------------------------------------------- training and scoring

@pytest.fixture(scope="module")
def small_liver(tmp_path_factory):
    """A phantom whose liver box is about half the slice (256 px slices; the tiny preset's side is 32)."""
    root = tmp_path_factory.mktemp("small-liver")
    write_phantom_dataset(root, n_train=12, n_test=6, n_valid=4, size=256, seed=5, progress=False, liver_scale=0.65)
    return root


def test_cropping_shows_the_model_the_lesions_at_a_larger_scale(small_liver):
    # Why --crop helps on small-liver data (the small-data table in docs/results.md): at the
    # model's side a test lesion covers about (slice / liver box)^2 times more input pixels.
    # The twin, the whole slice resized (crop off), is what the model sees without it.
    from medad_fast.data.dataset import BmadSliceDataset

    side = 96
    cropped = BmadSliceDataset(small_liver, "test", size=side, crop=True)
    whole_slice = BmadSliceDataset(small_liver, "test", size=side, crop=False)
    ratios = []
    for index in range(len(cropped)):
        record, plain = cropped[index], whole_slice[index]
        if plain.label:
            assert record.crop_mask is not None and plain.crop_mask is None
            ratios.append(int(record.crop_mask.sum()) / max(int(plain.mask.sum()), 1))
    assert ratios, "the fixture has no test lesion"
    assert min(ratios) > 2.0, ratios  # measured 2.9-3.5x on this fixture


def crop_config(data: Path, method: str = "frequency_aware", **settings) -> Config:
    return resolve_config(method, "tiny", data=str(data), seed=2, crop="liver", **settings)


def test_train_with_crop_auto_says_what_it_chose_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    for name, slices, chosen in (("masked", masked_slices(6), "liver"), ("natural", natural_slices(6), "none")):
        folder = write_train_folder(tmp_path / name, slices)
        said = []
        config = resolve_config("ae", "tiny", data=str(folder), epochs=1, seed=2)
        assert config.run.crop == "auto"
        train(config, tmp_path / f"run-{name}", progress=False, log=said.append)
        expected = f"--crop auto -> {chosen}: {check_liver_masked(folder).describe()}"
        assert expected in said, said
        saved = json.loads((tmp_path / f"run-{name}" / "config.json").read_text())
        assert saved["run"]["crop"] == saved["preprocessing"]["crop"] == chosen
        started, = [line for line in said if line.startswith("training ")]
        assert ("cropped to the liver box" in started) == (chosen == "liver")
    # a crop given on the command line is not looked into, nor said
    said = []
    train(resolve_config("ae", "tiny", data=str(tmp_path / "masked"), epochs=1, seed=2, crop="none"),
          tmp_path / "run-none", progress=False, log=said.append)
    assert not any(line.startswith("--crop auto") for line in said)


def test_a_cropped_run_evaluates_and_predicts_on_whole_slices(small_liver, tmp_path, monkeypatch):
    from medad_fast.cli import main as cli
    from medad_fast.evaluate import evaluate
    from medad_fast.inference import load_method, score_dataset
    from medad_fast.predict import predict

    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert cli(["train", "--data", str(small_liver), "--out", str(run), "--preset", "tiny", "--epochs", "1",
                "--crop", "liver", "--no-progress", "--device", "cpu"]) == 0
    assert json.loads((run / "config.json").read_text())["run"]["crop"] == "liver"
    method, _ = load_method(run)
    dataset = BmadSliceDataset(small_liver, "test", size=32, crop=True)
    for batch, maps, scores in score_dataset(method, dataset, batch_size=4):
        # the maps cover the whole slices (at the model's side, as the masks the metrics use)
        assert maps.shape == batch.masks[:, 0].shape == (len(batch), 32, 32) and scores.shape == (len(batch),)
        assert batch.crops.shape == batch.images.shape
        assert all(box.height < 32 for box in batch.boxes)  # the liver is about half the slice
    metrics = evaluate(run, small_liver, out=tmp_path / "eval", progress=False, n_cases=1)
    assert metrics["crop"] == "liver" and metrics["n_images"] == 6
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_ap"] <= 1.0
    rows = predict(run, sorted((small_liver / "test").rglob("img/*.png"))[:2], tmp_path / "pred", progress=False)
    assert len(rows) == 2 and json.loads((tmp_path / "pred" / "scores.json").read_text())["crop"] == "liver"


def test_a_volume_lesion_comes_back_at_its_voxel_with_cropping(tmp_path, monkeypatch):
    from ct_data import identity_maps, liver_phantom, write_nifti
    from medad_fast.checkpoint import checkpoint_bytes
    from medad_fast.methods import create_method
    from medad_fast.cli.predict import main as predict_main, add_arguments
    import argparse
    import nibabel as nib

    identity_maps(monkeypatch)
    config = resolve_config("ae", "tiny", image_size=32, crop="liver")
    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(checkpoint_bytes({"method": "ae", "config": config.to_dict(),
                                             "model": create_method(config).state_dict(), "method_state": {}}))
    # a 128 x 128 slice grid with a liver of ~54 x 54 px: cropping magnifies it ~2x
    hu, liver = liver_phantom((128, 128, 8), 2, (60, 70, 4))
    liver &= (np.abs(np.arange(128) - 63.5) < 27)[:, None, None] & (np.abs(np.arange(128) - 63.5) < 27)[None, :, None]
    hu[~liver] = -1000.0
    scan = write_nifti(tmp_path / "ct.nii.gz", hu, np.eye(4))
    mask = write_nifti(tmp_path / "liver.nii.gz", liver, np.eye(4), dtype=np.uint8)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    assert predict_main(parser.parse_args([str(checkpoint), str(scan), "--liver-mask", str(mask), "--out", str(out),
                                           "--no-progress"])) == 0
    anomaly = np.asarray(nib.load(str(out / "ct_anomaly.nii.gz")).dataobj)
    assert anomaly.shape == hu.shape
    peak = np.unravel_index(int(anomaly.argmax()), anomaly.shape)
    assert peak[2] == 4 and abs(peak[0] - 60) <= 2 and abs(peak[1] - 70) <= 2, peak
    assert (anomaly[~liver] == 0).all()


@pytest.mark.parametrize("name", method_names())
def test_training_with_cropping_resumes_bitwise(name, small_liver, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    settings = dict(epochs=2, val_fraction=0.25)
    if name == "ddad":  # its unlabeled slices are read cropped too
        settings["unlabeled_split"] = "valid"
    train(crop_config(small_liver, name, **settings), tmp_path / "straight", deterministic=True, **QUIET)
    run = tmp_path / "interrupted"
    original = train_module.Trainer.train_step

    def train_step(self, batch_index):
        result = original(self, batch_index)
        if self.state.step == 3:  # inside epoch 2 (9 training slices, batch 4: 2 steps per epoch)
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(train_module.Trainer, "train_step", train_step)
    with pytest.raises(TrainingInterrupted):
        train(crop_config(small_liver, name, **settings), run, deterministic=True, **QUIET)
    monkeypatch.setattr(train_module.Trainer, "train_step", original)
    train(crop_config(small_liver, name, **settings), run, resume=True, deterministic=True, **QUIET)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"]) == (2, 4)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), f"{name}: weights differ"
    assert a["method_state"] == b["method_state"]
    # and the crop changed what was trained on
    train(resolve_config(name, "tiny", data=str(small_liver), seed=2, crop="none", **settings),
          tmp_path / "whole", deterministic=True, **QUIET)
    c = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])


def test_ddad_reads_its_unlabeled_slices_cropped_too(small_liver, tmp_path, monkeypatch):
    from medad_fast.methods import create_method
    from medad_fast.train import supply_training_data

    monkeypatch.setenv("MEDAD_FAST_CACHE", str(tmp_path / "cache"))
    config = crop_config(small_liver, "ddad", unlabeled_split="valid", unlabeled=str(small_liver / "valid" / "good"))
    method = create_method(config)
    supply_training_data(method, None)  # what the engine hands DDAD
    images = method.unlabeled_images
    valid = load_split(small_liver, "valid", size=32, crop=True).images
    folder = ImageFileDataset(sorted((small_liver / "valid" / "good").rglob("*.png")), size=32, crop=True)
    assert torch.equal(images, torch.cat([torch.stack([folder[i].crop for i in range(len(folder))]), valid]))
