"""Pure-PyTorch RWKV-7 operations with fla's calling conventions (``fla.layers.rwkv7``, ``fla.models.rwkv7``).

RWKV-7's state follows the diagonal-plus-low-rank (DPLR) rule of fla's generalised delta rule. Per head, with the
state key-first (``[d_k, d_v]``), a per-key-channel log decay ``w_t <= 0`` and two vectors ``a_t``, ``b_t``::

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T          o_t = S_t^T (scale r_t)

(the low-rank term reads the state before the decay, as fla's kernels do). The RWKV-7 layer passes
``a = -kk`` and ``b = kk * a_gate``, ``kk`` the L2-normalised key, so the update is the delta rule's removal
along ``kk`` with a per-channel strength and a per-channel decay, and a write ``k v^T`` whose key differs from
the removal's.

The element-wise pieces (token shift, the six interpolations, the key update, the output correction) are small;
where fla ships a PyTorch reference with the kernel's signature, the CPU route is that reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def token_shift(
    x: torch.Tensor,
    cu_seqlens: torch.LongTensor | None = None,
    cache: torch.Tensor | None = None,
    output_cache: bool = False,
    chunk_indices: torch.LongTensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``fla.modules.token_shift.token_shift``: ``x_{t-1} - x_t`` over ``[B, T, D]``, the token before each
    sequence's first taken from ``cache`` ``[N, D]`` (zeros without one); the cache out is each sequence's last
    token ``[N, D]``. With ``cu_seqlens`` (``B = 1``) every packed sequence starts afresh."""
    batch, _, width = x.shape
    if cu_seqlens is None:
        first = x.new_zeros(batch, 1, width) if cache is None else cache.reshape(batch, 1, width).to(x.dtype)
        previous = torch.cat([first, x[:, :-1]], dim=1)
        last = x[:, -1]
    else:
        bounds = cu_seqlens.tolist()
        pieces = []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            first = x.new_zeros(1, width) if cache is None else cache[i : i + 1].to(x.dtype)
            pieces.append(torch.cat([first, x[0, start : end - 1]], dim=0)[: end - start])
        previous = torch.cat(pieces, dim=0).unsqueeze(0)
        last = x[0, [end - 1 for end in bounds[1:]]]
    delta = previous - x
    return (delta, last) if output_cache else delta


#: tokens per chunk of :func:`dplr_recurrence` and :func:`dplr_states` (about the square root of typical lengths)
CHUNK = 32


def _step(state, k, v, a, b, decay) -> torch.Tensor:
    """One token of the rule: ``diag(decay) S + b (a^T S) + k v^T`` over ``[B, H, d_k, d_v]`` states."""
    removed = (a[..., None] * state).sum(-2, keepdim=True)  # a^T S: [B, H, 1, d_v]
    return decay[..., None] * state + b[..., None] * removed + k[..., None] * v[..., None, :]


def _chunked(x: torch.Tensor, chunk: int, fill: float) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B, H, N, C, D]``, T padded to ``N * C`` with ``fill``."""
    pad = -x.shape[1] % chunk
    x = F.pad(x, (0, 0, 0, 0, 0, pad), value=fill) if pad else x
    return x.unflatten(1, (-1, chunk)).permute(0, 3, 1, 2, 4)


def _transitions(r, k, v, a, b, decay, chunk: int):
    """Every chunk's transition from its initial state, in parallel over chunks: ``S_t = P_t S_0 + U_t`` with
    ``P_t = A_t ... A_1`` (``A_t = diag(d_t) + b_t a_t^T``) and ``U_t`` the chunk's own writes. Returns, per chunk,
    ``P`` and ``U`` at its end ``[B, H, N, d_k, d_k | d_v]``, and per token ``P_t^T r_t`` and ``U_t^T r_t``
    ``[B, H, N, C, d_k | d_v]``. Padding tokens are identity steps (decay 1, no removal, no write)."""
    r = None if r is None else _chunked(r, chunk, 0.0)
    k, a, b = (_chunked(x, chunk, 0.0) for x in (k, a, b))
    v, decay = _chunked(v, chunk, 0.0), _chunked(decay, chunk, 1.0)
    d_k, d_v = k.shape[-1], v.shape[-1]
    P = torch.eye(d_k, dtype=k.dtype, device=k.device).expand(*k.shape[:3], d_k, d_k)
    U = k.new_zeros(*k.shape[:3], d_k, d_v)
    read_start, read_local = [], []
    for j in range(chunk):
        d, a_j, b_j = decay[..., j, :, None], a[..., j, None, :], b[..., j, :, None]
        P = d * P + b_j * (a_j @ P)
        U = _step(U, k[..., j, :], v[..., j, :], a[..., j, :], b[..., j, :], decay[..., j, :])
        if r is not None:
            read_start.append((r[..., j, None, :] @ P).squeeze(-2))  # (P^T r)^T
            read_local.append((r[..., j, None, :] @ U).squeeze(-2))
    if r is None:
        return P, U, None, None
    return P, U, torch.stack(read_start, -2), torch.stack(read_local, -2)


def _chunk_starts(P: torch.Tensor, U: torch.Tensor, state: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The state before each chunk, one chunk after another from ``state``, and the state after the last."""
    starts = []
    for n in range(P.shape[2]):
        starts.append(state)
        state = P[:, :, n] @ state + U[:, :, n]
    return starts, state


#: the largest total log decay within one chunk of :func:`_wy_chunks` (its factors ``exp(-G)`` stay far from
#: float32's range, e^88); a chunk that decays more is computed by the scan instead
WY_LOG_DECAY_LIMIT = 60.0


def _wy_fits(log_decay: torch.Tensor, chunk: int) -> bool:
    """Whether every chunk of ``chunk`` tokens decays by at most ``WY_LOG_DECAY_LIMIT`` in every channel."""
    total = _chunked(log_decay, chunk, 0.0).sum(-2)
    return bool(total.min() >= -WY_LOG_DECAY_LIMIT)


def _wy_chunks(r, k, v, a, b, log_decay, chunk: int, state: torch.Tensor):
    """The rule chunk by chunk in the WY form: ``T / chunk`` sequential steps of small matrix products.

    Within a chunk, with ``G_t`` the decay's cumulative log (``Γ_t = exp(G_t)``), the decay-free state
    ``S~_t = S_t / Γ_t`` (row-wise) follows ``S~_t = S~_{t-1} + β_t u_t^T + κ_t v_t^T`` with ``β = b / Γ``,
    ``κ = k / Γ``, ``α_t = a_t Γ_{t-1}`` and ``u_t = S~_{t-1}^T α_t``. Stacking the chunk's ``u_t``,
    ``(I - L_αβ) U = α S_0 + L_ακ V`` (``L`` strictly lower triangular), one triangular solve; the outputs are
    ``(r Γ) S_0 + M_rβ U + M_rκ V`` (``M`` lower triangular with its diagonal) and the next chunk starts from
    ``Γ_C (S_0 + β^T U + κ^T V)``. Returns the state before each chunk, the final state and, if ``r`` is given,
    the outputs ``[B, H, N, C, d_v]``."""
    k, a, b, log_decay = (_chunked(x, chunk, 0.0) for x in (k, a, b, log_decay))
    v = _chunked(v, chunk, 0.0)
    G = log_decay.cumsum(-2)
    kappa, beta = k * (-G).exp(), b * (-G).exp()
    alpha = a * (G - log_decay).exp()
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril(-1)
    L_ab = (alpha @ beta.transpose(-1, -2)).masked_fill(~strict, 0.0)
    L_ak = (alpha @ kappa.transpose(-1, -2)).masked_fill(~strict, 0.0)
    eye = torch.eye(chunk, dtype=k.dtype, device=k.device)
    # W = (I - L_ab)^-1 α and Z = (I - L_ab)^-1 L_ak V: u_t of the chunk is W S_0 + Z
    WZ = torch.linalg.solve_triangular(eye - L_ab, torch.cat([alpha, L_ak @ v], -1), upper=False, unitriangular=True)
    W, Z = WZ.split([k.shape[-1], v.shape[-1]], -1)
    end = G[..., -1, :, None].exp()  # Γ_C per key channel: [B, H, N, d_k, 1]
    kv = kappa.transpose(-1, -2) @ v
    starts, U = [], []
    for n in range(k.shape[2]):
        starts.append(state)
        u = W[:, :, n] @ state + Z[:, :, n]
        state = end[:, :, n] * (state + beta[:, :, n].transpose(-1, -2) @ u + kv[:, :, n])
        U.append(u)
    if r is None:
        return starts, state, None
    r = _chunked(r, chunk, 0.0) * G.exp()
    inclusive = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    M_rb = (r @ beta.transpose(-1, -2)).masked_fill(~inclusive, 0.0)
    M_rk = (r @ kappa.transpose(-1, -2)).masked_fill(~inclusive, 0.0)
    o = r @ torch.stack(starts, 2) + M_rb @ torch.stack(U, 2) + M_rk @ v
    return starts, state, o


def _chunkwise(r, k, v, a, b, log_decay, chunk: int, state: torch.Tensor, wy: bool):
    """The state before each chunk, the final state and, if ``r`` is given, the outputs ``[B, H, N, C, d_v]``: in
    the WY form where every chunk's decay allows it (and ``wy``), else by the two-level scan."""
    if wy and _wy_fits(log_decay, chunk):
        return _wy_chunks(r, k, v, a, b, log_decay, chunk, state)
    P, U, read_start, read_local = _transitions(r, k, v, a, b, log_decay.exp(), chunk)
    starts, final = _chunk_starts(P, U, state)
    return starts, final, None if r is None else read_local + read_start @ torch.stack(starts, 2)


def dplr_recurrence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    chunk: int | None = None,
    wy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The DPLR rule above in float32: q, k, a, b, log_decay ``[B, T, H, d_k]``, v ``[B, T, H, d_v]``, initial state
    ``[N, H, d_k, d_v]``. Returns the outputs ``[B, T, H, d_v]`` (v's dtype) and the final states ``[N, H, d_k,
    d_v]`` (float32) if asked. ``cu_seqlens`` packs ``N`` sequences into ``B = 1``.

    ``chunk=1`` runs token by token. Otherwise (default ``CHUNK`` tokens) chunk by chunk, exact: in the WY
    form (:func:`_wy_chunks`, ``T / chunk`` sequential steps of small matrix products) where every chunk decays by
    at most ``WY_LOG_DECAY_LIMIT`` (RWKV-7's decay, at least ``exp(-0.607)`` a token, decays by at most 19.4 in 32
    tokens), else (or with ``wy=False``) as a two-level scan that never divides by a decay: every chunk computes
    its ``d_k x d_k`` transition and its own writes from a zero state in parallel with the others (``chunk``
    steps), then the chunks' initial states follow one after another, and each token's output adds what it reads
    of its chunk's initial state. The WY form is the default on every device: at B 8, T 512, 8 heads of 64 x 64
    on a 2-core CPU, forward and backward take 0.29 s, against 7.7 s token by token and 8.4 s for the scan; a
    29M RWKV-7 trained 5.7 times as fast on an H200 as through the scan."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        outputs, finals = [], []
        for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            part = (x[:, start:end] for x in (q, k, v, a, b, log_decay))
            state = None if initial_state is None else initial_state[i : i + 1]
            o, final = dplr_recurrence(
                *part, scale=scale, initial_state=state, output_final_state=True, chunk=chunk, wy=wy
            )
            outputs.append(o)
            finals.append(final)
        return torch.cat(outputs, dim=1), torch.cat(finals) if output_final_state else None
    batch, seq, heads, d_k = k.shape
    dtype = v.dtype
    q, k, v, a, b, log_decay = (x.float() for x in (q, k, v, a, b, log_decay))
    state = q.new_zeros(batch, heads, d_k, v.shape[-1]) if initial_state is None else initial_state.float()
    chunk = max(1, min(chunk or CHUNK, seq))
    if chunk == 1:
        outputs = []
        for t in range(seq):
            state = _step(state, k[:, t], v[:, t], a[:, t], b[:, t], log_decay[:, t].exp())
            outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * scale, state))
        return torch.stack(outputs, dim=1).to(dtype), state if output_final_state else None
    _, state, o = _chunkwise(q * scale, k, v, a, b, log_decay, chunk, state, wy)
    o = o.permute(0, 2, 3, 1, 4).flatten(1, 2)[:, :seq]
    return o.to(dtype), state if output_final_state else None


def dplr_states(
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor,
    positions: Sequence[int],
    chunk: int | None = None,
    wy: bool = True,
) -> torch.Tensor:
    """The DPLR states after each of ``positions`` tokens (counts, sorted, in ``[1, T]``): ``[P, B, H, d_k, d_v]``,
    in the inputs' dtype, no outputs computed. Token by token (``chunk=1``), or (the default) the chunks'
    initial states as in :func:`dplr_recurrence` (``wy`` alike) and then each position's remaining tokens of its
    chunk."""
    batch, seq, heads, d_k = k.shape
    chunk = max(1, min(chunk or CHUNK, seq))
    decay = log_decay.exp()
    state, at = k.new_zeros(batch, heads, d_k, v.shape[-1]), 0  # the state after ``at`` tokens
    starts = None
    if chunk > 1:
        starts, final, _ = _chunkwise(None, k, v, a, b, log_decay, chunk, state, wy)
        starts.append(final)
    states = []
    for t in positions:
        if starts is not None and t // chunk * chunk > at:  # jump to the start of t's chunk
            at = t // chunk * chunk
            state = starts[t // chunk]
        for s in range(at, t):
            state = _step(state, k[:, s], v[:, s], a[:, s], b[:, s], decay[:, s])
        states.append(state)
        at = t
    return torch.stack(states)


def chunk_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.LongTensor | None = None,
    **kernel_options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fla.ops.rwkv7.chunk_rwkv7`` (``w`` the log decay); ``cu_seqlens_cpu``, ``safe_gate``, ``chunk_size``,
    ``lower_bound`` and the like tune fla's kernel only."""
    return dplr_recurrence(r, k, v, a, b, w, scale, initial_state, output_final_state, cu_seqlens)


def fused_mul_recurrent_rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kk: torch.Tensor,
    a: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fla.ops.rwkv7.fused_mul_recurrent_rwkv7``: the rule with ``a = -kk`` and ``b = kk * a``."""
    if reverse:
        raise NotImplementedError("staterank's RWKV-7 recurrence runs forward in time only")
    return dplr_recurrence(r, k, v, -kk, kk * a, w, scale, initial_state, output_final_state, cu_seqlens)


def fused_addcmul_rwkv7(hidden_states, delta, xr, xw, xk, xv, xa, xg=None):
    """``fla.ops.rwkv7.fused_addcmul_rwkv7``: ``hidden + delta * x_*`` for r, w, k, v, a (and g): fla's reference."""
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7

    return torch_addcmul_rwkv7(hidden_states, delta, xr, xw, xk, xv, xa, xg)


def fused_k_rwkv7(k, a, ka, cu_seqlens=None, cu_seqlens_cpu=None):
    """``fla.ops.rwkv7.fused_k_rwkv7``: ``k + k (a - 1) k_a``, fla's reference (element-wise: no sequences)."""
    from fla.ops.rwkv7.fused_k_update import k_update_ref

    return k_update_ref(k, a, ka)


def gate_output_correction(o, r, k, r_k, v, g):
    """``fla.ops.rwkv7.gate_output_correction``: ``(o + (r k r_k summed per head) v) g``, fla's reference."""
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref

    return gate_output_correction_ref(o, r, k, r_k, v, g)


def l2_norm(x: torch.Tensor, eps: float = 1e-6, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``fla.modules.l2norm.l2_norm``: ``x / sqrt(sum(x^2) + eps)`` over the last dim, in float32."""
    y = x.float() * torch.rsqrt(x.float().square().sum(-1, keepdim=True) + eps)
    return y.to(output_dtype or x.dtype)


def squared_relu_forward(x: torch.Tensor) -> torch.Tensor:
    """``fla.modules.activations.sqrelu_fwd``: ``relu(x)^2`` in float32 (fla's is ``torch.compile``'d)."""
    return F.relu(x.float()).square().to(x.dtype)


def squared_relu_backward(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``fla.modules.activations.sqrelu_bwd``: ``2 g relu(x)``."""
    return (2.0 * g * F.relu(x.float())).to(x.dtype)
