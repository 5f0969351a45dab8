"""One rank of the data-parallel runs that tests/test_distributed.py compares with one-process runs.

Launched twice by ``python -m torch.distributed.run --nproc-per-node 2 distributed_worker.py MODEL WORKDIR``.
Rank 0's outputs land in WORKDIR; every rank also writes ``rank{R}.json`` with the exit codes and
stderr of the CLI calls it made, and rank 0 the calibration statistics (``calibration.pt``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from staterank import api, cli, distributed
from staterank.calibrate import calibrate
from staterank.data import load_sequences
from staterank.training.lora import finetune

# The settings the test repeats in one process (kept here, beside the calls, and imported by the test).
CALIBRATION = {"data": "techdocs-val", "seq_len": 32, "max_tokens": 512, "batch_size": 2}
PRUNE = ["--method", "rrqr", "--ratio", "0.5", "--data", "techdocs-val", "--calib-tokens", "512", "--seq-len", "32",
         "--batch-size", "2", "--device", "cpu"]  # fmt: skip
EVALUATE = ["--data", "techdocs-val", "--tasks", "ppl,ppl-by-position", "--seq-len", "32", "--stride", "16",
            "--max-tokens", "1024", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
ANALYZE = ["--data", "techdocs-val", "--samples", "4", "--seq-len", "64", "--device", "cpu"]
FINETUNE = {"steps": 6, "batch_size": 4, "seq_len": 32, "max_train_tokens": 512, "lr": 3e-2, "warmup_steps": 1,
            "lora_rank": 4, "lora_alpha": 8, "kd_weight": 0.5, "save_every": 0, "progress": False}  # fmt: skip
#: Sharded (FSDP2) with every rank's 2 rows of a batch in 2 passes of 1: the same run as FINETUNE's.
SHARDED = {**FINETUNE, "parallel": "fsdp", "grad_accum": 2}
#: 3 sequences in batches of 1: 3 batches do not split over 2 ranks.
UNEVEN = ["--method", "rrqr", "--ratio", "0.5", "--data", "techdocs-val", "--calib-tokens", "96", "--seq-len", "32",
          "--batch-size", "1", "--device", "cpu"]  # fmt: skip


def run_cli(argv: list[str]) -> dict:
    """Exit code and stderr of one CLI call in this process."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    return {"code": code, "stderr": stderr.getvalue()}


def main(model: str, workdir: Path) -> None:
    torch.set_num_threads(1)
    rank = distributed.world().rank
    loaded = api.load_model(model, device="cpu")
    sequences = load_sequences(
        CALIBRATION["data"], loaded.tokenizer, CALIBRATION["seq_len"], max_tokens=CALIBRATION["max_tokens"],
        shuffle=True, seed=0,
    )  # fmt: skip
    stats = calibrate(loaded.adapter, sequences, batch_size=CALIBRATION["batch_size"], gradients=True, progress=False)
    if rank == 0:
        torch.save({layer: vars(s) for layer, s in stats.layers.items()}, workdir / "calibration.pt")
    calls = {
        "prune": run_cli(["prune", model, "--out", str(workdir / "pruned"), *PRUNE]),
        "evaluate": run_cli(["evaluate", model, "--out", str(workdir / "evaluate.json"), *EVALUATE]),
        "analyze": run_cli(["analyze", model, "--out", str(workdir / "analysis"), *ANALYZE]),
        "uneven": run_cli(["prune", model, "--out", str(workdir / "uneven"), *UNEVEN]),
    }
    # Interrupted after 3 of 6 steps and resumed: the result must be the uninterrupted one-process run's.
    out = workdir / "finetuned"
    first = finetune(model, "techdocs-val", out, teacher=model, device="cpu", stop_after=3, **FINETUNE)
    last = finetune(model, "techdocs-val", out, teacher=model, device="cpu", resume=True, **FINETUNE)
    calls["finetune"] = {"first_steps": first["steps"], "steps": last["steps"], "losses": last["losses"]}
    # The same, sharded, the teacher sharded too; and one more run stopped after 3 steps, which the test resumes
    # in one process (another world size).
    sharded = workdir / "sharded"
    finetune(model, "techdocs-val", sharded, teacher=model, device="cpu", stop_after=3, **SHARDED)
    last = finetune(model, "techdocs-val", sharded, teacher=model, device="cpu", resume=True, **SHARDED)
    calls["sharded"] = {"steps": last["steps"], "losses": last["losses"], "parallel": last["parallel"]}
    finetune(model, "techdocs-val", workdir / "sharded-half", teacher=model, device="cpu", stop_after=3, **SHARDED)
    calls["sharded_uneven"] = run_cli(["finetune", model, "--data", "techdocs-val", "--out", str(workdir / "bad"),
                                       "--parallel", "fsdp", "--batch-size", "3", "--device", "cpu"])  # fmt: skip
    (workdir / f"rank{rank}.json").write_text(json.dumps(calls))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
