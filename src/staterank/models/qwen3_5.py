"""transformers Qwen3.5 (``Qwen3_5ForCausalLM``, ``Qwen3_5MoeForCausalLM``): Gated DeltaNet with separate projections.

``in_proj_qkv`` [2 * key_dim + value_dim, hidden] concatenates q (all key heads), k, v (all value heads), the
same layout as the convolution channels; ``in_proj_z`` [value_dim, hidden] is the output gate, ``in_proj_b`` and
``in_proj_a`` [Hv, hidden] give beta and the decay. The MoE variant has the same linear-attention layer.

``AutoModelForCausalLM`` builds ``*ForCausalLM`` on the text config (``model_type`` ``qwen3_5_text`` /
``qwen3_5_moe_text``) also from a multimodal ``qwen3_5`` / ``qwen3_5_moe`` checkpoint; those two model types are
the multimodal classes, whose text sizes live in ``config.text_config``.
"""

from __future__ import annotations

import torch
from torch import nn

from staterank.models import register
from staterank.models.base import slice_linear_rows
from staterank.models.qwen_common import QwenGatedDeltaNetAdapter, Selection


@register
class Qwen35Adapter(QwenGatedDeltaNetAdapter):
    family = "Qwen3.5 (transformers)"
    model_types = ("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe")
    lora_targets = ("in_proj_qkv",)  # q, k and v in one projection

    def _project(self, mixer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mixer.in_proj_qkv(hidden), mixer.in_proj_b(hidden), mixer.in_proj_a(hidden)

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        shape, mixer = self.layer_shape(layer), self.mixer(layer)
        (weight,) = tensors  # in_proj_qkv: [2 * key_dim + value_dim, hidden]
        q, k = weight[: 2 * mixer.key_dim].view(2, shape.num_k_heads, shape.head_k_dim, weight.shape[1])
        return q, k

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        return (self.mixer(layer).in_proj_qkv.weight,)

    def _slice_projections(self, mixer: nn.Module, selection: Selection) -> None:
        slice_linear_rows(mixer.in_proj_qkv, selection.conv_channels)  # the same [q | k | v] layout
        if not selection.keeps_value_heads:
            slice_linear_rows(mixer.in_proj_z, selection.value_rows)
            slice_linear_rows(mixer.in_proj_b, selection.value_head_index)
            slice_linear_rows(mixer.in_proj_a, selection.value_head_index)
