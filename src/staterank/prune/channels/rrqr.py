"""Strong RRQR of the q/k features (Nazari & Rusch 2026): keep the channels that best span all of them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from staterank.errors import StaterankWarning
from staterank.prune.channels.base import ChannelCriterion, ChannelSelection, CriterionError, as_float64, register
from staterank.rrqr import gram_factor, strong_rrqr

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class RRQRCriterion(ChannelCriterion):
    """Strong rank-revealing QR of the stacked q and k features (option f > 1, default 1.5).

    Per head, the first ``keep`` pivots of strong RRQR (:func:`staterank.rrqr.strong_rrqr`, bound ``f``) of M.
    M = [Q; K] [2 T, d_k] stacks the query and key features of the head over the T calibration tokens (only K
    without ``use_queries``). M^T M = gram_q[h] + gram_k[h], and RRQR's choice depends on M only through M^T M, so
    it runs on ``gram_factor`` of that sum. The features are taken before the L2 norm, as the reference code did;
    ``normalize`` uses the L2-normalised ones (gram_*_normed) instead. index [Hk, keep], ascending; no scores.
    """

    name = "rrqr"
    needs = frozenset({"features"})
    f: float = 1.5
    use_queries: bool = True
    normalize: bool = False
    max_swaps: int = 1000

    def __post_init__(self) -> None:
        if not self.f > 1:
            raise CriterionError(f"rrqr: f must exceed 1, got {self.f}")
        if self.max_swaps < 0:
            raise CriterionError(f"rrqr: max_swaps must be at least 0, got {self.max_swaps}")

    def _select(
        self, stats: LayerStats | None, weights: tuple[Tensor, Tensor], keep: int, generator: torch.Generator
    ) -> ChannelSelection:
        suffix = "_normed" if self.normalize else ""
        gram = as_float64(getattr(stats, f"gram_k{suffix}"))  # [Hk, d_k, d_k]
        if self.use_queries:
            gram = gram + as_float64(getattr(stats, f"gram_q{suffix}"))
        index = []
        for head, head_gram in enumerate(gram):
            perm, info = strong_rrqr(gram_factor(head_gram), keep, self.f, self.max_swaps)
            if not info.converged:
                warnings.warn(
                    f"layer {stats.layer}, head {head}: strong RRQR stopped after {info.swaps} swaps with a "
                    f"determinant ratio of {info.max_ratio:.3g} > f = {self.f}; the selection is not certified strong",
                    StaterankWarning,
                    stacklevel=2,
                )
            index.append(perm[:keep].sort().values)
        return ChannelSelection(torch.stack(index))
