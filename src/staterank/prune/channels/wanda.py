"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for LLMs"), summed over a channel's row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from staterank.prune.channels.base import ScoreCriterion, as_float64, register

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class WandaCriterion(ScoreCriterion):
    """Wanda, |weight| x the norm of its input, summed over each channel's q and k rows.

    score[h, c] = sum_j (|W_q[h, c, j]| + |W_k[h, c, j]|) ||X_j||.
    W_q, W_k [Hk, d_k, hidden]; ||X_j|| = sqrt(input_sq[j]) [hidden], the norm over calibration tokens of input
    feature j of the q/k projections. Wanda scores single weights |W_cj| ||X_j||; a channel is a whole row of
    both projections, so its score is the sum over the row.
    """

    name = "wanda"
    needs = frozenset({"inputs"})

    def score(self, stats: LayerStats | None, weights: tuple[Tensor, Tensor]) -> Tensor:
        w_q, w_k = map(as_float64, weights)
        input_norm = as_float64(stats.input_sq).sqrt()  # [hidden]
        # A family with several keys per token (DeltaProduct) gives a channel's k rows side by side: [.., n * hidden]
        keys_per_token = w_k.shape[-1] // w_q.shape[-1]
        return w_q.abs() @ input_norm + w_k.abs() @ input_norm.repeat(keys_per_token)
