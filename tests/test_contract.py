"""The contract every registered model family keeps, on a tiny random model of each.

A new family is one adapter file in ``src/staterank/models/`` plus one tiny config in FAMILIES below
(``test_every_registered_family_has_a_tiny_config`` fails until it has one). Every property is checked
through the adapter interface only, against a computation that does not use the code under test:

- the tap's q, k, v, beta and decay have the shapes of the layer's LayerShape, which the state in the
  model's own cache confirms;
- keeping every q/k channel (the identity selection) leaves the logits exactly as they were;
- keeping a subset of channels equals the original model with the dropped channels' q/k projection rows
  zeroed, and the pruned tap is the original tap's kept channels;
- removing heads equals the original model with the removed heads' output-projection columns zeroed;
- the pruned model, saved, reloads in the stock Auto class with the same logits;
- the final state rebuilt from the tap (:func:`staterank.rank.states_at`) is the state in the model's own cache.

Zeroed rows against kept channels: a zeroed projection row makes that channel 0 after the depthwise
convolution (no bias) and SiLU, so the L2 norms and every q . k are those of the kept channels alone. What
differs is the kernels' query scale, d_k^-1/2 in the original and d_k'^-1/2 in the pruned model; each head's
output RMSNorm cancels that factor up to its epsilon (``staterank.prune.qk``), so the tiny configs set that
epsilon to 1e-30 and the two agree to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from reference import logits, tapped
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    KimiLinearConfig,
    OlmoHybridConfig,
    Qwen3_5Config,
    Qwen3_5MoeConfig,
    Qwen3_5MoeTextConfig,
    Qwen3_5TextConfig,
    Qwen3NextConfig,
)

from staterank.loading import prepare_runtime
from staterank.models import ADAPTERS, ModelAdapter, PruningShapeError, adapter_for
from staterank.models.kimi_linear import StaterankKimiLinearConfig
from staterank.models.per_layer import StaterankDeltaNetConfig, StaterankGatedDeltaNetConfig
from staterank.rank import states_at

prepare_runtime("delta_net")  # registers fla's classes and routes every family's CPU work to PyTorch
from fla.models import (  # noqa: E402
    DeltaNetConfig,
    GatedDeltaNetConfig,
    GatedDeltaProductConfig,
    GLAConfig,
    KDAConfig,
    LinearAttentionConfig,
    RetNetConfig,
)

VOCAB = 64
EPS = 1e-30  # the heads' output RMSNorm epsilon (fla: norm_eps, transformers: rms_norm_eps); see the docstring

DELTA_NET = dict(hidden_size=32, num_hidden_layers=2, num_heads=4, vocab_size=VOCAB, norm_eps=EPS)
GATED_DELTANET = dict(hidden_size=32, num_hidden_layers=2, head_dim=8, expand_v=1.0, vocab_size=VOCAB, norm_eps=EPS)
HYBRID = dict(  # a linear-attention layer, a full-attention layer, a linear-attention layer
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_conv_kernel_dim=4, rms_norm_eps=EPS,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
)  # fmt: skip
MOE = dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16)
VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32)
KIMI_LINEAR = dict(  # KDA, MLA, KDA; MoE in the last two blocks
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_experts=2,
    num_experts_per_token=1, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8,
    qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, linear_head_dim=8, linear_num_heads=4, rms_norm_eps=EPS,
    pad_token_id=None, bos_token_id=None, eos_token_id=None,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
)  # fmt: skip
OLMO_HYBRID = dict(  # as HYBRID, with OLMo's d_v = 2 d_k (its output norm's epsilon is fixed at 1e-5)
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
    linear_key_head_dim=8, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_conv_kernel_dim=4, rms_norm_eps=EPS, pad_token_id=0, eos_token_id=1,
    layer_types=["linear_attention", "full_attention", "linear_attention"],
)  # fmt: skip

#: One tiny config per registered model_type; 2 key heads x 4 value heads wherever the family groups value heads.
FAMILIES = {
    "delta_net": lambda: DeltaNetConfig(**DELTA_NET),
    "gated_deltanet": lambda: GatedDeltaNetConfig(**GATED_DELTANET, num_heads=2, num_v_heads=4),
    "qwen3_next": lambda: Qwen3NextConfig(**HYBRID, **MOE),
    "qwen3_5_text": lambda: Qwen3_5TextConfig(**HYBRID),
    "qwen3_5_moe_text": lambda: Qwen3_5MoeTextConfig(**HYBRID, **MOE),
    "qwen3_5": lambda: Qwen3_5Config(text_config=HYBRID, vision_config=VISION),
    "qwen3_5_moe": lambda: Qwen3_5MoeConfig(text_config={**HYBRID, **MOE}, vision_config=VISION),
    "kda": lambda: KDAConfig(**GATED_DELTANET, num_heads=2, num_v_heads=4),
    "kimi_linear": lambda: KimiLinearConfig(**KIMI_LINEAR),
    # what a d_k-pruned kimi_linear is saved as: q, k narrower than v
    "staterank_kimi_linear": lambda: StaterankKimiLinearConfig(**KIMI_LINEAR, linear_key_head_dim=6),
    "olmo_hybrid": lambda: OlmoHybridConfig(**OLMO_HYBRID),
    "gated_deltaproduct": lambda: GatedDeltaProductConfig(
        **GATED_DELTANET, num_heads=2, num_householder=2, use_forget_gate=True, allow_neg_eigval=True
    ),
    "gla": lambda: GLAConfig(**DELTA_NET, expand_k=1.0, expand_v=1.0, use_short_conv=True),
    "linear_attn": lambda: LinearAttentionConfig(**DELTA_NET, feature_map="relu", attn_mode="chunk"),
    "retnet": lambda: RetNetConfig(**DELTA_NET, expand_k=1.0, expand_v=1.0, use_short_conv=True),
    # what `staterank prune --scope global` saves: layers with different head counts
    "staterank_delta_net": lambda: per_layer_heads(
        StaterankDeltaNetConfig, DeltaNetConfig(**DELTA_NET), {"0": [2, 2], "1": [4, 4]}
    ),
    "staterank_gated_deltanet": lambda: per_layer_heads(
        StaterankGatedDeltaNetConfig, GatedDeltaNetConfig(**GATED_DELTANET, num_heads=4, num_v_heads=4),
        {"0": [4, 4], "1": [3, 3]},
    ),
}
#: The Auto class that builds and reloads a family, where it is not AutoModelForCausalLM.
AUTO_CLASSES = {"qwen3_5": AutoModelForImageTextToText, "qwen3_5_moe": AutoModelForImageTextToText}
#: Registered model_types that FAMILIES leaves out, with the reason and where they are tested.
COVERED_ELSEWHERE: dict[str, str] = {
    name: "tests/test_family_mamba2.py: Mamba-2 layers, states against the cache at every position, d_state and "
    "whole-group pruning with stock reloads; graphed decoding is refused"
    for name in ("mamba2", "bamba", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2")
} | {
    "rwkv7": "tests/test_family_rwkv7.py: the DPLR rule against fla's references, states against the cache at every "
    "position, decoding; its pruning is refused"
}


def families(**known_failures: str) -> list:
    """FAMILIES as test parameters; ``family=reason`` marks a known failure (strict: the fix shows as a pass)."""
    return [
        pytest.param(family, marks=pytest.mark.xfail(strict=True, reason=known_failures[family]))
        if family in known_failures
        else family
        for family in FAMILIES
    ]


def per_layer_heads(config_class, base, layer_heads: dict[str, list[int]]):
    """A ``staterank_*`` config: the fields of ``base`` (at the largest head count) and the heads of every layer."""
    fields = {key: value for key, value in base.to_dict().items() if key != "model_type"}
    return config_class(**fields, staterank_layer_heads=layer_heads)


def build(family: str) -> tuple[torch.nn.Module, ModelAdapter]:
    """The family's tiny model in eval mode, its linear-attention weights large enough that every part matters."""
    config = FAMILIES[family]()
    prepare_runtime(family)
    torch.manual_seed(0)
    model = AUTO_CLASSES.get(family, AutoModelForCausalLM).from_config(config).float().eval()
    adapter = adapter_for(model)
    for layer in adapter.linear_layers():
        for module in adapter.mixer(layer).modules():  # the default init leaves the mixers nearly silent
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, torch.nn.Conv1d):
                torch.nn.init.normal_(module.weight, std=0.5)
    return model, adapter


def tokens(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))




@torch.no_grad()
def output_projections(adapter: ModelAdapter, ids: torch.Tensor) -> dict[int, torch.nn.Linear]:
    """Per linear-attention layer, the linear map its mixer applies last: the one from the heads' outputs
    [..., Hv * d_v] (head-major) to the residual stream. Found by watching a forward, not by name."""
    calls: dict[int, list[torch.nn.Linear]] = {layer: [] for layer in adapter.linear_layers()}
    hooks = [
        module.register_forward_hook(lambda module, args, out, layer=layer: calls[layer].append(module))
        for layer in calls
        for module in adapter.mixer(layer).modules()
        if isinstance(module, torch.nn.Linear)
    ]
    try:
        adapter.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: linears[-1] for layer, linears in calls.items()}


def value_heads_to_remove(adapter: ModelAdapter) -> dict[int, list[int]]:
    """Per layer, one value head of every key head (a different one in each group) where heads are grouped,
    every other head where they are not: a removal every family can represent."""
    remove = {}
    for shape in adapter.shapes():
        if shape.group_size > 1:
            remove[shape.layer] = [g * shape.group_size + g % shape.group_size for g in range(shape.num_k_heads)]
        else:
            remove[shape.layer] = list(range(1, shape.num_v_heads, 2))
    return remove


def random_channels(adapter: ModelAdapter, keep: int) -> dict[int, torch.Tensor]:
    """Per layer, ``keep`` random q/k channels of every key head, ascending: [Hk, keep]."""
    generator = torch.Generator().manual_seed(2)
    channels = {}
    for shape in adapter.shapes():
        rows = [torch.randperm(shape.head_k_dim, generator=generator)[:keep] for _ in range(shape.num_k_heads)]
        channels[shape.layer] = torch.stack(rows).sort(dim=1).values
    return channels


def keep_mask(index: torch.Tensor, d_k: int) -> torch.Tensor:
    """[Hk, keep] channel indices -> [Hk, d_k] True where kept."""
    return torch.zeros(index.shape[0], d_k, dtype=torch.bool).scatter(1, index, True)


def save_and_reload(family: str, model, path) -> torch.nn.Module:
    """``save_pretrained``, then the stock Auto class's ``from_pretrained`` (``import staterank`` registers the
    ``staterank_*`` types, ``import fla`` the fla ones)."""
    model.save_pretrained(path)
    return AUTO_CLASSES.get(family, AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32).eval()


# --- tests ----------------------------------------------------------------------------------------------------------


def test_every_registered_family_has_a_tiny_config():
    assert set(FAMILIES) | set(COVERED_ELSEWHERE) == set(ADAPTERS)
    assert not set(FAMILIES) & set(COVERED_ELSEWHERE)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_tap_has_the_layer_shapes_and_its_final_state_is_the_cached_state(family, one_thread):
    model, adapter = build(family)
    ids = tokens()
    assert adapter_for(model).config.model_type == family
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert sorted(features) == adapter.linear_layers() != []
    width = model.get_input_embeddings().embedding_dim
    for shape in adapter.shapes():
        f = features[shape.layer]
        assert f.hidden.shape == (*ids.shape, width)
        assert f.q.shape == (*ids.shape, shape.num_k_heads, shape.head_k_dim)
        steps = f.k.shape[1] // ids.shape[1]  # delta steps per token: DeltaProduct's Householder keys, else 1
        stepped = (len(ids), ids.shape[1] * steps)  # k, v, beta and the decay: one entry per step
        assert f.k.shape == (*stepped, shape.num_k_heads, shape.head_k_dim)
        assert f.v.shape == (*stepped, shape.num_v_heads, shape.head_v_dim)
        assert f.beta.shape == (*stepped, shape.num_v_heads)
        per_channel = (*stepped, shape.num_v_heads, shape.head_k_dim)  # KDA: a decay per key channel
        assert f.log_decay is None or f.log_decay.shape in ((*stepped, shape.num_v_heads), per_channel)
        cached = adapter.cached_state(cache, shape.layer)  # [B, Hv, d_k, d_v], the model's own
        assert cached.shape == (len(ids), shape.num_v_heads, shape.head_k_dim, shape.head_v_dim)
        final = states_at(f, [ids.shape[1]], dtype=torch.float64)[0]
        torch.testing.assert_close(final, cached.double(), rtol=1e-4, atol=1e-5)
        assert final.abs().max() > 0.1  # not vacuous


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_channel_is_the_identity(family, one_thread):
    model, adapter = build(family)
    ids = tokens()
    before = logits(model, ids)
    keep = {shape.layer: torch.arange(shape.head_k_dim).repeat(shape.num_k_heads, 1) for shape in adapter.shapes()}
    if refused(adapter.channel_pruning_refusal, "cannot be pruned", adapter.keep_qk_channels, keep):
        return
    adapter.keep_qk_channels(keep)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)


def refused(reason: str | None, words: str, call, *args) -> bool:
    """For a family that refuses an operation (``reason``): the call raises one clear line saying so, and the
    model is left as it was; ``False`` for a family that allows it."""
    if reason is None:
        return False
    with pytest.raises(PruningShapeError, match=words) as error:
        call(*args)
    assert reason in str(error.value) and "\n" not in str(error.value)
    return True


@pytest.mark.parametrize(
    "family",
    families(
        olmo_hybrid="its heads' output RMSNorm has a fixed epsilon of 1e-5, which keeps part of the query scale "
        "d_k^-1/2 that zeroed rows and kept channels differ by; tests/test_family_olmo_hybrid.py checks kept "
        "channels against the kernel fed those channels, and the reload",
        gated_deltaproduct="its qk_weights' k rows [Hk, d_k, n * hidden] are a copy (k_proj is laid out (n h d)), "
        "so zeroing them leaves the model alone; tests/test_family_deltaproduct.py zeroes k_proj's rows of every "
        "Householder key instead, and reloads",
    ),
)
def test_kept_channels_equal_zeroed_rows_and_reload(family, one_thread, tmp_path):
    model, adapter = build(family)
    ids = tokens()
    original = tapped(adapter, ids)
    unpruned = logits(model, ids)
    d_k = adapter.shapes()[0].head_k_dim
    keep = random_channels(adapter, d_k - 3)
    if refused(adapter.channel_pruning_refusal, "cannot be pruned", adapter.keep_qk_channels, keep):
        torch.testing.assert_close(logits(model, ids), unpruned, rtol=0, atol=0)
        return

    # the original with the dropped channels' q and k projection rows zeroed (through the adapter's views)
    masked_model, masked = build(family)
    for layer, index in keep.items():
        dropped = ~keep_mask(index, d_k)  # [Hk, d_k]
        for rows in masked.qk_weights(layer):  # [Hk, d_k, hidden] each
            rows[dropped] = 0
    for layer, f in tapped(masked, ids).items():  # the premise: the dropped channels are 0 in the features
        dropped = ~keep_mask(keep[layer], d_k)
        assert f.q[..., dropped].abs().max() == f.k[..., dropped].abs().max() == 0
    expected = logits(masked_model, ids)

    adapter.keep_qk_channels(keep)
    pruned = logits(model, ids)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-3  # not vacuous
    for layer, index in keep.items():  # the pruned tap is the original tap's kept channels
        with torch.no_grad():
            after = adapter.features(layer, original[layer].hidden)
        gather = index.expand(*ids.shape, *index.shape)
        for name in ("q", "k"):
            torch.testing.assert_close(getattr(after, name), getattr(original[layer], name).gather(-1, gather))
        for name in ("v", "beta", "log_decay"):
            before = getattr(original[layer], name)
            if name == "log_decay" and before is not None and before.ndim == 4:  # per key channel: the kept ones
                shape = adapter.layer_shape(layer)
                before = before.gather(-1, index.repeat_interleave(shape.group_size, 0).expand(*ids.shape, -1, -1))
            torch.testing.assert_close(getattr(after, name), before)

    reloaded = save_and_reload(family, model, tmp_path)
    assert [s.head_k_dim for s in adapter_for(reloaded).shapes()] == [d_k - 3] * len(keep)
    torch.testing.assert_close(logits(reloaded, ids), pruned, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_heads_equal_zeroed_output_columns_and_reload(family, one_thread, tmp_path):
    model, adapter = build(family)
    ids = tokens()
    unpruned = logits(model, ids)
    remove = value_heads_to_remove(adapter)
    if refused(adapter.head_pruning_refusal, "cannot be removed", adapter.remove_heads, remove):
        torch.testing.assert_close(logits(model, ids), unpruned, rtol=0, atol=0)
        return

    masked_model, masked = build(family)
    projections = output_projections(masked, ids)
    for layer, heads in remove.items():
        shape = masked.layer_shape(layer)
        weight = projections[layer].weight  # [hidden, Hv * d_v]
        assert weight.shape[1] == shape.num_v_heads * shape.head_v_dim
        with torch.no_grad():
            weight.view(-1, shape.num_v_heads, shape.head_v_dim)[:, heads] = 0
    expected = logits(masked_model, ids)

    before = {s.layer: s for s in adapter.shapes()}
    state_bytes = adapter.state_bytes_per_seq()
    adapter.remove_heads(remove, per_layer=len({(s.num_k_heads, s.num_v_heads) for s in before.values()}) > 1)
    pruned = logits(model, ids)
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-3  # not vacuous
    for shape in adapter.shapes():
        assert shape.num_v_heads == before[shape.layer].num_v_heads - len(remove[shape.layer])
    assert adapter.state_bytes_per_seq() < state_bytes

    reloaded = save_and_reload(family, model, tmp_path)
    assert adapter_for(reloaded).shapes() == adapter.shapes()
    torch.testing.assert_close(logits(reloaded, ids), pruned, rtol=0, atol=1e-6)
    with torch.no_grad():
        cache = reloaded(input_ids=ids, use_cache=True).past_key_values
    for shape in adapter_for(reloaded).shapes():  # the cache holds the smaller state
        cached = adapter_for(reloaded).cached_state(cache, shape.layer)
        assert cached.shape == (len(ids), shape.num_v_heads, shape.head_k_dim, shape.head_v_dim)


@torch.no_grad()
def decodes_as_its_own_cache(model, prompt: torch.Tensor, decoder, steps: int, after_step=lambda: None) -> None:
    """``decoder``'s next ``steps`` steps give the logits of decoding the prompt's last token again and again
    through the model's own (default) cache; ``after_step`` runs after each."""
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    for _ in range(steps):
        expected = model(input_ids=prompt[:, -1:], past_key_values=cache, use_cache=True)
        cache = expected.past_key_values
        torch.testing.assert_close(decoder.step(), expected.logits, rtol=1e-5, atol=1e-5)
        after_step()


@pytest.mark.parametrize("transposed", [False, True], ids=["row-major", "transposed"])
@pytest.mark.parametrize("family", FAMILIES)
def test_static_decoding_equals_the_models_own_cache_and_keeps_its_memory(family, transposed, one_thread):
    """The graph-ready decoder (fla's own cache, transformers' StaticCache for the hybrids) gives the logits of
    decoding through the model's default cache, in tensors that never move; also with every projection's
    weight stored transposed, as the graphed decoder does where cuBLAS runs that layout faster."""
    from staterank.bench import BenchError, StaticDecoder, row_major_projections

    model, adapter = build(family)
    prompt = tokens()[:, :9]
    if family == "retnet":  # its rotary position is read on the host: a graph would replay one position
        with pytest.raises(BenchError, match="rotary position"):
            StaticDecoder(model, prompt, max_new_tokens=4)
        return
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # a timer under which the transposed layout wins (or loses) for every shape
    timer = (lambda x, w: 1.0 - (w.stride(0) == 1)) if transposed else (lambda x, w: float(w.stride(0) == 1))
    decoder = StaticDecoder(model, prompt, max_new_tokens=4, relayout=True, timer=timer)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not model.get_output_embeddings()]
    assert all((m.weight.stride(0) == 1) == transposed for m in linears if m.out_features > 1)
    assert (len(decoder.transposed) > 0) == transposed
    addresses = [t.data_ptr() for t in decoder.states]
    decodes_as_its_own_cache(model, prompt, decoder, 4)
    assert [t.data_ptr() for t in decoder.states] == addresses
    row_major_projections(model)
    for name, p in model.named_parameters():  # the values never changed, and the layout is back
        assert p.is_contiguous() and torch.equal(p, before[name]), name


@pytest.mark.parametrize("family", ["qwen3_5_text", "olmo_hybrid"])
def test_compiled_static_decoding_equals_the_models_own_cache(family, one_thread):
    """With ``compile``, the static decoder's step is the model's forward compiled by torch.compile (Inductor), the
    dispatched kernels called between its graphs: it still gives the logits of decoding through the model's own
    cache, in tensors that never move, and compiles once (no step after the first compiles again)."""
    import torch._dynamo

    from staterank.bench import StaticDecoder

    model, adapter = build(family)
    prompt = tokens()[:, :9]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    decoder = StaticDecoder(model, prompt, max_new_tokens=4, compile=True)
    addresses = [t.data_ptr() for t in decoder.states]
    compiled = []  # what dynamo has compiled, after each step
    decodes_as_its_own_cache(
        model, prompt, decoder, 4, lambda: compiled.append(dict(torch._dynamo.utils.counters["stats"]))
    )
    assert compiled[0].get("unique_graphs", 0) > 0  # it did compile ...
    assert all(c == compiled[0] for c in compiled)  # ... at the first step only
    assert [t.data_ptr() for t in decoder.states] == addresses
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("family", "why"),
    [("gated_deltanet", "every compiled step would compile again"), ("kimi_linear", "mixture of experts")],
)
def test_compiled_decoding_refuses_a_host_counter_and_experts(family, why, one_thread):
    """fla's cache counts tokens in a Python int (each step would recompile); a mixture of experts' compiled step
    was not shown equal to its own cache on a GPU (docs/RESULTS.md): both are refused, in one line."""
    from staterank.bench import BenchError, StaticDecoder

    model, _ = build(family)
    with pytest.raises(BenchError, match=why) as refused:
        StaticDecoder(model, tokens()[:, :9], max_new_tokens=2, compile=True)
    assert "\n" not in str(refused.value)


# Families whose one-token step is a fused recurrent delta rule, gated delta rule or KDA (GLA and linear
# attention decode through other kernels, and their states are copied back; RetNet refuses static decoding)
IN_PLACE = sorted(set(FAMILIES) - {"gla", "linear_attn", "retnet"})


@pytest.mark.parametrize("family", IN_PLACE)
def test_static_decoding_writes_every_state_in_place(family, one_thread, monkeypatch):
    """In the graph-ready decoder every linear layer's step overwrites its state where it lies: no copy."""
    from staterank.backends import in_place
    from staterank.bench import StaticDecoder

    written = []
    step = in_place.step

    def watched(*args, **kwargs):
        result = step(*args, **kwargs)
        written.append(result is not None)
        return result

    monkeypatch.setattr(in_place, "step", watched)
    model, adapter = build(family)
    decoder = StaticDecoder(model, tokens()[:, :9], max_new_tokens=2)
    for _ in range(2):
        written.clear()
        decoder.step()
        assert written == [True] * len(adapter.linear_layers())
        assert decoder.copies == 0
