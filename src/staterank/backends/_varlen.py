"""Helpers for fla's packed variable-length layout (``cu_seqlens``) on CPU."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# fn(*per_sequence_tensors, initial_state) -> (output [B, T, ...], final_state [B, ...] or None)
SequenceFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def map_packed_sequences(
    fn: SequenceFn,
    cu_seqlens: torch.Tensor,
    tensors: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a batched, stateful sequence op to each sequence of a packed batch.

    Args:
        fn: op taking ``len(tensors)`` tensors of shape ``[B, T, ...]`` (or ``None``) and an initial state
            ``[B, ...]`` (or ``None``), returning ``(output [B, T, ...], final_state [B, ...] or None)``.
        cu_seqlens: cumulative sequence lengths ``[N + 1]``.
        tensors: packed tensors of shape ``[1, total_tokens, ...]`` (entries may be ``None``).
        initial_state: per-sequence states ``[N, ...]`` or ``None``.

    Returns:
        the packed output ``[1, total_tokens, ...]`` and the stacked final states ``[N, ...]`` (or ``None``).
    """
    offsets = cu_seqlens.tolist()
    lengths = cu_seqlens.diff().tolist()
    if len(set(lengths)) == 1:
        # Equal lengths (e.g. one token per sequence when decoding): fold the sequences into the batch dim.
        n, length = len(lengths), lengths[0]
        folded = [None if t is None else t.reshape(n, length, *t.shape[2:]) for t in tensors]
        output, final_state = fn(*folded, initial_state)
        return output.reshape(1, n * length, *output.shape[2:]), final_state

    outputs, final_states = [], []
    for i, (start, end) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        pieces = [None if t is None else t[:, start:end] for t in tensors]
        state = None if initial_state is None else initial_state[i:i + 1]
        output, final_state = fn(*pieces, state)
        outputs.append(output)
        final_states.append(final_state)
    final_state = None if final_states[0] is None else torch.cat(final_states, dim=0)
    return torch.cat(outputs, dim=1), final_state
