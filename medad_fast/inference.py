"""Scoring with a trained method, shared by ``evaluate`` and ``predict`` (and by users'
own code): resolve a checkpoint, rebuild its method, score batches of slices.

No training code is imported here: a checkpoint carries the method's name and both parts
of its config, so :func:`load_method` rebuilds any registered method from the file alone.
:func:`load_scorer` also reads the files of ``medad-fast export`` (``.pt2``, ``.onnx``:
:class:`medad_fast.exported.ExportedModel`), and, given a list of runs, their seed ensemble
(:func:`load_ensemble`: :class:`medad_fast.ensemble.SeedEnsemble`); the scoring functions
take any of them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import BEST_NAME, LATEST_NAME, load_checkpoint
from .data.crop import paste_back_each
from .data.dataset import SliceBatch, iter_batches
from .ensemble import SeedEnsemble, check_distinct
from .exported import ExportedModel, is_exported_file
from .methods import Method, config_from_dict, get_method
from .preprocessing import legacy_preprocessing
from .runtime import compile_networks, resolve_device
from .weight_averaging import EMA_KEY, averaged_state_dict, scoring_weights

__all__ = ["resolve_checkpoint", "resolve_scorer", "load_method", "load_ensemble", "load_scorer",
           "load_scorer_and_state", "scorer_facts", "score_batch", "score_dataset", "score_images"]

#: what scores: a checkpoint file, run directory or exported file; or a list of runs (an ensemble)
ScorerPath = str | os.PathLike | Sequence[str | os.PathLike]
#: what :func:`load_scorer` returns
Scorer = Method | ExportedModel | SeedEnsemble


#: run directories whose best checkpoint this process has already announced
_ANNOUNCED: set[Path] = set()


def _announce(message: str) -> None:
    """Say ``message`` on stderr (main process only)."""
    from .distributed import is_main_process
    if is_main_process():
        print(message, file=sys.stderr)


def resolve_checkpoint(run_or_checkpoint: str | os.PathLike, log: Callable[[str], None] | None = _announce) -> Path:
    """The checkpoint to score with.

    A run directory -> its ``checkpoint-best.pt`` (the epoch with the best validation score,
    written by a run with ``--val-fraction``) when it exists, and ``log`` is told so, once
    per run directory and process; else its ``checkpoint.pt`` (the last epoch). A file ->
    itself (name ``RUN/checkpoint.pt`` to score the last epoch of a run that has a best
    one). FileNotFoundError naming the path otherwise."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        best = path / BEST_NAME
        if best.is_file():
            if log is not None and path.resolve() not in _ANNOUNCED:
                _ANNOUNCED.add(path.resolve())
                log(f"{path}: using {BEST_NAME}, the epoch with the best validation score "
                    f"(pass {path / LATEST_NAME} for the last epoch)")
            return best
        path = path / LATEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path} (pass a run directory, a checkpoint file or a file of "
                                f"`medad-fast export`)")
    return path


def resolve_scorer(path: ScorerPath, log: Callable[[str], None] | None = _announce) -> Path | list[Path]:
    """:func:`resolve_checkpoint` of a path, or of every run of a list (an ensemble's
    members: a list stays a list, even of one)."""
    if isinstance(path, (str, os.PathLike)):
        return resolve_checkpoint(path, log)
    return [resolve_checkpoint(member, log) for member in path]


def load_method(run_or_checkpoint: str | os.PathLike, device: str | torch.device | None = "cpu",
                amp: bool = True, compile: bool = False) -> tuple[Method, dict[str, Any]]:
    """The method of a checkpoint (or run directory) with its weights and state, on
    ``device`` in eval mode, with the run's memory format and (``amp`` and the run's
    setting) mixed precision, with the run's moving average of the weights when it kept one
    (``train --ema``, :mod:`medad_fast.weight_averaging`), else its last weights;
    ``compile``: its networks compiled (:func:`~medad_fast.runtime.compile_networks`).
    Returns ``(method, checkpoint dict)``; ``method.config`` is the run's
    :class:`~medad_fast.config.Config`, always with its preprocessing record
    (:mod:`medad_fast.preprocessing`; a checkpoint saved before records existed gets the
    assumed one, with a warning naming its window)."""
    device = resolve_device(device)
    path = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(path, map_location="cpu")
    config = config_from_dict(state["config"])
    if config.preprocessing is None:  # saved before the record existed: assumed, with a warning naming it
        config = config.with_preprocessing(legacy_preprocessing(config.run, path))
    method = get_method(config.run.method)(config)
    # a run trained with --ema scores with its moving average of the weights
    ema = state.get(EMA_KEY)
    method.load_state_dict(averaged_state_dict(state["model"], ema) if ema else state["model"])
    method.load_method_state(state.get("method_state", {}))
    method.configure_runtime(device, amp and config.run.amp, config.run.channels_last)
    method.eval()
    if compile:
        compile_networks(method)
    return method, state


def load_ensemble(runs: Sequence[str | os.PathLike], device: str | torch.device | None = "cpu", amp: bool = True,
                  compile: bool = False) -> tuple[SeedEnsemble, dict[str, Any]]:
    """The seed ensemble of ``runs`` (run directories or checkpoint files, each resolved as
    :func:`resolve_checkpoint` does; at least one), every member loaded by
    :func:`load_method` (``device``, ``amp``, ``compile`` as there; its EMA weights when it
    kept them). ``ValueError`` naming both runs and the field for members that disagree on
    method, image side, preprocessing record or image-score rule, or that repeat a
    checkpoint (:func:`medad_fast.ensemble.check_members`); an exported file is refused
    (export the ensemble instead). Returns ``(ensemble, state)``, ``state``:
    ``{"ensemble": [checkpoint paths], "members": [{"checkpoint", "epoch", "weights"}]}``
    (the members' checkpoint dicts are not kept)."""
    paths = resolve_scorer(list(runs))
    if not paths:
        raise ValueError("an ensemble needs at least one run")
    for path in paths:
        if is_exported_file(path):
            raise ValueError(f"{path}: an ensemble's members are run directories or checkpoints, not exported files "
                             "(`medad-fast export --ensemble RUN...` writes the ensemble as one file)")
    # the refusals that need no loading, before any weights are read
    check_distinct(paths)
    members, facts = [], []
    for path in paths:
        method, state = load_method(path, device, amp, compile)
        members.append(method)
        facts.append({"checkpoint": str(path.resolve()), "epoch": int(state.get("epoch", 0)),
                      "weights": scoring_weights(state)})
        del state  # its optimiser state and raw weights: not kept for N members
    return SeedEnsemble(members, paths), {"ensemble": [fact["checkpoint"] for fact in facts], "members": facts}


def load_scorer(path: ScorerPath, device: str | torch.device | None = "cpu", compile: bool = False) -> Scorer:
    """What scores with ``path``: an exported file (``.pt2``, ``.onnx``) ->
    :class:`~medad_fast.exported.ExportedModel`; a checkpoint or run directory -> its method
    (:func:`load_method`, ``compile`` as there; an exported file is compiled already); a
    list of runs -> their :class:`~medad_fast.ensemble.SeedEnsemble` (:func:`load_ensemble`).
    Each has ``config``, ``predict`` and ``to_memory_format``, all the scoring functions
    below use. Errors name the file."""
    return load_scorer_and_state(path, device, compile)[0]


def load_scorer_and_state(path: ScorerPath, device: str | torch.device | None = "cpu", compile: bool = False
                          ) -> tuple[Scorer, dict[str, Any]]:
    """:func:`load_scorer` and the checkpoint dict (epoch, method state, ...; ``{}`` for an
    exported file, which carries the run's config and preprocessing record only; an
    ensemble's members: :func:`load_ensemble`'s state)."""
    if not isinstance(path, (str, os.PathLike)):
        return load_ensemble(path, device, compile=compile)
    if is_exported_file(path):
        return ExportedModel.load(path, resolve_device(device)), {}
    return load_method(path, device, compile=compile)


def scorer_facts(path: ScorerPath, state: dict[str, Any]) -> dict[str, Any]:
    """What an evaluation report says about what scored (:func:`load_scorer_and_state`'s
    ``path`` and ``state``): ``scorer`` ("checkpoint", "ensemble", or the exported file's
    format), ``epoch`` and ``weights`` ("ema": the run's moving average, ``train --ema``;
    else "last"; both None for an exported file, which does not record them). An ensemble:
    ``epoch`` None, ``weights`` its members' when they agree, else "mixed", and
    ``members``: ``[{"checkpoint", "epoch", "weights"}]``."""
    if not isinstance(path, (str, os.PathLike)):
        members = state["members"]
        weights = {member["weights"] for member in members}
        return {"scorer": "ensemble", "epoch": None, "weights": weights.pop() if len(weights) == 1 else "mixed",
                "members": members}
    if is_exported_file(path):
        return {"scorer": Path(path).suffix.lstrip("."), "epoch": None, "weights": None}
    return {"scorer": "checkpoint", "epoch": int(state.get("epoch", 0)), "weights": scoring_weights(state)}


@torch.no_grad()
def score_batch(method: Scorer, images: torch.Tensor, device: torch.device | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps float32 [B, H, W], scores float32 [B])`` on the CPU of one batch of images
    (uint8, or float in [0, 1], ``[B, 1, H, W]``) on the method's device (an exported
    model's: its ``device``)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
    if device is None:
        device = method.device if isinstance(method, ExportedModel) else next(method.parameters()).device
    images = images.to(device)
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    maps, scores = method.predict(method.to_memory_format(images))
    return maps.float().cpu(), scores.float().cpu()


def score_dataset(method: Scorer, dataset, batch_size: int = 16, start: int = 0, stop: int | None = None,
                  progress: bool = False, device: torch.device | None = None
                  ) -> Iterator[tuple[SliceBatch, torch.Tensor, torch.Tensor]]:
    """``(batch, maps, scores)`` for the slices ``[start, stop)`` of a per-slice dataset
    (:mod:`medad_fast.data.dataset`), read and scored one batch at a time. ``maps``:
    float32 ``[B, S, S]``, on the whole slices (``batch.images``): with liver-box cropping
    the method scores ``batch.crops`` and each map is pasted back into its box
    (:func:`medad_fast.data.crop.paste_back_each`)."""
    stop = len(dataset) if stop is None else stop
    batches = iter_batches(dataset, batch_size, start, stop)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, total=-(-(stop - start) // batch_size), desc="score", unit="batch",
                       dynamic_ncols=True)
    for batch in batches:
        maps, scores = score_batch(method, batch.model_inputs, device)
        if batch.boxes is not None:
            frame = tuple(batch.images.shape[-2:])
            maps = paste_back_each(maps, batch.boxes, frame)
        yield batch, maps, scores


def _image_batch(images) -> torch.Tensor:
    """``images`` (numpy or torch; ``[N, 1, H, W]`` or ``[N, H, W]``; uint8, or float in
    [0, 1]) as a ``[N, 1, H, W]`` tensor; ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(images, torch.Tensor):
        try:
            import numpy as np

            array = np.asarray(images)
        except Exception as e:  # a ragged list, an object that is no array
            raise ValueError(f"images must be a numpy array or a torch tensor; got {type(images).__name__} "
                             f"({e})") from None
        if array.dtype == object or array.dtype.kind not in "biuf":
            raise ValueError(f"images must be a numpy array or a torch tensor of numbers; got {type(images).__name__} "
                             f"of dtype {array.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(array))
    if images.dim() == 3:
        images = images[:, None]
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must have shape [N, 1, H, W] or [N, H, W]; got {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 (0..255) or float in [0, 1]; got {images.dtype}")
    if images.numel() and not (bool(torch.isfinite(images).all()) and float(images.min()) >= 0.0
                               and float(images.max()) <= 1.0):
        finite = images[torch.isfinite(images)]
        seen = f"{float(finite.min()):g} .. {float(finite.max()):g}" if finite.numel() else "no finite value"
        raise ValueError(f"float images must hold values in [0, 1] (uint8 images 0..255); got {seen}"
                         + ("" if finite.numel() == images.numel() else
                            f" and {images.numel() - finite.numel()} NaN or infinite value(s)"))
    return images


def score_images(method: Scorer, images, batch_size: int = 16, progress: bool = False,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel maps and image scores of a batch of grayscale images: a numpy array or a torch
    tensor, ``[N, 1, H, W]`` or ``[N, H, W]``, uint8 (0..255) or float in [0, 1] (anything
    else raises ``ValueError``). Images of another size than the model's side ``S`` are
    resized as ``predict`` resizes an image file (:func:`medad_fast.data.dataset.to_model_side`:
    area averaging to shrink, bilinear to enlarge, then uint8 with every positive pixel kept
    >= 1), and their maps resized back to ``H x W`` (:func:`medad_fast.io.resize_images`).
    Returns ``(maps float32 [N, H, W], scores float32 [N])`` on the CPU."""
    from .data.dataset import to_model_side
    from .io import resize_images

    images = _image_batch(images)
    side = method.config.run.image_size
    size = tuple(images.shape[-2:])
    resize = size != (side, side)

    def batches():
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size]
            if not resize:
                yield score_batch(method, batch, device)
                continue
            batch_maps, batch_scores = score_batch(method, to_model_side(batch[:, 0].cpu().numpy(), side), device)
            yield resize_images(batch_maps[:, None], size)[:, 0], batch_scores

    results = batches()
    if progress:
        from tqdm import tqdm
        results = tqdm(results, total=-(-images.shape[0] // batch_size), desc="score", unit="batch",
                       dynamic_ncols=True)
    maps = torch.empty(images.shape[0], *size, dtype=torch.float32)
    scores = torch.empty(images.shape[0], dtype=torch.float32)
    start = 0
    for batch_maps, batch_scores in results:
        maps[start:start + batch_maps.shape[0]] = batch_maps
        scores[start:start + batch_maps.shape[0]] = batch_scores
        start += batch_maps.shape[0]
    return maps, scores
