"""fla ``delta_net`` (``DeltaNetForCausalLM``): the delta rule without decay, one head count for q, k, v."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from staterank.models import register
from staterank.models.base import LayerShape
from staterank.models.fla_common import ExpandKSizes, FlaAdapter
from staterank.models.per_layer import StaterankDeltaNetConfig


@register
class DeltaNetAdapter(ExpandKSizes, FlaAdapter):
    """Config: ``hidden_size``, ``num_heads``, ``expand_k``, ``expand_v`` (head_k_dim = hidden*expand_k/num_heads)."""

    family = "DeltaNet (flash-linear-attention)"
    per_layer_model_type = StaterankDeltaNetConfig.model_type
    model_types = ("delta_net", per_layer_model_type)
    layer_class_name = "DeltaNet"

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim)

    def _qk_activation(self, mixer, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # SiLU is already in the convolution for qk_activation="silu"; the others come after it
        if mixer.qk_activation == "relu":
            return q.relu(), k.relu()
        if mixer.qk_activation == "elu":
            return F.elu(q) + 1, F.elu(k) + 1
        return q, k

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        self._keep_key_heads(mixer, kept_k)
        self._keep_value_heads(mixer, kept_v)
        mixer.num_heads = len(kept_k)
