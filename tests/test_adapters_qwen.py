"""Qwen3-Next and Qwen3.5 adapters on tiny random models: features, channel and head pruning, state size.

Every check compares against something computed without the adapter: the core-attention output the mixer
normalises, the arguments of the delta-rule kernel, the original model with the kernel's inputs indexed or
heads' output columns zeroed, a stock reload, and the tensors held in transformers' cache.
"""

from __future__ import annotations

import copy
import inspect
import sys

import pytest
import torch
from reference import delta_rule_loop, kernel_fed_kept_channels, logits, randomise_linear_attention, tapped
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Qwen3_5Config,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
)

from staterank.backends.hf_fallbacks import _dispatch_on_device, use_torch_fallbacks_on_cpu
from staterank.models import adapter_for
from staterank.models.base import ModelAdapter, PruningShapeError

use_torch_fallbacks_on_cpu()

HK, HV, DK, DV, WIDTH = 2, 6, 16, 16, 4  # 2 key heads, 3 value heads each
VOCAB = 96
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_key_head_dim=DK,
    linear_value_head_dim=DV,
    linear_num_key_heads=HK,
    linear_num_value_heads=HV,
    linear_conv_kernel_dim=WIDTH,
    layer_types=LAYER_TYPES,
    pad_token_id=0,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
CONFIGS = {
    "qwen3_next": lambda: Qwen3NextConfig(**TEXT, **MOE),
    "qwen3_5_text": lambda: Qwen3_5TextConfig(**TEXT),
    "qwen3_5_moe_text": lambda: Qwen3_5MoeTextConfig(**TEXT, **MOE),
}
LINEAR = [0, 2, 3]


@pytest.fixture(params=list(CONFIGS))
def model(request):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]()).eval()
    randomise_linear_attention(adapter_for(model))
    return model


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))




def modeling_module(adapter: ModelAdapter):
    return sys.modules[type(adapter.mixer(LINEAR[0])).__module__]


def save_and_reload(model, tmp_path, ids: torch.Tensor, auto=AutoModelForCausalLM):
    """Reload with stock transformers, check the logits, return the reloaded model."""
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = auto.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=1e-6)
    return reloaded


@torch.no_grad()
def cached_state_bytes(adapter: ModelAdapter, ids: torch.Tensor) -> int:
    """Bytes of the conv and recurrent states transformers' cache holds after one sequence."""
    cache = adapter.model(ids[:1], use_cache=True).past_key_values
    total = 0
    for layer in adapter.linear_layers():
        cached = cache.layers[layer]
        total += cached.conv_states[0].nbytes + cached.recurrent_states[0].nbytes
    return total


def check_state_bytes(adapter: ModelAdapter, ids: torch.Tensor, dtype: torch.dtype) -> None:
    """The adapter's count equals the cache's tensors and, per linear layer, an fp32 recurrent state
    [Hv, d_k, d_v] plus a conv state [2 Hk d_k + Hv d_v, width] in the model dtype."""
    config = adapter.config
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    per_layer = hv * dk * dv * 4 + (2 * hk * dk + hv * dv) * config.linear_conv_kernel_dim * dtype.itemsize
    expected = config.layer_types.count("linear_attention") * per_layer
    assert adapter.state_bytes_per_seq() == cached_state_bytes(adapter, ids) == expected


@torch.no_grad()
def check_generation(model, ids: torch.Tensor) -> None:
    """Greedy decoding with the cache equals greedy decoding by full re-computation."""
    prompt = ids[:1, :6]
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    sequence = prompt
    for _ in range(4):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


# --- tests ---------------------------------------------------------------------------------------------


def test_cpu_fallbacks_are_idempotent_and_dispatch_on_device():
    from transformers.models.qwen3_5 import modeling_qwen3_5 as module

    kernel = module.torch_chunk_gated_delta_rule
    use_torch_fallbacks_on_cpu()
    assert module.torch_chunk_gated_delta_rule is kernel
    assert inspect.unwrap(kernel).__module__ == module.__name__  # transformers' torch reference
    calls = []
    dispatch = _dispatch_on_device(lambda *a, **k: calls.append("chosen"), lambda *a, **k: calls.append("reference"))
    dispatch(torch.zeros(1))
    dispatch(torch.zeros(1, device="meta"))
    assert calls == ["reference", "chosen"]
    with pytest.raises(ValueError, match="packed sequences"):
        dispatch(torch.zeros(1), cu_seqlens=torch.zeros(2, dtype=torch.long))


def test_layout(model):
    adapter = adapter_for(model)
    assert adapter.linear_layers() == LINEAR
    for shape in adapter.shapes():
        assert (shape.num_k_heads, shape.num_v_heads, shape.head_k_dim, shape.head_v_dim) == (HK, HV, DK, DV)
        assert adapter.conv_state_channels(shape.layer) == 2 * HK * DK + HV * DV
        assert adapter.conv_kernel_size(shape.layer) == WIDTH


def test_identity_and_permuted_channels_keep_logits(model, ids):
    adapter = adapter_for(model)
    reference = logits(model, ids)
    adapter.keep_qk_channels({layer: torch.arange(DK).expand(HK, DK) for layer in LINEAR})
    assert torch.equal(logits(model, ids), reference)
    # q . k and the L2 norms do not depend on the order of channels
    adapter.keep_qk_channels({layer: torch.stack([torch.randperm(DK) for _ in range(HK)]) for layer in LINEAR})
    torch.testing.assert_close(logits(model, ids), reference, rtol=0, atol=1e-5)


def test_features_are_the_kernel_inputs_and_reproduce_the_layer(model, ids, monkeypatch):
    adapter = adapter_for(model)
    module = modeling_module(adapter)
    kernel_inputs, core_outputs = [], {}

    def recording_kernel(query, key, value, g, beta, **kwargs):
        kernel_inputs.append((query, key, value, g, beta))
        return chunk(query, key, value, g=g, beta=beta, **kwargs)

    chunk = module.torch_chunk_gated_delta_rule
    monkeypatch.setattr(module, "torch_chunk_gated_delta_rule", recording_kernel)
    # the gated norm's input is the delta rule's output, [B * T * Hv, d_v]
    for layer in LINEAR:
        adapter.mixer(layer).norm.register_forward_pre_hook(
            lambda _, args, layer=layer: core_outputs.__setitem__(layer, args[0].view(*ids.shape, HV, DV))
        )
    features = tapped(adapter, ids)

    assert sorted(features) == LINEAR
    for (query, key, value, g, beta), layer in zip(kernel_inputs, LINEAR, strict=True):
        f = features[layer]
        assert f.q.shape == f.k.shape == (*ids.shape, HK, DK)
        assert f.v.shape == (*ids.shape, HV, DV) and f.beta.shape == f.log_decay.shape == (*ids.shape, HV)
        for mine, theirs in ((f.q, query), (f.k, key), (f.v, value), (f.log_decay, g), (f.beta, beta)):
            torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=1e-6)
        assert f.hidden.shape == (*ids.shape, 64)
        torch.testing.assert_close(delta_rule_loop(f)[0], core_outputs[layer].double(), rtol=0, atol=1e-4)
        assert core_outputs[layer].abs().max() > 0.1  # the comparison is not vacuous


def test_qk_weights_are_views_of_the_projection(model, ids):
    adapter = adapter_for(model)
    features = tapped(adapter, ids)
    for layer in LINEAR:
        (param,) = adapter.qk_parameters(layer)
        q_weight, k_weight = adapter.qk_weights(layer)
        assert q_weight.shape == k_weight.shape == (HK, DK, 64)
        assert q_weight.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
        # with an identity convolution (last tap 1), set through the kernel views: q = silu(hidden @ W_q^T)
        for kernel in adapter.qk_conv_weights(layer):  # [Hk, d_k, W] each
            kernel.zero_()[..., -1] = 1.0
        f = adapter.features(layer, features[layer].hidden)
        hidden = features[layer].hidden
        for tap, weight in ((f.q, q_weight), (f.k, k_weight)):
            expected = torch.nn.functional.silu(torch.einsum("btd,hcd->bthc", hidden, weight))
            torch.testing.assert_close(tap, expected, rtol=0, atol=1e-5)


def test_keep_qk_channels(model, ids, tmp_path, monkeypatch):
    adapter = adapter_for(model)
    kept = 10
    index = torch.stack([torch.randperm(DK)[:kept] for _ in range(HK)])  # [Hk, d_k'], the same in every layer
    before = tapped(adapter, ids)
    weights_before = {layer: adapter.qk_weights(layer) for layer in LINEAR}
    unpruned = logits(model, ids)

    with kernel_fed_kept_channels(adapter, index):  # the original model, its delta rule fed the kept channels
        expected = logits(model, ids)

    adapter.keep_qk_channels({layer: index for layer in LINEAR})
    pruned = logits(model, ids)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-2

    for layer in LINEAR:
        # the tap of the pruned layer is the original tap's kept channels
        after = adapter.features(layer, before[layer].hidden)
        gather = index.expand(*ids.shape, HK, kept)
        torch.testing.assert_close(after.q, before[layer].q.gather(-1, gather), rtol=0, atol=1e-6)
        torch.testing.assert_close(after.k, before[layer].k.gather(-1, gather), rtol=0, atol=1e-6)
        for name in ("v", "beta", "log_decay"):
            torch.testing.assert_close(getattr(after, name), getattr(before[layer], name), rtol=0, atol=1e-6)
        q_weight, k_weight = adapter.qk_weights(layer)
        rows = index[..., None].expand(-1, -1, 64)
        assert torch.equal(q_weight, weights_before[layer][0].gather(1, rows))
        assert torch.equal(k_weight, weights_before[layer][1].gather(1, rows))

    reloaded = save_and_reload(model, tmp_path, ids)
    assert reloaded.config.linear_key_head_dim == kept
    for layer in LINEAR:
        mixer = adapter_for(reloaded).mixer(layer)
        assert mixer.conv1d.weight.shape == (2 * HK * kept + HV * DV, 1, WIDTH)
        (param,) = adapter_for(reloaded).qk_parameters(layer)
        z_rows = HV * DV if hasattr(mixer, "in_proj_qkvz") else 0  # Qwen3-Next fuses z into the same weight
        assert param.shape == (2 * HK * kept + HV * DV + z_rows, 64)
    check_state_bytes(adapter, ids, torch.float32)
    check_generation(model, ids)


# value heads to remove per linear layer: whole key groups (key head 1, 0, 1), or one per group
REMOVALS = {
    "key_groups": ({0: [3, 4, 5], 2: [0, 1, 2], 3: [3, 4, 5]}, (1, 3)),
    "within_groups": ({0: [1, 3], 2: [0, 5], 3: [2, 4]}, (2, 4)),
}


@pytest.mark.parametrize("kind", list(REMOVALS))
def test_remove_heads(model, ids, tmp_path, kind):
    adapter = adapter_for(model)
    remove, (num_k, num_v) = REMOVALS[kind]
    unpruned = logits(model, ids)

    # the original model with the removed heads' output columns zeroed
    original = copy.deepcopy(model)
    with torch.no_grad():
        for layer, heads in remove.items():
            adapter_for(original).mixer(layer).out_proj.weight.view(64, HV, DV)[:, heads] = 0
    expected = logits(original, ids)

    adapter.remove_heads(remove)
    pruned = logits(model, ids)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-2
    for shape in adapter.shapes():
        assert (shape.num_k_heads, shape.num_v_heads, shape.head_k_dim, shape.head_v_dim) == (num_k, num_v, DK, DV)

    reloaded = save_and_reload(model, tmp_path, ids)
    assert (reloaded.config.linear_num_key_heads, reloaded.config.linear_num_value_heads) == (num_k, num_v)
    for layer in LINEAR:
        mixer = adapter_for(reloaded).mixer(layer)
        assert mixer.conv1d.weight.shape == (2 * num_k * DK + num_v * DV, 1, WIDTH)
        assert mixer.out_proj.weight.shape == (64, num_v * DV)
        assert mixer.A_log.shape == mixer.dt_bias.shape == (num_v,)
    check_state_bytes(adapter, ids, torch.float32)
    check_generation(model, ids)


def test_remove_heads_rejects_uneven_groups(model):
    adapter = adapter_for(model)
    with pytest.raises(PruningShapeError):
        adapter.remove_heads({layer: [0] for layer in LINEAR})  # key head 0 keeps 2 value heads, key head 1 keeps 3


def test_per_layer_head_counts_are_refused_before_any_surgery(model):
    """Qwen configs hold one head count for every layer: no per-layer config, and the model is left whole."""
    adapter = adapter_for(model)
    with pytest.raises(PruningShapeError, match="no per-layer head-count config"):
        adapter.remove_heads({0: [0, 1, 2]}, per_layer=True)  # layer 0 to 1 x 3 heads, the others 2 x 3
    assert [(s.num_k_heads, s.num_v_heads) for s in adapter.shapes()] == [(HK, HV)] * len(LINEAR)


def test_a_dynamic_cache_is_refused_because_attention_layers_grow(model, ids):
    from staterank.models import StaticCacheError

    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    with pytest.raises(StaticCacheError, match=r"layer 1 \(DynamicLayer\) keeps a key/value cache that grows"):
        adapter_for(model).static_cache_tensors(cache)


def test_channels_then_heads_then_generation_in_bfloat16(model, ids):
    adapter = adapter_for(model)
    adapter.keep_qk_channels({layer: torch.stack([torch.randperm(DK)[:8] for _ in range(HK)]) for layer in LINEAR})
    adapter.remove_heads({layer: [2, 5] for layer in LINEAR})
    model.to(torch.bfloat16)
    # the recurrent state stays fp32 in the cache, the conv state takes the model dtype
    check_state_bytes(adapter, ids, torch.bfloat16)
    model.generate(ids[:1], max_new_tokens=2, do_sample=False)


def test_multimodal_qwen3_5(ids, tmp_path):
    """``qwen3_5`` proper is the multimodal class: the text sizes live in ``config.text_config``."""
    torch.manual_seed(0)
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64)
    model = AutoModelForImageTextToText.from_config(Qwen3_5Config(text_config=TEXT, vision_config=vision)).eval()
    adapter = adapter_for(model)
    assert adapter.linear_layers() == LINEAR
    randomise_linear_attention(adapter)
    adapter.keep_qk_channels({layer: torch.stack([torch.randperm(DK)[:12] for _ in range(HK)]) for layer in LINEAR})
    adapter.remove_heads({layer: [0, 1, 2] for layer in LINEAR})
    assert (model.config.text_config.linear_key_head_dim, model.config.text_config.linear_num_key_heads) == (12, 1)
    reloaded = save_and_reload(model, tmp_path, ids, auto=AutoModelForImageTextToText)
    assert adapter_for(reloaded).shapes() == adapter.shapes()
    # and the causal-LM view of the same checkpoint is the text model alone
    text_only = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert text_only.config.model_type == "qwen3_5_text"
    torch.testing.assert_close(logits(text_only, ids), logits(model, ids), rtol=0, atol=1e-6)


def test_cached_state_is_the_final_state_of_the_recurrence(model, ids):
    adapter = adapter_for(model)
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = model(ids, use_cache=True).past_key_values
    for layer in LINEAR:
        _, expected = delta_rule_loop(features[layer])  # [B, Hv, d_k, d_v]
        torch.testing.assert_close(adapter.cached_state(cache, layer).double(), expected, atol=1e-4, rtol=1e-4)
