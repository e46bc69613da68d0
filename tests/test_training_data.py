"""The training data by index (medad_fast.data.training_slices): a slice read alone equals
the same slice of the whole split bitwise (cropped too), the selections are index operations
that give what the full loading gives, a trainer that reads its epoch's share ends in the
same weights as one that holds every image; and a method's declared data (the whole normal
pool, an unlabeled pool) is read by the engine and handed to it, with errors naming the
setting. The 2-process share loading is tests/test_distributed.py's."""

from __future__ import annotations

import shutil

import pytest
import torch

from medad_fast.data.bmad import load_split
from medad_fast.data.dataset import read_slice
from medad_fast.data.training_slices import TrainingSlices
from medad_fast.methods import create_method, get_method, resolve_config
from medad_fast.methods.base import NormalImages, UnlabeledImages
from medad_fast.runtime import deterministic_mode
from medad_fast.train import (Trainer, load_training_images, select_training_slices, supply_training_data,
                              training_slices)
from medad_fast.validation import held_back_mask, split_validation

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


@pytest.mark.parametrize("crop", [False, True])
def test_a_slice_read_alone_equals_the_whole_split_bitwise(data, crop):
    slices = TrainingSlices(data, 32, crop=crop)
    whole = load_split(data, "train", size=32, crop=crop)
    assert len(slices) == 16 and slices.paths == whole.paths
    positions = torch.tensor([5, 0, 15, 5])
    assert torch.equal(slices.read(positions), whole.images[positions])
    view = slices.subset(torch.tensor([3, 9, 1]))
    assert view.paths == [whole.paths[i] for i in (3, 9, 1)]
    assert torch.equal(view.read(torch.tensor([2, 0])), whole.images[torch.tensor([1, 3])])
    assert torch.equal(view.read_all(), whole.images[torch.tensor([3, 9, 1])])
    assert torch.equal(slices.empty_flags(), torch.zeros(16, dtype=torch.bool))


def test_selections_by_index_give_what_the_full_loading_gives(data, tmp_path):
    # an all-black slice, left out; a subset of 10; a quarter held back
    root = tmp_path / "data"
    shutil.copytree(data, root)
    first = sorted((root / "train" / "good").glob("*.png"))[2]
    from PIL import Image
    Image.new("L", Image.open(first).size).save(first)
    config = resolve_config("ae", "tiny", data=str(root), skip_empty_slices=True, max_train_images=10)
    with pytest.warns(UserWarning, match="1 of 16 training slices"):
        full = load_training_images(config)
    slices = training_slices(config)
    with pytest.warns(UserWarning, match="1 of 16 training slices"):
        usable = select_training_slices(config, slices)  # the flags from reads of single slices
    assert full.shape[0] == len(usable) == 10 and 2 not in usable.chosen.tolist()
    assert torch.equal(usable.read(torch.arange(10)), full)
    held = held_back_mask(10, 0.25, config.run.seed)
    train_images, held_back = split_validation(full, 0.25, config.run.seed)
    assert torch.equal(usable.subset(~held).read(torch.arange(int((~held).sum()))), train_images)
    assert torch.equal(usable.subset(held).read(torch.arange(int(held.sum()))), held_back)


def test_a_trainer_reading_its_share_each_epoch_ends_in_the_same_weights(data):
    config = resolve_config("ae", "tiny", data=str(data), seed=3, epochs=2, max_train_images=14, batch_size=4)
    slices = select_training_slices(config, training_slices(config))
    weights = []
    for images in (load_training_images(config), slices):
        with deterministic_mode(True, CPU):
            trainer = Trainer(create_method(config), images, CPU)
            held = []
            for _ in range(config.run.epochs):
                trainer.train_epoch()
                held.append(trainer.resident_images)
        weights.append([p.detach().clone() for p in trainer.method.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights)), "reading the share changed the weights"
    assert trainer.slices is not None and held == [12, 12]  # 3 full batches of 4 of the 14 images
    missing = int(torch.nonzero(trainer.slot < 0)[0])
    with pytest.raises(RuntimeError, match=rf"images \[{missing}\] are not held"):
        trainer.train_step(torch.tensor([missing]))


class PoolHungry(get_method("ae")):
    """An autoencoder that declares it needs the whole normal pool and an unlabeled folder."""

    def training_data(self):
        return {"everything": NormalImages(), "extra": UnlabeledImages(folder=self.config.run.anomaly_source)}

    def attach_training_data(self, data):
        self.received = data


def test_the_engine_reads_what_a_method_declares_and_hands_it_over(data, tmp_path):
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    for path in sorted((data / "test").rglob("img/*.png"))[:3]:
        shutil.copy(path, folder / f"{path.parent.parent.name}-{path.name}")
    # the folder travels in an unrelated setting of the config: the method names it (whole
    # slices: the expected images below are read uncropped)
    config = resolve_config("ae", "tiny", data=str(data), anomaly_source=str(folder), crop="none")
    slices = select_training_slices(config, training_slices(config))
    trainer = Trainer(PoolHungry(config), slices, CPU)
    received = trainer.method.received
    assert set(received) == {"everything", "extra"}
    # the whole normal pool, held (not read per epoch) because the method asked for it
    assert trainer.slices is None and received["everything"] is trainer.images
    assert torch.equal(received["everything"], load_training_images(config))
    expected = torch.stack([read_slice(path, None, 32)[0] for path in sorted(folder.iterdir())])
    assert received["extra"].shape == (3, 1, 32, 32) and torch.equal(received["extra"], expected)


def test_a_missing_declared_folder_is_an_error_naming_the_setting(data, tmp_path):
    missing = tmp_path / "nowhere"
    config = resolve_config("ae", "tiny", data=str(data), anomaly_source=str(missing))
    with pytest.raises(FileNotFoundError, match=rf"unlabeled='{missing}' \(--unlabeled\): folder not found"):
        Trainer(PoolHungry(config), load_training_images(config), CPU)
    ddad = create_method(resolve_config("ddad", "tiny", data=str(data), unlabeled=str(missing)))
    with pytest.raises(FileNotFoundError, match=r"--unlabeled\): folder not found"):
        supply_training_data(ddad, None)


def test_ddad_gets_its_unlabeled_pool_from_the_engine(data):
    config = resolve_config("ddad", "tiny", data=str(data), unlabeled_split="test", crop="none")
    trainer = Trainer(create_method(config), load_training_images(config), CPU)
    method = trainer.method
    assert torch.equal(method.unlabeled_images, load_split(data, "test", size=32).images)
    assert method.normal_pool is trainer.images and method.union_pool.shape[0] == 16 + 8
    # --crop auto crops the phantom's liver-masked slices: the unlabeled pool is cut as the
    # training slices are
    cropped = resolve_config("ddad", "tiny", data=str(data), unlabeled_split="test")
    method = Trainer(create_method(cropped), load_training_images(cropped), CPU).method
    assert torch.equal(method.unlabeled_images, load_split(data, "test", size=32, crop=True).images)
    assert not torch.equal(method.unlabeled_images, load_split(data, "test", size=32).images)


def test_a_method_asking_for_something_unknown_is_refused(data):
    class Odd(get_method("ae")):
        def training_data(self):
            return {"labels": "the test masks"}

    config = resolve_config("ae", "tiny", data=str(data))
    with pytest.raises(TypeError, match="Odd.training_data.*'labels'"):
        supply_training_data(Odd(config), None)
