"""Model-family adapters, registered by ``model_type``. One file per family."""

from __future__ import annotations

from transformers import PreTrainedModel

from staterank.errors import UnsupportedModelError
from staterank.models.base import HeadFeatures, LayerShape, ModelAdapter, PruningShapeError, StaticCacheError

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter available for each of its ``model_types``."""
    for model_type in cls.model_types:
        ADAPTERS[model_type] = cls
    return cls


def supported_families() -> str:
    return ", ".join(sorted({f"{cls.family} ({', '.join(cls.model_types)})" for cls in ADAPTERS.values()}))


def adapter_class(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class of a ``model_type`` (its class-level facts describe a checkpoint without loading it)."""
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported families: {supported_families()}"
        )
    return cls


def adapter_for(model: PreTrainedModel) -> ModelAdapter:
    """The adapter of a loaded model, chosen by its config's ``model_type``."""
    return adapter_class(getattr(model.config, "model_type", None))(model)


# Importing the family modules registers them.
from staterank.models import (  # noqa: E402, F401
    delta_net,
    gated_deltanet,
    gated_deltaproduct,
    gla,
    kda,
    kimi_linear,
    linear_attn,
    mamba2,
    olmo_hybrid,
    qwen3_5,
    qwen3_next,
    retnet,
    rwkv7,
)

__all__ = [
    "ADAPTERS",
    "HeadFeatures",
    "LayerShape",
    "ModelAdapter",
    "PruningShapeError",
    "StaticCacheError",
    "adapter_class",
    "adapter_for",
    "register",
]
