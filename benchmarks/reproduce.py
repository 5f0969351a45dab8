"""Reproduce both papers' claims at small scale, end to end, in one command: results.json and results.md.

For a DeltaNet and a Gated DeltaNet of about 29M parameters each (``configs/reproduce-*.json``):

1. train on ``--train-data`` for a time budget (``--train-seconds``, converted into a number of steps from a
   short timed probe, so that the learning-rate schedule completes) or a fixed ``--train-steps``; record
   tokens seen and validation perplexity (techdocs-val);
2. state-rank analysis on techdocs-val and wikitext-2 test: low/high-rank group sizes, the gap, and the
   Spearman correlation of per-head ranks across samples and across the two domains;
3. Q/K channel pruning with every criterion at ``--channel-ratios`` and head pruning with JRNP and its
   ablations at ``--head-ratios``, no recovery;
4. LoRA recovery of ``--recover-methods`` at ``--recover-ratio``, without and with distillation from the
   unpruned model;

and every model of steps 1, 3 and 4 is evaluated the same way: perplexity on techdocs-val and on wikitext-2
test (``--eval-tokens`` of each, ``--eval-seq-len`` windows), the in-context recall probe, and recurrent-state
bytes per sequence. ``OUT/results.json`` holds every row plus the training records, the analysis, seeds,
device, versions, the kernel choice and per-stage seconds; ``OUT/results.md`` holds Markdown tables. Both are
rewritten atomically after every stage, so an interrupted run keeps what it finished (``"complete": false``).

Kernels (``--kernels``): fla compiles its Triton kernels anew for every shape (about 40 s per head dimension
for the delta rule on an H100; its short convolution autotunes per channel count), the pruning sweep makes
many shapes, and fla refuses its Gated DeltaNet backward on Hopper with Triton < 3.7.1. The default ``all``
runs every operation staterank patches (delta rule, short convolution, norms, SwiGLU, losses) through its
PyTorch implementation on every device, so nothing is compiled; ``delta_rule`` routes the (gated) delta rule
only, ``none`` keeps fla's kernels (see ``staterank.backends``). Training speed is measured, not assumed: the
time budget holds whichever is chosen.

    python benchmarks/reproduce.py --train-data techdocs-train.jsonl.xz --out runs/reproduce   # one GPU, ~8 min
    python benchmarks/reproduce.py --smoke --out /tmp/reproduce-smoke                         # CPU, seconds

``--stratification-study`` trains and analyses only, no pruning or recovery: with ``--models deltanet
gated-deltanet kda rwkv7 mamba2`` (``configs/study-*.json`` for the last three, about 29M parameters each) and a
fixed ``--train-steps`` (the same tokens for every architecture) it asks whether state-rank stratification
persists under other state rules, and draws every model's heads side by side (``OUT/stratification.png``).

``--resume`` continues a stopped run in ``--out`` with the same options: the models it finished are kept as
measured (``results.json`` records the run they came from), the others run, and the tables and the plot are
written again. The model list may grow, so a study can be spread over several sessions of a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from staterank import api, pipelines, plots
from staterank.backends.patch import TORCH_KERNEL_CHOICES
from staterank.cli import quiet_third_party
from staterank.errors import StaterankError
from staterank.io import atomic_file, check_output, write_json
from staterank.loading import bundled_path, prepare_runtime
from staterank.options import EvaluateOptions, FinetuneOptions, PruneOptions
from staterank.pipelines import Study
from staterank.prune.channels import CHANNEL_CRITERIA
from staterank.prune.heads import HEAD_CRITERIA
from staterank.training.pretrain import read_config, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"deltanet": "reproduce-deltanet.json", "gated-deltanet": "reproduce-gated-deltanet.json"}
#: The architectures of the stratification study (``--models`` takes them too): other state rules, same budget.
STUDY_MODELS = {"kda": "study-kda.json", "rwkv7": "study-rwkv7.json", "mamba2": "study-mamba2.json"}
ALL_MODELS = {**MODELS, **STUDY_MODELS}
#: Every analysed model's heads by final effective rank / capacity and group, side by side (OUT/...).
STRATIFICATION_PLOT = "stratification.png"
#: Evaluation corpora and the row key of their perplexity.
CORPORA = {"techdocs-val": "ppl_techdocs_val", "wikitext-test": "ppl_wikitext2"}
#: Every registered criterion by default, JRNP before its ablations.
CHANNEL_METHODS = sorted(CHANNEL_CRITERIA)
HEAD_METHODS = sorted(HEAD_CRITERIA, key=lambda name: (name != "jrnp", name))

#: --smoke: the same pipeline on models and token counts small enough for seconds on a CPU.
SMOKE_MODEL = {
    "deltanet": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4, "intermediate_size": 128},
    "gated-deltanet": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_heads": 4,
        "head_dim": 16,
        "intermediate_size": 128,
    },
    "kda": {"hidden_size": 64, "num_hidden_layers": 2, "num_heads": 4, "head_dim": 16, "intermediate_size": 128},
    "rwkv7": {"hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "intermediate_size": 128,
              "decay_low_rank_dim": 16, "gate_low_rank_dim": 16, "a_low_rank_dim": 16, "v_low_rank_dim": 16},
    "mamba2": {"hidden_size": 64, "num_hidden_layers": 2, "head_dim": 16, "state_size": 16, "chunk_size": 32},
}
SMOKE_TRAIN = {"batch_size": 4, "seq_len": 64, "lr": 1e-2, "warmup_steps": 2, "val_tokens": 2048}
SMOKE_DEFAULTS = {
    "train_seconds": 1.0,
    "max_train_tokens": 16384,
    "eval_tokens": 1024,
    "eval_seq_len": 128,
    "eval_batch_size": 8,
    "recall_trials": 4,
    "recall_distances": [24],
    "recall_items": [3],
    "calib_tokens": 512,
    "calib_seq_len": 128,
    "analysis_samples": 2,
    "analysis_seq_len": 128,
    "lora_steps": 3,
    "lora_batch_size": 2,
    "lora_seq_len": 64,
    "device": "cpu",
}

#: float32 by default: effective rank counts singular values above 1e-4 of the largest, below bfloat16's precision.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROBE_WARM_STEPS, PROBE_TIMED_STEPS = 3, 12  # training-speed probe: steps that compile, then steps timed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run directory (results.json, results.md, models, analysis)")
    parser.add_argument("--overwrite", action="store_true", help="reuse an existing run directory")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out: every model it finished (trained, analysed, pruned, recovered) is kept "
        "as measured, the others run; the options must be the same",
    )
    parser.add_argument("--debug", action="store_true", help="show third-party warnings and logs")
    parser.add_argument("--smoke", action="store_true", help="tiny models, few steps and tokens: CPU, seconds")
    parser.add_argument("--models", nargs="+", choices=list(ALL_MODELS), default=list(MODELS))
    parser.add_argument(
        "--stratification-study",
        action="store_true",
        help="train and analyse only, no pruning or recovery (with --models of several architectures: the study "
        "of state-rank stratification across state rules; fix the budget with --train-steps)",
    )
    parser.add_argument(
        "--train-data", default="techdocs", help="training corpus (data spec; default: the shipped excerpt)"
    )
    parser.add_argument("--tokenizer", default=str(bundled_path("tiny-deltanet")), help="tokenizer directory")
    parser.add_argument("--train-seconds", type=float, default=50.0, help="training budget per model")
    parser.add_argument("--train-steps", type=int, help="a fixed number of training steps instead of a time budget")
    parser.add_argument("--max-train-tokens", type=int, help="use at most this many tokens of --train-data")
    parser.add_argument("--eval-tokens", type=int, default=32768, help="tokens of each evaluation corpus")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--recall-trials", type=int, default=32)
    parser.add_argument("--recall-distances", type=int, nargs="+", default=[32, 128, 512, 2048])
    parser.add_argument("--recall-items", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--analysis-samples", type=int, default=8)
    parser.add_argument("--analysis-seq-len", type=int, default=2048)
    parser.add_argument("--calib-data", default="techdocs", help="calibration corpus for pruning")
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--calib-seq-len", type=int, default=2048, help="also where head pruning reads the states")
    parser.add_argument("--calib-batch-size", type=int, default=4)
    parser.add_argument("--channel-methods", nargs="+", choices=sorted(CHANNEL_CRITERIA), default=CHANNEL_METHODS)
    parser.add_argument("--channel-ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--head-methods", nargs="+", choices=sorted(HEAD_CRITERIA), default=HEAD_METHODS)
    parser.add_argument("--head-ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--recover-methods", nargs="*", choices=sorted(CHANNEL_CRITERIA), default=["rrqr", "l1"])
    parser.add_argument("--recover-ratio", type=float, default=0.5)
    parser.add_argument("--recover-data", default="techdocs", help="LoRA training corpus")
    parser.add_argument("--lora-steps", type=int, default=50)
    parser.add_argument("--lora-batch-size", type=int, default=16)
    parser.add_argument("--lora-seq-len", type=int, default=512)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument(
        "--kernels",
        choices=TORCH_KERNEL_CHOICES,
        default="all",
        help="operations routed to PyTorch on every device (default: all, no Triton compilation)",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="dtype of the trained models for analysis, pruning and evaluation (LoRA runs in finetune's own: "
        "bfloat16 autocast on GPU); --kernels none needs bfloat16 (fla's chunk kernels refuse float32)",
    )
    parser.add_argument("--keep-models", action="store_true", help="keep the pruned and recovered models")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:  # the smoke sizes replace the defaults; flags given explicitly still win
        parser.set_defaults(**SMOKE_DEFAULTS)
        args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.stratification_study:
        args.channel_methods, args.head_methods, args.recover_methods = [], [], []
    return args


class Run:
    """The run's results, its stage timer and its progress lines (stderr)."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.out = Path(args.out)
        self.started = time.perf_counter()
        self.ranks: dict[str, dict] = {}  # each analysed model's rank.json, for the stratification plot
        self.results: dict = {
            "complete": False,
            "command": "python benchmarks/reproduce.py " + " ".join(argv),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "seed": args.seed,
            "device": device_record(args.device),
            "versions": versions(),
            "kernels": {
                "torch_kernels": args.kernels,
                "meaning": "operations routed to staterank's PyTorch implementation on every device "
                "(on CPU every patched operation runs in PyTorch regardless)",
            },
            "options": {k: v for k, v in vars(args).items() if k != "out"},
            "training": {},
            "analysis": {},
            "rows": [],
            "stages": [],
        }

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f} s] {message}", file=sys.stderr, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.log(f"{name}: start")
        yield
        seconds = time.perf_counter() - start
        self.results["stages"].append({"stage": name, "seconds": round(seconds, 1)})
        self.log(f"{name}: {seconds:.1f} s")
        self.write()

    def add_row(self, row: dict) -> None:
        self.results["rows"].append(row)
        recall = f", copy {row['copy_accuracy']:.3f}, kv {row['kv_accuracy']:.3f}"
        ppl = " / ".join(f"{row[key]:.2f}" for key in CORPORA.values())
        self.log(f"{row['model']} {row['method']} {row['ratio']} {row['stage']}: ppl {ppl}{recall}")
        self.write()  # a run stopped mid-stage keeps every row it measured

    def write(self) -> None:
        self.results["total_seconds"] = round(time.perf_counter() - self.started, 1)
        write_json(self.out / "results.json", self.results)
        with atomic_file(self.out / "results.md") as f:
            f.write(markdown(self.results))


def device_record(device: str) -> dict:
    if device.startswith("cuda"):
        return {"type": "cuda", "name": torch.cuda.get_device_name(torch.device(device))}
    return {"type": device, "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("triton", "flash-linear-attention", "transformers", "peft", "staterank"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def set_kernels(choice: str) -> None:
    """Route the chosen operations to PyTorch for the whole run (installing the backends reads the variable)."""
    os.environ["STATERANK_TORCH_KERNELS"] = choice
    prepare_runtime("delta_net")  # imports fla and installs the backends


def write_config(name: str, args: argparse.Namespace) -> Path:
    """The run's copy of a model's config (the smoke sizes applied), in OUT/configs."""
    fields, section = read_config(CONFIGS / ALL_MODELS[name])
    if args.smoke:
        fields.update(SMOKE_MODEL[name])
        section.update(SMOKE_TRAIN)
    path = Path(args.out) / "configs" / ALL_MODELS[name]
    write_json(path, {**fields, "train": section})
    return path


def seconds_per_step(config: Path, args: argparse.Namespace, scratch: Path) -> float:
    """Seconds of one training step of CONFIG here: a few steps to compile and warm up, then a few timed."""
    _, section = read_config(config)
    common = {
        "steps": 10**6,
        "tokenizer": args.tokenizer,
        "seed": args.seed,
        "device": args.device,
        "progress": False,
        "max_train_tokens": 2 * section["batch_size"] * section["seq_len"],
    }
    warm = train(config, args.train_data, scratch, stop_after=PROBE_WARM_STEPS, overwrite=True, **common)
    timed = train(config, args.train_data, scratch, resume=True, stop_after=PROBE_TIMED_STEPS, **common)
    shutil.rmtree(scratch, ignore_errors=True)
    return (timed["seconds"] - warm["seconds"]) / PROBE_TIMED_STEPS


def train_model(run: Run, name: str, args: argparse.Namespace) -> Path:
    config = write_config(name, args)
    out = run.out / "models" / name
    record: dict = {"config": str(config.relative_to(run.out))}
    if args.train_steps:
        steps = args.train_steps
        record["steps_from"] = "--train-steps"
    else:
        step_seconds = seconds_per_step(config, args, run.out / f".probe-{name}")
        steps = max(1, int(args.train_seconds / step_seconds))
        record.update(
            steps_from="--train-seconds", train_seconds_budget=args.train_seconds, probe_seconds_per_step=step_seconds
        )
        run.log(f"{name}: {step_seconds:.3f} s per step -> {steps} steps in {args.train_seconds:.0f} s")
    _, section = read_config(config)
    summary = train(
        config,
        args.train_data,
        out,
        steps=steps,
        warmup_steps=max(1, min(section["warmup_steps"], steps // 10)),
        val_data="techdocs-val",
        tokenizer=args.tokenizer,
        max_train_tokens=args.max_train_tokens,
        seed=args.seed,
        device=args.device,
        overwrite=True,
        progress=False,
    )
    summary.pop("model")
    final = summary["val_history"][-1]
    record.update(
        params=summary["params"],
        steps=summary["steps"],
        batch_size=summary["options"]["batch_size"],
        seq_len=summary["options"]["seq_len"],
        tokens_seen=summary["tokens_seen"],
        train_tokens=summary["train_tokens"],
        epochs=summary["epochs"],
        seconds=summary["seconds"],
        tokens_per_s=summary["tokens_seen"] / max(summary["seconds"], 1e-9),
        final_train_loss=summary["final_train_loss"],
        val_data="techdocs-val",
        val_tokens=summary["options"]["val_tokens"],
        val_ppl=final["ppl"],
    )
    run.results["training"][name] = record
    run.log(f"{name}: {record['tokens_seen']:,} tokens, validation perplexity {final['ppl']:.2f}")
    return out


def study(args: argparse.Namespace) -> Study:
    """What every step of the run shares, from the command line."""
    return Study(
        device=args.device,
        dtype=DTYPES[args.dtype],
        seed=args.seed,
        corpora=tuple(CORPORA),
        evaluation=EvaluateOptions(
            seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, batch_size=args.eval_batch_size, progress=False
        ),
        recall={
            "num_items": tuple(args.recall_items),
            "distances": tuple(args.recall_distances),
            "trials": args.recall_trials,
        },
        calibration=PruneOptions(
            data=args.calib_data,
            calib_tokens=args.calib_tokens,
            seq_len=args.calib_seq_len,
            batch_size=args.calib_batch_size,
        ),
        recover_data=args.recover_data,
        lora=FinetuneOptions(
            steps=args.lora_steps,
            batch_size=args.lora_batch_size,
            seq_len=args.lora_seq_len,
            lr=args.lora_lr,
            warmup_steps=max(1, min(20, args.lora_steps // 10)),
            save_every=0,
            max_train_tokens=args.lora_steps * args.lora_batch_size * args.lora_seq_len,
        ),
    )


def measure(path: Path, args: argparse.Namespace) -> dict:
    """Perplexity on both corpora, the recall probe and the state bytes of the model in PATH."""
    start = time.perf_counter()
    measured = pipelines.measure(path, study(args))
    row = {key: measured["ppl"][data] for data, key in CORPORA.items()}
    row.update(
        copy_accuracy=statistics.fmean(measured["recall"]["copy"]["accuracy"]),
        kv_accuracy=statistics.fmean(measured["recall"]["kv"]["accuracy"]),
        **{key: measured[key] for key in ("recall", "head_k_dim", "heads_per_layer", "state_bytes", "params")},
        eval_seconds=time.perf_counter() - start,
    )
    return row


def analyze_model(run: Run, name: str, trained: Path, args: argparse.Namespace) -> None:
    ranks = api.analyze(
        trained,
        list(CORPORA),
        run.out / "analysis" / name,
        samples=args.analysis_samples,
        seq_len=args.analysis_seq_len,
        seed=args.seed,
        batch_size=args.calib_batch_size,
        device=args.device,
        dtype=DTYPES[args.dtype],
        overwrite=True,
        progress=False,
    )
    strata = ranks["stratification"]
    run.results["analysis"][name] = {
        "rank_json": str(Path("analysis") / name / "rank.json"),
        "samples": ranks["samples"],
        "seq_len": ranks["seq_len"],
        "low": strata["low"],
        "high": strata["high"],
        "gap": strata["gap"],
        "threshold": strata["threshold"],
        "decided_at_position": strata["decided_at_position"],
        "across_samples_spearman": ranks["stability"]["across_samples_spearman"],
        "across_domains_spearman": ranks["stability"].get("across_domains_spearman"),
        "final_effective_rank": [head["effective_rank"][-1] for layer in ranks["layers"] for head in layer["heads"]],
        "capacity": [min(layer["head_k_dim"], layer["head_v_dim"]) for layer in ranks["layers"]],
        "heads": sum(len(layer["heads"]) for layer in ranks["layers"]),
        "state_shape": sorted({(layer["head_k_dim"], layer["head_v_dim"]) for layer in ranks["layers"]}),
        "seconds": ranks["seconds"],
    }
    run.ranks[name] = ranks
    in_order = {model: run.ranks[model] for model in args.models if model in run.ranks}
    plots.stratification_by_model(in_order, run.out / STRATIFICATION_PLOT)
    run.log(
        f"{name}: {strata['low']} low / {strata['high']} high heads, "
        f"Spearman across domains {ranks['stability'].get('across_domains_spearman')}"
    )


def prune_and_measure(run: Run, name: str, trained: Path, method: str, ratio: float, args) -> Path:
    kind = "heads" if method in HEAD_CRITERIA else "channels"
    out = run.out / "models" / name / "pruned" / f"{method}-{ratio}"
    report = pipelines.prune(trained, method, ratio, out, study(args))
    row = {"model": name, "kind": kind, "method": method, "ratio": ratio, "stage": "pruned", **measure(out, args)}
    row.update(seconds=report["seconds"], calib_tokens=report["calib_tokens"], path=str(out.relative_to(run.out)))
    if kind == "heads":
        row["heads_removed_per_layer"] = len(next(iter(report["removed"].values())))
    run.add_row(row)
    return out


def recover(run: Run, name: str, trained: Path, pruned: Path, method: str, args) -> None:
    for teacher in (None, trained):
        stage = "lora+kd" if teacher else "lora"
        out = run.out / "models" / name / "recovered" / f"{method}-{args.recover_ratio}-{stage}"
        summary = pipelines.recover(pruned, out, study(args), teacher=teacher)
        row = {"model": name, "kind": "recovery", "method": method, "ratio": args.recover_ratio, "stage": stage}
        row.update(measure(out, args))
        row.update(seconds=summary["seconds"], lora_tokens=summary["tokens_seen"], path=str(out.relative_to(run.out)))
        run.add_row(row)


def run_model(run: Run, name: str, args: argparse.Namespace) -> None:
    with run.stage(f"{name}: train"):
        trained = train_model(run, name, args)
    with run.stage(f"{name}: evaluate the trained model"):
        run.add_row(
            {
                "model": name,
                "kind": "none",
                "method": "none",
                "ratio": 0.0,
                "stage": "trained",
                **measure(trained, args),
                "seconds": 0.0,
                "path": str(trained.relative_to(run.out)),
            }
        )
    with run.stage(f"{name}: analyze"):
        analyze_model(run, name, trained, args)
    pruned = {}
    with run.stage(f"{name}: prune q/k channels"):
        for ratio in args.channel_ratios:
            for method in args.channel_methods:
                pruned[method, ratio] = prune_and_measure(run, name, trained, method, ratio, args)
    with run.stage(f"{name}: prune heads"):
        for ratio in args.head_ratios:
            for method in args.head_methods:
                prune_and_measure(run, name, trained, method, ratio, args)
    with run.stage(f"{name}: LoRA recovery"):
        for method in args.recover_methods:
            source = pruned.get((method, args.recover_ratio))
            if source is None:  # a recovery method or ratio outside the channel sweep
                source = prune_and_measure(run, name, trained, method, args.recover_ratio, args)
            recover(run, name, trained, source, method, args)
    if not args.keep_models:
        for folder in ("pruned", "recovered"):
            shutil.rmtree(run.out / "models" / name / folder, ignore_errors=True)
        for row in run.results["rows"]:
            if row["model"] == name and row["stage"] != "trained":
                row.pop("path", None)


#: options that may differ between a run and its --resume
RESUME_MAY_DIFFER = ("models", "resume", "overwrite", "debug")


def finished_models(results: dict) -> list[str]:
    """The models whose every stage a run finished (the last one, LoRA recovery, is recorded)."""
    stages = [stage["stage"] for stage in results["stages"]]
    done = {stage.split(": ", 1)[0] for stage in stages if stage.endswith(": LoRA recovery")}
    return [name for name in results["options"]["models"] if name in done]


def resume(run: Run, args: argparse.Namespace) -> list[str]:
    """Keep what the run in ``--out`` finished: each finished model's training, analysis, rows and stages, and its
    rank.json for the plot. Returns the models kept; refuses a run made with other options."""
    path = run.out / "results.json"
    if not path.is_file():
        raise StaterankError(f"--resume: {path} not found; start the run without --resume")
    previous = json.loads(path.read_text())
    options = {k: v for k, v in vars(args).items() if k != "out"}
    changed = sorted(
        k for k in options.keys() | previous["options"].keys()
        if k not in RESUME_MAY_DIFFER and options.get(k) != previous["options"].get(k)
    )  # fmt: skip
    if changed:
        raise StaterankError(f"--resume: the run in {run.out} was made with other {', '.join(changed)}")
    kept = []
    for name in finished_models(previous):
        rank_json = run.out / "analysis" / name / "rank.json"
        if name not in args.models or not rank_json.is_file():
            continue
        run.results["training"][name] = previous["training"][name]
        run.results["analysis"][name] = previous["analysis"][name]
        run.results["rows"] += [row for row in previous["rows"] if row["model"] == name]
        run.results["stages"] += [stage for stage in previous["stages"] if stage["stage"].startswith(f"{name}: ")]
        run.ranks[name] = json.loads(rank_json.read_text())
        kept.append(name)
    run.results["resumed"] = {
        "from_command": previous["command"],
        "from_date": previous["date"],
        "from_device": previous["device"],
        "kept_models": kept,
    }
    return kept


# -- Markdown ----------------------------------------------------------------------------------------------------


def _shapes(analysis: dict) -> str:
    return ", ".join(f"{k} × {v}" for k, v in analysis.get("state_shape", []))


def markdown(results: dict) -> str:
    """results.md: the run's header, then one table per part of the study, then every row and the stage times."""
    options, rows = results["options"], results["rows"]
    parts = [_header(results)]
    if results["training"]:
        parts.append("## Training\n")
        header = [
            "model",
            "parameters",
            "steps × batch × seq",
            "tokens seen",
            "training s",
            "tokens/s",
            "validation ppl (techdocs-val)",
        ]
        table = [
            [
                name,
                f"{t['params']:,}",
                f"{t['steps']} × {t['batch_size']} × {t['seq_len']}",
                f"{t['tokens_seen']:,}",
                f"{t['seconds']:.0f}",
                f"{t['tokens_per_s']:,.0f}",
                f"{t['val_ppl']:.2f}",
            ]
            for name, t in results["training"].items()
        ]
        parts.append(_table(header, table))
    if results["analysis"]:
        parts.append("## State-rank stratification\n")
        header = [
            "model",
            "heads (d_k × d_v)",
            "low / high heads",
            "gap",
            "groups fixed by token",
            "Spearman across samples",
            "across domains (techdocs-val, wikitext-2)",
        ]
        table = [
            [
                name,
                f"{a.get('heads', a['low'] + a['high'])} ({_shapes(a)})",
                f"{a['low']} / {a['high']}",
                f"{a['gap']:.3f}",
                str(a["decided_at_position"]["max"]),
                _number(a["across_samples_spearman"]),
                _number(a["across_domains_spearman"]),
            ]
            for name, a in results["analysis"].items()
        ]
        parts.append(_table(header, table))
        parts.append(f"![every head's final effective rank / capacity, by model and group]({STRATIFICATION_PLOT})\n")
    parts.append(_pivot(rows, "channels", "Q/K channel pruning", options["channel_ratios"]))
    parts.append(_pivot(rows, "heads", "Head pruning", options["head_ratios"]))
    recovered = {(r["model"], r["method"], r["ratio"]) for r in rows if r["kind"] == "recovery"}
    recovery = [r for r in rows if r["kind"] == "none" or (r["model"], r["method"], r["ratio"]) in recovered]
    if any(r["kind"] == "recovery" for r in recovery):
        parts.append(
            f"## Recovery at ratio {options['recover_ratio']}: LoRA ({options['lora_steps']} steps of "
            f"{options['lora_batch_size']} × {options['lora_seq_len']} tokens), with and without distillation\n"
        )
        header = ["model", "method", "stage", "ppl techdocs-val", "ppl wikitext-2", "copy", "kv", "prune / fine-tune s"]
        table = [[r["model"], r["method"], r["stage"], *_ppl(r), *_recall(r), f"{r['seconds']:.0f}"] for r in recovery]
        parts.append(_table(header, table, right_from=3))
    if rows:
        parts.append("## Every row\n")
        header = [
            "model",
            "kind",
            "method",
            "ratio",
            "stage",
            "d_k",
            "heads / layer",
            "state bytes",
            "ppl techdocs-val",
            "ppl wikitext-2",
            "copy",
            "kv",
            "s",
        ]
        table = [
            [
                r["model"],
                r["kind"],
                r["method"],
                f"{r['ratio']}",
                r["stage"],
                str(r["head_k_dim"]),
                str(r["heads_per_layer"]),
                f"{r['state_bytes']:,}",
                *_ppl(r),
                *_recall(r),
                f"{r['seconds']:.1f}",
            ]
            for r in rows
        ]
        parts.append(_table(header, table, right_from=5))
    if results["stages"]:
        parts.append("## Seconds per stage\n")
        parts.append(_table(["stage", "s"], [[s["stage"], f"{s['seconds']:.1f}"] for s in results["stages"]]))
    return "\n".join(part for part in parts if part)


def _header(results: dict) -> str:
    options, device = results["options"], results["device"]
    versions_text = ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v)
    incomplete = "" if results["complete"] else " (incomplete run)"
    return (
        f"# Reproduction at small scale\n\n`{results['command']}`\n\n"
        f"Device: {device['name']} ({device['type']}); {versions_text}; date {results['date']}; seed "
        f"{results['seed']}; PyTorch kernels: {results['kernels']['torch_kernels']}; {options['dtype']}; "
        f"{results['total_seconds']:.0f} s in all{incomplete}.\n\n"
        f"Perplexity on the first {options['eval_tokens']:,} tokens of techdocs-val and of wikitext-2 test "
        f"({options['eval_seq_len']}-token windows); copy / kv: mean greedy accuracy of the recall probe, copying a "
        f"span across distances {options['recall_distances']} and looking up values among {options['recall_items']} "
        f"key-value pairs, {options['recall_trials']} trials each; state bytes: recurrent states plus convolution "
        f"caches of one sequence. Pruning calibrated on {options['calib_tokens']:,} tokens of "
        f"{options['calib_data']}, no recovery unless stated.\n"
    )


def _pivot(rows: list[dict], kind: str, title: str, ratios: list[float]) -> str:
    """Methods down, ratios across, "techdocs-val / wikitext-2" perplexity in the cells; the unpruned row first."""
    measured = {(r["model"], r["method"], r["ratio"]): r for r in rows if r["kind"] == kind}
    if not measured:
        return ""
    table = []
    for model in dict.fromkeys(model for model, _, _ in measured):
        base = next((r for r in rows if r["model"] == model and r["kind"] == "none"), None)
        if base:
            table.append([model, "none", *[" / ".join(_ppl(base))] * len(ratios)])
        for method in dict.fromkeys(method for owner, method, _ in measured if owner == model):
            cells = [
                " / ".join(_ppl(measured[key])) if key in measured else ""
                for key in ((model, method, ratio) for ratio in ratios)
            ]
            table.append([model, method, *cells])
    header = ["model", "method", *[f"ratio {ratio}" for ratio in ratios]]
    return f"## {title}: perplexity techdocs-val / wikitext-2\n\n" + _table(header, table, right_from=2)


def _table(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows]) + "\n"


def _ppl(row: dict) -> list[str]:
    return [f"{row[key]:.2f}" for key in CORPORA.values()]


def _recall(row: dict) -> list[str]:
    return [f"{row['copy_accuracy']:.3f}", f"{row['kv_accuracy']:.3f}"]


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


#: Packages the run needs at some stage, checked before the first: a missing one should not cost a training run.
NEEDED = {"fla": "the models (flash-linear-attention)", "peft": "LoRA recovery", "matplotlib": "the analysis plots"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quiet_third_party(args.debug)
    missing = [f"{name} ({use})" for name, use in NEEDED.items() if importlib.util.find_spec(name) is None]
    if missing:
        print(f"missing package(s): {', '.join(missing)}; install them first", file=sys.stderr)
        return 2
    check_output(args.out, args.overwrite or args.resume)
    torch.manual_seed(args.seed)
    transformers_logging.disable_progress_bar()  # one bar per saved model is noise in the progress lines
    set_kernels(args.kernels)
    run = Run(args, argv)
    run.log(f"device {run.results['device']['name']}, PyTorch kernels: {args.kernels}, models {', '.join(args.models)}")
    kept = resume(run, args) if args.resume else []
    if kept:
        run.log(f"resumed: kept {', '.join(kept)} as measured by {run.results['resumed']['from_date']}")
    for name in args.models:
        if name not in kept:
            run_model(run, name, args)
    run.results["complete"] = True
    run.write()
    run.log("seconds per stage:\n" + "\n".join(f"  {s['seconds']:7.1f}  {s['stage']}" for s in run.results["stages"]))
    run.log(f"wrote {run.out / 'results.json'} and {run.out / 'results.md'}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` with the staterank CLI's error contract: a user's mistake is one line and exit code 2."""
    try:
        return main(argv)
    except StaterankError as error:
        print(f"reproduce: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
