"""Device-dispatching patches that let fla's DeltaNet / Gated DeltaNet models run on CPU.

Each patch replaces a name exactly where fla's model code looks it up (a module global or a method on a class)
with a dispatcher: calls whose first tensor argument lives on the CPU go to the pure-PyTorch implementation,
everything else (CUDA, and any other device fla supports) goes to the original fla object, so GPU runs keep
using the Triton kernels.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from staterank.backends import (
    activations,
    conv,
    delta_product,
    delta_rule,
    gla,
    in_place,
    kda,
    losses,
    mamba2,
    norm,
    rotary,
    rwkv7,
)

# (owner: "module" or "module:Class", attribute, CPU implementation with the same signature)
_PATCHES: tuple[tuple[str, str, Callable[..., Any]], ...] = (
    # DeltaNet layer: chunk mode for q_len > 64, fused_recurrent otherwise (including training).
    ('fla.layers.delta_net', 'chunk_delta_rule', delta_rule.chunk_delta_rule),
    ('fla.layers.delta_net', 'fused_recurrent_delta_rule', delta_rule.fused_recurrent_delta_rule),
    # Gated DeltaNet layer: chunk mode with grad / long inputs, fused_recurrent for short grad-free calls.
    ('fla.layers.gated_deltanet', 'chunk_gated_delta_rule', delta_rule.chunk_gated_delta_rule),
    ('fla.layers.gated_deltanet', 'fused_recurrent_gated_delta_rule', delta_rule.fused_recurrent_gated_delta_rule),
    # Gated DeltaProduct layer: chunk mode as Gated DeltaNet; its fused_recurrent mode calls the gated delta rule
    # on the expanded sequence of num_householder steps per token.
    ('fla.layers.gated_deltaproduct', 'chunk_gated_delta_product', delta_product.chunk_gated_delta_product),
    (
        'fla.layers.gated_deltaproduct',
        'fused_recurrent_gated_delta_rule',
        delta_rule.fused_recurrent_gated_delta_rule,
    ),
    # KDA layer (fla kda): the gated delta rule with a decay per key channel, same mode choice.
    ('fla.layers.kda', 'chunk_kda', kda.chunk_kda),
    ('fla.layers.kda', 'fused_recurrent_kda', kda.fused_recurrent_kda),
    # GLA layer (fla gla): gated linear attention, a decay per key channel and no delta correction.
    ('fla.layers.gla', 'chunk_gla', gla.chunk_gla),
    ('fla.layers.gla', 'fused_recurrent_gla', gla.fused_recurrent_gla),
    # LinearAttention layer (fla linear_attn): no decay, no delta correction.
    ('fla.layers.linear_attn', 'chunk_linear_attn', gla.chunk_linear_attn),
    ('fla.layers.linear_attn', 'fused_chunk_linear_attn', gla.chunk_linear_attn),
    ('fla.layers.linear_attn', 'fused_recurrent_linear_attn', gla.fused_recurrent_linear_attn),
    # RetNet layer (fla retnet): a fixed decay per head, no delta correction, rotary q and k.
    ('fla.layers.multiscale_retention', 'chunk_retention', gla.chunk_retention),
    ('fla.layers.multiscale_retention', 'fused_chunk_retention', gla.chunk_retention),
    ('fla.layers.multiscale_retention', 'fused_recurrent_retention', gla.chunk_retention),
    ('fla.layers.multiscale_retention', 'parallel_retention', gla.parallel_retention),
    ('fla.modules.rotary.ops', 'rotary_embedding', rotary.rotary_embedding),
    # Mamba-2 layer (fla mamba2) without mamba_ssm: its PyTorch forward, with a chunked SSD of matrix products
    # for every call without a cache to read (fla's broadcasts a [B, chunks, L, L, heads, d_state] product).
    ('fla.layers.mamba2:Mamba2', 'torch_forward', mamba2.torch_forward),
    # RWKV-7 layer (fla rwkv7): the DPLR rule (chunk mode with grad or 64+ tokens, the fused step otherwise), its
    # token shift, interpolations, key update, L2 norm and output correction; the feed-forward's token shift and
    # squared ReLU; the block norms and the per-head GroupNorm with config.fuse_norm.
    ('fla.layers.rwkv7', 'chunk_rwkv7', rwkv7.chunk_rwkv7),
    ('fla.layers.rwkv7', 'fused_mul_recurrent_rwkv7', rwkv7.fused_mul_recurrent_rwkv7),
    ('fla.layers.rwkv7', 'token_shift', rwkv7.token_shift),
    ('fla.layers.rwkv7', 'fused_addcmul_rwkv7', rwkv7.fused_addcmul_rwkv7),
    ('fla.layers.rwkv7', 'fused_k_rwkv7', rwkv7.fused_k_rwkv7),
    ('fla.layers.rwkv7', 'l2_norm', rwkv7.l2_norm),
    ('fla.layers.rwkv7', 'gate_output_correction', rwkv7.gate_output_correction),
    ('fla.models.rwkv7.modeling_rwkv7', 'token_shift', rwkv7.token_shift),
    ('fla.modules.activations.ops', 'sqrelu_fwd', rwkv7.squared_relu_forward),
    ('fla.modules.activations.ops', 'sqrelu_bwd', rwkv7.squared_relu_backward),
    ('fla.modules.norm.layernorm:LayerNorm', 'forward', norm.layer_norm_forward),
    ('fla.modules.norm.layernorm:GroupNorm', 'forward', norm.group_norm_forward),
    # Gated DeltaNet fuses the q/k/v convolutions into one call when no cache is involved.
    ('fla.layers.gated_deltanet', 'causal_conv1d', conv.causal_conv1d),
    ('fla.modules.causal_conv1d.ops:ShortConvolution', 'forward', conv.short_convolution_forward),
    ('fla.modules.causal_conv1d.ops:ShortConvolution', 'step', conv.short_convolution_step),
    # Block / final norms (config.fuse_norm) and the per-head output norms (always fla modules).
    ('fla.modules.norm.layernorm:RMSNorm', 'forward', norm.rms_norm_forward),
    ('fla.modules.norm.fused_norm_gate:FusedRMSNormGated', 'forward', norm.fused_rms_norm_gated_forward),
    # fla's Mamba-2 output norm: gated RMSNorm over groups of channels.
    ('fla.modules.norm.layernorm_gated:RMSNormGated', 'forward', norm.grouped_rms_norm_gated_forward),
    # GatedMLP: swiglu_linear with config.fuse_swiglu, swiglu without.
    ('fla.modules.mlp', 'swiglu', activations.swiglu),
    ('fla.modules.mlp', 'swiglu_linear', activations.swiglu_linear),
    # fla's SiLU (ACT2FN['silu'], bound into layers such as Mamba2 at construction): its autograd Function.
    ('fla.modules.activations.ops:SwishFunction', 'forward', activations.swish_forward),
    ('fla.modules.activations.ops:SwishFunction', 'backward', activations.swish_backward),
    # Criteria built in fla.models.modeling_utils (config.fuse_cross_entropy / fuse_linear_cross_entropy).
    ('fla.modules.fused_cross_entropy.ops:FusedCrossEntropyLoss', 'forward', losses.fused_cross_entropy_forward),
    (
        'fla.modules.fused_linear_cross_entropy.ops:FusedLinearCrossEntropyLoss',
        'forward',
        losses.fused_linear_cross_entropy_forward,
    ),
)

_ORIGINAL = '__staterank_original__'

# Which patched operations take the PyTorch implementation on every device, not only on CPU.
# "delta_rule": the (gated) delta rule kernels, e.g. where fla's Triton backward is known to be wrong
# (Gated DeltaNet on Hopper with Triton < 3.7.1, fla issue #640) or where compiling a kernel for every
# new head dimension costs more than the run. "all": every patched operation.
TORCH_KERNEL_CHOICES = ('none', 'delta_rule', 'all')
_DELTA_RULE_ATTRIBUTES = frozenset(
    (
        'chunk_delta_rule', 'fused_recurrent_delta_rule', 'chunk_gated_delta_rule', 'fused_recurrent_gated_delta_rule',
        'chunk_kda', 'fused_recurrent_kda', 'chunk_gated_delta_product', 'chunk_gla', 'fused_recurrent_gla',
        'chunk_linear_attn', 'fused_chunk_linear_attn', 'fused_recurrent_linear_attn', 'chunk_retention',
        'fused_chunk_retention', 'fused_recurrent_retention', 'parallel_retention',
    )
)
# The PyTorch rules that accumulate in float32 themselves: autocast would push their products to bf16.
_FLOAT32_RULES = _DELTA_RULE_ATTRIBUTES | {'chunk_rwkv7', 'fused_mul_recurrent_rwkv7'}
_torch_everywhere: frozenset[str] = frozenset()
# The fused recurrent steps that may write their state in place (:mod:`staterank.backends.in_place`), by rule.
_IN_PLACE_STEPS = {
    'fused_recurrent_delta_rule': 'delta_rule',
    'fused_recurrent_gated_delta_rule': 'gated_delta_rule',
    'fused_recurrent_kda': 'kda',
}


def use_torch_kernels(choice: str) -> None:
    """Route patched operations to PyTorch on every device: ``'none'``, ``'delta_rule'`` or ``'all'``.

    The environment variable ``STATERANK_TORCH_KERNELS`` sets the same choice for a whole process.
    """
    global _torch_everywhere
    if choice not in TORCH_KERNEL_CHOICES:
        raise ValueError(f'torch kernels must be one of {", ".join(TORCH_KERNEL_CHOICES)}, not {choice!r}')
    if choice == 'none':
        _torch_everywhere = frozenset()
    elif choice == 'delta_rule':
        _torch_everywhere = _DELTA_RULE_ATTRIBUTES
    else:
        _torch_everywhere = frozenset(attribute for _, attribute, _ in _PATCHES)


@contextlib.contextmanager
def torch_kernels_within(choice: str):
    """:func:`use_torch_kernels` for the duration of a ``with`` block; the previous choice afterwards."""
    previous = torch_kernels()
    use_torch_kernels(choice)
    try:
        yield
    finally:
        use_torch_kernels(previous)


def torch_kernels() -> str:
    """The current choice of :func:`use_torch_kernels`."""
    if not _torch_everywhere:
        return 'none'
    return 'delta_rule' if _torch_everywhere == _DELTA_RULE_ATTRIBUTES else 'all'


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _device_dispatcher(
    original: Callable[..., Any], cpu_impl: Callable[..., Any], attribute: str
) -> Callable[..., Any]:
    @torch.compiler.disable  # a kernel launcher and its routing are called, never traced (torch.compile)
    @functools.wraps(original)
    def dispatcher(*args: Any, **kwargs: Any) -> Any:
        tensor = _first_tensor(args, kwargs)
        on_cpu = tensor is not None and tensor.device.type == 'cpu'
        everywhere = tensor is not None and attribute in _torch_everywhere
        guard = (
            torch.autocast(tensor.device.type, enabled=False)
            if everywhere and not on_cpu and attribute in _FLOAT32_RULES
            and torch.amp.is_autocast_available(tensor.device.type)
            else contextlib.nullcontext()
        )
        with guard:
            if attribute in _IN_PLACE_STEPS and in_place.active():
                done = in_place.step(_IN_PLACE_STEPS[attribute], original, cpu_impl, args, kwargs, everywhere)
                if done is not None:
                    return done
            if on_cpu or everywhere:
                return cpu_impl(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(dispatcher, _ORIGINAL, original)
    return dispatcher


def original(patched: Callable[..., Any]) -> Callable[..., Any]:
    """The fla object a dispatcher of :func:`install` stands in for."""
    return getattr(patched, _ORIGINAL)


def _resolve(owner: str) -> Any:
    module_name, _, class_name = owner.partition(':')
    target = importlib.import_module(module_name)
    return getattr(target, class_name) if class_name else target


def install() -> None:
    """Make fla's DeltaNet and Gated DeltaNet models run (forward, backward, generation) on CPU tensors.

    Idempotent: names that are already patched are left alone. Does nothing if fla is not installed.
    """
    if importlib.util.find_spec('fla') is None:
        return
    for owner, attribute, cpu_impl in _PATCHES:
        target = _resolve(owner)
        # Look in the class/module dict itself: getattr on a class would return a function bound elsewhere.
        current = vars(target)[attribute]
        if hasattr(current, _ORIGINAL):
            continue
        setattr(target, attribute, _device_dispatcher(current, cpu_impl, attribute))
    choice = os.environ.get('STATERANK_TORCH_KERNELS', '').strip()
    if choice and choice != torch_kernels():
        use_torch_kernels(choice)


def is_installed() -> bool:
    """Whether every patch of :func:`install` is in place (``False`` without fla)."""
    if importlib.util.find_spec('fla') is None:
        return False
    return all(hasattr(vars(_resolve(owner))[attribute], _ORIGINAL) for owner, attribute, _ in _PATCHES)
