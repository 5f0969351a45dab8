"""Pure-PyTorch gated DeltaProduct (fla's ``chunk_gated_delta_product``), on top of the chunked delta rule.

DeltaProduct takes ``n = num_householder`` delta steps per token. Per value head, with token t's keys
``k_{t,1..n}``, values ``v_{t,1..n}`` and write strengths ``b_{t,1..n}``::

    S <- exp(g_t) S                                              once per token, before its first step
    S <- S + k_{t,j} (b_{t,j} (v_{t,j} - S^T k_{t,j}))^T      for j = 1..n   (S: [K, V], key-first)
    o_t = S^T (scale * q_t)                                      read after the token's last step

which is the plain (gated) delta rule over the expanded sequence of ``T * n`` steps, token-major
(``(t n)``, fla's layout of ``k``, ``v``, ``beta``), with the log decay ``g_t`` on each token's first step
and 0 on the others, and the output of each token's last step. :func:`expand_householder_steps` builds that
sequence; :func:`chunk_gated_delta_product` runs it through the CPU gated delta rule (exactly fla's
``chunk_gated_delta_product_ref``).
"""

from __future__ import annotations

import torch

from staterank.backends.delta_rule import fused_recurrent_gated_delta_rule


def expand_householder_steps(
    num_householder: int, q: torch.Tensor | None = None, g: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-token q ``[B, T, H, K]`` and log decay ``[B, T, HV]`` as per-step sequences of ``T * n`` steps.

    q is zero except at each token's last step (only there is the output read); g sits on each token's first
    step and is 0 on the others (the decay applies once per token). ``None`` stays ``None``.
    """
    n = num_householder
    if q is not None:
        steps = q.new_zeros(q.shape[0], q.shape[1], n, *q.shape[2:])
        steps[:, :, -1] = q
        q = steps.flatten(1, 2)
    if g is not None:
        steps = g.new_zeros(g.shape[0], g.shape[1], n, *g.shape[2:])
        steps[:, :, 0] = g
        g = steps.flatten(1, 2)
    return q, g


def chunk_gated_delta_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    num_householder: int,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    cp_context: object | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.gated_delta_product.chunk_gated_delta_product`` (same arguments; state
    ``[N, HV, K, V]``): the expanded step sequence through the CPU gated delta rule, packed sequences included."""
    if cp_context is not None:
        raise NotImplementedError("Context parallelism is not supported by the CPU backend.")
    n = num_householder
    q_steps, g_steps = expand_householder_steps(n, q, g)
    o, final_state = fused_recurrent_gated_delta_rule(
        q_steps, k, v, g_steps, beta=beta, scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens * n,
    )
    return o.unflatten(1, (q.shape[1], n))[:, :, -1].contiguous(), final_state
