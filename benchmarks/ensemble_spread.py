"""How an N-seed ensemble's metrics spread, from a pool of runs of one training command
(``benchmarks/seed_spread.sh`` trains such pools): every run scores the split once, then every
k-member subset of the pool (or a random sample of them) is scored as ``evaluate --ensemble``
scores it (the mean of the members' maps, the method's image score of that mean map; the
metrics of :mod:`medad_fast.metrics`), and the table gives, per ensemble size k, the mean and
sd of image AUROC, pixel AP and pixel AUROC over the subsets.

    python benchmarks/ensemble_spread.py --data DIR [--split test] [--sizes 1,3,5]
        [--max-subsets 200] [--json FILE] RUN RUN ...

Why subsets of a pool: five 3-seed ensembles that share no member take 15 trainings and still
give a sd from 5 numbers; cyclic ensembles of 5 runs (seeds i, i+1, i+2) share members and
understate the spread. The subsets of a pool of n runs share members too, but every one is a
fair draw of "a k-seed ensemble", so their spread estimates the one to expect; for a metric
that were the mean of its members' the sd over all k-subsets would understate the sd of
independent k-seed ensembles by the finite-pool factor ``sqrt((n - k) / n)`` (0.89 for
k = 3 of 15), so the table's sd is the subsets' (as a population) times ``sqrt(n / (n - k))``
(for k = 1: the sample sd over the pool, as ``spread_table.py`` gives it). For metrics that
are not a mean of the members' (AP, AUROC of the mean map) the factor is an approximation.

Subsets: all of them when there are at most ``--max-subsets``, else that many distinct ones
drawn at random (``--subset-seed``). The maps of all runs are kept in memory
(4 bytes per pixel per run, at the model's side: 100 slices of 96 x 96 are 3.7 MB a run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # medad_fast from this checkout
from medad_fast.data.crop import paste_back_each  # noqa: E402
from medad_fast.data.dataset import BmadSliceDataset, iter_batches  # noqa: E402
from medad_fast.ensemble import average_outputs  # noqa: E402
from medad_fast.inference import load_method, score_batch  # noqa: E402
from medad_fast.metrics import PixelMetricsStream, image_metrics  # noqa: E402

COLUMNS = (("image AUROC", "image_auroc"), ("pixel AP", "pixel_ap"), ("pixel AUROC", "pixel_auroc"))


def score_pool(runs: list[Path], data: Path, split: str, batch_size: int = 16) -> dict:
    """Every run's maps and scores of the split, as ``evaluate`` reads it (each run's
    preprocessing record's crop and side): ``{"labels": bool [N], "masks": bool [N, S, S],
    "maps": [float32 [N, s, s] per run] (the model's maps, of the liver box when the runs
    crop), "scores": [float32 [N] per run], "boxes": the N crop boxes or None, "frame": (S, S),
    "method": the first run's method}``."""
    pool: dict = {"maps": [], "scores": []}
    for run in runs:
        method, _ = load_method(run, "cpu")
        record = method.config.preprocessing
        if not pool["maps"]:
            pool["method"] = method
        elif record.to_dict() != pool["method"].config.preprocessing.to_dict() or \
                method.config.run.method != pool["method"].config.run.method:
            raise ValueError(f"{run} is not a run of {runs[0]}'s method and preprocessing: a pool is one command "
                             "trained with several seeds")
        dataset = BmadSliceDataset(data, split, size=record.image_size, crop=record.crop == "liver")
        batches, maps, scores = [], [], []
        for batch in iter_batches(dataset, batch_size, 0, len(dataset)):
            batch_maps, batch_scores = score_batch(method, batch.model_inputs)
            batches.append(batch)
            maps.append(batch_maps)
            scores.append(batch_scores)
        pool["maps"].append(torch.cat(maps))
        pool["scores"].append(torch.cat(scores))
        if "labels" not in pool:
            pool["labels"] = np.array([entry.abnormal for entry in dataset.files], dtype=bool)
            pool["masks"] = torch.cat([batch.masks[:, 0].bool() for batch in batches]).numpy()
            pool["boxes"] = None if batches[0].boxes is None else [box for batch in batches for box in batch.boxes]
            pool["frame"] = tuple(batches[0].images.shape[-2:])
    return pool


def ensemble_metrics(members: tuple[int, ...], pool: dict) -> dict[str, float]:
    """The metrics of the ensemble of the pool's runs ``members`` (indices), computed as
    :class:`medad_fast.ensemble.SeedEnsemble` and ``evaluate`` compute them
    (:func:`medad_fast.ensemble.average_outputs`; a single run: its own maps and scores),
    the mean map pasted back into each slice's box for the pixel metrics."""
    if len(members) == 1:  # a run alone: its own maps and scores, as evaluate scores it
        mean_maps, image_scores = pool["maps"][members[0]], pool["scores"][members[0]]
    else:
        mean_maps, image_scores = average_outputs(((pool["maps"][i], pool["scores"][i]) for i in members),
                                                  pool["method"].map_image_scores)
    if pool["boxes"] is not None:
        mean_maps = paste_back_each(mean_maps, pool["boxes"], pool["frame"])
    stream = PixelMetricsStream()
    stream.add(pool["masks"], mean_maps.numpy())
    return image_metrics(pool["labels"], image_scores.float().numpy()) | stream.metrics(stream.counts("AUROC"))


def subsets(n: int, k: int, max_subsets: int, rng: random.Random) -> list[tuple[int, ...]]:
    """All k-subsets of ``range(n)`` when there are at most ``max_subsets``, else that many
    distinct ones at random (sorted)."""
    if math.comb(n, k) <= max_subsets:
        return list(itertools.combinations(range(n), k))
    chosen: set[tuple[int, ...]] = set()
    while len(chosen) < max_subsets:
        chosen.add(tuple(sorted(rng.sample(range(n), k))))
    return sorted(chosen)


def spread(values: list[float], n: int, k: int) -> float:
    """The sd of the metric of independent k-run ensembles, from ``values`` over k-subsets of
    a pool of n runs: the subsets' sd (as a population) times the finite-pool factor's
    inverse ``sqrt(n / (n - k))``; NaN when it cannot be told (k = n, or one value)."""
    if k >= n or len(values) < 2:
        return float("nan")
    return statistics.pstdev(values) * math.sqrt(n / (n - k))


def table(rows: dict[int, list[dict]], n: int) -> str:
    lines = ["| members | ensembles | " + " | ".join(f"{name} (mean ± sd)" for name, _ in COLUMNS)
             + " | pixel AP sd / single runs' |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    single = spread([m["pixel_ap"] for m in rows[1]], n, 1) if 1 in rows else float("nan")
    for k, found in sorted(rows.items()):
        sds = {key: spread([m[key] for m in found], n, k) for _, key in COLUMNS}
        cells = [f"{statistics.mean([m[key] for m in found]):.3f} ± {sds[key]:.3f}" for _, key in COLUMNS]
        lines.append(f"| {k} | {len(found)} | " + " | ".join(cells) + f" | {sds['pixel_ap'] / single:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (or checkpoints) of one command, one per seed")
    parser.add_argument("--data", type=Path, required=True, help="the BMAD-layout folder the runs are evaluated on")
    parser.add_argument("--split", default="test")
    parser.add_argument("--sizes", type=lambda text: [int(k) for k in text.split(",")], default=[1, 3],
                        help="ensemble sizes, comma-separated (default 1,3)")
    parser.add_argument("--max-subsets", type=int, default=200, help="subsets per size at most (default 200)")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every subset's metrics here")
    args = parser.parse_args(argv)
    n = len(args.runs)
    if any(k < 1 or k > n for k in args.sizes):
        parser.error(f"--sizes must lie in 1..{n} (the number of runs)")
    pool = score_pool(args.runs, args.data, args.split)
    rng = random.Random(args.subset_seed)
    rows = {k: [{"members": [str(args.runs[i]) for i in members]}
                | ensemble_metrics(members, pool)
                for members in subsets(n, k, args.max_subsets, rng)] for k in args.sizes}
    print(f"{n} runs of {pool['method'].config.run.method} on the {args.split} split of {args.data}")
    print(table(rows, n))
    if args.json is not None:
        args.json.write_text(json.dumps({str(k): found for k, found in rows.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
