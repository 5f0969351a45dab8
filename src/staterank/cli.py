"""The ``staterank`` command: a thin layer over :mod:`staterank.api`.

Exit codes: 0 success; 2 bad input (one line on stderr, no traceback unless --debug);
1 unexpected failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from typing import NoReturn

from staterank.errors import StaterankError, StaterankWarning
from staterank.options import (
    AnalyzeOptions,
    BenchOptions,
    DemoOptions,
    EvaluateOptions,
    FinetuneOptions,
    InfoOptions,
    Options,
    PruneOptions,
    ReportOptions,
    TrainOptions,
    add_arguments,
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


MODEL_HELP = "model directory, hub id or bundled name (tiny-deltanet, tiny-gated-deltanet)"


def _command(sub, name: str, help: str, options: type[Options], **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose options come from its options class (defaults, help and checks written once there)."""
    p = sub.add_parser(name, help=help, **kwargs)
    add_arguments(p, options)
    p.add_argument("--debug", action="store_true", help="show tracebacks and third-party warnings")
    return p


def build_parser() -> argparse.ArgumentParser:
    from staterank.prune import method_help  # the method lists and their help come from the registries
    from staterank.prune.channels import CHANNEL_CRITERIA
    from staterank.prune.heads import HEAD_CRITERIA

    parser = _Parser(
        prog="staterank",
        description="Analyse how linear-attention LLMs use their recurrent state, and compress them on that basis. "
        f"Pruning methods (staterank prune --help says what each does): q/k channels: {', '.join(CHANNEL_CRITERIA)}; "
        f"heads: {', '.join(HEAD_CRITERIA)}.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "info", "shapes, state bytes, which layers are linear attention", InfoOptions)
    p.add_argument("model", help=MODEL_HELP)

    p = _command(sub, "evaluate", "perplexity, loss by position, in-context recall, lm-eval tasks", EvaluateOptions)
    p.add_argument("model", help=MODEL_HELP)

    p = _command(sub, "analyze", "state-rank analysis of every linear-attention head, with plots", AnalyzeOptions)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="corpus; give it twice to compare two domains (e.g. techdocs-val, wikitext-test)",
    )
    p.add_argument("--out", required=True, help="output directory (rank.json, CSVs, PNGs)")

    p = _command(
        sub,
        "prune",
        "cut the q/k dimension of every linear-attention layer, or remove heads",
        PruneOptions,
        description="Methods: " + method_help().replace("%", "%%"),  # argparse formats help with %
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. f=2.0 (repeatable)"
    )

    p = _command(sub, "finetune", "LoRA recovery of a pruned model, optionally distilled from the original",
                 FinetuneOptions)  # fmt: skip
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--data", help="training corpus (none for a config whose train section names a task: mqar)")
    p.add_argument("--out", required=True, help="output model directory (LoRA merged into the weights)")

    p = _command(sub, "bench", "side-by-side prefill and decode speed, memory and state bytes", BenchOptions)
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.add_argument("--out", help="write the results as JSON here")

    p = _command(sub, "report", "report.html and report.md from whatever a run directory holds", ReportOptions)
    p.add_argument("run_dir", metavar="RUNDIR")

    p = _command(sub, "train", "pretrain a small model from a config (for studies and the bundled models)",
                 TrainOptions)  # fmt: skip
    p.add_argument("config", help="JSON file: a model config plus an optional 'train' section")
    p.add_argument("--data", help="training corpus (none for a config whose train section names a task: mqar)")
    p.add_argument("--out", required=True, help="output model directory")

    p = _command(sub, "demo", "the pipeline on the bundled tiny model, on CPU, in minutes", DemoOptions)
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
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

    info = api.info(args.model, InfoOptions.from_args(args))
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
    result = api.evaluate(args.model, opts=EvaluateOptions.from_args(args))
    if "ppl" in result:
        print(f"perplexity {result['ppl']:.3f} over {result['tokens']:,} tokens of {args.data}")
    if "mqar" in result:
        m = result["mqar"]
        print(
            f"mqar accuracy {m['accuracy']:.4f} ({m['examples']} examples, {m['pairs']} pairs, {m['seq_len']} tokens)"
        )
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

    result = api.analyze(args.model, args.data, args.out, AnalyzeOptions.from_args(args))
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

    opts = PruneOptions.from_args(args, options=_parse_options(args.option))
    report = api.prune(args.model, opts.method, opts.ratio, args.out, opts)
    print(pruning_summary(report))
    print(f"wrote {args.out} (pruning.json inside)")
    return 0


def _cmd_finetune(args) -> int:
    from staterank import api

    summary = api.finetune(args.model, args.data, args.out, FinetuneOptions.from_args(args))
    print(
        f"finetuned {summary['steps']} steps, {summary['tokens_seen']:,} tokens, final loss "
        f"{summary['final_loss']:.4f}, {summary['trainable_params']:,} LoRA parameters merged, "
        f"{summary['seconds']:.0f} s -> {args.out}"
    )
    return 0


def _cmd_bench(args) -> int:
    from staterank import api

    result = api.bench(args.models, args.out, BenchOptions.from_args(args))
    sizes = list(result["models"][0]["decode_ms_per_token"])
    graphed = result["models"][0]["decode_graph_ms_per_token"] is not None
    print(f"{result['device']}, {result['dtype']}, prefill {result['batch_size']} x {result['seq_len']}")
    if sizes and not graphed:
        print(f"decode: eager only ({result['decode_graph_unavailable']})")
    if not result["interleaved"]:
        print("one model at a time (--sequential): repeats not interleaved across models")
    if graphed and result["decode_graph_compiled"]:
        print("graphed steps compiled by torch.compile (--compile)")
    width = max(15, *(len(row["name"]) for row in result["models"]))  # whole names, aligned
    print(f"{'model':<{width}} {'prefill tok/s':>14} {'state B/seq':>12}")
    for row in result["models"]:
        print(f"{row['name']:<{width}} {row['prefill_tokens_per_s']:>14,.0f} {row['state_bytes_per_seq']:>12,}")
    if sizes:
        print(f"{'decode ms/token':<{width}} {'batch':>6} {'eager':>9} {'graph':>9} {'bound':>9}")
        for row in result["models"]:
            for b in sizes:
                graph = f"{row['decode_graph_ms_per_token'][b]:>9.3f}" if graphed else f"{'-':>9}"
                print(
                    f"{row['name']:<{width}} {b:>6} {row['decode_ms_per_token'][b]:>9.3f} {graph}"
                    f" {row['decode_bound_ms_per_token'][b]:>9.3f}"
                )
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _cmd_report(args) -> int:
    from staterank import api

    markdown, page = api.report(args.run_dir)
    print(f"wrote {page} and {markdown}")
    return 0


def _cmd_train(args) -> int:
    from staterank import api

    summary = api.train(args.config, args.data, args.out, TrainOptions.from_args(args))
    last = summary["val_history"][-1] if summary["val_history"] else {}
    if "ppl" in last:
        print(f"final validation perplexity {last['ppl']:.2f}")
    if "accuracy" in last:
        print(f"final validation accuracy {last['accuracy']:.4f}")
    return 0


def _cmd_demo(args) -> int:
    from staterank import api

    result = api.demo(args.out, DemoOptions.from_args(args), say=print)
    table, corpora = result["perplexity"], result["corpora"]
    print(f"\n{'perplexity':<14}" + "".join(f"{data:>16}" for data in corpora))
    for name, scores in table.items():
        print(f"{name:<14}" + "".join(f"{scores[data]:>16.2f}" for data in corpora))
    print(f"\n{'model':<14} {'prefill tok/s':>14} {'ms/token b=16':>14} {'state B/seq':>12}")
    for name, row in zip(("original", "rrqr + LoRA", "l1 + LoRA"), result["bench"]["models"], strict=True):
        print(
            f"{name:<14} {row['prefill_tokens_per_s']:>14,.0f} {row['decode_ms_per_token']['16']:>14.2f} "
            f"{row['state_bytes_per_seq']:>12,}"
        )
    print(f"\nresults in {args.out}/; the report: {result['report']}")
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


def quiet_third_party(debug: bool) -> None:
    """Show staterank's own warnings as one line each; third-party warnings and logs only with --debug."""
    warnings.formatwarning = _one_line
    if debug:
        return
    warnings.simplefilter("ignore")
    warnings.simplefilter("default", StaterankWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    logging.getLogger("fla").setLevel(logging.ERROR)  # fla logs through transformers' helper, under its own name


def one_line(error: BaseException) -> str:
    """An error's message on one line: third-party messages we quote may span several."""
    return " ".join(str(error).split())


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as parse_exit:  # argparse's --help (0) or its one-line error (2): the same codes, returned
        return parse_exit.code
    quiet_third_party(args.debug)
    try:
        return _run(args)
    except StaterankError as e:
        if args.debug:
            traceback.print_exc()
        print(f"staterank: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("staterank: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        message = f"staterank: unexpected failure: {type(e).__name__}: {one_line(e)}"
        print(f"{message} (rerun with --debug for details)", file=sys.stderr)
        return 1
