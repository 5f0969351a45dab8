"""fla ``retnet`` (``RetNetForCausalLM``, layer ``fla.layers.MultiScaleRetention``): retention, a fixed decay per head.

Per head ``h`` of ``H``: ``S_t = gamma_h S_{t-1} + k_t v_t^T`` and ``o_t = S_t^T q_t / sqrt(d_k)``, with
``gamma_h = 1 - 2^(-5 - h)`` fixed by the head's index, no delta correction and no L2 norm; q and k are rotated by
a rotary embedding (``fla.modules.rotary.RotaryEmbedding`` over the head's d_k channels) after the projections,
the optional short convolutions (SiLU) and the optional ``feature_map``. The state holds the rotated keys, and
the tap gives them. The layer has ``q_proj``, ``k_proj``, ``v_proj``, an output gate ``g_proj``, a per-head
output norm and ``o_proj``; config ``hidden_size``, ``num_heads``, ``expand_k``, ``expand_v``.

What works and what is refused:

- ``info``, ``analyze``, the channel and head criteria's scores, ``finetune``, ``evaluate`` and ``bench`` (eager
  decoding) work.
- q/k channel pruning is refused: the rotary embedding pairs channel ``i`` with ``i + d_k/2`` and gives the pair a
  frequency set by ``d_k``, so a model keeping a subset of the channels would rotate them differently, and no
  stock config can say otherwise.
- Head pruning is refused: each head's decay follows from its index among the layer's heads, so the heads kept
  after a removal would take other decays in a stock model.
- Graphed decoding is refused: the layer reads its rotary position from the cache on the host, so a captured
  graph would replay one position.
- Query heads sharing key/value heads (``num_kv_heads`` below ``num_heads``) are refused: their states coincide.
"""

from __future__ import annotations

import torch

from staterank.backends.gla import retention_log_decay
from staterank.models import register
from staterank.models.base import HeadFeatures, StaticCacheError
from staterank.models.fla_common import ExpandKSizes, FlaAdapter, UngroupedHeads


@register
class RetNetAdapter(UngroupedHeads, ExpandKSizes, FlaAdapter):
    family = "RetNet (flash-linear-attention)"
    model_types = ("retnet",)
    layer_class_name = "MultiScaleRetention"
    lora_targets = ("q_proj", "k_proj", "v_proj")
    no_decay_suffixes = ()
    channel_pruning_refusal = (
        "the rotary embedding pairs channel i with i + d_k/2 at a frequency set by d_k, so a model with fewer "
        "channels would rotate them differently"
    )
    head_pruning_refusal = (
        "each head's decay 1 - 2^(-5 - h) follows from its index h, so the heads kept would take other decays"
    )

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        q, k, v = (self._plain_conv(mixer, name, getattr(mixer, f"{name}_proj")(hidden)) for name in ("q", "k", "v"))
        heads = (shape.num_k_heads, shape.head_k_dim)
        q, k = q.unflatten(-1, heads), k.unflatten(-1, heads)
        if mixer.feature_map_fn is not None:
            q, k = mixer.feature_map_fn(q), mixer.feature_map_fn(k)
        q, k = mixer.rotary(q, k, seqlen_offset=0, max_seqlen=q.shape[1])  # the positions of a fresh sequence
        batch, seq = hidden.shape[:2]
        beta = hidden.new_ones(batch, seq, shape.num_v_heads, dtype=torch.float32)  # unused: no delta rule
        log_decay = retention_log_decay(shape.num_v_heads, hidden.device).expand(batch, seq, -1)
        return HeadFeatures.from_projections(
            layer, hidden, shape, q.flatten(-2), k.flatten(-2), v, beta, log_decay, delta_rule=False, qk_l2norm=False
        )

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        self.check_head_pruning()  # always refuses: see head_pruning_refusal

    def static_cache_tensors(self, cache) -> list[torch.Tensor]:
        raise StaticCacheError(
            f"{self.family}: the layer reads its rotary position from the cache on the host, so a captured graph "
            "would replay one position; decoding is timed eagerly"
        )
