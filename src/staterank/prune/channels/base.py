"""The interface of a Q/K channel criterion, and the registry that names them (:class:`staterank.registry.Registry`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from staterank.errors import StaterankError
from staterank.registry import Registry

if TYPE_CHECKING:
    from staterank.calibrate import LayerStats


class CriterionError(StaterankError):
    """An unknown criterion or option, an impossible channel count, or statistics a criterion needs but lacks."""


#: The LayerStats fields behind each kind of statistic a criterion can need, and how to gather them.
STATISTICS: dict[str, tuple[tuple[str, ...], str]] = {
    "features": (("gram_q", "gram_k", "gram_q_normed", "gram_k_normed"), "calibrate()"),
    "inputs": (("input_sq",), "calibrate()"),
    "gradients": (("taylor_q", "taylor_k"), "calibrate(..., gradients=True)"),
}


@dataclass
class ChannelSelection:
    """The q/k channels one layer keeps, per key head."""

    index: Tensor  # [Hk, keep] LongTensor, ascending per head
    scores: Tensor | None = None  # [Hk, d_k] float64 channel scores (score-based criteria), for reports
    basis: Tensor | None = None  # [Hk, keep, d_k] orthonormal rows (rotation-based criteria): keep B q, B k


@dataclass
class ChannelCriterion(ABC):
    """Turns one layer's calibration statistics and q/k weights into the channels to keep per key head.

    Subclasses are dataclasses whose fields are the criterion's options; they implement :meth:`_select`.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[str]] = frozenset()  # keys of STATISTICS; empty: weights only
    #: fine-tunes the model between rounds of selection (lottery): needs calibration data, run by prune.lottery
    trains: ClassVar[bool] = False

    def select(
        self, stats: LayerStats | None, weights: tuple[Tensor, Tensor], keep: int, generator: torch.Generator
    ) -> ChannelSelection:
        """Choose ``keep`` channels per key head; ``weights`` are (W_q, W_k), each [Hk, d_k, hidden]."""
        d_k = weights[0].shape[1]
        if not 1 <= keep <= d_k:
            raise CriterionError(f"cannot keep {keep} of {d_k} q/k channels per head")
        for need in sorted(self.needs):
            fields, how = STATISTICS[need]
            if stats is None or any(getattr(stats, field) is None for field in fields):
                raise CriterionError(f"channel criterion {self.name!r} needs {need} statistics; gather them with {how}")
        return self._select(stats, weights, keep, generator)

    @abstractmethod
    def _select(
        self, stats: LayerStats | None, weights: tuple[Tensor, Tensor], keep: int, generator: torch.Generator
    ) -> ChannelSelection:
        """:meth:`select` after the checks."""


@dataclass
class ScoreCriterion(ChannelCriterion):
    """A criterion that scores every channel and keeps the ``keep`` highest per head."""

    @abstractmethod
    def score(self, stats: LayerStats | None, weights: tuple[Tensor, Tensor]) -> Tensor:
        """Channel scores [Hk, d_k], float64; higher means more important."""

    def _select(
        self, stats: LayerStats | None, weights: tuple[Tensor, Tensor], keep: int, generator: torch.Generator
    ) -> ChannelSelection:
        scores = self.score(stats, weights)
        return ChannelSelection(top_channels(scores, keep), scores=scores)


def top_channels(scores: Tensor, keep: int) -> Tensor:
    """The ``keep`` highest-scoring channels per head, ascending: scores [Hk, d_k] -> [Hk, keep].

    A stable sort breaks ties towards the lower index, so equal scores give the same choice on every run.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, :keep].sort(dim=-1).values


def as_float64(tensor: Tensor) -> Tensor:
    """A detached float64 copy on the CPU, where criteria compute."""
    return tensor.detach().to("cpu", torch.float64)


#: The channel criteria by name; ``register`` is the class decorator that adds one.
CHANNEL_CRITERIA: Registry[ChannelCriterion] = Registry("channel criterion", CriterionError)
register = CHANNEL_CRITERIA.register
