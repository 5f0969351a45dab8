"""Per-layer head-count configs (``staterank_*`` model types): what a model whose linear-attention layers keep
different numbers of heads is saved with. :mod:`staterank.models.varheads` builds and loads such models.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class StaterankDeltaNetConfig(PretrainedConfig):
    """fla ``delta_net`` fields plus ``staterank_layer_heads``."""

    model_type = "staterank_delta_net"
    base_model_type = "delta_net"


class StaterankGatedDeltaNetConfig(PretrainedConfig):
    """fla ``gated_deltanet`` fields plus ``staterank_layer_heads``."""

    model_type = "staterank_gated_deltanet"
    base_model_type = "gated_deltanet"


CONFIGS = {cls.base_model_type: cls for cls in (StaterankDeltaNetConfig, StaterankGatedDeltaNetConfig)}
NOT_BASE_FIELDS = ("model_type", "staterank_layer_heads", "architectures", "transformers_version", "auto_map")


def to_per_layer_heads(model, adapter) -> None:
    """Describe a model whose layers were cut to different head counts with a ``staterank_*`` config."""
    base_type = model.config.model_type.removeprefix("staterank_")
    if base_type not in CONFIGS:
        raise ValueError(f"per-layer head counts are supported for {', '.join(CONFIGS)}, not {base_type}")
    shapes = adapter.shapes()
    num_k, num_v = max(s.num_k_heads for s in shapes), max(s.num_v_heads for s in shapes)
    fields = {k: v for k, v in model.config.to_dict().items() if k not in NOT_BASE_FIELDS}
    fields.update(adapter.head_count_fields(num_k, num_v))
    layer_heads = {str(s.layer): [s.num_k_heads, s.num_v_heads] for s in shapes}
    model.config = CONFIGS[base_type](**fields, staterank_layer_heads=layer_heads)
