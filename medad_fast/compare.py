"""`medad-fast compare`: train and evaluate several methods (or variants of one) on the same
data, with the same engine, synthesis op, metrics and slices, and tabulate them.

The table has the layout of the paper's Table 2 (image AUROC, pixel AUROC, image AP, pixel
AP, AUPRO@0.3, best Dice) plus the training minutes (the sum of the run's epoch times, so
an interrupted and resumed run counts only the work done) and the inference speed (slices/s
of evaluate's read-and-score loop). On an image-level test split (no lesion masks, e.g. a
MedIAnomaly ``data.json`` dataset) the pixel columns read "n/a" (null in compare.json). Output
folder::

    <out>/<name>/run/            the run of each method (`medad-fast train`)
    <out>/<name>/eval/           its evaluation (`medad-fast evaluate`: metrics.json, scores.csv, ...)
    <out>/compare.md             the table, with the command and the machine
    <out>/compare.json           the same figures, machine-readable
    <out>/roc.png                every method's image-level ROC curve in one plot

With several seeds (``--seeds 0,1,2``: :func:`parse_seeds`) every method is trained and
evaluated once per seed, in ``<out>/<name>/seed<S>/run`` and ``.../eval``; compare.md then
holds one row per method with the mean +- sample sd (n - 1) of every metric over its seeds
and a column ``n`` (how many seeds), then a table of the per-seed rows; compare.json holds
per method the means, ``sd`` (metric -> sd) and ``per_seed`` (the rows, each with its
``seed``); roc.png draws each method's first seed (its title says which). Without
``--seeds`` the layout above is unchanged.

Resumable: a method whose run finished and whose evaluation exists is reused, but only when
its config (data, preset, seed, settings) equals the one asked for; an unfinished run is
resumed from its checkpoint; a run made with another config is refused (delete its folder
or choose another ``--out``), so a table never mixes data sets or settings.

Method options (``--image-score``, ``--latent-size``...) are given once and shared out: each
method of ``--methods`` gets those it has, parsed as its own option
(:func:`medad_fast.method_options.settings_for_methods`); one line names the methods that
ignore one, and a value a method has the setting for but does not take is refused.
``--anomaly-source`` goes to the methods that train on anomaly sources (and, with
``--val-fraction``, to every method: the validation set is made from it).

The same machinery runs the paper's ablations (``scripts/ablations.py``): entries that are
variants of one method instead of different methods.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config, RunConfig
from .data.crop import resolve_crop
from .data.layout import has_split
from .io import atomic_write_json, atomic_write_text, check_writable_folder
from .method_options import settings_for_methods
from .methods import config_from_dict, get_method, resolve_config

__all__ = ["Entry", "COLUMNS", "run_entry", "sweep", "anomaly_source_methods", "compare_entries", "parse_seeds",
           "seed_summary"]

#: (metrics.json key, column title) of the quality columns, in the paper's Table 2 order
COLUMNS = [("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("image_ap", "image AP"),
           ("pixel_ap", "pixel AP"), ("aupro_0.3", "AUPRO@0.3"), ("best_dice", "best Dice")]
#: the per-seed columns besides COLUMNS that compare.md shows as a mean over seeds
_MEAN_COLUMNS = ("training_minutes", "slices_per_s")
#: run fields that do not change what is trained (how often a checkpoint is written)
_BOOKKEEPING = ("checkpoint_every", "checkpoint_minutes")


@dataclass
class Entry:
    """One row of a comparison: a method and the settings that make the row.

    ``overrides``: fields of the run or the method config on top of the preset;
    ``switches``: how the row is asked for on the command line (shown in the table)."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    switches: str = ""

    def config(self, data: Path, preset: str, common: dict[str, Any]) -> Config:
        """The entry's config: ``common`` settings apply where the method has them."""
        method_cls = get_method(self.method)
        known = {f.name for f in dataclasses.fields(method_cls.Config)} | {f.name for f in dataclasses.fields(RunConfig)}
        shared = {k: v for k, v in common.items() if k in known}
        config = resolve_config(self.method, preset, **{**shared, **self.overrides, "data": str(data.resolve())})
        # "auto" cropping as train resolves and saves it, so a finished run's config.json matches
        return config.replace(crop=resolve_crop(config.run.crop, config.run.data))


def _config_difference(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: saved -> wanted`` for every differing field (bookkeeping fields ignored)."""
    differences = []
    for part in ("run", "method_config"):
        a, b = saved.get(part, {}), wanted.get(part, {})
        for key in sorted(set(a) | set(b)):
            if key in _BOOKKEEPING or (key == "data" and a.get(key) and b.get(key)
                                       and Path(a[key]).resolve() == Path(b[key]).resolve()):
                continue
            if a.get(key) != b.get(key):
                differences.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    if saved.get("method") != wanted.get("method"):
        differences.insert(0, f"method: {saved.get('method')!r} -> {wanted.get('method')!r}")
    return differences


def run_entry(entry: Entry, data: Path, folder: Path, preset: str, common: dict[str, Any],
              device: str | None = None, progress: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or resume, or reuse) and evaluate one entry in ``folder``; returns its row:
    the evaluation's metrics plus ``training_minutes``, ``method``, ``switches``."""
    from .checkpoint import LATEST_NAME
    from .evaluate import evaluate
    from .inference import resolve_checkpoint
    from .train import RunDirectory, train

    config = entry.config(data, preset, common)
    run, eval_dir = folder / "run", folder / "eval"
    run_directory = RunDirectory(run, writer=False)  # read only: train() writes it
    config_path = run_directory.config_path
    if config_path.is_file():
        saved = config_from_dict(json.loads(config_path.read_text())).to_dict()
        differences = _config_difference(saved, config.to_dict())
        if differences:
            raise SystemExit(f"medad-fast compare: {run} holds a run of another config ({'; '.join(differences)}); "
                             f"delete {folder} or choose another --out")
    log = run_directory.read_log()
    finished = (run / LATEST_NAME).is_file() and bool(log) and (log[-1].get("epoch") == config.run.epochs
                                                                 or bool(log[-1].get("stopped_early")))
    if not finished:
        resume = any(run.glob("checkpoint*.pt"))
        say(f"== {entry.name}: {'resuming' if resume else 'training'} {config.variant}, {preset} preset")
        train(config, run, resume=resume, device=device, progress=progress)
        log = run_directory.read_log()
    metrics_path = eval_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    # what evaluate reads: checkpoint-best.pt of a run with a validation set, else checkpoint.pt
    checkpoint = str(resolve_checkpoint(run).resolve())
    epoch = log[-1].get("val_best_epoch", config.run.epochs) if log else config.run.epochs
    if (metrics is None or metrics.get("checkpoint") != checkpoint or metrics.get("data") != str(data.resolve())
            or metrics.get("epoch") != epoch or not (eval_dir / "scores.csv").is_file()):
        say(f"== {entry.name}: evaluating on the test split")
        metrics = evaluate(run, data, "test", eval_dir, device=device, progress=progress)
    else:
        say(f"== {entry.name}: already trained and evaluated ({metrics_path})")
    return {**{key: metrics[key] for key, _ in COLUMNS}, "method": entry.method, "variant": metrics["variant"],
            "protocol": getattr(config.method, "protocol_note", lambda: "")(),
            "switches": entry.switches,
            "training_minutes": sum(r.get("seconds", 0.0) for r in log) / 60,
            "slices_per_s": metrics.get("slices_per_s", float("nan")), "n_images": metrics["n_images"],
            "epochs": config.run.epochs, "image_size": config.run.image_size, "preset": preset,
            "seed": config.run.seed}


def _machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds`` (``"0,1,2"``); ``ValueError`` naming ``--seeds`` for an empty
    list, a value that is not an integer, or a seed given twice."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise ValueError(f"--seeds {text!r}: empty list; give comma-separated integers, e.g. 0,1,2")
    seeds = []
    for item in items:
        try:
            seed = int(item)
        except ValueError:
            raise ValueError(f"--seeds {text!r}: {item!r} is not an integer") from None
        if seed in seeds:
            raise ValueError(f"--seeds {text!r}: seed {seed} is given twice")
        seeds.append(seed)
    return seeds


def seed_summary(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row of a method over its seeds (``per_seed``: rows of :func:`run_entry`): each
    metric's mean (None where a seed has none, e.g. pixel metrics of an image-level split),
    ``sd`` (metric -> sample sd, n - 1; None for one seed), ``n``, ``seeds`` and the rows
    themselves (``per_seed``). The fields that do not vary by seed are the first row's."""
    first = per_seed[0]
    summary = {key: value for key, value in first.items() if key not in dict(COLUMNS) and key not in _MEAN_COLUMNS
               and key != "seed"}
    summary["sd"] = {}
    for key in [key for key, _ in COLUMNS] + list(_MEAN_COLUMNS):
        values = [row.get(key) for row in per_seed]
        if any(value is None for value in values):
            summary[key] = summary["sd"][key] = None
            continue
        values = np.asarray(values, dtype=np.float64)
        summary[key] = float(values.mean())
        summary["sd"][key] = float(values.std(ddof=1)) if len(values) > 1 else None
    return {**summary, "n": len(per_seed), "seeds": [row["seed"] for row in per_seed], "per_seed": list(per_seed)}


def _table(rows: Sequence[tuple[str, dict[str, Any]]], first_column: str, seed_column: bool = False) -> str:
    """The markdown table of ``(name, row)`` pairs: a row of :func:`seed_summary` (it has
    ``sd``) shows ``mean +- sd`` and its ``n``; ``seed_column``: a column of each row's seed."""
    spread = any("sd" in row for _, row in rows)
    header = (f"| {first_column} | " + ("seed | " if seed_column else "") + "switches | " + ("n | " if spread else "")
              + " | ".join(title for _, title in COLUMNS) + " | training min | slices/s |")
    lines = [header, "|" + "---|" * (len(COLUMNS) + 4 + seed_column + spread)]
    for name, row in rows:
        cells = []
        for key, _ in COLUMNS:
            if row[key] is None:
                cells.append("n/a")
            elif "sd" in row:
                sd = row["sd"].get(key)
                cells.append(f"{row[key]:.3f} +- {'n/a' if sd is None else f'{sd:.3f}'}")
            else:
                cells.append(f"{row[key]:.3f}")
        minutes = f"{row['training_minutes']:.1f}" if row.get("training_minutes") is not None else "-"
        speed = row.get("slices_per_s")
        speed = f"{speed:.0f}" if speed is not None and np.isfinite(speed) else "-"
        # a row says in itself how its method was run when that matters (e.g. ddad's data protocol)
        label = f"{name} ({row['protocol']})" if row.get("protocol") else name
        before = f" {row['seed']} |" if seed_column else ""
        after = f" {row.get('n', '-')} |" if spread else ""
        lines.append(f"| {label} |{before} `{row.get('switches') or '-'}` |{after} " + " | ".join(cells)
                     + f" | {minutes} | {speed} |")
    return "\n".join(lines) + "\n"


def table(rows: dict[str, dict[str, Any]], first_column: str = "method") -> str:
    """The markdown table of ``rows`` (name -> row of :func:`run_entry`, or of
    :func:`seed_summary`: then ``mean +- sd`` and a column ``n``)."""
    return _table(list(rows.items()), first_column)


def _scores_csv(out: Path, name: str, row: dict[str, Any]) -> Path:
    """The ``scores.csv`` of row ``name``: its run's, or its first seed's."""
    folder = out / name / f"seed{row['per_seed'][0]['seed']}" if "per_seed" in row else out / name
    return folder / "eval" / "scores.csv"


def write_outputs(out: Path, stem: str, rows: dict[str, dict[str, Any]], command: str,
                  first_column: str = "method") -> str:
    """``<stem>.md`` (table, command, machine), ``<stem>.json`` and ``roc.png`` (every row's
    image-level ROC curve, from its ``eval/scores.csv``; a row over seeds: its first seed's,
    named in the title; the legend gives that seed's AUROC and the mean).
    Rows of :func:`seed_summary` add the per-seed table. Returns the markdown."""
    from .metrics import roc_curve
    from .visualize import plot_roc

    spread = any("per_seed" in row for row in rows.values())
    top = max((r["image_auroc"] for r in rows.values()), default=None)
    best = [n for n, r in rows.items() if r["image_auroc"] == top]
    markdown = (table(rows, first_column) + "\n"
                + ("Mean +- sample sd (n - 1) over the n seeds of each row; training min and slices/s: "
                   "the mean per seed. " if spread else "")
                + (f"Highest {'mean ' if spread else ''}image AUROC: {' and '.join(f'**{n}**' for n in best)}"
                   f"{' (tied)' if len(best) > 1 else ''}. " if best else "")
                + f"Test split, {next(iter(rows.values()))['n_images'] if rows else 0} slices"
                + ("; image-level (no lesion masks): pixel metrics n/a. " if any(
                    row.get("pixel_auroc", 0.0) is None for row in rows.values()) else ". ")
                + f"Command: `{command}`. Machine: {_machine()}.\n")
    if spread:
        per_seed = [(name, seed_row) for name, row in rows.items() for seed_row in row.get("per_seed", [])]
        markdown += "\nPer seed:\n\n" + _table(per_seed, first_column, seed_column=True)
    atomic_write_text(out / f"{stem}.md", markdown)
    atomic_write_json(out / f"{stem}.json", {"command": command, "machine": _machine(), "rows": rows})
    curves = []
    for name, row in rows.items():
        with open(_scores_csv(out, name, row), newline="") as handle:
            records = list(csv.DictReader(handle))
        labels = np.array([int(r["label"]) for r in records], dtype=bool)
        scores = np.array([float(r["score"]) for r in records])
        if "per_seed" in row:
            first = row["per_seed"][0]
            label = f"{name} (AUROC {first['image_auroc']:.3f}, mean {row['image_auroc']:.3f})"
        else:
            label = f"{name} (AUROC {row['image_auroc']:.3f})"
        curves.append((label, *roc_curve(labels, scores)))
    if curves:
        first_seeds = sorted({row["per_seed"][0]["seed"] for row in rows.values() if "per_seed" in row})
        plot_roc(out / "roc.png", curves,
                 title=f"image-level ROC, {stem}" + (f", seed {'/'.join(map(str, first_seeds))}" if spread else ""))
    return markdown


def sweep(entries: Sequence[Entry], data: Path, out: Path, preset: str, common: dict[str, Any], stem: str,
          command: str, device: str | None = None, progress: bool = True, first_column: str = "method",
          seeds: Sequence[int] | None = None) -> int:
    """Run every entry (:func:`run_entry`) into ``out/<name>`` and write the outputs; with
    ``seeds``, once per seed into ``out/<name>/seed<S>`` (rows of :func:`seed_summary`)."""
    if not has_split(data, "train"):
        raise SystemExit(f"medad-fast {stem}: --data {data}: no train/good folder and no data.json "
                         f"(run `make demo` or `medad-fast phantom` first)")
    if seeds is not None:
        seeds = list(seeds)
        if not seeds or len(set(seeds)) < len(seeds):
            raise ValueError(f"--seeds {seeds}: give one or more distinct seeds")
        if "seed" in common:
            raise ValueError(f"--seed {common['seed']} and --seeds {','.join(map(str, seeds))}: give one of them")
        fixed = [entry.name for entry in entries if "seed" in entry.overrides]
        if fixed:
            raise ValueError(f"--seeds: {', '.join(fixed)} fix their own seed")
    check_writable_folder(out)  # before any training
    rows = {}
    for entry in entries:
        if seeds is None:
            rows[entry.name] = run_entry(entry, data, out / entry.name, preset, common, device, progress)
            write_outputs(out, stem, rows, command, first_column)  # a partial table after every row
        else:
            per_seed = []
            for seed in seeds:
                per_seed.append(run_entry(dataclasses.replace(entry, name=f"{entry.name}, seed {seed}"), data,
                                          out / entry.name / f"seed{seed}", preset, {**common, "seed": seed},
                                          device, progress))
                rows[entry.name] = seed_summary(per_seed)
                write_outputs(out, stem, rows, command, first_column)  # a partial table after every seed
    print(write_outputs(out, stem, rows, command, first_column))
    print(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}, {out / 'roc.png'}")
    return 0


def anomaly_source_methods(methods: list[str], val_fraction: float | None) -> list[str]:
    """The methods of ``methods`` that an anomaly-source folder goes to: those that train on
    anomaly sources, and with a validation set (``val_fraction`` > 0) every method (its
    validation set is made from them)."""
    return [m for m in methods if get_method(m).uses_anomaly_sources or (val_fraction or 0) > 0]


def compare_entries(methods: list[str], settings: dict[str, Any], anomaly_source: str | Path | None = None,
                    val_fraction: float | None = None) -> tuple[list[Entry], dict[str, list[str]]]:
    """One :class:`Entry` per method of ``methods`` (named after it), each with the method
    settings it has (``settings``: setting -> value as given, shared out by
    :func:`medad_fast.method_options.settings_for_methods`) and ``anomaly_source`` when it
    takes it (:func:`anomaly_source_methods`). Returns the entries and ``{setting: [the
    methods that ignore it]}`` (``anomaly_source`` included); ``ValueError`` naming the option
    for a value a method refuses or a setting no method of ``methods`` has."""
    per_method, ignored = settings_for_methods(methods, settings)
    if anomaly_source is not None:
        takers = anomaly_source_methods(methods, val_fraction)
        for method in takers:
            per_method[method]["anomaly_source"] = str(Path(anomaly_source).resolve())
        if len(takers) < len(methods):
            ignored["anomaly_source"] = [m for m in methods if m not in takers]
    return [Entry(m, m, per_method[m], f"--method {m}") for m in methods], ignored
