"""Pure-PyTorch SwiGLU, as used by ``fla.modules.GatedMLP`` (with and without ``fuse_swiglu``), and fla's SiLU."""

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


def swish_forward(ctx, x: torch.Tensor) -> torch.Tensor:
    """``fla.modules.activations.SwishFunction.forward`` (fla's ``ACT2FN["silu"]``): ``silu(x)``, in float32."""
    ctx.save_for_backward(x)
    return F.silu(x.float()).to(x.dtype)


def swish_backward(ctx, dout: torch.Tensor) -> torch.Tensor:
    """Its backward: ``dout * sigmoid(x) (1 + x (1 - sigmoid(x)))``."""
    (x,) = ctx.saved_tensors
    s = torch.sigmoid(x.float())
    return (dout.float() * s * (1 + x.float() * (1 - s))).to(x.dtype)
