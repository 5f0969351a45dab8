"""Gated and plain linear attention on CPU: fla's GLA and linear-attention entry points over the shared recurrence.

Per head, with ``a_t = exp(g_t)`` a vector over the K key channels::

    S_t = diag(a_t) S_{t-1} + k_t v_t^T                         S_t: [K, V] ("key-first" layout)
    o_t = S_t^T (scale * q_t)

as ``fla.ops.gla.naive.naive_recurrent_gla`` computes it: the per-channel chunked rule of
:mod:`staterank.backends.delta_rule` without its delta correction (``delta_rule=False``, write strength 1).
Plain linear attention (``fla.ops.linear_attn``) is the same without a decay.
"""

from __future__ import annotations

import torch

from staterank.backends.delta_rule import _delta_rule


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.gla.chunk_gla``: q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, state ``[N, H, K, V]``
    (``[N, H, V, K]`` with ``state_v_first``); ``g=None`` is plain linear attention, with no decay."""
    if q.shape[2] != v.shape[2]:
        raise ValueError(f"GLA needs as many value heads as query heads, got {q.shape[2]} and {v.shape[2]}")
    ones = torch.ones_like(v[..., 0], dtype=torch.promote_types(v.dtype, torch.float32))
    return _delta_rule(
        q, k, v, ones, g, initial_state, output_final_state, scale, False, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, chunk_size=32, out_dtype=v.dtype, delta_rule=False,
    )  # fmt: skip


def fused_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    reverse: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.gla.fused_recurrent_gla`` (the keywords of :func:`chunk_gla`; ``gk`` is its ``g``)."""
    if gv is not None or reverse:
        raise NotImplementedError("the CPU GLA backend takes a key-channel decay (gk) only, forward in time")
    return chunk_gla(q, k, v, gk, **kwargs)


def chunk_linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    normalize: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.linear_attn.chunk_linear_attn`` (and its fused forms): ``S_t = S_{t-1} + k_t
    v_t^T``, state ``[N, H, K, V]``; the z-normalised form (``normalize=True``) is refused."""
    if normalize:
        raise NotImplementedError("the CPU linear-attention backend does not normalise by z (do_feature_map_norm)")
    return chunk_gla(q, k, v, None, scale, initial_state, output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                                **kwargs):  # fmt: skip
    """CPU version of ``fla.ops.linear_attn.fused_recurrent_linear_attn`` (forward in time only)."""
    if reverse:
        raise NotImplementedError("the CPU linear-attention backend runs forward in time only")
    return chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, **kwargs)


def retention_log_decay(num_heads: int, device=None) -> torch.Tensor:
    """RetNet's fixed decay per head, ``log(1 - 2^(-5 - h))`` for head ``h`` (fla's ``g_gamma``)."""
    return (1 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float, device=device))).log()


def chunk_retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    state_v_first: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.retention.chunk_retention`` (and its fused forms): ``S_t = gamma_h S_{t-1} + k_t
    v_t^T`` with the fixed decay of :func:`retention_log_decay`, state ``[N, H, K, V]``."""
    if kwargs.get("reverse"):
        raise NotImplementedError("the CPU retention backend runs forward in time only")
    g = retention_log_decay(q.shape[2], q.device).expand(*q.shape[:3])
    ones = torch.ones_like(v[..., 0], dtype=torch.promote_types(v.dtype, torch.float32))
    return _delta_rule(
        q, k, v, ones, g, initial_state, output_final_state, scale, False, state_v_first=state_v_first,
        cu_seqlens=cu_seqlens, chunk_size=64, out_dtype=v.dtype, delta_rule=False,
    )  # fmt: skip


def parallel_retention(q, k, v, scale=None, output_attentions=False, cu_seqlens=None):
    """CPU version of ``fla.ops.retention.parallel_retention``: the outputs, and no attention matrix."""
    if output_attentions:
        raise NotImplementedError("the CPU retention backend does not return the attention matrix")
    o, _ = chunk_retention(q, k, v, scale, cu_seqlens=cu_seqlens)
    return o, None
