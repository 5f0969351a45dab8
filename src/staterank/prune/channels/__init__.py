"""Q/K channel criteria: per layer and key head, which of the d_k channels q and k keep.

One file, one class per criterion (a dataclass whose fields are its options), registered by name::

    criterion = get_criterion("rrqr", f=2.0)
    selection = criterion.select(stats, adapter.qk_weights(layer), keep, generator)  # selection.index [Hk, keep]
"""

from __future__ import annotations

from staterank.prune.channels import l1, l2, lottery, pca, random, rrqr, taylor, wanda  # noqa: F401  (they register themselves)
from staterank.prune.channels.base import (
    CHANNEL_CRITERIA,
    ChannelCriterion,
    ChannelSelection,
    CriterionError,
    ScoreCriterion,
    register,
)

#: The criterion registered as a name, with its options set (CriterionError for unknown names or options).
get_criterion = CHANNEL_CRITERIA.get

__all__ = ["CHANNEL_CRITERIA", "ChannelCriterion", "ChannelSelection", "CriterionError", "ScoreCriterion",
           "get_criterion", "register"]  # fmt: skip
