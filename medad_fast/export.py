"""`medad-fast export`: a trained method as one file that scores slices. The reader of such
files, that ``predict`` (and users' code) score with, is :class:`medad_fast.exported.ExportedModel`.

Both formats hold the same inference module (:class:`InferenceModule`): images
``float32 [B, 1, S, S]`` in [0, 1] (S = the run's ``image_size``; the batch axis is
dynamic) -> ``(maps float32 [B, S, S], scores float32 [B])``, exactly
:meth:`Method.predict <medad_fast.methods.base.Method.predict>` of the checkpoint. The run's
config travels inside the file (a pt2 extra file / ONNX metadata), so the file alone says
which method, preset and side it scores; the run's preprocessing record
(:mod:`medad_fast.preprocessing`: HU window, hist-eq, crop, side, input range) travels
beside it under its own name (:data:`~medad_fast.preprocessing.PREPROCESSING_KEY`: a pt2
extra file / ONNX ``metadata_props`` entry, readable without medad_fast), and is what
``predict`` applies when it scores with the file: no training data or manifest is read.

* ``pt2``: :func:`torch.export.export` of the module, saved with :func:`torch.export.save`.
  The fused ops stay in the graph as ``torch.ops.medad_fast.*`` (their fake kernels in
  :mod:`medad_fast._registrations` let them be traced), so the file is run where
  ``medad_fast`` (its compiled extension) is importable.
  With ``--aoti`` the program is compiled ahead of time by AOTInductor
  (:func:`torch._inductor.aoti_compile_and_package`: C++ kernels in the file, for the
  machine's CPU / GPU kind; the fused ops are called through the dispatcher). It works on
  the CPU here (about a minute to compile the tiny preset on one core); the file is still
  ``.pt2`` and read the same way.
* ``onnx``: ONNX has no mapping for the custom ops, so the exported graph uses standard
  ops only. The Butterworth high-pass becomes a matrix DFT
  (:class:`MatrixButterworthHighpass`: precomputed real cosine / sine DFT matrices as
  constants, ``X = F_H x F_W^T``, the gain, the inverse; plain MatMuls). Chosen over ONNX's
  ``DFT`` operator because every runtime runs MatMul fast and exactly (``DFT`` needs opset
  17, complex layouts and is missing or slow in some runtimes); its cost,
  ``O(H W (H + W))`` multiply-adds, is small next to the networks (at 256 x 256: 12
  products of 256 x 256 matrices per slice). Every other op runs its pure-PyTorch
  reference (:mod:`medad_fast.reference`: ``skip_merge`` is a concatenation and a blend).
  Scored with ONNX Runtime (``pip install medad-fast[onnx]``).

Every registered method exports: frequency_aware (all modes), ae, draem and ddad (its
refinement net or initial map, whichever the checkpoint's stage scores with). A seed
ensemble (``export --ensemble RUN RUN...``, :mod:`medad_fast.ensemble`) exports as one graph
that runs its members one after another and averages their maps; it is read back as any
exported file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import ops
from .config import Config
from .exported import CONFIG_KEY, EXPORT_FORMATS
from .inference import load_ensemble, load_method
from .io import check_writable_file
from .preprocessing import PREPROCESSING_KEY, decide_preprocessing

__all__ = ["EXPORT_FORMATS", "InferenceModule", "MatrixButterworthHighpass", "export_method", "export_checkpoint"]

#: batch of the example input the export traces with (any batch works afterwards)
EXAMPLE_BATCH = 2


class InferenceModule(nn.Module):
    """What an exported file computes: ``images float32 [B, 1, H, W]`` in [0, 1] ->
    ``(maps float32 [B, H, W], scores float32 [B])``, the method's :meth:`predict` on the
    images in the run's activation layout (as :func:`medad_fast.inference.score_batch`)."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.predict(self.method.to_memory_format(images))


def _dft_matrices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``float64 [n, n]``: ``cos(2 pi k m / n)``, ``sin(2 pi k m / n)``; the
    index product is reduced mod n first so large sides keep full precision."""
    k = torch.arange(n, dtype=torch.int64)
    angle = (torch.outer(k, k) % n).to(torch.float64) * (2 * math.pi / n)
    return torch.cos(angle), torch.sin(angle)


class MatrixButterworthHighpass(nn.Module):
    """The Butterworth high-pass of :func:`medad_fast.ops.butterworth_highpass` for one
    image side, with standard ops only (MatMul and elementwise), for ONNX.

    With ``C_N``, ``S_N`` the cosine and sine DFT matrices (``F_N = C_N - i S_N``), the
    spectrum ``X = F_H x F_W^T`` of a real image ``x [..., H, W]`` is
    ``Re X = C_H x C_W^T - S_H x S_W^T``, ``Im X = -(S_H x C_W^T + C_H x S_W^T)``; the gain
    ``G`` (real and even in the wrapped frequencies) multiplies both, and the real part of
    the inverse ``F_H^* (G X) F_W^{*T} / (H W)`` is
    ``(C_H Yr - S_H Yi) C_W^T - (S_H Yr + C_H Yi) S_W^T`` over ``H W``. The matrices and
    the gain are computed in float64 and stored in the dtype of the filtered images."""

    def __init__(self, d0: float, order: int, height: int, width: int, reference_side: int = 256,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        cutoff = ops.scaled_cutoff(d0, height, width, reference_side)
        cos_h, sin_h = _dft_matrices(height)
        cos_w, sin_w = _dft_matrices(width)
        # distance of the wrapped integer frequency (k or k - N) from zero; H(0, 0) = 0
        fy = torch.arange(height, dtype=torch.float64)
        fx = torch.arange(width, dtype=torch.float64)
        fy, fx = torch.minimum(fy, height - fy), torch.minimum(fx, width - fx)
        distance = torch.sqrt(fy.view(-1, 1) ** 2 + fx.view(1, -1) ** 2)
        gain = torch.where(distance > 0, 1.0 / (1.0 + (cutoff / distance.clamp_min(1e-12)) ** (2 * order)),
                           torch.zeros_like(distance))
        self.size = (height, width)
        for name, value in (("cos_h", cos_h), ("sin_h", sin_h), ("cos_w_t", cos_w.t()), ("sin_w_t", sin_w.t()),
                            ("gain_scaled", gain / (height * width))):
            self.register_buffer(name, value.to(dtype).contiguous())

    @classmethod
    def replacing(cls, module: ops.ButterworthHighpass, height: int, width: int) -> MatrixButterworthHighpass:
        """The matrix form of ``module`` at ``height x width``."""
        return cls(module.d0, module.order, height, width, module.reference_side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"this high-pass was built for {list(self.size)} images; got {list(x.shape[-2:])}")
        dtype = x.dtype
        x = x.to(self.cos_h.dtype)
        ch_x, sh_x = self.cos_h @ x, self.sin_h @ x  # [..., H, W]
        real = ch_x @ self.cos_w_t - sh_x @ self.sin_w_t
        imag = -(sh_x @ self.cos_w_t + ch_x @ self.sin_w_t)
        real, imag = real * self.gain_scaled, imag * self.gain_scaled
        out = (self.cos_h @ real - self.sin_h @ imag) @ self.cos_w_t - (self.sin_h @ real + self.cos_h @ imag) @ self.sin_w_t
        return out.to(dtype)


def _with_matrix_highpass(method: nn.Module, height: int, width: int) -> nn.Module:
    """A copy of ``method`` whose Butterworth high-pass modules are :class:`MatrixButterworthHighpass`."""
    method = copy.deepcopy(method)
    for parent in list(method.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ops.ButterworthHighpass):
                replacement = MatrixButterworthHighpass.replacing(child, height, width)
                setattr(parent, name, replacement.to(next(method.parameters()).device))
    return method


def _batch_dim() -> dict[str, dict[int, object]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


def export_method(method: nn.Module, out: str | os.PathLike, fmt: str, aoti: bool = False) -> Path:
    """Write ``method`` (a :class:`~medad_fast.methods.base.Method` or a
    :class:`~medad_fast.ensemble.SeedEnsemble`, in eval mode, on the CPU) as ``fmt`` (``pt2`` or ``onnx``) to ``out``; ``aoti``: the pt2 file as an
    AOTInductor package. Returns the path written."""
    if aoti and fmt != "pt2":
        raise ValueError(f"--aoti compiles a pt2 file; got --format {fmt}")
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"--format must be one of {list(EXPORT_FORMATS)}; got {fmt!r}")
    out = Path(out)
    config: Config = method.config
    side = config.run.image_size
    example = torch.rand(EXAMPLE_BATCH, 1, side, side, generator=torch.Generator().manual_seed(0))
    if config.preprocessing is None:
        # a method built from a config, not loaded (load_method always supplies a record):
        # the record training would decide for it
        config = config.with_preprocessing(decide_preprocessing(config.run))
    config_json = json.dumps(config.to_dict())
    extra_files = {CONFIG_KEY: config_json, PREPROCESSING_KEY: json.dumps(config.preprocessing.to_dict())}
    out.parent.mkdir(parents=True, exist_ok=True)
    method.eval()
    if fmt == "pt2":
        # traced without autograd: the methods' own no_grad blocks are then no-ops, not
        # grad-mode nodes in the graph (which torch.export.load cannot read back)
        with torch.no_grad():
            program = torch.export.export(InferenceModule(method), (example,), dynamic_shapes=_batch_dim())
        if not aoti:
            torch.export.save(program, out, extra_files=extra_files)
            return out
        if out.exists():
            out.unlink()  # the package is a zip; the config is added to the new one below
        torch._inductor.aoti_compile_and_package(program, package_path=str(out))
        with zipfile.ZipFile(out, "a") as package:
            prefix = package.namelist()[0].split("/")[0]
            for name, text in extra_files.items():
                package.writestr(f"{prefix}/extra/{name}", text)
        return out
    try:
        import onnx
        import onnxscript  # noqa: F401 (what torch.onnx.export(dynamo=True) writes the graph with)
    except ImportError:
        raise ImportError("--format onnx needs onnx and onnxscript: pip install 'medad-fast[onnx]'") from None

    portable = InferenceModule(_with_matrix_highpass(method, side, side)).eval()
    with ops.use_reference():  # standard ops only in the traced graph
        torch.onnx.export(portable, (example,), str(out), input_names=["images"], output_names=["maps", "scores"],
                          dynamic_shapes=_batch_dim(), dynamo=True, external_data=False, verbose=False)
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, extra_files)
    onnx.save(model, str(out))
    return out


def export_checkpoint(checkpoint: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, fmt: str,
                      aoti: bool = False) -> Path:
    """Export the method of a checkpoint (or run directory) as ``fmt`` to ``out``
    (``aoti``: see :func:`export_method`); a list of runs: their seed ensemble
    (:func:`~medad_fast.inference.load_ensemble`), as one graph that runs every member and
    averages their maps (:class:`~medad_fast.ensemble.SeedEnsemble`); the file carries the
    first member's config (the members share method, side and preprocessing record)."""
    out = Path(out)
    if fmt in EXPORT_FORMATS and out.suffix != EXPORT_FORMATS[fmt]:
        raise ValueError(f"--out {out}: a {fmt} file must end in {EXPORT_FORMATS[fmt]}")
    check_writable_file(out)  # before any work
    if isinstance(checkpoint, (str, os.PathLike)):
        method, _ = load_method(checkpoint, "cpu", amp=False)
    else:
        method, _ = load_ensemble(checkpoint, "cpu", amp=False)
    return export_method(method, out, fmt, aoti)
