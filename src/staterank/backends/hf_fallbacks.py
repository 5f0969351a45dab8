"""Run transformers' linear-attention models on CPU when flash-linear-attention is installed.

transformers binds the module-level kernels of its linear-attention models (``torch_chunk_gated_delta_rule``,
``causal_conv1d_fn``, ...) once, at import, through ``use_kernel_func_from_hub_with_fallback``: if ``fla``
(or ``causal_conv1d``) is importable, the Triton/CUDA kernel is chosen for every device, and a forward pass on
CPU tensors fails ("0 active drivers"). :func:`use_torch_fallbacks_on_cpu` rebinds those names to a
dispatcher: CPU tensors go to transformers' own PyTorch reference (the function the decorator wrapped),
anything else to what transformers chose.

The classes' ``use_kernelized_func`` decoration only registers the original function objects for the
``kernels`` package's ``kernelize``; ``forward`` calls the module-level names, so rebinding those suffices.

On a GPU without the ``causal-conv1d`` package, transformers runs its causal convolutions through the PyTorch
reference ("falling back ... much slower"); where fla is installed, the dispatcher sends them to fla's Triton
causal convolution instead (:func:`fla_causal_conv1d_fn`, :func:`fla_causal_conv1d_update`), the kernel fla's
own models decode with.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable

import torch

from staterank.backends import in_place

#: transformers modelling modules whose linear-attention layers call kernels bound at import time
_MODULES = (
    "qwen3_next",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen4_exp",
    "olmo_hybrid",
    "kimi_linear",
    "bailing_hybrid",
    "glm5_next",
)
#: the module-level names those layers call
_KERNEL_FUNCTIONS = (
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "torch_chunk_gated_delta_rule",
    "torch_recurrent_gated_delta_rule",
    "chunk_kimi_delta_attention",
    "recurrent_kimi_delta_attention",
)
#: names whose CPU route is staterank's own PyTorch op rather than transformers' reference (which, for Kimi
#: Linear's KDA, loops token by token inside each chunk of 64)
_TORCH_OPS = {
    "chunk_kimi_delta_attention": "staterank.backends.kda:hf_chunk_kimi_delta_attention",
    "recurrent_kimi_delta_attention": "staterank.backends.kda:hf_chunk_kimi_delta_attention",
}


def use_torch_fallbacks_on_cpu() -> None:
    """Make the linear-attention kernels of transformers' models dispatch on the device of their input.

    Idempotent; modules missing from the installed transformers are skipped.
    """
    has_fla = importlib.util.find_spec("fla") is not None
    for name in _MODULES:
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        for function_name in _KERNEL_FUNCTIONS:
            chosen = getattr(module, function_name, None)
            if chosen is None or getattr(chosen, "_staterank_dispatch", False):
                continue
            reference = inspect.unwrap(chosen)
            if reference is not chosen:
                gpu = _gpu_op(function_name, chosen)
                kind = _IN_PLACE_KINDS.get(function_name) if has_fla else None
                setattr(module, function_name, _dispatch_on_device(gpu, _torch_op(function_name, reference), kind))


def _torch_op(function_name: str, reference: Callable) -> Callable:
    """The CPU implementation of a kernel name: staterank's op where :data:`_TORCH_OPS` names one."""
    if function_name not in _TORCH_OPS:
        return reference
    module_name, _, attribute = _TORCH_OPS[function_name].partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _gpu_op(function_name: str, chosen: Callable) -> Callable:
    """What GPU inputs run: fla's Triton convolution where transformers would fall back to PyTorch for want of the
    ``causal-conv1d`` package, else what transformers chose."""
    fla_ops = {"causal_conv1d_fn": fla_causal_conv1d_fn, "causal_conv1d_update": fla_causal_conv1d_update}
    has = importlib.util.find_spec
    if function_name not in fla_ops or has("causal_conv1d") is not None or has("fla") is None:
        return chosen
    return functools.wraps(chosen)(fla_ops[function_name])


def fla_causal_conv1d_fn(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    seq_idx: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """transformers' ``causal_conv1d_fn`` (x ``[B, D, T]`` in and out, weight ``[D, W]``) on fla's Triton kernel."""
    from fla.modules.causal_conv1d import causal_conv1d

    if seq_idx is not None:
        raise ValueError("fla's causal convolution takes packed sequences as cu_seqlens, not seq_idx")
    y, _ = causal_conv1d(hidden_states.transpose(1, 2), weight=weight, bias=bias, activation=activation)
    return y.transpose(1, 2)


def fla_causal_conv1d_update(
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """transformers' ``causal_conv1d_update`` (x ``[B, D, 1]`` in and out; ``conv_state`` ``[B, D, W]``, the last W
    inputs, updated in place) on fla's Triton kernel."""
    from fla.modules.causal_conv1d import causal_conv1d_update

    x = hidden_states.transpose(1, 2)  # [B, 1, D]
    y, _ = causal_conv1d_update(x, conv_state, weight=weight, bias=bias, activation=activation)
    return y.transpose(1, 2)


def _dispatch_on_device(chosen: Callable, reference: Callable, in_place_kind: str | None = None) -> Callable:
    """``reference`` for CPU inputs (device of the first tensor argument), ``chosen`` otherwise; a fused recurrent
    step (``in_place_kind``) writes its state in place inside :func:`staterank.backends.in_place.states_in_place`."""
    parameters = inspect.signature(reference).parameters
    takes_any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

    def on_cpu(*args, **kwargs):
        if kwargs.get("cu_seqlens") is not None or kwargs.get("seq_idx") is not None:
            raise ValueError(f"{reference.__name__} on CPU cannot keep packed sequences apart (cu_seqlens/seq_idx)")
        if not takes_any_keyword:
            kwargs = {key: value for key, value in kwargs.items() if key in parameters}
        return reference(*args, **kwargs)

    @torch.compiler.disable  # a kernel launcher and its routing are called, never traced (torch.compile)
    @functools.wraps(chosen)
    def dispatch(*args, **kwargs):
        first = next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor))
        if in_place_kind is not None and in_place.active():
            done = in_place.step(in_place_kind, _FLA_STEPS[in_place_kind](), on_cpu, args, kwargs, False)
            if done is not None:
                return done
        if first.device.type != "cpu":
            return chosen(*args, **kwargs)
        return on_cpu(*args, **kwargs)

    dispatch._staterank_dispatch = True
    return dispatch


def _fla_gated_delta_rule_step() -> Callable:
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    return fused_recurrent_gated_delta_rule


def _fla_kda_step() -> Callable:
    from fla.ops.kda import fused_recurrent_kda

    return fused_recurrent_kda


#: fla's fused recurrent step of each in-place kind, whose signature transformers' calls follow
_FLA_STEPS = {"gated_delta_rule": _fla_gated_delta_rule_step, "kda": _fla_kda_step}
#: transformers' names of the fused recurrent steps, by in-place kind
_IN_PLACE_KINDS = {"torch_recurrent_gated_delta_rule": "gated_delta_rule", "recurrent_kimi_delta_attention": "kda"}
