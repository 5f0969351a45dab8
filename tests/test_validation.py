"""Bad input at the boundary: every command refuses a meaningless option in one line, exit code 2, before any work.

The tables name each option's kind of value and the values of that kind that mean nothing (zero,
negative, NaN, infinity, out of range, not a number); every command is run in-process on each, with
model loading replaced by a failure, so a value that got as far as loading a model fails the test.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from staterank import api, commands, validate
from staterank.cli import build_parser, main
from staterank.errors import StaterankError
from staterank.training.lora import finetune
from staterank.training.pretrain import train

MODEL = "tiny-deltanet"

# kind of option -> (values that mean nothing, what the message says is expected)
BAD_VALUES = {
    "positive int": (["0", "-3", "1.5", "nan", "inf", "abc"], "integer >= 1"),
    "sequence length": (["1", "0", "-3", "nan", "abc"], "integer >= 2"),
    "non-negative int": (["-1", "1.5", "inf", "abc"], "integer >= 0"),
    "positive number": (["0", "-1", "-0.0", "nan", "inf", "-inf", "abc"], "finite number > 0"),
    "fraction": (["1", "1.5", "-0.1", "nan", "inf", "abc"], "[0, 1)"),
    "probability": (["1.01", "-0.1", "nan", "inf", "abc"], "[0, 1]"),
    "open unit": (["0", "1", "-1e-4", "nan", "abc"], "(0, 1)"),
    "positive ints": (["0", "64,-2", "64,x", ",", "1.5"], "comma-separated integers >= 1"),
    "positive ints or none": (["0", "1,-2", "1,x", "nan"], "comma-separated integers >= 1"),
    "seed": (["4294967296", "-4294967296", "1.5", "abc"], "integer between"),
    "device": (["gpu", "cuda:x", ""], "cpu, cuda or cuda:N"),
}

# command -> (arguments that are valid on their own, {option: kind}); {tmp}, {config} are filled in per test.
COMMANDS = {
    "info": ([MODEL], {"--seed": "seed", "--device": "device"}),
    "evaluate": (
        [MODEL, "--data", "techdocs-val", "--out", "{tmp}/eval.json"],
        {
            "--stride": "positive int", "--lm-eval-limit": "positive int", "--seq-len": "sequence length",
            "--max-tokens": "positive int", "--batch-size": "positive int", "--seed": "seed", "--device": "device",
        },
    ),
    "analyze": (
        [MODEL, "--data", "techdocs-val", "--out", "{tmp}/analysis"],
        {
            "--samples": "positive int", "--seq-len": "positive int", "--positions": "positive ints",
            "--eps": "open unit", "--batch-size": "positive int", "--seed": "seed", "--device": "device",
        },
    ),
    "prune": (
        [MODEL, "--method", "l1", "--ratio", "0.5", "--out", "{tmp}/pruned"],
        {
            "--ratio": "fraction", "--alpha": "probability", "--calib-tokens": "positive int",
            "--seq-len": "positive int", "--align": "positive int", "--batch-size": "positive int", "--seed": "seed",
            "--device": "device",
        },
    ),
    "finetune": (
        [MODEL, "--data", "techdocs", "--out", "{tmp}/finetuned"],
        {
            "--kd-temp": "positive number", "--kd-weight": "probability", "--lora-rank": "positive int",
            "--lora-alpha": "positive number", "--steps": "positive int", "--batch-size": "positive int",
            "--seq-len": "sequence length", "--lr": "positive number", "--grad-clip": "positive number",
            "--save-every": "non-negative int", "--seed": "seed", "--device": "device",
        },
    ),
    "bench": (
        [MODEL, "--out", "{tmp}/bench.json"],
        {
            "--batch-size": "positive int", "--seq-len": "positive int",
            "--decode-batch-sizes": "positive ints or none", "--decode-steps": "positive int",
            "--warmup": "non-negative int", "--repeats": "positive int", "--memory-budget-gib": "positive number",
            "--seed": "seed", "--device": "device",
        },
    ),
    "report": (["{tmp}"], {"--seed": "seed"}),
    "train": (
        ["{config}", "--data", "techdocs", "--out", "{tmp}/trained"],
        {
            "--steps": "positive int", "--batch-size": "positive int", "--seq-len": "sequence length",
            "--lr": "positive number", "--seed": "seed", "--device": "device",
        },
    ),
    "demo": (["--out", "{tmp}/demo"], {"--seed": "seed", "--device": "device"}),
}  # fmt: skip

#: The commands that write, and the --out they write: refused when a file stands where a directory must be.
WRITERS = {"evaluate": "eval.json", "analyze": "analysis", "prune": "pruned", "finetune": "finetuned",
           "bench": "bench.json", "train": "trained", "demo": "demo"}  # fmt: skip


def _with_out(command: str, out: str) -> list[str]:
    argv = list(COMMANDS[command][0])
    argv[argv.index("--out") + 1] = out
    return [command, *argv]


def _rows() -> list:
    rows = []
    for command, (argv, options) in COMMANDS.items():
        for option, kind in options.items():
            values, expected = BAD_VALUES[kind]
            for value in values:
                message = ["argument " + option, expected, value]
                argument = f"{option}={value}"  # with "=": argparse takes "-inf" for an option otherwise
                rows.append(pytest.param([command, *argv, argument], message, id=f"{command} {argument}"))
    for command in WRITERS:
        rows.append(pytest.param(_with_out(command, "{file}/sub"), ["is a file, not a directory"], id=f"{command} "
                                 "--out under a file"))  # fmt: skip
        rows.append(pytest.param(_with_out(command, "{read_only}/sub"), ["no permission to write"], id=f"{command} "
                                 "--out in a read-only directory"))  # fmt: skip
    # Values argparse accepts on their own, which the API refuses before loading anything.
    rows += [
        pytest.param(["evaluate", MODEL, "--data", "techdocs-val", "--stride", "600"], ["--stride must be in"],
                     id="evaluate --stride beyond --seq-len"),
        pytest.param(["evaluate", MODEL, "--tasks", "nope"], ["unknown task"], id="evaluate --tasks unknown"),
        pytest.param(["analyze", MODEL, "--data", "techdocs-val", "--out", "{tmp}/a", "--positions", "4096"],
                     ["beyond the sequence length"], id="analyze --positions beyond --seq-len"),
        pytest.param(["bench", MODEL, "--dtype", "float8"], ["--dtype", "float32"], id="bench --dtype unknown"),
        pytest.param(["train", "{bad_config}", "--data", "techdocs", "--out", "{tmp}/trained"],
                     ["lr must be a finite number > 0"], id="train config lr -1"),
    ]  # fmt: skip
    return rows


def _no_loading(*args, **kwargs):
    raise AssertionError("a model was loaded (or a tokenizer trained) for input that should have been refused")


@pytest.fixture
def paths(tmp_path, monkeypatch) -> dict[str, str]:
    """The placeholders of the tables, with model loading and tokenizer training replaced by a failure."""
    monkeypatch.setattr(commands, "load", _no_loading)
    monkeypatch.setattr("staterank.training.pretrain.train_tokenizer", _no_loading)
    (tmp_path / "file").write_text("a file where a directory would have to be")
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    # Tests may run as root, for whom every directory is writable: os.access says no for this one instead.
    access = os.access
    monkeypatch.setattr(validate.os, "access", lambda path, mode: Path(path) != read_only and access(path, mode))
    config = {"model_type": "delta_net", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 300}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "bad-config.json").write_text(json.dumps({**config, "train": {"lr": -1}}))
    return {"tmp": str(tmp_path), "file": str(tmp_path / "file"), "read_only": str(read_only),
            "config": str(tmp_path / "config.json"), "bad_config": str(tmp_path / "bad-config.json")}  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), _rows())
def test_bad_input_is_one_line_and_exit_code_2_before_any_work(argv, message, paths, tmp_path, capsys):
    argv = [item.format(**paths) for item in argv]
    before = sorted(tmp_path.rglob("*"))
    assert main(argv) == 2  # argparse's errors too: main returns its exit code
    out, err = capsys.readouterr()
    assert err.startswith("staterank: error: ") and err.count("\n") == 1 and out == "", err
    for fragment in message:
        assert fragment in err, err
    if message[0].startswith("argument "):
        assert err.startswith(f"staterank: error: {argv[0]}: argument "), err
    assert sorted(tmp_path.rglob("*")) == before  # no output, not even a temporary one


# API calls that must be refused before a model is loaded: (call on a directory to write in, message).
API_ROWS = [
    (lambda d: api.prune(MODEL, "l1", 0.5, d / "p", seq_len=0), "seq_len must be"),
    (lambda d: api.prune(MODEL, "l1", 0.5, d / "p", calib_tokens=-1), "calib_tokens must be"),
    (lambda d: api.prune(MODEL, "l1", math.nan, d / "p"), "ratio"),
    (lambda d: api.prune(MODEL, "l1", 0.5, d / "file" / "sub"), "is a file"),
    (lambda d: api.analyze(MODEL, "techdocs-val", d / "a", batch_size=0), "batch_size must be"),
    (lambda d: api.analyze(MODEL, "techdocs-val", d / "a", positions=[]), "no positions"),
    (lambda d: api.analyze(MODEL, "techdocs-val", d / "a", eps=math.nan), "eps"),
    (lambda d: api.evaluate(MODEL, "techdocs-val", batch_size=0), "batch_size must be"),
    (lambda d: api.evaluate(MODEL, "techdocs-val", max_tokens=0), "max_tokens must be"),
    (lambda d: api.bench([MODEL], memory_budget_gib=math.inf), "memory_budget_gib must be"),
    (lambda d: api.bench([MODEL], d / "file" / "bench.json"), "is a file"),
    (lambda d: finetune(MODEL, "techdocs", d / "f", lr=-1), "lr must be"),
    (lambda d: finetune(MODEL, "techdocs", d / "f", kd_temp=math.nan), "kd_temp must be"),
    (lambda d: finetune(MODEL, "techdocs", d / "f", grad_clip=math.inf), "grad_clip must be"),
    (lambda d: finetune(MODEL, "techdocs", d / "file" / "sub"), "is a file"),
    (lambda d: train(d / "config.json", "techdocs", d / "t", warmup_steps=-1), "warmup_steps must be"),
    (lambda d: train(d / "config.json", "techdocs", d / "t", seq_len=1), "seq_len must be"),
    (lambda d: train(d / "config.json", "techdocs", d / "file" / "sub"), "is a file"),
]


@pytest.mark.parametrize(("call", "message"), API_ROWS)
def test_the_api_refuses_the_same_values_before_loading(call, message, paths, tmp_path):
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(StaterankError, match=message.replace("(", r"\(")):
        call(tmp_path)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("argv", "option", "value"),
    [
        (["prune", MODEL, "--method", "l1", "--out", "o", "--ratio", "0"], "ratio", 0.0),
        (["prune", MODEL, "--method", "jrnp", "--ratio", "0.5", "--out", "o", "--alpha", "0"], "alpha", 0.0),
        (["prune", MODEL, "--method", "jrnp", "--ratio", "0.5", "--out", "o", "--alpha", "1"], "alpha", 1.0),
        (["finetune", MODEL, "--data", "d", "--out", "o", "--kd-weight", "0"], "kd_weight", 0.0),
        (["finetune", MODEL, "--data", "d", "--out", "o", "--save-every", "0"], "save_every", 0),
        (["bench", MODEL, "--decode-batch-sizes", ""], "decode_batch_sizes", []),
        (["bench", MODEL, "--decode-batch-sizes", "1, 64,"], "decode_batch_sizes", [1, 64]),
        (["bench", MODEL, "--warmup", "0"], "warmup", 0),
        (["analyze", MODEL, "--data", "d", "--out", "o", "--positions", "1,2048"], "positions", [1, 2048]),
        (["evaluate", MODEL, "--seq-len", "2"], "seq_len", 2),
        (["info", MODEL, "--seed", "-1"], "seed", -1),
        (["demo"], "device", "cpu"),
    ],
)
def test_meaningful_edge_values_still_parse(argv, option, value):
    assert getattr(build_parser().parse_args(argv), option) == value


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_still_prints_usage(command, capsys):
    assert main([command, "--help"] if command else ["--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: staterank {command}".rstrip()) and err == ""
