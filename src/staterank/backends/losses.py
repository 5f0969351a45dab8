"""Pure-PyTorch versions of fla's fused cross-entropy criteria."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    logit_softcapping: float | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unreduced cross entropy with fla's logit transforms.

    Args:
        logits: ``[N, V]``.
        target: ``[N]``; entries equal to ``ignore_index`` get zero loss.
        label_smoothing: uniform label smoothing coefficient.
        logit_scale: multiplies the logits first.
        lse_square_scale: coefficient of the z-loss ``lse^2`` added to the loss.
        logit_softcapping: if set, logits become ``c * tanh(logits / c)`` after scaling.
        ignore_index: target value excluded from the loss.

    Returns:
        ``loss`` ``[N]`` (including the z-loss) and ``z_loss`` ``[N]``, in float32 (float64 for float64 logits).
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) * logit_scale
    if logit_softcapping is not None:
        z = logit_softcapping * torch.tanh(z / logit_softcapping)
    valid = target != ignore_index
    # F.cross_entropy's label smoothing is fla's: lse - (1 - s) * z_target - s * mean(z).
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction='none', label_smoothing=label_smoothing)
    z_loss = torch.where(valid, lse_square_scale * torch.logsumexp(z, dim=-1).square(), 0.0)
    return loss + z_loss, z_loss


def fused_cross_entropy_forward(
    self: nn.Module,
    input: torch.Tensor,
    target: torch.Tensor,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """CPU version of ``fla.modules.FusedCrossEntropyLoss.forward`` (logits ``[N, V]``, target ``[N]``)."""
    if self.process_group is not None:
        raise NotImplementedError("Vocabulary-parallel cross entropy is not supported by the CPU backend.")
    loss, z_loss = cross_entropy(
        input, target, self.label_smoothing, self.logit_scale, self.lse_square_scale, self.logit_softcapping,
        self.ignore_index,
    )
    if self.reduction != 'none':
        loss, z_loss = loss.sum(), z_loss.sum()
        if self.reduction == 'mean':
            total = (target != self.ignore_index).sum()
            loss, z_loss = loss / total, z_loss / total
    return (loss, z_loss) if self.return_z_loss else loss


def fused_linear_cross_entropy_forward(
    self: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """CPU version of ``fla.modules.FusedLinearCrossEntropyLoss.forward``: ``CE(x @ weight^T + bias, target)``.

    ``x`` is ``[..., H]`` and ``target`` ``[...]``; returns a scalar. The mean is over non-ignored targets (at least
    one, as in fla), and L2Warp, if enabled, is normalised by the total number of tokens.
    """
    if self.process_group is not None:
        raise NotImplementedError("Vocabulary-parallel cross entropy is not supported by the CPU backend.")
    target = target.reshape(-1)
    logits = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    loss, _ = cross_entropy(
        logits, target, self.label_smoothing, self.logit_scale, 0.0, self.logit_softcapping, self.ignore_index,
    )
    loss = loss.sum()
    if self.reduction == 'mean':
        loss = loss / (target != self.ignore_index).sum().clamp_min(1)
    if self.use_l2warp:
        # fla is an optional dependency of the package; this code only runs through fla's patched criterion.
        from fla.modules.l2warp import l2_warp

        loss = l2_warp(loss, logits.unsqueeze(0), self.l2_penalty_factor)
    return loss
