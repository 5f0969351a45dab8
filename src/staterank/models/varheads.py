"""Models whose linear-attention layers keep different numbers of heads (head pruning with ``--scope global``).

A stock configuration holds one head count for every layer. A model pruned layer by layer is saved with
``model_type`` ``staterank_<family>`` and ``staterank_layer_heads`` = {layer: [key heads, value heads]}, its
other fields those of the family with the largest count of any layer. ``import staterank`` registers these
types with transformers' Auto classes, so ``AutoModelForCausalLM.from_pretrained`` loads them: it builds the
family's stock model at the largest count, cuts every layer down to its own count (the adapter's head
surgery, :meth:`~staterank.models.base.ModelAdapter.keep_heads`), then loads the weights. The family's adapter says
which config fields hold the head counts (:meth:`~staterank.models.base.ModelAdapter.head_count_fields`) and names
its per-layer type (``per_layer_model_type``); :meth:`~staterank.models.base.ModelAdapter.remove_heads` with
``per_layer=True`` writes the config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from staterank.models.per_layer import NOT_BASE_FIELDS, StaterankDeltaNetConfig, StaterankGatedDeltaNetConfig


def _base_config(config: PretrainedConfig) -> PretrainedConfig:
    fields = {k: v for k, v in config.to_dict().items() if k not in NOT_BASE_FIELDS}
    return AutoConfig.for_model(config.base_model_type, **fields)


def build(config: PretrainedConfig):
    """The model of a per-layer-heads config, with freshly initialised weights."""
    from staterank.loading import prepare_runtime
    from staterank.models import adapter_for

    prepare_runtime(config.base_model_type)
    model = AutoModelForCausalLM.from_config(_base_config(config))
    adapter = adapter_for(model)
    for layer, (num_k, num_v) in config.staterank_layer_heads.items():
        shape = adapter.layer_shape(int(layer))
        if (num_k, num_v) != (shape.num_k_heads, shape.num_v_heads):
            adapter.keep_heads(int(layer), torch.arange(num_k), torch.arange(num_v))
    model.config = config  # what describes the model now, and what save_pretrained writes
    return model


class _PerLayerHeadsModel:
    """What the Auto classes instantiate for a ``staterank_*`` config: the family's model, cut per layer."""

    config_class: type[PretrainedConfig]

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs):
        return build(config)

    _from_config = from_config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *args, config: PretrainedConfig | None = None, **kwargs):
        from safetensors.torch import load_file

        path = Path(path)
        config = config if isinstance(config, PretrainedConfig) else cls.config_class.from_pretrained(path)
        model = build(config)
        index = path / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        state = {}
        for name in files:
            state.update(load_file(path / name))
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
        if unexpected or set(missing) - tied:
            raise ValueError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
        if set(missing) & tied:
            model.tie_weights()
        dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
        if isinstance(dtype, torch.dtype):
            model.to(dtype)
        return model.eval()


class StaterankDeltaNetForCausalLM(_PerLayerHeadsModel):
    config_class = StaterankDeltaNetConfig


class StaterankGatedDeltaNetForCausalLM(_PerLayerHeadsModel):
    config_class = StaterankGatedDeltaNetConfig


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModelForCausalLM load ``staterank_*`` models (idempotent)."""
    for config_class, model_class in (
        (StaterankDeltaNetConfig, StaterankDeltaNetForCausalLM),
        (StaterankGatedDeltaNetConfig, StaterankGatedDeltaNetForCausalLM),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
