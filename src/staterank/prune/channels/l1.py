"""Weight magnitude: channels whose q and k projection rows are large."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from staterank.prune.channels.base import ScoreCriterion, as_float64, register

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class L1Criterion(ScoreCriterion):
    """The L1 norms of each channel's q and k projection rows (weight magnitude).

    score[h, c] = ||W_q[h, c, :]||_1 + ||W_k[h, c, :]||_1, with W_q, W_k [Hk, d_k, hidden].
    """

    name = "l1"
    needs = frozenset()

    def score(self, stats: LayerStats | None, weights: tuple[Tensor, Tensor]) -> Tensor:
        w_q, w_k = map(as_float64, weights)
        return w_q.abs().sum(-1) + w_k.abs().sum(-1)
