"""Pure-PyTorch Kimi Delta Attention (KDA): the gated delta rule with one decay per key channel.

Per value head, with ``a_t = exp(g_t)`` a vector over the K key channels::

    S_t = diag(a_t) S_{t-1}                                    S_t: [K, V] ("key-first" layout)
    S_t = S_t + b_t k_t (v_t - S_t^T k_t)^T
    o_t = S_t^T (scale * q_t)

as ``fla.ops.kda.naive.naive_recurrent_kda`` computes it. Grouped value heads: q, k have ``H`` heads, v / beta /
g have ``HV = G * H`` heads, value head ``j`` reads key head ``j // G``.

The chunked form is that of :mod:`staterank.backends.delta_rule` with the scalar decay ratios replaced by
per-channel ones. Inside a chunk with cumulative log decay ``gamma_i = g_1 + ... + g_i`` (vectors over K)::

    (I + A) delta = diag(b) V - diag(b) (K * exp(gamma)) S_0,   A_ij = b_i sum_d k_id exp(gamma_id - gamma_jd) k_jd
    O     = (Q * exp(gamma)) S_0 + M delta,                      M_ij = sum_d q_id exp(gamma_id - gamma_jd) k_jd
    S_end = diag(exp(gamma_C)) S_0 + (K * exp(gamma_C - gamma))^T delta

(j < i in A, j <= i in M). The ratios ``exp(gamma_i - gamma_j)`` are formed per pair and masked before the
exponential, so strong decays never overflow; that costs ``[C, C, K]`` per chunk and head, which is why the
chunks run one at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from staterank.backends._varlen import map_packed_sequences
from staterank.backends.delta_rule import _accumulation_dtype, _expand_key_heads, l2_norm


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


def chunk_kda_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked KDA in matrix form.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, HV, V]`` with ``HV`` a multiple of ``H``.
        beta: write strengths ``[B, T, HV]`` (already through sigmoid).
        g: log decays per key channel ``[B, T, HV, K]`` (<= 0).
        initial_state: ``[B, HV, K, V]`` or None (zeros).
        output_final_state: whether to return the state after the last token.
        scale: query scale, default ``K ** -0.5``.
        use_qk_l2norm: L2-normalise q and k first (fla's ``use_qk_l2norm_in_kernel=True``).
        chunk_size: tokens per chunk; any positive value gives the same result up to rounding.

    Returns:
        ``o`` ``[B, T, HV, V]`` and the final state ``[B, HV, K, V]`` (or None), in float32 (float64 for float64
        inputs).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    if g.shape != (B, T, HV, K):
        raise ValueError(f"g must be [B, T, HV, K] = {(B, T, HV, K)}, got {tuple(g.shape)}")
    dtype = _accumulation_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size
    NT = -(-T // C)
    pad = NT * C - T

    if use_qk_l2norm:
        q, k = l2_norm(q), l2_norm(k)
    q, k = _expand_key_heads(q.to(dtype), HV), _expand_key_heads(k.to(dtype), HV)
    # [B, T, HV, D] -> [B, HV, NT, C, D]; zero padding leaves the state untouched (beta = 0, g = 0).
    q, k, v, g = (F.pad(x.to(dtype).transpose(1, 2), (0, 0, 0, pad)).unflatten(2, (NT, C)) for x in (q, k, v, g))
    beta = F.pad(beta.to(dtype).transpose(1, 2), (0, pad)).unflatten(2, (NT, C))
    q = q * scale
    gamma = g.cumsum(-2)  # [B, HV, NT, C, K]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    eye = torch.eye(C, dtype=dtype, device=q.device)

    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for n in range(NT):
        q_n, k_n, v_n, b_n, gamma_n = q[:, :, n], k[:, :, n], v[:, :, n], beta[:, :, n], gamma[:, :, n]
        diff = gamma_n[..., :, None, :] - gamma_n[..., None, :, :]  # [B, HV, C, C, K]: gamma_i - gamma_j
        ratio = torch.where(lower[..., None], diff, float("-inf")).exp()
        k_ratio = ratio * k_n[..., None, :, :]  # exp(gamma_i - gamma_j) k_j
        A = (torch.einsum("bhid,bhijd->bhij", k_n, k_ratio) * b_n[..., None]).tril(-1)
        k_beta_decayed = k_n * gamma_n.exp() * b_n[..., None]
        rhs = torch.cat((v_n * b_n[..., None], k_beta_decayed), dim=-1)
        # unitriangular=True reads A's (zero) diagonal as ones: (I + A)^-1, then [U | W] = (I + A)^-1 rhs. Solving
        # for the C x C inverse and multiplying is ~20x faster on CPU than solving for the wide rhs directly.
        inverse = torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
        u, w = (inverse @ rhs).split((V, K), dim=-1)
        delta = u - w @ S  # [B, HV, C, V]
        attn = torch.einsum("bhid,bhijd->bhij", q_n, k_ratio)  # lower triangular incl. the diagonal
        outputs.append((q_n * gamma_n.exp()) @ S + attn @ delta)
        k_to_end = k_n * (gamma_n[..., -1:, :] - gamma_n).exp()
        S = gamma_n[..., -1, :].exp()[..., None] * S + k_to_end.transpose(-1, -2) @ delta

    o = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


def kda_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent KDA step, for decoding: q, k ``[B, H, K]``, v ``[B, HV, V]``, beta ``[B, HV]``,
    g ``[B, HV, K]``, state ``[B, HV, K, V]`` or None. Returns ``o`` ``[B, HV, V]`` and the new state."""
    HV, K = v.shape[1], k.shape[-1]
    dtype = _accumulation_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2_norm(q), l2_norm(k)
    q, k = _expand_key_heads(q.to(dtype), HV), _expand_key_heads(k.to(dtype), HV)
    v, beta = v.to(dtype), beta.to(dtype)
    S = v.new_zeros(v.shape[0], HV, K, v.shape[-1]) if state is None else state.to(dtype)
    S = S * g.to(dtype).exp()[..., None]
    delta = beta[..., None] * (v - (k[..., None, :] @ S).squeeze(-2))
    S = S + k[..., :, None] * delta[..., None, :]
    return ((scale * q[..., None, :]) @ S).squeeze(-2), S


def _kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool,
    lower_bound: float | None,
    state_v_first: bool,
    cu_seqlens: torch.Tensor | None,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fla-compatible entry points: in-kernel gate and beta activations, state layout, packed sequences."""
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"The batch size must be 1 when using `cu_seqlens`, got {q.shape[0]}.")
    if use_gate_in_kernel:
        g = kda_log_decay(g, A_log, dt_bias, lower_bound)
    if use_beta_sigmoid_in_kernel:
        beta = beta.to(_accumulation_dtype(beta)).sigmoid()
    if allow_neg_eigval:
        beta = beta * 2.0
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)

    def run(q, k, v, beta, g, h0):
        if q.shape[1] == 1:  # decoding: one recurrent step
            o, ht = kda_step_torch(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], h0, scale, use_qk_l2norm_in_kernel)
            return o[:, None], ht
        return chunk_kda_torch(q, k, v, beta, g, h0, True, scale, use_qk_l2norm_in_kernel)

    if cu_seqlens is None:
        o, final_state = run(q, k, v, beta, g, initial_state)
    else:
        o, final_state = map_packed_sequences(run, cu_seqlens, (q, k, v, beta, g), initial_state)
    if not output_final_state:
        final_state = None
    elif state_v_first:
        final_state = final_state.transpose(-1, -2).contiguous()
    return o.to(v.dtype), final_state


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cp_context: object | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.kda.chunk_kda`` (see its docstring; ``safe_gate`` is a kernel hint only)."""
    if cp_context is not None:
        raise NotImplementedError("Context parallelism is not supported by the CPU backend.")
    return _kda(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, A_log, dt_bias,
    )


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.kda.fused_recurrent_kda``; same math as :func:`chunk_kda`."""
    return _kda(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, A_log, dt_bias,
    )


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
    if query.shape[1] == 1:
        o, state = kda_step_torch(
            query[:, 0], key[:, 0], value[:, 0], beta[:, 0], g[:, 0], initial_state, None, use_qk_l2norm_in_kernel
        )
        o = o[:, None]
    else:
        o, state = chunk_kda_torch(
            query, key, value, beta, g, initial_state, True, None, use_qk_l2norm_in_kernel, chunk_size
        )
    return o.to(query.dtype), (state if output_final_state else None)
