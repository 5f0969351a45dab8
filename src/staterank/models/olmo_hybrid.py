"""transformers OLMo Hybrid (``OlmoHybridForCausalLM``): Gated DeltaNet with separate projections and beta doubled.

The mixer (``block.linear_attn``; the full-attention blocks have ``self_attn``) holds ``q_proj``, ``k_proj``
[key_dim, hidden], ``v_proj`` and the output gate ``g_proj`` [value_dim, hidden], ``b_proj`` (beta) and ``a_proj``
(decay) [Hv, hidden], one depthwise ``conv1d`` over the concatenated [q | k | v] channels followed by
``ACT2FN[hidden_act]`` (SiLU), ``A_log`` and ``dt_bias`` [Hv], a gated RMSNorm ``o_norm`` over ``head_v_dim`` whose
weight every head shares, and ``o_proj`` [hidden, value_dim]. The checkpoints keep one convolution per projection
(``q_conv1d``, ``k_conv1d``, ``v_conv1d``); transformers concatenates them into ``conv1d`` when it loads them.

With ``linear_allow_neg_eigval`` (the default) the mixer doubles beta = sigmoid(b), so beta is in (0, 2) and the
eigenvalues of (I - beta k k^T) in (-1, 1); the tap reports the doubled beta, the one the delta rule reads.

The layout is Qwen3.5's with the projections unfused, so this adapter reuses the Qwen plumbing
(:class:`~staterank.models.qwen_common.Selection`, the config keys ``linear_key_head_dim``,
``linear_num_key_heads``, ``linear_num_value_heads``, the cache layout) and says what differs.
Defaults (OLMo-Hybrid-7B): hidden 3840, 32 layers (every fourth full attention), 30 key and 30 value heads,
d_k 96, d_v 192, convolution width 4.
"""

from __future__ import annotations

import torch
from torch import nn

from staterank.models import register
from staterank.models.base import (
    HeadFeatures,
    LayerShape,
    slice_linear_rows,
)
from staterank.models.qwen_common import QwenGatedDeltaNetAdapter, Selection


@register
class OlmoHybridAdapter(QwenGatedDeltaNetAdapter):
    family = "OLMo Hybrid (transformers)"
    model_types = ("olmo_hybrid",)
    out_proj_name = "o_proj"
    # the linear-attention projections only: the attention blocks' self_attn has q_proj, k_proj, v_proj too
    lora_targets = ("linear_attn.q_proj", "linear_attn.k_proj", "linear_attn.v_proj")

    def _project(self, mixer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = torch.cat([mixer.q_proj(hidden), mixer.k_proj(hidden), mixer.v_proj(hidden)], dim=-1)
        return qkv, mixer.b_proj(hidden), mixer.a_proj(hidden)

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        features = super().features(layer, hidden)
        if self.mixer(layer).allow_neg_eigval:
            features.beta = features.beta * 2  # as the mixer does: beta in (0, 2)
        return features

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.layer_shape(layer)
        q, k = tensors  # q_proj, k_proj: [Hk * d_k, hidden]
        return q.view(shape.num_k_heads, shape.head_k_dim, -1), k.view(shape.num_k_heads, shape.head_k_dim, -1)

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        mixer = self.mixer(layer)
        return (mixer.q_proj.weight, mixer.k_proj.weight)

    def _slice_projections(self, mixer: nn.Module, selection: Selection) -> None:
        slice_linear_rows(mixer.q_proj, selection.qk_rows)
        slice_linear_rows(mixer.k_proj, selection.qk_rows)
        if not selection.keeps_value_heads:
            for projection in (mixer.v_proj, mixer.g_proj):
                slice_linear_rows(projection, selection.value_rows)
            for projection in (mixer.b_proj, mixer.a_proj):
                slice_linear_rows(projection, selection.value_head_index)

    @classmethod
    def serving_notes(cls, model_type: str, shapes: list[LayerShape]) -> list[str]:
        # Qwen's notes are about vLLM's Qwen3-Next / Qwen3.5 layer; OLMo Hybrid has its own, so only the base's
        notes = super(QwenGatedDeltaNetAdapter, cls).serving_notes(model_type, shapes)
        uneven = [s.layer for s in shapes if s.num_k_heads * s.head_k_dim != s.num_v_heads * s.head_v_dim]
        if uneven:
            notes.append(
                "transformers' `save_pretrained` writes the fused convolution back as `q_conv1d`, `k_conv1d` and "
                "`v_conv1d` in three equal thirds (it reverses the concatenation it loads with by `torch.chunk`), "
                "which are the q, k and v channels only where key_dim equals value_dim; transformers reloads them "
                "correctly (it concatenates them again), but a loader that reads each as its own projection's "
                "convolution (vLLM maps them to the q, k, v parts of its `conv1d`) needs them re-split at "
                "key_dim, key_dim, value_dim."
            )
        return notes
