"""The public Python API. The command line is a thin layer over these functions."""

from __future__ import annotations

import os

import torch

from staterank import distributed
from staterank import evaluate as evaluation
from staterank.errors import StaterankError
from staterank.io import check_output, output_dir, write_json
from staterank.loading import LoadedModel, load
from staterank.modelcard import model_facts, prune_card, source_name, write_model_card
from staterank.validate import positive_float, positive_int

TASKS = ("ppl", "ppl-by-position", "recall", "lm-eval:TASK[,TASK...]")


def load_model(
    model: str | os.PathLike | LoadedModel,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load MODEL (a local directory, hub id or bundled name) with its tokenizer and family adapter.

    ``device_map="auto"`` spreads a model larger than one GPU over the GPUs (and CPU memory). In a
    data-parallel run (torchrun) every rank loads the model onto its own GPU, and the ranks check
    that they all loaded the same one.
    """
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        if device_map is not None and distributed.world().parallel:
            raise distributed.DistributedError(
                "--device-map spreads one model over the GPUs of one process; launch it without torchrun"
            )
        with distributed.together():
            loaded = load(
                model,
                device=distributed.device(device),
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                device_map=device_map,
            )
    distributed.check_same_model(loaded.model, str(loaded.path))
    return loaded


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


def _parse_tasks(tasks: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """Split task names into staterank's own and lm-eval's: ``["ppl", "lm-eval:arc_easy", "hellaswag"]``.

    Names after ``lm-eval:`` that are not staterank tasks belong to lm-eval, so the comma-separated
    ``--tasks ppl,lm-eval:arc_easy,hellaswag`` means what it says.
    """
    own, harness, in_harness = [], [], False
    for task in (t for item in tasks for t in item.split(",") if t):
        if task in TASKS[:3]:
            own.append(task)
            in_harness = False
        elif task.startswith("lm-eval:"):
            harness += [task.removeprefix("lm-eval:")] if task != "lm-eval:" else []
            in_harness = True
        elif in_harness:
            harness.append(task)
        else:
            raise StaterankError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    return own, harness


def evaluate(
    model: str | os.PathLike | LoadedModel,
    data: str | None = None,
    tasks: tuple[str, ...] | list[str] = ("ppl",),
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    seed: int = 0,
    lm_eval_limit: int | None = None,
    progress: bool = True,
    **load_options,
) -> dict:
    """Evaluate a model; returns the JSON of DESIGN.md section 6 (keys for the tasks run).

    ``ppl``: perplexity of ``data`` over windows of ``seq_len`` (non-overlapping, or sliding by
    ``stride``); ``ppl-by-position``: loss by position inside long windows; ``recall``: in-context
    retrieval probe (no data needed); ``lm-eval:TASK[,TASK]``: lm-evaluation-harness, in-process.
    """
    own, harness = _parse_tasks(tasks)
    if seq_len < 2:
        raise StaterankError("--seq-len must be at least 2")
    positive_int.check("--batch-size", batch_size)
    positive_int.check("--max-tokens", max_tokens, optional=True)
    positive_int.check("--lm-eval-limit", lm_eval_limit, optional=True)
    if stride is not None and not 0 < stride <= seq_len:
        raise StaterankError(f"--stride must be in [1, --seq-len], got {stride}")
    if data is None and ({"ppl", "ppl-by-position"} & set(own)):
        raise StaterankError("the ppl tasks need --data")
    if harness and distributed.world().parallel:
        raise distributed.DistributedError(
            "lm-eval tasks run in one process; launch them without torchrun (or use lm-eval's own accelerate launch)"
        )
    torch.manual_seed(seed)
    loaded = load_model(model, **load_options)
    result: dict = {"model": str(loaded.path), "data": data}
    if "ppl" in own:
        result.update(
            evaluation.perplexity(
                loaded,
                data,
                seq_len=seq_len,
                max_tokens=max_tokens,
                batch_size=batch_size,
                stride=stride,
                progress=progress,
            )
        )
    if "ppl-by-position" in own:
        result["by_position"] = evaluation.ppl_by_position(
            loaded, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size
        )
    if "recall" in own:
        result["recall"] = evaluation.recall(loaded, seed=seed, batch_size=batch_size)
    if harness:
        from staterank.lm_eval_bridge import run_lm_eval

        result["lm_eval"] = run_lm_eval(loaded, harness, limit=lm_eval_limit, batch_size=batch_size)
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
    unit: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    **load_options,
) -> dict:
    """Prune MODEL with ``method`` at ``ratio`` and write the smaller model plus ``pruning.json`` to OUT.

    Q/K channel methods (random, l1, wanda, taylor, pca, rrqr) keep floor(d_k (1 - ratio)) channels
    per head. Head methods (jrnp, heads-rank, heads-norm, heads-low-rank, heads-random) remove the
    fraction ``ratio`` of the linear-attention heads (``unit``: value heads or whole key heads where
    heads are grouped; ``"auto"`` takes the closer). ``pruning.json`` records the fraction actually
    removed as ``kept_ratio`` beside the requested ``ratio``. OUT is written atomically: an
    interrupted run leaves nothing behind.
    """
    from staterank.prune.heads import HEAD_CRITERIA, get_head_criterion, heads_to_remove, prune_heads
    from staterank.prune.qk import kept_dim, prune_channels

    check_output(out, overwrite)
    for name, value in (("--calib-tokens", calib_tokens), ("--seq-len", seq_len), ("--batch-size", batch_size)):
        positive_int.check(name, value)
    head_method = method in HEAD_CRITERIA
    if head_method:  # validate options before any loading
        options = {"alpha": alpha, **(options or {})} if method == "jrnp" else dict(options or {})
        criterion = get_head_criterion(method, **options)
        heads_to_remove({}, {}, ratio, unit=unit)
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
            unit=unit,
            progress=progress,
        )
        report.update(
            kept_ratio=heads.kept_ratio,
            unit=heads.unit,
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
            kept_ratio=1 - result.head_k_dim_after / result.head_k_dim_before,
            unit="channel",
            calib_tokens=result.calibration.tokens if result.calibration is not None else 0,
            seq_len=seq_len,
            align=result.align,
            head_k_dim_requested=result.requested_k_dim,
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
    with distributed.together():
        if distributed.is_main():
            with output_dir(out, overwrite=overwrite) as tmp:
                save_model(loaded, tmp)
                write_json(tmp / "pruning.json", report)
                card = prune_card(report, model_facts(loaded.model), str(out), source_name(model, loaded.path))
                write_model_card(tmp, card)
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
    positive_int.check("--batch-size", batch_size)
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
    with distributed.together():
        if distributed.is_main():
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


def _from_config(path: str | os.PathLike, device: str | None, dtype: torch.dtype | None) -> LoadedModel:
    """A randomly initialised model of a config (a config.json or a model directory): shapes without weights."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from staterank.errors import ModelLoadError
    from staterank.loading import default_device, prepare_runtime, read_config
    from staterank.models import adapter_for

    path = Path(path)
    if path.is_dir():
        fields = read_config(path)
    elif path.is_file():
        try:
            fields = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{path}: not a readable JSON config ({e})") from None
    else:
        raise ModelLoadError(f"{path}: no such config file or model directory")
    if "model_type" not in fields:
        raise ModelLoadError(f"{path}: the config has no model_type")
    prepare_runtime(fields["model_type"])
    run_device = torch.device(device) if device else default_device()
    dtype = dtype or (torch.bfloat16 if run_device.type == "cuda" else torch.float32)
    config = AutoConfig.for_model(**fields)
    with run_device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    return LoadedModel(model, None, adapter_for(model), path)


def bench(
    models: list[str | os.PathLike],
    out: str | os.PathLike | None = None,
    from_config: bool = False,
    batch_size: int = 8,
    seq_len: int = 2048,
    decode_batch_sizes: tuple[int, ...] = (1, 64),
    decode_steps: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    memory_budget_gib: float | None = None,
    dtype: str | None = None,
    device: str | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> dict:
    """Benchmark MODELs side by side (see :mod:`staterank.bench`); with ``from_config`` they are configs."""
    from staterank.bench import BenchError
    from staterank.bench import bench as run_bench

    if out is not None:
        check_output(out, overwrite)
    smallest_decode_batch = min(decode_batch_sizes, default=1)
    if min(batch_size, seq_len, repeats, decode_steps, smallest_decode_batch) < 1 or warmup < 0:
        raise BenchError("--batch-size, --seq-len, --repeats, decode batches and steps must be positive, --warmup >= 0")
    positive_float.check("--memory-budget-gib", memory_budget_gib, optional=True)
    torch_dtype = None
    if dtype is not None:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        if torch_dtype is None:
            raise BenchError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    loaded = [
        _from_config(m, device, torch_dtype) if from_config else load_model(m, device=device, dtype=torch_dtype)
        for m in models
    ]
    budget = int(memory_budget_gib * 2**30) if memory_budget_gib is not None else None
    try:
        result = run_bench(
            loaded,
            [str(m) for m in models],
            batch_size=batch_size,
            seq_len=seq_len,
            decode_batch_sizes=tuple(decode_batch_sizes),
            decode_steps=decode_steps,
            warmup=warmup,
            repeats=repeats,
            memory_budget_bytes=budget,
            seed=seed,
        )
    except torch.OutOfMemoryError:
        raise BenchError(
            f"out of device memory at prefill {batch_size} x {seq_len} or decode batches {list(decode_batch_sizes)}: "
            "lower --batch-size / --seq-len, or see --memory-budget-gib for the decode batch that fits"
        ) from None
    if out is not None:
        write_json(out, result, overwrite=overwrite)
    return result
