"""OLMo Hybrid (transformers ``olmo_hybrid``): the adapter on tiny random models, and every command on one.

The models keep OLMo-Hybrid-7B's linear-attention heads (30 key and 30 value heads, d_k 96, d_v 192, convolution
width 4, beta doubled) and shrink what CPU needs: 4 layers (the default layout, full attention in the fourth),
hidden 240 (the attention heads' dim is hidden / 30), a small MLP and vocabulary. The default config derives d_k
from the hidden size (0.75 * hidden / heads: 96 at 3840), so d_k is set. Grouped value heads (not in the
published config, but the layer supports them) are checked on a smaller model, 3 key heads x 2 value heads each.

Every check compares against something computed without the adapter: the mixer's own modules, the arguments of
the delta-rule kernel, the float64 delta rule of ``tests/reference.py``, the original model with the kernel fed
the kept channels or the removed heads' output columns zeroed, a stock reload, and transformers' cache.
"""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from reference import (
    cached_state_bytes,
    delta_rule_loop,
    kernel_fed_kept_channels,
    logits,
    randomise_linear_attention,
    reload_and_compare,
    tapped,
)
from transformers import AutoModelForCausalLM, OlmoHybridConfig

from staterank import api
from staterank.cli import main
from staterank.data import read_documents
from staterank.loading import prepare_runtime
from staterank.models import adapter_for
from staterank.models.base import HeadFeatures, ModelAdapter
from staterank.prune.channels import CHANNEL_CRITERIA
from staterank.rank import states_at
from staterank.tokenizer import train_tokenizer

prepare_runtime("olmo_hybrid")  # CPU tensors go to transformers' PyTorch references, not fla's Triton kernels

HEADS, DK, DV, WIDTH, HIDDEN = 30, 96, 192, 4, 240
VOCAB = 300
LINEAR = [0, 1, 2]


def olmo_config(**overrides) -> OlmoHybridConfig:
    fields = dict(
        num_hidden_layers=4, hidden_size=HIDDEN, intermediate_size=64, vocab_size=VOCAB, linear_key_head_dim=DK,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return OlmoHybridConfig(**{**fields, **overrides})


GROUPED = dict(linear_num_key_heads=3, linear_num_value_heads=6, linear_key_head_dim=16, linear_value_head_dim=32)


def build(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(olmo_config(**overrides)).eval()
    randomise_linear_attention(adapter_for(model))
    return model


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture
def grouped():
    return build(**GROUPED)


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def modeling_module(adapter: ModelAdapter):
    return sys.modules[type(adapter.mixer(LINEAR[0])).__module__]


def save_and_reload(model, path, tokens: torch.Tensor):
    """Reload with stock transformers, check the logits, return the reloaded model."""
    model.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, tokens), logits(model, tokens), rtol=0, atol=1e-6)
    return reloaded


@torch.no_grad()
# --- the adapter ---------------------------------------------------------------------------------------------


def test_layout_and_state_bytes(model):
    adapter = adapter_for(model)
    assert adapter.linear_layers() == LINEAR and model.config.linear_allow_neg_eigval
    for shape in adapter.shapes():
        assert (shape.num_k_heads, shape.num_v_heads, shape.head_k_dim, shape.head_v_dim) == (HEADS, HEADS, DK, DV)
    # per linear layer: an fp32 state [Hv, d_k, d_v] and a conv window [2 Hk d_k + Hv d_v, W] in the model dtype
    per_layer = HEADS * DK * DV * 4 + (2 * HEADS * DK + HEADS * DV) * WIDTH * 4
    assert adapter.state_bytes_per_seq() == cached_state_bytes(model, ids()) == len(LINEAR) * per_layer


def test_tap_is_recomputed_from_the_module_weights_and_is_what_the_kernel_reads(model, monkeypatch):
    adapter = adapter_for(model)
    module = modeling_module(adapter)
    chunk = module.torch_chunk_gated_delta_rule
    kernel_inputs = []

    def recording_kernel(query, key, value, g, beta, **kwargs):
        kernel_inputs.append((query, key, value, g, beta))
        return chunk(query, key, value, g=g, beta=beta, **kwargs)

    monkeypatch.setattr(module, "torch_chunk_gated_delta_rule", recording_kernel)
    tokens = ids()
    features = tapped(adapter, tokens)
    assert sorted(features) == LINEAR
    for (query, key, value, g, beta), layer in zip(kernel_inputs, LINEAR, strict=True):
        f, mixer = features[layer], adapter.mixer(layer)
        hidden = f.hidden  # [B, T, hidden], after the block's input norm
        with torch.no_grad():
            # the module's own padded convolution, cut to the causal part, then SiLU
            x = torch.cat([mixer.q_proj(hidden), mixer.k_proj(hidden), mixer.v_proj(hidden)], dim=-1)
            x = F.silu(mixer.conv1d(x.transpose(1, 2))[..., : tokens.shape[1]].transpose(1, 2))
            q, k, v = x.split([HEADS * DK, HEADS * DK, HEADS * DV], dim=-1)
            expected = {
                "q": q.unflatten(-1, (HEADS, DK)),
                "k": k.unflatten(-1, (HEADS, DK)),
                "v": v.unflatten(-1, (HEADS, DV)),
                "beta": 2 * torch.sigmoid(mixer.b_proj(hidden)),  # linear_allow_neg_eigval
                "log_decay": -mixer.A_log.exp() * F.softplus(mixer.a_proj(hidden) + mixer.dt_bias),
            }
        for name, value_expected in expected.items():
            torch.testing.assert_close(getattr(f, name), value_expected, rtol=1e-6, atol=1e-6)
        for mine, theirs in ((f.q, query), (f.k, key), (f.v, value), (f.log_decay, g), (f.beta, beta)):
            torch.testing.assert_close(mine, theirs.float(), rtol=0, atol=1e-6)
        assert f.beta.max() > 1.2 and f.beta.min() > 0  # doubled: (0, 2)


def test_the_layer_output_and_the_cache_are_the_delta_rule_of_the_tap(model):
    adapter = adapter_for(model)
    tokens = ids()
    core_outputs, hooks = {}, []
    for layer in LINEAR:  # the gated norm's input is the delta rule's output, [B * T * Hv, d_v]
        hooks.append(
            adapter.mixer(layer).o_norm.register_forward_pre_hook(
                lambda _, args, layer=layer: core_outputs.__setitem__(layer, args[0].view(*tokens.shape, HEADS, DV))
            )
        )
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = model(tokens, use_cache=True).past_key_values
    for hook in hooks:
        hook.remove()
    for layer in LINEAR:
        f = features[layer]
        out, final = delta_rule_loop(f)  # float64, token by token
        torch.testing.assert_close(out, core_outputs[layer].double(), rtol=0, atol=1e-4)
        assert core_outputs[layer].abs().max() > 0.1  # not vacuous
        cached = adapter.cached_state(cache, layer)  # [B, Hv, d_k, d_v]
        torch.testing.assert_close(cached.double(), final, rtol=1e-4, atol=1e-4)
        # analyze's chunk-wise reconstruction gives the same final state
        torch.testing.assert_close(states_at(f, [tokens.shape[1]], dtype=torch.float64)[0], final, rtol=1e-5, atol=1e-6)
        # and the doubling matters: the undoubled beta gives another output
        undoubled = HeadFeatures(f.layer, f.hidden, f.q, f.k, f.v, f.beta / 2, f.log_decay)
        assert (delta_rule_loop(undoubled)[0] - out).abs().max() > 1e-2


def test_keep_qk_channels_equals_the_kernel_fed_them_and_reloads(grouped, tmp_path, monkeypatch):
    adapter, shape = adapter_for(grouped), adapter_for(grouped).shapes()[0]
    hk, dk, kept = shape.num_k_heads, shape.head_k_dim, 10
    tokens = ids()
    index = torch.stack([torch.randperm(dk)[:kept] for _ in range(hk)])  # [Hk, d_k'], the same in every layer
    before = tapped(adapter, tokens)
    weights_before = {layer: adapter.qk_weights(layer) for layer in LINEAR}
    convs_before = {layer: adapter.qk_conv_weights(layer) for layer in LINEAR}
    unpruned = logits(grouped, tokens)

    with kernel_fed_kept_channels(adapter, index):
        expected = logits(grouped, tokens)

    adapter.keep_qk_channels({layer: index for layer in LINEAR})
    pruned = logits(grouped, tokens)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-2
    for layer in LINEAR:
        with torch.no_grad():
            after = adapter.features(layer, before[layer].hidden)
        gather = index.expand(*tokens.shape, hk, kept)
        for name in ("q", "k"):
            torch.testing.assert_close(getattr(after, name), getattr(before[layer], name).gather(-1, gather))
        for name in ("v", "beta", "log_decay"):
            torch.testing.assert_close(getattr(after, name), getattr(before[layer], name))
        for now, then in zip(adapter.qk_weights(layer), weights_before[layer], strict=True):  # [Hk, d_k', hidden]
            assert torch.equal(now, then.gather(1, index[..., None].expand(-1, -1, HIDDEN)))
        for now, then in zip(adapter.qk_conv_weights(layer), convs_before[layer], strict=True):  # [Hk, d_k', W]
            assert torch.equal(now, then.gather(1, index[..., None].expand(-1, -1, WIDTH)))

    reloaded = save_and_reload(grouped, tmp_path, tokens)
    assert reloaded.config.linear_key_head_dim == kept and reloaded.config.linear_value_head_dim == shape.head_v_dim
    assert adapter_for(reloaded).shapes() == adapter.shapes()
    assert adapter.state_bytes_per_seq() == cached_state_bytes(grouped, tokens)


# value heads to remove per linear layer (3 key heads x 2 value heads): whole key heads, or one of every key head
REMOVALS = {
    "key_heads": ({0: [0, 1], 1: [4, 5], 2: [2, 3]}, (2, 4)),
    "within_key_heads": ({0: [0, 3, 5], 1: [1, 2, 4], 2: [0, 2, 4]}, (3, 3)),
}


@pytest.mark.parametrize("kind", list(REMOVALS))
def test_remove_heads_equals_zeroed_output_columns_and_reloads(grouped, tmp_path, kind):
    adapter = adapter_for(grouped)
    remove, (num_k, num_v) = REMOVALS[kind]
    dv = adapter.shapes()[0].head_v_dim
    tokens = ids()
    unpruned = logits(grouped, tokens)
    original = copy.deepcopy(grouped)
    with torch.no_grad():
        for layer, heads in remove.items():
            adapter_for(original).mixer(layer).o_proj.weight.view(HIDDEN, -1, dv)[:, heads] = 0
    expected = logits(original, tokens)

    adapter.remove_heads(remove)
    pruned = logits(grouped, tokens)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-2
    reloaded = save_and_reload(grouped, tmp_path, tokens)
    assert (reloaded.config.linear_num_key_heads, reloaded.config.linear_num_value_heads) == (num_k, num_v)
    for layer in LINEAR:
        mixer = adapter_for(reloaded).mixer(layer)
        assert mixer.conv1d.weight.shape == (2 * num_k * 16 + num_v * dv, 1, WIDTH)
        assert mixer.A_log.shape == mixer.dt_bias.shape == (num_v,)
        assert mixer.a_proj.weight.shape == mixer.b_proj.weight.shape == (num_v, HIDDEN)
        assert mixer.g_proj.weight.shape == mixer.v_proj.weight.shape == (num_v * dv, HIDDEN)
    assert adapter.state_bytes_per_seq() == cached_state_bytes(reloaded, tokens)


def test_training_facts(grouped):
    from peft import LoraConfig, get_peft_model

    adapter = adapter_for(grouped)
    decayed = {name for name, p in grouped.named_parameters() if not adapter.no_weight_decay(name, p)}
    assert not any(name.endswith(("A_log", "dt_bias")) for name in decayed)
    assert "model.layers.0.linear_attn.q_proj.weight" in decayed
    # LoRA on the linear-attention q, k, v only, not on the attention block's projections of the same names
    peft_model = get_peft_model(copy.deepcopy(grouped), LoraConfig(r=2, target_modules=list(adapter.lora_targets)))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in peft_model.named_parameters() if ".lora_A" in name}
    assert adapted and all(".linear_attn." in name for name in adapted)
    assert len(adapted) == 3 * len(LINEAR)


# --- the commands, on the published head layout ------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=VOCAB)
    assert len(tokenizer) <= VOCAB
    return tokenizer


def save_source(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def source(model, tokenizer, tmp_path_factory):
    return save_source(model, tokenizer, tmp_path_factory.mktemp("olmo") / "source")


def test_info(source, model, capsys):
    assert main(["info", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["model_type"], info["num_layers"]) == ("OLMo Hybrid (transformers)", "olmo_hybrid", 4)
    assert info["linear_layers"] == LINEAR
    assert info["layers"] == [
        {"layer": i, "num_k_heads": HEADS, "num_v_heads": HEADS, "head_k_dim": DK, "head_v_dim": DV} for i in LINEAR
    ]
    assert info["state_bytes_per_seq"] == cached_state_bytes(model, ids())


def test_prune_l1_half_of_the_keys(source, model, tmp_path):
    out = tmp_path / "l1"
    assert main(["prune", str(source), "--method", "l1", "--ratio", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "pruning.json").read_text())
    in_memory = copy.deepcopy(model)
    adapter = adapter_for(in_memory)
    keep = {int(layer): torch.tensor([heads[str(h)] for h in range(HEADS)]) for layer, heads in report["kept"].items()}
    assert sorted(keep) == LINEAR and {tuple(index.shape) for index in keep.values()} == {(HEADS, DK // 2)}
    # l1: the kept channels are those of the largest ||W_q row||_1 + ||W_k row||_1 in each head
    q, k = adapter.qk_weights(0)  # [Hk, d_k, hidden]
    top = (q.abs().sum(-1) + k.abs().sum(-1)).topk(DK // 2, dim=1).indices.sort(dim=1).values
    assert torch.equal(keep[0].sort(dim=1).values, top)
    adapter.keep_qk_channels(keep)
    reloaded = reload_and_compare(out, in_memory, ids(2, 40))
    assert reloaded.config.linear_key_head_dim == DK // 2 and reloaded.config.linear_value_head_dim == DV
    assert report["state_bytes_after"] == adapter.state_bytes_per_seq() < report["state_bytes_before"]
    assert (out / "README.md").exists()


def test_prune_jrnp_a_quarter_of_the_heads(source, model, tmp_path):
    out = tmp_path / "jrnp"
    args = ["prune", str(source), "--method", "jrnp", "--ratio", "0.25", "--out", str(out), "--data", "techdocs",
            "--calib-tokens", "128", "--seq-len", "64"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "pruning.json").read_text())
    removed = {int(layer): heads for layer, heads in report["removed"].items()}
    (count,) = {len(heads) for heads in removed.values()}  # the same in every layer
    assert abs(count - 0.25 * HEADS) <= 0.5  # a whole count nearest to 7.5 heads
    assert report["ratio"] == 0.25 and report["kept_ratio"] == pytest.approx(count / HEADS)
    in_memory = copy.deepcopy(model)
    adapter_for(in_memory).remove_heads(removed)
    reloaded = reload_and_compare(out, in_memory, ids(2, 40))
    assert reloaded.config.linear_num_value_heads == reloaded.config.linear_num_key_heads == HEADS - count
    assert report["state_bytes_after"] == cached_state_bytes(reloaded, ids())


@pytest.mark.parametrize("method", sorted(CHANNEL_CRITERIA))
def test_every_channel_criterion_prunes_and_reloads(method, tokenizer, tmp_path):
    """On the grouped model (d_k 16 -> 8): the kept channels, applied in memory, are the saved model."""
    grouped_model = build(**GROUPED)
    source = save_source(grouped_model, tokenizer, tmp_path / "source")
    report = api.prune(source, method, 0.5, tmp_path / "out", data="techdocs", calib_tokens=256, seq_len=64,
                       progress=False)  # fmt: skip
    keep = {int(layer): torch.tensor([heads[str(h)] for h in range(3)]) for layer, heads in report["kept"].items()}
    assert sorted(keep) == LINEAR and report["head_k_dim_after"] == 8
    adapter_for(grouped_model).keep_qk_channels(keep)
    reload_and_compare(tmp_path / "out", grouped_model, ids(2, 40))


def test_analyze(source, tmp_path):
    out = tmp_path / "ranks"
    args = ["analyze", str(source), "--data", "techdocs-val", "--out", str(out), "--samples", "2", "--seq-len", "64"]
    assert main(args) == 0
    ranks = json.loads((out / "rank.json").read_text())
    assert [layer["layer"] for layer in ranks["layers"]] == LINEAR
    for layer in ranks["layers"]:
        assert len(layer["heads"]) == HEADS
        for head in layer["heads"]:
            assert 0 < head["effective_rank"][-1] <= min(DK, DV) and head["group"] in ("low", "high")
