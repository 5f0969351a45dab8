"""fla ``delta_net`` (``DeltaNetForCausalLM``): the delta rule without decay, one head count for q, k, v."""

from __future__ import annotations

import torch

from staterank.models import register
from staterank.models.base import HeadFeatures, LayerShape
from staterank.models.fla_common import FlaAdapter


@register
class DeltaNetAdapter(FlaAdapter):
    """Config: ``hidden_size``, ``num_heads``, ``expand_k``, ``expand_v`` (head_k_dim = hidden*expand_k/num_heads)."""

    family = "DeltaNet (flash-linear-attention)"
    model_types = ("delta_net",)
    layer_class_name = "DeltaNet"

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim)

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer = self.mixer(layer)
        shape = self.layer_shape(layer)
        q = self._conv(mixer, "q", mixer.q_proj(hidden))
        k = self._conv(mixer, "k", mixer.k_proj(hidden))
        v = self._conv(mixer, "v", mixer.v_proj(hidden))
        if mixer.qk_activation == "relu":
            q, k = q.relu(), k.relu()
        elif mixer.qk_activation == "elu":
            q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        if mixer.use_beta:
            beta = mixer.b_proj(hidden).float().sigmoid()
        else:
            beta = hidden.new_ones(hidden.shape[:2] + (shape.num_v_heads,), dtype=torch.float32)
        if mixer.allow_neg_eigval:
            beta = beta * 2
        batch, seq = hidden.shape[:2]
        return HeadFeatures(
            layer=layer,
            hidden=hidden,
            q=q.view(batch, seq, shape.num_k_heads, shape.head_k_dim),
            k=k.view(batch, seq, shape.num_k_heads, shape.head_k_dim),
            v=v.view(batch, seq, shape.num_v_heads, shape.head_v_dim),
            beta=beta,
            log_decay=None,
        )

    def _keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        self._keep_key_heads(mixer, kept_k)
        self._keep_value_heads(mixer, kept_v)
        mixer.num_heads = len(kept_k)

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        num_heads = self.layer_shape(self.linear_layers()[0]).num_k_heads
        self.config.expand_k = num_heads * head_k_dim / self.config.hidden_size
        for layer in self.linear_layers():
            self.mixer(layer).expand_k = self.config.expand_k

    def _set_head_counts(self, num_k_heads: int, num_v_heads: int) -> None:
        shape = self.layer_shape(self.linear_layers()[0])
        self.config.num_heads = num_k_heads
        self.config.expand_k = num_k_heads * shape.head_k_dim / self.config.hidden_size
        self.config.expand_v = num_v_heads * shape.head_v_dim / self.config.hidden_size
        for layer in self.linear_layers():
            mixer = self.mixer(layer)
            mixer.expand_k, mixer.expand_v = self.config.expand_k, self.config.expand_v
