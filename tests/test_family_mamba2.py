"""Mamba-2 layers (transformers' and fla's mamba2; transformers' bamba, nemotron_h, granitemoehybrid, falcon_h1,
zamba2): the states
rebuilt from the tap at every requested position against each model's own cache after that prefix, the metrics on
them, d_state pruning against zeroed B and C rows and group removal against zeroed output columns (with the stock
reloads), and the refusals (part of a group, graphed decoding) in one line."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BambaConfig,
    FalconH1Config,
    GraniteMoeHybridConfig,
    Mamba2Config,
    NemotronHConfig,
    Zamba2Config,
)

from staterank.cli import main
from staterank.loading import load, prepare_runtime
from staterank.models import PruningShapeError, adapter_for
from staterank.rank import spectral_metrics, states_at

HYBRID = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
HYBRID_MAMBA = dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2,
                    mamba_chunk_size=16)  # fmt: skip
MAMBA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8, n_groups=2,
             conv_kernel=4, chunk_size=16)  # fmt: skip


def fla_mamba2():
    from fla.models import Mamba2Config as FlaMamba2Config  # fla registers its own classes for "mamba2"
    from fla.models import Mamba2ForCausalLM as FlaMamba2ForCausalLM

    # Two groups: fla 0.6.0's own PyTorch prefill tiles B and C over the heads (head h reads group h % G) while its
    # decoding step and mamba_ssm give head h group h // (H / G); staterank's prefill, patched in, follows the latter.
    return FlaMamba2ForCausalLM(FlaMamba2Config(**MAMBA, fuse_cross_entropy=False, fuse_norm=False))


def transformers_mamba2():
    from transformers import Mamba2ForCausalLM

    return Mamba2ForCausalLM(Mamba2Config(**MAMBA, num_heads=8))


#: Models built directly, the type's own classes: once fla is imported, its registration wins for "mamba2"
MODELS = {"mamba2-transformers": transformers_mamba2, "mamba2-fla": fla_mamba2}
CONFIGS = {
    "bamba": lambda: BambaConfig(**HYBRID, **HYBRID_MAMBA, num_hidden_layers=2, attn_layer_indices=[1]),
    "nemotron_h": lambda: NemotronHConfig(
        **HYBRID, head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=8, expand=2,
        chunk_size=16, num_hidden_layers=3, layers_block_type=["mamba", "attention", "mlp"],
    ),  # fmt: skip
    # falcon_h1: every block has attention beside the mixer; muP multipliers on in_proj's input and on each block of
    # its output (z, x, B, C, dt), which the tap must apply
    "falcon_h1": lambda: FalconH1Config(
        **HYBRID, **HYBRID_MAMBA, mamba_d_ssm=None, num_hidden_layers=2, ssm_in_multiplier=0.7,
        ssm_multipliers=[1.3, 0.8, 1.7, 0.6, 1.2], head_dim=16, mamba_rms_norm=True,
    ),  # fmt: skip
    # zamba2: the second block is a hybrid one (a shared transformer, then its Mamba-2 block in mamba_decoder)
    "zamba2": lambda: Zamba2Config(
        vocab_size=64, hidden_size=32, num_attention_heads=2, n_mamba_heads=8, mamba_ngroups=2, mamba_d_state=8,
        mamba_expand=2, chunk_size=16, num_hidden_layers=2, layers_block_type=["mamba", "hybrid"],
    ),  # fmt: skip
    "granitemoehybrid": lambda: GraniteMoeHybridConfig(
        **HYBRID, **HYBRID_MAMBA, num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=2,
        num_experts_per_tok=1,
    ),  # fmt: skip
}


def build(family: str) -> torch.nn.Module:
    """The family's tiny model in eval mode, its Mamba-2 weights large enough that the states are not tiny."""
    prepare_runtime(family.split("-")[0])
    torch.manual_seed(0)
    if family in MODELS:
        model = MODELS[family]().float().eval()
    else:
        model = AutoModelForCausalLM.from_config(CONFIGS[family]()).float().eval()
    adapter = adapter_for(model)
    for layer in adapter.linear_layers():
        mixer = adapter.mixer(layer)
        torch.nn.init.normal_(mixer.in_proj.weight, std=mixer.in_proj.in_features**-0.5)
        torch.nn.init.normal_(mixer.conv1d.weight, std=0.5)
    return model


def cache_of(output):
    return output.cache_params if getattr(output, "past_key_values", None) is None else output.past_key_values


@pytest.mark.parametrize("family", [*MODELS, *CONFIGS])
def test_states_at_every_position_are_the_cached_states_of_that_prefix(family, one_thread):
    model = build(family)
    adapter = adapter_for(model)
    shape = adapter.shapes()[0]
    assert (shape.num_k_heads, shape.num_v_heads, shape.head_k_dim, shape.head_v_dim) == (2, 8, 8, 8)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    features = {}
    with torch.no_grad(), adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        model(input_ids=ids)
    positions = [1, 7, 16, 17, 40]  # inside, at and after the scan's chunks of 16
    for layer, f in features.items():
        states = states_at(f, positions, dtype=torch.float64)
        for state, t in zip(states, positions, strict=True):
            with torch.no_grad():
                cached = adapter.cached_state(cache_of(model(input_ids=ids[:, :t], use_cache=True)), layer).double()
            assert cached.abs().max() > 1e-3  # not vacuous
            torch.testing.assert_close(state, cached, rtol=1e-4, atol=1e-6 * cached.abs().max().item())
        # the metrics of the rebuilt states are those of the cache's
        final = spectral_metrics(states[-1])
        for name, value in spectral_metrics(cached).items():
            torch.testing.assert_close(final[name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", [*MODELS, *CONFIGS])
def test_kept_state_channels_equal_zeroed_b_and_c_rows_and_reload(family, one_thread, tmp_path):
    """Pruning d_state keeps the same channels of B and C in every group: the model equals the original with the
    dropped channels' in_proj rows and convolution biases zeroed (so those B and C features are 0), and its own
    class reloads it from the config's smaller state size."""
    model, masked_model = build(family), build(family)
    adapter, masked = adapter_for(model), adapter_for(masked_model)
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(3))
    unpruned = model(input_ids=ids).logits
    generator = torch.Generator().manual_seed(4)
    keep = {s.layer: torch.stack([torch.randperm(8, generator=generator)[:5].sort().values
                                  for _ in range(s.num_k_heads)]) for s in adapter.shapes()}  # fmt: skip
    with torch.no_grad():
        for layer, index in keep.items():
            dropped = torch.ones(index.shape[0], 8, dtype=torch.bool).scatter_(1, index, False)  # [G, d_state]
            for rows in masked.qk_weights(layer):  # the C and B rows of in_proj
                rows[dropped] = 0
            mixer = masked.mixer(layer)
            if mixer.conv1d.bias is not None:
                for kernel in masked.qk_conv_weights(layer):  # views into the conv weight: find the bias channels
                    start = (kernel.data_ptr() - mixer.conv1d.weight.data_ptr()) // kernel.element_size()
                    channels = start // mixer.conv1d.weight.shape[-1] + torch.nonzero(dropped.flatten())[:, 0]
                    mixer.conv1d.bias[channels] = 0
        for f in tapped_features(masked, ids).values():  # the premise: the dropped features are 0
            dropped = ~torch.zeros(f.q.shape[2], 8, dtype=torch.bool).scatter_(1, keep[f.layer], True)
            assert f.q[..., dropped].abs().max() == f.k[..., dropped].abs().max() == 0
        expected = masked_model(input_ids=ids).logits
    state_bytes = adapter.state_bytes_per_seq()
    adapter.keep_qk_channels(keep)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-3  # not vacuous
    assert [s.head_k_dim for s in adapter.shapes()] == [5] * len(keep)
    assert adapter.state_bytes_per_seq() < state_bytes
    model.save_pretrained(tmp_path / "pruned")
    reloaded = type(model).from_pretrained(tmp_path / "pruned").float().eval()
    assert [s.head_k_dim for s in adapter_for(reloaded).shapes()] == [5] * len(keep)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned, rtol=0, atol=1e-6)


@torch.no_grad()
def tapped_features(adapter, ids):
    features = {}
    with adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        adapter.model(input_ids=ids)
    return features


@pytest.mark.parametrize("family", [*MODELS, *CONFIGS])
def test_removing_a_whole_group_equals_zeroed_output_columns_and_reloads(family, one_thread, tmp_path):
    """A group's heads go together (the gated RMSNorm normalises them together): removing group 0 equals the
    original with those heads' out_proj columns zeroed, and the model's own class reloads it. Part of a group is
    refused, and so is graphed decoding."""
    from staterank.bench import BenchError, StaticDecoder

    model, masked_model = build(family), build(family)
    adapter, masked = adapter_for(model), adapter_for(masked_model)
    with pytest.raises(PruningShapeError, match="whole group"):  # the first head of every group
        adapter.remove_heads({s.layer: list(range(0, s.num_v_heads, s.group_size)) for s in adapter.shapes()})
    with pytest.raises(BenchError, match="graphed decoding"):
        StaticDecoder(model, torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)
    shape = adapter.shapes()[0]
    group = list(range(shape.group_size))  # the value heads of group 0
    ids = torch.randint(0, 64, (2, 30), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        unpruned = model(input_ids=ids).logits
        for layer in masked.linear_layers():
            out_proj = masked.mixer(layer).out_proj.weight  # [hidden, H * head_dim]
            out_proj.view(out_proj.shape[0], shape.num_v_heads, shape.head_v_dim)[:, group] = 0
        expected = masked_model(input_ids=ids).logits
    state_bytes = adapter.state_bytes_per_seq()
    adapter.remove_heads({layer: group for layer in adapter.linear_layers()})
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, expected, rtol=1e-5, atol=1e-5)
    assert (pruned - unpruned).abs().max() > 1e-3  # not vacuous
    after = adapter.shapes()[0]
    assert (after.num_k_heads, after.num_v_heads) == (shape.num_k_heads - 1, shape.num_v_heads - shape.group_size)
    assert adapter.state_bytes_per_seq() < state_bytes
    model.save_pretrained(tmp_path / "pruned")
    reloaded = type(model).from_pretrained(tmp_path / "pruned").float().eval()
    assert adapter_for(reloaded).shapes() == adapter.shapes()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruned, rtol=0, atol=1e-6)


@pytest.fixture
def source(tmp_path):
    tokenizer = load("tiny-deltanet", device="cpu").tokenizer
    prepare_runtime("bamba")
    torch.manual_seed(0)
    config = CONFIGS["bamba"]()
    config.vocab_size = len(tokenizer)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    return tmp_path / "source"


def test_info_analyze_and_pruning_by_channels_and_groups(source, tmp_path, capsys):
    assert main(["info", str(source)]) == 0
    assert "Mamba-2" in capsys.readouterr().out
    ranks = tmp_path / "ranks"
    assert main(["analyze", str(source), "--data", "techdocs-val", "--samples", "2", "--seq-len", "64",
                 "--out", str(ranks)]) == 0  # fmt: skip
    capsys.readouterr()  # the analysis's progress
    result = json.loads((ranks / "rank.json").read_text())
    assert [len(layer["heads"]) for layer in result["layers"]] == [8]  # layer 1 is attention
    assert all(layer["head_k_dim"] == 8 and layer["head_v_dim"] == 8 for layer in result["layers"])
    out = tmp_path / "pruned"  # d_state 8 -> 4 by the B and C rows' norms
    assert main(["prune", str(source), "--method", "l2", "--ratio", "0.5", "--align", "1", "--out", str(out)]) == 0
    assert [s.head_k_dim for s in adapter_for(AutoModelForCausalLM.from_pretrained(out)).shapes()] == [4]
    heads = tmp_path / "heads"  # half the heads, as one of the two groups
    argv = ["prune", str(source), "--method", "heads-random", "--ratio", "0.5", "--unit", "key", "--out", str(heads)]
    assert main(argv) == 0
    shape = adapter_for(AutoModelForCausalLM.from_pretrained(heads)).shapes()[0]
    assert (shape.num_k_heads, shape.num_v_heads) == (1, 4)
    part = tmp_path / "part"
    argv = ["prune", str(source), "--method", "heads-random", "--ratio", "0.25", "--unit", "value", "--out", str(part)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search("whole group|same number of value heads", err) and not part.exists()


@pytest.mark.parametrize("family", ["mamba2-transformers", "mamba2-fla", "bamba", "falcon_h1"])
def test_decoding_through_the_cache_the_bench_passes_equals_the_full_forward(family, one_thread):
    """transformers' Mamba2 takes and returns its cache as ``cache_params``, the hybrids as ``past_key_values``:
    ``staterank.bench`` passes and reads either, and decoding through it gives the full forward's logits."""
    from staterank.bench import cache_of as bench_cache_of
    from staterank.bench import with_cache

    model = build(family)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :20], use_cache=True)
        steps = [out.logits]
        for t in range(20, 24):
            out = model(input_ids=ids[:, t : t + 1], **with_cache(model, bench_cache_of(out)), use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_the_chunked_ssd_equals_a_token_loop_with_groups_and_an_initial_state(one_thread):
    """staterank's SSD (chunks of 8, the last one padded) against the rule written out token by token,
    ``h_t = exp(w_t) h_{t-1} + x_t B_t^T``, ``y_t = h_t C_t``, with two groups (head h reads group h // (H / G),
    as mamba_ssm's kernels and fla's decoding step do) and an initial state; autocast does not reach it."""
    from staterank.backends.mamba2 import ssd

    g = torch.Generator().manual_seed(0)
    batch, seq, heads, groups, p, n = 2, 21, 4, 2, 5, 3
    x = torch.randn(batch, seq, heads, p, generator=g)
    log_decay = -torch.rand(batch, seq, heads, generator=g)
    B, C = (torch.randn(batch, seq, groups, n, generator=g) for _ in range(2))
    initial = torch.randn(batch, heads, p, n, generator=g)
    y, final = ssd(x, log_decay, B, C, chunk=8, initial_state=initial)
    state, expected = initial.clone(), []
    group = torch.arange(heads) // (heads // groups)
    for t in range(seq):
        state = log_decay[:, t, :, None, None].exp() * state + x[:, t, :, :, None] * B[:, t, group, None, :]
        expected.append((state * C[:, t, group, None, :]).sum(-1))
    torch.testing.assert_close(y, torch.stack(expected, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, state, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bfloat16 training step leaves the SSD in float32
        torch.testing.assert_close(ssd(x, log_decay, B, C, chunk=8, initial_state=initial), (y, final))


@pytest.mark.parametrize("masked", [False, True])
def test_the_mamba2_layers_pytorch_forward_equals_flas_fallback(masked, one_thread):
    """fla's Mamba2 layer without mamba_ssm: staterank's forward (patched in) against fla's own PyTorch fallback,
    in training mode with a cache to write and one group (fla's fallback tiles groups differently, see above):
    the outputs, the conv and SSM states, and every gradient."""
    from fla.layers.mamba2 import Mamba2

    from staterank.backends.patch import _ORIGINAL

    prepare_runtime("mamba2")
    torch.manual_seed(0)
    layer = Mamba2(num_heads=4, head_dim=8, hidden_size=16, state_size=6, n_groups=1, chunk_size=8, layer_idx=0)
    layer.train()
    x = torch.randn(2, 21, 16, requires_grad=True)
    mask = torch.ones(2, 21)
    mask[1, :5] = 0  # left padding
    mask = mask if masked else None
    fla_fallback = getattr(Mamba2.torch_forward, _ORIGINAL)
    expected = fla_fallback(layer, x, None, True, mask)
    got = layer.torch_forward(x, None, True, mask)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    inputs = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad(got[0].square().sum(), inputs), torch.autograd.grad(
            expected[0].square().sum(), inputs), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
