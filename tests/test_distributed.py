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
                 timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node N script args``;
    fails the test with both outputs when the launch fails."""
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
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
