"""The file names of a run directory, in one place: the demo and benchmarks/reproduce.py write them,
``staterank report`` reads them.

    RUN/info.json                      staterank info --json of the source model
    RUN/analysis/.../rank.json         staterank analyze (with its CSVs and plots)
    RUN/<model>/pruning.json           a pruned model (staterank prune), <model>-lora its recovery
    RUN/eval-<model>-<data>.json       staterank evaluate of one model on one corpus (or "recall")
    RUN/bench.json                     staterank bench
    RUN/report.md, RUN/report.html     staterank report
"""

from __future__ import annotations

from pathlib import Path

INFO = "info.json"
RANK = "rank.json"
PRUNING = "pruning.json"
BENCH = "bench.json"
ANALYSIS = "analysis"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
PERPLEXITY_CHART = "perplexity.png"
RATIO_CHART = "perplexity_vs_ratio.png"
EVAL_GLOB = "eval-*.json"
RECALL = "recall"  # the <data> part of an evaluation without a corpus


def model_name(model: str | Path) -> str:
    """How a run names a model: its directory's (or bundled) name."""
    return Path(str(model)).name


def eval_path(run_dir: Path, model: str | Path, data: str | None) -> Path:
    """Where the evaluation of ``model`` on ``data`` (None: the recall probe) goes."""
    return Path(run_dir) / f"eval-{model_name(model)}-{data or RECALL}.json"


def pruned_dir(run_dir: Path, method: str, ratio: float) -> Path:
    """The model pruned with ``method`` at ``ratio``: rrqr at 0.5 -> RUN/rrqr-50."""
    return Path(run_dir) / f"{method}-{round(ratio * 100)}"


def recovered_dir(pruned: Path) -> Path:
    """The LoRA recovery of a pruned model: RUN/rrqr-50 -> RUN/rrqr-50-lora."""
    return pruned.with_name(f"{pruned.name}-lora")
