"""fla's rotary embedding (``fla.modules.rotary.rotary_embedding``) on CPU.

Each pair of channels ``(i, i + R/2)`` (or ``(2i, 2i + 1)`` when interleaved) of the first ``R`` channels of a
head is rotated by the angle of its frequency at the token's position, as ``fla.modules.rotary.rotary_embedding_ref``
states it; ``cos`` and ``sin`` are the ``[positions, R/2]`` tables of :class:`fla.modules.rotary.RotaryEmbedding`.
"""

from __future__ import annotations

import torch


def rotary_embedding(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` ``[B, T, H, D]`` rotated at positions ``seqlen_offsets + t`` (an int, or one offset per sequence)."""
    if cu_seqlens is not None:
        raise ValueError("the CPU rotary embedding cannot keep packed sequences apart (cu_seqlens)")
    positions = torch.arange(x.shape[1], device=x.device)
    if isinstance(seqlen_offsets, torch.Tensor) and seqlen_offsets.ndim > 0:
        positions = seqlen_offsets.to(x.device)[:, None] + positions  # [B, T]
    else:
        positions = (positions + int(seqlen_offsets))[None]  # [1, T]
    c, s = (table[positions][:, :, None].float() for table in (cos, sin))  # [B or 1, T, 1, R/2]
    rotated = 2 * c.shape[-1]
    part = x[..., :rotated].float()
    if interleaved:
        x1, x2 = part[..., ::2], part[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = part.chunk(2, dim=-1)
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    y = torch.cat((out.to(x.dtype), x[..., rotated:]), dim=-1)
    if inplace:
        return x.copy_(y)
    return y
