"""Mamba-2's state space dual (SSD) in chunked matrix form, for fla's ``Mamba2`` layer without ``mamba_ssm``.

Per head the state is ``[head_dim, d_state]`` with a scalar decay per token and B, C shared within a group::

    h_t = exp(A dt_t) h_{t-1} + (dt_t x_t) B_t^T          y_t = h_t C_t + D x_t

Without the ``mamba_ssm`` package fla's layer falls back to a PyTorch SSD that broadcasts a
``[batch, chunks, chunk, chunk, heads, d_state]`` product before summing it, several GB a layer at training
shapes. :func:`ssd` computes the same chunked form with matrix products: the chunks' diagonal blocks as masked
``C B^T`` scores, the states at chunk ends, one small recurrence over chunks, then what each token reads of its
chunk's initial state. :func:`torch_forward` is the layer's PyTorch forward with that SSD for every call
without a cache to read (training, evaluation, prefill); a one-token decoding step keeps fla's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: tokens per chunk when the layer gives none
CHUNK = 64


def _segment_sum(log_decay: torch.Tensor) -> torch.Tensor:
    """``[..., L]`` -> ``[..., L, L]``: entry ``(t, s)`` the sum of ``log_decay[s+1 .. t]`` for ``s <= t``, -inf
    above the diagonal (differences of a cumulative sum would lose the small sums next to large ones)."""
    length = log_decay.shape[-1]
    strict = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril(-1)
    summed = log_decay[..., None, :].expand(*log_decay.shape, length).transpose(-1, -2)  # [.., t, s] = w[t]
    summed = summed.masked_fill(~strict, 0.0).cumsum(-2)
    inclusive = torch.ones(length, length, dtype=torch.bool, device=log_decay.device).tril()
    return summed.masked_fill(~inclusive, float("-inf"))


def ssd(
    x: torch.Tensor,
    log_decay: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk: int = CHUNK,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD rule above in float32: ``x`` ``[b, T, h, p]`` (already times dt), ``log_decay`` ``[b, T, h]``
    (``A dt``), ``B`` and ``C`` ``[b, T, g, n]`` shared by the ``h / g`` heads of each group. Returns ``y``
    ``[b, T, h, p]`` (without the D term) and the final states ``[b, h, p, n]``. Autocast is held off: the
    decays' exponentials and the chunk scores stay in float32 under a bfloat16 training step."""
    with torch.autocast(x.device.type, enabled=False):
        return _ssd(x, log_decay, B, C, chunk, initial_state)


def _ssd(x, log_decay, B, C, chunk, initial_state):
    batch, seq, heads, _ = x.shape
    groups = B.shape[2]
    pad = -seq % chunk
    x, B, C = (F.pad(t.float(), (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    log_decay = F.pad(log_decay.float(), (0, 0, 0, pad))  # padding: decay 1, no input, no read
    B, C = (t.repeat_interleave(heads // groups, dim=2) for t in (B, C))
    x, B, C = (t.unflatten(1, (-1, chunk)) for t in (x, B, C))  # [b, c, l, h, .]
    log_decay = log_decay.unflatten(1, (-1, chunk)).permute(0, 3, 1, 2)  # [b, h, c, l]
    cumulative = log_decay.cumsum(-1)

    # within each chunk: y_t = sum_{s <= t} exp(sum w[s+1..t]) (C_t . B_s) x_s
    scores = torch.einsum("bclhn,bcshn->bhcls", C, B) * _segment_sum(log_decay).exp()
    y = torch.einsum("bhcls,bcshp->bclhp", scores, x)
    # each chunk's own state at its end, then the states before every chunk, one chunk after another
    to_end = (cumulative[..., -1:] - cumulative).exp()  # [b, h, c, l]
    own = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, x)
    state = x.new_zeros(batch, heads, x.shape[-1], B.shape[-1]) if initial_state is None else initial_state.float()
    chunk_decay = cumulative[..., -1].exp()  # [b, h, c]
    starts = []
    for n in range(own.shape[1]):
        starts.append(state)
        state = chunk_decay[:, :, n, None, None] * state + own[:, n]
    starts = torch.stack(starts, 1)  # [b, c, h, p, n]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", C, starts, cumulative.exp())
    return y.flatten(1, 2)[:, :seq], state


def torch_forward(
    self, input_states: torch.Tensor, last_state: dict | None = None, use_cache: bool = False, attention_mask=None
):
    """``fla.layers.mamba2.Mamba2.torch_forward`` with :func:`ssd` for every call without a cache to read; the
    one-token decoding step (``last_state`` given) is fla's."""
    from fla.layers.mamba2 import Mamba2

    from staterank.backends.patch import original

    if last_state is not None:
        fla_forward = original(Mamba2.torch_forward)  # fla's own, under the patch's dispatcher
        return fla_forward(self, input_states, last_state, use_cache, attention_mask)
    batch, seq, _ = input_states.shape
    dtype = input_states.dtype
    projected = self.in_proj(input_states)
    groups_state = self.n_groups * self.ssm_state_size
    d_mlp = (projected.shape[-1] - 2 * self.intermediate_size - 2 * groups_state - self.num_heads) // 2
    _, _, gate, xBC, dt = projected.split([d_mlp, d_mlp, self.intermediate_size, self.conv_dim, self.num_heads], -1)
    masked = attention_mask is not None and attention_mask.shape == xBC.shape[:2]
    padding_zeroed = (lambda t: (t * attention_mask[:, :, None]).to(t.dtype)) if masked else (lambda t: t)
    xBC = padding_zeroed(xBC)  # before the convolution and after it, as fla's forward does
    new_conv_state = F.pad(xBC.transpose(1, 2), (self.conv_kernel_size - seq, 0)) if use_cache else None
    xBC = padding_zeroed(self.act(self.conv1d(xBC.transpose(1, 2))[..., :seq].transpose(1, 2)))
    x, B, C = xBC.split([self.intermediate_size, groups_state, groups_state], -1)
    dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(self.dt_limit[0], self.dt_limit[1])
    x = x.reshape(batch, seq, self.num_heads, self.head_dim).float()
    y, ssm_state = ssd(
        x * dt[..., None],
        -torch.exp(self.A_log.float()) * dt,
        B.reshape(batch, seq, self.n_groups, -1),
        C.reshape(batch, seq, self.n_groups, -1),
        self.chunk_size or CHUNK,
    )
    y = (y + x * self._get_D(expand_to_head_dim=True)).reshape(batch, seq, -1)
    scan_output = self.norm(y, gate) if self.rmsnorm else y * self.act(gate)
    return self.out_proj(scan_output.to(dtype)), new_conv_state, ssm_state
