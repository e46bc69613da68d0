"""Process groups, sharding, gathering and per-rank seeds; 2-process runs under torchrun (gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from medad_fast import distributed as D

REPO = Path(__file__).resolve().parents[1]


def run_torchrun(script: Path, *args: str, nproc: int = 2, env: dict | None = None,
                 timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N script args``;
    with ``check``, fails the test with both outputs when the launch fails."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0 or not check, f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


# ----------------------------------------------------------------------------- single process

@pytest.fixture
def no_torchrun_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_shard_bounds_tile_the_range_in_rank_order_and_balance():
    for n in (0, 1, 2, 5, 16, 17):
        for world in (1, 2, 3, 4):
            bounds = [D.shard_bounds(n, r, world) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
            sizes = [stop - start for start, stop in bounds]
            assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes
    assert D.shard_bounds(5, 0, 2) == (0, 3) and D.shard_bounds(5, 1, 2) == (3, 5)
    assert D.shard_bounds(1, 1, 2) == (1, 1)  # empty share


def test_shard_lists_and_tensors():
    items = list("abcde")
    assert D.shard(items, 1, 2) == ["d", "e"]
    assert torch.equal(D.shard(torch.arange(5), 0, 2), torch.arange(3))
    assert D.shard(items, 0, 1) is items


def test_shard_bad_rank_or_world():
    with pytest.raises(ValueError, match="rank 2"):
        D.shard_bounds(4, 2, 2)
    with pytest.raises(ValueError, match="n must"):
        D.shard_bounds(-1, 0, 1)


def test_rank_seed_rank0_keeps_seed_and_ranks_differ():
    assert D.rank_seed(7, 0) == 7
    seeds = {D.rank_seed(7, r) for r in range(8)}
    assert len(seeds) == 8
    assert D.rank_seed(7, 1) == 7 + D.RANK_SEED_STRIDE
    # per-rank seeds stay clear of the trainer's seed + 1, seed + 2 streams of other ranks
    assert all(abs(D.rank_seed(7, a) - D.rank_seed(7, b)) > 2 for a in range(4) for b in range(4) if a != b)
    with pytest.raises(ValueError, match="rank"):
        D.rank_seed(1, -1)
    with pytest.raises(ValueError, match="negative"):
        D.rank_seed(-D.RANK_SEED_STRIDE * 2, 1)


def test_single_process_is_a_local_no_op(no_torchrun_env):
    context = D.init_distributed(torch.device("cpu"))
    assert context == D.DistributedContext(device=torch.device("cpu"))
    assert not context.is_distributed and context.is_main
    assert not torch.distributed.is_initialized()
    assert D.rank() == 0 and D.world_size() == 1 and D.is_main_process() and not D.is_distributed()
    tensor = torch.arange(6).view(3, 2)
    assert D.all_gather_uneven(tensor) is tensor
    assert D.all_reduce_sum(tensor) is tensor
    assert D.gather_objects({"a": 1}) == [{"a": 1}]
    assert D.broadcast_object("x") == "x"
    D.barrier()
    D.shutdown(context)


def test_world_size_one_under_torchrun_initialises_nothing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert D.init_distributed(torch.device("cpu")).backend is None
    assert not torch.distributed.is_initialized()


def test_incomplete_torchrun_environment_is_a_clear_error(no_torchrun_env, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK.*torchrun"):
        D.init_distributed(torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        D.init_distributed(torch.device("cpu"))


def test_cuda_device_per_local_rank_checks():
    with pytest.raises(ValueError, match="LOCAL_RANK=1 drives cuda:1"):
        D._device_for_rank(torch.device("cuda", 0), 1, 2)
    if torch.cuda.device_count() < 4:
        with pytest.raises(ValueError, match="LOCAL_RANK=3 but only"):
            D._device_for_rank(torch.device("cuda"), 3, 4)
    assert D._device_for_rank(torch.device("cpu"), 3, 4) == torch.device("cpu")


# ----------------------------------------------------------------------------- two processes

COLLECTIVES = textwrap.dedent("""
    import json, sys
    import torch
    from medad_fast import distributed as D

    ctx = D.init_distributed(torch.device("cpu"))
    assert D.init_distributed(torch.device("cpu")).owns_group is False  # a second call reuses the group
    r = ctx.rank
    out = {"rank": r, "world": ctx.world_size, "backend": ctx.backend, "main": D.is_main_process()}
    items = list(range(5))
    mine = D.shard(items)
    out["shard"] = list(mine)
    # per-rank results of uneven length (3 and 2 rows), gathered back in input order
    rows = torch.tensor([[i, i * i] for i in mine], dtype=torch.float32).view(-1, 2)
    out["gathered"] = D.all_gather_uneven(rows).tolist()
    # an empty share (1 item over 2 ranks) and a bool payload
    flags = torch.tensor([True])[: len(D.shard([0]))]
    out["flags"] = D.all_gather_uneven(flags).tolist()
    out["objects"] = D.gather_objects({"rank": r})
    out["broadcast"] = D.broadcast_object(f"from {r}")
    out["sum"] = D.all_reduce_sum(torch.tensor([float(r + 1)])).tolist()
    out["seed"] = D.rank_seed(5)
    D.barrier()
    D.shutdown(ctx)
    out["destroyed"] = not torch.distributed.is_initialized()
    with open(sys.argv[1] + f"/rank{r}.json", "w") as f:
        json.dump(out, f)
""")


def test_collectives_on_two_gloo_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    run_torchrun(script, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, out in enumerate(results):
        assert out["rank"] == r and out["world"] == 2 and out["backend"] == "gloo"
        assert out["main"] == (r == 0)
        assert out["gathered"] == [[i, i * i] for i in range(5)]
        assert out["flags"] == [True]
        assert out["objects"] == [{"rank": 0}, {"rank": 1}]
        assert out["broadcast"] == "from 0"
        assert out["sum"] == [3.0]
        assert out["destroyed"]
    assert results[0]["shard"] == [0, 1, 2] and results[1]["shard"] == [3, 4]
    assert results[0]["seed"] == 5 and results[1]["seed"] == 5 + D.RANK_SEED_STRIDE


# ----------------------------------------------------------------------------- training under torchrun

SHARES = textwrap.dedent("""
    import json, sys
    import torch
    from medad_fast import distributed as D
    from medad_fast.methods import create_method, resolve_config
    from medad_fast.runtime import deterministic_mode
    from medad_fast.train import Trainer, load_training_images, select_training_slices, training_slices

    ctx = D.init_distributed(torch.device("cpu"))
    torch.set_num_threads(1)
    # 14 of the 16 slices: 7 per rank and epoch, batches of 3: 6 held per rank
    config = resolve_config("ae", "tiny", data=sys.argv[1], seed=3, epochs=2, max_train_images=14, batch_size=3)
    usable = select_training_slices(config, training_slices(config))  # each rank reads 8 slices for the flags
    out = {"rank": ctx.rank}
    for name, images in (("full", load_training_images(config)), ("shares", usable)):
        with deterministic_mode(True, ctx.device):
            trainer = Trainer(create_method(config), images, ctx.device, ctx)
            held = []
            for _ in range(config.run.epochs):
                trainer.train_epoch()
                held.append([trainer.resident_images, trainer.held.tolist() if trainer.slices is not None else None])
        out[name] = {"held": held, "weights": [p.detach().flatten().tolist() for p in trainer.method.parameters()]}
    with open(sys.argv[2] + f"/rank{ctx.rank}.json", "w") as f:
        json.dump(out, f)
""")


def test_torchrun_ranks_reading_their_shares_train_as_ranks_holding_every_image(tmp_path, phantom):
    script = tmp_path / "shares.py"
    script.write_text(SHARES)
    run_torchrun(script, str(phantom), str(tmp_path), env={"MEDAD_FAST_CACHE": str(tmp_path / "cache")})
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for out in results:
        assert out["shares"]["weights"] == out["full"]["weights"], "reading the shares changed the weights"
        assert [count for count, _ in out["full"]["held"]] == [14, 14]  # the full loading: all, every rank
        assert [count for count, _ in out["shares"]["held"]] == [6, 6]  # <= ceil(14 / 2): its batches only
    assert results[0]["full"]["weights"] == results[1]["full"]["weights"]
    for epoch in range(2):  # the ranks hold different images, and a new share every epoch
        assert set(results[0]["shares"]["held"][epoch][1]).isdisjoint(results[1]["shares"]["held"][epoch][1])
    assert results[0]["shares"]["held"][0][1] != results[0]["shares"]["held"][1][1]

DRIVER = REPO / "tests" / "train_driver.py"
TINY_ARGS = ["--preset", "small", "--image-size", "32", "--recon-width", "2", "--seg-width", "2",
             "--batch-size", "4", "--source-pool-size", "4", "--seed", "5", "--deterministic", "--no-progress", "--checkpoint-every", "1"]


def read_records(record_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (record_dir / f"rank{rank}.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from medad_fast.data.phantom import write_phantom_dataset
    root = tmp_path_factory.mktemp("phantom")
    write_phantom_dataset(root, n_train=16, n_test=8, size=64, seed=2, progress=False)
    return root


@pytest.fixture(scope="module")
def ddp_run(phantom, tmp_path_factory) -> tuple[Path, Path, dict, subprocess.CompletedProcess]:
    """A 2-epoch training run on 2 gloo processes, recorded step by step by tests/train_driver.py."""
    base = tmp_path_factory.mktemp("ddp")
    run, records = base / "run", base / "records"
    records.mkdir()
    env = {"MEDAD_FAST_CACHE": str(base / "cache")}
    result = run_torchrun(DRIVER, str(records), "--", "train", "--data", str(phantom), "--out", str(run),
                          "--epochs", "2", *TINY_ARGS, env=env)
    return run, records, env, result


def test_torchrun_ranks_train_in_lockstep_on_different_data_and_anomalies(ddp_run):
    run, records, _, _ = ddp_run
    steps = [[r for r in read_records(records, rank) if r["event"] == "step"] for rank in range(2)]
    # 16 images / 2 ranks = 8 per rank and epoch, batch 4: 2 steps per epoch
    assert [s["step"] for s in steps[0]] == [s["step"] for s in steps[1]] == [1, 2, 3, 4]
    for step0, step1 in zip(*steps):
        assert step0["params"] == step1["params"], f"weights differ between ranks after step {step0['step']}"
        assert step0["mask"] != step1["mask"], f"both ranks drew the same anomalies at step {step0['step']}"
    # each rank holds only its share of the epoch (8 of the 16 images), never the whole split
    assert all(s["resident"] == 8 for rank in range(2) for s in steps[rank])
    for epoch in range(2):  # each epoch: the ranks' batches are disjoint and cover every image once
        seen = [i for rank in range(2) for s in steps[rank][2 * epoch: 2 * epoch + 2] for i in s["batch"]]
        assert sorted(seen) == list(range(16))
    first_epoch = sorted(i for s in steps[0][:2] for i in s["batch"])
    second_epoch = sorted(i for s in steps[0][2:] for i in s["batch"])
    assert first_epoch != second_epoch, "the shards were not reshuffled between epochs"
    # the weights did change, and the logged losses are the mean over both ranks
    assert steps[0][0]["params"] != steps[0][-1]["params"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(r["loss"] > 0 for r in log)


def test_torchrun_only_rank0_writes_into_the_run_directory(ddp_run):
    run, records, _, _ = ddp_run
    run_root = str(run.resolve())
    writes = [[r["path"] for r in read_records(records, rank) if r["event"] == "write"] for rank in range(2)]
    assert not [p for p in writes[1] if p.startswith(run_root)], f"rank 1 wrote into the run: {writes[1]}"
    assert any(p.startswith(run_root) for p in writes[0])
    assert sorted(p.name for p in run.iterdir()) == [
        "checkpoint-e00001-s000000002.pt", "checkpoint-e00002-s000000004.pt", "checkpoint.pt",
        "config.json", "log.jsonl"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rank_generators"]) == 2
    assert not torch.equal(state["rank_generators"][0]["method"], state["rank_generators"][1]["method"])


def test_torchrun_evaluate_and_predict_shard_and_gather_like_one_process(ddp_run, phantom, tmp_path, monkeypatch):
    run, _, env, _ = ddp_run
    from medad_fast.cli import main as cli
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.setenv("MEDAD_FAST_CACHE", env["MEDAD_FAST_CACHE"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(["evaluate", str(run), "--data", str(phantom), "--out", str(single / "eval"), "--batch-size", "3",
                    "--cases", "1", "--no-progress"]) == 0
        inputs = [str(phantom / "test" / "good"), str(phantom / "test" / "Ungood" / "img")]
        assert cli(["predict", str(run), *inputs, "--out", str(single / "pred"), "--batch-size", "3",
                    "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "two_commands.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from medad_fast.cli import main
        assert main(["evaluate", {str(run)!r}, "--data", {str(phantom)!r}, "--out", {str(double / "eval")!r},
                     "--batch-size", "3", "--cases", "1", "--no-progress"]) == 0
        sys.exit(main(["predict", {str(run)!r}, *{inputs!r}, "--out", {str(double / "pred")!r},
                       "--batch-size", "3", "--no-progress"]))
    """))
    result = run_torchrun(script, env=env)
    assert result.stdout.count("image AUROC") == 1, "only rank 0 prints"
    # 8 test slices over 2 ranks, batches of 3: uneven shares, gathered back in order
    one = json.loads((single / "eval" / "metrics.json").read_text())
    two = json.loads((double / "eval" / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "aupro_0.3", "best_dice", "n_images", "n_pixels"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    assert sorted(p.name for p in (double / "eval" / "heatmaps").iterdir()) == \
        sorted(p.name for p in (single / "eval" / "heatmaps").iterdir())
    rows_one = json.loads((single / "pred" / "scores.json").read_text())["images"]
    rows_two = json.loads((double / "pred" / "scores.json").read_text())["images"]
    assert [r["path"] for r in rows_two] == [r["path"] for r in rows_one]
    assert [r["score"] for r in rows_two] == pytest.approx([r["score"] for r in rows_one], abs=1e-6)


def test_torchrun_sigterm_on_one_rank_checkpoints_mid_epoch_and_resume_is_exact(ddp_run, phantom, tmp_path):
    reference, _, env, _ = ddp_run
    run = tmp_path / "run"
    args = ["--", "train", "--data", str(phantom), "--out", str(run), "--epochs", "2", *TINY_ARGS]
    # only rank 1 is signalled, after step 2 (the end of epoch 1); the ranks agree in the
    # next step's all-reduce and both stop after step 3, in the middle of epoch 2
    interrupted = run_torchrun(DRIVER, str(tmp_path / "first"), "--signal-at", "2", "SIGTERM", "1", *args,
                               env=env, check=False)
    assert interrupted.returncode != 0
    assert "SIGTERM received: stopped after step 3" in interrupted.stderr, interrupted.stderr
    for rank in range(2):
        steps = [r["step"] for r in read_records(tmp_path / "first", rank) if r["event"] == "step"]
        assert steps == [1, 2, 3]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["epoch_progress"]["position"]) == (1, 3, 1)

    resumed = run_torchrun(DRIVER, str(tmp_path / "second"), *args, "--resume", env=env)
    assert "resuming" in resumed.stderr
    steps = [r["step"] for r in read_records(tmp_path / "second", 0) if r["event"] == "step"]
    assert steps == [4]
    final, expected = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (run, reference))
    for name, value in expected["model"].items():
        assert torch.equal(final["model"][name], value), f"weights differ from the uninterrupted run: {name}"
    for rank in range(2):
        assert torch.equal(final["rank_generators"][rank]["method"], expected["rank_generators"][rank]["method"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    reference_log = [json.loads(line) for line in (reference / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log] == [r["loss"] for r in reference_log]
