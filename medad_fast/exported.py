"""The reader of the files of ``medad-fast export`` (:mod:`medad_fast.export`, the writer):
:class:`ExportedModel` loads a ``.pt2`` (plain or AOTInductor) or ``.onnx`` file with the run's
config and preprocessing record it carries, and scores with it as a method does.

A module of its own so that the scoring code (:mod:`medad_fast.inference`) reads exported
files without importing the writer, which imports the scoring code to load checkpoints.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .config import Config
from .methods import config_from_dict
from .preprocessing import PREPROCESSING_KEY, Preprocessing, legacy_preprocessing

__all__ = ["EXPORT_FORMATS", "CONFIG_KEY", "ExportedModel", "is_exported_file"]

#: file format -> file suffix
EXPORT_FORMATS = {"pt2": ".pt2", "onnx": ".onnx"}
#: name of the run's config inside an exported file (pt2 extra file, ONNX metadata key)
CONFIG_KEY = "medad_fast_config.json"


def _is_aoti_package(path: Path) -> bool:
    """True for a zip holding AOTInductor's compiled model (``<name>/data/aotinductor/``)."""
    try:
        with zipfile.ZipFile(path) as package:
            return any("/data/aotinductor/" in name for name in package.namelist())
    except zipfile.BadZipFile:
        return False


def is_exported_file(path: str | os.PathLike) -> bool:
    """True when ``path`` names an exported file (by its suffix: ``.pt2`` or ``.onnx``)."""
    return Path(path).suffix in EXPORT_FORMATS.values()


def _exported_config(path: Path, entries: dict[str, str]) -> Config:
    """The config of an exported file with the preprocessing record it carries
    (:data:`~medad_fast.preprocessing.PREPROCESSING_KEY`; a file exported before records
    existed: the one its config holds, else the assumed one, with a warning naming it).
    ``entries``: the file's extra files / metadata. Errors name the file."""
    if not entries.get(CONFIG_KEY):
        raise ValueError(f"{path} holds no medad-fast config: not written by `medad-fast export`")
    try:
        config = config_from_dict(json.loads(entries[CONFIG_KEY]))
        if entries.get(PREPROCESSING_KEY):
            config = config.with_preprocessing(
                Preprocessing.from_dict(json.loads(entries[PREPROCESSING_KEY]), f"{path} {PREPROCESSING_KEY}"))
    except ValueError as exc:  # JSON errors are ValueErrors too
        raise ValueError(f"{path}: unreadable medad-fast config ({exc})") from None
    if config.preprocessing is None:
        config = config.with_preprocessing(legacy_preprocessing(config.run, path))
    return config


class ExportedModel:
    """An exported file, loaded for scoring. It has the part of the method interface the
    scoring code uses (:mod:`medad_fast.inference`): ``config``, ``device``,
    :meth:`predict` and :meth:`to_memory_format`, so ``predict`` scores with it as with
    a checkpoint."""

    def __init__(self, path: Path, config: Config, run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device) -> None:
        self.path, self.config, self._run, self.device = path, config, run, device

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
        """Read a ``.pt2`` or ``.onnx`` file written by :func:`medad_fast.export.export_method`.
        The ONNX model runs on the CPU (ONNX Runtime's CPU provider). Errors name the file."""
        path, device = Path(path), torch.device(device)
        if not path.is_file():
            raise FileNotFoundError(f"no exported model at {path}")
        if path.suffix == ".pt2" and _is_aoti_package(path):
            return cls._load_aoti(path, device)
        if path.suffix == ".pt2":
            extra = {CONFIG_KEY: "", PREPROCESSING_KEY: ""}
            try:
                program = torch.export.load(path, extra_files=extra)
            except Exception as exc:  # a zip that is not a saved ExportedProgram, or not a zip
                raise ValueError(f"{path} is not a pt2 file written by `medad-fast export` ({exc})") from None
            module = program.module().to(device)
            return cls(path, _exported_config(path, extra), module, device)
        if path.suffix == ".onnx":
            return cls._load_onnx(path)
        raise ValueError(f"{path}: not an exported model (expected a {' or '.join(EXPORT_FORMATS.values())} file)")

    @classmethod
    def _load_aoti(cls, path: Path, device: torch.device) -> ExportedModel:
        with zipfile.ZipFile(path) as package:
            extra = {}
            for key in (CONFIG_KEY, PREPROCESSING_KEY):
                names = [name for name in package.namelist() if name.endswith(f"/extra/{key}")]
                extra[key] = package.read(names[0]).decode() if names else ""
            config = _exported_config(path, extra)
        try:
            runner = torch._inductor.aoti_load_package(str(path))
        except Exception as exc:
            raise ValueError(f"{path}: its AOTInductor package does not load here ({exc}); it runs on the kind "
                             "of machine it was compiled on") from None
        return cls(path, config, lambda images: tuple(runner(images)), device)

    @classmethod
    def _load_onnx(cls, path: Path) -> ExportedModel:
        try:
            import onnxruntime
        except ImportError:
            raise ImportError(f"scoring with {path} needs onnxruntime: pip install 'medad-fast[onnx]'") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ValueError(f"{path} is not an ONNX model ONNX Runtime can load ({exc})") from None
        config = _exported_config(path, session.get_modelmeta().custom_metadata_map)

        def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            maps, scores = session.run(None, {"images": images.detach().cpu().float().contiguous().numpy()})
            return torch.from_numpy(maps), torch.from_numpy(scores)

        return cls(path, config, run, torch.device("cpu"))

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """The layout is the exported graph's business: ``x`` as it is."""
        return x

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps float32 [B, H, W], scores float32 [B])`` of images ``float [B, 1, S, S]``
        in [0, 1] at the exported side ``S``."""
        side = self.config.run.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (1, side, side):
            raise ValueError(f"{self.path.name} scores images of shape [B, 1, {side}, {side}]; "
                             f"got {list(images.shape)}")
        return self._run(images.float())
