"""Kimi Delta Attention (KDA) on CPU: fla's and transformers' entry points over the per-channel delta rule.

Per value head, with ``a_t = exp(g_t)`` a vector over the K key channels::

    S_t = diag(a_t) S_{t-1}                                    S_t: [K, V] ("key-first" layout)
    S_t = S_t + b_t k_t (v_t - S_t^T k_t)^T
    o_t = S_t^T (scale * q_t)

as ``fla.ops.kda.naive.naive_recurrent_kda`` computes it; the math is
:func:`staterank.backends.delta_rule.chunk_delta_rule_torch` with a per-channel ``g``. This module adds KDA's gate
(:func:`kda_log_decay`) and the in-kernel activations of fla's ``chunk_kda`` / ``fused_recurrent_kda``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from staterank.backends.delta_rule import _accumulation_dtype, chunk_gated_delta_rule


def kda_log_decay(
    g: torch.Tensor,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """KDA's per-channel log decay from the forget-gate logits (fla's ``use_gate_in_kernel``).

    ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound``: ``lower_bound * sigmoid(exp(A_log) (g +
    dt_bias))`` (``A_log`` may then be None).

    Args:
        g: gate logits ``[..., HV, K]``.
        A_log: ``HV`` elements (any shape), or None (only with ``lower_bound``).
        dt_bias: ``HV * K`` elements, or None.
        lower_bound: the lower-bounded gate's bound (< 0), or None.

    Returns:
        log decay ``[..., HV, K]`` (<= 0) in the accumulation dtype.
    """
    dtype = _accumulation_dtype(g)
    num_heads = g.shape[-2]
    g = g.to(dtype)
    if dt_bias is not None:
        g = g + dt_bias.to(dtype).view(num_heads, -1)
    if lower_bound is not None:
        if A_log is not None:
            g = A_log.to(dtype).view(num_heads, 1).exp() * g
        return lower_bound * g.sigmoid()
    if A_log is None:
        raise ValueError("A_log is needed unless lower_bound is given")
    return -A_log.to(dtype).view(num_heads, 1).exp() * F.softplus(g)


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    safe_gate: bool = False,
    chunk_size: int = 32,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.kda.chunk_kda`` (see its docstring; ``safe_gate`` is a kernel hint only).

    KDA's gate and beta activations are applied here; the other keywords (``scale``, ``initial_state``,
    ``output_final_state``, ``use_qk_l2norm_in_kernel``, ``state_v_first``, ``cu_seqlens``) are those of
    :func:`~staterank.backends.delta_rule.chunk_gated_delta_rule`, which runs the rule on the per-channel ``g``.
    """
    if use_gate_in_kernel:
        g = kda_log_decay(g, A_log, dt_bias, lower_bound)
    if use_beta_sigmoid_in_kernel:
        beta = beta.to(_accumulation_dtype(beta)).sigmoid()
    if allow_neg_eigval:
        beta = beta * 2.0
    return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)


#: CPU version of ``fla.ops.kda.fused_recurrent_kda``: the same keywords and math as :func:`chunk_kda`.
fused_recurrent_kda = chunk_kda


def hf_chunk_kimi_delta_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    chunk_size: int = 32,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of transformers' ``kimi_linear`` ``chunk_kimi_delta_attention`` / ``recurrent_...`` (g, beta
    already activated; state ``[B, H, K, V]``)."""
    if kwargs.get("cu_seqlens") is not None:
        raise ValueError("the CPU KDA backend cannot keep packed sequences apart (cu_seqlens)")
    return chunk_gated_delta_rule(
        query, key, value, g, beta, initial_state=initial_state, output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, chunk_size=chunk_size,
    )  # fmt: skip
