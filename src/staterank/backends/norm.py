"""Pure-PyTorch RMSNorm and gated RMSNorm with fla's fused prenorm-residual calling convention.

``norm(x, residual, prenorm=True)`` returns ``(norm(x + residual), x + residual)``: fla's blocks use it to fuse the
residual add into the norm when ``config.fuse_norm`` is set. All math is in (at least) float32; the normalised
output is cast back to ``x.dtype`` and the residual stream to ``residual.dtype`` (float32 with
``residual_in_fp32``), as the Triton kernels do.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _add_residual(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    residual_in_fp32: bool,
) -> tuple[torch.Tensor, torch.dtype]:
    """Return ``x + residual`` in the accumulation dtype and the dtype fla stores the residual stream in."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    if residual is not None:
        return h + residual.to(h.dtype), residual.dtype
    return h, torch.float32 if residual_in_fp32 else x.dtype


def _rms_normalize(h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _affine(h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps), weight, bias)


def _affine(y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``y * weight + bias`` per channel of the last dim, each if given, in ``y``'s dtype."""
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-5,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``y = (x + residual) / sqrt(mean((x + residual)^2) + eps) * weight + bias`` over the last dim.

    Returns ``y`` (``x.dtype``), or ``(y, x + residual)`` when ``prenorm``.
    """
    h, residual_dtype = _add_residual(x, residual, residual_in_fp32)
    y = _rms_normalize(h, weight, bias, eps).to(x.dtype)
    return (y, h.to(residual_dtype)) if prenorm else y


def rms_norm_gated(
    x: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    activation: str = 'swish',
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm followed by an output gate: ``rms_norm(x) * silu(g)`` (swish/silu) or ``* sigmoid(g)`` (sigmoid)."""
    h, residual_dtype = _add_residual(x, residual, residual_in_fp32)
    y = _rms_normalize(h, weight, bias, eps)
    g = g.to(h.dtype)
    if activation in ('swish', 'silu'):
        y = y * F.silu(g)
    elif activation == 'sigmoid':
        y = y * g.sigmoid()
    else:
        raise ValueError(f"Unsupported activation `{activation}`, expected 'swish', 'silu' or 'sigmoid'.")
    y = y.to(x.dtype)
    return (y, h.to(residual_dtype)) if prenorm else y


def rms_norm_forward(
    self: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU version of ``fla.modules.RMSNorm.forward``."""
    return rms_norm(x, self.weight, self.bias, residual, self.eps, prenorm, residual_in_fp32)


def fused_rms_norm_gated_forward(
    self: nn.Module,
    x: torch.Tensor,
    g: torch.Tensor,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU version of ``fla.modules.FusedRMSNormGated.forward``."""
    return rms_norm_gated(x, g, self.weight, self.bias, self.activation, residual, prenorm, residual_in_fp32, self.eps)


def grouped_rms_norm_gated_forward(self: nn.Module, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
    """CPU replacement for ``fla.modules.norm.layernorm_gated.RMSNormGated.forward`` (fla's Mamba-2 norm: RMS over
    groups of ``group_size`` channels, the SiLU gate before or after it): fla's own PyTorch reference of it."""
    from fla.modules.norm.layernorm_gated import rms_norm_ref

    return rms_norm_ref(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                        norm_before_gate=self.norm_before_gate)  # fmt: skip


def layer_norm_forward(
    self: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU version of ``fla.modules.LayerNorm.forward`` (RWKV's block norms with ``fuse_norm``)."""
    h, residual_dtype = _add_residual(x, residual, residual_in_fp32)
    y = _affine(F.layer_norm(h, h.shape[-1:], eps=self.eps), self.weight, self.bias).to(x.dtype)
    return (y, h.to(residual_dtype)) if prenorm else y


def group_norm_forward(
    self: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    prenorm: bool = False,
    residual_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU version of ``fla.modules.GroupNorm.forward``: each of ``num_groups`` equal groups of the last dim
    normalised alone (centred unless ``is_rms_norm``), then the per-channel weight and bias (RWKV-7's heads)."""
    h, residual_dtype = _add_residual(x, residual, residual_in_fp32)
    groups = h.unflatten(-1, (self.num_groups, -1))
    if not self.is_rms_norm:
        groups = groups - groups.mean(-1, keepdim=True)
    y = _rms_normalize(groups, None, None, self.eps).flatten(-2)
    y = _affine(y, self.weight, self.bias).to(x.dtype)
    return (y, h.to(residual_dtype)) if prenorm else y
