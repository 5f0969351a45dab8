"""Independent reference computations the tests compare against (plain loops, float64)."""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import AutoModelForCausalLM

from staterank.models import HeadFeatures


def delta_rule_loop(
    features: HeadFeatures, initial_state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule token by token in float64, straight from its definition, from ``initial_state`` (or zeros).

    S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k),
    with q, k L2-normalised and value head h reading key head h // (Hv / Hk).
    Returns (o [B, T, Hv, d_v], final state [B, Hv, d_k, d_v]).
    """
    q, k, v = (x.double() for x in (features.q, features.k, features.v))
    beta = features.beta.double()
    batch, seq, num_k, d_k = q.shape
    num_v, d_v = v.shape[2], v.shape[3]
    group = num_v // num_k
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    scale = d_k**-0.5
    state = torch.zeros(batch, num_v, d_k, d_v, dtype=torch.float64)
    if initial_state is not None:
        state = initial_state.double().clone()
    out = torch.zeros(batch, seq, num_v, d_v, dtype=torch.float64)
    eye = torch.eye(d_k, dtype=torch.float64)
    for t in range(seq):
        for h in range(num_v):
            kt, qt, vt = k[:, t, h // group], q[:, t, h // group], v[:, t, h]  # [B, d_k], [B, d_k], [B, d_v]
            bt = beta[:, t, h][:, None, None]
            decay = 1.0 if features.log_decay is None else features.log_decay[:, t, h].double().exp()[:, None, None]
            transition = eye - bt * kt[:, :, None] * kt[:, None, :]
            state[:, h] = decay * transition @ state[:, h] + bt * kt[:, :, None] * vt[:, None, :]
            out[:, t, h] = torch.einsum("bkv,bk->bv", state[:, h], qt * scale)
    return out, state


def tiny_config(model_type: str, vocab_size: int):
    """A three-layer config of a family; the transformers hybrids put full attention in the last layer.

    Linear-attention layers: 2 key heads x 4 value heads (1 x 1 groups of 4 for delta_net), d_k = d_v = 8.
    """
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig
    from transformers import Qwen3_5TextConfig, Qwen3NextConfig

    hybrid = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "full_attention"],
    )
    return {
        "delta_net": lambda: DeltaNetConfig(hidden_size=32, num_hidden_layers=3, num_heads=4, vocab_size=vocab_size),
        "gated_deltanet": lambda: GatedDeltaNetConfig(
            hidden_size=32, num_hidden_layers=3, num_heads=2, num_v_heads=4, head_dim=8, expand_v=1.0,
            vocab_size=vocab_size,
        ),
        "qwen3_next": lambda: Qwen3NextConfig(
            **hybrid, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16
        ),
        "qwen3_5_text": lambda: Qwen3_5TextConfig(**hybrid),
    }[model_type]()


#: `staterank train` configs of two-layer models, one per family (the "train" section left to the caller).
MINI_MODELS = {
    "delta_net": {"model_type": "delta_net", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2},
    "gated_deltanet": {
        "model_type": "gated_deltanet", "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "head_dim": 16,
    },
    # A hybrid: one Gated DeltaNet layer, one attention layer, mixture-of-experts MLPs.
    "qwen3_next": {
        "model_type": "qwen3_next", "hidden_size": 32, "num_hidden_layers": 2,
        "layer_types": ["linear_attention", "full_attention"], "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
}  # fmt: skip


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits [B, T, vocab] for token ids [B, T]."""
    return model(input_ids=ids).logits


@torch.no_grad()
def tapped(adapter, ids: torch.Tensor) -> dict[int, HeadFeatures]:
    """Every linear-attention layer's features (the adapter's tap) for one forward pass over ``ids``."""
    features = {}
    with adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        adapter.model(input_ids=ids)
    return features


@torch.no_grad()
def cached_state_bytes(model, ids: torch.Tensor) -> int:
    """Bytes of the conv and recurrent states a transformers cache holds after the first sequence of ``ids``."""
    from staterank.models import adapter_for

    cache = model(input_ids=ids[:1], use_cache=True).past_key_values
    layers = adapter_for(model).linear_layers()
    return sum(cache.layers[i].conv_states[0].nbytes + cache.layers[i].recurrent_states[0].nbytes for i in layers)


def reload_and_compare(out, in_memory, ids: torch.Tensor) -> torch.nn.Module:
    """A written model loaded by stock transformers, checked against the model pruned in memory: logits, shapes."""
    from staterank.models import adapter_for

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, ids), logits(in_memory, ids), rtol=0, atol=1e-5)
    assert adapter_for(reloaded).shapes() == adapter_for(in_memory).shapes()
    return reloaded


@contextlib.contextmanager
def kernel_fed_kept_channels(adapter, index: torch.Tensor):
    """transformers' chunked gated delta rule fed only the q/k channels ``index`` [Hk, d'] of every head (the same
    in every layer): what a model pruned to those channels must compute."""
    module = sys.modules[type(adapter.mixer(adapter.linear_layers()[0])).__module__]
    chunk = module.torch_chunk_gated_delta_rule

    def indexing_kernel(query, key, *args, **kwargs):
        gather = index.expand(*query.shape[:2], *index.shape)
        return chunk(query.gather(-1, gather), key.gather(-1, gather), *args, **kwargs)

    module.torch_chunk_gated_delta_rule = indexing_kernel
    try:
        yield
    finally:
        module.torch_chunk_gated_delta_rule = chunk


def randomise_linear_attention(adapter) -> None:
    """Weights that make every part of transformers' Gated DeltaNet mixers matter (the default init leaves them
    nearly silent)."""
    for layer in adapter.linear_layers():
        mixer = adapter.mixer(layer)
        for module in mixer.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features**-0.5)
        torch.nn.init.normal_(mixer.conv1d.weight, std=0.5)
        mixer.A_log.data = torch.empty_like(mixer.A_log).uniform_(0.05, 1.0).log()
        torch.nn.init.normal_(mixer.dt_bias)
        norm = mixer.norm if hasattr(mixer, "norm") else mixer.o_norm  # OLMo Hybrid's is o_norm
        torch.nn.init.normal_(norm.weight, mean=1.0, std=0.2)


@torch.no_grad()
def decoded_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill ``prefill`` tokens with a cache, then feed the rest one token at a time: the logits [B, T, vocab]."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, dim=1)
