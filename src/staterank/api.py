"""The public Python API. The command line is a thin layer over these functions."""

from __future__ import annotations

import os

import torch

from staterank import evaluate as evaluation
from staterank.errors import StaterankError
from staterank.loading import LoadedModel, load

TASKS = ("ppl",)


def load_model(
    model: str | os.PathLike | LoadedModel,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load MODEL (a local directory, hub id or bundled name) with its tokenizer and family adapter."""
    if isinstance(model, LoadedModel):
        return model
    return load(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def info(model: str | os.PathLike | LoadedModel, **load_options) -> dict:
    """Shapes, parameter count and recurrent-state bytes of a model (DESIGN.md section 6 fields)."""
    loaded = load_model(model, **load_options)
    adapter = loaded.adapter
    return {
        "path": str(loaded.path),
        "family": adapter.family,
        "model_type": loaded.model.config.model_type,
        "num_layers": len(adapter.decoder_layers()),
        "linear_layers": adapter.linear_layers(),
        "layers": [shape.as_dict() for shape in adapter.shapes()],
        "params": sum(p.numel() for p in loaded.model.parameters()),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "state_bytes_per_seq": adapter.state_bytes_per_seq(),
    }


def evaluate(
    model: str | os.PathLike | LoadedModel,
    data: str,
    tasks: tuple[str, ...] | list[str] = ("ppl",),
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    **load_options,
) -> dict:
    """Evaluate a model on ``data``; returns the JSON of DESIGN.md section 6 (keys for the tasks run)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise StaterankError(f"unknown task(s) {unknown}; available: {', '.join(TASKS)}")
    if seq_len < 2:
        raise StaterankError("--seq-len must be at least 2")
    torch.manual_seed(seed)
    loaded = load_model(model, **load_options)
    result: dict = {"model": str(loaded.path), "data": data}
    if "ppl" in tasks:
        ppl = evaluation.perplexity(
            loaded, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size, progress=progress
        )
        result.update(ppl)
    return result
