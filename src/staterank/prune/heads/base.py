"""Head criteria: which linear-attention heads to remove, from a profile of their states."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from staterank.errors import StaterankError
from staterank.registry import Registry


class HeadCriterionError(StaterankError):
    """An unknown head criterion or option, or a ratio, unit or scope that cannot be honoured."""


@dataclass
class HeadProfile:
    """Per-head state statistics at the final calibration position, mean over samples.

    Heads of all linear-attention layers side by side, in (layer, value head) order.
    """

    order: list[tuple[int, int]]  # (layer, value head) of each entry
    effective_rank: torch.Tensor  # [heads]  number of singular values > eps * largest
    nuclear_norm: torch.Tensor  # [heads]  sum of singular values


#: The head criteria by name; ``register`` is the class decorator that adds one.
HEAD_CRITERIA: Registry[HeadCriterion] = Registry("head criterion", HeadCriterionError)
register = HEAD_CRITERIA.register


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(x - min) / (max - min) over all heads; all zeros when every head has the same value."""
    values = values.double()
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


@dataclass
class HeadCriterion(ABC):
    """Scores heads; the driver removes the highest-scoring ones (``remove_lowest`` flips that)."""

    name: ClassVar[str]
    needs_profile: ClassVar[bool] = True
    remove_lowest: ClassVar[bool] = False

    @abstractmethod
    def score(self, profile: HeadProfile | None, num_heads: int, generator: torch.Generator) -> torch.Tensor:
        """Scores [heads] (higher: removed first, unless ``remove_lowest``)."""
