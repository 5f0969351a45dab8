"""Weight magnitude in the ℓ2 norm: channels whose q and k projection rows are long (paper 1's magnitude baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from staterank.prune.channels.base import ScoreCriterion, as_float64, register

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class L2Criterion(ScoreCriterion):
    """The ℓ2 norm of each channel's q and k projection rows together (weight magnitude).

    score[h, c] = sqrt(||W_q[h, c, :]||_2^2 + ||W_k[h, c, :]||_2^2), with W_q, W_k [Hk, d_k, hidden]: the length of
    everything the channel reads from the hidden state, as ``l1`` is its ℓ1 size.
    """

    name = "l2"
    needs = frozenset()

    def score(self, stats: LayerStats | None, weights: tuple[Tensor, Tensor]) -> Tensor:
        w_q, w_k = map(as_float64, weights)
        return (w_q.square().sum(-1) + w_k.square().sum(-1)).sqrt()
