"""Data-parallel runs (2 processes, gloo on CPU) against one-process runs over the same data, and bad launches.

One torchrun launch of ``distributed_worker.py`` calibrates, prunes, evaluates, analyses and
fine-tunes (interrupted and resumed) with two ranks; each test repeats one of those in this
process and checks that the results agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_worker import ANALYZE, CALIBRATION, EVALUATE, FINETUNE, PRUNE, SHARDED
from reference import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from staterank import api, cli, distributed
from staterank.analysis import METRICS
from staterank.calibrate import calibrate
from staterank.data import load_sequences, read_documents
from staterank.loading import prepare_runtime
from staterank.tokenizer import train_tokenizer
from staterank.training.lora import finetune

prepare_runtime("delta_net")
TESTS = Path(__file__).parent
TIMEOUT_S = 240  # a hang fails the test instead of blocking CI


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny DeltaNets of the same shape with different weights, and their tokenizer."""
    tokenizer = train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)
    paths = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"model{seed}")
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(tiny_config("delta_net", len(tokenizer))).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def _env(**values: object) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in distributed.RENDEZVOUS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]))
    env.update({k: str(v) for k, v in values.items()})
    return env


@pytest.fixture(scope="module")
def parallel(models, tmp_path_factory) -> Path:
    """The worker's outputs from a torchrun launch of two ranks."""
    workdir = tmp_path_factory.mktemp("parallel")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(TESTS / "distributed_worker.py"), str(models[0]), str(workdir)]  # fmt: skip
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def test_calibration_statistics_are_the_sums_of_one_process(models, parallel):
    loaded = api.load_model(models[0], device="cpu")
    sequences = load_sequences(
        CALIBRATION["data"], loaded.tokenizer, CALIBRATION["seq_len"], max_tokens=CALIBRATION["max_tokens"],
        shuffle=True, seed=0,
    )  # fmt: skip
    one = calibrate(loaded.adapter, sequences, batch_size=CALIBRATION["batch_size"], gradients=True, progress=False)
    two = torch.load(parallel / "calibration.pt", weights_only=False)
    assert set(two) == set(one.layers)
    for layer, stats in one.layers.items():
        assert two[layer]["tokens"] == stats.tokens == sequences.numel() and two[layer]["grad_batches"] == 8
        for name in ("gram_q", "gram_k", "gram_q_normed", "gram_k_normed", "input_sq", "taylor_q", "taylor_k"):
            torch.testing.assert_close(two[layer][name], getattr(stats, name), rtol=1e-10, atol=1e-12)


def test_pruning_keeps_the_channels_of_one_process(models, parallel, tmp_path):
    report = api.prune(
        models[0], "rrqr", 0.5, tmp_path / "one", data="techdocs-val", calib_tokens=512, seq_len=32,
        batch_size=int(_option(PRUNE, "--batch-size")), device="cpu", progress=False,
    )  # fmt: skip
    two = json.loads((parallel / "pruned" / "pruning.json").read_text())
    assert two["kept"] == report["kept"] and two["calib_tokens"] == report["calib_tokens"] == 512
    one_weights, two_weights = load_file(tmp_path / "one" / "model.safetensors"), load_file(
        parallel / "pruned" / "model.safetensors"
    )
    assert one_weights.keys() == two_weights.keys()
    for name, value in one_weights.items():
        torch.testing.assert_close(two_weights[name], value, rtol=0, atol=0)


def test_evaluation_sums_nll_and_tokens_over_ranks(models, parallel):
    one = api.evaluate(
        models[0], "techdocs-val", tasks=["ppl", "ppl-by-position"], seq_len=32, stride=16, max_tokens=1024,
        batch_size=int(_option(EVALUATE, "--batch-size")), device="cpu", progress=False,
    )  # fmt: skip
    two = json.loads((parallel / "evaluate.json").read_text())
    assert two["tokens"] == one["tokens"] == 31 + (one["windows"] - 1) * 16
    assert two["nll"] == pytest.approx(one["nll"], rel=1e-6) and two["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
    assert two["by_position"]["tokens"] == one["by_position"]["tokens"]
    assert two["by_position"]["nll"] == pytest.approx(one["by_position"]["nll"], rel=1e-6)


def test_analysis_gathers_the_metrics_of_one_process(models, parallel, tmp_path):
    one = api.analyze(
        models[0], "techdocs-val", tmp_path / "one", samples=int(_option(ANALYZE, "--samples")),
        seq_len=int(_option(ANALYZE, "--seq-len")), device="cpu", progress=False,
    )  # fmt: skip
    two = json.loads((parallel / "analysis" / "rank.json").read_text())
    assert two["positions"] == one["positions"] and two["samples"] == one["samples"] == 4
    for layer_one, layer_two in zip(one["layers"], two["layers"], strict=True):
        for head_one, head_two in zip(layer_one["heads"], layer_two["heads"], strict=True):
            assert head_two["group"] == head_one["group"]
            for metric in METRICS:
                np.testing.assert_allclose(head_two[metric], head_one[metric], rtol=1e-6, atol=1e-9)
                np.testing.assert_allclose(head_two[f"{metric}_std"], head_one[f"{metric}_std"], rtol=1e-5, atol=1e-9)
    assert (parallel / "analysis" / "effective_rank.csv").is_file()


def test_resumed_ddp_finetune_gives_the_weights_of_one_process(models, parallel, tmp_path):
    # Interrupted at the same step as the worker, so that the loss history is logged at the same steps.
    out = tmp_path / "one"
    finetune(models[0], "techdocs-val", out, teacher=models[0], device="cpu", stop_after=3, **FINETUNE)
    summary = finetune(models[0], "techdocs-val", out, teacher=models[0], device="cpu", resume=True, **FINETUNE)
    worker = json.loads((parallel / "rank0.json").read_text())["finetune"]
    assert worker["first_steps"] == 3 and worker["steps"] == summary["steps"] == 6
    for ours, theirs in zip(worker["losses"], summary["losses"], strict=True):
        assert ours["step"] == theirs["step"] and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    one = load_file(out / "model.safetensors")
    two = load_file(parallel / "finetuned" / "model.safetensors")
    moved = [name for name in one if "q_proj" in name]
    base = load_file(models[0] / "model.safetensors")
    assert moved and all(not torch.equal(one[name], base[name]) for name in moved)  # LoRA changed them
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5)


def test_sharded_finetune_gives_the_weights_of_one_process(models, parallel, tmp_path):
    """FSDP2 over 2 ranks (teacher sharded too, 2 accumulated passes per step, interrupted and resumed), and a
    2-rank checkpoint resumed in one process, both merge to the weights of the uninterrupted one-process run."""
    out = tmp_path / "one"  # interrupted where the worker's run was, so that the losses are logged at its steps
    finetune(models[0], "techdocs-val", out, teacher=models[0], device="cpu", stop_after=3, **FINETUNE)
    summary = finetune(models[0], "techdocs-val", out, teacher=models[0], device="cpu", resume=True, **FINETUNE)
    one = load_file(out / "model.safetensors")
    worker = json.loads((parallel / "rank0.json").read_text())["sharded"]
    assert worker["steps"] == summary["steps"] == 6 and worker["parallel"] == "fsdp"
    for ours, theirs in zip(worker["losses"], summary["losses"], strict=True):
        assert ours["step"] == theirs["step"] and ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    half = tmp_path / "half"
    shutil.copytree(parallel / "sharded-half", half)
    resumed = finetune(models[0], "techdocs-val", half, teacher=models[0], device="cpu", resume=True, **SHARDED)
    assert resumed["world_size"] == 1 and resumed["steps"] == 6
    for other in (load_file(parallel / "sharded" / "model.safetensors"), load_file(half / "model.safetensors")):
        assert other.keys() == one.keys()
        for name, value in one.items():
            torch.testing.assert_close(other[name], value, rtol=1e-4, atol=1e-5)


def test_a_sharded_launch_whose_world_size_does_not_divide_the_batch_stops_every_rank(parallel):
    for rank in (0, 1):
        call = json.loads((parallel / f"rank{rank}.json").read_text())["sharded_uneven"]
        assert call["code"] == 2
        assert call["stderr"].count("\n") == 1 and "cannot be split evenly over 2 ranks" in call["stderr"]
    assert not (parallel / "bad").exists()


def test_a_world_size_that_does_not_divide_the_batches_stops_every_rank(parallel):
    for rank in (0, 1):
        call = json.loads((parallel / f"rank{rank}.json").read_text())["uneven"]
        assert call["code"] == 2
        assert call["stderr"].count("\n") == 1 and "cannot be split evenly over 2 ranks" in call["stderr"]
    assert not (parallel / "uneven").exists()


def _launch_two_ranks(command_for_rank) -> list[tuple[int, str]]:
    """Start two processes as ranks 0 and 1 of one run; returns (exit code, stderr) of each.

    The port is free when chosen but may be taken before rank 0 binds it; such a launch is tried again.
    """
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        processes = []
        for rank in (0, 1):
            env = _env(RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
            processes.append(subprocess.Popen(command_for_rank(rank), env=env, **pipes))
        outcomes = []
        for process in processes:
            try:
                _, stderr = process.communicate(timeout=TIMEOUT_S)
            finally:
                process.kill()
            outcomes.append((process.returncode, stderr))
        if not any("address already in use" in stderr.lower() for _, stderr in outcomes):
            return outcomes
    return outcomes


def test_ranks_that_loaded_different_models_stop_with_exit_2(models, tmp_path):
    def command(rank: int) -> list[str]:
        return [sys.executable, "-m", "staterank", "evaluate", str(models[rank]), "--data", "techdocs-val",
                "--seq-len", "32", "--max-tokens", "256", "--batch-size", "4", "--device", "cpu",
                "--out", str(tmp_path / "e.json")]  # fmt: skip

    for returncode, stderr in _launch_two_ranks(command):
        errors = [line for line in stderr.splitlines() if line.startswith("staterank")]
        assert returncode == 2, stderr
        assert len(errors) == 1 and "ranks disagree on the model" in errors[0], stderr
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT not set"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}, "MASTER_ADDR not set"),
        ({"WORLD_SIZE": "2"}, "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"),
        ({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "integers"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "outside"),
    ],
)
def test_an_incomplete_launch_is_one_line_and_exit_2(environment, message, monkeypatch, capsys):
    for name in distributed.RENDEZVOUS:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_WORLD", None)
    assert cli.main(["evaluate", "tiny-deltanet", "--data", "techdocs-val", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("staterank: error: ") and message in err


def test_device_map_auto_gives_the_statistics_of_a_plain_load(models):
    plain = api.load_model(models[0], device="cpu")
    mapped = api.load_model(models[0], device_map="auto")
    sequences = load_sequences("techdocs-val", plain.tokenizer, 32, max_tokens=256)
    one = calibrate(plain.adapter, sequences, batch_size=4, progress=False)
    two = calibrate(mapped.adapter, sequences, batch_size=4, progress=False)
    for layer, stats in one.layers.items():
        torch.testing.assert_close(two[layer].gram_k, stats.gram_k, rtol=1e-10, atol=1e-12)


def test_device_map_and_device_exclude_each_other(models, capsys):
    assert cli.main(["info", str(models[0]), "--device", "cpu", "--device-map", "auto"]) == 2
    assert "exclude each other" in capsys.readouterr().err
