"""fla ``linear_attn``: the CPU op against fla's naive reference, the feature maps staterank takes and refuses,
and the commands on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from reference import decoded_logits, logits
from transformers import AutoModelForCausalLM

from staterank.backends.gla import chunk_linear_attn, fused_recurrent_linear_attn
from staterank.cli import main
from staterank.loading import load, prepare_runtime
from staterank.models import adapter_for

prepare_runtime("linear_attn")
from fla.models import LinearAttentionConfig  # noqa: E402
from fla.ops.linear_attn.naive import naive_recurrent_linear_attn  # noqa: E402


def build(vocab_size: int = 64, **overrides) -> torch.nn.Module:
    fields = dict(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=vocab_size, attn_mode="chunk",
                  feature_map="relu", fuse_cross_entropy=False)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LinearAttentionConfig(**{**fields, **overrides})).float().eval()


@pytest.mark.parametrize("seq", [1, 37, 130])
def test_backend_equals_fla_naive_reference(seq):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, seq, 3, 8, generator=gen).relu() for _ in range(2))
    v = torch.randn(2, seq, 3, 6, generator=gen)
    h0 = torch.randn(2, 3, 8, 6, generator=gen)
    expected_o, expected_h = naive_recurrent_linear_attn(q, k, v, initial_state=h0.clone(), output_final_state=True)
    for op in (chunk_linear_attn, fused_recurrent_linear_attn):
        o, h = op(q, k, v, initial_state=h0, output_final_state=True)
        torch.testing.assert_close(o, expected_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, expected_h, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="normalise"):
        chunk_linear_attn(q, k, v, normalize=True)


@pytest.mark.parametrize("feature_map", ["relu", "elementwise_product"])
def test_model_forward_equals_its_cached_step_decoding(feature_map, one_thread):
    model = build(feature_map=feature_map)
    ids = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(decoded_logits(model, ids, 9), logits(model, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [({"feature_map": "hedgehog"}, "changes the state's width"), ({"do_feature_map_norm": True}, "z-normalised"),
     ({"num_heads": 4, "num_kv_heads": 2}, "share key/value heads")],
)  # fmt: skip
def test_refused_configurations(overrides, message):
    with pytest.raises(Exception, match=message):
        adapter_for(build(**overrides))


@pytest.fixture
def mixing_source(tmp_path):
    tokenizer = load("tiny-deltanet", device="cpu").tokenizer
    build(len(tokenizer), feature_map="elementwise_product").save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_a_mixing_feature_map_analyses_and_prunes_heads_but_refuses_channels(mixing_source, tmp_path, capsys):
    out = tmp_path / "l2"
    assert main(["prune", str(mixing_source), "--method", "l2", "--ratio", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "mixes the q/k channels" in err and len(err.splitlines()) == 1 and not out.exists()
    heads = tmp_path / "heads"
    assert main(["prune", str(mixing_source), "--method", "heads-random", "--ratio", "0.5", "--out", str(heads)]) == 0
    assert [s.num_v_heads for s in adapter_for(AutoModelForCausalLM.from_pretrained(heads)).shapes()] == [1, 1]
    ranks = tmp_path / "ranks"
    assert main(["analyze", str(mixing_source), "--data", "techdocs-val", "--samples", "2", "--seq-len", "64",
                 "--out", str(ranks)]) == 0  # fmt: skip
    assert len(json.loads((ranks / "rank.json").read_text())["layers"]) == 2
