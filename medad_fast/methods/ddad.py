"""DDAD (Cai, Chen, Yang, Zhou, Cheng: "Dual-distribution discrepancy with self-supervised
refinement for anomaly detection in medical images", Medical Image Analysis 2023; first
as "Dual-distribution discrepancy for anomaly detection in chest X-rays", MICCAI 2022),
as its public code (github.com/caiyu6666/DDAD-ASR: ``trainer.py``, ``test.py``,
``anomaly_data.py``, ``models/``, ``cfgs/BraTumor_AE.yaml``) does it.

What is DDAD's:

* Intensities: images in [0, 1] are mapped to DDAD-ASR's [-1, 1] (its loader's
  ``Normalize((0.5,), (0.5,))``) before the autoencoders, in every preset; the discrepancy
  maps are in those units.
* Two ensembles of K autoencoders, DDAD-ASR's ``AE``
  (:class:`~medad_fast.models.autoencoder.DenseAutoencoder` at depth 4: four 4x4 stride-2 convolutions,
  a dense latent of 16 values), K = 3, evaluated in one batched pass
  (:class:`~medad_fast.models.ensemble.AutoencoderEnsemble`):

  - NDM (normative distribution module): trained on the normal training images;
  - UDM (unknown distribution module): trained on the union of the normal training images
    and the unlabeled pool (which holds lesions; its labels are never read), shuffled
    together, as DDAD-ASR's mode ``a`` loader does.

  Every member trains on its own shuffles of its data (DDAD-ASR trains each member in a
  separate run with its own DataLoader shuffle): member ``k`` of a module draws, per
  autoencoder epoch ``e``, its own permutation from a generator seeded by
  ``(run seed, module, k, e)`` (:func:`member_permutation`: stateless, so a resumed run
  and every DDP rank draw the same), cut into this rank's batches as the trainer cuts its
  own (``DistributedSampler(drop_last=True)``). Loss: the MSE of every member, summed
  over the members (each member's gradient is its own, so the batched ensembles train
  exactly as 2K separate autoencoders would). Adam, ``ae_lr`` (5e-4), betas (0.5, 0.999),
  batch ``ae_batch`` (64), ``ae_epochs`` (250) epochs of each member over its data.
* Initial maps of an image (``R^n_k``, ``R^u_k``: the NDM and UDM members' reconstructions):
  intra-discrepancy ``A_intra = std_k(R^n_k)`` (torch's default, unbiased std, as
  DDAD-ASR's ``torch.std``) and inter-discrepancy ``A_inter = |mean_k R^u_k - mean_k R^n_k|``.
* ASR (anomaly score refinement), after the autoencoders, which are then frozen (eval
  mode, no gradient): DDAD-ASR's ``RefineNetwork``
  (:class:`~medad_fast.models.refinement.RefinementNet`: three 3x3 convolutions, width 128,
  two output classes) reads ``[A_inter, A_intra]`` ONLY (never the image) of a normal
  training image that carries, with probability 1/2, a synthetic anomaly
  (:func:`patch_anomalies`, DDAD-ASR's ``SelfAnomalyDataset.generate_anomaly``), and is
  trained with the focal loss (gamma 2) of its softmax on the synthetic anomaly *mask*.
  Adam, the run's ``lr`` (1e-4), betas (0.5, 0.999), weight decay ``refine_weight_decay``
  (1e-4), the run's batch (8), no gradient clipping (the config's ``grad_clip: Null``).
* Maps and image score: after the ASR the map is the softmax's anomalous channel; before
  it (a checkpoint of the autoencoder stage, or a run whose epochs end there) the map is
  ``A_inter``. ``image_score mean`` (the published presets) is DDAD's global average of the
  map (``test.py``); ``max_filter`` is the package's max of the mean-filtered map.
* Without unlabeled data there is no UDM: DDAD's NDM-only variant (its ``R_intra``,
  ``main.py --refine intra``): the map before the ASR is ``A_intra`` and the ASR reads
  ``[A_intra]`` alone (a warning says so).

Where this is not DDAD-ASR's code, and why:

* Patch sources: the anomaly of an image is cut from another image of the same training
  batch (a uniform draw among the others) where DDAD-ASR draws another image of the whole
  normal training set: the method sees batches, not the set; a batch is a uniform draw
  from the set, so the source's law is the same. A batch of one gets no anomaly (there is
  no other image to cut from).
* Focal loss: the package's :func:`~medad_fast.losses.focal_loss` on the anomalous
  probability; DDAD-ASR's copy of Hsuxu's FocalLoss also smooths the one-hot target by
  1e-5, which changes the loss by about 1e-5 (same gamma, same mean over the pixels).
* The UDM's batch: one autoencoder epoch is one pass of every member over its own data,
  NDM and UDM alike, as DDAD-ASR trains both for the same number of epochs; the UDM's
  union is larger, so its batch is the larger one (``ae_batch`` x union / normal, 133 on
  BrainTumor's 998 + 999 images) where DDAD-ASR keeps 64 and takes about twice the steps:
  one trainer step steps every member once.
* Stages: one run holds both stages. The run's ``batch_size`` and ``lr`` are the ASR's;
  the autoencoders take the first ``ae_epochs`` x (their steps per epoch) trainer steps
  (their own batches of ``ae_batch``), the ASR the rest of the run's ``epochs``. The
  ``medianomaly`` preset's 131 epochs give the ASR 100.8 epochs on BrainTumor's 998
  normal images (DDAD-ASR: 100).
* Image side: the dense layers fix it (``image_size``, a multiple of 16); images of
  another size are resized (bilinear) to it and the map back.
* The unlabeled pool: DDAD-ASR takes the first 1,000 names of ``train["unlabeled"]`` at a
  60 % anomaly rate (400 normal + 600 abnormal); the package takes the whole pool it is
  given (on BrainTumor's ``data.json``: 399 + 600).
* ``roi_threshold`` (the package's liver mask of the map, ``I > 0``) is on in the
  ``small`` and ``tiny`` presets, as for every method on CT slices; the published presets
  have none, as DDAD.

Data: DDAD declares what it trains on (:meth:`DDADMethod.training_data`) and the engine reads
it (:mod:`medad_fast.data.unlabeled`; errors name ``--unlabeled`` / ``--unlabeled-split`` /
``data.json``): the unlabeled pool, and the WHOLE normal pool on every rank. Under torchrun
the other methods' ranks hold only the images of their own batches (:mod:`medad_fast.train`);
DDAD's do not, by choice: every member draws its own permutation of the pool each
autoencoder epoch and a rank takes its share of each, so the K members' shares of one epoch
together cover most of the pool (1 - 2^-K of it on 2 ranks: 7/8 at K = 3), and loading them
per epoch would save little memory for K times the reads.

Presets: ``medianomaly`` (= ``paper``): DDAD-ASR's ``cfgs/BraTumor_AE.yaml`` at 64 x 64,
K = 3, mean image score. ``small`` and ``tiny``: narrower networks for CPUs and tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import Config, MethodConfig, setting
from ..losses import focal_loss
from ..models.ensemble import AutoencoderEnsemble
from ..models.refinement import RefinementNet
from .registry import register
from .base import Method, NormalImages, TrainingData, UnlabeledImages

__all__ = ["DDADConfig", "DDADMethod", "IMAGE_SCORES", "STAGES", "discrepancy_maps", "member_permutation",
           "patch_anomalies"]

#: the two training stages, in order (``method_state()["stage"]`` is the index)
STAGES = ("autoencoders", "refinement")
IMAGE_SCORES = ("max_filter", "mean")
UNLABELED_SPLITS = ("valid", "test")
#: the modules whose members draw their own shuffles (the seed of :func:`member_permutation`)
MODULES = ("ndm", "udm")
ADAM_BETAS = (0.5, 0.999)  # DDAD-ASR's, both stages


@dataclass
class DDADConfig(MethodConfig):
    """DDAD's settings (defaults: DDAD-ASR's BrainTumor configuration)."""

    architecture_fields = ("members", "ae_width", "ae_hidden", "latent_size", "refine_width")

    members: int = setting(3, "autoencoders per ensemble (DDAD's K, default 3)")
    ae_width: int = setting(16, "width of the autoencoder's first convolution (DDAD 16: widths 16/32/64/64)")
    ae_hidden: int = setting(2048, "hidden units of the autoencoder's dense bottleneck (DDAD 2048)")
    latent_size: int = setting(16, "values of the autoencoder's dense latent (DDAD 16)")
    ae_epochs: int = setting(250, "epochs of every autoencoder over its own data (DDAD 250)")
    ae_batch: int | None = setting(None, "autoencoder batch (DDAD 64; default: the run's batch size)")
    ae_lr: float | None = setting(None, "autoencoder Adam lr (DDAD 5e-4; default: the run's lr)")
    refine_width: int = setting(128, "width of DDAD's refinement net (ASR, DDAD 128)")
    refine_weight_decay: float = setting(1e-4, "weight decay of the ASR's Adam (DDAD 1e-4)")
    unlabeled: str | None = setting(None, "folder of unlabeled slices for DDAD's UDM ensemble (may hold lesions)")
    unlabeled_split: str | None = setting(None, "use this split (valid or test) of --data as DDAD's unlabeled "
                                                "images, labels ignored (test: transductive, not DDAD's protocol)",
                                          choices=UNLABELED_SPLITS)
    data_json_pool: bool | None = setting(None, "the unlabeled pool of a data.json --data (default: on when --data "
                                                "is a MedIAnomaly / DDAD-ASR data.json dataset)")
    image_score: str = setting("max_filter", "image score: max_filter (max of the mean-filtered map) or mean "
                                             "(DDAD's mean of the map)", choices=IMAGE_SCORES)
    p_anomaly: float = setting(0.5, "probability a training sample of the ASR gets a synthetic patch (DDAD 0.5)")
    roi_threshold: float | None = None  # the map is kept where I > roi_threshold (None: everywhere, as DDAD)
    score_filter: int | None = setting(None, "side of the image score's mean filter (default: 21 at 256, scaled)")

    def validate(self) -> None:
        need = self.need
        need(isinstance(self.members, int) and self.members >= 2, "members",
             "must be an int >= 2 (the intra-discrepancy is a std over the members)")
        for name in ("ae_width", "ae_hidden", "latent_size", "refine_width"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an int >= 1")
        need(isinstance(self.ae_epochs, int) and self.ae_epochs >= 1, "ae_epochs", "must be an int >= 1")
        need(self.ae_batch is None or (isinstance(self.ae_batch, int) and self.ae_batch >= 1), "ae_batch",
             "must be None or an int >= 1")
        need(self.ae_lr is None or self.ae_lr > 0, "ae_lr", "must be None or > 0")
        need(self.refine_weight_decay >= 0, "refine_weight_decay", "must be >= 0")
        need(self.unlabeled is None or (isinstance(self.unlabeled, str) and bool(self.unlabeled)), "unlabeled",
             "must be None or a folder path")
        need(0.0 <= self.p_anomaly <= 1.0, "p_anomaly", "must be in [0, 1]")
        self.need_score_filter()

    @property
    def has_unlabeled(self) -> bool:
        """Whether unlabeled data is configured (then the UDM ensemble exists)."""
        return self.unlabeled is not None or self.unlabeled_split is not None or bool(self.data_json_pool)

    def variant(self) -> str:
        if not self.has_unlabeled:
            return "NDM only"
        return "transductive: unlabeled = test" if self.unlabeled_split == "test" else ""

    def protocol_note(self) -> str:
        """What a comparison table's row must say about this run's data: NDM only (no
        unlabeled pool), or transductive (the unlabeled pool is the scored test split)."""
        if self.unlabeled_split == "test":
            return "transductive: its unlabeled pool is the test split"
        return self.variant()


def discrepancy_maps(normative: torch.Tensor, unknown: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DDAD's initial maps from the members' reconstructions ``[K, B, 1, H, W]``:
    ``(A_intra, A_inter)``, each ``[B, 1, H, W]``: the unbiased std over the NDM members
    (DDAD-ASR's ``torch.std``), and ``|mean UDM - mean NDM|`` (zeros without a UDM)."""
    intra = normative.std(dim=0)
    if unknown is None:
        return intra, torch.zeros_like(intra)
    return intra, (unknown.mean(dim=0) - normative.mean(dim=0)).abs()


def patch_anomalies(images: torch.Tensor, generator: torch.Generator, p_anomaly: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """DDAD-ASR's synthetic anomalies (``SelfAnomalyDataset.generate_anomaly``) on a batch
    ``[B, 1, H, W]``: ``(augmented, mask [B, 1, H, W] float 0/1, draws)``.

    With probability ``p_anomaly`` an image gets one square patch: centre ``(cy, cx)``
    uniform in the central 80 % (``randint(int(0.1 H), int(0.9 H))``, numpy's truncation
    of DDAD's float bounds), half side ``h`` uniform in ``[round(0.05 W), round(0.2 W))``
    (DDAD's ``patch_width``: the box is ``[c - h, c + h)``, clipped to the image, so its
    side is 10-40 % of the image's), blend factor ``alpha ~ U[0, 1)``; inside the box
    ``I_a = (1 - alpha) I + alpha J`` with ``J`` the same box of another image of the
    batch; the mask is the box (where ``alpha > 0``). ``draws`` holds the drawn values
    (``anomalous, cy, cx, half, alpha, source``) for tests. All from ``generator``."""
    B, _, H, W = images.shape
    device, gdev = images.device, generator.device
    anomalous = torch.rand(B, generator=generator, device=gdev) < p_anomaly
    cy = torch.randint(int(0.1 * H), int(0.1 * H + 0.8 * H), (B,), generator=generator, device=gdev)
    cx = torch.randint(int(0.1 * W), int(0.1 * W + 0.8 * W), (B,), generator=generator, device=gdev)
    low, high = round(0.05 * W), round(0.2 * W)
    half = torch.randint(low, max(high, low + 1), (B,), generator=generator, device=gdev)
    alpha = torch.rand(B, generator=generator, device=gdev)
    shift = torch.randint(1, max(B, 2), (B,), generator=generator, device=gdev)
    source = (torch.arange(B, device=gdev) + shift) % B
    if B < 2:
        anomalous = torch.zeros_like(anomalous)
    draws = {"anomalous": anomalous, "cy": cy, "cx": cx, "half": half, "alpha": alpha, "source": source}
    anomalous, cy, cx, half, alpha, source = (t.to(device) for t in draws.values())
    ys = torch.arange(H, device=device).view(1, H, 1)
    xs = torch.arange(W, device=device).view(1, 1, W)
    v = lambda t: t.view(B, 1, 1)  # noqa: E731
    box = ((ys >= v(cy - half)) & (ys < v(cy + half)) & (xs >= v(cx - half)) & (xs < v(cx + half))
           & v(anomalous & (alpha > 0)))
    mask = box.unsqueeze(1).to(images.dtype)
    weight = mask * alpha.view(B, 1, 1, 1).to(images.dtype)
    augmented = (1 - weight) * images + weight * images[source]
    return augmented, mask, draws


def member_permutation(n: int, seed: int, module: str, member: int, epoch: int) -> torch.Tensor:
    """Member ``member``'s permutation of ``range(n)`` in autoencoder epoch ``epoch`` (CPU
    int64): its own shuffle, from a generator seeded by ``(seed, module, member, epoch)``
    (no state: a resumed run and every rank draw the same)."""
    key = hashlib.sha256(f"ddad/{seed}/{module}/{member}/{epoch}".encode()).digest()
    return torch.randperm(n, generator=torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1))


def rank_batches(permutation: torch.Tensor, batch: int, steps: int | None = None) -> torch.Tensor:
    """This rank's batches of a permutation, ``[steps, batch]``: its strided share
    (``DistributedSampler(drop_last=True)``, as :meth:`medad_fast.train.Trainer.rank_batches`),
    the last partial batch dropped (one batch of the share when it is smaller than ``batch``).
    ``steps``: take exactly that many (the UDM follows the NDM's count)."""
    world, rank = distributed.world_size(), distributed.rank()
    per_rank = permutation.shape[0] // world
    mine = permutation[: per_rank * world].view(per_rank, world)[:, rank]
    batch = min(batch, per_rank)
    steps = max(1, per_rank // batch) if steps is None else steps
    return mine[: steps * batch].view(steps, batch)


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


# DDAD-ASR's cfgs/BraTumor_AE.yaml: 64 x 64, K = 3, AE batch 64, Adam lr 5e-4, 250
# epochs; ASR batch 8, lr 1e-4, weight decay 1e-4, 100 epochs (131 run epochs of batch 8 on
# BrainTumor's 998 normal images: 3,750 autoencoder steps, then 100.8 ASR epochs)
PUBLISHED = {"image_size": 64, "members": 3, "batch_size": 8, "lr": 1e-4, "epochs": 131, "ae_batch": 64,
             "ae_lr": 5e-4, "ae_epochs": 250, "ae_width": 16, "ae_hidden": 2048, "latent_size": 16,
             "refine_width": 128, "refine_weight_decay": 1e-4, "image_score": "mean", "roi_threshold": None}


@register
class DDADMethod(Method):
    """NDM and UDM autoencoder ensembles (intra / inter discrepancy) + the ASR refinement net."""

    name = "ddad"
    summary = ("DDAD (MedIA 2023): NDM/UDM dense-latent autoencoder ensembles on their own shuffles "
               "(intra/inter discrepancy) + ASR net on [A_inter, A_intra] (focal loss, patch anomalies)")
    Config = DDADConfig
    presets = {
        "paper": PUBLISHED,
        "medianomaly": PUBLISHED,
        # the demo's data and side on a CPU (200 slices at 96: 25 steps of 8 per epoch):
        # 40 autoencoder epochs, then 20 epochs of a narrower ASR
        "small": {"image_size": 96, "members": 3, "batch_size": 8, "lr": 1e-4, "epochs": 60, "ae_batch": 16,
                  "ae_lr": 5e-4, "ae_epochs": 40, "ae_width": 8, "ae_hidden": 256, "latent_size": 16,
                  "refine_width": 32, "roi_threshold": 0.0},
        # for tests: seconds on one CPU thread; 3 epochs = 2 of autoencoders + 1 of ASR
        "tiny": {"image_size": 32, "members": 2, "batch_size": 4, "lr": 1e-3, "epochs": 3, "ae_epochs": 2,
                 "ae_width": 2, "ae_hidden": 8, "latent_size": 4, "refine_width": 4, "roi_threshold": 0.0},
    }
    # the stages train disjoint networks: DDP must not wait for the idle one's gradients
    find_unused_parameters = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        m: DDADConfig = config.method
        if m.data_json_pool is None:  # resolved once, so the saved config and the row say it
            from ..data.medianomaly import dataset_root
            m.data_json_pool = config.run.data is not None and dataset_root(config.run.data) is not None
        if config.run.image_size % 16:
            raise ValueError(f"config image_size={config.run.image_size}: ddad's autoencoders need a multiple of "
                             f"16 (four stride-2 convolutions before a dense layer)")

        def ensemble() -> AutoencoderEnsemble:
            return AutoencoderEnsemble(m.members, config.run.image_size, m.ae_width, m.ae_hidden, m.latent_size)

        self.normative = ensemble()
        self.unknown = ensemble() if m.has_unlabeled else None
        # R_dual reads [A_inter, A_intra]; DDAD's NDM-only R_intra reads [A_intra]
        self.refiner = RefinementNet(2 if m.has_unlabeled else 1, m.refine_width)
        self.stage = 0
        self.step = 0
        self.normal_pool: torch.Tensor | None = None  # the trainer's normal images (uint8, device)
        self.union_pool: torch.Tensor | None = None  # normal + unlabeled (the UDM's data)
        self.unlabeled_images: torch.Tensor | None = None
        self._orders: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # (epoch, NDM, UDM batches)

    # ------------------------------------------------------------------ data
    def training_data(self) -> dict[str, TrainingData]:
        """The whole normal pool (its members draw their own orders of it) and the unlabeled
        pool of ``--unlabeled`` / ``--unlabeled-split`` / a ``data.json``'s ``train["unlabeled"]``."""
        m: DDADConfig = self.config.method
        return {"normal": NormalImages(),
                "unlabeled": UnlabeledImages(m.unlabeled, m.unlabeled_split, m.data_json_pool is not False)}

    def attach_training_data(self, data: dict[str, torch.Tensor | None]) -> None:
        self.normal_pool = data.get("normal")
        self.unlabeled_images = data.get("unlabeled")
        if self.unlabeled_images is None:
            warnings.warn("ddad: no unlabeled images, so no UDM ensemble: training DDAD's NDM-only variant "
                          "(anomaly map from the intra-discrepancy of the normal ensemble). Give unlabeled "
                          "slices with --unlabeled DIR or --unlabeled-split valid|test for DDAD's "
                          "inter-discrepancy.", UserWarning, stacklevel=2)

    def setup_training(self, device: torch.device) -> None:
        if self.unlabeled_images is None:
            return
        self.unlabeled_images = self.unlabeled_images.to(device)
        if self.normal_pool is not None:
            self.union_pool = torch.cat([self.normal_pool.to(device), self.unlabeled_images])

    @property
    def ae_batch(self) -> int:
        return self.config.method.ae_batch or self.config.run.batch_size

    def ae_steps_per_epoch(self, steps_per_epoch: int) -> int:
        """Steps of one autoencoder epoch: batches of ``ae_batch`` in this rank's share of
        the normal images (the trainer's ``steps_per_epoch`` when no pool is attached)."""
        if self.normal_pool is None:
            return steps_per_epoch
        per_rank = self.normal_pool.shape[0] // distributed.world_size()
        return max(1, per_rank // min(self.ae_batch, per_rank))

    def on_train_step(self, step: int, steps_per_epoch: int) -> None:
        self.step = step
        self.stage = int(step >= self.config.method.ae_epochs * self.ae_steps_per_epoch(steps_per_epoch))

    def member_batches(self, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Indices of every member's batch at autoencoder step ``step``: NDM ``[K, b]`` into
        the normal pool, UDM ``[K, b_u]`` into the union (None without a UDM); each member
        the batch of its own permutation (:func:`member_permutation`, :func:`rank_batches`)."""
        if self.normal_pool is None:
            raise RuntimeError("member_batches needs the normal training images (attach_training_data)")
        seed, K = self.config.run.seed, self.config.method.members
        steps = self.ae_steps_per_epoch(0)
        epoch, position = divmod(step, steps)
        if self._orders is None or self._orders[0] != epoch:
            n = self.normal_pool.shape[0]
            ndm = torch.stack([rank_batches(member_permutation(n, seed, "ndm", k, epoch), self.ae_batch)
                               for k in range(K)])
            udm = None
            if self.union_pool is not None:
                u = self.union_pool.shape[0]
                batch = max(1, (u // distributed.world_size()) // steps)
                udm = torch.stack([rank_batches(member_permutation(u, seed, "udm", k, epoch), batch, steps)
                                   for k in range(K)])
            self._orders = (epoch, ndm, udm)
        _, ndm, udm = self._orders
        return ndm[:, position], None if udm is None else udm[:, position]

    def unlabeled_batch(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` unlabeled slices drawn uniformly (with replacement) by ``generator``, float
        in [0, 1] ``[n, 1, S, S]`` (the UDM's extra images when no pool is attached)."""
        pool = self.unlabeled_images
        index = torch.randint(0, pool.shape[0], (n,), generator=generator, device=generator.device)
        return pool[index.to(pool.device)].float().div_(255.0)

    def _pool_images(self, pool: torch.Tensor, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``pool[index]`` ``[K, b] -> float [K, b, 1, S, S]`` in [0, 1], augmented as the
        trainer augments its batch when the run augments."""
        K, b = index.shape
        images = pool[index.reshape(-1).to(pool.device)].float().div_(255.0)
        if self.config.run.augment:
            from ..augment import augment_normal_slices
            images = augment_normal_slices(images, generator, self.config.run.augment_strength)
        return images.view(K, b, *images.shape[1:])

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        # DDAD-ASR's Adams (betas 0.5, 0.999) at a constant lr; an optimiser whose
        # parameters got no gradient this step is not stepped (Trainer.train_step)
        m, run = self.config.method, self.config.run
        autoencoders = list(self.normative.parameters())
        if self.unknown is not None:
            autoencoders += list(self.unknown.parameters())
        return [torch.optim.Adam(autoencoders, lr=m.ae_lr or run.lr, betas=ADAM_BETAS),
                torch.optim.Adam(self.refiner.parameters(), lr=run.lr, betas=ADAM_BETAS,
                                 weight_decay=m.refine_weight_decay)], []

    def forward(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.stage == 0:
            return self._autoencoder_step(images, generator)
        return self._refinement_step(images, generator)

    def _autoencoder_step(self, images: torch.Tensor, generator: torch.Generator
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        def member_mse(ensemble: AutoencoderEnsemble, batch: torch.Tensor) -> torch.Tensor:
            x = batch * 2 - 1  # DDAD's [-1, 1]
            with self.autocast():
                reconstructions = ensemble(x)
            target = x if x.dim() == 5 else x.unsqueeze(0)
            return (reconstructions.float() - target).square().flatten(1).mean(dim=1)  # [K]

        if self.normal_pool is not None:  # every member on its own shuffle
            ndm_index, udm_index = self.member_batches(self.step)
            normal = self._pool_images(self.normal_pool, ndm_index, generator)
            mixed = None if udm_index is None else self._pool_images(self.union_pool, udm_index, generator)
        else:  # driven outside the trainer: every member on the step's batch
            normal, mixed = images, None
            if self.unknown is not None:
                if self.unlabeled_images is None:
                    raise RuntimeError("setup_training() must run before the first training step")
                mixed = torch.cat([images, self.unlabeled_batch(images.shape[0], generator).to(images.dtype)])
        normative = member_mse(self.normative, normal)
        loss = normative.sum()  # summed: each member's gradient is its own MSE's
        terms = {"loss_ndm": normative.detach().mean()}
        if self.unknown is not None:
            unknown = member_mse(self.unknown, mixed)
            loss = loss + unknown.sum()
            terms["loss_udm"] = unknown.detach().mean()
        return loss, terms

    def _refinement_step(self, images: torch.Tensor, generator: torch.Generator
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.no_grad():
            augmented, mask, _ = patch_anomalies(images.float(), generator, self.config.method.p_anomaly)
        with self.autocast():
            logits = self.refiner(self.to_memory_format(self.refine_input(augmented)))
        probability = torch.softmax(logits.float(), dim=1)[:, 1:2]
        loss = focal_loss(probability, mask)  # DDAD: focal loss on the synthetic mask
        terms = {"loss_asr": loss.detach(), "anomalous_fraction": (mask.flatten(1).amax(dim=1) > 0).float().mean()}
        return loss, terms

    # ------------------------------------------------------------------ inference
    def initial_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_intra, A_inter)`` ``[B, 1, S, S]`` of images ``[B, 1, S, S]`` in [0, 1]
        (float32, DDAD's [-1, 1] units), the autoencoders frozen (:func:`discrepancy_maps`)."""
        with _frozen(self.normative, self.unknown), self.autocast():
            x = images * 2 - 1
            normative = self.normative(x).float()
            unknown = self.unknown(x).float() if self.unknown is not None else None
        return discrepancy_maps(normative, unknown)

    def refine_input(self, images: torch.Tensor) -> torch.Tensor:
        """The ASR's input of images ``[B, 1, S, S]``: ``[A_inter, A_intra]`` (DDAD-ASR's
        order), or ``[A_intra]`` without a UDM; never the image."""
        intra, inter = self.initial_maps(images)
        return torch.cat([inter, intra], dim=1) if self.unknown is not None else intra

    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        m: DDADConfig = self.config.method
        side = self.config.run.image_size
        x = images if images.shape[-2:] == (side, side) else F.interpolate(images, (side, side), mode="bilinear")
        if self.stage >= 1:
            with self.autocast():
                logits = self.refiner(self.to_memory_format(self.refine_input(x)))
            maps = torch.softmax(logits.float(), dim=1)[:, 1:2]
        else:
            intra, inter = self.initial_maps(x)
            maps = inter if self.unknown is not None else intra
        if maps.shape[-2:] != images.shape[-2:]:
            maps = F.interpolate(maps, images.shape[-2:], mode="bilinear")
        if m.roi_threshold is not None:
            maps = maps * (images > m.roi_threshold).to(maps.dtype)
        return maps.squeeze(1)

    def map_image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """``image_score``'s: ``max_filter`` (the max of the mean-filtered map) or ``mean``
        (DDAD's: the mean of the map over the image)."""
        if self.config.method.image_score == "mean":
            return maps.float().flatten(1).mean(dim=1)
        return super().map_image_scores(maps)

    # ------------------------------------------------------------------ state
    def method_state(self) -> dict[str, Any]:
        return {"stage": int(self.stage)}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.stage = int(state.get("stage", 0))

    def log_values(self) -> dict[str, float]:
        return {"stage": float(self.stage)}
