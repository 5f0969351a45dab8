"""fla ``retnet``: the CPU retention and rotary ops against fla's naive references, the states against a per-token
loop, decoding against the full forward, and the refusals (channels, heads, graphed decoding) in one line."""

from __future__ import annotations

import json

import pytest
import torch
from reference import decoded_logits, logits
from transformers import AutoModelForCausalLM

from staterank.backends.gla import chunk_retention, parallel_retention
from staterank.backends.rotary import rotary_embedding
from staterank.cli import main
from staterank.loading import load, prepare_runtime
from staterank.models import adapter_for
from staterank.rank import states_at

prepare_runtime("retnet")
from fla.models import RetNetConfig  # noqa: E402
from fla.modules.rotary import RotaryEmbedding  # noqa: E402
from fla.modules.rotary.ops import rotary_embedding_ref  # noqa: E402
from fla.ops.retention.naive import naive_retention  # noqa: E402


def build(vocab_size: int = 64, **overrides) -> torch.nn.Module:
    fields = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=vocab_size, expand_k=1.0,
                  expand_v=1.0, fuse_cross_entropy=False)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(RetNetConfig(**{**fields, **overrides})).float().eval()


@pytest.mark.parametrize("seq", [1, 37, 130])
def test_retention_equals_fla_naive_reference(seq):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, seq, 3, 8, generator=gen) for _ in range(3))
    expected = naive_retention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)  # naive: [B, H, T, D]
    for op in (chunk_retention, parallel_retention):
        torch.testing.assert_close(op(q, k, v)[0], expected, rtol=1e-5, atol=1e-5)
    # split in two with the state carried over: the same outputs
    cut = seq // 2
    o1, h = chunk_retention(q[:, :cut], k[:, :cut], v[:, :cut], output_final_state=True)
    o2, _ = chunk_retention(q[:, cut:], k[:, cut:], v[:, cut:], initial_state=h, output_final_state=True)
    torch.testing.assert_close(torch.cat((o1, o2), 1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_equals_fla_reference_at_every_offset(interleaved):
    rotary = RotaryEmbedding(dim=8, interleaved=interleaved)
    rotary._update_cos_sin_cache(40, device=torch.device("cpu"), dtype=torch.float32)
    cos, sin = rotary._cos_cached, rotary._sin_cached
    x = torch.randn(2, 5, 3, 8, generator=torch.Generator().manual_seed(1))
    for offset in (0, 7):
        expected = rotary_embedding_ref(x, cos[offset : offset + 5], sin[offset : offset + 5], interleaved)
        torch.testing.assert_close(rotary_embedding(x, cos, sin, interleaved, seqlen_offsets=offset), expected)
    per_sequence = rotary_embedding(x, cos, sin, interleaved, seqlen_offsets=torch.tensor([0, 7]))
    torch.testing.assert_close(per_sequence[1], rotary_embedding_ref(x[1:], cos[7:12], sin[7:12], interleaved)[0])
    with pytest.raises(ValueError, match="packed"):
        rotary_embedding(x, cos, sin, cu_seqlens=torch.tensor([0, 5]))


def test_states_at_every_position_follow_the_per_token_retention(one_thread):
    model = build(use_short_conv=True)
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(2))
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        model(input_ids=ids)
    positions = [1, 2, 17, 49, 50]
    for f in features.values():
        states = states_at(f, positions, dtype=torch.float64)
        k, v = f.k.double(), f.v.double()
        # gamma_h = 1 - 2^(-5 - h), its log taken in float32 as fla's kernels take it
        gamma = (1 - 2.0 ** (-5.0 - torch.arange(k.shape[2], dtype=torch.float32))).log().double().exp()
        state = torch.zeros(*states.shape[1:], dtype=torch.float64)
        for t in range(ids.shape[1]):
            state = gamma[:, None, None] * state + k[:, t, :, :, None] * v[:, t, :, None, :]
            if t + 1 in positions:
                torch.testing.assert_close(states[positions.index(t + 1)], state, rtol=1e-10, atol=1e-12)


def test_model_forward_equals_its_cached_step_decoding(one_thread):
    model = build()
    ids = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(decoded_logits(model, ids, 9), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_refused_configuration():
    with pytest.raises(Exception, match="share key/value heads"):
        adapter_for(build(num_heads=4, num_kv_heads=2))


@pytest.fixture
def source(tmp_path):
    tokenizer = load("tiny-deltanet", device="cpu").tokenizer
    build(len(tokenizer)).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_commands_analyse_and_refuse_pruning_in_one_line(source, tmp_path, capsys):
    for method, words in (("l2", "rotary embedding"), ("jrnp", "decay")):
        out = tmp_path / method
        argv = ["prune", str(source), "--method", method, "--ratio", "0.5", "--data", "techdocs-val", "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1 and not out.exists()
    ranks = tmp_path / "ranks"
    assert main(["analyze", str(source), "--data", "techdocs-val", "--samples", "2", "--seq-len", "64",
                 "--out", str(ranks)]) == 0  # fmt: skip
    result = json.loads((ranks / "rank.json").read_text())
    assert len(result["layers"]) == 2 and all(len(layer["heads"]) == 2 for layer in result["layers"])
    assert main(["info", str(source)]) == 0
    assert "RetNet" in capsys.readouterr().out


def test_finetune_and_evaluate(source, tmp_path):
    from staterank import api
    from staterank.training.lora import finetune

    summary = finetune(str(source), "techdocs-val", tmp_path / "tuned", steps=2, batch_size=2, seq_len=32,
                       max_train_tokens=128, lora_rank=2, warmup_steps=1)  # fmt: skip
    assert summary["steps"] == 2
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")  # merged, stock class
    assert type(tuned).__name__ == "RetNetForCausalLM"
    result = api.evaluate(tmp_path / "tuned", "techdocs-val", max_tokens=256, seq_len=64)
    assert 1 < result["ppl"] < 1e6
