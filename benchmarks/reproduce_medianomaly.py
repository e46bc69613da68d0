"""Reproduce published BrainTumor figures: train and evaluate methods at the MedIAnomaly
benchmark's protocol (each method's ``medianomaly`` preset) and put the measured image AUROC
and AP next to the published ones.

    python benchmarks/reproduce_medianomaly.py --root DIR [--methods ae,ddad,squid]
        [--seeds 0,1,2] [--out DIR] [--device D] [--epochs E]

``DIR`` holds ``BrainTumor/images`` and ``BrainTumor/data.json`` (the MedIAnomaly / DDAD-ASR
layout; ``--data DIR/BrainTumor`` reads it). For every method and seed: ``train`` into
``OUT/runs/<method>-seed<S>`` (a run interrupted there is resumed from its checkpoint), then
``evaluate`` on the test split. Written into ``OUT`` (default ``reproduce-medianomaly``),
atomically, after every run:

* ``reproduce.json``: a list of rows ``{"method", "seed", "image_auroc", "image_ap",
  "minutes", "epochs"}`` (AUROC and AP as fractions; ``minutes``: wall clock of training +
  evaluation in the invocation that finished the run; ``epochs``: what it trained for).
  ``ddad`` rows also hold ``image_auroc_<map>`` and ``image_ap_<map>`` for the three maps
  of its autoencoder stage, scored as DDAD-ASR's ``test.py`` scores them (the mean over the
  image): ``inter`` (DDAD's initial map ``A_inter``, the inter-discrepancy, before the ASR
  refines it; DDAD's paper reports both), ``rec`` (the NDM ensemble's reconstruction error:
  the same autoencoders used as a plain AE, the baseline DDAD's claim is measured against)
  and ``intra`` (``A_intra``); ``image_auroc`` is the refined (ASR) map's.
  With ``--epochs`` below the preset's, a ``ddad`` run can end right after its autoencoder
  stage (``--epochs 31`` on BrainTumor: its 250 autoencoder epochs are 3,750 steps, 30.2 run
  epochs of 124 steps): then only the ``_<map>`` figures are DDAD's;
  Rows already there are not run again; rows of another epoch count for the same method
  are refused (use another ``--out``), so a short estimate never mixes with a full run;
* ``reproduce.md``: per method the mean and spread (sample standard deviation) over the
  seeds, the seeds' own figures, and the published figures with their sources.

A method without a ``medianomaly`` preset is skipped with a message saying so (and a line in
``reproduce.md``). ``make reproduce`` runs this on ``../shared/data/braintumor-medianomaly``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

PRESET = "medianomaly"
DATASET = "BrainTumor"
#: published BrainTumor figures (percent, mean +- std over runs), each with where it is printed
PUBLISHED: dict[str, dict[str, Any]] = {
    "ae": {"auroc": (85.9, 0.3), "ap": (76.9, 0.1),
           "source": "AE4AD (Cai et al., MICCAI 2024), Table 1, AE with latent size 16 on BrainTumor "
                     "(made with github caiyu6666/MedIAnomaly, reconstruction/train_eval_latent_size.sh)"},
    "ddad": {"source": "no published figure (the DDAD-ASR repository's README states none for BrainTumor)"},
    "squid": {"source": "no published figure (SQUID's paper and repository report none for BrainTumor)"},
}


def parse_list(text: str, what: str, cast=str) -> list:
    """``"a,b"`` -> ``[a, b]``; ``SystemExit(2)`` naming ``what`` on an empty or bad item."""
    items = [item.strip() for item in text.split(",")]
    try:
        values = [cast(item) for item in items if item]
    except ValueError:
        raise SystemExit(f"reproduce_medianomaly: error: {what} must be a comma-separated list of "
                         f"{cast.__name__}s; got {text!r}") from None
    if not values:
        raise SystemExit(f"reproduce_medianomaly: error: {what} is empty")
    return values


def check_root(root: Path) -> Path:
    """The dataset folder ``root/BrainTumor``; ``SystemExit`` naming what is missing."""
    data = root / DATASET
    for needed in (data / "data.json", data / "images"):
        if not needed.exists():
            raise SystemExit(f"reproduce_medianomaly: error: --root {root}: {needed} does not exist (expected "
                             f"{DATASET}/images and {DATASET}/data.json in the MedIAnomaly layout)")
    return data


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise SystemExit(f"reproduce_medianomaly: error: {path} is not a list of rows")
    return rows


#: DDAD-ASR's ``test.py`` ``evaluate`` scores of the autoencoder stage, each the mean over the image
#: (key suffix: its map): the NDM ensemble as a plain autoencoder ("Rec. (ensemble)",
#: ``(x - mean_k R^n_k)^2``), the intra-discrepancy (``std_k R^n_k``) and the
#: inter-discrepancy (``|mean_k R^u_k - mean_k R^n_k|``), in DDAD's [-1, 1] units
INITIAL_SCORES = ("inter", "rec", "intra")
INITIAL_NAMES = {"inter": "its inter-discrepancy map A_inter (before the ASR)",
                 "rec": "its NDM ensemble's reconstruction error (DDAD-ASR's \"Rec. (ensemble)\": the same "
                        "autoencoders as a plain AE)",
                 "intra": "its intra-discrepancy map A_intra"}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(rows: list[dict[str, Any]], skipped: dict[str, str], command: str) -> str:
    """``reproduce.md``: measured figures (percent) next to the published ones."""
    lines = ["# BrainTumor at the MedIAnomaly protocol: measured vs published", "",
             f"Command: `{command}`", "",
             "Image-level AUROC / AP in percent over the 1,199 test images; measured: mean +- sample "
             "standard deviation over the seeds; minutes: training + evaluation per seed.", "",
             "| method | seeds | epochs | AUROC measured | AP measured | AUROC published | AP published | "
             "minutes per seed | published figures' source |",
             "|---|---|---|---|---|---|---|---|---|"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        mine = [row for row in rows if row["method"] == method]
        auroc = mean_and_spread([100 * row["image_auroc"] for row in mine])
        ap = mean_and_spread([100 * row["image_ap"] for row in mine])
        published = PUBLISHED.get(method, {})
        pub = lambda key: ("%.1f +- %.1f" % published[key]) if key in published else "-"  # noqa: E731
        minutes = mean_and_spread([row["minutes"] for row in mine])
        lines.append(f"| {method} | {','.join(str(row['seed']) for row in mine)} | "
                     f"{','.join(sorted({str(row.get('epochs', '?')) for row in mine}))} | "
                     f"{auroc[0]:.1f} +- {auroc[1]:.1f} | {ap[0]:.1f} +- {ap[1]:.1f} | {pub('auroc')} | {pub('ap')} | "
                     f"{minutes[0]:.1f} | {published.get('source', 'no published figure')} |")
    summaries = []
    for name, what in INITIAL_NAMES.items():
        mine = [row for row in rows if f"image_auroc_{name}" in row]
        if mine:
            auroc = mean_and_spread([100 * row[f"image_auroc_{name}"] for row in mine])
            ap = mean_and_spread([100 * row[f"image_ap_{name}"] for row in mine])
            summaries.append(f"- ddad scored with {what}, seeds {','.join(str(row['seed']) for row in mine)}: "
                             f"AUROC {auroc[0]:.1f} +- {auroc[1]:.1f}, AP {ap[0]:.1f} +- {ap[1]:.1f}.")
    if summaries:
        lines += [""] + summaries
    columns = [f"{kind} ({name})" for name in INITIAL_SCORES for kind in ("AUROC", "AP")]
    lines += ["", "Per seed (ddad's autoencoder-stage maps as DDAD-ASR's test.py scores them):", "",
              "| method | seed | epochs | AUROC | AP | " + " | ".join(columns) + " | minutes |",
              "|---|---|---|---|---|" + "---|" * len(columns) + "---|"]
    per = lambda row, key: f"{100 * row[key]:.2f}" if key in row else "-"  # noqa: E731
    lines += [f"| {row['method']} | {row['seed']} | {row.get('epochs', '?')} | {100 * row['image_auroc']:.2f} | "
              f"{100 * row['image_ap']:.2f} | "
              + " | ".join(per(row, f"image_{kind.lower()}_{name}") for name in INITIAL_SCORES
                           for kind in ("AUROC", "AP"))
              + f" | {row['minutes']:.1f} |" for row in rows]
    if skipped:
        lines += ["", "Not run:", ""] + [f"- {method}: {why}" for method, why in skipped.items()]
    return "\n".join(lines) + "\n"


def run_one(method: str, seed: int, data: Path, out: Path, device: str, epochs: int | None) -> dict[str, Any]:
    """Train (or resume) and evaluate one method at one seed; the row of ``reproduce.json``."""
    from medad_fast.methods import resolve_config
    from medad_fast.evaluate import evaluate
    from medad_fast.train import train

    config = resolve_config(method, PRESET, data=str(data), seed=seed, epochs=epochs)
    run = out / "runs" / f"{method}-seed{seed}"
    resume = (run / "checkpoint.pt").exists() or any(run.glob("checkpoint-*.pt"))
    print(f"== {method} seed {seed}: {config.run.epochs} epochs at the {PRESET} preset into {run}"
          f"{' (resuming)' if resume else ''}", flush=True)
    start = time.perf_counter()
    train(config, run, resume=resume, device=device, progress=True)
    metrics = evaluate(run, data, out=run / "eval-test", device=device, n_cases=0, progress=True)
    extra = initial_map_metrics(run, data, device) if method == "ddad" else {}
    minutes = (time.perf_counter() - start) / 60
    row = {"method": method, "seed": seed, "image_auroc": float(metrics["image_auroc"]),
           "image_ap": float(metrics["image_ap"]), "minutes": round(minutes, 4), "epochs": config.run.epochs,
           **extra}
    inter = (f"; inter-discrepancy map: AUROC {extra['image_auroc_inter']:.4f}, AP {extra['image_ap_inter']:.4f}"
             if extra else "")
    print(f"== {method} seed {seed}: image AUROC {row['image_auroc']:.4f}, AP {row['image_ap']:.4f}{inter} "
          f"({minutes:.1f} min)", flush=True)
    return row


def initial_map_metrics(run: Path, data: Path, device: str) -> dict[str, float]:
    """A DDAD run's test split scored, as DDAD-ASR's ``test.py`` scores it, with each map of
    its autoencoder stage (:data:`INITIAL_SCORES`), not the ASR's refinement: the
    autoencoders are frozen once the ASR trains. ``inter`` is the run's own map in the
    autoencoder stage (the ``mean`` image score), read through the scorer, so a run that
    ends there scores exactly as its evaluate row. ``{"image_auroc_<map>", "image_ap_<map>"}``."""
    import torch
    from medad_fast.data.dataset import BmadSliceDataset
    from medad_fast.inference import load_method, score_dataset
    from medad_fast.metrics import image_metrics
    from medad_fast.runtime import resolve_device

    device = resolve_device(device)
    method, _ = load_method(run, device)
    if method.unknown is None:
        raise SystemExit(f"reproduce_medianomaly: error: {run} has no UDM ensemble (no unlabeled pool): "
                         f"it has no inter-discrepancy map")
    method.stage = 0  # the map before the ASR (ddad.py: anomaly_maps)
    # batches of 16 as evaluate()'s: the same convolutions, so a run that ends in the
    # autoencoder stage scores exactly as its evaluate row
    dataset = BmadSliceDataset(data, "test", size=method.config.preprocessing.image_size)
    scores: dict[str, list] = {name: [] for name in INITIAL_SCORES}
    for batch, _, inter in score_dataset(method, dataset, 16, progress=True, device=device):
        scores["inter"].append(inter)
        images = batch.images.to(device).float().div_(255.0)
        with torch.no_grad(), method.autocast():
            x = images * 2 - 1  # DDAD's units, as initial_maps
            reconstruction = method.normative(x).float().mean(dim=0)
        scores["rec"].append((x - reconstruction).square().flatten(1).mean(dim=1).cpu())
        scores["intra"].append(method.initial_maps(images)[0].flatten(1).mean(dim=1).cpu())
    labels = [entry.abnormal for entry in dataset.files]
    out = {}
    for name, values in scores.items():
        metrics = image_metrics(labels, torch.cat(values).numpy())
        out |= {f"image_auroc_{name}": float(metrics["image_auroc"]), f"image_ap_{name}": float(metrics["image_ap"])}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reproduce_medianomaly.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help=f"folder holding {DATASET}/images and "
                                                                   f"{DATASET}/data.json")
    parser.add_argument("--methods", default="ae,ddad,squid", help="comma-separated methods (default ae,ddad,squid)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--out", type=Path, default=Path("reproduce-medianomaly"),
                        help="output folder (default reproduce-medianomaly)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: CUDA when there is one)")
    parser.add_argument("--epochs", type=int, help="override the presets' epochs (e.g. 1 to estimate the minutes)")
    args = parser.parse_args(argv)
    from medad_fast.io import atomic_write_json, atomic_write_text
    from medad_fast.methods import get_method

    methods = parse_list(args.methods, "--methods")
    seeds = parse_list(args.seeds, "--seeds", int)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1; got {args.epochs}")
    data = check_root(args.root)
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path, md_path = args.out / "reproduce.json", args.out / "reproduce.md"
    rows = read_rows(rows_path)
    command = " ".join(["python benchmarks/reproduce_medianomaly.py", *(argv if argv is not None else sys.argv[1:])])
    skipped: dict[str, str] = {}
    runnable = []
    for method in methods:
        try:
            presets = get_method(method).presets
        except ValueError as exc:
            parser.error(f"--methods: {exc}")
        if PRESET not in presets:
            skipped[method] = f"no '{PRESET}' preset yet (its presets: {', '.join(presets)}); skipped"
            print(f"reproduce_medianomaly: skipping {method}: {skipped[method]}", file=sys.stderr)
        else:
            runnable.append(method)
    from medad_fast.methods import resolve_config

    for method in runnable:
        epochs = resolve_config(method, PRESET, epochs=args.epochs).run.epochs
        other = sorted({row.get("epochs") for row in rows if row["method"] == method} - {epochs}, key=str)
        if other:
            raise SystemExit(f"reproduce_medianomaly: error: {rows_path} holds {method} rows trained for {other} "
                             f"epochs, not {epochs}; use another --out")
        for seed in seeds:
            if any(row["method"] == method and row["seed"] == seed for row in rows):
                print(f"== {method} seed {seed}: already in {rows_path}, not run again", flush=True)
                continue
            rows.append(run_one(method, seed, data, args.out, args.device, args.epochs))
            atomic_write_json(rows_path, rows)
            atomic_write_text(md_path, render(rows, skipped, command))
    atomic_write_json(rows_path, rows)
    report = render(rows, skipped, command)
    atomic_write_text(md_path, report)
    print(report)
    print(f"wrote {rows_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
