"""Tests for the pure-PyTorch CPU backend of fla's DeltaNet / Gated DeltaNet (staterank.backends)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from fla.models import DeltaNetConfig, GatedDeltaNetConfig
from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss, FusedRMSNormGated, RMSNorm, ShortConvolution
from fla.modules.norm.layernorm import rms_norm_ref
from fla.modules.norm.layernorm_gated import rms_norm_ref as gated_rms_norm_ref
from fla.ops.delta_rule.naive import delta_rule_chunkwise, delta_rule_recurrence
from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule, naive_recurrent_gated_delta_rule

from staterank.backends import chunk_delta_rule_torch, delta_rule_step_torch, gdn_log_decay, install, is_installed
from staterank.backends.delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

install()


def make_inputs(B, T, H, HV, K, V, dtype=torch.float64, gated=True, seed=0):
    """Random q, k [B, T, H, K], v [B, T, HV, V], beta in (0, 1), log decay g <= 0 [B, T, HV], h0 [B, HV, K, V]."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, HV, V)
    beta = randn(B, T, HV).sigmoid()
    g = F.logsigmoid(randn(B, T, HV) + 2.0) if gated else None
    h0 = randn(B, HV, K, V) * 0.5
    return q, k, v, beta, g, h0


def l2(x):
    """fla's in-kernel L2 norm: x / sqrt(sum(x^2) + 1e-6)."""
    return x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)


def token_loop(q, k, v, beta, g, h0, scale=None, use_qk_l2norm=True):
    """Per-token reference: S = a (I - b k k^T) S + b k v^T, o = S^T (scale q); key head of value head j is j // G."""
    B, T, H, K = q.shape
    HV = v.shape[2]
    scale = K ** -0.5 if scale is None else scale
    if use_qk_l2norm:
        q, k = l2(q), l2(k)
    q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)
    S = torch.zeros(B, HV, K, v.shape[-1], dtype=q.dtype) if h0 is None else h0.clone()
    eye = torch.eye(K, dtype=q.dtype)
    outputs = []
    for t in range(T):
        k_t, v_t, b_t = k[:, t], v[:, t], beta[:, t, :, None, None]
        a_t = 1.0 if g is None else g[:, t].exp()[..., None, None]
        S = a_t * (eye - b_t * k_t[..., :, None] * k_t[..., None, :]) @ S + b_t * k_t[..., :, None] * v_t[..., None, :]
        outputs.append((scale * q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(outputs, dim=1), S


# 1. agreement with fla's own naive references


def test_delta_rule_matches_fla_naive_recurrence():
    q, k, v, beta, _, h0 = make_inputs(2, 100, 3, 3, 16, 24, dtype=torch.float32)
    k = l2(k)
    o, ht = chunk_delta_rule_torch(q, k, v, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=False)
    ref_o, ref_ht = delta_rule_recurrence(*(x.transpose(1, 2) for x in (q, k, v, beta)), h0, True)
    torch.testing.assert_close(o, ref_o.transpose(1, 2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ht, ref_ht, atol=1e-5, rtol=1e-5)


def test_delta_rule_matches_fla_naive_chunkwise():
    q, k, v, beta, _, _ = make_inputs(2, 96, 2, 2, 16, 16)
    k = l2(k)
    o, ht = chunk_delta_rule_torch(q, k, v, beta, output_final_state=True, use_qk_l2norm=False)
    ref_o, ref_ht = delta_rule_chunkwise(*(x.transpose(1, 2) for x in (q, k, v, beta)), chunk_size=32)
    torch.testing.assert_close(o, ref_o.transpose(1, 2), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ht, ref_ht, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize('naive', [naive_recurrent_gated_delta_rule, naive_chunk_gated_delta_rule])
def test_gated_delta_rule_matches_fla_naive(naive):
    q, k, v, beta, g, h0 = make_inputs(2, 100, 2, 2, 16, 32, dtype=torch.float32)
    k = l2(k)
    o, ht = chunk_delta_rule_torch(
        q, k, v, beta, g, initial_state=h0, output_final_state=True, scale=0.3, use_qk_l2norm=False,
    )
    ref_o, ref_ht = naive(q=q, k=k, v=v, beta=beta, g=g, scale=0.3, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ht, ref_ht, atol=1e-5, rtol=1e-5)


# 2. chunked form == per-token recurrence (grouped value heads, T not a multiple of the chunk size)


@pytest.mark.parametrize('gated', [False, True])
@pytest.mark.parametrize('with_h0', [False, True])
def test_chunked_matches_token_loop(gated, with_h0):
    q, k, v, beta, g, h0 = make_inputs(2, 150, 2, 4, 16, 8, gated=gated)
    h0 = h0 if with_h0 else None
    o, ht = chunk_delta_rule_torch(q, k, v, beta, g, initial_state=h0, output_final_state=True)
    ref_o, ref_ht = token_loop(q, k, v, beta, g, h0)
    torch.testing.assert_close(o, ref_o, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ht, ref_ht, atol=1e-10, rtol=1e-10)


def test_step_matches_token_loop():
    q, k, v, beta, g, h0 = make_inputs(2, 20, 2, 4, 16, 8)
    S, outputs = h0, []
    for t in range(q.shape[1]):
        o_t, S = delta_rule_step_torch(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], S)
        outputs.append(o_t)
    ref_o, ref_ht = token_loop(q, k, v, beta, g, h0)
    torch.testing.assert_close(torch.stack(outputs, dim=1), ref_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(S, ref_ht, atol=1e-12, rtol=1e-12)


def test_fla_signature_gate_beta_layout_and_varlen():
    """In-kernel gate/beta activations, state_v_first, and packed sequences (cu_seqlens) of unequal lengths."""
    q, k, v, _, _, _ = make_inputs(1, 90, 2, 4, 8, 8)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 90, 4, generator=gen, dtype=torch.float64)  # raw gate and beta logits
    A_log, dt_bias = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    h0 = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)  # one [HV, K, V] state per sequence
    cu_seqlens = torch.tensor([0, 70, 75, 90], dtype=torch.int32)
    g = -A_log.exp() * F.softplus(a + dt_bias)
    torch.testing.assert_close(gdn_log_decay(a, A_log, dt_bias), g)

    kwargs = dict(
        use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, state_v_first=True,
        use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_seqlens, output_final_state=True,
    )
    for op in (chunk_gated_delta_rule, fused_recurrent_gated_delta_rule):
        o, ht = op(q=q, k=k, v=v, g=a, beta=b, initial_state=h0.transpose(-1, -2), **kwargs)
        for n, (start, end) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True)):
            piece = slice(start, end)
            ref_o, ref_ht = token_loop(
                q[:, piece], k[:, piece], v[:, piece], 2 * b[:, piece].sigmoid(), g[:, piece], h0[n:n + 1],
            )
            torch.testing.assert_close(o[:, piece], ref_o, atol=1e-10, rtol=1e-10)
            torch.testing.assert_close(ht[n:n + 1], ref_ht.transpose(-1, -2), atol=1e-10, rtol=1e-10)


# 3. gradients of the chunked form == gradients of the per-token loop


def test_chunked_gradients_match_token_loop():
    inputs = [x.requires_grad_() for x in make_inputs(1, 37, 1, 2, 8, 8)]
    gen = torch.Generator().manual_seed(2)
    w_o = torch.randn(1, 37, 2, 8, generator=gen, dtype=torch.float64)
    w_s = torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64)

    def objective(o, ht):  # a generic scalar function of the outputs and the final state
        return (o * w_o).sum() + (ht * w_s).sum()

    q, k, v, beta, g, h0 = inputs
    chunked = torch.autograd.grad(
        objective(*chunk_delta_rule_torch(q, k, v, beta, g, h0, output_final_state=True, chunk_size=16)), inputs,
    )
    looped = torch.autograd.grad(objective(*token_loop(q, k, v, beta, g, h0)), inputs)
    for name, grad, ref in zip(('q', 'k', 'v', 'beta', 'g', 'h0'), chunked, looped, strict=True):
        torch.testing.assert_close(grad, ref, atol=1e-10, rtol=1e-10, msg=f"gradient of {name}")


# 4. short convolution with cache


def test_short_convolution_cache():
    torch.manual_seed(0)
    conv = ShortConvolution(hidden_size=8, kernel_size=4, bias=True, activation='silu')
    x = torch.randn(2, 20, 8)
    # nn.Conv1d with padding W - 1, cut to causal outputs, is an independent reference.
    reference = F.silu(nn.Conv1d.forward(conv, x.transpose(1, 2))[..., :20].transpose(1, 2))

    y, cache = conv(x, output_final_state=True)
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(cache, x[:, -4:].transpose(1, 2))

    for split in (2, 13):  # shorter and longer than the kernel
        y1, cache1 = conv(x[:, :split], output_final_state=True)
        y2, cache2 = conv(x[:, split:], cache=cache1, output_final_state=True)
        torch.testing.assert_close(torch.cat((y1, y2), dim=1), y)
        torch.testing.assert_close(cache2, cache)

    with torch.no_grad():
        step_cache, outputs = None, []
        for t in range(20):
            y_t, step_cache = conv(x[:, t:t + 1], cache=step_cache, output_final_state=True)
            outputs.append(y_t)
    torch.testing.assert_close(torch.cat(outputs, dim=1), y)
    torch.testing.assert_close(step_cache, cache)

    cu_seqlens = torch.tensor([0, 20, 23], dtype=torch.int32)
    packed = torch.cat((x[:1], x[1:, :3]), dim=1)
    y_packed, cache_packed = conv(packed, cu_seqlens=cu_seqlens, output_final_state=True)
    torch.testing.assert_close(y_packed, torch.cat((y[:1], y[1:, :3]), dim=1))
    torch.testing.assert_close(cache_packed[0], cache[0])
    torch.testing.assert_close(cache_packed[1], F.pad(x[1, :3].T, (1, 0)))


# norms and losses against fla's references / PyTorch


def test_norms_and_losses():
    torch.manual_seed(0)
    x, residual, gate = torch.randn(3, 5, 16), torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    norm = RMSNorm(16, eps=1e-6)
    nn.init.normal_(norm.weight)
    y, h = norm(x, residual, prenorm=True)
    torch.testing.assert_close(h, x + residual)
    torch.testing.assert_close(y, rms_norm_ref(x, norm.weight, None, residual=residual, eps=1e-6, upcast=True))

    swish_gated = FusedRMSNormGated(16, eps=1e-6)
    torch.testing.assert_close(swish_gated(x, gate), gated_rms_norm_ref(x, swish_gated.weight, None, z=gate, eps=1e-6))
    sigmoid_gated = FusedRMSNormGated(16, eps=1e-6, activation='sigmoid')
    reference = rms_norm_ref(x, sigmoid_gated.weight, None, eps=1e-6, upcast=True) * gate.sigmoid()
    torch.testing.assert_close(sigmoid_gated(x, gate), reference)

    logits, target = torch.randn(12, 50), torch.randint(0, 50, (12,))
    target[3] = -100
    ce = FusedCrossEntropyLoss(label_smoothing=0.1, lse_square_scale=1e-3)
    z_loss = 1e-3 * torch.logsumexp(logits, -1).square()[target != -100].mean()
    torch.testing.assert_close(ce(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1) + z_loss)

    hidden, weight = torch.randn(12, 8), torch.randn(50, 8)
    torch.testing.assert_close(
        FusedLinearCrossEntropyLoss()(hidden, target, weight), F.cross_entropy(hidden @ weight.T, target),
    )


# 5. whole models


MODEL_CONFIGS = {
    'delta_net': DeltaNetConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100),
    'delta_net_unfused_gate': DeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100, use_gate=True,
        fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False,
    ),
    'gated_deltanet': GatedDeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, vocab_size=100,
    ),
    'gated_deltanet_gva_nogate_unfused': GatedDeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, num_v_heads=4, vocab_size=100,
        use_gate=False, fuse_norm=False, fuse_swiglu=False, fuse_cross_entropy=False,
    ),
    'gated_deltanet_gva_linear_ce_negeig_sigmoid': GatedDeltaNetConfig(
        hidden_size=64, num_hidden_layers=2, num_heads=2, head_dim=16, num_v_heads=4, vocab_size=100,
        fuse_cross_entropy=False, fuse_linear_cross_entropy=True, allow_neg_eigval=True,
        output_gate_activation='sigmoid',
    ),
}


def build_model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(MODEL_CONFIGS[name])


@pytest.mark.parametrize('name', list(MODEL_CONFIGS))
def test_model_forward_backward_and_cached_decoding(name):
    model = build_model(name)
    torch.manual_seed(1)
    ids = torch.randint(3, 100, (2, 80))  # 80 > 64: chunk mode and a partial last chunk

    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)

    model.eval()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :70], use_cache=True)
        torch.testing.assert_close(out.logits, full[:, :70], atol=1e-5, rtol=1e-4)
        for t in range(70, 80):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        torch.testing.assert_close(out.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', ['delta_net', 'gated_deltanet_gva_nogate_unfused'])
def test_generate_matches_greedy_recomputation(name):
    model = build_model(name).eval()
    torch.manual_seed(2)
    prompt = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        generated = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False, use_cache=True,
            eos_token_id=None, pad_token_id=0,
        )
        ids = prompt
        for _ in range(8):
            next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat((ids, next_token), dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize('name', ['delta_net', 'gated_deltanet_gva_nogate_unfused'])
def test_left_padded_batch_matches_single_sequences(name):
    """attention_mask padding goes through fla's unpad path (cu_seqlens)."""
    model = build_model(name).eval()
    torch.manual_seed(3)
    long, short = torch.randint(3, 100, (1, 12)), torch.randint(3, 100, (1, 7))
    batch = torch.cat((long, torch.cat((torch.zeros(1, 5, dtype=torch.long), short), dim=1)))
    mask = (torch.arange(12) >= torch.tensor([[0], [5]])).long()
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(logits[0], model(long).logits[0, -1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits[1], model(short).logits[0, -1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', ['delta_net', 'gated_deltanet_gva_nogate_unfused'])
def test_layer_states_reconstructed_outside_the_model(name):
    """The recipe a feature tap must follow: conv + SiLU on the projections, raw q/k into the kernel."""
    model = build_model(name).eval()
    layer = model.model.layers[0].attn
    captured = {}
    layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(x=kwargs['hidden_states']), with_kwargs=True,
    )
    torch.manual_seed(4)
    ids = torch.randint(3, 100, (2, 70))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values[0]
        x = captured['x']  # the block's attn_norm output, [B, T, hidden]
        q, k, v = (conv(proj(x))[0] for conv, proj in (
            (layer.q_conv1d, layer.q_proj), (layer.k_conv1d, layer.k_proj), (layer.v_conv1d, layer.v_proj),
        ))
        q, k = q.unflatten(-1, (-1, layer.head_k_dim)), k.unflatten(-1, (-1, layer.head_k_dim))
        v = v.unflatten(-1, (-1, layer.head_v_dim))
        beta = layer.b_proj(x).sigmoid()
        g = gdn_log_decay(layer.a_proj(x), layer.A_log, layer.dt_bias) if hasattr(layer, 'A_log') else None
        _, state = chunk_delta_rule_torch(q, k, v, beta, g, output_final_state=True)

    recurrent_state = cache['recurrent_state']
    if hasattr(layer, 'A_log'):  # Gated DeltaNet caches its state V-first: [N, HV, V, K]
        recurrent_state = recurrent_state.transpose(-1, -2)
    torch.testing.assert_close(state, recurrent_state, atol=1e-5, rtol=1e-4)
    W = layer.conv_size  # conv cache: the last W pre-convolution projections, [N, D, W]
    torch.testing.assert_close(cache['conv_state'][0], layer.q_proj(x)[:, -W:].transpose(1, 2))


def test_install_is_idempotent_and_keeps_fla_originals():
    import fla.layers.gated_deltanet as gdn_layer
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    patched = gdn_layer.chunk_gated_delta_rule
    install()
    assert is_installed()
    assert gdn_layer.chunk_gated_delta_rule is patched
    assert patched.__staterank_original__ is fla_chunk_gated_delta_rule


def test_torch_kernels_switch_routes_non_cpu_calls():
    """Off-CPU calls go to fla unless the switch names them."""
    from staterank.backends import patch

    calls = []

    def original(x):
        calls.append('fla')

    def torch_impl(x):
        calls.append('torch')

    rule = patch._device_dispatcher(original, torch_impl, 'chunk_delta_rule')
    norm = patch._device_dispatcher(original, torch_impl, 'forward')
    off_cpu = torch.empty(2, device='meta')
    try:
        rule(off_cpu)
        patch.use_torch_kernels('delta_rule')
        assert patch.torch_kernels() == 'delta_rule'
        norm(off_cpu)
        rule(off_cpu)
        patch.use_torch_kernels('all')
        norm(off_cpu)
        rule(torch.empty(2))  # CPU tensors always take the PyTorch path
    finally:
        patch.use_torch_kernels('none')
    assert calls == ['fla', 'fla', 'torch', 'torch', 'torch']
    with pytest.raises(ValueError, match='one of none, delta_rule, all'):
        patch.use_torch_kernels('triton')
