"""Evaluation: strided perplexity, perplexity by position, recall probes, the lm-eval bridge."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_config
from transformers import AutoModelForCausalLM

from staterank import evaluation as evaluate
from staterank.data import read_documents, token_stream
from staterank.errors import StaterankError
from staterank.loading import LoadedModel, prepare_runtime
from staterank.tokenizer import train_tokenizer

prepare_runtime("delta_net")


@pytest.fixture(scope="module")
def loaded():
    tokenizer = train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("delta_net", len(tokenizer))).eval()
    return LoadedModel(model, tokenizer, None, "tiny-delta-net")


def test_strided_perplexity_equals_a_direct_computation(loaded):
    seq_len, stride, max_tokens = 16, 4, 64
    result = evaluate.perplexity(loaded, "techdocs-val", seq_len=seq_len, max_tokens=max_tokens, stride=stride,
                                 batch_size=8, progress=False)

    # Directly: token i is predicted from the tokens since ``begin``, the start of the first window
    # that holds it with at least seq_len - stride tokens of context (HF's strided scheme). The model
    # is causal, so the log-probabilities of the window ids[begin : begin + seq_len] give them all.
    ids = token_stream("techdocs-val", loaded.tokenizer, max_tokens=max_tokens)
    last = ((len(ids) - seq_len) // stride) * stride + seq_len  # end of the last whole window
    log_probs = {}
    total, count = 0.0, 0
    for i in range(1, last):
        begin = 0 if i < seq_len else ((i - seq_len) // stride + 1) * stride
        if begin not in log_probs:
            with torch.no_grad():
                logits = loaded.model(input_ids=ids[begin : begin + seq_len][None]).logits[0].double()
            log_probs[begin] = F.log_softmax(logits, dim=-1)
        total -= log_probs[begin][i - begin - 1, ids[i]].item()
        count += 1
    assert result["tokens"] == count == last - 1
    assert result["windows"] == (len(ids) - seq_len) // stride + 1
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)

    plain = evaluate.perplexity(loaded, "techdocs-val", seq_len=seq_len, max_tokens=max_tokens, progress=False)
    assert plain["tokens"] == (max_tokens // seq_len) * (seq_len - 1) and plain["stride"] == seq_len
    with pytest.raises(StaterankError, match="stride"):
        evaluate.perplexity(loaded, "techdocs-val", seq_len=seq_len, stride=0, progress=False)


def test_ppl_by_position_adds_up_to_the_perplexity(loaded):
    seq_len, max_tokens = 32, 320
    result = evaluate.ppl_by_position(loaded, "techdocs-val", seq_len=seq_len, buckets=4, max_tokens=max_tokens,
                                      batch_size=4, progress=False)
    plain = evaluate.perplexity(loaded, "techdocs-val", seq_len=seq_len, max_tokens=max_tokens, progress=False)
    edges = result["bucket_edges"]
    assert edges[0] == 1 and edges[-1] == seq_len and edges == sorted(set(edges))
    assert len(result["nll"]) == len(result["ppl"]) == len(result["tokens"]) == len(edges) - 1
    assert sum(result["tokens"]) == plain["tokens"] == result["windows"] * (seq_len - 1)
    weighted = sum(n * t for n, t in zip(result["nll"], result["tokens"], strict=True)) / sum(result["tokens"])
    assert weighted == pytest.approx(plain["nll"], rel=1e-6)
    assert result["ppl"] == pytest.approx([math.exp(x) for x in result["nll"]])


class FakeModel(torch.nn.Module):
    """Logits [B, T, vocab] of a rule on the inputs: ``oracle`` peeks at the next token, else uniform."""

    def __init__(self, vocab_size: int, oracle: bool):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.oracle = oracle
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        if self.oracle:
            logits[:, :-1] = F.one_hot(input_ids[:, 1:], self.config.vocab_size).float()
        return SimpleNamespace(logits=logits)


def test_recall_accuracy_of_an_oracle_chance_and_a_model(loaded):
    options = dict(num_items=(4, 8), distances=(8, 24), copy_len=6, trials=3, batch_size=3)
    vocab_size = len(loaded.tokenizer)
    oracle = evaluate.recall(LoadedModel(FakeModel(vocab_size, True), loaded.tokenizer, None, "oracle"), **options)
    assert oracle["copy"]["accuracy"] == [1.0, 1.0] and oracle["kv"]["accuracy"] == [1.0, 1.0]

    # Uniform logits: argmax picks id 0, the special <|endoftext|>, never a drawn token.
    uniform = evaluate.recall(LoadedModel(FakeModel(vocab_size, False), loaded.tokenizer, None, "uniform"), **options)
    assert loaded.tokenizer.all_special_ids == [0]
    assert uniform["copy"]["accuracy"] == [0.0, 0.0] and uniform["kv"]["accuracy"] == [0.0, 0.0]

    result = evaluate.recall(loaded, **options)
    json.dumps(result)
    assert result["copy"]["distance"] == [8, 24] and result["kv"]["items"] == [4, 8] and result["trials"] == 3
    assert all(0 <= a <= 1 for a in result["copy"]["accuracy"] + result["kv"]["accuracy"])
    assert result == evaluate.recall(loaded, **options)  # fixed seed, same probes
    with pytest.raises(StaterankError, match="distance"):
        evaluate.recall(loaded, distances=(4,), copy_len=8)


def test_shipped_lm_eval_task_data_is_reproducible():
    from staterank.lm_eval_tasks import techdocs_lastword

    lines = techdocs_lastword.DATA_FILE.read_text().splitlines()
    assert [json.loads(line) for line in lines] == techdocs_lastword.build_items()
    assert len(lines) == 40


def test_lm_eval_bridge_runs_the_shipped_task(loaded):
    pytest.importorskip("lm_eval")
    from staterank.lm_eval_bridge import run_lm_eval

    results = run_lm_eval(loaded, ["staterank_techdocs_lastword"], limit=2, batch_size=2)
    metrics = results["staterank_techdocs_lastword"]
    assert 0 <= metrics["acc,none"] <= 1 and metrics["perplexity,none"] > 1
    json.dumps(results)
    with pytest.raises(StaterankError, match="unknown lm-eval task"):
        run_lm_eval(loaded, ["no_such_task"])
