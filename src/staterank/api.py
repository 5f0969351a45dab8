"""The public Python API: one function per command. The command line is a thin layer over these functions.

    import staterank.api as sr
    sr.prune("tiny-deltanet", "rrqr", 0.5, "runs/rrqr-50", data="techdocs")
    sr.finetune("runs/rrqr-50", "techdocs", "runs/rrqr-50-lora", teacher="tiny-deltanet")

Each takes its command's options object (:mod:`staterank.options`) or its fields as keywords.
"""

from __future__ import annotations

import os

from staterank.commands import TASKS, analyze, bench, evaluate, info, load_model, prune, save_model
from staterank.io import check_output
from staterank.loading import LoadedModel
from staterank.options import DemoOptions, FinetuneOptions, TrainOptions

__all__ = [
    "TASKS", "analyze", "bench", "demo", "evaluate", "finetune", "info", "load_model", "prune", "report",
    "save_model", "train",
]  # fmt: skip


def train(
    config: str | os.PathLike, data: str | None, out: str | os.PathLike, opts: TrainOptions | None = None, **overrides
) -> dict:
    """Pretrain the model of a config file on DATA (None for a config with a task) into OUT
    (:func:`staterank.training.pretrain.train`); returns the run's summary."""
    from staterank.training.pretrain import train as pretrain

    return pretrain(config, data, out, opts, **overrides)


def finetune(
    model: str | os.PathLike | LoadedModel,
    data: str,
    out: str | os.PathLike,
    opts: FinetuneOptions | None = None,
    **overrides,
) -> dict:
    """LoRA recovery of MODEL on DATA, merged into OUT (:func:`staterank.training.lora.finetune`); returns the
    run's summary."""
    from staterank.training.lora import finetune as lora_finetune

    return lora_finetune(model, data, out, opts, **overrides)


def report(run_dir: str | os.PathLike) -> tuple[os.PathLike, os.PathLike]:
    """Write RUN_DIR/report.md and a self-contained RUN_DIR/report.html from whatever the run directory holds;
    returns their paths."""
    from staterank.report import write_report

    return write_report(run_dir)


def demo(out: str | os.PathLike = "runs/demo", opts: DemoOptions | None = None, say=print) -> dict:
    """The whole pipeline on a bundled model (:func:`staterank.pipelines.demo`), its lines passed to ``say``."""
    from staterank.pipelines import demo as run_demo

    check_output(out, overwrite=True)  # the demo replaces what an earlier demo wrote; the path must be writable
    return run_demo(out, opts, say)
