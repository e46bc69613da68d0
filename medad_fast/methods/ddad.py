"""DDAD (Cai, Chen, Yang, Zhou, Cheng: "Dual-distribution discrepancy with self-supervised
refinement for anomaly detection in medical images", Medical Image Analysis 2023; first
as "Dual-distribution discrepancy for anomaly detection in chest X-rays", MICCAI 2022).

Two ensembles of K autoencoders (:class:`~medad_fast.models.ensemble.AutoencoderEnsemble`,
each one batched pass of grouped convolutions):

* NDM (normative distribution module): K autoencoders trained on the normal slices;
* UDM (unknown distribution module): K autoencoders trained on the normal slices together
  with unlabeled ones (which may hold lesions): each step's batch is the normal batch
  concatenated with as many unlabeled slices, drawn with the step's generator from the
  pool loaded by :meth:`DDADMethod.setup_training` (``unlabeled``: a folder of images;
  ``unlabeled_split``: the ``valid`` or ``test`` split of the run's data folder, labels
  ignored; both: the union).

Stage 1 (the first ``1 - refine_fraction`` of the epochs), loss: the MSE of every
member's reconstruction, summed over the members (each member's gradient is its own
loss's, so the batched ensemble trains exactly as K separate autoencoders would).

Initial anomaly maps of an image ``I`` (``R^n_k``, ``R^u_k``: the members' reconstructions):

* intra-discrepancy ``A_intra = std_k(R^n_k)`` (population std over the NDM members);
* inter-discrepancy ``A_inter = |mean_k(R^n_k) - mean_k(R^u_k)|``.

Stage 2, anomaly score refinement (ASR, the rest of the epochs): the autoencoders are
frozen (eval mode, no gradient); anomalies are synthesised into the normal batch with the
package's fused liver-aware op (:class:`~medad_fast.synthesis.AnomalySynthesizer`, as the
paper's method uses it: the mask inside ``I > 0``), and a small U-Net
(:class:`~medad_fast.models.refinement.RefinementUNet`) maps
``(I_a, A_intra(I_a), A_inter(I_a))`` to DDAD's self-supervised target, the true error
``|I_a - I|``, under an MSE loss.

Inference: the pixel map is the ASR output inside the liver (``I > 0``); before any ASR
step (``refine_fraction`` 0, or a checkpoint from stage 1) it is the initial ``A_inter``.
Image score (``image_score``): ``max_filter``, the package's max of the mean-filtered map
(as every method; the default), or ``mean``, DDAD's mean of the map over the image. On the
phantom slices the mean scored below chance (image AUROC ~0.42, tests/test_ddad.py): the
ASR's small positive floor, summed over the liver, measures the liver's area.

Measured on the demo data (``small`` preset, the 100 test slices as the unlabeled ones,
seed 0): image / pixel AUROC 0.590 / 0.838 with the ASR's map after 20 ASR epochs (0.416 /
0.795 after 10), 0.694 / 0.866 with the initial ``A_inter`` of the same autoencoders
(``refine_fraction 0`` scores with it). A likely reason:
the synthetic anomalies are in no unlabeled image, so the UDM rebuilds them no better than
the NDM and the inter channel tells the ASR nothing about them during its training.

Without unlabeled data the UDM does not exist and the method is DDAD's NDM-only variant:
the initial map is ``A_intra`` and the ASR's inter channel is zero (a warning says so).

What is not DDAD's: the autoencoders are the package's convolutional ones
(:class:`~medad_fast.models.ConvAutoencoder`: a 1x1-conv bottleneck where DDAD's has dense
layers), the ASR U-Net's widths, the anomaly synthesis (the package's Perlin op, not
DDAD's), and the number of ASR epochs (a fraction of the run).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, MethodConfig, setting
from ..data.crop import crops_liver
from ..models.ensemble import AutoencoderEnsemble
from ..models.refinement import RefinementUNet
from ..synthesis import AnomalySynthesizer
from . import register
from .base import Method
from .frequency_aware import training_sources

__all__ = ["DDADConfig", "DDADMethod", "IMAGE_SCORES", "STAGES", "discrepancy_maps", "load_unlabeled_images"]

#: the two training stages, in order (``method_state()["stage"]`` is the index)
STAGES = ("autoencoders", "refinement")
IMAGE_SCORES = ("max_filter", "mean")
UNLABELED_SPLITS = ("valid", "test")


@dataclass
class DDADConfig(MethodConfig):
    """DDAD's settings."""

    architecture_fields = ("members", "ae_width", "latent_channels", "ae_depth", "refine_width", "refine_depth")

    members: int = setting(3, "autoencoders per ensemble (DDAD's K, default 3)")
    ae_width: int = setting(16, "base width of the autoencoder")
    latent_channels: int = setting(16, "channels of the autoencoder's bottleneck")
    ae_depth: int = setting(4, "max-pools of the autoencoder")
    refine_width: int = setting(16, "base width of DDAD's refinement U-Net (ASR)")
    refine_depth: int = setting(3, "max-pools of the refinement U-Net")
    unlabeled: str | None = setting(None, "folder of unlabeled slices for DDAD's UDM ensemble (may hold lesions)")
    unlabeled_split: str | None = setting(None, "use this split (valid or test) of --data as DDAD's unlabeled "
                                                "images, labels ignored")
    unlabeled_batch: int | None = setting(None, "unlabeled slices per step (default: the batch size)")
    refine_fraction: float = setting(1 / 3, "fraction of the epochs that trains DDAD's refinement net (ASR), "
                                            "after the autoencoders")
    image_score: str = setting("max_filter", "image score: max_filter (max of the mean-filtered map) or mean "
                                             "(DDAD's mean of the map)")
    # anomaly synthesis of the ASR stage (the paper's method's liver-aware op)
    p_anomaly: float = setting(0.5, "probability a training sample gets an anomaly")
    max_retries: int = 10
    perlin_threshold: float = 0.5
    roi_threshold: float = 0.0  # liver: I > roi_threshold (synthesis mask and the pixel map)
    source_pool_size: int = setting(256, "anomaly-source images kept on the device")
    score_filter: int | None = setting(None, "side of the image score's mean filter (default: 21 at 256, scaled)")

    def validate(self) -> None:
        need = self.need
        need(isinstance(self.members, int) and self.members >= 2, "members",
             "must be an int >= 2 (the intra-discrepancy is a std over the members)")
        need(self.ae_width >= 1, "ae_width", "must be >= 1")
        need(self.latent_channels >= 1, "latent_channels", "must be >= 1")
        need(isinstance(self.ae_depth, int) and 1 <= self.ae_depth <= 8, "ae_depth", "must be an int in 1..8")
        need(self.refine_width >= 1, "refine_width", "must be >= 1")
        need(isinstance(self.refine_depth, int) and 1 <= self.refine_depth <= 8, "refine_depth",
             "must be an int in 1..8")
        need(self.unlabeled is None or (isinstance(self.unlabeled, str) and bool(self.unlabeled)), "unlabeled",
             "must be None or a folder path")
        need(self.unlabeled_split is None or self.unlabeled_split in UNLABELED_SPLITS, "unlabeled_split",
             f"must be None or one of {list(UNLABELED_SPLITS)}")
        need(self.unlabeled_batch is None or self.unlabeled_batch >= 1, "unlabeled_batch", "must be None or >= 1")
        need(0.0 <= self.refine_fraction < 1.0, "refine_fraction", "must be in [0, 1)")
        need(self.image_score in IMAGE_SCORES, "image_score", f"must be one of {list(IMAGE_SCORES)}")
        self.need_synthesis_settings()
        self.need_score_filter()

    @property
    def has_unlabeled(self) -> bool:
        """Whether unlabeled data is configured (then the UDM ensemble exists)."""
        return self.unlabeled is not None or self.unlabeled_split is not None

    def variant(self) -> str:
        return "" if self.has_unlabeled else "NDM only"


def refine_epochs(epochs: int, fraction: float) -> int:
    """Epochs of the ASR stage: ``round(fraction * epochs)``, at least one when
    ``fraction > 0`` and the run has two epochs or more, and never all of them."""
    if fraction <= 0 or epochs < 2:
        return 0
    return min(epochs - 1, max(1, round(fraction * epochs)))


def discrepancy_maps(normative: torch.Tensor, unknown: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDAD's initial maps from the members' reconstructions ``[K, B, 1, H, W]``:
    ``(A_intra, A_inter)``, each ``[B, 1, H, W]``: the population std over the NDM members,
    and ``|mean NDM - mean UDM|`` (zeros without a UDM)."""
    intra = normative.std(dim=0, correction=0)
    if unknown is None:
        return intra, torch.zeros_like(intra)
    return intra, (normative.mean(dim=0) - unknown.mean(dim=0)).abs()


def _read_folder(folder: str, size: int, crop: bool = False) -> torch.Tensor:
    from ..data.dataset import ImageFileDataset, read_slice
    from ..data.layout import collect_image_files

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"config unlabeled={folder!r} (--unlabeled): folder not found: {path}")
    try:
        files = collect_image_files(path, what="unlabeled (--unlabeled)")
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"config unlabeled={folder!r} (--unlabeled): {exc}") from None
    if crop:  # as the run's training slices: each cut to its liver box
        dataset = ImageFileDataset(files, size, crop=True)
        return torch.stack([dataset[i].crop for i in range(len(dataset))])
    return torch.stack([read_slice(file, None, size)[0] for file in files])


def load_unlabeled_images(config: Config) -> torch.Tensor | None:
    """DDAD's unlabeled pool, ``uint8 [N, 1, S, S]`` (S = ``run.image_size``): the images of
    ``method.unlabeled`` and/or of the ``method.unlabeled_split`` split of ``run.data``
    (normal and abnormal, labels ignored); None when neither is set. Errors name the
    setting and the path."""
    m: DDADConfig = config.method
    parts = []
    if m.unlabeled is not None:
        parts.append(_read_folder(m.unlabeled, config.run.image_size, crops_liver(config.run)))
    if m.unlabeled_split is not None:
        from ..data.bmad import load_split
        if config.run.data is None:
            raise ValueError(f"config unlabeled_split={m.unlabeled_split!r} (--unlabeled-split) needs the run's "
                             f"data folder (--data)")
        try:
            parts.append(load_split(config.run.data, m.unlabeled_split, size=config.run.image_size,
                                    crop=crops_liver(config.run)).images)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"config unlabeled_split={m.unlabeled_split!r} (--unlabeled-split): "
                                    f"{exc}") from None
    return torch.cat(parts) if parts else None


@contextlib.contextmanager
def _frozen(*modules: nn.Module | None):
    """Eval mode (BatchNorm's running statistics, not updated) and no gradient for the
    modules inside the block; their modes are restored afterwards."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@register
class DDADMethod(Method):
    """NDM and UDM autoencoder ensembles (intra / inter discrepancy) + ASR refinement U-Net."""

    name = "ddad"
    summary = ("DDAD (MedIA 2023): NDM/UDM autoencoder ensembles (intra/inter discrepancy) + "
               "self-supervised refinement U-Net (ASR)")
    Config = DDADConfig
    presets = {
        # DDAD's code (MICCAI 2022 release): 64 x 64, K = 3, batch 64, Adam lr 5e-4, 250
        # epochs of autoencoder training; the encoder starts at 16 channels and the
        # bottleneck is 4 x 4 (depth 4) with 16 latent channels. 375 epochs with a third
        # for the ASR keep DDAD's 250 for the autoencoders (the ASR's count is ours).
        "paper": {"image_size": 64, "members": 3, "batch_size": 64, "lr": 5e-4, "epochs": 375,
                  "ae_width": 16, "latent_channels": 16, "ae_depth": 4, "refine_width": 16, "refine_depth": 3},
        # the demo's data and side on a CPU (200 slices: 25 steps of 8 per epoch), 20 epochs
        # of autoencoders + 20 of ASR (10 of ASR: image AUROC 0.416 on the demo, 20: 0.590).
        # Measured on the demo data with its 100 test slices as the unlabeled ones, one
        # thread of a busy 2-core machine: 10-23 s per autoencoder epoch, 3.5-8 s per ASR
        # epoch; the whole run took 4.5 minutes
        "small": {"image_size": 96, "members": 3, "batch_size": 8, "lr": 1e-3, "epochs": 40,
                  "refine_fraction": 0.5, "ae_width": 8, "latent_channels": 8, "ae_depth": 3, "refine_width": 8,
                  "refine_depth": 3, "source_pool_size": 64},
        # for tests: seconds on one CPU thread; 3 epochs = 2 of autoencoders + 1 of ASR
        "tiny": {"image_size": 32, "members": 2, "batch_size": 4, "lr": 1e-3, "epochs": 3, "ae_width": 2,
                 "latent_channels": 2, "ae_depth": 2, "refine_width": 2, "refine_depth": 2, "source_pool_size": 4},
    }
    # the stages train disjoint networks: DDP must not wait for the idle one's gradients
    find_unused_parameters = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: DDADConfig = config.method
        self.normative = AutoencoderEnsemble(m.members, m.ae_width, m.latent_channels, m.ae_depth)
        self.unknown = (AutoencoderEnsemble(m.members, m.ae_width, m.latent_channels, m.ae_depth)
                        if m.has_unlabeled else None)
        self.refiner = RefinementUNet(3, m.refine_width, m.refine_depth)
        self.stage = 0
        self.synthesizer: AnomalySynthesizer | None = None
        self.unlabeled_images: torch.Tensor | None = None

    # ------------------------------------------------------------------ training
    @property
    def autoencoder_epochs(self) -> int:
        run = self.config.run
        return run.epochs - refine_epochs(run.epochs, self.config.method.refine_fraction)

    def setup_training(self, device: torch.device) -> None:
        m: DDADConfig = self.config.method
        unlabeled = load_unlabeled_images(self.config)
        if unlabeled is None:
            warnings.warn("ddad: no unlabeled images, so no UDM ensemble: training DDAD's NDM-only variant "
                          "(anomaly map from the intra-discrepancy of the normal ensemble). Give unlabeled "
                          "slices with --unlabeled DIR or --unlabeled-split valid|test for DDAD's "
                          "inter-discrepancy.", UserWarning, stacklevel=2)
        else:
            self.unlabeled_images = unlabeled.to(device)
        if refine_epochs(self.config.run.epochs, m.refine_fraction) > 0:
            sources = training_sources(self.config, m.source_pool_size)
            self.synthesizer = AnomalySynthesizer(
                sources.to(device=device, dtype=torch.float32), p_anomaly=m.p_anomaly, max_retries=m.max_retries,
                threshold=m.perlin_threshold, roi_threshold=m.roi_threshold)

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        # DDAD's Adam at a constant lr for each stage; an optimiser whose parameters got no
        # gradient this step is not stepped (Trainer.train_step)
        lr = self.config.run.lr
        autoencoders = list(self.normative.parameters())
        if self.unknown is not None:
            autoencoders += list(self.unknown.parameters())
        return [torch.optim.Adam(autoencoders, lr=lr), torch.optim.Adam(self.refiner.parameters(), lr=lr)], []

    def on_train_step(self, step: int, steps_per_epoch: int) -> None:
        self.stage = int(step >= self.autoencoder_epochs * steps_per_epoch)

    def unlabeled_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` unlabeled slices drawn uniformly (with replacement) by ``generator``,
        float in [0, 1] ``[n, 1, S, S]``."""
        pool = self.unlabeled_images
        index = torch.randint(0, pool.shape[0], (n,), generator=generator, device=generator.device)
        return pool[index.to(pool.device)].float().div_(255.0)

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage == 0:
            return self._autoencoder_step(images, generator)
        return self._refinement_step(images, generator)

    def _autoencoder_step(self, images: torch.Tensor, generator: torch.Generator
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def member_mse(ensemble: AutoencoderEnsemble, batch: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                reconstructions = ensemble(self.to_memory_format(batch))
            return (reconstructions.float() - batch.unsqueeze(0)).square().flatten(1).mean(dim=1)  # [K]

        normative = member_mse(self.normative, images)
        loss = normative.sum()  # summed: each member's gradient is its own MSE's
        terms = {"loss_ndm": normative.detach().mean()}
        if self.unknown is not None:
            if self.unlabeled_images is None:
                raise RuntimeError("setup_training() must run before the first training step")
            n = self.config.method.unlabeled_batch or images.shape[0]
            mixed = torch.cat([images, self.unlabeled_batch(n, generator).to(images.dtype)])
            unknown = member_mse(self.unknown, mixed)
            loss = loss + unknown.sum()
            terms["loss_udm"] = unknown.detach().mean()
        return loss, terms

    def _refinement_step(self, images: torch.Tensor, generator: torch.Generator
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.synthesizer is None:
            raise RuntimeError("setup_training() must run before the first training step (and the ASR stage "
                               "needs refine_fraction > 0)")
        with torch.no_grad():
            augmented, mask = self.synthesizer(images, generator)
        intra, inter = self.initial_maps(augmented)
        target = (augmented - images).abs()  # DDAD's self-supervised target: the true error
        with self.autocast():
            refined = self.refiner(self.to_memory_format(torch.cat([augmented, intra, inter], dim=1)))
        loss = F.mse_loss(refined.float(), target.float())
        terms = {"loss_asr": loss.detach(),
                 "anomalous_fraction": (mask.flatten(1).amax(dim=1) > 0).float().mean()}
        return loss, terms

    # ------------------------------------------------------------------ inference
    def initial_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_intra, A_inter)`` ``[B, 1, H, W]`` of images ``[B, 1, H, W]`` (float32), the
        autoencoders frozen (:func:`discrepancy_maps`)."""
        with _frozen(self.normative, self.unknown), self.autocast():
            x = self.to_memory_format(images)
            normative = self.normative(x).float()
            unknown = self.unknown(x).float() if self.unknown is not None else None
        return discrepancy_maps(normative, unknown)

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        intra, inter = self.initial_maps(images)
        if self.stage >= 1:
            with self.autocast():
                maps = self.refiner(self.to_memory_format(torch.cat([images, intra, inter], dim=1))).float()
        else:
            maps = inter if self.unknown is not None else intra
        roi = (images > self.config.method.roi_threshold).to(maps.dtype)
        return (maps * roi).squeeze(1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps, scores)`` as :meth:`Method.predict`; the score is ``image_score``'s:
        ``max_filter`` (the max of the mean-filtered map) or ``mean`` (DDAD's: the mean of
        the map over the image)."""
        maps, scores = super().predict(images)
        if self.config.method.image_score == "mean":
            scores = maps.flatten(1).mean(dim=1)
        return maps, scores

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"stage": int(self.stage)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 0))

    def log_values(self) -> dict[str, float]:
        return {"stage": float(self.stage)}
