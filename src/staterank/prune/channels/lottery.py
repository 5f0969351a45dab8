"""Lottery-ticket pruning in structured form: rounds of brief fine-tuning, magnitude scoring and rewinding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from staterank.prune.channels.base import CriterionError, ScoreCriterion, as_float64, register

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


@register
@dataclass
class LotteryCriterion(ScoreCriterion):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin's lottery ticket, per q/k channel).

    The ratio is removed in ``steps`` rounds of equal channel counts. Each round starts from the original
    weights of the channels still kept (rewound), fine-tunes the q, k and v projections for ``train_steps``
    steps on the calibration data (AdamW at ``lr``), scores every kept channel by the magnitude of its
    fine-tuned q and k rows (``magnitude``: ``l2`` or ``l1``, as the criteria of those names) and keeps the
    highest. The model written is the last round's subnetwork with the original weights: the fine-tuned
    values only decide which channels survive. Recover it afterwards with ``staterank finetune``.
    """

    name = "lottery"
    trains: ClassVar[bool] = True
    steps: int = 3
    train_steps: int = 20
    lr: float = 1e-4
    magnitude: str = "l2"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.train_steps < 1:
            raise CriterionError(f"lottery: steps, train_steps must be positive, not {self.steps}, {self.train_steps}")
        if not self.lr > 0:
            raise CriterionError(f"lottery: lr must be positive, got {self.lr}")
        if self.magnitude not in ("l1", "l2"):
            raise CriterionError(f"lottery: magnitude must be l1 or l2, got {self.magnitude!r}")

    def score(self, stats: LayerStats | None, weights: tuple[Tensor, Tensor]) -> Tensor:
        w_q, w_k = map(as_float64, weights)
        if self.magnitude == "l1":
            return w_q.abs().sum(-1) + w_k.abs().sum(-1)
        return (w_q.square().sum(-1) + w_k.square().sum(-1)).sqrt()


def round_dims(head_k_dim: int, final: int, steps: int) -> list[int]:
    """The channels per head each round keeps: equal steps from ``head_k_dim`` down to ``final`` (the last)."""
    return [round(head_k_dim - (head_k_dim - final) * i / steps) for i in range(1, steps + 1)]
