"""fla ``gla``: the CPU op against fla's naive reference, the model against its own cache, the gate's rows in
channel pruning, and the commands on a tiny model (no delta correction, a decay per key channel, no L2 norm)."""

from __future__ import annotations

import json

import pytest
import torch
from reference import decoded_logits, logits
from transformers import AutoModelForCausalLM

from staterank.backends.gla import chunk_gla, fused_recurrent_gla
from staterank.cli import main
from staterank.loading import prepare_runtime
from staterank.models import adapter_for
from staterank.rank import states_at

prepare_runtime("gla")
from fla.models import GLAConfig  # noqa: E402
from fla.ops.gla.naive import naive_recurrent_gla  # noqa: E402


def config(vocab_size: int = 64, **overrides) -> GLAConfig:
    fields = dict(hidden_size=32, num_hidden_layers=3, num_heads=2, expand_k=0.5, expand_v=1.0, vocab_size=vocab_size,
                  use_short_conv=True, fuse_cross_entropy=False, norm_eps=1e-30)  # fmt: skip
    return GLAConfig(**{**fields, **overrides})


def build(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(**overrides)).float().eval()
    for module in model.modules():  # the default init leaves the mixers nearly silent
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
    return model


def ids(batch: int = 2, seq: int = 70) -> torch.Tensor:
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("seq", [1, 37, 100])
def test_backend_equals_fla_naive_reference(seq):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, seq, 3, 8, generator=gen) for _ in range(2))
    v = torch.randn(2, seq, 3, 6, generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(2, seq, 3, 8, generator=gen)) / 4
    h0 = torch.randn(2, 3, 8, 6, generator=gen)
    expected_o, expected_h = naive_recurrent_gla(q, k, v, g, initial_state=h0.clone(), output_final_state=True)
    for op in (chunk_gla, fused_recurrent_gla):
        decay = {"g": g} if op is chunk_gla else {"gk": g}
        o, h = op(q, k, v, **decay, initial_state=h0.transpose(-1, -2), output_final_state=True, state_v_first=True)
        torch.testing.assert_close(o, expected_o, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h.transpose(-1, -2), expected_h, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_model_forward_equals_its_cached_step_decoding(one_thread):
    model = build()
    tokens = ids()
    # chunk mode (> 64 tokens) against fused_recurrent mode (9 tokens, then one at a time)
    torch.testing.assert_close(decoded_logits(model, tokens, 9), logits(model, tokens), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_states_at_every_position_are_the_cached_states(one_thread):
    """No delta correction, no L2 norm: the tap's states at positions t are the cache after t tokens."""
    model = build()
    adapter, tokens = adapter_for(model), ids(1, 50)
    features = {}
    with adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        model(input_ids=tokens)
    positions = [1, 17, 50]
    for t in positions:
        cache = model(input_ids=tokens[:, :t], use_cache=True).past_key_values
        for layer, f in features.items():
            state = states_at(f, positions, dtype=torch.float64)[positions.index(t)]
            torch.testing.assert_close(state, adapter.cached_state(cache, layer).double(), rtol=1e-4, atol=1e-5)


def test_kept_channels_slice_the_gate_rows(one_thread):
    model = build()
    adapter = adapter_for(model)
    mixer = adapter.mixer(0)
    before = mixer.gk_proj[1].weight.detach().clone().view(2, 8, -1), mixer.gk_proj[1].bias.detach().clone().view(2, 8)
    index = torch.tensor([[0, 3, 5, 6], [1, 2, 4, 7]])
    adapter.keep_qk_channels({layer: index for layer in adapter.linear_layers()})
    weight, bias = mixer.gk_proj[1].weight.view(2, 4, -1), mixer.gk_proj[1].bias.view(2, 4)
    torch.testing.assert_close(weight, before[0].gather(1, index[..., None].expand(-1, -1, weight.shape[-1])))
    torch.testing.assert_close(bias, before[1].gather(1, index))


def test_grouped_key_value_heads_are_refused():
    model = AutoModelForCausalLM.from_config(config(num_heads=4, num_kv_heads=2))
    with pytest.raises(Exception, match="share key/value heads"):
        adapter_for(model)


@pytest.fixture
def source(tmp_path):
    from staterank.loading import load

    tokenizer = load("tiny-deltanet", device="cpu").tokenizer
    build(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_commands(source, tmp_path, capsys, one_thread):
    assert main(["info", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "gla"
    assert info["layers"][0] == {"layer": 0, "num_k_heads": 2, "num_v_heads": 2, "head_k_dim": 8, "head_v_dim": 16}
    out = tmp_path / "l2"
    assert main(["prune", str(source), "--method", "l2", "--ratio", "0.5", "--align", "1", "--out", str(out)]) == 0
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert [s.head_k_dim for s in adapter_for(pruned).shapes()] == [4, 4, 4]
    heads = tmp_path / "heads"
    assert main(["prune", str(source), "--method", "jrnp", "--ratio", "0.5", "--data", "techdocs", "--calib-tokens",
                 "512", "--seq-len", "64", "--out", str(heads)]) == 0  # fmt: skip
    assert [s.num_v_heads for s in adapter_for(AutoModelForCausalLM.from_pretrained(heads)).shapes()] == [1, 1, 1]
    ranks = tmp_path / "ranks"
    assert main(["analyze", str(source), "--data", "techdocs-val", "--samples", "2", "--seq-len", "64",
                 "--out", str(ranks)]) == 0  # fmt: skip
    assert len(json.loads((ranks / "rank.json").read_text())["layers"]) == 3
    assert main(["evaluate", str(out), "--data", "techdocs-val", "--seq-len", "64", "--max-tokens", "512",
                 "--out", str(tmp_path / "eval.json")]) == 0  # fmt: skip
