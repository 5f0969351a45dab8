"""Kimi Delta Attention: the PyTorch op against fla's naive references, and the two families that use it
(transformers ``kimi_linear``, fla ``kda``) through every command.

The commands run on transformers' default ``KimiLinearConfig`` cut to 4 blocks (3 KDA : 1 MLA, as published)
with the published KDA shapes (32 heads, d_k = d_v = 128, conv 4) and a small hidden size, MLP, MoE and vocabulary
so that CPU runs stay fast.
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from fla.ops.kda.gate import naive_kda_gate, naive_kda_lowerbound_gate
from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda
from reference import cached_state_bytes, decoded_logits, logits, reload_and_compare
from transformers import AutoModelForCausalLM, KimiLinearConfig, KimiLinearForCausalLM

from staterank.backends.delta_rule import chunk_delta_rule_torch, delta_rule_step_torch, l2_norm
from staterank.backends.kda import chunk_kda, fused_recurrent_kda, kda_log_decay
from staterank.bench import BenchError, GraphedDecoder
from staterank.cli import main
from staterank.data import read_documents
from staterank.loading import prepare_runtime
from staterank.models import adapter_for
from staterank.models.kimi_linear import StaterankKimiLinearConfig, StaterankKimiLinearForCausalLM
from staterank.rank import states_at
from staterank.tokenizer import train_tokenizer

prepare_runtime("kda")
prepare_runtime("kimi_linear")
from fla.models import KDAConfig  # noqa: E402
from transformers.models.kimi_linear import modeling_kimi_linear  # noqa: E402

HEADS, DK = 32, 128  # Kimi-Linear-48B-A3B's KDA layer
LINEAR = [0, 1, 2]
VOCAB = 300


def recurrent_kda_float64(q, k, v, g, beta, h0):
    """The KDA recurrence token by token in float64 (fla's naive_recurrent_kda casts to float32):
    q, k [B, T, H, K] (L2-normalised), v [B, T, HV, V], g [B, T, HV, K], beta [B, T, HV], h0 [B, HV, K, V]."""
    group = v.shape[2] // q.shape[2]
    q, k = (x.double().repeat_interleave(group, dim=2) for x in (q, k))
    state, outputs = h0.double().clone(), []
    for t in range(q.shape[1]):
        state = state * g[:, t].double().exp()[..., None]
        error = v[:, t].double() - torch.einsum("bhk,bhkv->bhv", k[:, t], state)
        state = state + torch.einsum("bhk,bhv->bhkv", k[:, t], beta[:, t].double()[..., None] * error)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * q.shape[-1] ** -0.5, state))
    return torch.stack(outputs, dim=1), state


def kda_inputs(batch=2, seq=45, heads=2, group=2, d_k=16, d_v=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value_heads = heads * group

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return dict(
        q=randn(batch, seq, heads, d_k), k=randn(batch, seq, heads, d_k), v=randn(batch, seq, value_heads, d_v),
        g=-torch.rand(batch, seq, value_heads, d_k, generator=generator, dtype=torch.float64) * 2,
        beta=torch.rand(batch, seq, value_heads, generator=generator, dtype=torch.float64),
        h0=randn(batch, value_heads, d_k, d_v),
    )  # fmt: skip


# --- the op --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 8, 32])
def test_chunked_kda_equals_the_recurrence_with_an_initial_state(chunk_size):
    x = kda_inputs()
    o, state = chunk_delta_rule_torch(x["q"], x["k"], x["v"], x["beta"], x["g"], x["h0"], True, chunk_size=chunk_size)
    assert o.dtype == state.dtype == torch.float64
    qn, kn = l2_norm(x["q"]), l2_norm(x["k"])
    o_ref, state_ref = recurrent_kda_float64(qn, kn, x["v"], x["g"], x["beta"], x["h0"])
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-10)
    # fla's naive references (they compute in float32)
    o_fla, state_fla = naive_recurrent_kda(
        qn, kn, x["v"], x["g"], x["beta"], initial_state=x["h0"], output_final_state=True
    )
    torch.testing.assert_close(o, o_fla.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_fla.double(), rtol=1e-5, atol=1e-5)
    cut = {name: value[:, :32] if value.ndim > 3 or name == "beta" else value for name, value in x.items()}
    cut["h0"] = x["h0"]
    o_chunk, state_chunk = naive_chunk_kda(
        l2_norm(cut["q"]), l2_norm(cut["k"]), cut["v"], cut["g"], cut["beta"], initial_state=cut["h0"],
        output_final_state=True, chunk_size=16,
    )  # fmt: skip
    o, state = chunk_delta_rule_torch(
        cut["q"], cut["k"], cut["v"], cut["beta"], cut["g"], cut["h0"], True, chunk_size=chunk_size
    )
    torch.testing.assert_close(o, o_chunk.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_chunk.double(), rtol=1e-5, atol=1e-5)


def test_strong_decays_do_not_overflow():
    x = kda_inputs(seq=64)
    g = x["g"] * 200  # exp(g) underflows to 0 within a chunk; the pairwise ratios must not overflow
    o, state = chunk_delta_rule_torch(x["q"], x["k"], x["v"], x["beta"], g, x["h0"], True, chunk_size=32)
    o_ref, state_ref = recurrent_kda_float64(l2_norm(x["q"]), l2_norm(x["k"]), x["v"], g, x["beta"], x["h0"])
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, state_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_fla_entry_points_apply_the_gate_beta_and_state_layout(lower_bound):
    x = kda_inputs(seq=20)
    heads, d_k = x["g"].shape[2:]
    generator = torch.Generator().manual_seed(3)
    A_log = torch.rand(heads, generator=generator, dtype=torch.float64) * 2
    dt_bias = torch.randn(heads * d_k, generator=generator, dtype=torch.float64)
    logits, beta_logits = x["g"] * 3 + 1, torch.logit(x["beta"])
    if lower_bound is None:
        g = naive_kda_gate(logits, A_log, dt_bias, output_dtype=torch.float64)
    else:
        g = naive_kda_lowerbound_gate(logits, A_log, dt_bias, lower_bound, output_dtype=torch.float64)
    torch.testing.assert_close(kda_log_decay(logits, A_log, dt_bias, lower_bound), g, rtol=1e-6, atol=1e-6)
    o_ref, state_ref = recurrent_kda_float64(l2_norm(x["q"]), l2_norm(x["k"]), x["v"], g, x["beta"], x["h0"])
    for op in (chunk_kda, fused_recurrent_kda):
        o, state_v_first = op(
            x["q"], x["k"], x["v"], logits, beta_logits, A_log=A_log, dt_bias=dt_bias,
            initial_state=x["h0"].transpose(-1, -2), output_final_state=True, use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, lower_bound=lower_bound, state_v_first=True,
        )  # fmt: skip
        torch.testing.assert_close(o, o_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state_v_first.transpose(-1, -2), state_ref, rtol=1e-6, atol=1e-6)


def test_one_step_and_packed_sequences():
    x = kda_inputs(batch=1, seq=9)
    q, k = l2_norm(x["q"]), l2_norm(x["k"])
    o_ref, state_ref = recurrent_kda_float64(q, k, x["v"], x["g"], x["beta"], x["h0"])
    o, state = delta_rule_step_torch(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["beta"][:, 0], x["g"][:, 0], x["h0"])
    torch.testing.assert_close(o, o_ref[:, 0], rtol=1e-10, atol=1e-10)
    # two sequences packed into one row, each from its own initial state
    packed = {name: value for name, value in x.items() if name != "h0"}
    h0 = torch.cat([x["h0"], -x["h0"]])
    o, states = chunk_kda(
        packed["q"], packed["k"], packed["v"], packed["g"], packed["beta"], initial_state=h0,
        output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=torch.tensor([0, 4, 9]),
    )  # fmt: skip
    second = {name: value[:, 4:] for name, value in packed.items()}
    o_second, state_second = recurrent_kda_float64(
        l2_norm(second["q"]), l2_norm(second["k"]), second["v"], second["g"], second["beta"], -x["h0"]
    )
    torch.testing.assert_close(o[:, 4:], o_second, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(states[1:], state_second, rtol=1e-10, atol=1e-10)


def test_states_at_with_a_decay_per_key_channel():
    from staterank.models import HeadFeatures

    x = kda_inputs(seq=40)
    features = HeadFeatures(0, x["q"], x["q"], x["k"], x["v"], x["beta"], x["g"])
    states = states_at(features, [1, 7, 33, 40], chunk_size=16, dtype=torch.float64)
    zero = torch.zeros_like(x["h0"])
    for position, state in zip([1, 7, 33, 40], states, strict=True):
        cut = {name: value[:, :position] for name, value in x.items() if name != "h0"}
        _, expected = recurrent_kda_float64(
            l2_norm(cut["q"]), l2_norm(cut["k"]), cut["v"], cut["g"], cut["beta"], zero
        )
        torch.testing.assert_close(state, expected, rtol=1e-10, atol=1e-10)


# --- the models --------------------------------------------------------------------------------------------------


def kimi_config(vocab_size: int = VOCAB, **key_dim) -> KimiLinearConfig:
    """transformers' default KimiLinearConfig (Kimi-Linear-48B-A3B) cut to 4 blocks, its KDA shapes kept; with
    ``linear_key_head_dim``, the config a d_k-pruned model is saved with."""
    return (StaterankKimiLinearConfig if key_dim else KimiLinearConfig)(
        **key_dim,
        num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
        hidden_size=256, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_token=2,
        vocab_size=vocab_size, pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def randomise(adapter) -> None:
    """The default init leaves the mixers nearly silent; scale their weights so that every part matters."""
    for layer in adapter.linear_layers():
        for module in adapter.mixer(layer).modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
            elif isinstance(module, torch.nn.Conv1d):
                torch.nn.init.normal_(module.weight, std=0.5)


@pytest.fixture(scope="module")
def kimi():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(kimi_config()).float().eval()
    randomise(adapter_for(model))
    return model


@pytest.fixture(scope="module")
def kda_model():
    config = KDAConfig(
        hidden_size=64, num_hidden_layers=2, head_dim=16, num_heads=2, num_v_heads=4, vocab_size=VOCAB,
        fuse_cross_entropy=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    randomise(adapter_for(model))
    return model


def ids(batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_kimi_layout_and_cpu_route(kimi):
    adapter = adapter_for(kimi)
    assert adapter.linear_layers() == LINEAR
    assert {(s.num_k_heads, s.num_v_heads, s.head_k_dim, s.head_v_dim) for s in adapter.shapes()} == {
        (HEADS, HEADS, DK, DK)
    }
    # with fla importable transformers bound fla's Triton kernels; on CPU staterank routes the calls to its own op
    assert getattr(modeling_kimi_linear.chunk_kimi_delta_attention, "_staterank_dispatch", False)
    assert getattr(modeling_kimi_linear.recurrent_kimi_delta_attention, "_staterank_dispatch", False)


def test_a_pruned_kimi_chooses_the_stock_attention_and_experts_implementations(monkeypatch):
    """transformers reads a class's module source to decide whether it may choose grouped_mm experts (and sdpa),
    caching the answer on the class: the d_k-pruned class, built first in a process, gets the stock choice, not the
    eager experts loop that no CUDA graph can capture."""
    for cls in (KimiLinearForCausalLM, StaterankKimiLinearForCausalLM):
        for cached in ("_can_set_experts_implementation_cached_value", "_can_set_attn_implementation_cached_value"):
            if cached in vars(cls):
                monkeypatch.delattr(cls, cached)
    pruned = AutoModelForCausalLM.from_config(kimi_config(linear_key_head_dim=64))
    stock = AutoModelForCausalLM.from_config(kimi_config())
    assert type(pruned) is StaterankKimiLinearForCausalLM
    assert pruned.config._experts_implementation == stock.config._experts_implementation != "eager"
    assert pruned.config._attn_implementation == stock.config._attn_implementation


def test_graphed_decoding_refuses_the_eager_experts_loop_in_one_line(kimi):
    before = kimi.get_experts_implementation()
    kimi.set_experts_implementation("eager")
    try:
        with pytest.raises(BenchError, match="eager loop") as error:
            GraphedDecoder(kimi, ids(batch=1, seq=4), 8)
    finally:
        kimi.set_experts_implementation(before)
    assert "\n" not in str(error.value)


def test_kimi_forward_equals_transformers_reference_and_its_own_decoding(kimi, monkeypatch):
    tokens = ids(1, 20)
    ours = logits(kimi, tokens)
    torch.testing.assert_close(decoded_logits(kimi, tokens, 16), ours, rtol=1e-4, atol=1e-4)
    for name in ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention"):  # transformers' own PyTorch
        monkeypatch.setattr(modeling_kimi_linear, name, inspect.unwrap(getattr(modeling_kimi_linear, name)))
    torch.testing.assert_close(logits(kimi, tokens), ours, rtol=1e-4, atol=1e-4)


def test_fla_kda_forward_equals_its_own_decoding(kda_model):
    tokens = ids(2, 30)
    torch.testing.assert_close(decoded_logits(kda_model, tokens, 20), logits(kda_model, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["kimi", "kda_model"])
def test_final_state_rebuilt_from_the_tap_is_the_cached_state(name, request):
    model = request.getfixturevalue(name)
    adapter, tokens = adapter_for(model), ids(1, 40)  # 40 tokens: a full chunk of 32 and a partial one
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = model(input_ids=tokens, use_cache=True).past_key_values
    for shape in adapter.shapes():
        f = features[shape.layer]
        assert f.log_decay.shape == (1, 40, shape.num_v_heads, shape.head_k_dim)
        final = states_at(f, [40], dtype=torch.float64)[0]
        torch.testing.assert_close(final, adapter.cached_state(cache, shape.layer).double(), rtol=1e-4, atol=1e-5)


def test_fla_kda_channel_pruning_slices_every_per_channel_parameter(kda_model, tmp_path):
    model = copy.deepcopy(kda_model)
    adapter = adapter_for(model)
    keep = {layer: torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 12]]) for layer in adapter.linear_layers()}
    adapter.keep_qk_channels(keep)
    mixer = adapter.mixer(0)
    assert mixer.q_proj.out_features == mixer.k_proj.out_features == 2 * 5
    assert mixer.q_conv1d.weight.shape[0] == 10 and mixer.f_proj[1].out_features == 4 * 5
    assert mixer.dt_bias.shape == (4 * 5,)
    # value head 3 reads key head 1: its dt_bias entries are key head 1's kept channels of value head 3
    torch.testing.assert_close(mixer.dt_bias[15:], adapter_for(kda_model).mixer(0).dt_bias[3 * 16 + keep[0][1]])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert adapter_for(reloaded).shapes() == adapter.shapes() and reloaded.config.head_dim == 5
    torch.testing.assert_close(logits(reloaded, ids()), logits(model, ids()), rtol=0, atol=1e-6)


# --- the commands on the published KDA shapes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(kimi, tmp_path_factory):
    tokenizer = train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=VOCAB)
    assert len(tokenizer) <= VOCAB
    path = tmp_path_factory.mktemp("kimi") / "source"
    kimi.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_info(source, kimi, capsys):
    assert main(["info", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["num_layers"], info["linear_layers"]) == ("kimi_linear", 4, LINEAR)
    assert info["layers"] == [
        {"layer": i, "num_k_heads": HEADS, "num_v_heads": HEADS, "head_k_dim": DK, "head_v_dim": DK} for i in LINEAR
    ]
    assert info["state_bytes_per_seq"] == cached_state_bytes(kimi, ids())


def test_prune_l1_half_of_the_keys(source, kimi, tmp_path):
    out = tmp_path / "l1"
    assert main(["prune", str(source), "--method", "l1", "--ratio", "0.5", "--out", str(out)]) == 0
    report = json.loads((out / "pruning.json").read_text())
    keep = {int(layer): torch.tensor([heads[str(h)] for h in range(HEADS)]) for layer, heads in report["kept"].items()}
    assert sorted(keep) == LINEAR and {tuple(index.shape) for index in keep.values()} == {(HEADS, DK // 2)}
    in_memory = copy.deepcopy(kimi)
    adapter = adapter_for(in_memory)
    q, k = adapter.qk_weights(0)  # l1: the largest ||W_q row||_1 + ||W_k row||_1 in each head
    top = (q.abs().sum(-1) + k.abs().sum(-1)).topk(DK // 2, dim=1).indices.sort(dim=1).values
    assert torch.equal(keep[0].sort(dim=1).values, top)
    adapter.keep_qk_channels(keep)
    mixer = adapter.mixer(0)  # every per-key-channel parameter is cut; v, the output gate and norm keep d_v
    assert mixer.conv1d.in_channels == 2 * HEADS * DK // 2 + HEADS * DK
    assert mixer.forget_gate.f_b_proj.out_features == mixer.forget_gate.dt_bias.numel() == HEADS * DK // 2
    assert mixer.v_proj.out_features == mixer.g_b_proj.out_features == HEADS * DK
    reloaded = reload_and_compare(out, in_memory, ids(2, 40))
    assert reloaded.config.model_type == "staterank_kimi_linear"
    assert (reloaded.config.linear_key_head_dim, reloaded.config.linear_head_dim) == (DK // 2, DK)
    assert report["state_bytes_after"] == cached_state_bytes(reloaded, ids()) < report["state_bytes_before"]
    assert "import staterank" in (out / "README.md").read_text()


def test_prune_jrnp_a_quarter_of_the_heads(source, kimi, tmp_path):
    out = tmp_path / "jrnp"
    args = ["prune", str(source), "--method", "jrnp", "--ratio", "0.25", "--out", str(out), "--data", "techdocs",
            "--calib-tokens", "128", "--seq-len", "64"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "pruning.json").read_text())
    removed = {int(layer): heads for layer, heads in report["removed"].items()}
    assert {len(heads) for heads in removed.values()} == {HEADS // 4}
    in_memory = copy.deepcopy(kimi)
    adapter_for(in_memory).remove_heads(removed)
    reloaded = reload_and_compare(out, in_memory, ids(2, 40))
    assert reloaded.config.model_type == "kimi_linear"  # stock: head pruning keeps one head dim
    assert reloaded.config.linear_num_heads == HEADS - HEADS // 4
    assert adapter_for(reloaded).mixer(0).forget_gate.A_log.shape == (1, 1, HEADS - HEADS // 4, 1)
    assert report["state_bytes_after"] == cached_state_bytes(reloaded, ids())


def test_analyze(source, tmp_path):
    out = tmp_path / "ranks"
    args = ["analyze", str(source), "--data", "techdocs-val", "--out", str(out), "--samples", "2", "--seq-len", "48",
            "--positions", "8,48"]  # fmt: skip
    assert main(args) == 0
    ranks = json.loads((out / "rank.json").read_text())
    assert ranks["positions"] == [8, 48]
    assert [layer["layer"] for layer in ranks["layers"]] == LINEAR
    for layer in ranks["layers"]:
        assert len(layer["heads"]) == HEADS
        for head in layer["heads"]:
            assert 0 < head["effective_rank"][-1] <= DK and head["group"] in ("low", "high")
