"""fla DeltaNet and Gated DeltaNet adapters: features, channel keeping, head removal, config update."""

from __future__ import annotations

import pytest
import torch
from reference import delta_rule_loop, logits, tapped
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from staterank.errors import UnsupportedModelError
from staterank.loading import prepare_runtime
from staterank.models import PruningShapeError, adapter_for

prepare_runtime("delta_net")
from fla.models import DeltaNetConfig, GatedDeltaNetConfig  # noqa: E402

VOCAB = 128
CONFIGS = {
    "delta_net": lambda: DeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB, use_gate=False
    ),
    "delta_net_gate": lambda: DeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB, use_gate=True
    ),
    "gated_deltanet": lambda: GatedDeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, expand_v=1.0, vocab_size=VOCAB
    ),
    "gated_deltanet_grouped": lambda: GatedDeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, num_v_heads=4, head_dim=16, expand_v=1.5, vocab_size=VOCAB
    ),
}


def make_model(name: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval()
    return model, adapter_for(model)


def tokens(batch: int = 2, seq: int = 37) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))




def random_keep(adapter, new_dim: int, seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keep = {}
    for shape in adapter.shapes():
        rows = [torch.randperm(shape.head_k_dim, generator=generator)[:new_dim] for _ in range(shape.num_k_heads)]
        keep[shape.layer] = torch.stack(rows).sort(dim=1).values
    return keep


@pytest.mark.parametrize("name", list(CONFIGS))
def test_features_reproduce_the_mixer(name):
    """A per-token float64 recurrence over the tapped q, k, v, beta, decay gives the kernel's output."""
    model, adapter = make_model(name)
    ids = tokens()
    core = {}
    hooks = [
        adapter.mixer(i).o_norm.register_forward_hook(lambda m, args, out, i=i: core.__setitem__(i, args[0]))
        for i in adapter.linear_layers()
    ]
    features = tapped(adapter, ids)
    for hook in hooks:
        hook.remove()
    for layer in adapter.linear_layers():
        expected, _ = delta_rule_loop(features[layer])
        torch.testing.assert_close(core[layer].double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keeping_all_channels_is_the_identity(name):
    model, adapter = make_model(name)
    ids = tokens()
    before = logits(model, ids)
    shape = adapter.shapes()[0]
    identity = torch.arange(shape.head_k_dim).repeat(shape.num_k_heads, 1)
    adapter.keep_qk_channels({layer: identity for layer in adapter.linear_layers()})
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kept_channels_save_and_reload(name, tmp_path):
    model, adapter = make_model(name)
    ids = tokens()
    original = tapped(adapter, ids)
    d_k = adapter.shapes()[0].head_k_dim
    new_dim = d_k // 2 - 1  # deliberately not a power of two
    keep = random_keep(adapter, new_dim)
    adapter.keep_qk_channels(keep)

    # On the same input, each pruned layer computes exactly the kept channels of the original q, k.
    for layer, index in keep.items():
        with torch.no_grad():
            pruned = adapter.features(layer, original[layer].hidden)
        for name_ in ("q", "k"):
            before = getattr(original[layer], name_)  # [B, T, Hk, d_k]
            expected = torch.gather(before, 3, index[None, None].expand(*before.shape[:2], *index.shape))
            torch.testing.assert_close(getattr(pruned, name_), expected)

    expected_logits = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    reloaded_adapter = adapter_for(reloaded)
    for shape in reloaded_adapter.shapes():
        assert shape.head_k_dim == new_dim
        assert reloaded_adapter.mixer(shape.layer).q_proj.weight.shape[0] == shape.num_k_heads * new_dim
    assert [s.head_v_dim for s in reloaded_adapter.shapes()] == [s.head_v_dim for s in adapter.shapes()]
    torch.testing.assert_close(logits(reloaded, ids), expected_logits)


def _zero_value_heads(adapter, heads: list[int]) -> None:
    """Silence value heads in the original model: zero their output-projection columns."""
    for layer in adapter.linear_layers():
        mixer, shape = adapter.mixer(layer), adapter.layer_shape(layer)
        for h in heads:
            mixer.o_proj.weight.data[:, h * shape.head_v_dim : (h + 1) * shape.head_v_dim] = 0


REMOVALS = {
    "delta_net": [[1], [0, 3]],
    "delta_net_gate": [[2]],
    "gated_deltanet": [[0]],
    # grouped: one value head from each key head, or a whole key-head group
    "gated_deltanet_grouped": [[1, 3], [2, 3]],
}


@pytest.mark.parametrize("name,heads", [(n, h) for n, hs in REMOVALS.items() for h in hs])
def test_removed_heads_equal_silenced_heads_and_reload(name, heads, tmp_path):
    model, adapter = make_model(name)
    ids = tokens()
    reference_model, reference_adapter = make_model(name)
    _zero_value_heads(reference_adapter, heads)
    expected = logits(reference_model, ids)

    shape_before = adapter.shapes()[0]
    adapter.remove_heads({layer: heads for layer in adapter.linear_layers()})
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    assert adapter.shapes()[0].num_v_heads == shape_before.num_v_heads - len(heads)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert adapter_for(reloaded).shapes() == adapter.shapes()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=1e-5, rtol=1e-5)


def test_grouping_constraint_is_enforced():
    _, adapter = make_model("gated_deltanet_grouped")
    with pytest.raises(PruningShapeError, match="same number of value heads"):
        adapter.remove_heads({layer: [1] for layer in adapter.linear_layers()})
    with pytest.raises(PruningShapeError, match="every head"):
        adapter.remove_heads({layer: [0, 1, 2, 3] for layer in adapter.linear_layers()})
    with pytest.raises(PruningShapeError, match="same numbers"):
        adapter.remove_heads({adapter.linear_layers()[0]: [2, 3]})


def test_channel_selection_errors():
    _, adapter = make_model("delta_net")
    layers = adapter.linear_layers()
    with pytest.raises(PruningShapeError, match="same number"):
        adapter.keep_qk_channels({layers[0]: torch.zeros(4, 3, dtype=torch.long), layers[1]: torch.zeros(4, 2)})
    with pytest.raises(PruningShapeError, match="repeated"):
        adapter.keep_qk_channels({layer: torch.zeros(4, 3, dtype=torch.long) for layer in layers})
    with pytest.raises(PruningShapeError, match="outside"):
        adapter.keep_qk_channels({layer: torch.full((4, 3), 99) for layer in layers})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_bytes_match_the_cache_and_a_hand_count(name):
    model, adapter = make_model(name)
    config = model.config
    with torch.no_grad():
        cache = model(input_ids=tokens(batch=1), use_cache=True).past_key_values
    held = 0
    for layer in adapter.linear_layers():
        state = cache[layer]
        held += state["recurrent_state"].nbytes + sum(t.nbytes for t in state["conv_state"])
    assert adapter.state_bytes_per_seq() == held

    # By hand, from the config: fp32 state [Hv, d_k, d_v]; conv caches of q, k, v, conv_size columns each.
    if config.model_type == "delta_net":
        heads_k = heads_v = config.num_heads
        d_k = d_v = config.hidden_size // config.num_heads
    else:
        heads_k, heads_v = config.num_heads, config.num_v_heads or config.num_heads
        d_k, d_v = config.head_dim, int(config.head_dim * config.expand_v)
    per_layer = heads_v * d_k * d_v * 4 + (2 * heads_k * d_k + heads_v * d_v) * config.conv_size * 4
    assert adapter.state_bytes_per_seq() == config.num_hidden_layers * per_layer


def test_head_dim_that_fla_would_round_down_survives_reload(tmp_path):
    """expand_v = d_v / d_k can land one ulp low; fla rebuilds d_v = int(head_dim * expand_v)."""
    config = GatedDeltaNetConfig(hidden_size=64, num_hidden_layers=1, num_heads=1, head_dim=64, expand_v=0.5,
                                 vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    adapter = adapter_for(model)
    adapter.keep_qk_channels({0: torch.arange(49)[None]})  # 49 * (32 / 49) = 31.999...
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert adapter_for(reloaded).shapes()[0].head_v_dim == 32


def test_unsupported_architecture_names_the_supported_families():
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(UnsupportedModelError, match="llama.*delta_net.*gated_deltanet"):
        adapter_for(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weight_views_are_the_rows_the_features_use(name):
    """Writing through qk_weights / qk_conv_weights changes exactly the q (or k) channel it names."""
    model, adapter = make_model(name)
    ids = tokens()
    layer = adapter.linear_layers()[0]
    before = tapped(adapter, ids)[layer]
    q_rows, k_rows = adapter.qk_weights(layer)
    q_conv, _ = adapter.qk_conv_weights(layer)
    q_rows[1, 2].zero_()
    k_rows[0, 3].mul_(2)
    q_conv[1, 3].mul_(-1)
    with torch.no_grad():
        after = adapter.features(layer, before.hidden)
    changed_q = (after.q != before.q).flatten(0, 1).any(0)  # [Hk, d_k]
    changed_k = (after.k != before.k).flatten(0, 1).any(0)
    assert changed_q.nonzero().tolist() == [[1, 2], [1, 3]]
    assert changed_k.nonzero().tolist() == [[0, 3]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_state_is_the_final_state_of_the_recurrence(name):
    model, adapter = make_model(name)
    ids = tokens()
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for layer in adapter.linear_layers():
        _, expected = delta_rule_loop(features[layer])  # [B, Hv, d_k, d_v]
        torch.testing.assert_close(adapter.cached_state(cache, layer).double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_static_cache_tensors_are_the_whole_state_and_go_back_in_place(name):
    """The tensors are every layer's recurrent and conv states; a later step's cache takes them back in their place."""
    model, adapter = make_model(name)
    ids = tokens(batch=1)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        static = adapter.static_cache_tensors(cache)
        held = [cache[layer] for layer in range(model.config.num_hidden_layers)]
        assert {id(t) for t in static} == {id(s["recurrent_state"]) for s in held} | {
            id(t) for s in held for t in s["conv_state"]
        }
        assert sum(t.nbytes for t in static) == adapter.state_bytes_per_seq()
        cache = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).past_key_values
        moved = adapter.static_cache_tensors(cache)
        assert [t.shape for t in moved] == [t.shape for t in static]
        assert any(a is not b for a, b in zip(moved, static, strict=True))  # the step returned new states
        adapter.set_static_cache_tensors(cache, static)
        assert all(a is b for a, b in zip(adapter.static_cache_tensors(cache), static, strict=True))
        assert all(any(cache[layer]["recurrent_state"] is t for t in static) for layer in adapter.linear_layers())


def test_static_cache_tensors_refuse_a_cache_with_attention_layers():
    """fla's hybrid blocks keep their key/value cache in ``attn_state``; it grows, so it cannot stay in place."""
    from staterank.models import StaticCacheError

    model, adapter = make_model("delta_net")
    with torch.no_grad():
        cache = model(input_ids=tokens(batch=1), use_cache=True).past_key_values
    cache[1]["attn_state"] = (torch.zeros(1, 37, 2, 16), torch.zeros(1, 37, 2, 16))  # what an attention block writes
    with pytest.raises(StaticCacheError, match="attention layers.*grows"):
        adapter.static_cache_tensors(cache)
    with pytest.raises(StaticCacheError, match="not a recurrent cache of fixed size"):
        adapter.static_cache_tensors(object())


def test_keep_heads_cuts_one_layer_and_remove_heads_per_layer_writes_the_per_layer_config():
    model, adapter = make_model("delta_net")
    adapter.keep_heads(0, torch.tensor([1, 3]), torch.tensor([1, 3]))
    assert [(s.num_k_heads, s.num_v_heads) for s in adapter.shapes()] == [(2, 2), (4, 4)]
    assert model.config.model_type == "delta_net" and model.config.num_heads == 4  # the config is the caller's

    model, adapter = make_model("gated_deltanet")
    adapter.remove_heads({0: [0]}, per_layer=True)
    assert model.config.model_type == adapter.per_layer_model_type == "staterank_gated_deltanet"
    assert model.config.staterank_layer_heads == {"0": [1, 1], "1": [2, 2]}
    assert (model.config.num_heads, model.config.num_v_heads) == (2, 2)  # the largest layer's, for the stock model
