"""The ``staterank`` command: a thin layer over :mod:`staterank.api`.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback unless --debug);
1 unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

from staterank.errors import StaterankError, StaterankWarning
from staterank.validate import (
    check_output_path,
    device,
    fraction,
    non_negative_int,
    open_unit,
    positive_float,
    positive_int,
    positive_ints,
    positive_ints_or_none,
    probability,
    random_seed,
    sequence_length,
)

#: The commands that run data-parallel under torchrun; the others run in one process.
PARALLEL_COMMANDS = ("prune", "analyze", "evaluate", "finetune")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other bad input: ``staterank: error: COMMAND: ...``."""

    def error(self, message: str) -> NoReturn:
        self._fail(self.prog.removeprefix("staterank").strip(), message)  # a subcommand's prog: "staterank COMMAND"

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:
        # argparse reports a subcommand's unknown options from the top parser; name the subcommand here.
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self._fail(getattr(parsed, "command", None), f"unrecognized arguments: {' '.join(unknown)}")
        return parsed

    def _fail(self, command: str | None, message: str) -> NoReturn:
        self.exit(2, f"staterank: error: {command + ': ' if command else ''}{message}\n")


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=device, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument(
        "--device-map",
        choices=["auto", "balanced", "sequential"],
        help="spread a model larger than one GPU over all GPUs with accelerate (no CPU or disk offload)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow a hub model's own code to run (off by default)"
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=random_seed, default=0, help="random seed (default: 0)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="staterank",
        description="Analyse how linear-attention LLMs use their recurrent state, and compress them on that basis.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="shapes, state bytes, which layers are linear attention")
    p.add_argument("model", help="model directory, hub id or bundled name (tiny-deltanet, tiny-gated-deltanet)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _model_options(p)
    _common(p)

    p = sub.add_parser("evaluate", help="perplexity, loss by position, in-context recall, lm-eval tasks")
    p.add_argument("model")
    p.add_argument("--data", help="corpus: file, directory, hf:NAME or a shipped name (wikitext-test)")
    p.add_argument(
        "--tasks",
        default="ppl",
        help="comma-separated: ppl, ppl-by-position, recall, lm-eval:TASK[,TASK] (default ppl)",
    )
    p.add_argument("--stride", type=positive_int, help="ppl: sliding windows moving by this many tokens")
    p.add_argument("--lm-eval-limit", type=positive_int, help="lm-eval: at most this many examples per task")
    p.add_argument("--seq-len", type=sequence_length, default=512, help="window length in tokens (default: 512)")
    p.add_argument("--max-tokens", type=positive_int, help="read at most this many tokens of the corpus")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _model_options(p)
    _common(p)

    p = sub.add_parser("analyze", help="state-rank analysis of every linear-attention head, with plots")
    p.add_argument("model")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="corpus; give it twice to compare two domains (e.g. techdocs-val, wikitext-test)",
    )
    p.add_argument("--out", required=True, help="output directory (rank.json, CSVs, PNGs)")
    p.add_argument("--samples", type=positive_int, default=8, help="sequences per corpus (default: 8)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence (default: 2048)")
    p.add_argument(
        "--positions",
        type=positive_ints,
        help="comma-separated token counts at which to read the states (default: log-spaced, and the last)",
    )
    p.add_argument("--eps", type=open_unit, default=1e-4, help="effective rank counts singular values > eps * largest")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--overwrite", action="store_true")
    _model_options(p)
    _common(p)

    p = sub.add_parser("prune", help="cut the q/k dimension of every linear-attention layer")
    p.add_argument("model")
    p.add_argument(
        "--method",
        required=True,
        help="q/k channels: random, l1, wanda, taylor, pca, rrqr; heads: jrnp, heads-rank, heads-norm, "
        "heads-low-rank, heads-random",
    )
    p.add_argument(
        "--ratio",
        type=fraction,
        required=True,
        help="fraction of q/k channels per head (or of heads) removed, in [0, 1)",
    )
    p.add_argument("--alpha", type=probability, default=0.5, help="jrnp: weight of the rank in the Saturation Score")
    p.add_argument("--scope", default="layer", choices=["layer", "global"], help="head methods: where to count")
    p.add_argument(
        "--unit",
        default="auto",
        choices=["auto", "value", "key"],
        help="head methods with grouped value heads: remove value heads, or key heads with all their value heads "
        "(default: auto, whichever comes closer to --ratio)",
    )
    p.add_argument("--data", help="calibration corpus (needed by wanda, taylor, pca, rrqr)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--calib-tokens", type=positive_int, default=32768, help="calibration tokens (default: 16 x 2048)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="calibration sequence length (default: 2048)")
    p.add_argument(
        "--align",
        type=positive_int,
        help="round the kept d_k down to a multiple of this (default: 16, else 8, where that costs at most 5%% of d_k)",
    )
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. f=2.0 (repeatable)"
    )
    p.add_argument("--overwrite", action="store_true")
    _model_options(p)
    _common(p)

    p = sub.add_parser("finetune", help="LoRA recovery of a pruned model, optionally distilled from the original")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="training corpus")
    p.add_argument("--out", required=True, help="output model directory (LoRA merged into the weights)")
    p.add_argument("--teacher", help="distil from this model (the unpruned original)")
    p.add_argument("--kd-temp", type=positive_float, default=2.0, help="distillation temperature (default: 2)")
    p.add_argument("--kd-weight", type=probability, default=0.5, help="weight of the distillation term (default: 0.5)")
    p.add_argument("--lora-rank", type=positive_int, default=32)
    p.add_argument("--lora-alpha", type=positive_float, default=64)
    p.add_argument("--lora-targets", help="comma-separated module names (default: the q, k, v projections)")
    p.add_argument("--steps", type=positive_int, default=200)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--seq-len", type=sequence_length, default=512)
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    p.add_argument("--save-every", type=non_negative_int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", type=device)
    _common(p)

    p = sub.add_parser("bench", help="side-by-side prefill and decode speed, memory and state bytes")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--from-config", action="store_true", help="MODELs are configs: random weights, published shapes")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prefill batch (default: 8)")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="prefill tokens per sequence (default: 2048)")
    p.add_argument(
        "--decode-batch-sizes",
        type=positive_ints_or_none,
        default=[1, 64],
        help="comma-separated (default: 1,64); empty for prefill only",
    )
    p.add_argument("--decode-steps", type=positive_int, default=32)
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=5)
    p.add_argument(
        "--memory-budget-gib", type=positive_float, help="report the largest batch whose states fit beside the weights"
    )
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", type=device)
    _common(p)

    p = sub.add_parser("report", help="report.html and report.md from whatever a run directory holds")
    p.add_argument("run_dir", metavar="RUNDIR")
    _common(p)

    p = sub.add_parser("train", help="pretrain a small model from a config (for studies and the bundled models)")
    p.add_argument("config", help="JSON file: a model config plus an optional 'train' section")
    p.add_argument("--data", required=True, help="training corpus")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--val-data", help="validation corpus for periodic perplexity")
    p.add_argument("--steps", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--seq-len", type=sequence_length)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--tokenizer", help="existing tokenizer directory (default: train one on --data)")
    p.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", type=device)
    _common(p)
    p.set_defaults(seed=None)  # None: the config's "train" section (or the trainer's default) decides

    p = sub.add_parser("demo", help="the pipeline on the bundled tiny model, on CPU, in minutes")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--model", default="tiny-deltanet")
    p.add_argument("--device", type=device, default="cpu")
    _common(p)
    return parser


def _print_info(info: dict) -> None:
    print(f"{info['path']}")
    print(f"  family          {info['family']} (model_type {info['model_type']})")
    print(f"  parameters      {info['params']:,} ({info['dtype']})")
    print(f"  layers          {info['num_layers']}, linear attention: {info['linear_layers']}")
    print(f"  state per seq   {info['state_bytes_per_seq']:,} bytes (recurrent states + conv caches)")
    print("  layer  k-heads  v-heads  d_k  d_v")
    for layer in info["layers"]:
        print(
            f"  {layer['layer']:>5}  {layer['num_k_heads']:>7}  {layer['num_v_heads']:>7}  "
            f"{layer['head_k_dim']:>3}  {layer['head_v_dim']:>3}"
        )


def _cmd_info(args) -> int:
    from staterank import api

    info = api.info(
        args.model, device=args.device, device_map=args.device_map, trust_remote_code=args.trust_remote_code
    )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _cmd_evaluate(args) -> int:
    from staterank import api, distributed
    from staterank.io import check_output, write_json

    if args.out:
        check_output(args.out, args.overwrite)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = api.evaluate(
        args.model,
        args.data,
        tasks=tasks,
        stride=args.stride,
        lm_eval_limit=args.lm_eval_limit,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    if "ppl" in result:
        print(f"perplexity {result['ppl']:.3f} over {result['tokens']:,} tokens of {args.data}")
    for name in ("by_position", "recall", "lm_eval"):
        if name in result:
            print(f"{name}: {json.dumps(result[name])}")
    if args.out:
        with distributed.together():
            if distributed.is_main():
                write_json(args.out, result, overwrite=args.overwrite)
        print(f"wrote {args.out}")
    return 0


def _cmd_analyze(args) -> int:
    from staterank import api

    result = api.analyze(
        args.model,
        args.data,
        args.out,
        samples=args.samples,
        seq_len=args.seq_len,
        positions=args.positions,
        eps=args.eps,
        seed=args.seed,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    strat, stability = result["stratification"], result["stability"]
    print(
        f"{strat['low']} low-rank and {strat['high']} high-rank heads (gap {strat['gap']:.3f} of capacity); "
        f"groups decided by token {strat['decided_at_position']['median']} (median)"
    )
    rho = stability["across_samples_spearman"]
    print(f"rank correlation across samples {'n/a' if rho is None else f'{rho:.3f}'}", end="")
    if "across_domains_spearman" in stability:
        rho = stability["across_domains_spearman"]
        print(f", across domains {'n/a' if rho is None else f'{rho:.3f}'}", end="")
    print(f"\nwrote {args.out} (rank.json, CSVs, plots) in {result['seconds']:.1f} s")
    return 0


def _parse_options(items: list[str]) -> dict:
    """KEY=VALUE strings to a dict, values read as JSON where they parse (numbers, booleans)."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise StaterankError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def pruning_summary(report: dict) -> str:
    """One line: what was removed, the requested against the actual fraction where they differ, the state bytes."""
    before, after = report["state_bytes_before"], report["state_bytes_after"]
    if "removed" in report:
        counts = [len(heads) for heads in report["removed"].values()]
        per_layer = f"{counts[0]} per layer" if len(set(counts)) == 1 else f"per layer {counts}"
        what = f"removed {sum(counts)} value heads ({per_layer}"
        what += ", whole key heads with their value heads)" if report["unit"] == "key_head" else ")"
    else:
        what = f"d_k {report['head_k_dim_before']} -> {report['head_k_dim_after']} per head"
        if report["head_k_dim_after"] != report["head_k_dim_requested"]:
            what += f" (floor(d_k (1 - ratio)) = {report['head_k_dim_requested']}, aligned to {report['align']})"
    if abs(report["kept_ratio"] - report["ratio"]) > 1e-9:
        what += f"; requested ratio {report['ratio']:g}, actual {report['kept_ratio']:.4g}"
    return (
        f"{report['method']}: {what}, state {before:,} -> {after:,} bytes per sequence ({after / before:.2f}x), "
        f"{report['seconds']:.1f} s"
    )


def _cmd_prune(args) -> int:
    from staterank import api

    report = api.prune(
        args.model,
        args.method,
        args.ratio,
        args.out,
        data=args.data,
        calib_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        align=args.align,
        seed=args.seed,
        batch_size=args.batch_size,
        options=_parse_options(args.option),
        alpha=args.alpha,
        scope=args.scope,
        unit=args.unit,
        overwrite=args.overwrite,
        device=args.device,
        device_map=args.device_map,
        trust_remote_code=args.trust_remote_code,
    )
    print(pruning_summary(report))
    print(f"wrote {args.out} (pruning.json inside)")
    return 0


def _cmd_finetune(args) -> int:
    from staterank.finetune import finetune_from_cli

    return finetune_from_cli(args)


def _cmd_bench(args) -> int:
    from staterank import api

    result = api.bench(
        args.models,
        args.out,
        from_config=args.from_config,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        decode_batch_sizes=tuple(args.decode_batch_sizes),
        decode_steps=args.decode_steps,
        warmup=args.warmup,
        repeats=args.repeats,
        memory_budget_gib=args.memory_budget_gib,
        dtype=args.dtype,
        device=args.device,
        overwrite=args.overwrite,
        seed=args.seed,
    )
    sizes = list(result["models"][0]["decode_ms_per_token"])
    graphed = result["models"][0]["decode_graph_ms_per_token"] is not None
    print(f"{result['device']}, {result['dtype']}, prefill {result['batch_size']} x {result['seq_len']}")
    if sizes and not graphed:
        print(f"decode: eager only ({result['decode_graph_unavailable']})")
    print(f"{'model':<40} {'prefill tok/s':>14} {'state B/seq':>12}")
    for row in result["models"]:
        print(f"{row['name'][-40:]:<40} {row['prefill_tokens_per_s']:>14,.0f} {row['state_bytes_per_seq']:>12,}")
    if sizes:
        print(f"{'decode ms/token':<40} {'batch':>6} {'eager':>9} {'graph':>9} {'bound':>9}")
        for row in result["models"]:
            for b in sizes:
                graph = f"{row['decode_graph_ms_per_token'][b]:>9.3f}" if graphed else f"{'-':>9}"
                print(
                    f"{row['name'][-40:]:<40} {b:>6} {row['decode_ms_per_token'][b]:>9.3f} {graph}"
                    f" {row['decode_bound_ms_per_token'][b]:>9.3f}"
                )
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _cmd_report(args) -> int:
    from staterank.report import write_report

    markdown, page = write_report(args.run_dir)
    print(f"wrote {page} and {markdown}")
    return 0


def _cmd_train(args) -> int:
    from staterank.train import train_from_cli

    return train_from_cli(args)


def _cmd_demo(args) -> int:
    from staterank import api
    from staterank.finetune import finetune
    from staterank.io import write_json

    out = check_output_path(args.out)  # refused before any work when it cannot be written
    corpora = ("techdocs-val", "wikitext-test")

    def evaluate(model) -> dict[str, float]:
        scores = {}
        for data in corpora:
            result = api.evaluate(
                model, data, seq_len=512, max_tokens=32768, device=args.device, seed=args.seed, progress=False
            )
            write_json(out / f"eval-{Path(str(model)).name}-{data}.json", result)
            scores[data] = result["ppl"]
        result = api.evaluate(model, tasks=("recall",), device=args.device, seed=args.seed, progress=False)
        write_json(out / f"eval-{Path(str(model)).name}-recall.json", result)
        return scores

    print(f"== info: {args.model}")
    info = api.info(args.model, device=args.device)
    _print_info(info)
    write_json(out / "info.json", info)
    print("== analyze: state ranks of every head (techdocs-val against wikitext-2)")
    ranks = api.analyze(
        args.model,
        list(corpora),
        out / "analysis",
        samples=2,
        seq_len=1024,
        seed=args.seed,
        device=args.device,
        overwrite=True,
        progress=False,
    )
    strat = ranks["stratification"]
    print(f"{strat['low']} low-rank and {strat['high']} high-rank heads; plots in {out / 'analysis'}/")
    print("== evaluate: perplexity before pruning")
    table = {"original": evaluate(args.model)}
    pruned_models = [args.model]
    for method in ("rrqr", "l1"):
        pruned = out / f"{method}-50"
        print(f"== prune: {method}, half of the q/k channels of every head")
        report = api.prune(
            args.model,
            method,
            0.5,
            pruned,
            data="techdocs",
            calib_tokens=16384,
            seq_len=512,
            seed=args.seed,
            device=args.device,
            overwrite=True,
            progress=False,
        )
        print(
            f"d_k {report['head_k_dim_before']} -> {report['head_k_dim_after']}, state bytes per sequence "
            f"{report['state_bytes_before']:,} -> {report['state_bytes_after']:,}"
        )
        table[f"{method} 50%"] = evaluate(pruned)
        print(f"== finetune: short LoRA recovery of the {method} model")
        recovered = out / f"{method}-50-lora"
        finetune(
            pruned,
            "techdocs",
            recovered,
            steps=40,
            batch_size=4,
            seq_len=512,
            lr=1e-3,
            warmup_steps=5,
            seed=args.seed,
            device=args.device,
            overwrite=True,
            progress=False,
        )
        table[f"{method} + LoRA"] = evaluate(recovered)
        pruned_models.append(str(recovered))
    print("== bench: original against the recovered models")
    speed = api.bench(
        pruned_models,
        out / "bench.json",
        batch_size=4,
        seq_len=512,
        decode_batch_sizes=(1, 16),
        decode_steps=16,
        repeats=3,
        device=args.device,
        overwrite=True,
        seed=args.seed,
    )
    print(f"\n{'perplexity':<14}" + "".join(f"{data:>16}" for data in corpora))
    for name, scores in table.items():
        print(f"{name:<14}" + "".join(f"{scores[data]:>16.2f}" for data in corpora))
    print(f"\n{'model':<14} {'prefill tok/s':>14} {'ms/token b=16':>14} {'state B/seq':>12}")
    for name, row in zip(("original", "rrqr + LoRA", "l1 + LoRA"), speed["models"], strict=True):
        print(
            f"{name:<14} {row['prefill_tokens_per_s']:>14,.0f} {row['decode_ms_per_token']['16']:>14.2f} "
            f"{row['state_bytes_per_seq']:>12,}"
        )
    from staterank.report import write_report

    _, page = write_report(out)
    print(f"\nresults in {out}/; the report: {page}")
    return 0


COMMANDS = {
    "info": _cmd_info,
    "analyze": _cmd_analyze,
    "evaluate": _cmd_evaluate,
    "prune": _cmd_prune,
    "finetune": _cmd_finetune,
    "bench": _cmd_bench,
    "report": _cmd_report,
    "train": _cmd_train,
    "demo": _cmd_demo,
}


def _run(args) -> int:
    """Run a command; in a data-parallel launch only rank 0 prints (every rank reports its errors)."""
    from staterank import distributed

    launch = distributed.world()
    if launch.parallel and args.command not in PARALLEL_COMMANDS:
        raise distributed.DistributedError(
            f"staterank {args.command} runs in one process; torchrun launches {', '.join(PARALLEL_COMMANDS)}"
        )
    if distributed.is_main():
        return COMMANDS[args.command](args)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        return COMMANDS[args.command](args)


def _one_line(message, category, filename, lineno, line=None) -> str:
    if issubclass(category, StaterankWarning):
        return f"staterank: warning: {message}\n"
    return _FORMAT_WARNING(message, category, filename, lineno, line)


_FORMAT_WARNING = warnings.formatwarning


def _quiet_third_party(debug: bool) -> None:
    """Show staterank's own warnings as one line each; third-party warnings and logs only with --debug."""
    warnings.formatwarning = _one_line
    if debug:
        return
    warnings.simplefilter("ignore")
    warnings.simplefilter("default", StaterankWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as parse_exit:  # argparse's --help (0) or its one-line error (2): the same codes, returned
        return parse_exit.code
    _quiet_third_party(args.debug)
    try:
        return _run(args)
    except StaterankError as e:
        if args.debug:
            traceback.print_exc()
        print(f"staterank: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("staterank: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        message = f"staterank: unexpected failure: {type(e).__name__}: {e}"
        print(f"{message} (rerun with --debug for details)", file=sys.stderr)
        return 1
