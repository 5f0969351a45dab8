"""Ablation: remove heads chosen at random (seeded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from staterank.prune.heads.base import HeadCriterion, HeadProfile, register


@register
@dataclass
class HeadsRandom(HeadCriterion):
    """A seeded random choice of heads, with no calibration (uniform random scores)."""

    name = "heads-random"
    needs_profile = False

    def score(self, profile: HeadProfile | None, num_heads: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(num_heads, generator=generator, dtype=torch.float64)
