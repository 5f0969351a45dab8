"""Head pruning: remove whole linear-attention heads whose states saturate (JRNP) and its ablations.

The removable unit is a value head, i.e. one recurrent state. Without grouping (DeltaNet, Gated
DeltaNet with num_v_heads == num_heads) a value head goes with its key head. With grouped value
heads (Qwen3-Next, Qwen3.5, grouped Gated DeltaNet) every key head must keep the same number of
value heads, so the same number, round(ratio * group size), is removed from every group: the
highest-scoring ones of each group.

    criterion = get_head_criterion("jrnp", alpha=0.5)
    result = prune_heads(loaded, criterion, ratio=0.2, data="techdocs")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch

from staterank.data import load_sequences
from staterank.loading import LoadedModel
from staterank.models import LayerShape
from staterank.prune.heads import jrnp, random  # noqa: F401  (they register themselves)
from staterank.prune.heads.base import HEAD_CRITERIA, HeadCriterion, HeadCriterionError, HeadProfile, register

__all__ = [
    "HEAD_CRITERIA",
    "HeadCriterion",
    "HeadCriterionError",
    "HeadProfile",
    "HeadPruningResult",
    "get_head_criterion",
    "heads_to_remove",
    "heads_to_remove_globally",
    "prune_heads",
    "register",
]


def get_head_criterion(name: str, **options) -> HeadCriterion:
    if name not in HEAD_CRITERIA:
        raise HeadCriterionError(f"unknown head criterion {name!r}; available: {', '.join(sorted(HEAD_CRITERIA))}")
    cls = HEAD_CRITERIA[name]
    unknown = sorted(set(options) - {field.name for field in fields(cls)})
    if unknown:
        raise HeadCriterionError(f"{name} has no option {', '.join(unknown)}")
    return cls(**options)


@dataclass
class HeadPruningResult:
    removed: dict[int, list[int]]  # layer -> removed value heads
    scores: dict[int, list[float]]  # layer -> score of every value head
    profile_tokens: int
    seconds: float


def heads_to_remove(
    shapes: dict[int, LayerShape], scores: dict[int, torch.Tensor], ratio: float, remove_lowest: bool = False
) -> dict[int, list[int]]:
    """Per layer, the value heads to remove: the same number in every layer (and in every key group)."""
    if not 0 <= ratio < 1:
        raise HeadCriterionError(f"--ratio must be in [0, 1), got {ratio}")
    removed = {}
    for layer, shape in shapes.items():
        order = torch.argsort(scores[layer], descending=not remove_lowest, stable=True)  # removal order
        if shape.group_size == 1:
            count = round(ratio * shape.num_v_heads)
            if count >= shape.num_v_heads:
                raise HeadCriterionError(f"ratio {ratio} removes every head of layer {layer}")
            removed[layer] = sorted(order[:count].tolist())
            continue
        per_group = round(ratio * shape.group_size)
        if ratio > 0 and per_group == 0:
            raise HeadCriterionError(
                f"layer {layer}: ratio {ratio} removes less than one of the {shape.group_size} value heads per key "
                f"head; with grouped heads the ratio must remove a whole number per group (multiples of "
                f"{1 / shape.group_size:.3g})"
            )
        if per_group >= shape.group_size:
            raise HeadCriterionError(f"ratio {ratio} removes every head of layer {layer}")
        chosen = []
        for group in range(shape.num_k_heads):
            members = [h for h in order.tolist() if shape.key_head_of(h) == group]
            chosen += members[:per_group]
        removed[layer] = sorted(chosen)
    return removed


def heads_to_remove_globally(
    shapes: dict[int, LayerShape], scores: dict[int, torch.Tensor], ratio: float, remove_lowest: bool = False
) -> dict[int, list[int]]:
    """round(ratio * all heads) heads ranked over the whole model; every layer keeps at least one head."""
    if not 0 <= ratio < 1:
        raise HeadCriterionError(f"--ratio must be in [0, 1), got {ratio}")
    grouped = [layer for layer, shape in shapes.items() if shape.group_size > 1]
    if grouped:
        raise HeadCriterionError(
            f"--scope global needs one value head per key head; layers {grouped} group their value heads "
            "(use --scope layer)"
        )
    candidates = [(float(score), layer, head) for layer, s in scores.items() for head, score in enumerate(s.tolist())]
    candidates.sort(key=lambda c: c[0], reverse=not remove_lowest)  # stable: ties keep (layer, head) order
    budget = round(ratio * len(candidates))
    removed: dict[int, list[int]] = {layer: [] for layer in shapes}
    for _, layer, head in candidates:
        if budget == 0:
            break
        if len(removed[layer]) + 1 < shapes[layer].num_v_heads:  # never the last head of a layer
            removed[layer].append(head)
            budget -= 1
    if budget:
        raise HeadCriterionError(f"ratio {ratio} would remove every head of some layers")
    return {layer: sorted(heads) for layer, heads in removed.items()}


def profile_heads(
    loaded: LoadedModel,
    data: str,
    tokens: int,
    seq_len: int,
    seed: int,
    batch_size: int,
    eps: float = 1e-4,
    progress: bool = True,
) -> tuple[HeadProfile, int]:
    """Final-position effective rank and nuclear norm of every head, mean over calibration samples."""
    from staterank.analysis import collect_metrics

    sequences = load_sequences(data, loaded.tokenizer, seq_len, max_tokens=tokens, shuffle=True, seed=seed)
    values, _, order = collect_metrics(loaded, sequences, [seq_len], eps, batch_size, progress, "profile heads")
    profile = HeadProfile(
        order=order,
        effective_rank=torch.from_numpy(values["effective_rank"][:, -1].mean(0)),
        nuclear_norm=torch.from_numpy(values["nuclear_norm"][:, -1].mean(0)),
    )
    return profile, int(sequences.numel())


def prune_heads(
    loaded: LoadedModel,
    criterion: HeadCriterion,
    ratio: float,
    data: str | None = None,
    calib_tokens: int = 32768,
    seq_len: int = 2048,
    seed: int = 0,
    batch_size: int = 1,
    scope: str = "layer",
    progress: bool = True,
) -> HeadPruningResult:
    """Remove the chosen heads of every linear-attention layer of ``loaded.model`` in place."""
    start = time.perf_counter()
    if scope not in ("layer", "global"):
        raise HeadCriterionError(f"--scope must be 'layer' or 'global', got {scope!r}")
    choose = heads_to_remove if scope == "layer" else heads_to_remove_globally
    adapter = loaded.adapter
    shapes = {shape.layer: shape for shape in adapter.shapes()}
    choose(shapes, {layer: torch.zeros(s.num_v_heads) for layer, s in shapes.items()}, ratio)  # validate first
    profile, tokens = None, 0
    if criterion.needs_profile:
        if data is None:
            raise HeadCriterionError(f"method {criterion.name!r} profiles the heads' states: pass --data")
        profile, tokens = profile_heads(loaded, data, calib_tokens, seq_len, seed, batch_size, progress=progress)
        order = profile.order
    else:
        order = [(layer, head) for layer, shape in shapes.items() for head in range(shape.num_v_heads)]
    flat = criterion.score(profile, len(order), torch.Generator().manual_seed(seed))
    scores = {layer: flat[[i for i, (owner, _) in enumerate(order) if owner == layer]] for layer in shapes}
    removed = choose(shapes, scores, ratio, criterion.remove_lowest)
    if scope == "layer":
        adapter.remove_heads(removed)
    else:
        from staterank.models.varheads import to_per_layer_heads

        adapter.remove_heads(removed, per_layer=True)
        if len({(s.num_k_heads, s.num_v_heads) for s in adapter.shapes()}) > 1:
            try:
                to_per_layer_heads(loaded.model, adapter)
            except ValueError as e:
                raise HeadCriterionError(f"--scope global: {e}") from None
    return HeadPruningResult(
        removed=removed,
        scores={layer: s.tolist() for layer, s in scores.items()},
        profile_tokens=tokens,
        seconds=time.perf_counter() - start,
    )
