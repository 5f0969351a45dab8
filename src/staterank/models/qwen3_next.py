"""transformers Qwen3-Next (``Qwen3NextForCausalLM``): Gated DeltaNet with fused, per-key-group projections.

``in_proj_qkvz`` [Hk * (2 d_k + 2 r d_v), hidden] holds, for each key head g in turn, the rows
[q_g (d_k) | k_g (d_k) | v of its r value heads (r d_v) | z of them (r d_v)], r = Hv / Hk; ``in_proj_ba``
[2 Hv, hidden] holds [b (r) | a (r)] per key head. The mixer regroups them (``fix_query_key_value_ordering``)
into the [q | k | v] channel order of its convolution, which is laid out as in Qwen3.5.

Because the q and k rows of each key head are a contiguous block of its group, ``qk_weights`` and ``qk_grads``
return strided views of the fused weight and of its gradient, which has the same layout.
"""

from __future__ import annotations

import torch
from torch import nn

from staterank.models import register
from staterank.models.base import slice_linear_rows
from staterank.models.qwen_common import QwenGatedDeltaNetAdapter, Selection


@register
class Qwen3NextAdapter(QwenGatedDeltaNetAdapter):
    family = "Qwen3-Next (transformers)"
    model_types = ("qwen3_next",)
    lora_targets = ("in_proj_qkvz",)  # q, k, v and z in one fused projection

    def _project(self, mixer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the mixer's own regrouping: q, k [B, T, Hk, d_k], v [B, T, Hv, d_v], b, a [B, T, Hv]
        q, k, v, _, b, a = mixer.fix_query_key_value_ordering(mixer.in_proj_qkvz(hidden), mixer.in_proj_ba(hidden))
        return torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1), b, a

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.layer_shape(layer)
        (fused,) = tensors  # in_proj_qkvz
        groups = fused.unflatten(0, (shape.num_k_heads, -1))  # [Hk, 2 d_k + 2 r d_v, hidden]
        return groups[:, : shape.head_k_dim], groups[:, shape.head_k_dim : 2 * shape.head_k_dim]

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        return (self.mixer(layer).in_proj_qkvz.weight,)

    def _slice_projections(self, mixer: nn.Module, selection: Selection) -> None:
        d_k, d_v, r = selection.shape.head_k_dim, selection.shape.head_v_dim, selection.shape.group_size
        # rows within each kept key head's group, then offset by the group's start
        value_rows = (selection.value_heads[..., None] * d_v + torch.arange(d_v)).flatten(1)  # [G, r' d_v]
        channels = selection.key_channels
        rows = torch.cat([channels, d_k + channels, 2 * d_k + value_rows, 2 * d_k + r * d_v + value_rows], dim=1)
        group_rows = 2 * d_k + 2 * r * d_v
        slice_linear_rows(mixer.in_proj_qkvz, (selection.key_heads[:, None] * group_rows + rows).reshape(-1))
        if not selection.keeps_value_heads:
            ba_rows = torch.cat([selection.value_heads, r + selection.value_heads], dim=1)
            slice_linear_rows(mixer.in_proj_ba, (selection.key_heads[:, None] * 2 * r + ba_rows).reshape(-1))
