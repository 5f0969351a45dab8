"""Head pruning: remove whole linear-attention heads whose states saturate (JRNP) and its ablations.

Without grouping (DeltaNet, Gated DeltaNet with num_v_heads == num_heads) the removable unit is a
head: its value state goes with its key head. With grouped value heads (Qwen3-Next, Qwen3.5,
grouped Gated DeltaNet) every key head must keep the same number of value heads, so the unit is
either a value head, the same number removed from every group (the highest-scoring of each), or a
whole key head with all its value heads (scored by their mean); the one closest to the ratio wins.
The count is the whole number nearest to ratio x units; a ratio that removes nothing or misses by
more than TOLERANCE (relative) is refused with the ratios that work, never silently changed.

    criterion = get_head_criterion("jrnp", alpha=0.5)
    result = prune_heads(loaded, criterion, ratio=0.25, data="techdocs")
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from staterank.data import load_sequences
from staterank.loading import LoadedModel
from staterank.models import LayerShape, PruningShapeError
from staterank.options import PruneOptions, resolve
from staterank.prune.heads import jrnp, random  # noqa: F401  (they register themselves)
from staterank.prune.heads.base import HEAD_CRITERIA, HeadCriterion, HeadCriterionError, HeadProfile, register

__all__ = [
    "HEAD_CRITERIA",
    "HeadCriterion",
    "HeadCriterionError",
    "HeadProfile",
    "HeadPruningResult",
    "SCOPES",
    "UNITS",
    "check_head_options",
    "check_ratio",
    "check_unit",
    "get_head_criterion",
    "heads_to_remove",
    "heads_to_remove_globally",
    "plan_global_removal",
    "plan_removal",
    "prune_heads",
    "register",
]

#: The criterion registered as a name, with its options set (HeadCriterionError for unknown names or options).
get_head_criterion = HEAD_CRITERIA.get


#: How far (relative) the fraction of heads actually removed may be from the requested ratio.
TOLERANCE = 0.25
#: The removable units: ``"auto"`` takes whichever of the two comes closest to the ratio.
UNITS = ("auto", "value", "key")
#: Where heads are counted: the same number in every layer, or ranked over the whole model.
SCOPES = ("layer", "global")


@dataclass
class HeadPruningResult:
    removed: dict[int, list[int]]  # layer -> removed value heads
    scores: dict[int, list[float]]  # layer -> score of every value head
    profile_tokens: int
    seconds: float
    unit: str  # "head" (one value head per key head), "value_head" or "key_head" (with all its value heads)
    kept_ratio: float  # the fraction of value heads actually removed


def nearest_count(ratio: float, units: int) -> int:
    """The whole number of ``units`` nearest to ``ratio * units``; a tie goes to the smaller."""
    return math.ceil(ratio * units - 0.5 - 1e-9)


def honoured(ratio: float, count: int, units: int) -> bool:
    """Whether removing ``count`` of ``units`` removes something and stays within TOLERANCE of ``ratio``."""
    return 0 < count < units and abs(count / units - ratio) <= TOLERANCE * ratio + 1e-9


def _fractions(units: int) -> str:
    """The ratios that remove a whole number of ``units``: '0.25, 0.5, 0.75' or 'multiples of 1/16 (0.0625)'."""
    if units <= 8:
        return ", ".join(f"{k / units:.3g}" for k in range(1, units))
    return f"multiples of 1/{units} ({1 / units:.3g})"


def check_ratio(ratio: float) -> None:
    """Refuse a ratio outside [0, 1)."""
    if not 0 <= ratio < 1:
        raise HeadCriterionError(f"--ratio must be in [0, 1), got {ratio}")


def check_unit(unit: str) -> None:
    """Refuse a removal unit other than UNITS."""
    if unit not in UNITS:
        raise HeadCriterionError(f"--unit must be one of {', '.join(UNITS)}, got {unit!r}")


def check_head_options(
    criterion: HeadCriterion, ratio: float, data: str | None, scope: str = "layer", unit: str = "auto"
) -> None:
    """Refuse, before any model is loaded, what no model could honour: a ratio outside [0, 1), an unknown scope
    or unit, ``--unit`` with ``--scope global``, a criterion that profiles states without calibration data.

    (The criterion checked its own options when it was built; the refusals that depend on the head layout are
    :func:`plan_removal` and :func:`plan_global_removal`.)
    """
    check_ratio(ratio)
    if scope not in SCOPES:
        raise HeadCriterionError(f"--scope must be 'layer' or 'global', got {scope!r}")
    check_unit(unit)
    if scope == "global" and unit != "auto":
        raise HeadCriterionError("--unit applies to --scope layer; --scope global removes single heads")
    if criterion.needs_profile and data is None:
        raise HeadCriterionError(f"method {criterion.name!r} profiles the heads' states: pass --data")


def _candidates(shape: LayerShape, ratio: float, unit: str) -> list[tuple[str, int, int]]:
    """The (unit, count, units) that could carry ``ratio`` in one layer: the nearest count of each unit."""
    if shape.group_size == 1:
        candidates = [("head", nearest_count(ratio, shape.num_v_heads), shape.num_v_heads)]
    else:
        candidates = []
        if unit in ("auto", "value"):
            candidates.append(("value_head", nearest_count(ratio, shape.group_size), shape.group_size))
        if unit in ("auto", "key"):
            candidates.append(("key_head", nearest_count(ratio, shape.num_k_heads), shape.num_k_heads))
    return candidates


def _global_hint(shapes: dict[int, LayerShape], ratio: float) -> str:
    """Where ranking all heads together would honour ``ratio``, say so."""
    total = sum(shape.num_v_heads for shape in shapes.values())
    grouped = any(shape.group_size > 1 for shape in shapes.values())
    count = nearest_count(ratio, total)
    removable = total - len(shapes)  # every layer keeps a head
    if grouped or not honoured(ratio, count, total) or count > removable:
        return ""
    return f"; --scope global ranks all {total} heads of the model together and honours it"


def _refusal(shape: LayerShape, ratio: float, unit: str, scope_hint: str) -> str:
    if shape.group_size == 1:
        heads = shape.num_v_heads
        what = f"layer {shape.layer} has {heads} heads, so per layer the ratios that work are {_fractions(heads)}"
    else:
        options = []
        if unit in ("auto", "value"):
            group = shape.group_size
            options.append(f"{_fractions(group)} of the {group} value heads of every key head")
        if unit in ("auto", "key"):
            keys = shape.num_k_heads
            options.append(f"{_fractions(keys)} of the {keys} key heads (with their value heads)")
        what = f"layer {shape.layer} groups value heads, so the ratios that work are " + ", or ".join(options)
    return f"--ratio {ratio} cannot be honoured: {what}{scope_hint}"


def plan_removal(shapes: dict[int, LayerShape], ratio: float, unit: str = "auto") -> dict[int, tuple[str, int]]:
    """Per layer, the unit removed and how many of it: (``"head"``, ``"value_head"`` or ``"key_head"``, count).

    From the head layout alone, so a ratio that cannot be honoured is refused before any head is scored.
    Without grouping a unit is a head. With grouped value heads it is either a value head (the same number
    from every key head) or a whole key head with all its value heads; ``unit="auto"`` takes the one whose
    fraction comes closest to ``ratio``. A ratio that removes nothing, or whose nearest whole count is more
    than TOLERANCE (relative) away, is refused with the ratios that work.
    """
    check_ratio(ratio)
    check_unit(unit)
    plan: dict[int, tuple[str, int]] = {}
    for layer, shape in shapes.items():
        if ratio == 0:
            plan[layer] = ("head", 0)
            continue
        candidates = _candidates(shape, ratio, unit)
        if all(count >= units for _, count, units in candidates):
            raise HeadCriterionError(f"ratio {ratio} removes every head of layer {layer}")
        fits = sorted(
            (c for c in candidates if honoured(ratio, c[1], c[2])), key=lambda c: abs(c[1] / c[2] - ratio)
        )  # stable: value heads before key heads on a tie
        if not fits:
            raise HeadCriterionError(_refusal(shape, ratio, unit, _global_hint(shapes, ratio)))
        kind, count, _ = fits[0]
        plan[layer] = (kind, count)
    return plan


def heads_to_remove(
    shapes: dict[int, LayerShape],
    scores: dict[int, torch.Tensor],
    ratio: float,
    remove_lowest: bool = False,
    unit: str = "auto",
) -> tuple[dict[int, list[int]], str]:
    """Per layer, the value heads to remove (the same number in every layer, :func:`plan_removal`), and the unit.

    The highest-scoring units go (the lowest with ``remove_lowest``): value heads within each key head's group,
    or whole key heads scored by the mean of their value heads. ``scores[layer]`` is [num_v_heads].
    """
    plan = plan_removal(shapes, ratio, unit)
    removed: dict[int, list[int]] = {}
    for layer, (kind, count) in plan.items():
        shape = shapes[layer]
        order = torch.argsort(scores[layer], descending=not remove_lowest, stable=True).tolist()  # removal order
        if kind == "head":
            removed[layer] = sorted(order[:count])
        elif kind == "value_head":
            groups = [[h for h in order if shape.key_head_of(h) == group] for group in range(shape.num_k_heads)]
            removed[layer] = sorted(h for members in groups for h in members[:count])
        else:
            members = torch.arange(shape.num_v_heads).reshape(shape.num_k_heads, shape.group_size)
            key_scores = scores[layer].double()[members].mean(1)  # [num_k_heads]
            keys = torch.argsort(key_scores, descending=not remove_lowest, stable=True)[:count]
            removed[layer] = sorted(members[keys].reshape(-1).tolist())
    kinds = {kind for kind, _ in plan.values()}
    return removed, (kinds.pop() if len(kinds) == 1 else "head" if not kinds else "mixed")


def plan_global_removal(shapes: dict[int, LayerShape], ratio: float) -> int:
    """How many heads ``--scope global`` removes: the whole number nearest to ratio x all heads.

    From the head layout alone. Refused where layers group their value heads, where the count removes nothing
    or misses the ratio by more than TOLERANCE, and where it exceeds what leaves every layer one head.
    """
    check_ratio(ratio)
    grouped = [layer for layer, shape in shapes.items() if shape.group_size > 1]
    if grouped:
        raise HeadCriterionError(
            f"--scope global needs one value head per key head; layers {grouped} group their value heads "
            "(use --scope layer)"
        )
    total = sum(shape.num_v_heads for shape in shapes.values())
    count = nearest_count(ratio, total)
    if ratio > 0 and not honoured(ratio, count, total):
        raise HeadCriterionError(
            f"--ratio {ratio} cannot be honoured: the model has {total} heads, so the ratios that work are "
            f"{_fractions(total)}"
        )
    if count > total - len(shapes):  # every layer keeps a head
        raise HeadCriterionError(f"ratio {ratio} would remove every head of some layers")
    return count


def heads_to_remove_globally(
    shapes: dict[int, LayerShape], scores: dict[int, torch.Tensor], ratio: float, remove_lowest: bool = False
) -> dict[int, list[int]]:
    """The :func:`plan_global_removal` count of heads, the highest-scoring (lowest with ``remove_lowest``) over
    the whole model; a layer's last head stays, and the next best elsewhere goes instead."""
    budget = plan_global_removal(shapes, ratio)
    candidates = [(float(score), layer, head) for layer, s in scores.items() for head, score in enumerate(s.tolist())]
    candidates.sort(key=lambda c: c[0], reverse=not remove_lowest)  # stable: ties keep (layer, head) order
    removed: dict[int, list[int]] = {layer: [] for layer in shapes}
    for _, layer, head in candidates:
        if budget == 0:
            break
        if len(removed[layer]) + 1 < shapes[layer].num_v_heads:  # never the last head of a layer
            removed[layer].append(head)
            budget -= 1
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
    loaded: LoadedModel, criterion: HeadCriterion, ratio: float, opts: PruneOptions | None = None, **overrides
) -> HeadPruningResult:
    """Remove the chosen heads of every linear-attention layer of ``loaded.model`` in place.

    ``opts`` (:class:`~staterank.options.PruneOptions`, or its fields as keywords): the calibration
    data, tokens, sequence length, batch size and seed of the profile, the scope and the unit.
    """
    start = time.perf_counter()
    opts = resolve(PruneOptions, opts, overrides)
    scope, unit, seed = opts.scope, opts.unit, opts.seed
    check_head_options(criterion, ratio, opts.data, scope, unit)
    adapter = loaded.adapter
    adapter.check_head_pruning()  # before any profiling
    shapes = {shape.layer: shape for shape in adapter.shapes()}
    if scope == "layer":  # refuse before profiling: the counts follow from the layout alone
        plan_removal(shapes, ratio, unit)
    else:
        plan_global_removal(shapes, ratio)

    profile, tokens = None, 0
    if criterion.needs_profile:
        profile, tokens = profile_heads(
            loaded, opts.data, opts.calib_tokens, opts.seq_len, seed, opts.batch_size, progress=opts.progress
        )
        order = profile.order
    else:
        order = [(layer, head) for layer, shape in shapes.items() for head in range(shape.num_v_heads)]
    flat = criterion.score(profile, len(order), torch.Generator().manual_seed(seed))
    scores = {layer: flat[[i for i, (owner, _) in enumerate(order) if owner == layer]] for layer in shapes}
    if scope == "layer":
        removed, removed_unit = heads_to_remove(shapes, scores, ratio, criterion.remove_lowest, unit)
        adapter.remove_heads(removed)
    else:  # the layers may end with different counts: remove_heads then writes a per-layer config
        removed, removed_unit = heads_to_remove_globally(shapes, scores, ratio, criterion.remove_lowest), "head"
        try:
            adapter.remove_heads(removed, per_layer=True)
        except PruningShapeError as e:
            raise HeadCriterionError(f"--scope global: {e}") from None
    return HeadPruningResult(
        removed=removed,
        scores={layer: s.tolist() for layer, s in scores.items()},
        profile_tokens=tokens,
        seconds=time.perf_counter() - start,
        unit=removed_unit,
        kept_ratio=sum(map(len, removed.values())) / sum(s.num_v_heads for s in shapes.values()),
    )
