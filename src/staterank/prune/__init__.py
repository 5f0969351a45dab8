"""Pruning: the criteria that choose what a compressed model keeps.

Two registries (:class:`staterank.registry.Registry`) name them: ``channels.CHANNEL_CRITERIA`` (which q/k
channels every head keeps) and ``heads.HEAD_CRITERIA`` (which heads go).
"""

from __future__ import annotations


def check_method(method: str) -> None:
    """Refuse a ``--method`` that neither registry names, listing the methods of both."""
    from staterank.prune.channels import CHANNEL_CRITERIA, CriterionError
    from staterank.prune.heads import HEAD_CRITERIA

    if method not in CHANNEL_CRITERIA and method not in HEAD_CRITERIA:
        raise CriterionError(
            f"unknown method {method!r}; q/k channel methods: {', '.join(CHANNEL_CRITERIA.names())}; "
            f"head methods: {', '.join(HEAD_CRITERIA.names())}"
        )


def method_help() -> str:
    """Every registered method with its one-line help (``staterank prune --method``), channel methods first."""
    from staterank.prune.channels import CHANNEL_CRITERIA
    from staterank.prune.heads import HEAD_CRITERIA

    return (
        f"q/k channels (each head keeps floor(d_k (1 - ratio))): {CHANNEL_CRITERIA.describe()}. "
        f"Heads (the fraction ratio of them goes): {HEAD_CRITERIA.describe()}."
    )
