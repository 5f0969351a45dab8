"""Pure-PyTorch short causal depthwise convolution with fla's conv-state cache.

The cache of a sequence is ``[D, W]``: the last ``W`` convolution *inputs* (after the projection, before the
convolution), oldest first, so ``cache[:, -1]`` is the most recent token. A prefill with an initial cache
convolves ``cat(cache[:, 1:], x)``; a decode step shifts the new token in and convolves the whole window.
Activation (SiLU) is applied before the optional residual is added, as in fla's kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from staterank.backends._varlen import map_packed_sequences


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation in ('silu', 'swish'):
        return F.silu(y)
    if activation is not None:
        raise ValueError(f"Unsupported activation `{activation}`, expected 'silu', 'swish' or None.")
    return y


def _causal_conv1d_dense(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[B, T, D]``, residual ``[B, T, D]``, initial_state ``[B, D, W]``, weight ``[D, W]`` -> (y, final state)."""
    B, _, D = x.shape
    W = weight.shape[1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    history = x.new_zeros(B, D, W) if initial_state is None else initial_state.to(x.dtype)
    window = torch.cat((history, x.transpose(1, 2)), dim=-1)  # [B, D, W + T]

    y = F.conv1d(
        window[..., 1:].to(dtype),
        weight.to(dtype).unsqueeze(1),
        None if bias is None else bias.to(dtype),
        groups=D,
    ).transpose(1, 2)
    y = _activate(y, activation)
    if residual is not None:
        y = y + residual.to(dtype)
    return y.to(x.dtype), window[..., -W:].contiguous()


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool | None = False,
    activation: str | None = None,
    backend: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    cp_context: object | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.modules.causal_conv1d.causal_conv1d``.

    Args:
        x: ``[B, T, D]`` (``B == 1`` with ``cu_seqlens``).
        weight: ``[D, W]``.
        bias: ``[D]`` or ``None``.
        residual: ``[B, T, D]`` added after the activation, or ``None``.
        initial_state: cache ``[N, D, W]`` or ``None`` (zeros).
        output_final_state: whether to return the updated cache ``[N, D, W]``.
        activation: ``'silu'`` / ``'swish'`` or ``None``.
        backend: ignored (there is only one CPU implementation).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences, or ``None``.

    Returns:
        ``y`` ``[B, T, D]`` in ``x.dtype`` and the final cache ``[N, D, W]`` in ``x.dtype`` (or ``None``).
    """
    if cp_context is not None:
        raise NotImplementedError("Context parallelism is not supported by the CPU backend.")
    if weight is None:
        raise ValueError("The CPU causal_conv1d requires `weight`.")

    def run(x, residual, h0):
        return _causal_conv1d_dense(x, residual, h0, weight, bias, activation)

    if cu_seqlens is None:
        y, final_state = run(x, residual, initial_state)
    else:
        y, final_state = map_packed_sequences(run, cu_seqlens, (x, residual), initial_state)
    return y, (final_state if output_final_state else None)


def causal_conv1d_update(
    x: torch.Tensor,
    cache: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step of the convolution, updating ``cache`` ``[N, D, W]`` in place (like fla's kernel).

    ``x`` holds one token per sequence: ``[N, D]``, ``[N, 1, D]`` or ``[1, N, D]`` (packed); ``residual`` alike.
    Returns ``y`` shaped like ``x`` and the (same) cache tensor.
    """
    D = cache.shape[1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    window = torch.cat((cache[..., 1:], x.reshape(-1, D, 1).to(cache.dtype)), dim=-1)  # [N, D, W]

    y = (window.to(dtype) * weight.to(dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(dtype)
    y = _activate(y, activation)
    if residual is not None:
        y = y + residual.reshape(-1, D).to(dtype)
    cache.copy_(window)
    return y.to(x.dtype).reshape(x.shape), cache


def short_convolution_forward(
    self: nn.Conv1d,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    cache: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.modules.ShortConvolution.forward`` (x ``[B, T, D]``, cache ``[N, D, W]``)."""
    B, T, _ = x.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if mask is not None:
        if cu_seqlens is not None:
            raise ValueError("`mask` and `cu_seqlens` cannot be provided at the same time")
        x = x * mask.unsqueeze(-1)

    # Same branching as fla: grad-free single-token calls update the cache in place.
    if not torch.is_grad_enabled() and B * T == N and (cu_seqlens is None or bool((cu_seqlens.diff() == 1).all())):
        return short_convolution_step(self, x, residual, cache, output_final_state, cu_seqlens)
    return causal_conv1d(
        x=x,
        weight=self.weight.squeeze(1),
        bias=self.bias,
        residual=residual,
        initial_state=cache,
        output_final_state=output_final_state,
        activation=self.activation,
        cu_seqlens=cu_seqlens,
    )


def short_convolution_step(
    self: nn.Conv1d,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    cache: torch.Tensor | None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU version of ``fla.modules.ShortConvolution.step`` (one token per sequence)."""
    B, _, D = x.shape
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if cache is None:
        cache = x.new_zeros(N, D, self.kernel_size[0])
    y, cache = causal_conv1d_update(
        x=x,
        cache=cache,
        residual=residual,
        weight=self.weight.squeeze(1),
        bias=self.bias,
        activation=self.activation,
    )
    return y, (cache if output_final_state else None)
