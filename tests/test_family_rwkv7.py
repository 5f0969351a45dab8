"""fla's RWKV-7: the CPU route of its DPLR recurrence and element-wise kernels against fla's own PyTorch references,
the states rebuilt from the tap at every requested position against the model's own cache, the metrics on them,
decoding through the cache and through the graph-ready decoder, the commands, and the refusals in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from staterank.backends import rwkv7 as ops
from staterank.cli import main
from staterank.loading import load, prepare_runtime
from staterank.models import PruningShapeError, adapter_for
from staterank.rank import spectral_metrics, states_at

VOCAB = 64
CONFIG = dict(hidden_size=32, num_hidden_layers=2, head_dim=8, intermediate_size=64, decay_low_rank_dim=8,
              gate_low_rank_dim=8, a_low_rank_dim=8, v_low_rank_dim=8, fuse_cross_entropy=False)  # fmt: skip


def build(fuse_norm: bool = True, vocab_size: int = VOCAB):
    """A tiny RWKV-7 in eval mode whose projections are large enough that every part of the rule matters (fla's
    initialisation zeroes o_proj and keeps k small)."""
    prepare_runtime("rwkv7")
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    torch.manual_seed(0)
    model = RWKV7ForCausalLM(RWKV7Config(**CONFIG, vocab_size=vocab_size, fuse_norm=fuse_norm)).float().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
    return model


def ids(batch: int = 2, seq: int = 30, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("chunk", "wy", "decay"), [(1, True, 1.0), (4, True, 1.0), (32, True, 1.0),
                                                    (4, False, 1.0), (32, False, 1.0), (4, True, 40.0)])  # fmt: skip
def test_dplr_recurrence_equals_flas_naive_reference_and_packs_sequences(chunk, wy, decay, one_thread):
    """fla's token-by-token ``dplr_recurrence`` (heads first, q scaled by d_k^-1/2) against staterank's, token by
    token, in the WY form and as the two-level scan (in chunks of 4, with a padded last chunk, and in one chunk),
    with an initial state; decays too strong for the WY form (up to e^-40 a token) take the scan; the states at
    chosen positions against fla's final states of those prefixes; packed sequences give what each gives alone."""
    from fla.ops.generalized_delta_rule.dplr.naive import dplr_recurrence

    g = torch.Generator().manual_seed(0)
    batch, seq, heads, d_k, d_v = 2, 13, 3, 8, 5
    q, k, a = (torch.randn(batch, seq, heads, d_k, generator=g) for _ in range(3))
    a = F.normalize(a, dim=-1)
    b = -a * torch.rand(batch, seq, heads, d_k, generator=g)  # RWKV-7's -kk, kk * gate
    v = torch.randn(batch, seq, heads, d_v, generator=g)
    log_decay = -decay * torch.rand(batch, seq, heads, d_k, generator=g)
    assert ops._wy_fits(log_decay, chunk) == (decay == 1.0)
    initial = torch.randn(batch, heads, d_k, d_v, generator=g)
    first = lambda x: x.transpose(1, 2)  # noqa: E731
    expected_o, expected_state = dplr_recurrence(*map(first, (q, k, v, a, b, log_decay)), initial_state=initial)
    o, state = ops.dplr_recurrence(q, k, v, a, b, log_decay, d_k**-0.5, initial, True, chunk=chunk, wy=wy)
    torch.testing.assert_close(o, first(expected_o), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, expected_state, rtol=1e-4, atol=1e-5)
    positions = [1, 4, 5, 13]
    states = ops.dplr_states(k, v, a, b, log_decay, positions, chunk=chunk, wy=wy)
    for t, state in zip(positions, states, strict=True):
        _, expected = dplr_recurrence(*(first(x[:, :t]) for x in (q, k, v, a, b, log_decay)))
        torch.testing.assert_close(state, expected, rtol=1e-4, atol=1e-5)

    packed = [x.reshape(1, batch * seq, *x.shape[2:]) for x in (q, k, v, a, b, log_decay)]
    cu_seqlens = torch.tensor([0, seq, 2 * seq])
    o_packed, state_packed = ops.dplr_recurrence(*packed, 0.5, initial, True, cu_seqlens, chunk=chunk, wy=wy)
    o_alone, state_alone = ops.dplr_recurrence(q, k, v, a, b, log_decay, 0.5, initial, True, chunk=chunk, wy=wy)
    torch.testing.assert_close(o_packed.reshape(o_alone.shape), o_alone)
    torch.testing.assert_close(state_packed, state_alone)


def test_the_wy_forms_gradients_equal_the_token_loops(one_thread):
    """Training backpropagates through the WY form: its gradients for every input and the initial state equal
    those of the plain token-by-token loop, in chunks of 8 with a padded last one."""
    g = torch.Generator().manual_seed(3)
    batch, seq, heads, d_k, d_v = 2, 21, 2, 8, 4
    q, k, a = (torch.randn(batch, seq, heads, d_k, generator=g) for _ in range(3))
    a = F.normalize(a, dim=-1)
    b = -a * torch.rand(batch, seq, heads, d_k, generator=g)
    v = torch.randn(batch, seq, heads, d_v, generator=g)
    log_decay = -torch.rand(batch, seq, heads, d_k, generator=g)
    inputs = [x.requires_grad_() for x in (q, k, v, a, b, log_decay, torch.randn(batch, heads, d_k, d_v, generator=g))]
    grads = []
    for chunk in (1, 8):
        o, state = ops.dplr_recurrence(*inputs[:6], 0.5, inputs[6], True, chunk=chunk)
        grads.append(torch.autograd.grad(o.sin().sum() + state.cos().sum(), inputs))
    for token_loop, wy in zip(*grads, strict=True):
        torch.testing.assert_close(wy, token_loop, rtol=1e-4, atol=1e-5)


def test_element_wise_routes_equal_flas_references(one_thread):
    prepare_runtime("rwkv7")  # staterank's CPU routes patched in
    from fla.modules.norm.layernorm import GroupNorm, LayerNorm, group_norm_ref, layer_norm_ref
    from fla.modules.token_shift import token_shift_ref

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=g)
    torch.testing.assert_close(ops.token_shift(x), token_shift_ref(x))
    # the cache carries the last token across calls: two halves with the cache give the whole
    delta, cache = ops.token_shift(x[:, :4], output_cache=True)
    rest, _ = ops.token_shift(x[:, 4:], cache=cache, output_cache=True)
    torch.testing.assert_close(torch.cat([delta, rest], 1), token_shift_ref(x))
    packed = x.reshape(1, 14, 16)
    torch.testing.assert_close(ops.token_shift(packed, torch.tensor([0, 7, 14])), token_shift_ref(packed,
                               torch.tensor([0, 7, 14])))  # fmt: skip

    residual = torch.randn(2, 7, 16, generator=g)
    norm = LayerNorm(16, bias=True)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    y, h = norm(x, residual, prenorm=True)  # staterank's CPU route, patched in
    y_ref, h_ref = layer_norm_ref(x, norm.weight, norm.bias, residual, norm.eps, prenorm=True)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    heads = GroupNorm(4, 16, bias=True, eps=1e-3)
    torch.nn.init.normal_(heads.weight)
    torch.nn.init.normal_(heads.bias)
    torch.testing.assert_close(heads(x), group_norm_ref(x, heads.weight, heads.bias, 4, eps=1e-3))

    y = torch.randn(3, 10, generator=g, requires_grad=True)
    from fla.modules.activations import ACT2FN

    ACT2FN["sqrelu"](y).sum().backward()
    torch.testing.assert_close(y.grad, 2 * F.relu(y.detach()))
    torch.testing.assert_close(ops.l2_norm(x), x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("fuse_norm", [True, False])
def test_states_at_every_position_are_the_cached_states_of_that_prefix(fuse_norm, one_thread):
    model = build(fuse_norm)
    adapter = adapter_for(model)
    assert [(s.num_k_heads, s.num_v_heads, s.head_k_dim, s.head_v_dim) for s in adapter.shapes()] == [(4, 4, 8, 8)] * 2
    tokens = ids(seq=70)  # three chunks of the scan, the last one padded; fla's layer takes its chunk mode at 64+
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        model(input_ids=tokens)
    positions = [1, 9, 32, 33, 70]
    for layer, f in features.items():
        states = states_at(f, positions, dtype=torch.float64)
        for state, t in zip(states, positions, strict=True):
            with torch.no_grad():
                cached = adapter.cached_state(model(input_ids=tokens[:, :t], use_cache=True).past_key_values, layer)
            assert cached.abs().max() > 1e-2  # not vacuous
            torch.testing.assert_close(state, cached.double(), rtol=1e-4, atol=1e-6 * cached.abs().max().item())
        # the metrics of the rebuilt state are those of its singular values, taken here in float64
        sigma = torch.linalg.svdvals(states[-1])
        metrics = spectral_metrics(states[-1])
        torch.testing.assert_close(metrics["effective_rank"].double(),
                                   (sigma > 1e-4 * sigma[..., :1]).sum(-1).double())  # fmt: skip
        torch.testing.assert_close(metrics["nuclear_norm"].double(), sigma.sum(-1), rtol=1e-5, atol=1e-8)


def test_a_state_written_by_one_key_has_rank_one(one_thread):
    """Known state: after one token the state is k_1 v_1^T (rank one), and after two it is at most rank two."""
    model = build()
    features = {}
    with torch.no_grad(), adapter_for(model).tap(lambda f: features.__setitem__(f.layer, f)):
        model(input_ids=ids(seq=5))
    f = features[0]
    one, two = states_at(f, [1, 2], dtype=torch.float64)
    torch.testing.assert_close(one, torch.einsum("bhk,bhv->bhkv", f.k[:, 0].double(), f.v[:, 0].double()))
    assert (spectral_metrics(one)["effective_rank"] == 1).all()
    assert (spectral_metrics(two)["effective_rank"] <= 2).all()


def test_decoding_through_the_cache_and_the_graph_ready_decoder_equals_the_full_forward(one_thread):
    from staterank.bench import StaticDecoder

    model = build()
    tokens = ids(seq=12)
    with torch.no_grad():
        full = model(input_ids=tokens).logits
    decoder = StaticDecoder(model, tokens[:, :8], max_new_tokens=4)
    addresses = [t.data_ptr() for t in decoder.states]
    for step in range(4):
        decoder.token.copy_(tokens[:, 8 + step : 9 + step])
        torch.testing.assert_close(decoder.step()[:, -1], full[:, 8 + step], rtol=1e-4, atol=1e-5)
    assert [t.data_ptr() for t in decoder.states] == addresses


def test_state_bytes_are_the_bytes_the_cache_holds(one_thread):
    """Recurrent states and both token-shift caches (the mixer's and the feed-forward's), one sequence."""
    model = build()
    with torch.no_grad():
        cache = model(input_ids=ids(batch=1, seq=5), use_cache=True).past_key_values
    held = sum(t.nbytes for layer in range(len(cache)) for t in cache[layer].values() if isinstance(t, torch.Tensor))
    assert adapter_for(model).state_bytes_per_seq() == held


def test_channel_and_head_pruning_are_refused_in_one_line(one_thread):
    adapter = adapter_for(build())
    with pytest.raises(PruningShapeError, match="key_dim = hidden_size"):
        adapter.check_channel_pruning()
    with pytest.raises(PruningShapeError, match="hidden_size / head_dim heads"):
        adapter.remove_heads({0: [0]})


@pytest.fixture
def source(tmp_path):
    tokenizer = load("tiny-deltanet", device="cpu").tokenizer
    model = build(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_info_analyze_finetune_and_the_refused_prunes(source, tmp_path, capsys):
    assert main(["info", str(source)]) == 0
    assert "RWKV-7" in capsys.readouterr().out
    ranks = tmp_path / "ranks"
    assert main(["analyze", str(source), "--data", "techdocs-val", "--samples", "2", "--seq-len", "48",
                 "--out", str(ranks)]) == 0  # fmt: skip
    result = json.loads((ranks / "rank.json").read_text())
    assert [len(layer["heads"]) for layer in result["layers"]] == [4, 4]
    tuned = tmp_path / "tuned"
    assert main(["finetune", str(source), "--data", "techdocs-val", "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--lora-rank", "2", "--out", str(tuned)]) == 0  # fmt: skip
    assert (tuned / "model.safetensors").is_file()
    capsys.readouterr()
    for method, message in (("l2", "key_dim = hidden_size"), ("heads-random", "hidden_size / head_dim heads")):
        out = tmp_path / method
        assert main(["prune", str(source), "--method", method, "--ratio", "0.5", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not out.exists()
