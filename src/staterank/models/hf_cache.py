"""Decoding caches of fixed size for transformers' hybrid models (Qwen3.5, Qwen3-Next, OLMo Hybrid, Kimi Linear).

transformers keeps a linear-attention layer's convolution window and recurrent state in tensors it updates in
place (``LinearAttentionLayer``: ``copy_`` into the tensors it allocated at the first update). What grows is the
attention layers' key/value cache: ``DynamicCache`` concatenates every new token. Its ``StaticCache`` instead
preallocates ``[B, heads, max_cache_len, head_dim]`` key/value buffers per attention layer and writes each token
at the position its layer's length counter (a tensor, advanced in place) points to. With it, every tensor a
decoding step reads or writes keeps its address, which is what a CUDA graph needs; attention then runs over all
``max_cache_len`` slots under a mask, as transformers' static cache always does.
"""

from __future__ import annotations

import torch
from transformers import StaticCache
from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin, StaticLayer

from staterank.models.base import StaticCacheError


class TransformersCacheMixin:
    """The static-cache methods of :class:`~staterank.models.base.ModelAdapter` for transformers' hybrid caches."""

    def decoding_cache(self, batch_size: int, max_cache_len: int) -> StaticCache:
        """transformers' ``StaticCache`` for ``max_cache_len`` tokens (prompt and generated) of the model's config.

        The buffers are allocated at the first forward pass, in the model's device and dtype, for its batch.
        """
        return StaticCache(config=self.model.config, max_cache_len=max_cache_len)

    def static_cache_tensors(self, cache) -> list[torch.Tensor]:
        tensors = []
        for index, layer in enumerate(getattr(cache, "layers", None) or []):
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                states = (*layer.conv_states.values(), *layer.recurrent_states.values())
                tensors += [state for state in states if state is not None]
            elif isinstance(layer, StaticLayer):
                if layer.is_initialized:
                    tensors += [layer.keys, layer.values, layer.cumulative_length]
            elif isinstance(layer, CacheLayerMixin):  # DynamicLayer, DynamicSlidingWindowLayer, ...
                raise StaticCacheError(
                    f"{self.family}: {type(cache).__name__} is not a recurrent cache of fixed size: layer {index} "
                    f"({type(layer).__name__}) keeps a key/value cache that grows with every token; decode through "
                    "the adapter's decoding_cache (transformers' StaticCache)"
                )
        if not tensors:
            raise StaticCacheError(f"{self.family}: {type(cache).__name__} holds no state yet (run the prompt first)")
        return tensors

    def set_static_cache_tensors(self, cache, tensors: list[torch.Tensor]) -> None:
        # transformers' linear-attention and static layers write into their own tensors: they are already in place
        held = self.static_cache_tensors(cache)
        if len(held) != len(tensors) or any(a is not b for a, b in zip(held, tensors, strict=True)):
            raise ValueError("transformers' static cache layers keep their own tensors; these are not them")
