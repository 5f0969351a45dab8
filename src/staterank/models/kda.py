"""fla ``kda`` (``KDAForCausalLM``, layer ``fla.layers.KimiDeltaAttention``): the delta rule with a decay per key
channel (see :mod:`staterank.models.kda_common`).

The layer keeps fla's separate ``q_proj``, ``k_proj``, ``v_proj`` and their ``ShortConvolution``s, a low-rank
forget gate ``f_proj`` = (hidden -> d_v, d_v -> Hv * d_k), ``A_log`` [Hv], ``dt_bias`` [Hv * d_k], ``b_proj`` [Hv],
a low-rank output gate ``g_proj`` = (hidden -> d_v, d_v -> Hv * d_v, with bias), ``o_norm`` and ``o_proj``. Value
heads may be grouped (``num_v_heads`` a multiple of ``num_heads``). Config: ``head_dim`` (d_k), ``expand_v``
(d_v = int(head_dim * expand_v): a smaller d_k keeps d_v by adjusting ``expand_v``), ``num_heads``, ``num_v_heads``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from staterank.backends.kda import kda_log_decay
from staterank.models import register
from staterank.models.base import (
    LayerShape,
    head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_linear_rows,
    slice_vector,
)
from staterank.models.fla_common import FlaAdapter
from staterank.models.kda_common import gate_channels, value_head_gate_channels


@register
class KdaAdapter(FlaAdapter):
    family = "KDA (flash-linear-attention)"
    model_types = ("kda",)
    layer_class_name = "KimiDeltaAttention"
    state_v_first = True  # fla 0.6.0's KimiDeltaAttention calls its kernels with state_v_first=True

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim)

    def _log_decay(self, mixer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        gate = mixer.f_proj(hidden).unflatten(-1, (mixer.num_v_heads, mixer.head_k_dim))  # [B, T, Hv, d_k]
        return kda_log_decay(gate, mixer.A_log, mixer.dt_bias, mixer.lower_bound)

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        rows = gate_channels(index, mixer.num_v_heads, mixer.head_k_dim)
        slice_linear_rows(mixer.f_proj[1], rows)
        mixer.dt_bias = slice_vector(mixer.dt_bias, rows)
        super()._keep_qk_channels(layer, index)  # q, k rows and convolutions
        mixer.head_dim = mixer.head_k_dim
        mixer.gate_dim = mixer.num_v_heads * mixer.head_k_dim

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        self._keep_key_heads(mixer, kept_k)
        value_rows = head_channels(kept_v, mixer.head_v_dim)
        slice_linear_rows(mixer.v_proj, value_rows)
        if mixer.use_short_conv:
            slice_conv_channels(mixer.v_conv1d, value_rows)
        slice_linear_rows(mixer.b_proj, kept_v)
        slice_linear_rows(mixer.g_proj[1], value_rows)
        slice_linear_columns(mixer.o_proj, value_rows)
        gate_rows = value_head_gate_channels(kept_v, mixer.head_k_dim)
        slice_linear_rows(mixer.f_proj[1], gate_rows)
        mixer.dt_bias = slice_vector(mixer.dt_bias, gate_rows)
        mixer.A_log = slice_vector(mixer.A_log, kept_v)
        mixer.num_heads, mixer.num_v_heads = len(kept_k), len(kept_v)
        mixer.value_dim = mixer.head_v_dim * len(kept_v)
        mixer.gate_dim = mixer.head_k_dim * len(kept_v)

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        return {"num_heads": num_k_heads, "num_v_heads": num_v_heads}
