"""Decoding steps that write the new recurrent state over the old one, for decoders whose cache stays in place.

fla's fused recurrent kernels return each step's final state as a new tensor, so a decoder that keeps its
cache at fixed addresses (:class:`staterank.bench.StaticDecoder`, CUDA-graphed) has to copy every layer's
state back: at batch 256 that copy was 30% of a graphed DeltaNet-1.3B step on an H200. Inside
:func:`states_in_place`, the fused recurrent steps of the delta rule, the gated delta rule and KDA write the
state where it lies instead:

- on a GPU through fla's own KDA kernel with ``inplace_final_state=True`` (``fused_recurrent_kda_fwd``), which
  computes the general rule ``S = diag(exp(g)) S; S += k (beta (v - S^T k))^T; o = S^T (scale q)``: the delta
  rule is that with ``g = 0``, the gated delta rule with its per-head decay repeated over the key channels;
- on the CPU through staterank's PyTorch step, whose new state is then copied over the old one.

The gate computed in the kernel (``use_gate_in_kernel``, with ``A_log`` and ``dt_bias``), beta's sigmoid in the
kernel and the value-first state layout pass through to the KDA kernel, which has them all (a per-head gate and
bias repeated over the key channels). A call is written in place only when that is what it means: an initial
state of float32, contiguous, not recording autograd, a final state asked for, no packed sequences and no
per-value-channel decay; any other call runs as before, and its caller copies.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

_active = False


@contextlib.contextmanager
def states_in_place() -> Iterator[None]:
    """Within this block, eligible fused recurrent steps overwrite their initial state with the final one."""
    global _active
    previous, _active = _active, True
    try:
        yield
    finally:
        _active = previous


def active() -> bool:
    return _active


#: Arguments that must keep their default for a step to run through the KDA kernel in place.
_MUST_BE_DEFAULT = ("gv", "cu_seqlens")


def step(
    kind: str, fla_function: Callable, torch_impl: Callable, args: tuple, kwargs: dict, torch_kernels: bool
) -> Any:
    """Run a fused recurrent step (``kind``: ``"delta_rule"``, ``"gated_delta_rule"`` or ``"kda"``) in place if
    it may be, else return ``None``. ``fla_function``'s signature binds the call (extra keywords are ignored, as
    fla ignores them); ``torch_impl`` computes it on the CPU, or everywhere with ``torch_kernels``."""
    bound = inspect.signature(inspect.unwrap(fla_function)).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    state = a.get("initial_state")
    if (
        state is None
        or not a.get("output_final_state")
        or state.dtype != torch.float32
        or not state.is_contiguous()
        or (state.requires_grad and torch.is_grad_enabled())
        or any(a.get(name) is not None and a.get(name) is not False for name in _MUST_BE_DEFAULT)
        or "transpose_state_layout" in (a.get("kwargs") or {})
        or (kind == "gated_delta_rule" and (a.get("g") is None) == (a.get("gk") is None))
        or (a.get("gk") is not None and a.get("use_gate_in_kernel"))
    ):
        return None
    if state.device.type == "cpu" or torch_kernels:
        o, final = torch_impl(*args, **kwargs)
        state.copy_(final)
        return o, state
    q, k, v = a["q"], a["k"], a["v"]
    beta = a["beta"] if a["beta"] is not None else q.new_ones(v.shape[:3])
    B, T, HV, K = *v.shape[:3], k.shape[-1]
    dt_bias = a.get("dt_bias")
    if kind == "delta_rule":
        g = torch.zeros(B, T, HV, K, dtype=torch.float32, device=q.device)
    elif kind == "gated_delta_rule":  # one decay (or gate) per head, repeated over the key channels
        g = a["gk"] if a.get("gk") is not None else a["g"][..., None].expand(B, T, HV, K)
        if dt_bias is not None:
            dt_bias = dt_bias[:, None].expand(HV, K)
    else:
        g = a["g"]
    from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd

    o, _ = fused_recurrent_kda_fwd(
        q=q.contiguous(),
        k=k.contiguous(),
        v=v.contiguous(),
        g=g.contiguous(),
        beta=beta.contiguous(),
        A_log=a.get("A_log"),
        dt_bias=None if dt_bias is None else dt_bias.contiguous(),
        scale=a.get("scale"),
        initial_state=state,
        output_final_state=True,
        inplace_final_state=True,
        use_qk_l2norm_in_kernel=a["use_qk_l2norm_in_kernel"],
        use_gate_in_kernel=bool(a.get("use_gate_in_kernel")),
        use_beta_sigmoid_in_kernel=bool(a.get("use_beta_sigmoid_in_kernel")),
        allow_neg_eigval=bool(a.get("allow_neg_eigval")),
        lower_bound=a.get("lower_bound"),
        state_v_first=bool(a.get("state_v_first")),
    )
    return o, state
