"""What the two flash-linear-attention families (``delta_net``, ``gated_deltanet``) share.

Both keep separate ``q_proj``, ``k_proj``, ``v_proj`` projections, one ``ShortConvolution`` each
(depthwise, SiLU), a per-value-head ``b_proj`` for beta, an optional output gate ``g_proj``, a
per-head output norm whose weight is shared by all heads, and ``o_proj``. The decoder blocks
live at ``model.model.layers`` and the mixer at ``block.attn``; hybrid configs may put full
attention in some blocks, which are not linear-attention layers.

fla's cache (``FLACache``) keeps one ``FLALayer`` per block, whose ``state`` dict holds
``recurrent_state``, ``conv_state`` (a tuple of the q, k, v windows), ``ffn_state`` and, in
attention blocks, ``attn_state``: the key/value cache, which grows with every token.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from staterank.errors import UnsupportedModelError
from staterank.models.base import (
    HeadFeatures,
    LayerShape,
    ModelAdapter,
    StaticCacheError,
    head_channels,
    per_head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_linear_rows,
)

#: fla's chunk kernels assert K (d_k per head) <= this, and process K in 64-wide blocks.
FLA_MAX_HEAD_K_DIM = 256


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """Causal depthwise convolution as ``ShortConvolution`` computes it: x [B, T, D], weight [D, 1, W]."""
    width = weight.shape[-1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (width - 1, 0)), weight.to(x.dtype), bias, groups=weight.shape[0])
    y = y.transpose(1, 2)
    return F.silu(y) if silu else y


def float_ratio(numerator: int, denominator: int) -> float:
    """numerator/denominator as a float that fla's ``int(denominator * ratio)`` maps back to numerator.

    fla rebuilds sizes as ``int(head_dim * expand_v)``; the plain quotient can land one ulp
    below the integer (49 * (32 / 49) = 31.999...), so step up to the next float if needed.
    """
    ratio = numerator / denominator
    while int(denominator * ratio) != numerator:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


class FlaAdapter(ModelAdapter):
    """Shared plumbing of the fla DeltaNet and Gated DeltaNet adapters."""

    requires_fla = True
    lora_targets = ("q_proj", "k_proj", "v_proj")
    no_decay_suffixes = ("A_log", "dt_bias")  # Gated DeltaNet's per-head decay
    state_dtype = torch.float32  # fla's kernels return and cache the state in fp32
    state_v_first = False  # whether the layer asks the kernels for [.., d_v, d_k] states
    layer_class_name: str

    def __init__(self, model) -> None:
        super().__init__(model)
        if getattr(self.config, "qk_norm", "l2") != "l2":
            raise UnsupportedModelError(
                f"{self.family} with qk_norm={self.config.qk_norm!r} is not supported (only L2-normalised q, k)"
            )

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def mixer(self, layer: int) -> nn.Module | None:
        attn = self.decoder_layers()[layer].attn
        return attn if type(attn).__name__ == self.layer_class_name else None

    def conv_state_channels(self, layer: int) -> int:
        mixer = self.mixer(layer)
        return 2 * mixer.key_dim + mixer.value_dim if mixer.use_short_conv else 0

    def conv_kernel_size(self, layer: int) -> int:
        return self.mixer(layer).conv_size

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        batch, seq = hidden.shape[:2]
        q, k = self._qk_activation(
            mixer, self._conv(mixer, "q", mixer.q_proj(hidden)), self._conv(mixer, "k", mixer.k_proj(hidden))
        )
        v = self._conv(mixer, "v", mixer.v_proj(hidden))
        beta = mixer.b_proj(hidden).float().sigmoid() if getattr(mixer, "use_beta", True) else None
        if beta is None:
            beta = hidden.new_ones(batch, seq, shape.num_v_heads, dtype=torch.float32)
        if mixer.allow_neg_eigval:
            beta = beta * 2  # eigenvalues of (I - beta k k^T) in [-1, 1]
        return HeadFeatures.from_projections(layer, hidden, shape, q, k, v, beta, self._log_decay(mixer, hidden))

    def _qk_activation(self, mixer: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Any activation the family applies to q, k after the convolution (none by default)."""
        return q, k

    def _log_decay(self, mixer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """The per-value-head log decay g [B, T, Hv], or None for no decay."""
        return None

    def _conv(self, mixer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """The projection ``x`` after its short convolution and SiLU (or SiLU alone without convolutions)."""
        conv = getattr(mixer, f"{name}_conv1d", None)
        if conv is None:  # fla then applies SiLU to v, and to q, k unless DeltaNet's qk_activation says otherwise
            return F.silu(x) if name == "v" or getattr(mixer, "qk_activation", "silu") == "silu" else x
        return causal_depthwise_conv(x, conv.weight, conv.bias, silu=conv.activation is not None)

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.layer_shape(layer)
        q, k = tensors  # q_proj, k_proj: [Hk * d_k, hidden]
        return q.view(shape.num_k_heads, shape.head_k_dim, -1), k.view(shape.num_k_heads, shape.head_k_dim, -1)

    def cached_state(self, cache, layer: int) -> torch.Tensor:
        state = cache[layer]["recurrent_state"]  # [B, H, d_k, d_v]; Gated DeltaNet keeps [B, Hv, d_v, d_k]
        return state.transpose(-1, -2) if self.state_v_first else state

    def static_cache_tensors(self, cache) -> list[torch.Tensor]:
        layers = self._fixed_size_layers(cache)
        return [leaf for layer in layers for leaf in tree_flatten(layer.state)[0] if isinstance(leaf, torch.Tensor)]

    def set_static_cache_tensors(self, cache, tensors: list[torch.Tensor]) -> None:
        layers = self._fixed_size_layers(cache)
        flat = [tree_flatten(layer.state) for layer in layers]  # [(leaves, spec)] per layer
        held = sum(isinstance(x, torch.Tensor) for leaves, _ in flat for x in leaves)
        if held != len(tensors):
            raise ValueError(f"the cache holds {held} state tensors, got {len(tensors)}")
        static = iter(tensors)
        for layer, (leaves, spec) in zip(layers, flat, strict=True):
            layer.state = tree_unflatten([next(static) if isinstance(x, torch.Tensor) else x for x in leaves], spec)

    @staticmethod
    def _fixed_size_layers(cache) -> list:
        """The cache's ``FLALayer``s, if none of them keeps a key/value cache that grows."""
        layers = getattr(cache, "layers", None)
        if layers is None or not all(isinstance(getattr(layer, "state", None), dict) for layer in layers):
            raise StaticCacheError(f"{type(cache).__name__} is not a recurrent cache of fixed size")
        if any(layer.state.get("attn_state") is not None for layer in layers):
            raise StaticCacheError("the model has attention layers, whose key/value cache grows with every token")
        return layers

    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        if not mixer.use_short_conv:
            return None
        # ShortConvolution weights are [channels, 1, W]
        return tuple(
            getattr(mixer, f"{name}_conv1d").weight.data.view(shape.num_k_heads, shape.head_k_dim, -1)
            for name in ("q", "k")
        )

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        mixer = self.mixer(layer)
        return (mixer.q_proj.weight, mixer.k_proj.weight)

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        rows = per_head_channels(index, mixer.head_k_dim)
        for name in ("q", "k"):
            slice_linear_rows(getattr(mixer, f"{name}_proj"), rows)
            if mixer.use_short_conv:
                slice_conv_channels(getattr(mixer, f"{name}_conv1d"), rows)
        mixer.head_k_dim = int(index.shape[1])
        mixer.key_dim = mixer.head_k_dim * index.shape[0]

    def _keep_value_heads(self, mixer: nn.Module, kept_v: torch.Tensor) -> None:
        """Slice everything indexed by value head: v rows and conv, beta, output gate, o_proj columns."""
        value_rows = head_channels(kept_v, mixer.head_v_dim)
        slice_linear_rows(mixer.v_proj, value_rows)
        if mixer.use_short_conv:
            slice_conv_channels(mixer.v_conv1d, value_rows)
        if getattr(mixer, "b_proj", None) is not None:
            slice_linear_rows(mixer.b_proj, kept_v)
        if mixer.use_gate:
            slice_linear_rows(mixer.g_proj, value_rows)
        slice_linear_columns(mixer.o_proj, value_rows)
        mixer.value_dim = mixer.head_v_dim * len(kept_v)

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        # Gated DeltaNet, KDA, Gated DeltaProduct: head_dim is d_k and d_v is int(head_dim * expand_v), so keep d_v
        # by adjusting expand_v (DeltaNet derives its head dims from expand_k instead).
        head_v_dim = self.layer_shape(self.linear_layers()[0]).head_v_dim
        self.config.head_dim = head_k_dim
        self.config.expand_v = float_ratio(head_v_dim, head_k_dim)
        for layer in self.linear_layers():
            mixer = self.mixer(layer)
            mixer.head_dim, mixer.expand_v = head_k_dim, self.config.expand_v

    @classmethod
    def load_import(cls, model_type: str) -> tuple[str, str]:
        if model_type == cls.per_layer_model_type:
            return super().load_import(model_type)
        return (
            "import fla  # registers flash-linear-attention's model classes with transformers",
            "fla's kernels are Triton kernels for GPUs; on a CPU, `staterank.load_model(path)` loads the model "
            "with staterank's PyTorch backend for them.",
        )

    @classmethod
    def serving_notes(cls, model_type: str, shapes: list[LayerShape]) -> list[str]:
        head_k_dims = sorted({shape.head_k_dim for shape in shapes})
        fits = (
            "within that limit"
            if head_k_dims[-1] <= FLA_MAX_HEAD_K_DIM
            else "beyond that limit: the chunk kernels refuse it"
        )
        kernels = (
            f"fla's chunk kernels assert K <= {FLA_MAX_HEAD_K_DIM} and process K in 64-wide blocks; this model's K "
            f"(d_k per head) is {', '.join(map(str, head_k_dims))}, {fits}."
        )
        return [kernels, *super().serving_notes(model_type, shapes)]

    def _keep_key_heads(self, mixer: nn.Module, kept_k: torch.Tensor) -> None:
        key_rows = head_channels(kept_k, mixer.head_k_dim)
        for name in ("q", "k"):
            slice_linear_rows(getattr(mixer, f"{name}_proj"), key_rows)
            if mixer.use_short_conv:
                slice_conv_channels(getattr(mixer, f"{name}_conv1d"), key_rows)
        mixer.key_dim = mixer.head_k_dim * len(kept_k)


class ExpandKSizes:
    """Head sizes from ``expand_k`` / ``expand_v`` (DeltaNet, GLA): d = hidden_size * expand / num_heads."""

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        # key_dim = hidden_size * expand_k at the config's head count (the largest, for per-layer configs)
        self.config.expand_k = self.config.num_heads * head_k_dim / self.config.hidden_size
        for layer in self.linear_layers():
            self.mixer(layer).expand_k = self.config.expand_k

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        # the head dims are expand * hidden_size / num_heads: keep them by scaling expand_k, expand_v
        shape = self.layer_shape(self.linear_layers()[0])
        hidden = self.config.hidden_size
        return {
            "num_heads": num_k_heads,
            "expand_k": num_k_heads * shape.head_k_dim / hidden,
            "expand_v": num_v_heads * shape.head_v_dim / hidden,
        }

    def _set_head_counts(self, num_k_heads: int, num_v_heads: int) -> None:
        super()._set_head_counts(num_k_heads, num_v_heads)
        for layer in self.linear_layers():
            mixer = self.mixer(layer)
            mixer.expand_k, mixer.expand_v = self.config.expand_k, self.config.expand_v


class UngroupedHeads:
    """fla layers whose every query head has its own key/value head (GLA, RetNet): ``H x H`` heads per layer.

    Query heads that share key/value heads (``num_kv_heads`` below ``num_heads``) are refused, as their states
    coincide. Without short convolutions these layers apply no activation to q, k and v (unlike DeltaNet's SiLU).
    """

    def __init__(self, model) -> None:
        super().__init__(model)
        grouped = [i for i in self.linear_layers() if self.mixer(i).num_kv_groups > 1]
        if grouped:
            raise UnsupportedModelError(
                f"{self.family}: layers {grouped} share key/value heads between query heads (num_kv_heads < "
                "num_heads), whose states coincide; staterank supports one key/value head per query head"
            )

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_heads, mixer.head_k_dim, mixer.head_v_dim)

    @staticmethod
    def _plain_conv(mixer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        """The projection ``x`` after its short convolution (with the convolution's activation), or as it is."""
        conv = getattr(mixer, f"{name}_conv1d", None)
        return x if conv is None else causal_depthwise_conv(x, conv.weight, conv.bias, silu=conv.activation is not None)
