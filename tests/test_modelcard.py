"""Model cards (README.md) of the models prune, finetune and train write, checked against independent facts:
pruning.json, the reloaded model's shapes and cache, the run's summary, and YAML parsed back by PyYAML."""

from __future__ import annotations

import json
import re

import pytest
import torch
from reference import MINI_MODELS

from staterank import api
from staterank.loading import bundled_path, load
from staterank.modelcard import prune_card
from staterank.training.lora import finetune
from staterank.training.pretrain import train

yaml = pytest.importorskip("yaml")

pytestmark = pytest.mark.usefixtures("one_thread")


def read_card(directory) -> tuple[dict, str]:
    """The parsed YAML front matter and the Markdown body of DIRECTORY/README.md."""
    return split_card((directory / "README.md").read_text())


def split_card(card: str) -> tuple[dict, str]:
    assert card.startswith("---\n")
    front, separator, body = card.removeprefix("---\n").partition("\n---\n")
    assert separator, "the front matter is not closed"
    return yaml.safe_load(front), body


def card_state_bytes(body: str) -> dict[str, int]:
    """The rows of the card's state table: {"this model": bytes, "source model": bytes}."""
    return {name: int(value.replace(",", "")) for name, value in re.findall(r"^\| (\w+ model) \| ([\d,]+)", body, re.M)}


def run_load_snippet(body: str) -> dict:
    """Run the card's Python block; its names afterwards (``model``, ``tokenizer``)."""
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    names: dict = {}
    exec(code, names)  # the snippet a user would paste, pointing at the written directory
    return names


@torch.no_grad()
def fla_cache_bytes(model) -> int:
    """Bytes the fla cache holds after one sequence: recurrent states plus conv states of every layer."""
    cache = model(input_ids=torch.zeros(1, 8, dtype=torch.long), use_cache=True).past_key_values
    return sum(
        state["recurrent_state"].nbytes + sum(t.nbytes for t in state["conv_state"])
        for state in (cache[layer] for layer in range(model.config.num_hidden_layers))
    )


@pytest.fixture(scope="module")
def pruned_l1(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "l1"
    report = api.prune("tiny-deltanet", "l1", 0.5, out, progress=False)
    return out, report


def test_prune_card_agrees_with_pruning_json_and_the_reloaded_model(pruned_l1):
    out, report = pruned_l1
    front, body = read_card(out)
    assert report == json.loads((out / "pruning.json").read_text())

    assert front["base_model"] == "tiny-deltanet"  # the bundled name, not where it lies on this machine
    assert report["model"] == str(bundled_path("tiny-deltanet").resolve())
    assert front["library_name"] == "transformers"
    assert {"staterank", "delta_net", "linear-attention", "pruned", "qk-channel-pruning"} <= set(front["tags"])
    assert "head-pruning" not in front["tags"]

    source, reloaded = load("tiny-deltanet"), load(out)
    d_k_before, d_k_after = source.adapter.shapes()[0].head_k_dim, reloaded.adapter.shapes()[0].head_k_dim
    assert (d_k_before, d_k_after) == (64, 32)
    assert f"| d_k per head | {d_k_before} -> {d_k_after}" in body
    assert f"| fraction actually removed | {1 - d_k_after / d_k_before:g} of the query/key channels |" in body
    assert "| calibration | none" in body

    state = card_state_bytes(body)
    assert state["source model"] == report["state_bytes_before"] == source.adapter.state_bytes_per_seq()
    assert state["this model"] == report["state_bytes_after"] == reloaded.adapter.state_bytes_per_seq()
    assert state["this model"] == fla_cache_bytes(reloaded.model)

    assert "import fla" in body and "import staterank" not in body
    assert run_load_snippet(body)["model"].config.model_type == "delta_net"
    # fla families: fla's kernel limits apply, vLLM's Qwen GDN constraints do not.
    assert "K <= 256" in body and "64-wide blocks" in body
    assert "FlashInfer" not in body and "vLLM" not in body


def test_head_pruning_card_lists_the_removed_heads(tmp_path):
    out = tmp_path / "heads"
    report = api.prune("tiny-deltanet", "heads-random", 0.5, out, progress=False)
    front, body = read_card(out)
    assert {"pruned", "head-pruning"} <= set(front["tags"]) and "qk-channel-pruning" not in front["tags"]

    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d, ]+) \| (\d+) \|$", body, re.M)
    left = {shape.layer: shape.num_v_heads for shape in load(out).adapter.shapes()}
    assert len(rows) == len(left) == 4
    for layer, count, heads, kept in rows:
        assert [int(h) for h in heads.split(", ")] == report["removed"][layer]
        assert int(count) == 2 and int(kept) == left[int(layer)] == 4 - 2  # half of tiny-deltanet's 4 heads
    assert card_state_bytes(body)["this model"] == report["state_bytes_after"]


def test_global_scope_card_loads_through_staterank_and_is_not_vllm_servable(tmp_path):
    out = tmp_path / "global"
    report = api.prune("tiny-deltanet", "heads-random", 0.25, out, scope="global", progress=False)
    front, body = read_card(out)
    heads_left = [shape.num_v_heads for shape in load(out).adapter.shapes()]
    assert len(set(heads_left)) > 1, "this seed must leave layers with different head counts"
    assert front["tags"][1] == "staterank_delta_net"
    assert "import staterank" in body and "not servable" in body
    for layer, count in enumerate(heads_left):  # the shapes table, a row per layer
        assert f"| {layer} | key heads {count}, value heads {count}, d_k 64, d_v 64 |" in body
    assert run_load_snippet(body)["model"].config.staterank_layer_heads is not None
    assert card_state_bytes(body)["this model"] == report["state_bytes_after"]


def qwen3_next_report(head_k_dim_after: int) -> tuple[dict, dict]:
    """A hand-made pruning.json of a Qwen3-Next (3 linear layers, 16 key x 32 value heads) and the model's facts."""
    layers = [
        {"layer": i, "num_k_heads": 16, "num_v_heads": 32, "head_k_dim": head_k_dim_after, "head_v_dim": 128}
        for i in (0, 1, 2)
    ]
    state_after = 3 * (32 * head_k_dim_after * 128 * 4 + (2 * 16 * head_k_dim_after + 32 * 128) * 4 * 2)
    report = {
        "model": "Qwen/Qwen3-Next-80B-A3B-Instruct", "method": "rrqr", "ratio": 1 - head_k_dim_after / 128,
        "seed": 0, "data": "techdocs", "calib_tokens": 32768, "seq_len": 2048, "options": {},
        "head_k_dim_before": 128, "head_k_dim_after": head_k_dim_after, "rotated": False, "kept": {},
        "state_bytes_before": 3 * (32 * 128 * 128 * 4 + (2 * 16 * 128 + 32 * 128) * 4 * 2),
        "state_bytes_after": state_after,
    }  # fmt: skip
    facts = {
        "model_type": "qwen3_next", "family": "Qwen3-Next (transformers)", "dtype": "bfloat16",
        "state_dtype": "float32", "layers": layers, "state_bytes_per_seq": state_after,
    }  # fmt: skip
    return report, facts


def test_qwen_card_states_the_vllm_constraints():
    report, facts = qwen3_next_report(head_k_dim_after=64)
    card = prune_card(report, facts, "runs/qwen3-next-dk64")
    front, body = split_card(card)
    assert front["base_model"] == "Qwen/Qwen3-Next-80B-A3B-Instruct"
    assert {"staterank", "qwen3_next", "pruned", "qk-channel-pruning"} <= set(front["tags"])
    assert "| fraction actually removed" not in body  # a report without kept_ratio (older pruning.json)
    assert "supports head dim 128 only" in body
    assert "Triton GDN prefill backend" in body and "--gdn-prefill-backend triton" in body
    assert "vLLM and SGLang need one uniform `linear_key_head_dim` across layers" in body
    assert "d_k 64 in every linear-attention layer" in body
    assert "import fla" not in body and "import staterank" not in body and "fla's chunk kernels" not in body
    assert f"({report['state_bytes_after'] / report['state_bytes_before']:.1%} of the source's)" in body

    unpruned_d_k = split_card(prune_card(*qwen3_next_report(head_k_dim_after=128), "runs/qwen3-next"))[1]
    assert "--gdn-prefill-backend" not in unpruned_d_k and "uniform `linear_key_head_dim`" in unpruned_d_k


def test_front_matter_quotes_what_yaml_would_misread():
    report, facts = qwen3_next_report(head_k_dim_after=64)
    for name in ("C:/models/qwen: v2 #1", "yes", "2024-01-01", "- dash", 'quote " and \\ and ü'):
        front, _ = split_card(prune_card({**report, "model": name}, facts, "out"))
        assert front["base_model"] == name


def test_finetune_card_names_the_student_its_pruning_and_the_lora(pruned_l1, tmp_path):
    pruned, pruning = pruned_l1
    out = tmp_path / "recovered"
    summary = finetune(
        pruned, "techdocs-val", out, teacher="tiny-deltanet", steps=2, batch_size=4, seq_len=32,
        max_train_tokens=512, lora_rank=4, lora_alpha=8, progress=False,
    )  # fmt: skip
    front, body = read_card(out)
    assert front["base_model"] == str(pruned.resolve()) == summary["student"]
    assert front["library_name"] == "transformers"
    expected_tags = {"staterank", "delta_net", "lora", "distillation", "pruned", "qk-channel-pruning"}
    assert expected_tags <= set(front["tags"])
    assert "| LoRA | rank 4, alpha 8, dropout 0 on `q_proj`, `k_proj`, `v_proj`; merged" in body
    assert f"| steps | 2 of 4 x 32 tokens ({summary['tokens_seen']:,} tokens) |" in body
    assert "| teacher | `tiny-deltanet`" in body and "| data | `techdocs-val` |" in body
    assert f"pruned by staterank from `{pruning['model']}`" in body and "| d_k per head | 64 -> 32" in body

    reloaded = load(out)
    state = card_state_bytes(body)
    assert state == {"this model": reloaded.adapter.state_bytes_per_seq()}
    assert state["this model"] == pruning["state_bytes_after"] == fla_cache_bytes(reloaded.model)
    assert "import fla" in body


@pytest.mark.parametrize("model_type", ["delta_net", "qwen3_next"])
def test_train_card_has_no_base_model_and_the_run(model_type, tmp_path):
    fields = MINI_MODELS[model_type]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**fields, "intermediate_size": 64, "tie_word_embeddings": True}))
    out = tmp_path / "model"
    summary = train(
        config, "techdocs-val", out, steps=2, batch_size=2, seq_len=32, max_train_tokens=2048, warmup_steps=1,
        tokenizer=str(bundled_path("tiny-deltanet")), progress=False,
    )  # fmt: skip
    front, body = read_card(out)
    assert "base_model" not in front and front["library_name"] == "transformers"
    assert front["tags"][:3] == ["staterank", model_type, "linear-attention"]
    assert "trained from scratch" in body
    assert f"| steps | 2 of 2 x 32 tokens ({summary['tokens_seen']:,} tokens" in body
    assert f"| parameters | {summary['params']:,} |" in body

    reloaded = load(out)
    assert card_state_bytes(body) == {"this model": reloaded.adapter.state_bytes_per_seq()}
    names = run_load_snippet(body)
    assert names["model"].config.model_type == model_type
    if model_type == "qwen3_next":  # one linear layer: a state [Hv, d_k, d_v] and a conv state [2 Hk d_k + Hv d_v, 4]
        assert card_state_bytes(body)["this model"] == 2 * 16 * 16 * 4 + (2 * 2 * 16 + 2 * 16) * 4 * 4
        assert "import fla" not in body and "--gdn-prefill-backend triton" in body
    else:
        assert "import fla" in body and "vLLM" not in body
