"""SQUID (Xiang, Zhang, Chen, Yuille, Zhou, Zhou: "SQUID: Deep Feature In-Painting for
Unsupervised Anomaly Detection", CVPR 2023; public code github.com/tiangexiang/SQUID, whose
``configs/zhang_best.py`` on top of ``configs/base.py`` is the configuration followed here).

Radiographs repeat the same anatomy at the same place; SQUID keeps, per patch position, a
queue of normal patch features and in-paints each patch's feature from it, so that a
pattern never seen in a normal image cannot be reproduced. Networks:
:mod:`medad_fast.models.squid`.

One training step on a batch of normal images ``I [B, 1, S, S]`` in [0, 1]:

0. SQUID's loader augmentation, ``RandomAffine(0, translate=(0.05, 0.05), scale=(0.95,
   1.05))`` (nearest, zero fill), applied here on the training device to the batch
   (:func:`random_affine`, drawn from the step's generator);
1. the image is cut into a ``G x G`` grid of patches; one residual encoder (shared weights,
   stride-2 levels) maps each patch to a bottleneck feature and keeps every level's
   feature as a skip;
2. the in-painting block (:class:`~medad_fast.models.squid.InpaintingBlock`) reads the
   spatial-aware memory queue (per position: raw dot product, softmax, top-``k`` with the
   straight-through estimator, :func:`~medad_fast.models.squid.top_k_attention`) and
   predicts each patch's feature from the memory reads of its 8 neighbours (a transformer
   layer), with SQUID's masked shortcut in training;
3. the student decoder (generator) rebuilds ``I_s`` from the in-painted features: its two
   deepest levels concatenate the encoder's skips and are followed by a learned memory
   matrix block each (per window of the map, the same top-``k`` read), the patches are
   recombined two levels before the output; the teacher decoder (the same without the
   memory blocks) rebuilds ``I_t`` from the encoder's bottleneck and skips, detached;
   distillation: the MSE between the two decoders' outputs at every level, summed;
4. the discriminator ``D`` tells real images from the in-painted ``I_s``.

Loss (ZhangLab's weights):
``L_G = 10 MSE(I_s, I) + 0.01 MSE(I_t, I) + 0.001 distillation + 0.005 BCE(D(I_s), real)``,
``L_D = 0.005 [BCE(D(I), real) + BCE(D(stopgrad I_s), fake)]``.
``n_critic`` (ZhangLab's 2): ``D`` steps on every batch, the generator on every
``n_critic``-th batch of an epoch (the 1st, 3rd, ...). After a generator step the batch's
bottleneck queries are written to the queue (FIFO, detached), as SQUID's ``update()``
(only after generator steps); under DDP every rank writes the queries of EVERY rank's
batch, gathered in rank order, so all ranks hold the same memory. Optimisers (SQUID's):
Adam, betas (0.5, 0.999); the generator's (encoder, in-painting, both decoders with their
memory matrices) with eps 1e-7 and weight decay 1e-5 and a cosine schedule to 0.1 lr; the
discriminator's at ``disc_lr`` (ZhangLab's ``gan_lr``, 1e-4), no schedule.

The two adversaries in one backward. The engine computes one loss, runs one backward and
steps every optimiser with a gradient. On a generator step the loss is ``L_G + L_D``,
built so that each part reaches only its own side: ``L_D`` sees the in-painted image
detached, and the generator's adversarial term evaluates ``D`` with its parameters detached
(``torch.func.functional_call``); on a discriminator-only step it is ``L_D`` alone (the
generator's parameters get no gradient, so Adam leaves them, momentum and weight decay
included, untouched).

Inference (eval mode, no queue writes):

* image score (``image_score = discriminator``, SQUID's): ``-D(I_s)``, ``D`` normalising
  each image by its own statistics (SQUID scores one image at a time with ``D`` in
  training mode); SQUID reports ``1 - sigmoid((D(I_s) - m) / s)`` with ``m, s`` the mean
  and std of ``D``'s logits over (up to 201 of) the training images: a strictly
  increasing function of ``-D(I_s)``, so the AUROC and AP are the same; ``max_filter``:
  the package's max of the mean-filtered pixel map;
* pixel map (SQUID has none; the package's choice): the Gaussian-smoothed residual
  ``|I - I_s|`` of the in-painted reconstruction inside the foreground (``I > 0``), as the
  autoencoder baseline's.

Images of another size than ``run.image_size`` are resized to it (the memory's items have
the training size's shape) and the reconstruction resized back.

Presets: ``paper`` is ZhangLab's (128 x 128, batch 16, lr 1e-4, 200 epochs, 2 x 2 patches,
4 levels from 32 channels, 200 queue slots, 200 slots per decoder memory matrix, top 5);
``medianomaly`` is the MedIAnomaly benchmark's protocol (Cai et al., github
caiyu6666/MedIAnomaly): grayscale, bilinear to 64 x 64, intensities in [0, 1] (SQUID's
own range: its loader's ToTensor in, its decoders' sigmoid out), no augmentation beyond
SQUID's own RandomAffine (part of the method), SQUID's network at that side (bottleneck 2 x 2, memory
items of 512 values, ``D``'s map 2 x 2) and its 200 epochs. SQUID's own code would
differ in the side: it trains at 128 x 128 (its ``memory_channel`` 2048, decoder
multipliers 16 / 64 and ``D``'s ``size`` 4 are fixed to that side); the preset keeps the
benchmark's 64 x 64 (a run on a CPU passes fewer ``--epochs``: one epoch of BrainTumor's
998 training images is 62 steps of 2-5 s on one CPU thread). ``small`` and
``tiny`` are scaled down for CPUs and tests.

What is not SQUID's, and why:

* on a generator step, ``D`` and the generator step from the same forward pass and ``D``'s
  weights before this step's update (SQUID: ``D`` steps first, then a second forward of the
  generator is judged by the updated ``D``): the engine runs one loss and one backward per
  step (one synchronised graph under DDP);
* every random draw (affine, masks) comes from the step's ``torch.Generator``, not torch's
  global one, so that a resumed run repeats the same draws;
* the affine is ``affine_grid`` / ``grid_sample`` (nearest, zeros) on the tensor, not
  torchvision on the PIL image: the same map, but ``grid_sample`` rounds a sampling point
  exactly on a pixel boundary to the even neighbour where PIL floors it;
* the image score is ``-D(I_s)`` (above), not SQUID's standardised sigmoid: same ranking,
  and it cannot saturate (in float32 ``1 - sigmoid`` of a logit below about -17 is exactly
  1, which ties every image ``D`` finds fake);
* the generator's cosine schedule runs over 1.5 x the run's epochs (ZhangLab's ``T_max``
  300 for its 200 epochs; the same at the ``paper`` preset);
* SQUID saves the weights whenever the validation AUROC (labelled normal and abnormal
  images) is within 0.5 points of its best; training here has no labels: the last weights
  are kept;
* the pixel map (above) and the DDP memory write (SQUID's queue is single-GPU only).
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
from ..models.squid import Decoder, Discriminator, InpaintingBlock, PatchEncoder, patchify, squid_widths
from .registry import register
from .base import Method

__all__ = ["IMAGE_SCORES", "AFFINE_TRANSLATE", "AFFINE_SCALE", "EPOCHS_MEDIANOMALY", "random_affine", "SquidConfig",
           "SquidMethod"]

IMAGE_SCORES = ("discriminator", "max_filter")
#: SQUID's loader: ``RandomAffine(0, translate=(0.05, 0.05), scale=(0.95, 1.05))``
AFFINE_TRANSLATE = 0.05
AFFINE_SCALE = (0.95, 1.05)
#: epochs of the ``medianomaly`` preset: ZhangLab's (see the module docstring)
EPOCHS_MEDIANOMALY = 200


def affine_warp(images: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``images [B, C, H, W]`` scaled by ``scale [B]`` about the image centre, then shifted by
    ``shift [B, 2]`` pixels (x right, y down), nearest sampling, zeros outside: output pixel
    ``p`` (centre-relative) is input ``(p - shift) / scale`` (torchvision's affine with angle
    and shear 0)."""
    B, _, H, W = images.shape
    scale = scale.to(images.device, torch.float32)
    shift = shift.to(images.device, torch.float32)
    theta = torch.zeros(B, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, 0, 2] = -2.0 * shift[:, 0] / (W * scale)
    theta[:, 1, 2] = -2.0 * shift[:, 1] / (H * scale)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
                         align_corners=False).to(images.dtype)


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """SQUID's ``RandomAffine(0, translate=(0.05, 0.05), scale=(0.95, 1.05))`` per image:
    shifts ``round(U(-0.05 W, 0.05 W))`` and ``round(U(-0.05 H, 0.05 H))`` pixels, scale
    ``U(0.95, 1.05)`` (torchvision's draws), all from ``generator`` (one ``[B, 3]`` draw)."""
    B, _, H, W = images.shape
    u = torch.rand(B, 3, generator=generator, device=generator.device).to(images.device)
    limits = torch.tensor([AFFINE_TRANSLATE * W, AFFINE_TRANSLATE * H], device=images.device)
    shift = torch.round((2.0 * u[:, :2] - 1.0) * limits)
    low, high = AFFINE_SCALE
    return affine_warp(images, shift, low + (high - low) * u[:, 2])


@dataclass
class SquidConfig(MethodConfig):
    """SQUID's settings; the defaults are its ZhangLab configuration's (its code)."""

    architecture_fields = ("grid", "levels", "squid_width", "memory_slots", "decoder_memory_slots", "heads",
                           "disc_width", "disc_depth")

    grid: int = setting(2, "SQUID: patches per side of the image (a grid x grid cut)")
    levels: int = setting(4, "SQUID: stride-2 levels of the patch encoder (>= 2)")
    squid_width: int = setting(32, "SQUID: base width of the encoder and decoders")
    memory_slots: int = setting(200, "SQUID: features kept per patch position in the memory queue")
    decoder_memory_slots: int = setting(200, "SQUID: slots of each learned memory matrix of the decoder")
    top_k: int = setting(5, "SQUID: the memory reads keep the weights above the top_k-th largest (shrink_thres)")
    heads: int = 8  # of the in-painting block's attention
    mask_ratio: float = 0.95  # SQUID's masked shortcut: the in-painted feature's share in training
    n_critic: int = setting(2, "SQUID: the generator steps on every n_critic-th batch, the discriminator on all")
    random_affine: bool = setting(True, "SQUID: its loader's RandomAffine (translate 0.05, scale 0.95-1.05)")
    disc_width: int = setting(16, "SQUID: width of the discriminator's first conv")
    disc_depth: int = 5
    # loss weights (SQUID's ZhangLab configuration)
    recon_weight: float = 10.0
    teacher_weight: float = 0.01
    distill_weight: float = 0.001
    adversarial_weight: float = 0.005  # the generator's
    discriminator_weight: float = 0.005
    disc_lr: float | None = None  # default: the run's lr (ZhangLab: both 1e-4)
    image_score: str = setting("discriminator", "SQUID image score: discriminator (SQUID's, -D(I_s)) or max_filter "
                                                "(max of the mean-filtered pixel map)", choices=IMAGE_SCORES)
    residual_sigma: float = 4.0  # pixels at 256 x 256, scaled with the side
    roi_threshold: float = 0.0  # the map is kept where I > roi_threshold (the foreground)
    score_filter: int | None = None

    def validate(self) -> None:
        need = self.need
        for name in ("grid", "levels", "squid_width", "memory_slots", "decoder_memory_slots", "top_k", "heads",
                     "n_critic", "disc_width", "disc_depth"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "must be an int >= 1")
        need(self.levels >= 2, "levels", "must be >= 2 (SQUID recombines the patches two levels before the output)")
        # the shrinkage zeroes the top_k-th largest weight itself: top_k 1 would read nothing
        need(2 <= self.top_k <= min(self.memory_slots, self.decoder_memory_slots), "top_k",
             "must be >= 2 and <= memory_slots and decoder_memory_slots")
        need(isinstance(self.random_affine, bool), "random_affine", "must be true or false")
        need(0.0 < self.mask_ratio <= 1.0, "mask_ratio", "must be in (0, 1]")
        for name in ("recon_weight", "teacher_weight", "distill_weight", "adversarial_weight",
                     "discriminator_weight", "residual_sigma"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.disc_lr is None or self.disc_lr > 0, "disc_lr", "must be None or > 0")
        self.need_score_filter()


@register
class SquidMethod(Method):
    """SQUID: patch encoder, spatial-aware memory queue, in-painting, student/teacher decoders, discriminator."""

    name = "squid"
    summary = ("SQUID (CVPR 2023): patch features in-painted from a spatial-aware memory queue, "
               "teacher-student decoders with memory matrices + discriminator; score -D(I_s)")
    Config = SquidConfig
    # --compile: the in-painting block and the student decoder's memory blocks draw their
    # training masks from the step's generator, which dynamo cannot trace: the networks are
    # compiled in pieces around those draws
    compile_fullgraph = False
    # seen with torch 2.13 on the CPU: inductor's backward of the small preset's networks
    # aborts the process in a generated kernel (im2col/col2im with index_put); tiny trains
    compile_training = False
    compile_training_note = ("inductor's compiled backward of squid's networks aborted the process at the "
                             "small preset (torch 2.13, CPU)")
    # n_critic: the discriminator-only steps leave the generator's parameters without gradients
    find_unused_parameters = True
    _paper = {"batch_size": 16, "lr": 1e-4, "grid": 2, "levels": 4, "squid_width": 32, "memory_slots": 200,
              "decoder_memory_slots": 200, "top_k": 5, "heads": 8, "disc_width": 16, "disc_depth": 5}
    presets = {
        # ZhangLab's configuration: 128 x 128, 200 epochs (memory items of 128 x 4 x 4 = 2048
        # values, decoder memory windows of 256 x 4 x 4 and 128 x 8 x 8)
        "paper": {**_paper, "image_size": 128, "epochs": 200},
        # the MedIAnomaly protocol at 64 x 64 (module docstring): items of 128 x 2 x 2 = 512
        "medianomaly": {**_paper, "image_size": 64, "epochs": EPOCHS_MEDIANOMALY},
        # the demo's side on a CPU: 2 x 2 patches of 48 px, 4 levels from 8 channels (128 at
        # 3 x 3: items of 32 x 3 x 3 = 288 values), 100 slots
        "small": {"image_size": 96, "batch_size": 8, "lr": 1e-3, "epochs": 40, "grid": 2, "levels": 4,
                  "squid_width": 8, "memory_slots": 100, "decoder_memory_slots": 100, "top_k": 5, "heads": 4,
                  "disc_width": 8, "disc_depth": 4},
        # for tests: seconds on one CPU thread (items of 2 x 4 x 4 = 32 values)
        "tiny": {"image_size": 32, "batch_size": 4, "lr": 1e-3, "epochs": 3, "grid": 2, "levels": 2,
                 "squid_width": 2, "memory_slots": 8, "decoder_memory_slots": 8, "top_k": 5, "heads": 2,
                 "disc_width": 2, "disc_depth": 3},
    }
    del _paper

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: SquidConfig = config.method
        side = config.run.image_size
        if side % (m.grid * 2 ** m.levels):
            raise ValueError(f"image_size {side} must be a multiple of grid x 2^levels = {m.grid * 2 ** m.levels}")
        width, channels = m.squid_width, squid_widths(m.squid_width, m.levels)[-1]
        patch_side = side // m.grid
        self.feature_side = patch_side // 2 ** m.levels
        item = max(1, channels // 4) * self.feature_side ** 2  # values per memory item
        if item % m.heads:
            raise ValueError(f"heads {m.heads} must divide the memory items' {item} values")
        self.encoder = PatchEncoder(width, m.levels)
        self.inpainting = InpaintingBlock(channels, self.feature_side, m.grid, m.memory_slots, m.heads, m.top_k,
                                          m.mask_ratio)
        try:  # the student (the generator's output) and the teacher
            self.decoder = Decoder(width, m.levels, m.grid, patch_side, m.decoder_memory_slots, m.top_k, m.mask_ratio)
        except ValueError as error:
            raise ValueError(f"image_size {side}, grid {m.grid}, levels {m.levels}: {error}") from None
        self.teacher = Decoder(width, m.levels, m.grid, patch_side)
        self.discriminator = Discriminator(m.disc_width, m.disc_depth, side)
        self.generator_step = True  # set per step by on_train_step (n_critic)

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
        # SQUID's Adam settings: betas (0.5, 0.999); the generator's with eps 1e-7 and weight
        # decay 1e-5 and ZhangLab's cosine (T_max 300 for 200 epochs, down to 0.1 lr)
        m, run = self.config.method, self.config.run
        generator = torch.optim.Adam(self.generator_parameters(), lr=run.lr, betas=(0.5, 0.999), eps=1e-7,
                                     weight_decay=1e-5)
        discriminator = torch.optim.Adam(self.discriminator.parameters(), lr=m.disc_lr or run.lr, betas=(0.5, 0.999))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(generator, T_max=max(1, round(1.5 * run.epochs)),
                                                              eta_min=0.1 * run.lr)
        return [generator, discriminator], [schedule]

    def on_train_step(self, step: int, steps_per_epoch: int) -> None:
        # SQUID's gan_train: the generator steps when the batch's index in the epoch is a
        # multiple of n_critic
        self.generator_step = (step % steps_per_epoch) % self.config.method.n_critic == 0

    def networks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Images ``[B, 1, S, S]`` (S = ``run.image_size``) -> ``student`` (the in-painted
        reconstruction ``I_s [B, 1, S, S]``), ``teacher`` (``I_t``), ``student_levels`` /
        ``teacher_levels`` (the decoders' outputs per level) and ``queries`` (the memory
        queries ``[B, P, D]``, to be written after a training step)."""
        grid = self.config.method.grid
        # training writes the queue before the backward: the reads use a copy (see snapshot)
        memory = self.memory.snapshot() if self.training else None
        with self.autocast():
            features, skips = self.encoder(self.to_memory_format(patchify(images, grid)))
            inpainted, queries = self.inpainting(features, generator, memory)
            student, student_levels = self.decoder(inpainted, skips, generator)
            # SQUID's teacher path: the plain encoder bottleneck and skips, detached
            teacher, teacher_levels = self.teacher(features.detach(), [skip.detach() for skip in skips])
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
        if self.training and self.config.method.random_affine:
            images = random_affine(images, generator)
        generator_loss, discriminator_loss, terms, queries = self.losses(images, generator)
        if not self.generator_step:  # n_critic: the discriminator alone steps on this batch
            return discriminator_loss, terms
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
            realness = self.discriminator(student.to(x.dtype), per_image_statistics=True).float()
        if resized:
            student = F.interpolate(student, size=images.shape[-2:], mode="bilinear", align_corners=False)
        sigma = m.residual_sigma * side / 256
        maps = smoothed_residual_map(images, student, sigma, m.roi_threshold)
        return maps, -realness  # high where D finds I_s unrealistic

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps, scores)`` as :meth:`Method.predict`, from one pass of the networks; the
        score is ``image_score``'s: ``discriminator`` (SQUID's, as ``-D(I_s)`` with per-image
        statistics in ``D``; module docstring) or ``max_filter`` (the max of the
        mean-filtered map)."""
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"images must have shape [B, 1, H, W]; got {list(images.shape)}")
        was_training = self.training
        self.eval()
        try:
            maps, scores = self._maps_and_scores(images)
        finally:
            self.train(was_training)
        map_scores = self.map_image_scores(maps)
        return maps, (scores if map_scores is None else map_scores).float()

    def map_image_scores(self, maps: torch.Tensor) -> torch.Tensor | None:
        """``max_filter``: the max of the mean-filtered map; ``discriminator``: None (the
        score is ``-D(I_s)``, not a function of the map)."""
        return super().map_image_scores(maps) if self.config.method.image_score == "max_filter" else None

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        # the queue's contents are a buffer (in the weights); its write pointer is here
        return {"memory_pointer": int(self.memory.pointer)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.memory.pointer = int(state.get("memory_pointer", 0))

    def log_values(self) -> dict[str, float]:
        return {"memory_pointer": float(self.memory.pointer)}
