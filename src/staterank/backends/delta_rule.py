"""Pure-PyTorch (gated) delta rule, numerically equivalent to fla's Triton kernels.

Notation (per value head, all products in at least float32):

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T        S_t: [K, V] state ("key-first" layout)
    o_t = S_t^T (scale * q_t)

with ``a_t = exp(g_t)`` (``g`` is the log decay, ``g = 0`` for the plain delta rule), ``b_t = beta_t``, and
q, k optionally L2-normalised first. This is exactly what ``fla.ops.gated_delta_rule.fused_recurrent`` computes
(decay first, then the delta update ``S += k (b (v - S^T k))^T``, then the read-out).

Grouped value heads: q and k have ``H`` heads, v / beta / g have ``HV = G * H`` heads, and value head ``j``
reads key head ``j // G`` (fla's ``i_h = i_hv // (HV // H)``).

The chunked form follows fla's WY/UT representation. Inside a chunk with local cumulative log decay
``gamma_i = g_1 + ... + g_i`` and chunk-initial state ``S_0``, the per-token updates
``delta_i = b_i (v_i - a_i S_{i-1}^T k_i)`` satisfy a unit lower-triangular system

    (I + A) delta = diag(b) V - diag(b exp(gamma)) K S_0,    A_ij = b_i exp(gamma_i - gamma_j) k_i^T k_j  (j < i)

so ``delta = U - W S_0`` with ``[U | W] = (I + A)^{-1} [diag(b) V | diag(b exp(gamma)) K]`` (one batched
triangular solve for all chunks), and

    O     = scale * (diag(exp(gamma)) Q S_0 + (Q K^T * D) delta),   D_ij = exp(gamma_i - gamma_j) (j <= i)
    S_end = exp(gamma_C) S_0 + (K * exp(gamma_C - gamma))^T delta

Only the state is carried sequentially, by a Python loop over chunks. Everything is plain autograd-differentiable.

Per-channel decay (Kimi Delta Attention): ``g_t`` may be a vector over the K key channels, ``S_t = diag(a_t)
S_{t-1}`` before the delta update, as ``fla.ops.kda.naive.naive_recurrent_kda`` computes it. The chunked form
then replaces the scalar ratios ``exp(gamma_i - gamma_j)`` by per-channel ones (``gamma`` a vector over K)::

    (I + A) delta = diag(b) V - diag(b) (K * exp(gamma)) S_0,   A_ij = b_i sum_d k_id exp(gamma_id - gamma_jd) k_jd
    O     = (Q * exp(gamma)) S_0 + M delta,                      M_ij = sum_d q_id exp(gamma_id - gamma_jd) k_jd
    S_end = diag(exp(gamma_C)) S_0 + (K * exp(gamma_C - gamma))^T delta

The ratios are formed per pair and masked before the exponential, so strong decays never overflow; that costs
``[C, C, K]`` per chunk and head, which is why those chunks are built one at a time (and are best kept at 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from staterank.backends._varlen import map_packed_sequences

L2_NORM_EPS = 1e-6


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float32, or float64 when the input already is (so fp64 inputs give fp64-accurate results)."""
    return torch.promote_types(x.dtype, torch.float32)


def l2_norm(x: torch.Tensor, eps: float = L2_NORM_EPS) -> torch.Tensor:
    """fla's ``l2norm_fwd``: ``x / sqrt(sum(x^2) + eps)`` over the last dim, returned in the accumulation dtype."""
    x = x.to(_accumulation_dtype(x))
    return x * torch.rsqrt(x.square().sum(-1, keepdim=True) + eps)


def gdn_log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Gated DeltaNet log decay ``g = -exp(A_log) * softplus(a + dt_bias)`` (fla's ``use_gate_in_kernel``).

    Args:
        a: raw gate logits ``[..., HV]`` (the output of ``a_proj``).
        A_log: ``[HV]``.
        dt_bias: ``[HV]`` or ``None``.

    Returns:
        log decay ``[..., HV]`` (<= 0) in the accumulation dtype.
    """
    dtype = _accumulation_dtype(a)
    a = a.to(dtype)
    if dt_bias is not None:
        a = a + dt_bias.to(dtype)
    # F.softplus switches to the identity above 20, like fla's Triton softplus.
    return -A_log.to(dtype).exp() * F.softplus(a)


def _expand_key_heads(x: torch.Tensor, num_v_heads: int) -> torch.Tensor:
    """Repeat key heads ``[..., H, K]`` so that value head ``j`` sees key head ``j // (HV // H)``."""
    num_heads = x.shape[-2]
    if num_v_heads % num_heads != 0:
        raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_heads ({num_heads}).")
    return x.repeat_interleave(num_v_heads // num_heads, dim=-2)


def _chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, T, HV, *]`` -> ``[B, HV, NT, C, *]``; the zero padding leaves the state untouched (beta = 0, g = 0)."""
    x = x.transpose(1, 2)
    x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, -x.shape[2] % chunk_size))
    return x.unflatten(2, (-1, chunk_size))


def chunk_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    delta_rule: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked (gated) delta rule in matrix form.

    Args:
        q: queries ``[B, T, H, K]``.
        k: keys ``[B, T, H, K]``.
        v: values ``[B, T, HV, V]`` with ``HV`` a multiple of ``H``; value head ``j`` uses key head ``j // (HV // H)``.
        beta: write strengths ``[B, T, HV]`` (already through sigmoid).
        g: log decays (<= 0), one per head ``[B, T, HV]`` or one per key channel ``[B, T, HV, K]`` (KDA), or
            ``None`` for the ungated delta rule.
        initial_state: ``[B, HV, K, V]`` or ``None`` (zeros).
        output_final_state: whether to return the state after the last token.
        scale: query scale, default ``K ** -0.5``.
        use_qk_l2norm: L2-normalise q and k (eps 1e-6 inside the sqrt) before the recurrence, as fla's
            ``use_qk_l2norm_in_kernel=True``.
        chunk_size: tokens per chunk; any positive value gives the same result up to rounding.
        delta_rule: False drops the delta correction: plain (gated) linear attention, ``S_t = a_t S_{t-1} +
            b_t k_t v_t^T`` (GLA with a per-channel ``g``), where ``U = diag(b) V`` and ``W = 0``.

    Returns:
        ``o`` of shape ``[B, T, HV, V]`` and the final state ``[B, HV, K, V]`` (or ``None``), both in float32
        (float64 if the inputs are float64).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    per_channel = g is not None and g.ndim == 4
    if per_channel and g.shape != (B, T, HV, K):
        raise ValueError(f"a per-channel g must be [B, T, HV, K] = {(B, T, HV, K)}, got {tuple(g.shape)}")
    dtype = _accumulation_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2_norm(q), l2_norm(k)
    q, k = _expand_key_heads(q.to(dtype), HV), _expand_key_heads(k.to(dtype), HV)
    if g is None:
        g = beta.new_zeros(beta.shape, dtype=dtype)
    q, k, v, beta, g = (_chunks(x.to(dtype), chunk_size) for x in (q, k, v, beta, g))
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(dtype)
    o, S = (_per_channel_chunks if per_channel else _scalar_chunks)(q * scale, k, v, beta, g, S, delta_rule)
    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


def _scalar_wy(k, v, beta, gamma, delta_rule=True):
    """The per-chunk terms of the rule with one decay per head: ``decay[i, j] = exp(gamma_i - gamma_j)`` (j <= i,
    else 0) and ``delta = U - W S_0`` as ``(U, W)`` (``W`` None without the delta correction, where delta = U)."""
    C, V = k.shape[-2], v.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # masking before exp avoids overflow above the diagonal
    decay = torch.where(causal, gamma[..., :, None] - gamma[..., None, :], float('-inf')).exp()  # [B, HV, NT, C, C]
    u, w = v * beta[..., None], None
    if delta_rule:
        k_beta = k * beta[..., None]
        A = ((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
        rhs = torch.cat((u, k_beta * gamma.exp()[..., None]), dim=-1)
        # unitriangular=True reads A's (zero) diagonal as ones: this solves (I + A) [U | W] = rhs.
        u, w = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split((V, k.shape[-1]), dim=-1)
    return decay, u, w


def _scalar_chunks(q, k, v, beta, g, S, delta_rule=True):
    """The chunk recurrence with one decay per head: chunked inputs ``[B, HV, NT, C, *]``, state ``[B, HV, K, V]``."""
    gamma = g.cumsum(-1)  # [B, HV, NT, C]
    decay, u, w = _scalar_wy(k, v, beta, gamma, delta_rule)
    attn = (q @ k.transpose(-1, -2)) * decay  # [B, HV, NT, C, C], lower triangular incl. diagonal
    q_decayed = q * gamma.exp()[..., None]
    k_decayed = k * (gamma[..., -1:] - gamma).exp()[..., None]
    chunk_decay = gamma[..., -1].exp()[..., None, None]  # [B, HV, NT, 1, 1]

    o = q.new_zeros(*v.shape)
    for n in range(q.shape[2]):
        delta = u[:, :, n] if w is None else u[:, :, n] - w[:, :, n] @ S  # [B, HV, C, V]
        o[:, :, n] = q_decayed[:, :, n] @ S + attn[:, :, n] @ delta
        S = chunk_decay[:, :, n] * S + k_decayed[:, :, n].transpose(-1, -2) @ delta
    return o, S


def delta_rule_states_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    positions: list[int],
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
    delta_rule: bool = True,
) -> torch.Tensor:
    """The state after each of ``positions`` steps, ``[P, B, HV, K, V]``, in one chunked pass without outputs.

    Arguments as :func:`chunk_delta_rule_torch`, with one decay per head (``g`` ``[B, T, HV]`` or ``None``);
    ``positions`` are step counts, sorted, unique, within ``[1, T]``. The states the chunk recurrence carries
    are those at chunk boundaries; the state after ``i`` steps of chunk ``n`` follows from the chunk's initial
    state and its updates ``delta`` (step ``j``'s update depends on steps ``<= j`` only, the system being
    triangular), ``S = exp(gamma_i) S_0 + sum_{j <= i} exp(gamma_i - gamma_j) k_j delta_j^T``, for all positions
    in one batched product. Nothing of the queries or outputs is computed.
    """
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    dtype = _accumulation_dtype(k)
    if use_qk_l2norm:
        k = l2_norm(k)
    k = _expand_key_heads(k.to(dtype), HV)
    gated = g is not None
    if g is None:
        g = beta.new_zeros(beta.shape, dtype=dtype)
    last = positions[-1]  # later steps do not matter
    k, v, beta, g = (_chunks(x[:, :last].to(dtype), chunk_size) for x in (k, v, beta, g))
    C = k.shape[-2]
    gamma = g.cumsum(-1)  # [B, HV, NT, C]
    _, u, w = _scalar_wy(k, v, beta, gamma, delta_rule)
    k_decayed_t = (k * (gamma[..., -1:] - gamma).exp()[..., None]).transpose(-1, -2)  # [B, HV, NT, K, C]
    chunk_decay = gamma[..., -1].exp()[..., None, None]

    S = k.new_zeros(B, HV, K, V)
    starts, deltas = [], []  # per chunk: the state it starts from, and its updates
    for n in range(k.shape[2]):
        delta = u[:, :, n] if w is None else u[:, :, n] - w[:, :, n] @ S
        starts.append(S)
        deltas.append(delta)
        S = k_decayed_t[:, :, n] @ delta + (chunk_decay[:, :, n] * S if gated else S)

    # Index tensors go to the device without waiting for it (a blocking copy would stall the host's launches).
    chunk_of = [(t - 1) // C for t in positions]
    offset_of = [(t - 1) % C for t in positions]  # the position's last step in its chunk

    def on_device(values: list[int]) -> torch.Tensor:
        return torch.tensor(values).to(k.device, non_blocking=True)

    chunk, offset = on_device(chunk_of), on_device(offset_of)
    gamma_at = gamma[:, :, chunk, offset]  # [B, HV, P]
    steps = torch.arange(C, device=k.device)
    # exp(gamma_i - gamma_j) for the steps j <= i of the position's chunk: [B, HV, P, C]
    weight = torch.where(steps <= offset[:, None], gamma_at[..., None] - gamma[:, :, chunk], float('-inf')).exp()
    start = torch.stack([starts[c] for c in chunk_of], dim=2)  # [B, HV, P, K, V]
    delta = torch.stack([deltas[c] for c in chunk_of], dim=2)  # [B, HV, P, C, V]
    states = gamma_at.exp()[..., None, None] * start + (k[:, :, chunk] * weight[..., None]).transpose(-1, -2) @ delta
    return states.permute(2, 0, 1, 3, 4)


def _per_channel_chunks(q, k, v, beta, g, S, delta_rule=True):
    """The chunk recurrence with one decay per key channel (KDA); same arguments as :func:`_scalar_chunks`."""
    C, V = q.shape[-2], v.shape[-1]
    gamma = g.cumsum(-2)  # [B, HV, NT, C, K]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    o = q.new_zeros(*v.shape)
    for n in range(q.shape[2]):
        q_n, k_n, v_n, b_n, gamma_n = q[:, :, n], k[:, :, n], v[:, :, n], beta[:, :, n], gamma[:, :, n]
        diff = gamma_n[..., :, None, :] - gamma_n[..., None, :, :]  # [B, HV, C, C, K]: gamma_i - gamma_j
        k_ratio = torch.where(lower[..., None], diff, float("-inf")).exp() * k_n[..., None, :, :]
        delta = v_n * b_n[..., None]  # without the delta correction (GLA)
        if delta_rule:
            A = (torch.einsum("bhid,bhijd->bhij", k_n, k_ratio) * b_n[..., None]).tril(-1)
            rhs = torch.cat((delta, k_n * gamma_n.exp() * b_n[..., None]), dim=-1)
            # Solving for the C x C inverse of (I + A) and multiplying is ~20x faster on CPU than solving for the
            # wide right-hand side directly.
            inverse = torch.linalg.solve_triangular(A, eye.expand_as(A), upper=False, unitriangular=True)
            u, w = (inverse @ rhs).split((V, q.shape[-1]), dim=-1)
            delta = u - w @ S  # [B, HV, C, V]
        attn = torch.einsum("bhid,bhijd->bhij", q_n, k_ratio)  # lower triangular incl. the diagonal
        o[:, :, n] = (q_n * gamma_n.exp()) @ S + attn @ delta
        k_to_end = k_n * (gamma_n[..., -1:, :] - gamma_n).exp()
        S = gamma_n[..., -1, :].exp()[..., None] * S + k_to_end.transpose(-1, -2) @ delta
    return o, S


def delta_rule_step_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    delta_rule: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step of the (gated) delta rule (or, ``delta_rule=False``, linear attention), for decoding.

    Args:
        q: ``[B, H, K]``.
        k: ``[B, H, K]``.
        v: ``[B, HV, V]``.
        beta: ``[B, HV]``.
        g: log decay ``[B, HV]``, or ``[B, HV, K]`` (per key channel), or ``None``.
        state: ``[B, HV, K, V]`` or ``None`` (zeros).
        scale: default ``K ** -0.5``.
        use_qk_l2norm: as in :func:`chunk_delta_rule_torch`.

    Returns:
        ``o`` ``[B, HV, V]`` and the new state ``[B, HV, K, V]``, in the accumulation dtype.
    """
    HV, K = v.shape[1], k.shape[-1]
    dtype = _accumulation_dtype(q)
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2_norm(q), l2_norm(k)
    q, k = _expand_key_heads(q.to(dtype), HV), _expand_key_heads(k.to(dtype), HV)
    v, beta = v.to(dtype), beta.to(dtype)

    S = v.new_zeros(v.shape[0], HV, K, v.shape[-1]) if state is None else state.to(dtype)
    if g is not None:
        decay = g.to(dtype).exp()
        S = S * (decay[..., None] if decay.ndim == S.ndim - 1 else decay[..., None, None])
    # b (v - S^T k): [B, HV, V]; b v without the delta correction
    delta = beta[..., None] * (v - (k[..., None, :] @ S).squeeze(-2) if delta_rule else v)
    S = S + k[..., :, None] * delta[..., None, :]
    o = ((scale * q[..., None, :]) @ S).squeeze(-2)  # S^T (scale q): [B, HV, V]
    return o, S


def _delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    scale: float | None,
    use_qk_l2norm: bool,
    state_v_first: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    out_dtype: torch.dtype,
    delta_rule: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared body of the fla-compatible entry points: state layout, packed sequences, step-vs-chunk choice."""
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"The batch size must be 1 when using `cu_seqlens`, got {q.shape[0]}.")
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)

    def run(q, k, v, beta, g, h0):
        if q.shape[1] == 1:  # decoding: a single recurrent step is much cheaper than the chunked form
            o, ht = delta_rule_step_torch(
                q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0], h0, scale, use_qk_l2norm,
                delta_rule,
            )
            return o[:, None], ht
        return chunk_delta_rule_torch(q, k, v, beta, g, h0, True, scale, use_qk_l2norm, chunk_size, delta_rule)

    if cu_seqlens is None:
        o, final_state = run(q, k, v, beta, g, initial_state)
    else:
        o, final_state = map_packed_sequences(run, cu_seqlens, (q, k, v, beta, g), initial_state)
    if not output_final_state:
        final_state = None
    elif state_v_first:
        final_state = final_state.transpose(-1, -2).contiguous()
    return o.to(out_dtype), final_state


def chunk_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.delta_rule.chunk_delta_rule`` (q, k, v ``[B, T, H, *]``, state ``[N, H, K, V]``)."""
    return _delta_rule(
        q, k, v, beta, None, initial_state, output_final_state, scale, use_qk_l2norm_in_kernel,
        state_v_first=False, cu_seqlens=cu_seqlens, chunk_size=chunk_size, out_dtype=q.dtype,
    )


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.delta_rule.fused_recurrent_delta_rule``; same math as :func:`chunk_delta_rule`."""
    if beta is None:
        beta = torch.ones_like(q[..., 0])
    if beta.ndim == v.ndim:
        raise NotImplementedError("Per-channel beta ([B, T, H, V]) is not supported by the CPU backend.")
    return _delta_rule(
        q, k, v, beta, None, initial_state, output_final_state, scale, use_qk_l2norm_in_kernel,
        state_v_first=False, cu_seqlens=cu_seqlens, chunk_size=64, out_dtype=v.dtype,
    )


def _gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    use_beta_sigmoid_in_kernel: bool,
    allow_neg_eigval: bool,
    state_v_first: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply fla's in-kernel gate / beta activations, then run the delta rule."""
    if q.shape[2] != k.shape[2] or v.shape[2] % q.shape[2] != 0:
        raise ValueError(f"Expected q, k with H heads and v with a multiple of H heads, got {q.shape}, {v.shape}.")
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    if use_gate_in_kernel:
        if A_log is None or g is None:
            raise ValueError("`g` and `A_log` must be provided when `use_gate_in_kernel=True`.")
        g = gdn_log_decay(g, A_log, dt_bias)
    if use_beta_sigmoid_in_kernel:
        beta = beta.to(_accumulation_dtype(beta)).sigmoid() * (2.0 if allow_neg_eigval else 1.0)
    return _delta_rule(
        q, k, v, beta, g, initial_state, output_final_state, scale, use_qk_l2norm_in_kernel,
        state_v_first=state_v_first, cu_seqlens=cu_seqlens, chunk_size=chunk_size, out_dtype=out_dtype,
    )


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    cp_context: object | None = None,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (see its docstring for the arguments).

    ``state_v_first=True`` means states are stored as ``[N, HV, V, K]`` instead of ``[N, HV, K, V]``.
    """
    if cp_context is not None:
        raise NotImplementedError("Context parallelism is not supported by the CPU backend.")
    return _gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens, chunk_size,
        out_dtype=q.dtype,
    )


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    gv: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule`` (scalar per-head gate only)."""
    if gk is not None or gv is not None:
        raise NotImplementedError("Per-key / per-value decays (gk, gv) are not supported by the CPU backend.")
    if beta is None:
        beta = torch.ones_like(v[..., 0])
    if beta.ndim == v.ndim:
        raise NotImplementedError("Per-channel beta ([B, T, HV, V]) is not supported by the CPU backend.")
    return _gated_delta_rule(
        q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        A_log, dt_bias, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, cu_seqlens, chunk_size=64,
        out_dtype=v.dtype,
    )
