"""SQUID (Xiang, Zhang, Chen, Yuille, Zhou, Zhou: "SQUID: Deep Feature In-Painting for
Unsupervised Anomaly Detection", CVPR 2023).

Radiographs repeat the same anatomy at the same place; SQUID keeps, per patch position, a
queue of normal patch features and in-paints each patch's feature from it, so that a
pattern never seen in a normal image cannot be reproduced. Networks:
:mod:`medad_fast.models.squid`.

One training step on a batch of normal slices ``I [B, 1, S, S]``:

1. the image is cut into a ``G x G`` grid of patches; one encoder (shared weights) maps
   each patch to a feature ``[C, h, h]``;
2. the in-painting block (:class:`~medad_fast.models.squid.InpaintingBlock`) reads the
   spatial-aware memory queue (per position: cosine similarity / temperature, softmax,
   MemAE's hard shrinkage ``relu(w - lambda) w / (|w - lambda| + eps)``, renormalised) and
   predicts each patch's feature from the memory reads of its 8 neighbours (a transformer
   layer), with SQUID's masked shortcut in training;
3. the student decoder (generator) rebuilds the image ``I_s`` from the in-painted
   features, recombined into one map; the teacher decoder rebuilds ``I_t`` from the plain
   encoder features (detached, as SQUID's teacher path); distillation: the MSE between the
   two decoders' features at every level, summed;
4. the discriminator ``D`` tells real slices from the in-painted ``I_s``.

Loss (SQUID's weights, its ZhangLab configuration):
``L_G = 10 MSE(I_s, I) + 0.01 MSE(I_t, I) + 0.001 distillation + 0.005 BCE(D(I_s), real)``,
``L_D = 0.005 [BCE(D(I), real) + BCE(D(stopgrad I_s), fake)]``.
After the step the batch's bottleneck features are written to the queue (FIFO, detached);
under DDP every rank writes the features of EVERY rank's batch, gathered in rank order, so
all ranks hold the same memory.

The two adversaries in one backward. The engine computes one loss, runs one backward and
steps every optimiser (generator side: encoder, in-painting, decoders; discriminator). The
loss returned is ``L_G + L_D``, built so that each part reaches only its own side:
``L_D`` sees the in-painted image detached (no gradient to the generator), and the
generator's adversarial term evaluates ``D`` with its parameters detached
(``torch.func.functional_call``): the gradient flows through ``D`` into ``I_s`` but none is
left on ``D``'s parameters. So the generator step is exactly SQUID's generator step and
the discriminator step SQUID's discriminator step, both taken on the same batch (SQUID
alternates them on a batch; ``n_critic`` 1, its base configuration's value).

Inference (eval mode, no queue writes):

* image score (``image_score = discriminator``, SQUID's): ``1 - sigmoid(D(I_s))``, high
  where the discriminator finds the in-painted slice unrealistic (SQUID further
  standardises the logits by their mean and std on the training set, which does not
  change the ranking); ``max_filter``: the package's max of the mean-filtered pixel map;
* pixel map (SQUID has none; the package's choice): the Gaussian-smoothed residual
  ``|I - I_s|`` of the in-painted reconstruction inside the liver (``I > 0``), as the
  autoencoder baseline's.

Measured on the demo data (``small`` preset, seed 0, one CPU thread, 3.6 min): image AUROC
0.507 with the discriminator's score (it finds every in-painted slice fake: scores 0.968 to
0.998), 0.817 with ``max_filter``; pixel AUROC 0.969, pixel AP 0.423.

Images of another size than ``run.image_size`` are resized to it (the memory's items have
the training size's shape) and the reconstruction resized back.

What is not SQUID's: the cosine similarity with a temperature in the memory read (SQUID:
the raw dot product; the ZhangLab configuration keeps the top 5 weights instead of a
threshold); no skip connections and no extra memory matrices in the decoder (SQUID's base
configuration; its ZhangLab one adds two); the decoder works on the whole recombined map
from the bottleneck up (SQUID recombines the patches two levels before the output); the
generator's lr schedule is a cosine over the run's epochs down to 0.1 lr (SQUID: over 300).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .. import distributed
from ..config import Config, MethodConfig, setting
from ..models.scoring import smoothed_residual_map
from ..models.squid import Decoder, Discriminator, InpaintingBlock, PatchEncoder, patchify, unpatchify
from . import register
from .base import Method, image_scores

__all__ = ["IMAGE_SCORES", "SquidConfig", "SquidMethod"]

IMAGE_SCORES = ("discriminator", "max_filter")


@dataclass
class SquidConfig(MethodConfig):
    """SQUID's settings; the defaults are its ZhangLab configuration's (its code)."""

    architecture_fields = ("grid", "levels", "squid_width", "memory_slots", "heads", "disc_width", "disc_depth")

    grid: int = setting(2, "SQUID: patches per side of the image (a grid x grid cut)")
    levels: int = setting(4, "SQUID: max-pools of the patch encoder")
    squid_width: int = setting(32, "SQUID: base width of the encoder and decoders")
    memory_slots: int = setting(200, "SQUID: features kept per patch position in the memory queue")
    heads: int = 8  # of the in-painting block's attention
    temperature: float = setting(0.1, "SQUID: temperature of the memory read's cosine-similarity softmax")
    shrink_threshold: float | None = setting(None, "SQUID: hard-shrinkage threshold of the memory's attention "
                                                   "weights (default 1 / memory_slots)")
    mask_ratio: float = 0.95  # SQUID's masked shortcut: the in-painted feature's share in training
    disc_width: int = setting(16, "SQUID: width of the discriminator's first conv")
    disc_depth: int = 5
    # loss weights (SQUID's ZhangLab configuration)
    recon_weight: float = 10.0
    teacher_weight: float = 0.01
    distill_weight: float = 0.001
    adversarial_weight: float = 0.005  # the generator's
    discriminator_weight: float = 0.005
    disc_lr: float | None = None  # default: the run's lr (SQUID: both 1e-4)
    image_score: str = setting("discriminator", "SQUID image score: discriminator (SQUID's) or max_filter (max of "
                                                "the mean-filtered pixel map)")
    residual_sigma: float = 4.0  # pixels at 256 x 256, scaled with the side
    roi_threshold: float = 0.0  # the map is kept where I > roi_threshold (the liver)
    score_filter: int | None = None

    def validate(self) -> None:
        need = self.need
        for name in ("grid", "levels", "squid_width", "memory_slots", "heads", "disc_width", "disc_depth"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an int >= 1")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.shrink_threshold is None or 0.0 <= self.shrink_threshold < 1.0, "shrink_threshold",
             "must be None or in [0, 1)")
        need(0.0 < self.mask_ratio <= 1.0, "mask_ratio", "must be in (0, 1]")
        for name in ("recon_weight", "teacher_weight", "distill_weight", "adversarial_weight",
                     "discriminator_weight", "residual_sigma"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.disc_lr is None or self.disc_lr > 0, "disc_lr", "must be None or > 0")
        need(self.image_score in IMAGE_SCORES, "image_score", f"must be one of {list(IMAGE_SCORES)}")
        self.need_score_filter()

    @property
    def threshold(self) -> float:
        return 1.0 / self.memory_slots if self.shrink_threshold is None else self.shrink_threshold


@register
class SquidMethod(Method):
    """SQUID: patch encoder, spatial-aware memory queue, in-painting, student/teacher decoders, discriminator."""

    name = "squid"
    summary = ("SQUID (CVPR 2023): patch features in-painted from a spatial-aware memory queue, "
               "teacher-student decoders + discriminator; map = smoothed |I - I_s| in the liver")
    Config = SquidConfig
    # --compile: the in-painting block draws its training mask from the step's generator,
    # which dynamo cannot trace: the network is compiled in pieces around that draw
    compile_fullgraph = False
    # seen with torch 2.13 on the CPU: inductor's backward of the small preset's networks
    # aborts the process in a generated kernel (im2col/col2im with index_put); tiny trains
    compile_training = False
    compile_training_note = ("inductor's compiled backward of squid's networks aborted the process at the "
                             "small preset (torch 2.13, CPU)")
    presets = {
        # SQUID's ZhangLab configuration: 128 x 128, batch 16, lr 1e-4, 200 epochs, 2 x 2 patches,
        # 4 levels from 32 channels (512 at 4 x 4: memory items of 128 x 4 x 4 = 2048 values),
        # 200 slots per position, 8 attention heads
        "paper": {"image_size": 128, "batch_size": 16, "lr": 1e-4, "epochs": 200, "grid": 2, "levels": 4,
                  "squid_width": 32, "memory_slots": 200, "heads": 8, "disc_width": 16, "disc_depth": 5},
        # the demo's side on a CPU: 3 x 3 patches of 32 px, 3 levels from 8 channels (64 at
        # 4 x 4: items of 16 x 4 x 4 = 256 values), 100 slots per position
        "small": {"image_size": 96, "batch_size": 8, "lr": 1e-3, "epochs": 40, "grid": 3, "levels": 3,
                  "squid_width": 8, "memory_slots": 100, "heads": 4, "disc_width": 8, "disc_depth": 4},
        # for tests: seconds on one CPU thread (items of 2 x 4 x 4 = 32 values)
        "tiny": {"image_size": 32, "batch_size": 4, "lr": 1e-3, "epochs": 3, "grid": 2, "levels": 2,
                 "squid_width": 2, "memory_slots": 8, "heads": 2, "disc_width": 2, "disc_depth": 3},
    }

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: SquidConfig = config.method
        side = config.run.image_size
        if side % (m.grid * 2 ** m.levels):
            raise ValueError(f"image_size {side} must be a multiple of grid x 2^levels = {m.grid * 2 ** m.levels}")
        width, channels = m.squid_width, m.squid_width * 2 ** m.levels
        self.feature_side = side // m.grid // 2 ** m.levels
        item = max(1, channels // 4) * self.feature_side ** 2  # values per memory item
        if item % m.heads:
            raise ValueError(f"heads {m.heads} must divide the memory items' {item} values")
        self.encoder = PatchEncoder(width, m.levels)
        self.inpainting = InpaintingBlock(channels, self.feature_side, m.grid, m.memory_slots, m.heads, m.temperature,
                                          m.threshold, m.mask_ratio)
        self.decoder = Decoder(width, m.levels)  # the student: the generator's output
        self.teacher = Decoder(width, m.levels)
        self.discriminator = Discriminator(m.disc_width, m.disc_depth)

    @property
    def memory(self):
        """The spatial-aware memory queue (:class:`~medad_fast.models.squid.MemoryQueue`)."""
        return self.inpainting.memory

    # ------------------------------------------------------------------ training
    def generator_parameters(self) -> list[torch.nn.Parameter]:
        """Everything but the discriminator: encoder, in-painting block, both decoders."""
        modules = (self.encoder, self.inpainting, self.decoder, self.teacher)
        return [p for module in modules for p in module.parameters()]

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        # SQUID's Adam settings: betas (0.5, 0.999); the generator's with eps 1e-7 and weight decay 1e-5
        m, run = self.config.method, self.config.run
        generator = torch.optim.Adam(self.generator_parameters(), lr=run.lr, betas=(0.5, 0.999), eps=1e-7,
                                     weight_decay=1e-5)
        discriminator = torch.optim.Adam(self.discriminator.parameters(), lr=m.disc_lr or run.lr, betas=(0.5, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(generator, T_max=max(1, run.epochs), eta_min=0.1 * run.lr)
        return [generator, discriminator], [schedule]

    def networks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Images ``[B, 1, S, S]`` (S = ``run.image_size``) -> ``student`` (the in-painted
        reconstruction ``I_s [B, 1, S, S]``), ``teacher`` (``I_t``), ``student_levels`` /
        ``teacher_levels`` (the decoders' features per level) and ``queries`` (the memory
        queries ``[B, P, D]``, to be written after a training step)."""
        grid = self.config.method.grid
        # training writes the queue before the backward: the reads use a copy (see snapshot)
        memory = self.memory.snapshot() if self.training else None
        with self.autocast():
            features = self.encoder(self.to_memory_format(patchify(images, grid)))
            inpainted, queries = self.inpainting(features, generator, memory)
            student, student_levels = self.decoder(self.to_memory_format(unpatchify(inpainted, grid)))
            # SQUID's teacher path: the plain encoder features, detached
            teacher, teacher_levels = self.teacher(self.to_memory_format(unpatchify(features.detach(), grid)))
        return {"student": student, "teacher": teacher, "student_levels": student_levels,
                "teacher_levels": teacher_levels, "queries": queries}

    def frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """``D(images)`` with ``D``'s parameters detached: gradients reach ``images`` only."""
        parameters = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, parameters, (images,))

    def losses(self, images: torch.Tensor, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """``(L_G, L_D, terms, queries)`` of one batch (module docstring); ``queries
        [B, P, D]`` (detached) are what a training step writes to the memory, which this
        does not."""
        m: SquidConfig = self.config.method
        out = self.networks(images, generator)
        student, teacher = out["student"].float(), out["teacher"].float()
        recon = F.mse_loss(student, images)
        teacher_recon = F.mse_loss(teacher, images)
        distill = torch.stack([F.mse_loss(s.float(), t.float())
                               for s, t in zip(out["student_levels"], out["teacher_levels"])]).sum()
        with self.autocast():
            fooled = self.frozen_discriminator(student.to(images.dtype)).float()
            real_logits = self.discriminator(images).float()
            fake_logits = self.discriminator(student.detach().to(images.dtype)).float()
        adversarial = F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled))
        d_real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        d_fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
        generator_loss = (m.recon_weight * recon + m.teacher_weight * teacher_recon + m.distill_weight * distill
                          + m.adversarial_weight * adversarial)
        discriminator_loss = m.discriminator_weight * (d_real + d_fake)
        terms = {"loss_recon": recon.detach(), "loss_teacher": teacher_recon.detach(), "loss_distill": distill.detach(),
                 "loss_adversarial": adversarial.detach(), "loss_d_real": d_real.detach(),
                 "loss_d_fake": d_fake.detach()}
        return generator_loss, discriminator_loss, terms, out["queries"].detach()

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        generator_loss, discriminator_loss, terms, queries = self.losses(images, generator)
        if self.training:
            self.write_memory(queries)
        return generator_loss + discriminator_loss, terms

    def write_memory(self, queries: torch.Tensor) -> None:
        """Write this step's queries ``[B, P, D]`` to the queue; under DDP every rank's, in
        rank order (the same write on every rank). The reads of this step are done, so the
        write takes effect from the next step (as SQUID's enqueue-then-update)."""
        self.memory.write(distributed.all_gather_uneven(queries.float()))

    # ------------------------------------------------------------------ inference
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        return self._maps_and_scores(images)[0]

    def _maps_and_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m: SquidConfig = self.config.method
        side = self.config.run.image_size
        resized = tuple(images.shape[-2:]) != (side, side)
        x = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False) if resized else images
        student = self.networks(x)["student"].float()
        with self.autocast():
            realness = self.discriminator(student.to(x.dtype)).float()
        if resized:
            student = F.interpolate(student, size=images.shape[-2:], mode="bilinear", align_corners=False)
        sigma = m.residual_sigma * side / 256
        maps = smoothed_residual_map(images, student, sigma, m.roi_threshold)
        return maps, torch.sigmoid(-realness)  # 1 - sigmoid(D): high where D finds I_s unrealistic

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps, scores)`` as :meth:`Method.predict`, from one pass of the networks; the
        score is ``image_score``'s: ``discriminator`` (SQUID's ``1 - sigmoid(D(I_s))``) or
        ``max_filter`` (the max of the mean-filtered map)."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
        was_training = self.training
        self.eval()
        try:
            maps, scores = self._maps_and_scores(images)
        finally:
            self.train(was_training)
        if self.config.method.image_score == "max_filter":
            scores = image_scores(maps, self.score_filter)
        return maps, scores.float()

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        # the queue's contents are a buffer (in the weights); its write pointer is here
        return {"memory_pointer": int(self.memory.pointer)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.memory.pointer = int(state.get("memory_pointer", 0))

    def log_values(self) -> dict[str, float]:
        return {"memory_pointer": float(self.memory.pointer)}
