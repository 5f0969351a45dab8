"""fla ``gated_deltaproduct``: the CPU op against fla's naive reference, the model against its own cache, and
the commands on a tiny 4-layer model with n = 2 Householder steps per token."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from reference import decoded_logits, logits
from transformers import AutoModelForCausalLM

from staterank.backends import chunk_delta_rule_torch
from staterank.backends.delta_product import chunk_gated_delta_product
from staterank.cli import main
from staterank.data import read_documents
from staterank.loading import prepare_runtime
from staterank.models import adapter_for
from staterank.rank import states_at
from staterank.tokenizer import train_tokenizer

prepare_runtime("gated_deltaproduct")
from fla.models import GatedDeltaProductConfig  # noqa: E402
from fla.ops.gated_delta_product.naive import naive_recurrent_gated_delta_product  # noqa: E402

N = 2  # Householder steps per token


def config(vocab_size: int = 64, **overrides) -> GatedDeltaProductConfig:
    fields = dict(
        hidden_size=32, num_hidden_layers=4, num_heads=4, head_dim=16, expand_v=0.5, vocab_size=vocab_size,
        num_householder=N, use_forget_gate=True, allow_neg_eigval=True, fuse_cross_entropy=False,
    )  # fmt: skip
    return GatedDeltaProductConfig(**{**fields, **overrides})


def build() -> torch.nn.Module:
    """The tiny model with weights large enough that every part matters, and the heads' output RMSNorm epsilon
    at 1e-30 (a pruned d_k changes the query scale, which that norm cancels up to its epsilon)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config(norm_eps=1e-30)).float().eval()
    for module in model.modules():  # the default init leaves the mixers nearly silent
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
        elif isinstance(module, torch.nn.Conv1d):
            torch.nn.init.normal_(module.weight, std=0.5)
    return model


def inputs(batch: int, seq: int, heads: int, d_k: int, d_v: int, n: int, seed: int = 0):
    """Random DeltaProduct inputs in float64: q [B, T, H, K], k [B, T n, H, K] (unit keys), v, beta, g, h0."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, d_k, generator=gen, dtype=torch.float64)
    k = F.normalize(torch.randn(batch, seq * n, heads, d_k, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, seq * n, heads, d_v, generator=gen, dtype=torch.float64)
    beta = 2 * torch.rand(batch, seq * n, heads, generator=gen, dtype=torch.float64)  # negative eigenvalues too
    g = -torch.rand(batch, seq, heads, generator=gen, dtype=torch.float64)
    h0 = torch.randn(batch, heads, d_k, d_v, generator=gen, dtype=torch.float64)
    return q, k, v, beta, g, h0


@pytest.mark.parametrize("n, gated", [(1, True), (2, True), (3, True), (2, False)])
def test_backend_equals_fla_naive_reference(n, gated):
    q, k, v, beta, g, h0 = inputs(2, 37, 3, 8, 6, n)
    g = g if gated else None
    # the naive loop computes in float32 (it casts its inputs); give it float32 inputs and compare in float64
    expected_o, expected_h = naive_recurrent_gated_delta_product(
        *(x.float() for x in (q, k, v)), None if g is None else g.float(), beta.float(), scale=8**-0.5,
        initial_state=h0.float().clone(), output_final_state=True, num_householder=n,
    )  # fmt: skip
    o, h = chunk_gated_delta_product(q, k, v, g, beta, n, initial_state=h0, output_final_state=True)
    assert o.dtype == h.dtype == torch.float64
    torch.testing.assert_close(o, expected_o.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, expected_h.double(), rtol=1e-4, atol=1e-4)


def test_fla_entry_point_handles_packed_sequences_and_l2_norm():
    q, k, v, beta, g, h0 = inputs(1, 30, 2, 8, 4, N)
    cu_seqlens = torch.tensor([0, 11, 30])
    o, h = chunk_gated_delta_product(
        q, k, v, g, beta, N, initial_state=h0.repeat(2, 1, 1, 1), output_final_state=True,
        use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    for i, (start, end) in enumerate([(0, 11), (11, 30)]):
        expected_o, expected_h = naive_recurrent_gated_delta_product(
            F.normalize(q[:, start:end], dim=-1), k[:, start * N:end * N], v[:, start * N:end * N], g[:, start:end],
            beta[:, start * N:end * N], scale=8**-0.5, initial_state=h0.clone(), output_final_state=True,
            num_householder=N,
        )  # fmt: skip
        torch.testing.assert_close(o[:, start:end], expected_o.to(o.dtype), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h[i:i + 1], expected_h.to(h.dtype), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_model_forward_equals_its_cached_step_decoding(one_thread):
    model = build()
    ids = torch.randint(0, 64, (2, 70), generator=torch.Generator().manual_seed(1))
    # chunk mode (> 64 tokens) against fused_recurrent mode (9 tokens, then one at a time)
    torch.testing.assert_close(decoded_logits(model, ids, 9), logits(model, ids), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_the_tap_replayed_step_by_step_is_the_cached_state(one_thread):
    """The tap's per-step k, v, beta, decay (T * n steps) replay through the delta rule into the model's state."""
    model = build()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    features = {}
    with adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert adapter.linear_layers() == [0, 1, 2, 3]
    for shape in adapter.shapes():
        f = features[shape.layer]
        assert f.q.shape == (2, 24, 4, 16) and f.k.shape == (2, 24 * N, 4, 16) and f.v.shape == (2, 24 * N, 4, 8)
        assert f.beta.shape == f.log_decay.shape == (2, 24 * N, 4)
        assert (f.log_decay[:, 1::N] == 0).all() and (f.log_decay[:, ::N] < 0).all()  # decay once per token
        k = f.k.double()
        _, state = chunk_delta_rule_torch(k, k, f.v.double(), f.beta.double(), f.log_decay.double(),
                                          output_final_state=True)  # q only feeds outputs
        cached = adapter.cached_state(cache, shape.layer)  # [B, Hv, d_k, d_v]
        torch.testing.assert_close(state, cached.double(), rtol=1e-4, atol=1e-5)
        assert state.abs().max() > 0.1


@torch.no_grad()
def test_states_at_rebuilds_the_cached_state_at_every_position(one_thread):
    model = build()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))
    features = {}
    with adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        model(input_ids=ids)
    for t in (9, 24):
        cache = model(input_ids=ids[:, :t], use_cache=True).past_key_values
        for layer in adapter.linear_layers():
            state = states_at(features[layer], [3, t], dtype=torch.float64)[-1]
            torch.testing.assert_close(state, adapter.cached_state(cache, layer).double(), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_one_channel_set_covers_every_householder_key(one_thread, tmp_path):
    """Keeping channels equals zeroing the dropped q rows and the same rows of every Householder key block."""
    model, masked = build(), build()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))
    before = model(input_ids=ids).logits
    generator = torch.Generator().manual_seed(4)
    keep = {layer: torch.stack([torch.randperm(16, generator=generator)[:12].sort().values for _ in range(4)])
            for layer in adapter.linear_layers()}  # fmt: skip
    for layer, index in keep.items():
        dropped = torch.ones(4, 16, dtype=torch.bool).scatter(1, index, False)  # [Hk, d_k]
        mixer = masked.model.layers[layer].attn
        mixer.q_proj.weight.view(4, 16, -1)[dropped] = 0
        mixer.k_proj.weight.view(N, 4, 16, -1)[:, dropped] = 0  # k_proj rows are (n h d)
    expected = masked(input_ids=ids).logits
    adapter.keep_qk_channels(keep)
    pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-4)  # float32 rounding through 4 layers
    assert (pruned - before).abs().max() > 1e-3
    assert [s.head_k_dim for s in adapter.shapes()] == [12] * 4
    assert [s.head_v_dim for s in adapter.shapes()] == [8] * 4
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned, rtol=0, atol=1e-6)


@torch.no_grad()
def test_removed_heads_equal_zeroed_output_columns(one_thread, tmp_path):
    model, masked = build(), build()
    adapter = adapter_for(model)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(5))
    for layer in adapter.linear_layers():
        masked.model.layers[layer].attn.o_proj.weight.view(32, 4, 8)[:, [1, 3]] = 0
    expected = masked(input_ids=ids).logits
    model_before = model(input_ids=ids).logits
    bytes_before = adapter.state_bytes_per_seq()
    adapter.remove_heads({layer: [1, 3] for layer in adapter.linear_layers()})
    pruned = model(input_ids=ids).logits
    # float32 rounding through 4 layers: the narrower o_proj sums in another order (1.6e-5 seen with AVX-512)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-4)
    assert (pruned - model_before).abs().max() > 1e-3
    assert adapter.state_bytes_per_seq() < bytes_before
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned, rtol=0, atol=1e-6)
    cache = reloaded(input_ids=ids, use_cache=True).past_key_values
    assert adapter_for(reloaded).cached_state(cache, 0).shape == (2, 2, 16, 8)


# --- the commands ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)


@pytest.fixture
def source(tokenizer, tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config(len(tokenizer))).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def command_ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(6))


def state_bytes_in_cache(path) -> int:
    """Bytes of every recurrent state and convolution window a forward leaves in the model's own cache, one seq."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        cache = model(input_ids=command_ids()[:1], use_cache=True).past_key_values
    tensors = [t for layer in cache.layers for t in (layer.state["recurrent_state"], *layer.state["conv_state"])]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_info_reports_the_cached_state_bytes(source, capsys, one_thread):
    assert main(["info", str(source), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "gated_deltaproduct" and info["linear_layers"] == [0, 1, 2, 3]
    assert info["layers"][0] == {"layer": 0, "num_k_heads": 4, "num_v_heads": 4, "head_k_dim": 16, "head_v_dim": 8}
    assert info["state_bytes_per_seq"] == state_bytes_in_cache(source)


@pytest.mark.parametrize(
    "method, ratio, expected",
    [
        ("l1", "0.5", {"head_k_dim": 8, "num_v_heads": 4}),
        ("heads-random", "0.25", {"head_k_dim": 16, "num_v_heads": 3}),
    ],
)
def test_prune_writes_a_model_that_stock_classes_reload(source, tmp_path, capsys, one_thread, method, ratio, expected):
    out = tmp_path / method
    assert main(["prune", str(source), "--method", method, "--ratio", ratio, "--out", str(out)]) == 0
    report = json.loads((out / "pruning.json").read_text())
    assert report["state_bytes_after"] == state_bytes_in_cache(out) < report["state_bytes_before"]
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    shapes = adapter_for(pruned).shapes()
    assert all(getattr(s, field) == value for s in shapes for field, value in expected.items())
    if method == "l1":  # every layer and head keeps 8 channels: the same rows of q and of both Householder keys
        assert all(len(channels) == 8 for layer in report["kept"].values() for channels in layer.values())
        source_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        for layer, heads in report["kept"].items():
            original, kept = source_model.model.layers[int(layer)].attn, pruned.model.layers[int(layer)].attn
            index = torch.tensor([heads[str(h)] for h in range(4)])  # [Hk, 8]
            scores = original.q_proj.weight.view(4, 16, -1).abs().sum(-1) + original.k_proj.weight.view(
                N, 4, 16, -1
            ).abs().sum((0, -1))  # [Hk, d_k]: ||W_q row||_1 + the rows of every Householder key
            assert (scores.topk(8, dim=1).indices.sort().values == index.sort().values).all()
            rows = original.k_proj.weight.view(N, 4, 16, -1)[:, torch.arange(4)[:, None], index]
            torch.testing.assert_close(kept.k_proj.weight, rows.reshape(N * 32, -1))


def test_a_rotation_is_refused_before_anything_is_written(source, tmp_path, capsys, one_thread):
    """pca rotate=true would write rotated k rows into a copy (k_proj is laid out (n h d)): refused, exit 2."""
    out = tmp_path / "rotated"
    argv = ["prune", str(source), "--method", "pca", "--option", "rotate=true", "--ratio", "0.5", "--out", str(out)]
    assert main([*argv, "--data", "techdocs", "--calib-tokens", "128", "--seq-len", "64"]) == 2
    assert "rotate" in capsys.readouterr().err and not out.exists()
