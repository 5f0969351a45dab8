"""First-order Taylor importance (Molchanov et al. 2019): the loss change a removed weight would cause."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from staterank.prune.channels.base import ScoreCriterion, as_float64, register

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class TaylorCriterion(ScoreCriterion):
    """First-order Taylor importance |W dL/dW|, summed over each channel's q and k rows.

    score[h, c] = taylor_q[h, c] + taylor_k[h, c], each [Hk, d_k].
    taylor_*[h, c] = sum over calibration batches and inputs j of |W[h, c, j] dL/dW[h, c, j]|, the first-order
    estimate of the loss change from zeroing the channel's weights one at a time (the sum over batches rather than
    the mean does not change the ranking).
    """

    name = "taylor"
    needs = frozenset({"gradients"})

    def score(self, stats: LayerStats | None, weights: tuple[Tensor, Tensor]) -> Tensor:
        return as_float64(stats.taylor_q) + as_float64(stats.taylor_k)
