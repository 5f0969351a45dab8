"""fla ``gated_deltaproduct`` (``GatedDeltaProductForCausalLM``): n = ``num_householder`` delta steps per token.

Per token t the layer projects one query and n keys, values and betas, token-major within the projections:
``k_proj`` has ``n * key_dim`` rows laid out ``(n h d)`` (block j holds every head's j-th key), ``v_proj``
``n * value_dim`` rows ``(n h d)``, ``b_proj`` ``n * num_v_heads`` rows ``(n h)``, and the short convolutions
cover the same channels. The state takes the decay once per token, then n delta steps (see
:mod:`staterank.backends.delta_product`), so it is [d_k, d_v] per value head as in Gated DeltaNet.

A kept q/k channel c of key head h keeps row c of q and row c of every one of the head's n keys: one channel
set per head covers all of its Householder keys, and the pruned model is again a stock configuration.

The feature tap gives q per token [B, T, Hk, d_k] and the state's inputs per delta step, token-major:
k [B, T * n, Hk, d_k], v [B, T * n, Hv, d_v], beta [B, T * n, Hv] and the log decay [B, T * n, Hv] (the
token's decay on its first step, 0 on the others). Replaying those T * n steps through the delta rule gives the
layer's state exactly; ``rank.states_at`` replays features step for token, so it needs to cut them at
``positions * n`` (k.shape[1] // q.shape[1] steps per token) before analyses of this family are right.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from staterank.backends.delta_product import expand_householder_steps
from staterank.models import register
from staterank.models.base import (
    HeadFeatures,
    LayerShape,
    PruningShapeError,
    head_channels,
    per_head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_linear_rows,
    slice_vector,
)
from staterank.models.fla_common import FlaAdapter


def householder_rows(rows: torch.Tensor, block_size: int, num_householder: int) -> torch.Tensor:
    """The same ``rows`` [m] of every one of ``num_householder`` blocks of ``block_size``: [n * m], block-major."""
    return (torch.arange(num_householder)[:, None] * block_size + rows[None, :]).reshape(-1)


@register
class GatedDeltaProductAdapter(FlaAdapter):
    """Config: ``num_heads``, ``head_dim`` (d_k), ``expand_v`` (d_v = d_k * expand_v), ``num_householder``."""

    family = "Gated DeltaProduct (flash-linear-attention)"
    model_types = ("gated_deltaproduct",)
    layer_class_name = "GatedDeltaProduct"

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim)

    def conv_state_channels(self, layer: int) -> int:
        mixer = self.mixer(layer)
        n = mixer.num_householder
        return mixer.key_dim + n * (mixer.key_dim + mixer.value_dim) if mixer.use_short_conv else 0

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        batch, seq = hidden.shape[:2]
        n = mixer.num_householder
        q = self._conv(mixer, "q", mixer.q_proj(hidden))  # [B, T, Hk * d_k]
        k = self._conv(mixer, "k", mixer.k_proj(hidden))  # [B, T, n * Hk * d_k], (n h d)
        v = self._conv(mixer, "v", mixer.v_proj(hidden))  # [B, T, n * Hv * d_v], (n h d)
        beta = mixer.b_proj(hidden).float().sigmoid()  # [B, T, n * Hv], (n h)
        if mixer.allow_neg_eigval:
            beta = beta * 2
        log_decay = None
        if mixer.use_forget_gate:
            g = -mixer.A_log.float().exp() * F.softplus(mixer.a_proj(hidden).float() + mixer.dt_bias.float())
            _, log_decay = expand_householder_steps(n, g=g)  # [B, T * n, Hv]
        beta = beta.reshape(batch, seq * n, shape.num_v_heads)
        return HeadFeatures.from_projections(layer, hidden, shape, q, k, v, beta, log_decay)

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """q rows [Hk, d_k, hidden] (a view) and k rows [Hk, d_k, n * hidden]: a channel's rows of all n keys side
        by side, so scores over a row score the channel's every key. The k rows are a copy (k_proj is laid out
        (n h d)): writing into them leaves the model alone."""
        shape = self.layer_shape(layer)
        n = self.mixer(layer).num_householder
        q, k = tensors  # q_proj: [Hk * d_k, hidden]; k_proj: [n * Hk * d_k, hidden]
        k = k.view(n, shape.num_k_heads, shape.head_k_dim, -1).permute(1, 2, 0, 3)
        return q.view(shape.num_k_heads, shape.head_k_dim, -1), k.reshape(shape.num_k_heads, shape.head_k_dim, -1)

    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Refused: the k kernels of a channel's n keys are no view of one tensor (the convolution is laid out
        (n h d)), so writes through them, as folding a rotation in does, could not reach the model."""
        raise PruningShapeError(
            f"{self.family}: q/k rotations (pca rotate=true) are not supported, because a channel's kernels of its "
            "Householder keys are not one writable view; use pca without rotate, or another --method"
        )

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        q_rows = per_head_channels(index, mixer.head_k_dim)
        k_rows = householder_rows(q_rows, mixer.key_dim, mixer.num_householder)
        for name, rows in (("q", q_rows), ("k", k_rows)):
            slice_linear_rows(getattr(mixer, f"{name}_proj"), rows)
            if mixer.use_short_conv:
                slice_conv_channels(getattr(mixer, f"{name}_conv1d"), rows)
        mixer.head_k_dim = int(index.shape[1])
        mixer.key_dim = mixer.head_k_dim * index.shape[0]

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        n = mixer.num_householder
        key_rows = head_channels(kept_k, mixer.head_k_dim)
        value_rows = head_channels(kept_v, mixer.head_v_dim)
        sliced: list[tuple[str, torch.Tensor]] = [
            ("q", key_rows),
            ("k", householder_rows(key_rows, mixer.key_dim, n)),
            ("v", householder_rows(value_rows, mixer.value_dim, n)),
        ]
        for name, rows in sliced:
            slice_linear_rows(getattr(mixer, f"{name}_proj"), rows)
            if mixer.use_short_conv:
                slice_conv_channels(getattr(mixer, f"{name}_conv1d"), rows)
        slice_linear_rows(mixer.b_proj, householder_rows(kept_v, mixer.num_v_heads, n))
        if mixer.use_forget_gate:
            slice_linear_rows(mixer.a_proj, kept_v)
            mixer.A_log = slice_vector(mixer.A_log, kept_v)
            mixer.dt_bias = slice_vector(mixer.dt_bias, kept_v)
        if mixer.use_output_gate:
            slice_linear_rows(mixer.g_proj, value_rows)
        slice_linear_columns(mixer.o_proj, value_rows)
        mixer.num_heads, mixer.num_v_heads = len(kept_k), len(kept_v)
        mixer.key_dim = mixer.head_k_dim * len(kept_k)
        mixer.value_dim = mixer.head_v_dim * len(kept_v)

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        if num_v_heads != num_k_heads:  # the config has no num_v_heads: the layer builds one value head per key head
            raise PruningShapeError(f"{self.family} has one value head per key head, not {num_k_heads}, {num_v_heads}")
        return {"num_heads": num_k_heads}  # head_dim and expand_v keep d_k, d_v
