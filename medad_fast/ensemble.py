"""Seed ensembles at inference: several runs of one method and preprocessing (typically the
same training command with other ``--seed`` values) scored as one model.

:class:`SeedEnsemble` is a scorer like a loaded method (``config``, ``predict``,
``to_memory_format``, ``map_image_scores``; :mod:`medad_fast.inference` scores with it, and
:func:`medad_fast.export.export_method` writes it as one graph averaging the members). It is
built by :func:`medad_fast.inference.load_ensemble` from run directories or checkpoints
(``predict --ensemble RUN RUN...``, ``export --ensemble ...``).

Averaging. The ensemble's anomaly map is the mean of its members' maps
``float32 [B, H, W]``. Its image score is the method's image score of that mean map
(:meth:`Method.map_image_scores <medad_fast.methods.base.Method.map_image_scores>`), where the
method's image score is a function of its map:

* frequency_aware, draem: max of the mean-filtered map, of the mean map;
* ae, ddad: ``--image-score max_filter`` (that of the mean map) or ``mean`` (the mean of
  the mean map, which is also the mean of the members' scores);
* squid with ``--image-score max_filter``: that of the mean map;
* squid with ``--image-score discriminator`` (its default): the score ``-D(I_s)`` is not a
  function of the map, so the ensemble's image score is the mean of the members' scores.

Refusals (``ValueError`` naming both members and the field): members that disagree on the
method, the image side, the preprocessing record (:mod:`medad_fast.preprocessing`: window,
hist-eq, crop, side, input range: the same slice must be the same input to every member),
the rule that turns a map into an image score (``image_score``, the score filter's side),
or, for ddad, the training stage that scores (initial map or refined probability);
the same checkpoint twice (a run directory and its checkpoint file count as the same).
Members with other method options (widths, epochs) are accepted: a seed ensemble is the
common case, not a requirement.

Memory: the members score one after another on the same batch, and a running sum of their
maps is kept, so scoring holds one batch of data, one sum and N sets of weights, not N
copies of the data's maps. An ensemble has no calibrated operating point of its own
(``operating_point.json`` belongs to one run): ``predict --ensemble`` on volumes writes
lesion masks only with ``--threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .methods import Method
from .preprocessing import preprocessing_of

__all__ = ["SeedEnsemble", "average_outputs", "check_distinct", "check_members"]


#: (field named in a refusal, what of a member it compares)
_AGREEMENT: tuple[tuple[str, Callable[[Method], Any]], ...] = (
    ("method", lambda member: member.config.run.method),
    ("image side", lambda member: member.config.run.image_size),
    ("preprocessing", lambda member: preprocessing_of(member.config).to_dict()),
    ("image_score", lambda member: getattr(member.config.method, "image_score", None)),
    ("score filter", lambda member: member.score_filter),
    # a staged method's maps change kind with its stage (ddad: the autoencoders' initial map,
    # then its refinement net's probability): not to be averaged across stages
    ("stage", lambda member: getattr(member, "stage", None)),
)


def check_distinct(names: Sequence[str | Path]) -> None:
    """``ValueError`` naming both when two of ``names`` (checkpoint files) are the same file."""
    seen: dict[Path, str | Path] = {}
    for name in names:
        key = Path(name).resolve()
        if key in seen:
            raise ValueError(f"ensemble members {seen[key]} and {name} are the same checkpoint ({key}): pass each run "
                             "once")
        seen[key] = name


def check_members(members: Sequence[Method], names: Sequence[str | Path]) -> None:
    """``ValueError`` naming the two members and the field when ``members`` (``names[i]``:
    the checkpoint ``members[i]`` was loaded from) disagree on the method, image side,
    preprocessing record or image-score rule, or when two names are the same checkpoint
    file (:func:`check_distinct`)."""
    if not members:
        raise ValueError("an ensemble needs at least one member")
    if len(names) != len(members):
        raise ValueError(f"{len(members)} ensemble member(s) but {len(names)} name(s)")
    check_distinct(names)
    first, first_name = members[0], names[0]
    for member, name in zip(members[1:], names[1:]):
        for field, value_of in _AGREEMENT:
            expected, got = value_of(first), value_of(member)
            if got != expected:
                raise ValueError(f"ensemble members {first_name} and {name} disagree on {field}: {expected!r} vs "
                                 f"{got!r} (an ensemble averages runs of one method and preprocessing)")


class SeedEnsemble(nn.Module):
    """N loaded methods scored as one (see the module docstring): ``predict(images)`` ->
    ``(mean of the members' maps float32 [B, H, W], image scores float32 [B])``. ``config``
    is the first member's (method, side, preprocessing record: the same for all, checked).
    ``checkpoints``: what each member was loaded from (named in refusals)."""

    def __init__(self, members: Sequence[Method], checkpoints: Sequence[str | Path]) -> None:
        check_members(members, checkpoints)
        super().__init__()
        self.members = nn.ModuleList(members)
        self.checkpoints = [Path(name) for name in checkpoints]
        self.config = members[0].config

    def to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as it is: each member puts it in its own layout."""
        return x

    def map_image_scores(self, maps: torch.Tensor) -> torch.Tensor | None:
        """The method's image scores of maps ``[B, H, W]`` (None when they are not a
        function of the map); the members' rule, which they share (checked)."""
        return self.members[0].map_image_scores(maps)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(maps float32 [B, H, W], scores float32 [B])`` of images ``[B, 1, H, W]`` in
        [0, 1]: the mean of the members' maps, and its image score (the mean of the members'
        scores when the method's score is not a function of its map). The members run one
        after another; only the running sums are kept (:func:`average_outputs`)."""
        return average_outputs((member.predict(member.to_memory_format(images)) for member in self.members),
                               self.map_image_scores)


def average_outputs(outputs: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    map_image_scores: Callable[[torch.Tensor], torch.Tensor | None]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble of the members' outputs ``(maps [B, H, W], scores [B])``, taken one at a
    time: ``(mean map float32, map_image_scores(mean map))``, or the mean score where
    ``map_image_scores`` returns None (a score that is not a function of the map). Sums in
    the members' order; only the running sums are kept. The one rule of
    :meth:`SeedEnsemble.predict` and ``benchmarks/ensemble_spread.py``."""
    map_sum = score_sum = None
    count = 0
    for maps, scores in outputs:
        # out of place: the sum is also traced by torch.export (export --ensemble)
        map_sum = maps.float() if map_sum is None else map_sum + maps.float()
        score_sum = scores.float() if score_sum is None else score_sum + scores.float()
        count += 1
    if count == 0:
        raise ValueError("an ensemble needs at least one member")
    mean_maps = map_sum / count
    scores = map_image_scores(mean_maps)
    return mean_maps, (score_sum / count if scores is None else scores.float())
