"""fla ``linear_attn`` (``LinearAttentionForCausalLM``, layer ``fla.layers.LinearAttention``): vanilla linear attention.

Per head ``S_t = S_{t-1} + phi(k_t) v_t^T`` and ``o_t = S_t^T phi(q_t) / sqrt(d_k)``: no decay, no delta
correction, no L2 norm. The layer has ``q_proj``, ``k_proj``, ``v_proj``, a feature map per head dim (the
state holds its output, which the tap gives), an output norm and ``o_proj``; config ``hidden_size``,
``num_heads``, ``expand_k``, ``expand_v`` (d = hidden * expand / num_heads).

Which feature maps staterank takes, and what it can prune:

- ``identity``, ``relu``, ``elu`` act channel by channel, so keeping q/k channels of the projections keeps the
  same channels of the state: every command, channel pruning included.
- ``elementwise_product`` (the default: phi(x) = W_1 x * W_2 x, two [d_k, d_k] maps) mixes the channels, and its
  size is the config's d_k: analysis and head pruning work, but a model with fewer state channels would need a
  feature map that stock classes cannot state, so channel pruning is refused.
- ``hedgehog``, ``t2r`` and ``dpfp`` change the state's width from d_k; they are refused, as are query heads that
  share key/value heads and the z-normalised output (``do_feature_map_norm``).
"""

from __future__ import annotations

import torch

from staterank.errors import UnsupportedModelError
from staterank.models import register
from staterank.models.base import (
    HeadFeatures,
    LayerShape,
    PruningShapeError,
    head_channels,
    per_head_channels,
    slice_linear_columns,
    slice_linear_rows,
)
from staterank.models.fla_common import ExpandKSizes, FlaAdapter

CHANNELWISE = ("identity", "relu", "elu")
MIXING = ("elementwise_product",)


@register
class LinearAttentionAdapter(ExpandKSizes, FlaAdapter):
    family = "Linear attention (flash-linear-attention)"
    model_types = ("linear_attn",)
    layer_class_name = "LinearAttention"
    no_decay_suffixes = ()

    def __init__(self, model) -> None:
        super().__init__(model)
        config = self.config
        problems = []
        if config.feature_map not in CHANNELWISE + MIXING:
            problems.append(f"feature_map={config.feature_map!r} changes the state's width (supported: "
                            f"{', '.join(CHANNELWISE + MIXING)})")  # fmt: skip
        if getattr(config, "do_feature_map_norm", False):
            problems.append("do_feature_map_norm=True (the z-normalised output) is not supported")
        if any(self.mixer(i).num_kv_groups > 1 for i in self.linear_layers()):
            problems.append("query heads share key/value heads (num_kv_heads < num_heads), whose states coincide")
        if problems:
            raise UnsupportedModelError(f"{self.family}: {'; '.join(problems)}")

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim)

    def conv_state_channels(self, layer: int) -> int:
        return 0  # no short convolutions

    def conv_kernel_size(self, layer: int) -> int:
        return 0

    def qk_conv_weights(self, layer: int) -> None:
        return None

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        heads = (shape.num_k_heads, shape.head_k_dim)
        q = mixer.feature_map_q(mixer.q_proj(hidden).unflatten(-1, heads))
        k = mixer.feature_map_k(mixer.k_proj(hidden).unflatten(-1, heads))
        if mixer.norm_q:
            q = q / (q.sum(-1, True) + 1e-4)
        if mixer.norm_k:
            k = k / (k.sum(-1, True) + 1e-4)
        beta = hidden.new_ones(*hidden.shape[:2], shape.num_v_heads, dtype=torch.float32)  # unused: no delta rule
        return HeadFeatures.from_projections(
            layer, hidden, shape, q, k, mixer.v_proj(hidden), beta, None, delta_rule=False, qk_l2norm=False
        )

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        if self.config.feature_map not in CHANNELWISE:
            raise PruningShapeError(
                f"{self.family}: feature_map={self.config.feature_map!r} mixes the q/k channels and is sized by d_k, "
                "so a model with fewer state channels cannot be described by its config; q/k channel pruning needs "
                f"a channel-wise feature map ({', '.join(CHANNELWISE)}); head pruning works"
            )
        mixer = self.mixer(layer)
        rows = per_head_channels(index, mixer.head_k_dim)
        slice_linear_rows(mixer.q_proj, rows)
        slice_linear_rows(mixer.k_proj, rows)
        mixer.head_k_dim = int(index.shape[1])
        mixer.key_dim = mixer.key_dim_per_group = mixer.head_k_dim * index.shape[0]

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        key_rows, value_rows = head_channels(kept_k, mixer.head_k_dim), head_channels(kept_v, mixer.head_v_dim)
        slice_linear_rows(mixer.q_proj, key_rows)
        slice_linear_rows(mixer.k_proj, key_rows)
        slice_linear_rows(mixer.v_proj, value_rows)
        slice_linear_columns(mixer.o_proj, value_rows)
        mixer.num_heads = mixer.num_kv_heads = len(kept_v)
        mixer.key_dim = mixer.key_dim_per_group = mixer.head_k_dim * len(kept_k)
        mixer.value_dim = mixer.value_dim_per_group = mixer.head_v_dim * len(kept_v)
