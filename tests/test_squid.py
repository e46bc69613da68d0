"""SQUID (Xiang et al., CVPR 2023): the memory queue (FIFO order, wrap-around, shrinkage
attention, reading back what it holds), the patch grid, the two adversaries' gradients
reaching only their own parameters, identical queues on 2 DDP ranks, and a brief
end-to-end run above chance with a twin that must not be (a memory of zeros).
The engine's contract (resume, evaluate, predict, DDP weights) is tests/test_methods.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medad_fast.config import resolve_config
from medad_fast.methods import create_method
from medad_fast.models.squid import (MemoryQueue, hard_shrink, neighbour_features, patchify, position_code,
                                     shrinkage_attention, unpatchify)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def tiny_method(**overrides):
    method = create_method(resolve_config("squid", "tiny", **overrides))
    method.configure_runtime(CPU, amp=False, channels_last=False)
    method.setup_training(CPU)
    return method


# ----------------------------------------------------------------------------- memory queue

def test_queue_writes_in_fifo_order_and_wraps_around():
    queue = MemoryQueue(positions=2, slots=5, dim=1)
    queue.memory.zero_()

    def items(*values):  # [n, positions, dim]: item i holds v at position 0 and -v at position 1
        return torch.tensor([[[v], [-v]] for v in values], dtype=torch.float32)

    queue.write(items(1, 2, 3))
    assert queue.pointer == 3
    assert queue.memory[0, :, 0].tolist() == [1, 2, 3, 0, 0] and queue.memory[1, :, 0].tolist() == [-1, -2, -3, 0, 0]
    queue.write(items(4, 5, 6))  # 4, 5 fill the end; 6 overwrites the oldest (1)
    assert queue.pointer == 1
    assert queue.memory[0, :, 0].tolist() == [6, 2, 3, 4, 5]
    queue.write(items(7, 8, 9, 10, 11, 12, 13))  # more than the queue holds: the last 5 survive
    assert queue.pointer == (1 + 7) % 5 == 3
    assert sorted(queue.memory[0, :, 0].tolist()) == [9, 10, 11, 12, 13]
    # and in FIFO order from the pointer: the oldest first
    oldest_first = torch.roll(queue.memory[0, :, 0], -queue.pointer).tolist()
    assert oldest_first == [9, 10, 11, 12, 13]
    assert queue.memory[1, :, 0].tolist() == [-x for x in queue.memory[0, :, 0].tolist()]


def test_hard_shrinkage_and_attention_match_hand_computed_weights():
    # hard shrink: w where w > lambda, else 0
    w = torch.tensor([0.5, 0.3, 0.15, 0.05])
    torch.testing.assert_close(hard_shrink(w, 0.2), torch.tensor([0.5, 0.3, 0.0, 0.0]), atol=1e-9, rtol=0)
    # softmax(log([4, 3, 2, 1])) = [0.4, 0.3, 0.2, 0.1]; lambda 0.25 keeps 0.4 and 0.3 -> 4/7, 3/7
    similarity = torch.log(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(shrinkage_attention(similarity, 0.25),
                               torch.tensor([4 / 7, 3 / 7, 0, 0], dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(shrinkage_attention(similarity, 0.0),
                               torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64), atol=1e-12, rtol=0)
    # a flat softmax under the threshold keeps its weights instead of reading nothing
    torch.testing.assert_close(shrinkage_attention(torch.zeros(4), 0.25), torch.full((4,), 0.25))

    # the queue's read: cosine similarity / temperature, per position
    queue = MemoryQueue(positions=1, slots=3, dim=2, temperature=0.5, shrink_threshold=0.2)
    queue.memory.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]]))
    query = torch.tensor([[[2.0, 2.0]]])  # cosines 1/sqrt(2), 1/sqrt(2), -1/sqrt(2)
    c = 2 ** -0.5 / 0.5
    e = torch.exp(torch.tensor([c, c, -c], dtype=torch.float64))
    soft = e / e.sum()  # [0.4725, 0.4725, 0.0550]: the third is under 0.2
    assert soft[2] < 0.2 < soft[0]
    expected = torch.tensor([0.5, 0.5, 0.0])
    torch.testing.assert_close(queue.attention(query)[0, 0], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(queue.read(query)[0, 0], torch.tensor([0.5, 1.0]), atol=1e-6, rtol=0)


def test_reading_a_feature_that_is_in_memory_returns_it():
    generator = torch.Generator().manual_seed(0)
    method = tiny_method()
    queue = method.memory  # the tiny preset's: 4 positions, 8 slots of 32 values, threshold 1/8
    stored = torch.randn(8, queue.positions, queue.dim, generator=generator).relu()  # ReLU features, as written
    queue.write(stored)
    for slot in (0, 5):
        read = queue.read(stored[slot:slot + 1])
        torch.testing.assert_close(read, stored[slot:slot + 1], atol=1e-3, rtol=1e-3)
    # a feature unlike every slot reads a blend of them, not itself
    other = torch.randn(1, queue.positions, queue.dim, generator=generator).relu()
    assert (queue.read(other) - other).abs().max() > 0.1


def test_patch_grid_neighbours_and_position_code():
    images = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    patches = patchify(images, 2)  # [8, 1, 2, 3], row-major per image
    assert patches.shape == (8, 1, 2, 3)
    torch.testing.assert_close(patches[1], images[0, :, 0:2, 3:6])
    torch.testing.assert_close(patches[6], images[1, :, 2:4, 0:3])
    torch.testing.assert_close(unpatchify(patches, 2), images)
    # 2 x 2 grid: patch 0's neighbours (row-major, centre excluded) are 1 (right), 2 (below), 3 (diagonal)
    features = torch.tensor([[[10.0], [11.0], [12.0], [13.0]]])  # [B=1, P=4, D=1]
    neighbours = neighbour_features(features, 2)[0, :, :, 0]  # [P, 8]
    assert neighbours[0].tolist() == [0, 0, 0, 0, 11, 0, 12, 13]
    assert neighbours[3].tolist() == [10, 11, 0, 12, 0, 0, 0, 0]
    assert position_code(4).tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]]


# ----------------------------------------------------------------------------- the two adversaries

def test_each_loss_reaches_only_its_own_side_and_each_optimiser_holds_only_its_own():
    method = tiny_method()
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    generator_loss, discriminator_loss, _, _ = method.losses(images, torch.Generator().manual_seed(1))
    d_params = list(method.discriminator.parameters())
    g_params = method.generator_parameters()
    assert {id(p) for p in d_params}.isdisjoint(id(p) for p in g_params)
    assert {id(p) for p in d_params} | {id(p) for p in g_params} == {id(p) for p in method.parameters()}
    # the generator's loss (its adversarial term included) leaves nothing on D's parameters
    grads = torch.autograd.grad(generator_loss, d_params + g_params, retain_graph=True, allow_unused=True)
    assert all(g is None for g in grads[:len(d_params)])
    assert sum(float(g.abs().sum()) for g in grads[len(d_params):] if g is not None) > 0
    # ...but its adversarial term does reach the generator through D
    adversarial_only = tiny_method(recon_weight=0.0, teacher_weight=0.0, distill_weight=0.0)
    g_loss, _, _, _ = adversarial_only.losses(images, torch.Generator().manual_seed(1))
    decoder_grads = torch.autograd.grad(g_loss, list(adversarial_only.decoder.parameters()), allow_unused=True)
    assert sum(float(g.abs().sum()) for g in decoder_grads if g is not None) > 0
    # the discriminator's loss leaves nothing on the generator's side
    grads = torch.autograd.grad(discriminator_loss, d_params + g_params, allow_unused=True)
    assert all(g is None for g in grads[len(d_params):])
    assert all(g is not None for g in grads[:len(d_params)])

    optimizers, _ = method.configure_optimizers()
    held = [{id(p) for group in o.param_groups for p in group["params"]} for o in optimizers]
    assert held == [{id(p) for p in g_params}, {id(p) for p in d_params}]


def test_a_training_step_moves_each_side_by_its_own_loss_only():
    # one engine step (one backward of L_G + L_D, both optimisers) leaves D exactly where a
    # step on L_D alone does, and the generator where a step on L_G alone does
    images = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))

    def stepped(which: str | None):
        method = tiny_method()
        optimizers, _ = method.configure_optimizers()
        generator_loss, discriminator_loss, _, _ = method.losses(images, torch.Generator().manual_seed(1))
        loss = {"generator": generator_loss, "discriminator": discriminator_loss}.get(which,
                                                                                   generator_loss + discriminator_loss)
        loss.backward()
        for optimizer in optimizers:
            if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                optimizer.step()
        return method

    both, g_only, d_only, start = stepped(None), stepped("generator"), stepped("discriminator"), tiny_method()
    for a, b in zip(both.discriminator.parameters(), d_only.discriminator.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(both.generator_parameters(), g_only.generator_parameters()):
        assert torch.equal(a, b)
    # and each side did move
    assert any(not torch.equal(a, b) for a, b in zip(both.discriminator.parameters(), start.discriminator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(both.decoder.parameters(), start.decoder.parameters()))


def test_training_writes_the_batch_to_the_queue_and_inference_does_not():
    method = tiny_method()
    images = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    method.train()
    method(images, torch.Generator().manual_seed(1))
    assert method.memory.pointer == 3
    queries = method.inpainting.queries(method.encoder(patchify(images, 2)))
    # BatchNorm in train mode both times: the queries written are this batch's
    torch.testing.assert_close(method.memory.memory[:, :3].transpose(0, 1), queries.detach())
    before = method.memory.memory.clone()
    method.predict(images)
    assert method.memory.pointer == 3 and torch.equal(method.memory.memory, before)
    assert method.method_state() == {"memory_pointer": 3}
    twin = tiny_method(seed=5)
    twin.load_state_dict(method.state_dict())
    twin.load_method_state(method.method_state())
    assert twin.memory.pointer == 3 and torch.equal(twin.memory.memory, method.memory.memory)


def test_image_score_is_one_minus_sigmoid_of_the_discriminator():
    method = tiny_method()
    method.eval()
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    _, scores = method.predict(images)
    with torch.no_grad():
        expected = 1 - torch.sigmoid(method.discriminator(method.networks(images)["student"]))
    torch.testing.assert_close(scores, expected)
    maps, max_filter = tiny_method(image_score="max_filter").predict(images)
    from medad_fast.models.scoring import image_scores
    torch.testing.assert_close(max_filter, image_scores(maps, method.score_filter))


def test_presets():
    paper = resolve_config("squid", "paper")
    assert (paper.run.image_size, paper.run.batch_size, paper.run.lr) == (128, 16, 1e-4)
    m = paper.method
    assert (m.grid, m.levels, m.squid_width, m.memory_slots, m.heads) == (2, 4, 32, 200, 8)
    method = create_method(paper)
    assert (method.memory.positions, method.memory.slots, method.memory.dim) == (4, 200, 2048)  # SQUID's 2048
    small = create_method(resolve_config("squid", "small"))
    assert small.config.run.image_size == 96 and small.memory.dim == 256
    with pytest.raises(ValueError, match="multiple of grid"):
        create_method(resolve_config("squid", "tiny", image_size=36))
    with pytest.raises(ValueError, match="heads 3 must divide"):
        create_method(resolve_config("squid", "tiny", heads=3))


# ----------------------------------------------------------------------------- DDP: one memory

QUEUE_DRIVER = """
import hashlib, json, os, sys
from medad_fast import train
from medad_fast.cli import main as cli_main
rank = int(os.environ.get("RANK", "0"))
record = open(os.path.join(sys.argv[1], f"queue{rank}.jsonl"), "a", buffering=1)
step = train.Trainer.train_step
def recording_step(self, batch_index):
    result = step(self, batch_index)
    queue = self.method.memory
    record.write(json.dumps({"step": self.state.step, "pointer": queue.pointer,
                             "sha": hashlib.sha256(queue.memory.contiguous().numpy().tobytes()).hexdigest()}) + "\\n")
    return result
train.Trainer.train_step = recording_step
sys.exit(cli_main(sys.argv[2:]))
"""


def test_ddp_ranks_hold_the_same_queue_after_every_step(data, tmp_path):
    driver = tmp_path / "queue_driver.py"
    driver.write_text(QUEUE_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               str(tmp_path), "train", "--method", "squid", "--data", str(data), "--out", str(tmp_path / "run"),
               "--preset", "tiny", "--epochs", "2", "--seed", "3", "--deterministic", "--no-progress",
               "--device", "cpu", "--memory-slots", "12"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ranks = [[json.loads(line) for line in (tmp_path / f"queue{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == [1, 2, 3, 4]
    for a, b in zip(*ranks):
        assert a == b, f"the ranks' queues differ after step {a['step']}"
    # each step writes both ranks' batches (2 x 4 features per position) into the 12 slots
    assert [r["pointer"] for r in ranks[0]] == [8, 4, 0, 8]
    assert len({r["sha"] for r in ranks[0]}) == 4, "the queue did not change at every step"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["method_state"] == {"memory_pointer": 8}


# ----------------------------------------------------------------------------- end to end

# A brief run of the small preset at 64 x 64 (2 x 2 patches of 32 px): 48 normal phantom
# slices, 20 epochs of 6 steps, one thread (about 15 s per run). Measured (seeds 0 / 1 / 2):
# pixel AUROC 0.912 / 0.902 / 0.939, pixel AP 0.277 / 0.263 / 0.352 (image AUROC of the
# max-filtered map 0.758 / 0.735 / 0.667; SQUID's discriminator score 0.482 / 0.515 / 0.700,
# near chance, see the README). The twin: the same run whose memory only ever holds zeros,
# so the in-painted features carry no normal pattern and the reconstruction is one fixed
# image per patch position: pixel AUROC 0.848 / 0.861 / 0.911, pixel AP 0.175 / 0.164 /
# 0.182 (the residual against a fixed liver-like image still follows the lesions'
# intensity, so the twin is far from 0.5 on the pixel AUROC; what separates the two is how
# well the map outlines the lesions, its AP). The bars sit in between; the test runs seed 0.
E2E = dict(image_size=64, grid=2, epochs=20)
PIXEL_AUROC_MIN = 0.88
PIXEL_AP_MIN = 0.22


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from medad_fast.data.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("phantom")
    os.environ.setdefault("MEDAD_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))
    write_phantom_dataset(root, n_train=48, n_test=40, size=64, seed=0, progress=False)
    return root


def train_and_evaluate(data, out):
    from medad_fast.evaluate import evaluate
    from medad_fast.train import train
    config = resolve_config("squid", "small", data=str(data), **E2E)
    start = time.perf_counter()
    train(config, out / "run", progress=False, log=lambda message: None)
    metrics = evaluate(out / "run", data, out=out / "eval", progress=False, n_cases=0)
    print(f"squid: image AUROC (discriminator) {metrics['image_auroc']:.3f}, pixel AUROC {metrics['pixel_auroc']:.3f}, "
          f"pixel AP {metrics['pixel_ap']:.3f} ({time.perf_counter() - start:.0f} s)")
    return metrics


def test_brief_small_run_detects_lesions(phantom, tmp_path):
    metrics = train_and_evaluate(phantom, tmp_path)
    assert metrics["pixel_auroc"] >= PIXEL_AUROC_MIN
    assert metrics["pixel_ap"] >= PIXEL_AP_MIN


def test_with_a_memory_of_zeros_the_same_run_does_not(phantom, tmp_path, monkeypatch):
    write = MemoryQueue.write
    monkeypatch.setattr(MemoryQueue, "write", lambda self, features: write(self, torch.zeros_like(features)))
    metrics = train_and_evaluate(phantom, tmp_path)
    assert metrics["pixel_ap"] < PIXEL_AP_MIN
    # nothing of the image reaches the in-painted reconstruction: every slice gets the same score
    assert metrics["image_auroc"] == pytest.approx(0.5)
