"""Mamba-2 layers: ``mamba2`` (transformers' ``Mamba2Mixer``, or fla's ``Mamba2`` once fla is imported, which
registers its own classes for the type) and transformers' hybrids ``bamba``, ``nemotron_h``, ``granitemoehybrid``,
``falcon_h1`` (a Mamba-2 mixer beside attention in every block, its in_proj input and outputs scaled by muP
multipliers, which the tap applies) and ``zamba2`` (a hybrid block's Mamba-2 block sits in ``mamba_decoder``).

A Mamba-2 head ``h`` of ``H`` keeps a state ``[head_dim, d_state]``; in staterank's key-first layout
``[d_state, head_dim]`` it is the linear-attention state of a head whose keys are ``B``, queries ``C`` and values
``x``, written with strength ``dt`` under a scalar decay ``exp(dt A)``, with no delta correction::

    S_t = exp(dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T          y_t = S_t^T C_t + D_h x_t

(the scan of transformers' ``mamba2_chunk_scan`` and of ``mamba_ssm``), with ``dt = clamp(softplus(dt_raw +
dt_bias), time_step_limit)`` and ``A = -exp(A_log)``. ``B`` and ``C`` are shared by the ``H / n_groups`` heads of a
group, as grouped value heads share a key head, so a group is a key head of d_k = d_state and a head a value head
of d_v = head_dim. The mixer's ``in_proj`` gives ``[z | x | B | C | dt]``, and the depthwise causal convolution with
SiLU runs over ``[x | B | C]``; the tap rebuilds all of it from the mixer's input.

fla's ``Mamba2`` may put two ``d_mlp``-wide blocks before ``z`` in ``in_proj``'s output, and calls the time-step
limit ``dt_limit``; the tap reads both layouts.

What runs: ``info`` and ``analyze`` (the states at every position, tested against each model's own cache), and q/k
channel pruning, which here cuts d_state: the same channels of B and C are kept in every group (the rows of
``in_proj`` and the convolution's channels), which drops those rows of every head's state, and the config's state
size says so (``state_size``, ``mamba_d_state`` or ``ssm_state_size``), so stock classes reload it; and head pruning
by whole groups (``--unit key``): a group's heads go together, with their B and C, because the gated RMSNorm
normalises each group's heads together (removing one head would change the others); the config's head and group
counts and expansion say so. Refused: removing part of a group, and graphed decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from staterank.errors import UnsupportedModelError
from staterank.models import register
from staterank.models.base import (
    HeadFeatures,
    LayerShape,
    ModelAdapter,
    PruningShapeError,
    StaticCacheError,
    head_channels,
    per_head_channels,
    slice_conv_channels,
    slice_linear_columns,
    slice_linear_rows,
    slice_vector,
)
from staterank.models.fla_common import causal_depthwise_conv

#: The Mamba-2 mixer classes of transformers' models, and the attribute of a decoder block that holds one.
MIXER_CLASSES = (
    "Mamba2Mixer", "Mamba2", "BambaMixer", "NemotronHMamba2Mixer", "GraniteMoeHybridMambaLayer", "FalconH1Mixer",
    "Zamba2MambaMixer",
)  # fmt: skip
MIXER_ATTRIBUTES = ("mixer", "mamba")
#: zamba2's hybrid blocks hold their Mamba-2 block (and its ``mamba``) here, beside the shared transformer
INNER_BLOCK_ATTRIBUTES = ("mamba_decoder",)
#: Where each family's config keeps d_state: mamba2 (transformers and fla), bamba, granitemoehybrid, falcon_h1 and
#: zamba2, nemotron_h.
STATE_SIZE_FIELDS = ("state_size", "mamba_d_state", "ssm_state_size")
#: ... and its heads, groups and expansion (intermediate = expand x hidden_size, where the config derives it so;
#: falcon_h1 may state it instead as mamba_d_ssm).
HEAD_FIELDS = ("num_heads", "mamba_n_heads", "mamba_num_heads", "n_mamba_heads")
GROUP_FIELDS = ("n_groups", "mamba_n_groups", "mamba_ngroups")
EXPAND_FIELDS = ("expand", "mamba_expand")
WHOLE_EXPAND_FIELDS = ("mamba_expand",)  # bamba's, granitemoehybrid's, falcon_h1's and zamba2's are whole numbers
INTERMEDIATE_FIELDS = ("mamba_d_ssm",)


@register
class Mamba2Adapter(ModelAdapter):
    family = "Mamba-2"
    model_types = ("mamba2", "bamba", "nemotron_h", "granitemoehybrid", "falcon_h1", "zamba2")
    lora_targets = ("in_proj",)
    no_decay_suffixes = ("A_log", "dt_bias", "D")
    state_dtype = torch.float32  # the scans keep the state in float32

    def __init__(self, model) -> None:
        super().__init__(model)
        for layer in self.linear_layers():
            mixer = self.mixer(layer)
            if mixer.activation not in ("silu", "swish"):
                raise UnsupportedModelError(f"{self.family}: layer {layer} uses activation {mixer.activation!r}")
            extra = mixer.in_proj.out_features - (mixer.intermediate_size + mixer.conv_dim + mixer.num_heads)
            if extra < 0 or extra % 2:
                raise UnsupportedModelError(
                    f"{self.family}: layer {layer}'s in_proj gives {mixer.in_proj.out_features} features, which do "
                    "not split as [(two MLP blocks) | z | x | B | C | dt]"
                )

    def decoder_layers(self) -> nn.ModuleList:
        inner = getattr(self.model, "backbone", None)  # mamba2's, transformers' and fla's alike
        return (inner if inner is not None else self.model.model).layers

    @staticmethod
    def _z_offset(mixer: nn.Module) -> int:
        """Rows of ``in_proj`` before ``z``: fla's two ``d_mlp`` blocks, or none."""
        return mixer.in_proj.out_features - (mixer.intermediate_size + mixer.conv_dim + mixer.num_heads)

    def mixer(self, layer: int) -> nn.Module | None:
        block = self.decoder_layers()[layer]
        block = next((getattr(block, n) for n in INNER_BLOCK_ATTRIBUTES if hasattr(block, n)), block)
        for name in MIXER_ATTRIBUTES:
            module = getattr(block, name, None)
            if type(module).__name__ in MIXER_CLASSES:
                return module
        return None

    def layer_shape(self, layer: int) -> LayerShape:
        mixer = self.mixer(layer)
        return LayerShape(layer, mixer.n_groups, mixer.num_heads, mixer.ssm_state_size, mixer.head_dim)

    def conv_state_channels(self, layer: int) -> int:
        return self.mixer(layer).conv_dim

    def conv_kernel_size(self, layer: int) -> int:
        return self.mixer(layer).conv_kernel_size

    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        inner, groups = mixer.intermediate_size, mixer.n_groups * mixer.ssm_state_size
        projected = mixer.in_proj(hidden * getattr(mixer, "ssm_in_multiplier", 1.0))
        if getattr(mixer, "mup_vector", None) is not None:  # falcon_h1: a multiplier per block of z, x, B, C, dt
            projected = projected * mixer.mup_vector
        projected = projected[..., self._z_offset(mixer) :]
        _, xbc, dt = projected.split([inner, mixer.conv_dim, mixer.num_heads], dim=-1)
        xbc = causal_depthwise_conv(xbc, mixer.conv1d.weight, mixer.conv1d.bias, silu=True)
        x, b, c = xbc.split([inner, groups, groups], dim=-1)
        low, high = getattr(mixer, "time_step_limit", None) or mixer.dt_limit
        dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(min=low, max=high)  # [B, T, H]
        log_decay = dt * -torch.exp(mixer.A_log.float())
        return HeadFeatures.from_projections(
            layer, hidden, shape, c, b, x, dt, log_decay, delta_rule=False, qk_l2norm=False
        )

    def cached_state(self, cache, layer: int) -> torch.Tensor:
        held = getattr(cache, "layers", None)
        if held is not None and hasattr(held[layer], "recurrent_states"):  # transformers' cache
            state = held[layer].recurrent_states[0]
        else:  # fla's
            state = cache[layer]["recurrent_state"]
        return state.transpose(-1, -2)  # [B, H, head_dim, d_state] -> key-first

    def static_cache_tensors(self, cache) -> list[torch.Tensor]:
        raise StaticCacheError(f"{self.family}: graphed decoding is not checked for Mamba-2 layers yet")

    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        return (self.mixer(layer).in_proj.weight,)

    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        (weight,) = tensors  # [z | x | B | C | dt] rows
        groups = mixer.n_groups * mixer.ssm_state_size
        start = self._z_offset(mixer) + 2 * mixer.intermediate_size
        b, c = weight[start : start + groups], weight[start + groups : start + 2 * groups]
        return (c.view(shape.num_k_heads, shape.head_k_dim, -1), b.view(shape.num_k_heads, shape.head_k_dim, -1))

    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        weight = mixer.conv1d.weight.data  # [x | B | C channels, 1, W]
        groups = mixer.n_groups * mixer.ssm_state_size
        start = mixer.intermediate_size
        b, c = weight[start : start + groups], weight[start + groups : start + 2 * groups]
        return (c.view(shape.num_k_heads, shape.head_k_dim, -1), b.view(shape.num_k_heads, shape.head_k_dim, -1))

    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        mixer = self.mixer(layer)
        inner, state = mixer.intermediate_size, mixer.ssm_state_size
        groups = mixer.n_groups * state
        kept = per_head_channels(index, state)  # within the B (and likewise the C) block of every group
        b_rows = self._z_offset(mixer) + 2 * inner  # in_proj: [(MLP blocks) | z | x | B | C | dt]
        rows = torch.cat((torch.arange(b_rows), b_rows + kept, b_rows + groups + kept,
                          torch.arange(b_rows + 2 * groups, mixer.in_proj.out_features)))  # fmt: skip
        _slice_in_proj(mixer, rows)
        channels = torch.cat((torch.arange(inner), inner + kept, inner + groups + kept))  # conv: [x | B | C]
        slice_conv_channels(mixer.conv1d, channels)
        mixer.ssm_state_size = int(index.shape[1])
        mixer.conv_dim = inner + 2 * mixer.n_groups * mixer.ssm_state_size

    def _set_head_k_dim(self, head_k_dim: int) -> None:
        config = self.config.get_text_config(decoder=True)
        names = [name for name in STATE_SIZE_FIELDS if hasattr(config, name)]
        if not names:
            raise PruningShapeError(f"{self.family}: the config names its state size none of {STATE_SIZE_FIELDS}")
        for name in names:
            setattr(config, name, head_k_dim)

    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        mixer, shape = self.mixer(layer), self.layer_shape(layer)
        if len(kept_v) != len(kept_k) * shape.group_size:
            raise PruningShapeError(
                f"{self.family}: layer {layer}: heads go with their whole group (remove whole groups: --unit key), "
                "as the gated RMSNorm normalises each group's heads together"
            )
        inner, state, head_dim = mixer.intermediate_size, mixer.ssm_state_size, mixer.head_dim
        groups = mixer.n_groups * state
        heads, kept_groups = head_channels(kept_v, head_dim), head_channels(kept_k, state)
        z = self._z_offset(mixer)  # in_proj: [(MLP blocks) | z | x | B | C | dt]
        rows = torch.cat((torch.arange(z), z + heads, z + inner + heads, z + 2 * inner + kept_groups,
                          z + 2 * inner + groups + kept_groups, z + 2 * inner + 2 * groups + kept_v))  # fmt: skip
        _slice_in_proj(mixer, rows)
        slice_conv_channels(mixer.conv1d, torch.cat((heads, inner + kept_groups, inner + groups + kept_groups)))
        mixer.A_log = slice_vector(mixer.A_log, kept_v)
        mixer.dt_bias = slice_vector(mixer.dt_bias, kept_v)
        mixer.D = slice_vector(mixer.D, kept_v if mixer.D.numel() == shape.num_v_heads else heads)  # fla: per channel
        norm = getattr(mixer, "norm", None)
        if getattr(norm, "weight", None) is not None:  # falcon_h1's may be an Identity
            norm.weight = slice_vector(norm.weight, heads)  # each group's size is unchanged
            if hasattr(norm, "n_groups"):  # falcon_h1's splits by its count of groups
                norm.n_groups = len(kept_k)
        slice_linear_columns(mixer.out_proj, heads)
        mixer.num_heads, mixer.n_groups = len(kept_v), len(kept_k)
        mixer.intermediate_size = len(kept_v) * head_dim
        mixer.conv_dim = mixer.intermediate_size + 2 * mixer.n_groups * state

    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict:
        config = self.config.get_text_config(decoder=True)
        inner = num_v_heads * self.layer_shape(self.linear_layers()[0]).head_v_dim
        fields = {name: num_v_heads for name in HEAD_FIELDS if hasattr(config, name)}
        fields |= {name: num_k_heads for name in GROUP_FIELDS if hasattr(config, name)}
        stated = {name: inner for name in INTERMEDIATE_FIELDS if getattr(config, name, None) is not None}
        if stated:  # the config states the width itself, so the expansion stays as it is
            return fields | stated
        for name in EXPAND_FIELDS:  # intermediate = int(expand * hidden_size), where the config derives it so
            if hasattr(config, name):
                expand = inner / config.hidden_size
                if expand.is_integer():
                    expand = int(expand)
                elif name in WHOLE_EXPAND_FIELDS or int(expand * config.hidden_size) != inner:
                    raise PruningShapeError(
                        f"{self.family}: {num_v_heads} heads of {inner // num_v_heads} channels make {inner} channels, "
                        f"which the config states only as a whole {name} x hidden_size ({config.hidden_size}); "
                        "keep a number of heads that does"
                    )
                fields[name] = expand
        return fields


def _slice_in_proj(mixer: nn.Module, rows: torch.Tensor) -> None:
    """Keep ``rows`` of a mixer's ``in_proj``, and of falcon_h1's multipliers of its output (``mup_vector``)."""
    slice_linear_rows(mixer.in_proj, rows)
    if getattr(mixer, "mup_vector", None) is not None:
        mixer.mup_vector = mixer.mup_vector[..., rows.to(mixer.mup_vector.device)].contiguous()
