"""Independent reference computations the tests compare against (plain loops, float64)."""

from __future__ import annotations

import torch

from staterank.models import HeadFeatures


def delta_rule_loop(features: HeadFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule token by token in float64, straight from its definition.

    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k),
    with q, k L2-normalised and value head h reading key head h // (Hv / Hk).
    Returns (o [B, T, Hv, d_v], final state [B, Hv, d_k, d_v]).
    """
    q, k, v = (x.double() for x in (features.q, features.k, features.v))
    beta = features.beta.double()
    batch, seq, num_k, d_k = q.shape
    num_v, d_v = v.shape[2], v.shape[3]
    group = num_v // num_k
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    scale = d_k**-0.5
    state = torch.zeros(batch, num_v, d_k, d_v, dtype=torch.float64)
    out = torch.zeros(batch, seq, num_v, d_v, dtype=torch.float64)
    eye = torch.eye(d_k, dtype=torch.float64)
    for t in range(seq):
        for h in range(num_v):
            kt, qt, vt = k[:, t, h // group], q[:, t, h // group], v[:, t, h]  # [B, d_k], [B, d_k], [B, d_v]
            bt = beta[:, t, h][:, None, None]
            decay = 1.0 if features.log_decay is None else features.log_decay[:, t, h].double().exp()[:, None, None]
            transition = eye - bt * kt[:, :, None] * kt[:, None, :]
            state[:, h] = decay * transition @ state[:, h] + bt * kt[:, :, None] * vt[:, None, :]
            out[:, t, h] = torch.einsum("bkv,bk->bv", state[:, h], qt * scale)
    return out, state
