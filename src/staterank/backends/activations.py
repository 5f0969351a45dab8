"""Pure-PyTorch SwiGLU, as used by ``fla.modules.GatedMLP`` (with and without ``fuse_swiglu``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``silu(x) * y`` computed in (at least) float32 and returned in ``x.dtype``, like fla's kernel."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (F.silu(x.to(dtype)) * y.to(dtype)).to(x.dtype)


def swiglu_linear(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear(silu(x) * y, weight, bias)``; fla fuses the two only to save memory."""
    return F.linear(swiglu(x, y), weight, bias)
