"""Pipelines of several commands: the demo, and the steps that benchmarks/reproduce.py repeats over a grid.

A :class:`Study` says what the steps share (device, seed, how much data each reads); :func:`measure`,
:func:`prune` and :func:`recover` are one step each, writing into the run directory's layout
(:mod:`staterank.layout`), which ``staterank report`` reads. :func:`demo` is the whole pipeline on a
bundled model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from staterank import commands, layout
from staterank.io import write_json
from staterank.loading import LoadedModel, resolve
from staterank.options import DemoOptions, EvaluateOptions, FinetuneOptions, PruneOptions

Model = str | os.PathLike | LoadedModel


@dataclass
class Study:
    """What the steps of a study share: where they run, and the options of each step's command."""

    device: str | None = None
    dtype: torch.dtype | None = None  # None: float32 on CPU, bfloat16 on GPU
    seed: int = 0
    corpora: tuple[str, ...] = ("techdocs-val", "wikitext-test")  # perplexity on each
    evaluation: EvaluateOptions = field(
        default_factory=lambda: EvaluateOptions(seq_len=512, max_tokens=32768, batch_size=8, progress=False)
    )
    recall: dict[str, Any] = field(default_factory=dict)  # keyword arguments of evaluate.recall
    calibration: PruneOptions = field(
        default_factory=lambda: PruneOptions(data="techdocs", calib_tokens=16384, seq_len=512, batch_size=4)
    )
    recover_data: str = "techdocs"
    lora: FinetuneOptions = field(
        default_factory=lambda: FinetuneOptions(steps=40, batch_size=4, seq_len=512, lr=1e-3, warmup_steps=5)
    )

    def where(self) -> dict[str, Any]:
        """The fields every step's options take from the study."""
        return {"seed": self.seed, "device": self.device, "progress": False}


def measure(model: Model, study: Study, run_dir: Path | None = None) -> dict[str, Any]:
    """Perplexity on every corpus, the recall probe and the state of MODEL; each evaluation is written into
    ``run_dir`` (as ``staterank evaluate --out`` writes it) when one is given."""
    from staterank import evaluation

    loaded = commands.load_model(model, device=study.device, dtype=study.dtype)  # a LoadedModel passes through
    ppl = {}
    for data in study.corpora:
        result = commands.evaluate(loaded, data, study.evaluation.replace(**study.where()))
        ppl[data] = result["ppl"]
        if run_dir is not None:
            write_json(layout.eval_path(run_dir, loaded.path, data), result)
    recall = evaluation.recall(loaded, seed=study.seed, batch_size=study.evaluation.batch_size, **study.recall)
    if run_dir is not None:
        write_json(layout.eval_path(run_dir, loaded.path, None), {"model": str(loaded.path), "data": None,
                                                                   "recall": recall})  # fmt: skip
    shape = loaded.adapter.shapes()[0]
    return {
        "ppl": ppl,
        "recall": recall,
        "head_k_dim": shape.head_k_dim,
        "heads_per_layer": shape.num_v_heads,
        "state_bytes": loaded.adapter.state_bytes_per_seq(),
        "params": sum(p.numel() for p in loaded.model.parameters()),
    }


def prune(model: Model, method: str, ratio: float, out: Path, study: Study) -> dict[str, Any]:
    """``staterank prune`` with the study's calibration, into OUT (replaced if it exists)."""
    opts = study.calibration.replace(**study.where(), dtype=study.dtype, overwrite=True)
    return commands.prune(model, method, ratio, out, opts)


def recover(pruned: Path, out: Path, study: Study, teacher: Model | None = None) -> dict[str, Any]:
    """``staterank finetune`` of a pruned model with the study's LoRA options, into OUT (replaced if it exists)."""
    from staterank.training.lora import finetune  # imports PEFT, which a study may check for first

    return finetune(pruned, study.recover_data, out, study.lora.replace(**study.where(), teacher=teacher,
                                                                            overwrite=True))  # fmt: skip


def demo(out: str | os.PathLike, opts: DemoOptions | None = None, say: Callable[[str], None] = print) -> dict:
    """info, analyze, evaluate, prune (rrqr and l1, half the q/k channels), LoRA recovery, evaluate again,
    bench and report, on a bundled model on CPU in minutes. ``say`` gets a line per stage; returns the
    perplexity table, the bench result and the report's path."""
    from staterank.report import write_report

    opts = opts or DemoOptions()
    out = Path(out)
    study = Study(device=opts.device, seed=opts.seed)
    say(f"== info: {opts.model}")
    info = commands.info(opts.model, device=opts.device)
    write_json(out / layout.INFO, info)
    say("== analyze: state ranks of every head (techdocs-val against wikitext-2)")
    ranks = commands.analyze(
        opts.model,
        list(study.corpora),
        out / layout.ANALYSIS,
        samples=2,
        seq_len=1024,
        seed=opts.seed,
        device=opts.device,
        overwrite=True,
        progress=False,
    )
    strata = ranks["stratification"]
    say(f"{strata['low']} low-rank and {strata['high']} high-rank heads; plots in {out / layout.ANALYSIS}/")
    say("== evaluate: perplexity before pruning")
    table = {"original": measure(opts.model, study, out)["ppl"]}
    recovered = []
    for method in ("rrqr", "l1"):
        pruned = layout.pruned_dir(out, method, 0.5)
        say(f"== prune: {method}, half of the q/k channels of every head")
        report = prune(opts.model, method, 0.5, pruned, study)
        say(
            f"d_k {report['head_k_dim_before']} -> {report['head_k_dim_after']}, state bytes per sequence "
            f"{report['state_bytes_before']:,} -> {report['state_bytes_after']:,}"
        )
        table[f"{method} 50%"] = measure(pruned, study, out)["ppl"]
        say(f"== finetune: short LoRA recovery of the {method} model")
        lora = layout.recovered_dir(pruned)
        recover(pruned, lora, study)
        table[f"{method} + LoRA"] = measure(lora, study, out)["ppl"]
        recovered.append(lora)
    recall_table = recall_story(opts, out, say)
    say("== bench: original against the recovered models")
    speed = commands.bench(
        [opts.model, *map(str, recovered)],
        out / layout.BENCH,
        batch_size=4,
        seq_len=512,
        decode_batch_sizes=(1, 16),
        decode_steps=16,
        repeats=3,
        device=opts.device,
        overwrite=True,
        seed=opts.seed,
    )
    _, page = write_report(out)
    return {"perplexity": table, "mqar": recall_table, "corpora": list(study.corpora), "bench": speed, "report": page}


RECALL_MODEL = "mqar-deltanet"  # the bundled recall model of the demo's recall part


def recall_story(opts: DemoOptions, out: Path, say: Callable[[str], None]) -> dict[str, float]:
    """The demo's recall part: MQAR accuracy of the bundled recall model, pruned (rrqr, half the q/k channels,
    calibrated on MQAR examples) and recovered (LoRA with the original as teacher, on MQAR examples)."""
    from staterank import mqar

    seq_len = mqar.read_layout(resolve(RECALL_MODEL)).seq_len
    study = Study(
        device=opts.device,
        seed=opts.seed,
        calibration=PruneOptions(data="mqar", calib_tokens=64 * seq_len, seq_len=seq_len, batch_size=16, align=1),
        recover_data="mqar",
        lora=FinetuneOptions(steps=60, batch_size=32, seq_len=seq_len, lr=1e-3, warmup_steps=5, save_every=0),
    )

    def accuracy(model: Model) -> float:
        options = EvaluateOptions(tasks=["mqar"], mqar_examples=300, batch_size=64, **study.where())
        result = commands.evaluate(model, None, options)
        write_json(layout.eval_path(out, result["model"], "mqar"), result)
        return result["mqar"]["accuracy"]

    say(f"== recall: MQAR accuracy of {RECALL_MODEL}, pruned and recovered on its own task")
    table = {"original": accuracy(RECALL_MODEL)}
    pruned = layout.pruned_dir(out, "mqar-rrqr", 0.5)
    prune(RECALL_MODEL, "rrqr", 0.5, pruned, study)
    table["rrqr 50%"] = accuracy(pruned)
    lora = layout.recovered_dir(pruned)
    recover(pruned, lora, study, teacher=RECALL_MODEL)
    table["rrqr + LoRA"] = accuracy(lora)
    say("MQAR accuracy: " + ", ".join(f"{name} {value:.3f}" for name, value in table.items()))
    return table
