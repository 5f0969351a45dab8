"""Pure-PyTorch CPU backend for flash-linear-attention's DeltaNet and Gated DeltaNet models.

Call :func:`install` once (it is idempotent) and ``fla.models.DeltaNetForCausalLM`` /
``GatedDeltaNetForCausalLM`` / ``GatedDeltaProductForCausalLM`` run forward, backward and cached generation on
CPU tensors, while CUDA tensors keep going through fla's Triton kernels.

The reference math is public so that other code can reproduce layer states outside the model:
:func:`chunk_delta_rule_torch` (whole sequences), :func:`delta_rule_step_torch` (one token),
:func:`gdn_log_decay` (Gated DeltaNet's ``g`` from ``a_proj``, ``A_log``, ``dt_bias``) and :func:`l2_norm`; a
per-key-channel ``g`` gives Kimi Delta Attention, and Gated DeltaProduct is the rule over its expanded steps
(:mod:`staterank.backends.delta_product`).
"""

from staterank.backends.conv import causal_conv1d, causal_conv1d_update
from staterank.backends.delta_rule import (
    chunk_delta_rule_torch,
    delta_rule_states_torch,
    delta_rule_step_torch,
    gdn_log_decay,
    l2_norm,
)
from staterank.backends.norm import rms_norm, rms_norm_gated
from staterank.backends.patch import install, is_installed, torch_kernels, torch_kernels_within, use_torch_kernels

__all__ = [
    'causal_conv1d',
    'causal_conv1d_update',
    'chunk_delta_rule_torch',
    'delta_rule_states_torch',
    'delta_rule_step_torch',
    'gdn_log_decay',
    'install',
    'is_installed',
    'l2_norm',
    'rms_norm',
    'rms_norm_gated',
    'torch_kernels',
    'torch_kernels_within',
    'use_torch_kernels',
]
