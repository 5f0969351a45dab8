"""fla ``gated_deltanet`` (``GatedDeltaNetForCausalLM``): delta rule with a per-value-head decay.

Value heads may be grouped (``num_v_heads`` a multiple of ``num_heads``); value head h reads the
q, k of key head h // (num_v_heads // num_heads). The decay is
g_t = -exp(A_log) * softplus(a_proj(x_t) + dt_bias), one per value head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from staterank.models import register
from staterank.models.base import LayerShape, slice_linear_rows, slice_vector
from staterank.models.fla_common import FlaAdapter
from staterank.models.per_layer import StaterankGatedDeltaNetConfig


@register
class GatedDeltaNetAdapter(FlaAdapter):
    """Config: ``num_heads`` (key heads), ``num_v_heads``, ``head_dim`` (d_k), ``expand_v`` (d_v = d_k * expand_v)."""

    family = "Gated DeltaNet (flash-linear-attention)"
    per_layer_model_type = StaterankGatedDeltaNetConfig.model_type
    model_types = ("gated_deltanet", per_layer_model_type)
    layer_class_name = "GatedDeltaNet"
    state_v_first = True  # fla 0.6.0's GatedDeltaNet calls its kernels with state_v_first=True

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim)

    def _log_decay(self, mixer, hidden: torch.Tensor) -> torch.Tensor:
        return -mixer.A_log.float().exp() * F.softplus(mixer.a_proj(hidden).float() + mixer.dt_bias.float())

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        self._keep_key_heads(mixer, kept_k)
        self._keep_value_heads(mixer, kept_v)
        slice_linear_rows(mixer.a_proj, kept_v)
        mixer.A_log = slice_vector(mixer.A_log, kept_v)
        mixer.dt_bias = slice_vector(mixer.dt_bias, kept_v)
        mixer.num_heads, mixer.num_v_heads = len(kept_k), len(kept_v)

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        return {"num_heads": num_k_heads, "num_v_heads": num_v_heads}  # head_dim and expand_v keep d_k, d_v
