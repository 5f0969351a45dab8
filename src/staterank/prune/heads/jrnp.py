"""Joint Rank-Norm Pruning (Sun et al., 2026) and its ablations.

Saturation Score of head h: alpha * r_h + (1 - alpha) * n_h, with r and n the final-position effective
rank and nuclear norm of the head's state (mean over calibration samples), each min-max normalised
over all linear-attention heads of the model. High scores mark heads whose states saturate: they are
the ones JRNP removes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from staterank.prune.heads.base import HeadCriterion, HeadCriterionError, HeadProfile, min_max, register


@register
@dataclass
class JRNP(HeadCriterion):
    """Joint Rank-Norm Pruning, removing the heads whose states saturate, by rank and norm (--alpha weighs them).

    Saturation Score = alpha * minmax(effective rank) + (1 - alpha) * minmax(nuclear norm); the highest go.
    """

    name = "jrnp"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise HeadCriterionError(f"--alpha must be in [0, 1], got {self.alpha}")

    def score(self, profile: HeadProfile | None, num_heads: int, generator: torch.Generator) -> torch.Tensor:
        return self.alpha * min_max(profile.effective_rank) + (1 - self.alpha) * min_max(profile.nuclear_norm)


@register
@dataclass
class HeadsRank(JRNP):
    """The jrnp ablation with the rank signal alone (alpha = 1)."""

    name = "heads-rank"
    alpha: float = 1.0


@register
@dataclass
class HeadsNorm(JRNP):
    """The jrnp ablation with the norm signal alone (alpha = 0)."""

    name = "heads-norm"
    alpha: float = 0.0


@register
@dataclass
class HeadsLowRank(JRNP):
    """The jrnp ablation that removes the lowest Saturation Scores, the heads the paper says carry reasoning."""

    name = "heads-low-rank"
    remove_lowest = True
