"""What the two Kimi Delta Attention (KDA) families (fla ``kda``, transformers ``kimi_linear``) share.

KDA is the gated delta rule with a decay per key channel: per value head h,
``S_t = diag(exp(g_t)) S_{t-1}`` and then the delta update, with ``g_t`` [d_k] from a low-rank forget-gate
projection: ``g = -exp(A_log[h]) * softplus(f_b(f_a(x)) + dt_bias)``; ``f_b`` has one output row and ``dt_bias``
one entry per (value head, key channel), head-major. The tap's ``log_decay`` is therefore ``[B, T, Hv, d_k]``, and
keeping a channel subset of a key head keeps the same channels of the gate rows and ``dt_bias`` of each of its
value heads; removing a value head removes its block of ``d_k`` gate rows and ``dt_bias`` entries and its ``A_log``.
"""

from __future__ import annotations

import torch


def gate_channels(index: torch.Tensor, num_v_heads: int, head_k_dim: int) -> torch.Tensor:
    """Flat per-(value head, key channel) rows of a channel selection per key head.

    ``index`` [Hk, d'] of channels in [0, head_k_dim) -> [Hv * d'], value head h taking key head h // (Hv / Hk)'s.
    """
    per_value_head = index.repeat_interleave(num_v_heads // index.shape[0], dim=0)  # [Hv, d']
    heads = torch.arange(num_v_heads)[:, None]
    return (heads * head_k_dim + per_value_head).reshape(-1)


def value_head_gate_channels(kept_v: torch.Tensor, head_k_dim: int) -> torch.Tensor:
    """Flat gate rows of whole value heads: kept_v [n] -> [n * head_k_dim]."""
    return (kept_v[:, None] * head_k_dim + torch.arange(head_k_dim)[None, :]).reshape(-1)
