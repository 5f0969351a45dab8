"""The command line and the API under it: info, evaluate (perplexity), loading errors, exit codes."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig

from staterank import api
from staterank.cli import main
from staterank.data import read_documents
from staterank.loading import prepare_runtime
from staterank.tokenizer import train_tokenizer

prepare_runtime("gated_deltanet")
from fla.models import GatedDeltaNetConfig  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Gated DeltaNet (grouped value heads) with a real byte-level BPE tokenizer."""
    path = tmp_path_factory.mktemp("tiny-gdn")
    tokenizer = train_tokenizer((doc[:4000] for doc in read_documents("techdocs-val")), vocab_size=300)
    config = GatedDeltaNetConfig(
        hidden_size=32, num_hidden_layers=2, num_heads=2, num_v_heads=4, head_dim=8, expand_v=2.0,
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_info_json_fields(model_dir, capsys):
    assert main(["info", str(model_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(model_dir.resolve())
    assert info["model_type"] == "gated_deltanet"
    assert info["num_layers"] == 2 and info["linear_layers"] == [0, 1]
    assert info["layers"][0] == {"layer": 0, "num_k_heads": 2, "num_v_heads": 4, "head_k_dim": 8, "head_v_dim": 16}
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    # fp32 states [4 heads, 8, 16] + conv caches of (8*2 q + 8*2 k + 16*4 v) channels x 4 columns, fp32, per layer
    assert info["state_bytes_per_seq"] == 2 * (4 * 8 * 16 * 4 + (16 + 16 + 64) * 4 * 4)


def test_perplexity_equals_a_direct_mean_nll(model_dir):
    seq_len, max_tokens = 64, 1000
    result = api.evaluate(model_dir, "techdocs-val", seq_len=seq_len, max_tokens=max_tokens, batch_size=3,
                          progress=False)

    # Directly: tokenise the documents one by one, join with EOS, score each window token by token.
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = api.load_model(model_dir).tokenizer
    ids: list[int] = []
    for doc in read_documents("techdocs-val"):
        ids += tokenizer.encode(doc) + [tokenizer.eos_token_id]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        window = torch.tensor(ids[start : start + seq_len])[None]
        with torch.no_grad():
            log_probs = F.log_softmax(model(input_ids=window).logits[0].double(), dim=-1)
        for t in range(seq_len - 1):
            total -= log_probs[t, window[0, t + 1]].item()
            count += 1
    assert result["tokens"] == count == (max_tokens // seq_len) * (seq_len - 1)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_evaluate_writes_json_and_refuses_to_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    args = ["evaluate", str(model_dir), "--data", "wikitext-test", "--max-tokens", "600", "--seq-len", "64"]
    assert main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"model", "ppl", "tokens"} <= result.keys() and result["tokens"] == 9 * 63
    assert main([*args, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--overwrite"]) == 0


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    return err


def test_bad_input_gives_one_line_and_exit_code_2(model_dir, tmp_path, capsys):
    assert "no such model directory" in _one_line_error(capsys, ["info", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "not a model directory" in _one_line_error(capsys, ["info", str(tmp_path / "empty")])

    corrupt = tmp_path / "corrupt-config"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    assert "corrupt config" in _one_line_error(capsys, ["info", str(corrupt)])

    weights = tmp_path / "corrupt-weights"
    weights.mkdir()
    for file in model_dir.iterdir():
        (weights / file.name).write_bytes(file.read_bytes())
    (weights / "model.safetensors").write_bytes(b"\x00" * 64)
    assert "cannot load the model" in _one_line_error(capsys, ["info", str(weights)])

    untokenized = tmp_path / "no-tokenizer"  # transformers' message for this spans several lines
    untokenized.mkdir()
    for file in model_dir.iterdir():
        if file.name in ("config.json", "model.safetensors"):
            (untokenized / file.name).write_bytes(file.read_bytes())
    assert "cannot load the tokenizer" in _one_line_error(capsys, ["info", str(untokenized)])

    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10).save_pretrained(llama)
    err = _one_line_error(capsys, ["info", str(llama)])
    assert "'llama' is not supported" in err and "delta_net" in err and "qwen3_next" in err

    (tmp_path / "empty.txt").write_text("")
    assert "empty" in _one_line_error(capsys, ["evaluate", str(model_dir), "--data", str(tmp_path / "empty.txt")])
    assert "no such file" in _one_line_error(capsys, ["evaluate", str(model_dir), "--data", "nope.jsonl"])
    assert "unknown task" in _one_line_error(capsys, ["evaluate", str(model_dir), "--data", "techdocs", "--tasks", "x"])


def test_offline_hub_id_says_to_pass_a_local_path(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _one_line_error(capsys, ["info", "fla-hub/delta_net-1.3B-100B"])
    assert "not available locally" in err and "local directory" in err


def test_python_dash_m_runs_the_same_command(model_dir):
    done = subprocess.run([sys.executable, "-m", "staterank", "info", str(model_dir), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_type"] == "gated_deltanet"


@pytest.mark.parametrize("model_type", ["delta_net", "qwen3_next", "qwen3_5_text"])
def test_info_for_every_family(model_type, model_dir, tmp_path, capsys):
    """Hybrid models list only their linear-attention layers; shapes come from the config."""
    tokenizer = api.load_model(model_dir).tokenizer
    AutoModelForCausalLM.from_config(tiny_config(model_type, len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == model_type and info["num_layers"] == 3
    if model_type == "delta_net":
        assert info["linear_layers"] == [0, 1, 2]
        assert info["layers"][0] == {"layer": 0, "num_k_heads": 4, "num_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8}
    else:
        assert info["linear_layers"] == [0, 1]
        assert info["layers"][1] == {"layer": 1, "num_k_heads": 2, "num_v_heads": 4, "head_k_dim": 8, "head_v_dim": 8}
    assert main(["evaluate", str(tmp_path), "--data", "techdocs-val", "--max-tokens", "200", "--seq-len", "50"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_package_functions_stay_functions_whatever_is_imported_first():
    # a submodule named like an API function would replace it on the package once imported (staterank.evaluate did)
    code = (
        "import staterank.commands, staterank.bench, staterank.analysis\n"
        "import staterank\n"
        "names = [n for n in staterank._API if not callable(getattr(staterank, n))]\n"
        "assert not names, names\n"
        "assert all(getattr(staterank, n) is getattr(staterank, n) for n in staterank._API)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
