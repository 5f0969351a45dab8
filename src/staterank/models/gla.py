"""fla ``gla`` (``GLAForCausalLM``, layer ``fla.layers.GatedLinearAttention``): gated linear attention.

The state takes no delta correction: per head, ``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T`` with a decay per
key channel, ``g = logsigmoid(gk_proj(x)) / gate_logit_normalizer`` (clamped below at ``clamp_min`` if set),
and q, k are not L2-normalised. The layer has ``q_proj``, ``k_proj``, ``v_proj``, optional short convolutions
(SiLU), the low-rank gate ``gk_proj`` = (hidden -> r, r -> key_dim with bias: one row per key channel,
head-major), an output gate ``g_proj``, a per-head output norm and ``o_proj``. Config: ``hidden_size``,
``num_heads``, ``expand_k``, ``expand_v`` (d_k = hidden * expand_k / num_heads; a smaller d_k scales
``expand_k``). A ``feature_map`` is an elementwise activation of q and k, so the tap (after it) is what the
state holds and keeping channels commutes with it. Query heads sharing key/value heads (``num_kv_heads`` below
``num_heads``) are refused: their states coincide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from staterank.models import register
from staterank.models.base import (
    HeadFeatures,
    head_channels,
    per_head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_linear_rows,
)
from staterank.models.fla_common import ExpandKSizes, FlaAdapter, UngroupedHeads


@register
class GlaAdapter(UngroupedHeads, ExpandKSizes, FlaAdapter):
    family = "GLA (flash-linear-attention)"
    model_types = ("gla",)
    layer_class_name = "GatedLinearAttention"
    state_v_first = True  # fla 0.6.0's GatedLinearAttention calls its kernels with state_v_first=True
    no_decay_suffixes = ()

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        q, k, v = (self._plain_conv(mixer, name, getattr(mixer, f"{name}_proj")(hidden)) for name in ("q", "k", "v"))
        if mixer.feature_map_fn is not None:
            q, k = mixer.feature_map_fn(q), mixer.feature_map_fn(k)
        beta = hidden.new_ones(*hidden.shape[:2], shape.num_v_heads, dtype=torch.float32)  # unused: no delta rule
        gate = F.logsigmoid(mixer.gk_proj(hidden).float()) / mixer.gate_logit_normalizer
        if mixer.clamp_min is not None:
            gate = gate.clamp_min(mixer.clamp_min)
        log_decay = gate.unflatten(-1, (shape.num_v_heads, shape.head_k_dim))  # [B, T, H, d_k]
        return HeadFeatures.from_projections(
            layer, hidden, shape, q, k, v, beta, log_decay, delta_rule=False, qk_l2norm=False
        )

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        rows = per_head_channels(index, mixer.head_k_dim)  # the gate's rows are head-major as q's and k's
        slice_linear_rows(mixer.gk_proj[1], rows)
        super()._keep_qk_channels(layer, index)  # q, k rows and convolutions; head_k_dim, key_dim
        mixer.key_dim_per_group = mixer.key_dim

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        self._keep_key_heads(mixer, kept_k)
        slice_linear_rows(mixer.gk_proj[1], head_channels(kept_k, mixer.head_k_dim))
        value_rows = head_channels(kept_v, mixer.head_v_dim)
        slice_linear_rows(mixer.v_proj, value_rows)
        if mixer.use_short_conv:
            slice_conv_channels(mixer.v_conv1d, value_rows)
        if mixer.use_output_gate:
            slice_linear_rows(mixer.g_proj, value_rows)
        slice_linear_columns(mixer.o_proj, value_rows)
        mixer.num_heads = mixer.num_kv_heads = len(kept_v)
        mixer.value_dim = mixer.value_dim_per_group = mixer.head_v_dim * len(kept_v)
        mixer.key_dim_per_group = mixer.key_dim
