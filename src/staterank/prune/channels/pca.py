"""PCA of the normalised keys: keep the top-``keep`` principal directions instead of ``keep`` channels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from staterank.prune.channels.base import ChannelCriterion, ChannelSelection, as_float64, register, top_channels

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class PCACriterion(ChannelCriterion):
    """The channels carrying most of the normalised keys' principal subspace (option rotate=true).

    Per head, the top-``keep`` eigenvectors of G = gram_k_normed[h] (+ gram_q_normed[h] with ``include_queries``).
    G [d_k, d_k] sums k_t k_t^T over the L2-normalised keys the delta rule sees, so its top eigenvectors span the
    subspace that holds most of their energy. Returns ``basis`` [Hk, keep, d_k] (orthonormal rows, by decreasing
    eigenvalue; each row's sign makes its largest entry positive, for reproducibility): the pruned head would use
    B k_t and B q_t. Also ``scores`` [Hk, d_k], channel c's energy in that subspace, sum over rows of B[:, c]^2,
    and ``index``, the ``keep`` channels with the most, for callers that cannot rotate.

    A rotation does not commute with the depthwise short convolution (one kernel per channel) nor with the SiLU
    after it, nor with the L2 norm of the kept part: B conv(W x) is not conv'(B W x) for any depthwise conv'. Folding
    B into the projection rows is exact up to the convolution; the kernels and the activation must be approximated
    by the caller (the pruning driver), not here. Measured on tiny-deltanet (docs/RESULTS.md), that approximation
    is far off (SiLU features are mostly positive; a signed rotation before SiLU is not one after it), so by default
    (``rotate=False``) no basis is returned and the head keeps the ``index`` channels: the channels that carry most
    of the principal subspace. ``rotate=True`` returns the basis for the driver to fold in.
    """

    name = "pca"
    needs = frozenset({"features"})
    include_queries: bool = False
    rotate: bool = False

    def _select(
        self, stats: LayerStats | None, weights: tuple[Tensor, Tensor], keep: int, generator: torch.Generator
    ) -> ChannelSelection:
        gram = as_float64(stats.gram_k_normed)  # [Hk, d_k, d_k]
        if self.include_queries:
            gram = gram + as_float64(stats.gram_q_normed)
        _, eigenvectors = torch.linalg.eigh(gram)  # ascending eigenvalues, eigenvectors in columns
        basis = eigenvectors.flip(-1)[..., :keep].transpose(-1, -2)  # [Hk, keep, d_k]
        basis = basis * basis.gather(-1, basis.abs().argmax(-1, keepdim=True)).sign()  # unit rows: never 0
        energy = basis.square().sum(-2)  # [Hk, d_k]
        return ChannelSelection(top_channels(energy, keep), scores=energy, basis=basis if self.rotate else None)
