"""What the transformers Qwen3-Next and Qwen3.5 Gated DeltaNet layers share.

Both mixers (``block.linear_attn``; full-attention blocks have ``self_attn`` instead) hold:

- one depthwise ``conv1d`` over the concatenated channels [q all key heads | k all key heads | v all value
  heads] (``conv_dim = 2 * key_dim + value_dim``), followed by ``ACT2FN[hidden_act]`` (SiLU);
- ``A_log`` and ``dt_bias`` [Hv]: g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b);
- a gated RMSNorm ``norm`` over ``head_v_dim`` whose weight all heads share, and ``out_proj`` [hidden, value_dim].

They differ in the input projections, which the family subclasses slice. Value heads are grouped: value head h
reads key head h // (Hv / Hk) (transformers' references ``repeat_interleave`` q and k; fla's kernels agree).
The config keys are ``linear_key_head_dim``, ``linear_num_key_heads`` and ``linear_num_value_heads`` of the
text config (the model config itself for ``*ForCausalLM``, ``config.text_config`` for the multimodal classes).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from staterank.models.base import (
    HeadFeatures,
    LayerShape,
    ModelAdapter,
    head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_vector,
)
from staterank.models.fla_common import causal_depthwise_conv
from staterank.models.hf_cache import TransformersCacheMixin

#: The only head dim of the FlashInfer GDN prefill kernel that vLLM picks on Hopper GPUs.
FLASHINFER_GDN_HEAD_DIM = 128


@dataclass(frozen=True)
class Selection:
    """What one layer keeps, described per kept key head g: its q/k channels and its value heads.

    Channel and value-head indices are local to the key head, which is how the fused, per-key-group
    projection of Qwen3-Next is laid out; the flat indices of the concatenated layouts derive from them.
    """

    shape: LayerShape  # the layer before slicing
    key_heads: torch.Tensor  # [G]        kept key heads, sorted
    key_channels: torch.Tensor  # [G, d_k']  kept q/k channels of each, in [0, head_k_dim)
    value_heads: torch.Tensor  # [G, r']    kept value heads of each, local index in [0, group_size)

    @classmethod
    def channels(cls, shape: LayerShape, index: torch.Tensor) -> Selection:
        """Every head, the q/k channels ``index`` [Hk, d_k'] of each."""
        key_heads = torch.arange(shape.num_k_heads)
        return cls(shape, key_heads, index, torch.arange(shape.group_size).expand(shape.num_k_heads, -1))

    @classmethod
    def heads(cls, shape: LayerShape, kept_k: torch.Tensor, kept_v: torch.Tensor) -> Selection:
        """Whole key heads ``kept_k`` [G] and value heads ``kept_v`` [G * r'], sorted, r' per key head."""
        channels = torch.arange(shape.head_k_dim).expand(len(kept_k), -1)
        # sorted and grouped evenly (checked by remove_heads), so row g holds the value heads of kept_k[g]
        value_heads = kept_v.view(len(kept_k), -1) - kept_k[:, None] * shape.group_size
        return cls(shape, kept_k, channels, value_heads)

    @property
    def keeps_value_heads(self) -> bool:
        return self.value_heads.numel() == self.shape.num_v_heads

    @property
    def qk_rows(self) -> torch.Tensor:
        """Kept channels within the q (and the k) block of all key heads: [G * d_k']."""
        return (self.key_heads[:, None] * self.shape.head_k_dim + self.key_channels).reshape(-1)

    @property
    def value_head_index(self) -> torch.Tensor:
        """Kept value heads among all value heads: [G * r']."""
        return (self.key_heads[:, None] * self.shape.group_size + self.value_heads).reshape(-1)

    @property
    def value_rows(self) -> torch.Tensor:
        """Kept channels within the v block of all value heads: [G * r' * d_v]."""
        return head_channels(self.value_head_index, self.shape.head_v_dim)

    @property
    def conv_channels(self) -> torch.Tensor:
        """Kept channels of the convolution over [q | k | v]: [2 * G * d_k' + G * r' * d_v]."""
        key_dim = self.shape.num_k_heads * self.shape.head_k_dim
        return torch.cat([self.qk_rows, key_dim + self.qk_rows, 2 * key_dim + self.value_rows])


class QwenGatedDeltaNetAdapter(TransformersCacheMixin, ModelAdapter):
    """Shared plumbing of the Qwen3-Next and Qwen3.5 adapters."""

    no_decay_suffixes = ("A_log", "dt_bias")  # the per-head decay

    # transformers' torch references and fla's kernels both return the final state in fp32, and the
    # LinearAttentionLayer cache allocates zeros_like(state); the conv cache keeps the model dtype.
    state_dtype = torch.float32

    #: the mixer's output projection (OLMo Hybrid's, built on this layout, is ``o_proj``)
    out_proj_name = "out_proj"

    @property
    def text_config(self):
        """The config holding the linear-attention sizes (nested in multimodal configs)."""
        return self.config.get_text_config(decoder=True)

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.get_decoder().layers

    def mixer(self, layer: int) -> nn.Module | None:
        return getattr(self.decoder_layers()[layer], "linear_attn", None)

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_k_heads, mixer.num_v_heads, mixer.head_k_dim, mixer.head_v_dim)

    def conv_state_channels(self, layer: int) -> int:
        return self.mixer(layer).conv_dim

    def conv_kernel_size(self, layer: int) -> int:
        return self.mixer(layer).conv_kernel_size

    def cached_state(self, cache, layer: int) -> torch.Tensor:
        return cache.layers[layer].recurrent_states[0]  # [B, Hv, d_k, d_v], as the torch reference keeps it

    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        weight = mixer.conv1d.weight.data  # [q | k | v channels, 1, W]
        return tuple(
            weight[start : start + mixer.key_dim].view(shape.num_k_heads, shape.head_k_dim, -1)
            for start in (0, mixer.key_dim)
        )

    # --- features -------------------------------------------------------------------------

    @abstractmethod
    def _project(self, mixer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The convolution input [B, T, conv_dim] in [q | k | v] order, and b, a [B, T, Hv]."""

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        qkv, b, a = self._project(mixer, hidden)
        qkv = causal_depthwise_conv(qkv, mixer.conv1d.weight, mixer.conv1d.bias, silu=False)
        q, k, v = ACT2FN[mixer.activation](qkv).split([mixer.key_dim, mixer.key_dim, mixer.value_dim], dim=-1)
        # as the mixer computes them: sigmoid in the model dtype, the decay in fp32
        beta = b.sigmoid().float()
        log_decay = -mixer.A_log.float().exp() * F.softplus(a.float() + mixer.dt_bias)
        return HeadFeatures.from_projections(layer, hidden, shape, q, k, v, beta, log_decay)

    # --- surgery --------------------------------------------------------------------------

    @abstractmethod
    def _slice_projections(self, mixer: nn.Module, selection: Selection) -> None:
        """Slice the family's input projections (q, k, v, z rows and b, a rows) to ``selection``."""

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        self._slice(layer, Selection.channels(self.layer_shape(layer), index))

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        self._slice(layer, Selection.heads(self.layer_shape(layer), kept_k, kept_v))

    def _slice(self, layer: int, selection: Selection) -> None:
        mixer = self.mixer(layer)
        self._slice_projections(mixer, selection)
        slice_conv_channels(mixer.conv1d, selection.conv_channels)
        if not selection.keeps_value_heads:
            slice_linear_columns(getattr(mixer, self.out_proj_name), selection.value_rows)
            mixer.A_log = slice_vector(mixer.A_log, selection.value_head_index)
            mixer.dt_bias = slice_vector(mixer.dt_bias, selection.value_head_index)
        # the sizes the mixer's forward reads
        mixer.num_k_heads, mixer.head_k_dim = selection.key_channels.shape
        mixer.num_v_heads = selection.value_heads.numel()
        mixer.key_dim = mixer.num_k_heads * mixer.head_k_dim
        mixer.value_dim = mixer.num_v_heads * mixer.head_v_dim
        mixer.conv_dim = 2 * mixer.key_dim + mixer.value_dim

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        self.text_config.linear_key_head_dim = head_k_dim

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        return {"linear_num_key_heads": num_k_heads, "linear_num_value_heads": num_v_heads}

    # --- serving ------------------------------------------------------------------------------

    @classmethod
    def serving_notes(cls, model_type: str, shapes: list[LayerShape]) -> list[str]:
        # vLLM serves both families through its Qwen3-Next / Qwen3.5 Gated DeltaNet layer; SGLang likewise
        head_k_dims = sorted({shape.head_k_dim for shape in shapes})
        dims = ", ".join(map(str, head_k_dims))
        if head_k_dims != [FLASHINFER_GDN_HEAD_DIM]:
            prefill = (
                f"vLLM reads `linear_key_head_dim` ({dims}) from the config, but on Hopper GPUs it picks a FlashInfer "
                f"GDN prefill kernel that supports head dim {FLASHINFER_GDN_HEAD_DIM} only: this model needs vLLM's "
                "Triton GDN prefill backend there, `vllm serve PATH --gdn-prefill-backend triton` (engine argument "
                '`gdn_prefill_backend="triton"`).'
            )
        else:
            prefill = (
                f"vLLM reads `linear_key_head_dim` ({dims}) from the config; {FLASHINFER_GDN_HEAD_DIM} is the head dim "
                "of the FlashInfer GDN prefill kernel it picks on Hopper GPUs, so its default backend serves it."
            )
        if len(head_k_dims) == 1:
            uniform = f"this model has d_k {dims} in every linear-attention layer"
        else:
            uniform = f"this model's layers have d_k {dims}, so neither serves it"
        return [
            *super().serving_notes(model_type, shapes),
            prefill,
            f"vLLM and SGLang need one uniform `linear_key_head_dim` across layers: {uniform}.",
        ]
