"""fla ``rwkv7`` (``RWKV7ForCausalLM``, layer ``fla.layers.RWKV7Attention``): the generalised delta rule of RWKV-7.

Per head ``h`` of ``H = hidden_size / head_dim``, the state ``[d_k, d_v]`` (``d_k = head_dim``, ``d_v`` from the
layer's ``value_dim``) follows the diagonal-plus-low-rank rule of :mod:`staterank.backends.rwkv7`::

    S_t = diag(exp(w_t)) S_{t-1} - (kk_t * a_t) (kk_t^T S_{t-1}) + k_t v_t^T          o_t = S_t^T r_t

with, from the layer's input ``x`` and its token shift ``delta = x_{t-1} - x_t`` (zero before a fresh
sequence), ``x_* = x + delta * mu_*`` for r, w, k, v, a and g; ``r = r_proj(x_r)``; the log decay
``w = -exp(-1/2) sigmoid(w_lora(x_w))``; ``kk = normalize(k_proj(x_k) * k_k)`` per head; the removal strength
``a = sigmoid(a_lora(x_a))``; the written key ``k = k_proj(x_k) (1 + (a - 1) k_a)``; and ``v = v_proj(x_v)``,
which every layer after the first interpolates towards the first layer's value (``v_first``) by
``sigmoid(v_lora(x_v))``. The tap rebuilds all of it from the mixer's input and the ``v_first`` it is called
with, so the states are exact at every position (tested against the model's own cache).

What works and what is refused:

- ``info``, ``analyze``, ``finetune`` (LoRA on r, k, v), ``evaluate`` and ``bench``.
- q/k channel pruning and head pruning are refused: fla's ``RWKV7Attention`` builds ``key_dim = hidden_size``
  and ``num_heads = hidden_size / head_dim`` whatever the config says, so a model with fewer key channels or
  heads has no stock config. A model type of staterank's own (as for Kimi Linear's narrower keys) would not be
  enough for heads either: every later layer interpolates its values towards the first layer's head by head, so
  the heads of all layers are tied to layer 0's; and the per-head L2 norm of ``kk`` spans all of a head's
  channels, so a channel cut changes the kept channels too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from staterank.models import register
from staterank.models.base import HeadFeatures, LayerShape
from staterank.models.fla_common import FlaAdapter

#: the layer's bound on the log decay: w = -exp(-1/2) sigmoid(...), in [-0.6065, 0)
LOG_DECAY_SCALE = math.exp(-0.5)


@register
class RWKV7Adapter(FlaAdapter):
    family = "RWKV-7 (flash-linear-attention)"
    model_types = ("rwkv7",)
    layer_class_name = "RWKV7Attention"
    lora_targets = ("r_proj", "k_proj", "v_proj")
    no_decay_suffixes = ("r_k",)
    tap_kwargs = ("v_first",)
    channel_pruning_refusal = (
        "fla's RWKV7Attention builds key_dim = hidden_size whatever the config says, so a model with fewer key "
        "channels has no stock config"
    )
    head_pruning_refusal = (
        "fla's RWKV7Attention builds hidden_size / head_dim heads whatever the config says, so a model with fewer "
        "heads has no stock config (and every later layer mixes the first layer's values in, head by head)"
    )

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.num_heads, mixer.num_heads, mixer.head_dim, mixer.head_v_dim)

    def conv_state_channels(self, layer: int) -> int:
        return 2 * self.config.hidden_size  # the token-shift caches of the mixer and the feed-forward: one token

    def conv_kernel_size(self, layer: int) -> int:
        return 1

    def features(self, layer: int, hidden: torch.Tensor, v_first: torch.Tensor | None = None) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        heads = (shape.num_k_heads, shape.head_k_dim)
        delta = F.pad(hidden, (0, 0, 1, -1)) - hidden  # x_{t-1} - x_t, zero before the first token
        xr, xw, xk, xv, xa = (
            torch.addcmul(hidden, delta, mu) for mu in (mixer.x_r, mixer.x_w, mixer.x_k, mixer.x_v, mixer.x_a)
        )
        r = mixer.r_proj(xr)
        log_decay = -LOG_DECAY_SCALE * mixer.w_lora(xw).float().sigmoid()
        k = mixer.k_proj(xk)
        v = mixer.v_proj(xv)
        if mixer.layer_idx != 0:
            v = torch.lerp(v, v_first, mixer.v_lora(xv).sigmoid())
        a = mixer.a_lora(xa).sigmoid()
        kk = (k * mixer.k_k).unflatten(-1, heads).float()
        if mixer.fuse_norm:  # fla's l2_norm: x / sqrt(sum x^2 + 1e-6)
            kk = kk * torch.rsqrt(kk.square().sum(-1, keepdim=True) + 1e-6)
        else:
            kk = F.normalize(kk, dim=-1)
        k = k.addcmul(k * (a - 1), mixer.k_a)
        batch, seq = hidden.shape[:2]
        beta = hidden.new_ones(batch, seq, shape.num_v_heads, dtype=torch.float32)  # unused by the DPLR rule
        return HeadFeatures.from_projections(
            layer, hidden, shape, r, k, v, beta, log_decay.unflatten(-1, heads), delta_rule=False, qk_l2norm=False,
            dplr=(-kk, kk * a.unflatten(-1, heads)),
        )  # fmt: skip

    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        mixer = self.mixer(layer)
        return (mixer.r_proj.weight, mixer.k_proj.weight)

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        self.check_channel_pruning()  # always refuses: see channel_pruning_refusal

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        self.check_head_pruning()  # always refuses: see head_pruning_refusal

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict:
        self.check_head_pruning()
        return {}

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        self.check_channel_pruning()
