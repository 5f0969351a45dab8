"""The commands that run one model operation each: info, evaluate, prune, analyze, bench, and loading and
saving a model. :mod:`staterank.api` is their public face, beside train, finetune, report and demo."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path

import torch

from staterank import distributed, evaluation, layout, mqar
from staterank.backends import torch_kernels_within
from staterank.errors import StaterankError
from staterank.io import check_output, output_dir, write_json
from staterank.loading import LoadedModel, load
from staterank.modelcard import model_facts, prune_card, source_name, write_model_card
from staterank.options import (
    AnalyzeOptions,
    BenchOptions,
    EvaluateOptions,
    InfoOptions,
    PruneOptions,
    resolve,
)

TASKS = ("ppl", "ppl-by-position", "recall", "mqar", "lm-eval:TASK[,TASK...]")


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


def info(model: str | os.PathLike | LoadedModel, opts: InfoOptions | None = None, **overrides) -> dict:
    """Shapes, parameter count and recurrent-state bytes of a model (DESIGN.md section 6 fields)."""
    opts = resolve(InfoOptions, opts, overrides)
    loaded = load_model(model, **opts.load_options())
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
        if task in TASKS[:-1]:
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
    opts: EvaluateOptions | None = None,
    **overrides,
) -> dict:
    """Evaluate a model; returns the JSON of DESIGN.md section 6 (keys for the tasks run).

    ``ppl``: perplexity of ``data`` over windows of ``seq_len`` (non-overlapping, or sliding by
    ``stride``); ``ppl-by-position``: loss by position inside long windows; ``recall``: in-context
    retrieval probe (no data needed); ``mqar``: multi-query associative recall in the layout of the model's
    ``mqar.json`` (:mod:`staterank.mqar`), with ``mqar_pairs`` / ``mqar_seq_len`` / ``mqar_examples``;
    ``lm-eval:TASK[,TASK]``: lm-evaluation-harness, in-process.
    ``opts`` (an :class:`~staterank.options.EvaluateOptions`, or its fields as keywords) says the rest.
    """
    opts = resolve(EvaluateOptions, opts, overrides, data=data)
    data, seq_len, batch_size, stride = opts.data, opts.seq_len, opts.batch_size, opts.stride
    max_tokens = opts.max_tokens
    own, harness = _parse_tasks(opts.tasks)
    if stride is not None and not 0 < stride <= seq_len:
        raise StaterankError(f"--stride must be in [1, --seq-len], got {stride}")
    if data is None and ({"ppl", "ppl-by-position"} & set(own)):
        raise StaterankError("the ppl tasks need --data")
    if harness and distributed.world().parallel:
        raise distributed.DistributedError(
            "lm-eval tasks run in one process; launch them without torchrun (or use lm-eval's own accelerate launch)"
        )
    torch.manual_seed(opts.seed)
    loaded = load_model(model, **opts.load_options())
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
                progress=opts.progress,
            )
        )
    if "ppl-by-position" in own:
        result["by_position"] = evaluation.ppl_by_position(
            loaded, data, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size
        )
    if "recall" in own:
        result["recall"] = evaluation.recall(loaded, seed=opts.seed, batch_size=batch_size)
    if "mqar" in own:
        layout = mqar.read_layout(loaded.path).with_shape(opts.mqar_pairs, opts.mqar_seq_len)
        correct = mqar.accuracy(loaded.model, layout, opts.mqar_examples, opts.seed, batch_size)
        result["mqar"] = {**layout.to_json(), "examples": opts.mqar_examples, "seed": opts.seed, "accuracy": correct}
    if harness:
        from staterank.lm_eval_bridge import run_lm_eval

        result["lm_eval"] = run_lm_eval(loaded, harness, limit=opts.lm_eval_limit, batch_size=batch_size)
    return result


def save_model(loaded: LoadedModel, directory: str | os.PathLike) -> None:
    """Write a model and its tokenizer as a Hugging Face directory (safetensors weights), with the MQAR layout
    of the model it came from, if any (a pruned or recovered recall model keeps its task)."""
    loaded.model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    layout = Path(loaded.path) / mqar.LAYOUT_FILE
    if layout.is_file():
        shutil.copy(layout, Path(directory) / mqar.LAYOUT_FILE)


def prune(
    model: str | os.PathLike | LoadedModel,
    method: str,
    ratio: float,
    out: str | os.PathLike,
    opts: PruneOptions | None = None,
    **overrides,
) -> dict:
    """Prune MODEL with ``method`` at ``ratio`` and write the smaller model plus ``pruning.json`` to OUT.

    Q/K channel methods keep floor(d_k (1 - ratio)) channels per head; head methods remove the
    fraction ``ratio`` of the linear-attention heads (``unit``: value heads or whole key heads where
    heads are grouped; ``"auto"`` takes the closer). The registered methods: ``staterank prune --help``.
    ``pruning.json`` records the fraction actually removed as ``kept_ratio`` beside the requested
    ``ratio``. ``opts`` (a :class:`~staterank.options.PruneOptions`, or its fields as keywords) says
    the rest. OUT is written atomically: an interrupted run leaves nothing behind.
    """
    from staterank.prune import check_method
    from staterank.prune.channels import get_criterion
    from staterank.prune.heads import HEAD_CRITERIA, check_head_options, get_head_criterion, prune_heads
    from staterank.prune.qk import check_channel_options, prune_channels

    opts = resolve(PruneOptions, opts, overrides, method=method, ratio=ratio)
    check_output(out, opts.overwrite)
    check_method(method)  # validate the method and its options before any loading; the criteria check their own
    head_method = method in HEAD_CRITERIA
    if head_method:
        method_options = {"alpha": opts.alpha, **opts.options} if method == "jrnp" else dict(opts.options)
        criterion = get_head_criterion(method, **method_options)
        check_head_options(criterion, ratio, opts.data, opts.scope, opts.unit)
    else:
        method_options = dict(opts.options)
        check_channel_options(get_criterion(method, **method_options), ratio, opts.align, opts.data)
    torch.manual_seed(opts.seed)
    loaded = load_model(model, **opts.load_options())
    state_bytes_before = loaded.adapter.state_bytes_per_seq()
    report = {"model": str(loaded.path), "method": method, "ratio": ratio, "seed": opts.seed, "data": opts.data}
    if head_method:
        heads = prune_heads(loaded, criterion, ratio, opts)
        report.update(
            kept_ratio=heads.kept_ratio,
            unit=heads.unit,
            calib_tokens=heads.profile_tokens,
            seq_len=opts.seq_len,
            options=method_options,
            scope=opts.scope,
            removed={str(layer): heads_ for layer, heads_ in heads.removed.items()},
            scores={str(layer): values for layer, values in heads.scores.items()},
            seconds=heads.seconds,
        )
    else:
        result = prune_channels(loaded, method, ratio, opts)
        report.update(
            kept_ratio=1 - result.head_k_dim_after / result.head_k_dim_before,
            unit="channel",
            calib_tokens=result.calibration_tokens,
            seq_len=opts.seq_len,
            align=result.align,
            head_k_dim_requested=result.requested_k_dim,
            options=method_options,
            head_k_dim_before=result.head_k_dim_before,
            head_k_dim_after=result.head_k_dim_after,
            rotated=result.rotated,
            kept=result.kept(),
            seconds=result.seconds,
        )
        if result.rounds is not None:
            report.update(rounds=result.rounds, rewound="every weight: the kept channels carry the original values")
    report.update(
        state_bytes_before=state_bytes_before,
        state_bytes_after=loaded.adapter.state_bytes_per_seq(),
        params_after=sum(p.numel() for p in loaded.model.parameters()),
    )
    with distributed.together():
        if distributed.is_main():
            with output_dir(out, overwrite=opts.overwrite) as tmp:
                save_model(loaded, tmp)
                write_json(tmp / layout.PRUNING, report)
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
    opts: AnalyzeOptions | None = None,
    **overrides,
) -> dict:
    """State-rank analysis of MODEL; writes rank.json, one CSV per metric and PNG plots into OUT.

    ``opts`` (an :class:`~staterank.options.AnalyzeOptions`, or its fields as keywords) says how.
    """
    from staterank import analysis
    from staterank.plots import analysis_plots

    opts = resolve(AnalyzeOptions, opts, overrides)
    check_output(out, opts.overwrite)
    data = [data] if isinstance(data, str) else list(data)
    analysis.check_options(opts.seq_len, opts.positions, opts.eps, opts.samples)
    torch.manual_seed(opts.seed)
    loaded = load_model(model, **opts.load_options())
    # One forward per sample does not repay compiling fla's Triton kernels (about 100 s of a 126 s command at 1.3B
    # shapes on a fresh H200); staterank's PyTorch kernels compile nothing.
    kernels = torch_kernels_within("all") if opts.kernels == "torch" else contextlib.nullcontext()
    with kernels:
        result = analysis.analyze(
            loaded,
            data,
            samples=opts.samples,
            seq_len=opts.seq_len,
            positions=opts.positions,
            eps=opts.eps,
            seed=opts.seed,
            batch_size=opts.batch_size,
            progress=opts.progress,
        )
    result.json["kernels"] = opts.kernels
    with distributed.together():
        if distributed.is_main():
            with output_dir(out, overwrite=opts.overwrite) as tmp:
                write_json(tmp / layout.RANK, result.json)
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
    opts: BenchOptions | None = None,
    **overrides,
) -> dict:
    """Benchmark MODELs side by side (see :mod:`staterank.bench`); with ``from_config`` they are configs.

    ``opts`` (a :class:`~staterank.options.BenchOptions`, or its fields as keywords) says how.
    """
    from staterank.bench import BenchError
    from staterank.bench import bench as run_bench

    opts = resolve(BenchOptions, opts, overrides)
    # one model at a time: each model measured is kept in PARTIAL until the last is, so a run cut short (out of
    # memory at the second model, a time limit) keeps what it measured
    partial = None
    if out is not None:
        out = check_output(out, opts.overwrite)
        if opts.sequential and len(models) > 1:
            partial = check_output(out.with_name(f"{out.stem}.partial{out.suffix}"), opts.overwrite)
            partial.unlink(missing_ok=True)  # an earlier run's, replaced as --overwrite says
    device, from_config, batch_size, seq_len = opts.device, opts.from_config, opts.batch_size, opts.seq_len
    decode_batch_sizes = tuple(opts.decode_batch_sizes)
    torch_dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        opts.dtype
    ]
    loaders = [
        functools.partial(_from_config, m, device, torch_dtype)
        if from_config
        else functools.partial(load_model, m, device=device, dtype=torch_dtype)
        for m in models
    ]
    loaded = loaders if opts.sequential else [load() for load in loaders]
    budget = int(opts.memory_budget_gib * 2**30) if opts.memory_budget_gib is not None else None
    try:
        result = run_bench(
            loaded,
            [str(m) for m in models],
            batch_size=batch_size,
            seq_len=seq_len,
            decode_batch_sizes=decode_batch_sizes,
            decode_steps=opts.decode_steps,
            warmup=opts.warmup,
            repeats=opts.repeats,
            memory_budget_bytes=budget,
            seed=opts.seed,
            sequential=opts.sequential,
            on_measured=None if partial is None else functools.partial(write_json, partial),
            compile_decode=opts.compile,
        )
    except (BenchError, torch.OutOfMemoryError) as error:
        message = (
            f"out of device memory at prefill {batch_size} x {seq_len} or decode batches {list(decode_batch_sizes)}: "
            "lower --batch-size / --seq-len, or see --memory-budget-gib for the decode batch that fits"
            if isinstance(error, torch.OutOfMemoryError)
            else str(error)
        )
        if partial is not None and partial.exists():
            message += f" (the models measured before it are in {partial})"
        raise BenchError(message) from None
    if out is not None:
        write_json(out, result, overwrite=opts.overwrite)
        if partial is not None:
            partial.unlink(missing_ok=True)
    return result
