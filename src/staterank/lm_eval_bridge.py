"""Run lm-evaluation-harness tasks on an already loaded model, in process (the optional ``staterank[eval]`` extra).

The tasks shipped in :mod:`staterank.lm_eval_tasks` (e.g. ``staterank_techdocs_lastword``) are always
available and run offline; lm-eval's own tasks need their datasets in the Hugging Face cache or a network.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from staterank.errors import StaterankError
from staterank.loading import LoadedModel

#: The folder of the task definitions shipped with staterank.
SHIPPED_TASKS = Path(__file__).with_name("lm_eval_tasks")


def _json_value(value):
    """A metric value as JSON can hold it: numbers as floats (NaN and inf as None), the rest as strings."""
    if isinstance(value, bool | int | float):
        return float(value) if math.isfinite(value) else None
    return value if isinstance(value, str) else str(value)


def run_lm_eval(
    loaded: LoadedModel,
    tasks: list[str],
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> dict:
    """Evaluate ``loaded`` on lm-eval ``tasks``; returns {task: {metric: value}} (lm-eval's "results").

    ``limit`` caps the documents per task (a count, or a fraction below 1). ``include_path`` is a
    folder of extra task YAMLs, searched together with the shipped ones. Metric names keep lm-eval's
    "metric,filter" form, e.g. "acc,none" and "acc_stderr,none".
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise StaterankError("lm-eval tasks need lm-evaluation-harness: pip install 'staterank[eval]'") from None

    paths = [str(SHIPPED_TASKS)] + ([str(include_path)] if include_path is not None else [])
    manager = TaskManager(include_path=paths)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise StaterankError(f"unknown lm-eval task(s) {unknown} (add their folder with include_path)")
    for task in tasks:  # building a task loads its dataset: fail here with the task's name
        try:
            manager.load([task])
        except Exception as e:  # datasets/hub raise many types for "not cached and no network"
            raise StaterankError(
                f"lm-eval task {task!r}: its dataset is not available locally "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
            ) from None

    model = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return {
        task: {metric: _json_value(value) for metric, value in metrics.items() if metric != "alias"}
        for task, metrics in output["results"].items()
    }
