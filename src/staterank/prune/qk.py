"""Q/K channel pruning: calibrate, let a criterion choose channels per head, cut the model.

Every linear-attention layer keeps d_k' = floor(d_k * (1 - ratio)) channels per key head (rounded
down to a multiple of ``align``; by default 16 or 8 where that costs at most 5% of d_k), the same
channels for q and k, so the result is a smaller valid
configuration that the stock model classes and the fused kernels run.

Removing channels changes nothing but the query scale: the kernels multiply the L2-normalised
query by d_k^-1/2, which becomes d_k'^-1/2, so each head's output grows by sqrt(d_k / d_k')
before its output RMSNorm, which cancels the factor up to the norm's epsilon. (q and k are
L2-normalised inside the kernel, so no weight rescaling could undo it.)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from staterank.calibrate import Calibration, calibrate
from staterank.data import load_sequences
from staterank.errors import StaterankError
from staterank.loading import LoadedModel
from staterank.models import ModelAdapter
from staterank.options import PruneOptions, resolve
from staterank.prune.channels import ChannelCriterion, ChannelSelection, get_criterion


class PruningOptionError(StaterankError):
    """A ratio, alignment or method option that cannot be applied."""


#: Alignments the default tries, largest first. On an H100, fla 0.6.0's kernels accept any d_k, but a
#: d_k that is not a multiple of 16 runs about as slowly as the next multiple of 16 above it (docs/RESULTS.md).
DEFAULT_ALIGNS = (16, 8)
#: The default rounds down only while that costs at most this fraction of d_k beyond floor(d_k (1 - ratio)).
ALIGN_SLACK = 0.05


def default_align(head_k_dim: int, kept: int) -> int:
    """The largest of DEFAULT_ALIGNS whose rounding drops at most ALIGN_SLACK * d_k more channels, else 1.

    d_k 128 at ratio 0.6 keeps floor(51.2) = 51 -> 48 (16-aligned); d_k 64 at ratio 0.6 keeps 25 -> 24
    (8-aligned: rounding to 16 would remove 75% where 60% was asked); d_k 16 at ratio 0.25 keeps 12.
    """
    if kept >= head_k_dim:
        return 1
    for align in DEFAULT_ALIGNS:
        aligned = kept // align * align
        if aligned >= 1 and kept - aligned <= ALIGN_SLACK * head_k_dim:
            return align
    return 1


def check_ratio_and_align(ratio: float, align: int | None = None) -> None:
    """Refuse a ratio outside [0, 1) or an alignment below 1 (``None``: the default alignment)."""
    if not 0 <= ratio < 1:
        raise PruningOptionError(f"--ratio must be in [0, 1), got {ratio}")
    if align is not None and align < 1:
        raise PruningOptionError(f"--align must be a positive integer, got {align}")


def check_channel_options(criterion: ChannelCriterion, ratio: float, align: int | None, data: str | None) -> None:
    """Refuse, before any model is loaded, what no model could honour: :func:`check_ratio_and_align`, and a
    data-driven criterion without calibration data. (The criterion checked its own options when it was built.)"""
    check_ratio_and_align(ratio, align)
    if (criterion.needs or criterion.trains) and data is None:
        raise PruningOptionError(f"method {criterion.name!r} is data-driven: pass --data")


def requested_dim(head_k_dim: int, ratio: float) -> int:
    """floor(d_k * (1 - ratio)): the channels per head that the ratio asks to keep."""
    check_ratio_and_align(ratio)
    return math.floor(head_k_dim * (1 - ratio) + 1e-9)


def kept_dim(head_k_dim: int, ratio: float, align: int | None = None) -> int:
    """Channels kept per head: floor(d_k * (1 - ratio)), rounded down to a multiple of ``align``.

    ``align=None`` takes :func:`default_align`: 16 or 8 where that costs little, unaligned otherwise.
    """
    check_ratio_and_align(ratio, align)
    kept = requested_dim(head_k_dim, ratio)
    if align is None:
        align = default_align(head_k_dim, kept)
    kept = kept // align * align
    if kept < 1:
        raise PruningOptionError(
            f"ratio {ratio} with alignment {align} leaves no q/k channel of the {head_k_dim} per head"
        )
    return kept


@dataclass
class ChannelPruningResult:
    """What was kept, and the numbers ``pruning.json`` records."""

    selections: dict[int, ChannelSelection]
    head_k_dim_before: int
    head_k_dim_after: int
    calibration: Calibration | None
    seconds: float
    requested_k_dim: int  # floor(d_k (1 - ratio)), before alignment
    align: int  # the alignment applied (the default's choice where none was given)
    rotated: bool = False
    notes: list[str] = field(default_factory=list)
    rounds: list[dict] | None = None  # lottery: every round's channel count, losses and kept channels
    calibration_tokens: int = 0  # tokens of calibration data read (the statistics', or lottery's fine-tuning)

    def kept(self) -> dict[str, dict[str, list[int]]]:
        return {
            str(layer): {str(head): row.tolist() for head, row in enumerate(selection.index)}
            for layer, selection in self.selections.items()
        }


def _rotate(adapter: ModelAdapter, layer: int, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """New q/k rows and kernels for a head-wise orthonormal basis [Hk, d', d_k] (PCA).

    The rows are exact: W' = U W. The depthwise convolution and SiLU come between the projection
    and the features, and a rotation commutes with neither. The best per-channel kernel for a new
    direction u, if the old channels' outputs were uncorrelated, is the u^2-weighted mean of their
    kernels, which is exact when the kernels agree; SiLU is left as it is. ``benchmarks`` measures
    the resulting feature error.
    """
    q_rows, k_rows = adapter.qk_weights(layer)  # [Hk, d_k, hidden]
    basis = basis.to(q_rows.device, torch.float64)
    new = [torch.einsum("hed,hdi->hei", basis, rows.double()) for rows in (q_rows, k_rows)]
    kernels = adapter.qk_conv_weights(layer)
    if kernels is not None:
        new += [torch.einsum("hed,hdw->hew", basis.square(), kernel.double()) for kernel in kernels]
    return tuple(new)


def prune_channels(
    loaded: LoadedModel, method: str, ratio: float, opts: PruneOptions | None = None, **overrides
) -> ChannelPruningResult:
    """Prune the q/k channels of every linear-attention layer of ``loaded.model`` in place.

    ``opts`` (:class:`~staterank.options.PruneOptions`, or its fields as keywords): the calibration
    data, tokens, sequence length, batch size and seed, the alignment and the method's options.
    """
    start = time.perf_counter()
    opts = resolve(PruneOptions, opts, overrides)
    data, align, seed = opts.data, opts.align, opts.seed
    adapter = loaded.adapter
    adapter.check_channel_pruning()  # before any calibration
    criterion = get_criterion(method, **opts.options)
    check_channel_options(criterion, ratio, align, data)
    dims = {shape.head_k_dim for shape in adapter.shapes()}
    if len(dims) != 1:
        raise PruningOptionError(f"layers differ in d_k ({sorted(dims)}); channel pruning needs one d_k")
    head_k_dim = dims.pop()
    new_dim = kept_dim(head_k_dim, ratio, align)

    requested = requested_dim(head_k_dim, ratio)

    def result(selections, calibration, **extra) -> ChannelPruningResult:
        return ChannelPruningResult(
            selections=selections,
            head_k_dim_before=head_k_dim,
            head_k_dim_after=new_dim,
            calibration=calibration,
            seconds=time.perf_counter() - start,
            requested_k_dim=requested,
            align=align if align is not None else default_align(head_k_dim, requested),
            **extra,
        )

    calibration = None
    generator = torch.Generator().manual_seed(seed)
    if criterion.trains:  # lottery: rounds of fine-tuning, magnitude scoring and rewinding
        from staterank.prune.lottery import lottery_rounds

        sequences = load_sequences(
            data, loaded.tokenizer, opts.seq_len, max_tokens=opts.calib_tokens, shuffle=True, seed=seed
        )
        selections, rounds = lottery_rounds(
            loaded, criterion, head_k_dim, new_dim, sequences, opts.batch_size, seed, opts.progress, generator
        )
        adapter.keep_qk_channels({layer: s.index for layer, s in selections.items()})
        return result(selections, None, rounds=rounds, calibration_tokens=int(sequences.numel()))
    if criterion.needs:
        sequences = load_sequences(
            data, loaded.tokenizer, opts.seq_len, max_tokens=opts.calib_tokens, shuffle=True, seed=seed
        )
        gradients, batch_size = "gradients" in criterion.needs, opts.batch_size
        calibration = calibrate(adapter, sequences, batch_size=batch_size, gradients=gradients, progress=opts.progress)

    selections = {}
    for layer in adapter.linear_layers():
        stats = calibration[layer] if calibration is not None else None
        weights = tuple(w.detach().float().cpu() for w in adapter.qk_weights(layer))
        selections[layer] = criterion.select(stats, weights, new_dim, generator)

    rotations = {layer: _rotate(adapter, layer, s.basis) for layer, s in selections.items() if s.basis is not None}
    adapter.keep_qk_channels({layer: s.index for layer, s in selections.items()})
    for layer, new in rotations.items():
        views = adapter.qk_weights(layer) + (adapter.qk_conv_weights(layer) or ())
        for view, values in zip(views, new, strict=True):
            view.copy_(values.to(view.dtype))
    return result(
        selections, calibration, rotated=bool(rotations), calibration_tokens=calibration.tokens if calibration else 0
    )
