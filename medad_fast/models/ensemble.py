"""DDAD's autoencoder, and K of them evaluated in one batched pass (Cai et al.,
"Dual-distribution discrepancy with self-supervised refinement for anomaly detection in
medical images", Medical Image Analysis 2023; public code github.com/caiyu6666/DDAD-ASR,
``models/autoencoder.py``).

DDAD-ASR's ``AE`` (``multiplier`` = width / 16) is the package's one dense autoencoder,
:class:`~medad_fast.models.autoencoder.DenseAutoencoder` at depth 4 (MedIAnomaly's AE is
the same network with a hidden layer of 1024), layer for layer:
four ``4x4`` stride-2 convolutions without bias, each followed by BatchNorm and ReLU
(widths ``w, 2w, 4w, 4w``; ``S -> S/16``), a dense bottleneck ``4w (S/16)^2 -> hidden``
(BatchNorm1d, ReLU) ``-> latent`` and back ``latent -> hidden`` (BatchNorm1d, ReLU)
``-> 4w (S/16)^2``, then four mirrored ``4x4`` stride-2 transposed convolutions without
bias (BatchNorm + ReLU after all but the last; no output activation). DDAD's BrainTumor
configuration: ``w = 16``, ``hidden = 2048``, ``latent = 16``, ``S = 64``. The dense layers
fix the input side ``S`` (a multiple of 16). PyTorch's default initialisation, as DDAD's.

:class:`AutoencoderEnsemble` is K DDAD autoencoders side by side: member ``k`` owns channels
``[k C, (k + 1) C)`` of every convolution (grouped convolutions and transposed
convolutions, ``groups = K``) and row ``k`` of every dense weight (``[K, out, in]``,
applied with one ``einsum`` over the member axis); BatchNorm and ReLU act per channel or
feature, so per member as they stand. The input is either one batch that every member
reads (``[B, 1, S, S]``) or one batch per member (``[K, B, 1, S, S]``: DDAD trains its
members on their own shuffles of the data); the first convolution is grouped over the K
input channels. Member ``k``'s weights are the slice ``k`` of dim 0 of every tensor, so
:meth:`AutoencoderEnsemble.member` extracts a standalone :class:`DenseAutoencoder` and
:meth:`AutoencoderEnsemble.from_members` builds the ensemble from K of them. Adam's update
is element-wise, so one Adam over the ensemble's weights with the loss summed over the
members takes exactly the steps of K Adams over K separate autoencoders
(tests/test_ddad.py checks this in float64, each member on its own batches).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .autoencoder import DenseAutoencoder

__all__ = ["AutoencoderEnsemble", "BatchedLinear"]


class BatchedLinear(nn.Module):
    """K independent ``nn.Linear(in, out)``: ``[B, K, in] -> [B, K, out]``; weight
    ``[K, out, in]``, bias ``[K, out]``, each member initialised as ``nn.Linear``."""

    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(members, out_features))
        bound = 1 / math.sqrt(in_features)  # nn.Linear's: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(in), ..)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bki,koi->bko", x, self.weight) + self.bias

    def extra_repr(self) -> str:
        return f"members={self.members}, in_features={self.in_features}, out_features={self.out_features}"


def _layers(members: int, width: int, hidden: int, latent: int, side: int
            ) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential, nn.Sequential]:
    """DDAD's four stages for K members (K = 1: plain ``nn.Linear`` dense layers)."""
    K, single = members, members == 1
    widths = (width, 2 * width, 4 * width, 4 * width)
    flat = widths[-1] * (side // 16) ** 2

    def conv(i: int, o: int) -> nn.Module:
        return nn.Conv2d(K * i, K * o, 4, 2, 1, bias=False, groups=K)

    def deconv(i: int, o: int) -> nn.Module:
        return nn.ConvTranspose2d(K * i, K * o, 4, 2, 1, bias=False, groups=K)

    def dense(i: int, o: int) -> nn.Module:
        return nn.Linear(i, o) if single else BatchedLinear(K, i, o)

    encoder, previous = [], 1
    for w in widths:
        encoder += [conv(previous, w), nn.BatchNorm2d(K * w), nn.ReLU(True)]
        previous = w
    linear_enc = nn.Sequential(dense(flat, hidden), nn.BatchNorm1d(K * hidden), nn.ReLU(True), dense(hidden, latent))
    linear_dec = nn.Sequential(dense(latent, hidden), nn.BatchNorm1d(K * hidden), nn.ReLU(True), dense(hidden, flat))
    decoder = []
    for i, o in ((widths[3], widths[2]), (widths[2], widths[1]), (widths[1], widths[0])):
        decoder += [deconv(i, o), nn.BatchNorm2d(K * o), nn.ReLU(True)]
    decoder.append(deconv(widths[0], 1))
    return nn.Sequential(*encoder), linear_enc, linear_dec, nn.Sequential(*decoder)


def _check(members: int, width: int, hidden: int, latent: int, side: int) -> None:
    if members < 1:
        raise ValueError(f"members must be >= 1; got {members}")
    if width < 1 or hidden < 1 or latent < 1:
        raise ValueError(f"width, hidden and latent must be >= 1; got {width}, {hidden}, {latent}")
    if side < 16 or side % 16:
        raise ValueError(f"image side must be a multiple of 16 (four stride-2 convolutions); got {side}")


class AutoencoderEnsemble(nn.Module):
    """K DDAD autoencoders (:class:`DenseAutoencoder`, depth 4) in one pass: ``[B, 1, S, S]``
    (every member reads it) or
    ``[K, B, 1, S, S]`` (member ``k`` reads slice ``k``) ``-> [K, B, 1, S, S]``."""

    def __init__(self, members: int = 3, image_size: int = 64, width: int = 16, hidden: int = 2048,
                 latent: int = 16) -> None:
        super().__init__()
        _check(members, width, hidden, latent, image_size)
        self.members, self.image_size, self.width, self.hidden, self.latent = members, image_size, width, hidden, latent
        self.encoder, self.linear_enc, self.linear_dec, self.decoder = _layers(members, width, hidden, latent,
                                                                             image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, S = self.members, self.image_size
        if x.dim() == 5 and x.shape[0] == K and x.shape[2:] == (1, S, S):
            x = x.squeeze(2).transpose(0, 1)  # [B, K, S, S]: member k's image on channel k
        elif x.dim() == 4 and x.shape[1:] == (1, S, S):
            x = x.expand(-1, K, -1, -1)
        else:
            raise ValueError(f"input must have shape [B, 1, {S}, {S}] or [{K}, B, 1, {S}, {S}]; got {list(x.shape)}")
        B, fm = x.shape[0], S // 16
        code = self._dense(self.linear_enc, self.encoder(x).reshape(B, K, -1))  # member k: channels [k C, (k+1) C)
        out = self._dense(self.linear_dec, code).reshape(B, K * 4 * self.width, fm, fm)
        return self.decoder(out).transpose(0, 1).unsqueeze(2)  # [K, B, 1, S, S]

    @staticmethod
    def _dense(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """``[B, K, in] -> [B, K, out]`` through ``BatchedLinear, BatchNorm1d(K hidden), ReLU,
        BatchedLinear`` (the BatchNorm sees the K members' features side by side)."""
        first, norm, relu, last = stage
        h = first(x)
        B, K, H = h.shape
        h = relu(norm(h.reshape(B, K * H))).reshape(B, K, H)
        return last(h)

    # ------------------------------------------------------------------ members
    def _single(self) -> DenseAutoencoder:
        return DenseAutoencoder(self.image_size, self.width, self.latent, self.hidden, depth=4)

    @staticmethod
    def _paired(ensemble_state: dict[str, torch.Tensor], single_state: dict[str, torch.Tensor]
                ) -> list[tuple[str, str]]:
        """``(ensemble name, single name)`` of each tensor: the two modules register the same
        layers in the same order (encoder, dense encoder, dense decoder, decoder), under other
        names (:class:`DenseAutoencoder` groups each conv block in its own ``Sequential``)."""
        if len(ensemble_state) != len(single_state):
            raise RuntimeError(f"the ensemble has {len(ensemble_state)} tensors and a member "
                               f"{len(single_state)}: the layouts drifted apart")
        return list(zip(ensemble_state, single_state))

    @torch.no_grad()
    def member(self, k: int) -> DenseAutoencoder:
        """Member ``k`` as a standalone :class:`DenseAutoencoder` (a copy: weights, BatchNorm
        statistics and mode; same dtype and device)."""
        if not 0 <= k < self.members:
            raise IndexError(f"member {k} of an ensemble of {self.members}")
        single = self._single()
        reference = next(self.parameters())
        single.to(device=reference.device, dtype=reference.dtype)
        own, targets, state = self.state_dict(), single.state_dict(), {}
        for own_name, name in self._paired(own, targets):
            tensor, target = own[own_name], targets[name]
            if tensor.dim() == 0:  # num_batches_tracked: one counter for all members
                state[name] = tensor.clone()
            elif tensor.dim() == target.dim() + 1:  # BatchedLinear: [K, ...]
                state[name] = tensor[k].clone()
            else:
                rows = tensor.shape[0] // self.members
                state[name] = tensor[k * rows:(k + 1) * rows].clone()
        single.load_state_dict(state)
        return single.train(self.training)

    @classmethod
    @torch.no_grad()
    def from_members(cls, singles: Sequence[DenseAutoencoder]) -> AutoencoderEnsemble:
        """The ensemble of ``singles`` (depth-4 :class:`DenseAutoencoder` of one
        architecture): member ``k`` = ``singles[k]``."""
        if not singles:
            raise ValueError("from_members needs at least one autoencoder")
        first = singles[0]
        if len(first.encoder) != 4:
            raise ValueError(f"DDAD's autoencoders have depth 4; got depth {len(first.encoder)}")
        width, hidden = first.encoder[0][0].out_channels, first.to_latent[0].out_features
        ensemble = cls(len(singles), first.image_size, width, hidden, first.to_latent[-1].out_features)
        reference = next(first.parameters())
        ensemble.to(device=reference.device, dtype=reference.dtype)
        states = [s.state_dict() for s in singles]
        merged, own = {}, ensemble.state_dict()
        for own_name, name in cls._paired(own, states[0]):
            tensor, parts = own[own_name], [state[name] for state in states]
            if tensor.dim() == 0:
                merged[own_name] = parts[0].clone()
            elif tensor.dim() == parts[0].dim() + 1:
                merged[own_name] = torch.stack(parts)
            else:
                merged[own_name] = torch.cat(parts, dim=0)
        ensemble.load_state_dict(merged)
        return ensemble.train(first.training)
