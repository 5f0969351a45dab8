"""transformers Kimi Linear (``KimiLinearForCausalLM``): KDA layers (see :mod:`staterank.models.kda_common`)
between MLA full-attention layers (3 : 1 in Kimi-Linear-48B-A3B).

A KDA layer (``model.layers[i].self_attn``, ``KimiLinearDeltaAttention``) has ``q_proj``, ``k_proj``, ``v_proj``
[H * d, hidden], one depthwise ``conv1d`` over the concatenated [q | k | v] channels (SiLU), a ``forget_gate``
(``f_a_proj`` hidden -> d, ``f_b_proj`` d -> H * d, ``dt_bias`` [H * d], ``A_log`` [1, 1, H, 1]), ``b_proj`` [H],
an output gate ``g_a_proj`` -> ``g_b_proj`` [H * d], a per-head gated RMSNorm and ``o_proj``. There are no grouped
value heads. The transformers cache keeps the state [B, H, d_k, d_v] in float32.

``KimiLinearConfig`` has one ``linear_head_dim`` for d_k, d_v and the two low-rank gate widths, and the modelling
code reads no separate value dim. A model whose d_k was cut is therefore saved with ``model_type``
``staterank_kimi_linear``: the stock fields, ``linear_head_dim`` still d_v (and the gate widths), plus
``linear_key_head_dim``; ``import staterank`` registers it with the Auto classes. Its model is the stock one with
KDA layers whose q, k and forget-gate widths are d_k. Models with an unchanged d_k (head pruning) stay stock.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, KimiLinearConfig, KimiLinearForCausalLM
from transformers.activations import ACT2FN
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.kimi_linear import modeling_kimi_linear

from staterank.models import register
from staterank.models.base import (
    LayerShape,
    ModelAdapter,
    head_channels,
    per_head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_linear_rows,
    slice_vector,
)
from staterank.models.fla_common import causal_depthwise_conv
from staterank.models.hf_cache import TransformersCacheMixin
from staterank.models.kda_common import gate_channels, value_head_gate_channels


@strict
class StaterankKimiLinearConfig(KimiLinearConfig):
    """``kimi_linear`` fields plus ``linear_key_head_dim`` (d_k; ``linear_head_dim`` stays d_v)."""

    model_type = "staterank_kimi_linear"
    linear_key_head_dim: int | None = None

    def __post_init__(self, **kwargs) -> None:
        super().__post_init__(**kwargs)
        if self.linear_key_head_dim is None:
            self.linear_key_head_dim = self.linear_head_dim


class StaterankKimiDeltaAttention(modeling_kimi_linear.KimiLinearDeltaAttention):
    """A KDA layer whose q, k (and forget gate) have ``head_k_dim`` channels per head, v and the output ``head_dim``."""

    def __init__(self, config: StaterankKimiLinearConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        resize_key_dim(self, config.linear_key_head_dim)

    def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
        # KimiLinearDeltaAttention.forward with the q, k widths apart from v's
        kernels = modeling_kimi_linear  # looked up per call: staterank routes CPU calls by rebinding these names
        hidden_states = modeling_kimi_linear.apply_mask_to_padding_states(hidden_states, attention_mask)
        batch_size, seq_len = hidden_states.shape[:2]
        mixed_qkv = torch.cat(
            [self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)], dim=-1
        ).transpose(1, 2)
        conv_state = recurrent_state = None
        if cache_params is not None:
            conv_state = cache_params.get_conv_state(self.layer_idx, state_idx=0)
            recurrent_state = cache_params.get_recurrent_state(self.layer_idx, state_idx=0)
        weight = self.conv1d.weight.squeeze(1)
        if conv_state is not None and seq_len == 1:
            mixed_qkv = kernels.causal_conv1d_update(mixed_qkv, conv_state, weight=weight, activation=self.activation)
        else:
            if cache_params is not None:
                mixed_qkv = cache_params.update_conv_state(
                    mixed_qkv, self.layer_idx, conv_kernel_size=self.conv_kernel_size
                )
            mixed_qkv = kernels.causal_conv1d_fn(mixed_qkv, weight=weight, activation=self.activation, **kwargs)
            mixed_qkv = mixed_qkv[:, :, -seq_len:]
        query, key, value = torch.split(mixed_qkv.transpose(1, 2), [self.key_dim, self.key_dim, self.qkv_dim], dim=-1)
        query, key = (x.view(batch_size, seq_len, -1, self.head_k_dim) for x in (query, key))
        value = value.view(batch_size, seq_len, -1, self.head_dim)
        g = self.forget_gate(hidden_states)  # [B, T, H, d_k]
        beta = torch.sigmoid(self.b_proj(hidden_states))
        kernel = (
            kernels.recurrent_kimi_delta_attention
            if recurrent_state is not None and seq_len == 1
            else kernels.chunk_kimi_delta_attention
        )
        core_attn_out, last_recurrent_state = kernel(
            query, key, value, g=g, beta=beta, initial_state=recurrent_state,
            output_final_state=cache_params is not None, use_qk_l2norm_in_kernel=True, **kwargs,
        )  # fmt: skip
        if cache_params is not None:
            cache_params.update_recurrent_state(last_recurrent_state.to(torch.float32), self.layer_idx)
        gate = self.g_b_proj(self.g_a_proj(hidden_states)).view(batch_size, seq_len, -1, self.head_dim)
        output = self.o_norm(core_attn_out, gate).reshape(batch_size, seq_len, -1)
        return self.o_proj(output)


def resize_key_dim(mixer: nn.Module, head_k_dim: int) -> None:
    """Rebuild a freshly built KDA layer's q, k, conv and forget-gate rows at ``head_k_dim`` channels per head."""
    if head_k_dim == getattr(mixer, "head_k_dim", mixer.head_dim):
        mixer.head_k_dim, mixer.key_dim = head_k_dim, head_k_dim * mixer.num_heads
        return
    index = torch.arange(head_k_dim).repeat(mixer.num_heads, 1)
    keep_key_channels(mixer, index)


def keep_key_channels(mixer: nn.Module, index: torch.Tensor) -> None:
    """Keep the q/k channels ``index`` [H, d'] of every head of a KDA layer, with its conv and forget-gate rows."""
    d_k, heads = getattr(mixer, "head_k_dim", mixer.head_dim), mixer.num_heads
    key_dim = d_k * heads
    rows = per_head_channels(index, d_k)
    slice_linear_rows(mixer.q_proj, rows)
    slice_linear_rows(mixer.k_proj, rows)
    channels = torch.cat([rows, key_dim + rows, 2 * key_dim + torch.arange(mixer.qkv_dim)])
    slice_conv_channels(mixer.conv1d, channels)
    gate = mixer.forget_gate
    gate_rows = gate_channels(index, heads, d_k)
    slice_linear_rows(gate.f_b_proj, gate_rows)
    gate.dt_bias = slice_vector(gate.dt_bias, gate_rows)
    gate.head_dim = int(index.shape[1])  # the forget gate's output view [B, T, H, d_k]
    mixer.head_k_dim = int(index.shape[1])
    mixer.key_dim = mixer.head_k_dim * heads
    mixer.conv_dim = 2 * mixer.key_dim + mixer.qkv_dim


class StaterankKimiLinearForCausalLM(KimiLinearForCausalLM):
    """``KimiLinearForCausalLM`` with d_k (``linear_key_head_dim``) apart from d_v (``linear_head_dim``)."""

    config_class = StaterankKimiLinearConfig

    def __init__(self, config: StaterankKimiLinearConfig) -> None:
        super().__init__(config)
        for layer, block in enumerate(self.model.layers):
            if config.layer_types[layer] == "linear_attention":
                block.self_attn = StaterankKimiDeltaAttention(config, layer)
        self.post_init()

    # transformers decides whether a class may choose its attention and experts implementations by reading the
    # source of the class's module for its decorators; this module has none, so without these the first model built
    # in a process fell back to the eager experts loop (a host sync per expert; no CUDA graph can hold it) unless a
    # stock model had been built before and cached the stock answer on the parent class.
    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return KimiLinearForCausalLM._can_set_attn_implementation()

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return KimiLinearForCausalLM._can_set_experts_implementation()


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load ``staterank_kimi_linear`` models (idempotent)."""
    AutoConfig.register(StaterankKimiLinearConfig.model_type, StaterankKimiLinearConfig, exist_ok=True)
    AutoModelForCausalLM.register(StaterankKimiLinearConfig, StaterankKimiLinearForCausalLM, exist_ok=True)
    # A model loaded from a kimi_linear checkpoint saves its weights under the checkpoint's names (transformers
    # reverses its kimi_linear renaming on save); loading them back needs the same renaming.
    register_checkpoint_conversion_mapping(
        StaterankKimiLinearConfig.model_type, get_checkpoint_conversion_mapping("kimi_linear") or [], overwrite=True
    )


register_auto_classes()


@register
class KimiLinearAdapter(TransformersCacheMixin, ModelAdapter):
    family = "Kimi Linear (transformers)"
    model_types = ("kimi_linear", StaterankKimiLinearConfig.model_type)
    state_dtype = torch.float32  # the cache keeps last_recurrent_state.to(float32)
    lora_targets = ("q_proj", "k_proj", "v_proj")
    no_decay_suffixes = ("A_log", "dt_bias")

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def mixer(self, layer: int) -> nn.Module | None:
        attn = self.decoder_layers()[layer].self_attn
        return attn if isinstance(attn, modeling_kimi_linear.KimiLinearDeltaAttention) else None

    @staticmethod
    def _head_k_dim(mixer: nn.Module) -> int:
        return getattr(mixer, "head_k_dim", mixer.head_dim)

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_heads, self._head_k_dim(mixer), mixer.head_dim)

    def conv_state_channels(self, layer: int) -> int:
        return self.mixer(layer).conv1d.in_channels

    def conv_kernel_size(self, layer: int) -> int:
        return self.mixer(layer).conv_kernel_size

    def features(self, layer: int, hidden: torch.Tensor):
        from staterank.models import HeadFeatures

        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        mixed = torch.cat([mixer.q_proj(hidden), mixer.k_proj(hidden), mixer.v_proj(hidden)], dim=-1)
        mixed = ACT2FN[mixer.activation](causal_depthwise_conv(mixed, mixer.conv1d.weight, None, silu=False))
        key_dim = shape.num_k_heads * shape.head_k_dim
        q, k, v = mixed.split([key_dim, key_dim, shape.num_v_heads * shape.head_v_dim], dim=-1)
        beta = mixer.b_proj(hidden).float().sigmoid()
        log_decay = mixer.forget_gate(hidden)  # [B, T, H, d_k], float32
        return HeadFeatures.from_projections(layer, hidden, shape, q, k, v, beta, log_decay)

    def cached_state(self, cache, layer: int) -> torch.Tensor:
        return cache.layers[layer].recurrent_states[0]  # [B, H, d_k, d_v]

    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.layer_shape(layer)
        key_dim = shape.num_k_heads * shape.head_k_dim
        weight = self.mixer(layer).conv1d.weight.data  # [q | k | v channels, 1, W]
        return tuple(
            weight[start : start + key_dim].view(shape.num_k_heads, shape.head_k_dim, -1) for start in (0, key_dim)
        )

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        mixer = self.mixer(layer)
        return (mixer.q_proj.weight, mixer.k_proj.weight)

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.layer_shape(layer)
        return tuple(t.view(shape.num_k_heads, shape.head_k_dim, -1) for t in tensors)

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        keep_key_channels(self.mixer(layer), index)

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        d_k, d_v, heads = self._head_k_dim(mixer), mixer.head_dim, mixer.num_heads
        key_rows, value_rows = head_channels(kept_k, d_k), head_channels(kept_v, d_v)
        for linear, rows in ((mixer.q_proj, key_rows), (mixer.k_proj, key_rows), (mixer.v_proj, value_rows)):
            slice_linear_rows(linear, rows)
        key_dim = d_k * heads
        slice_conv_channels(mixer.conv1d, torch.cat([key_rows, key_dim + key_rows, 2 * key_dim + value_rows]))
        gate = mixer.forget_gate
        gate_rows = value_head_gate_channels(kept_v, d_k)
        slice_linear_rows(gate.f_b_proj, gate_rows)
        gate.dt_bias = slice_vector(gate.dt_bias, gate_rows)
        gate.A_log = nn.Parameter(gate.A_log.data.index_select(2, kept_v.to(gate.A_log.device)).clone())  # [1, 1, H, 1]
        slice_linear_rows(mixer.b_proj, kept_v)
        slice_linear_rows(mixer.g_b_proj, value_rows)
        slice_linear_columns(mixer.o_proj, value_rows)
        mixer.num_heads = gate.num_heads = len(kept_v)
        mixer.qkv_dim = gate.qkv_dim = d_v * len(kept_v)
        mixer.key_dim = d_k * len(kept_k)
        mixer.conv_dim = mixer.conv1d.in_channels

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        return {"linear_num_heads": num_v_heads}

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        if head_k_dim == getattr(self.config, "linear_key_head_dim", self.config.linear_head_dim):
            return
        if self.config.model_type != StaterankKimiLinearConfig.model_type:
            fields = {k: v for k, v in self.config.to_dict().items() if k not in ("model_type", "architectures")}
            config = StaterankKimiLinearConfig(**fields, linear_key_head_dim=head_k_dim)
            self.model.config = self.model.model.config = config
        self.config.linear_key_head_dim = head_k_dim
        for layer in self.linear_layers():
            mixer = self.mixer(layer)
            mixer.__class__ = StaterankKimiDeltaAttention  # the layer now holds q, k narrower than v

    @classmethod
    def load_import(cls, model_type: str) -> tuple[str, str]:
        if model_type == StaterankKimiLinearConfig.model_type:
            return (
                "import staterank  # registers staterank_kimi_linear (d_k apart from d_v) with transformers",
                "Its KDA layers keep fewer q/k channels than value channels (`linear_key_head_dim` in config.json), "
                "which stock `KimiLinearConfig` cannot state; `import staterank` teaches transformers to build it.",
            )
        return super().load_import(model_type)

    @classmethod
    def serving_notes(cls, model_type: str, shapes: list[LayerShape]) -> list[str]:
        if model_type == StaterankKimiLinearConfig.model_type:
            return [
                "vLLM and SGLang build Kimi Linear's KDA layers from one `linear_attn_config.head_dim`: this model's "
                "d_k differs from its d_v, so serve it with transformers after `import staterank`."
            ]
        return super().serving_notes(model_type, shapes)

