"""Random channels: the baseline every criterion should beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from staterank.prune.channels.base import ChannelCriterion, ChannelSelection, register

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class RandomCriterion(ChannelCriterion):
    """A seeded random subset of channels per head, the baseline.

    ``keep`` channels per head drawn uniformly from ``generator`` (reproducible by seed): index [Hk, keep]; no scores.
    """

    name = "random"
    needs = frozenset()

    def _select(
        self, stats: LayerStats | None, weights: tuple[Tensor, Tensor], keep: int, generator: torch.Generator
    ) -> ChannelSelection:
        heads, d_k = weights[0].shape[:2]
        index = torch.stack([torch.randperm(d_k, generator=generator)[:keep] for _ in range(heads)])
        return ChannelSelection(index.sort(dim=-1).values)
