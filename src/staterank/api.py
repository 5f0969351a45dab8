"""The public Python API. The command line is a thin layer over these functions."""

from __future__ import annotations

import os

import torch

from staterank import evaluate as evaluation
from staterank.errors import StaterankError
from staterank.io import check_output, output_dir, write_json
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


def save_model(loaded: LoadedModel, directory: str | os.PathLike) -> None:
    """Write a model and its tokenizer as a Hugging Face directory (safetensors weights)."""
    loaded.model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)


def prune(
    model: str | os.PathLike | LoadedModel,
    method: str,
    ratio: float,
    out: str | os.PathLike,
    data: str | None = None,
    calib_tokens: int = 32768,
    seq_len: int = 2048,
    align: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    options: dict | None = None,
    alpha: float = 0.5,
    scope: str = "layer",
    overwrite: bool = False,
    progress: bool = True,
    **load_options,
) -> dict:
    """Prune MODEL with ``method`` at ``ratio`` and write the smaller model plus ``pruning.json`` to OUT.

    Q/K channel methods (random, l1, wanda, taylor, pca, rrqr) keep floor(d_k (1 - ratio)) channels
    per head. Head methods (jrnp, heads-rank, heads-norm, heads-low-rank, heads-random) remove the
    fraction ``ratio`` of the linear-attention heads. OUT is written atomically: an interrupted run
    leaves nothing behind.
    """
    from staterank.prune.heads import HEAD_CRITERIA, get_head_criterion, heads_to_remove, prune_heads
    from staterank.prune.qk import kept_dim, prune_channels

    check_output(out, overwrite)
    head_method = method in HEAD_CRITERIA
    if head_method:  # validate options before any loading
        options = {"alpha": alpha, **(options or {})} if method == "jrnp" else dict(options or {})
        criterion = get_head_criterion(method, **options)
        heads_to_remove({}, {}, ratio)
    else:
        kept_dim(1 << 20, ratio, align)
    torch.manual_seed(seed)
    loaded = load_model(model, **load_options)
    state_bytes_before = loaded.adapter.state_bytes_per_seq()
    report = {"model": str(loaded.path), "method": method, "ratio": ratio, "seed": seed, "data": data}
    if head_method:
        heads = prune_heads(
            loaded,
            criterion,
            ratio,
            data=data,
            calib_tokens=calib_tokens,
            seq_len=seq_len,
            seed=seed,
            batch_size=batch_size,
            scope=scope,
            progress=progress,
        )
        report.update(
            calib_tokens=heads.profile_tokens,
            seq_len=seq_len,
            options=options,
            scope=scope,
            removed={str(layer): heads_ for layer, heads_ in heads.removed.items()},
            scores={str(layer): values for layer, values in heads.scores.items()},
            seconds=heads.seconds,
        )
    else:
        result = prune_channels(
            loaded,
            method,
            ratio,
            data=data,
            calib_tokens=calib_tokens,
            seq_len=seq_len,
            align=align,
            seed=seed,
            batch_size=batch_size,
            options=options,
            progress=progress,
        )
        report.update(
            calib_tokens=result.calibration.tokens if result.calibration is not None else 0,
            seq_len=seq_len,
            align=align if align is not None else "auto",
            options=options or {},
            head_k_dim_before=result.head_k_dim_before,
            head_k_dim_after=result.head_k_dim_after,
            rotated=result.rotated,
            kept=result.kept(),
            seconds=result.seconds,
        )
    report.update(
        state_bytes_before=state_bytes_before,
        state_bytes_after=loaded.adapter.state_bytes_per_seq(),
        params_after=sum(p.numel() for p in loaded.model.parameters()),
    )
    with output_dir(out, overwrite=overwrite) as tmp:
        save_model(loaded, tmp)
        write_json(tmp / "pruning.json", report)
    return report


def _write_metric_csvs(result: dict, directory) -> None:
    """One CSV per metric: a row per (layer, head), a column per position (mean over samples)."""
    import csv

    from staterank.analysis import METRICS

    for metric in METRICS:
        with open(directory / f"{metric}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "head", "group", *[f"t={t}" for t in result["positions"]]])
            for layer in result["layers"]:
                for head in layer["heads"]:
                    writer.writerow([layer["layer"], head["head"], head["group"], *head[metric]])


def analyze(
    model: str | os.PathLike | LoadedModel,
    data: str | list[str],
    out: str | os.PathLike,
    samples: int = 8,
    seq_len: int = 2048,
    positions: list[int] | None = None,
    eps: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    **load_options,
) -> dict:
    """State-rank analysis of MODEL; writes rank.json, one CSV per metric and PNG plots into OUT."""
    from staterank import analysis
    from staterank.plots import analysis_plots

    check_output(out, overwrite)
    data = [data] if isinstance(data, str) else list(data)
    analysis.check_options(seq_len, positions, eps, samples)
    torch.manual_seed(seed)
    loaded = load_model(model, **load_options)
    result = analysis.analyze(
        loaded,
        data,
        samples=samples,
        seq_len=seq_len,
        positions=positions,
        eps=eps,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    with output_dir(out, overwrite=overwrite) as tmp:
        write_json(tmp / "rank.json", result.json)
        _write_metric_csvs(result.json, tmp)
        analysis_plots(
            result.json,
            result.spectra,
            tmp,
            domain_ranks=result.domain_ranks or None,
            spearman=result.cross_domain_spearman,
        )
    return result.json
