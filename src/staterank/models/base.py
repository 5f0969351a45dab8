"""The adapter interface: everything the algorithms need from a linear-attention model.

Nothing outside ``staterank.models`` names a model's attributes (``q_proj``, ``in_proj_qkvz``,
``head_k_dim``, ...). An adapter wraps one loaded ``PreTrainedModel`` and exposes:

- which decoder layers are linear attention, and their head counts and dims (:class:`LayerShape`);
- a feature tap: per-head q, k (after the short convolution and its activation, before the L2
  norm), v, beta and the log-decay that enter the delta rule, computed from the mixer's input;
- the q/k projection weights per head (for weight-based channel scores);
- :meth:`ModelAdapter.keep_qk_channels`: keep a channel subset of Q/K per key head;
- :meth:`ModelAdapter.remove_heads`: remove whole heads (:meth:`ModelAdapter.keep_heads`: one layer);
- the config update, so that stock ``AutoModelForCausalLM.from_pretrained`` rebuilds the result;
- the decoding cache's fixed-size tensors, which a CUDA-graphed decoder keeps in place
  (:meth:`ModelAdapter.static_cache_tensors`);
- what a checkpoint of the family needs to be loaded and served (:meth:`ModelAdapter.load_import`,
  :meth:`ModelAdapter.serving_notes`), for model cards.

The delta rule every family computes, per value head h with key head g(h) (grouped heads)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T      S_t: [d_k, d_v]
    o_t = S_t^T (q_t / sqrt(d_k))                                          q_t, k_t L2-normalised
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from staterank.errors import StaterankError


class PruningShapeError(StaterankError):
    """A channel or head selection that the model family cannot represent."""


class StaticCacheError(StaterankError):
    """A decoding cache whose tensors cannot keep their memory from step to step (it grows, or is not known)."""


@dataclass(frozen=True)
class LayerShape:
    """Head layout of one linear-attention layer."""

    layer: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int

    @property
    def group_size(self) -> int:
        """Value heads served by each key head (1 unless heads are grouped)."""
        return self.num_v_heads // self.num_k_heads

    def key_head_of(self, value_head: int) -> int:
        """The key head whose q, k a value head reads (value heads are grouped contiguously)."""
        return value_head // self.group_size

    def as_dict(self) -> dict[str, int]:
        return {
            "layer": self.layer,
            "num_k_heads": self.num_k_heads,
            "num_v_heads": self.num_v_heads,
            "head_k_dim": self.head_k_dim,
            "head_v_dim": self.head_v_dim,
        }


@dataclass
class HeadFeatures:
    """What one linear-attention layer feeds its delta rule, for one batch.

    ``q`` and ``k`` are taken after the short convolution and its activation and before the
    L2 normalisation: selecting channels commutes with both (the convolution is depthwise),
    so a criterion that scores these features scores exactly what a pruned model will see.
    """

    layer: int
    hidden: torch.Tensor  # [B, T, hidden]  the mixer's input (after the block's pre-norm)
    q: torch.Tensor  # [B, T, Hk, d_k]
    k: torch.Tensor  # [B, T, Hk, d_k]
    v: torch.Tensor  # [B, T, Hv, d_v]
    beta: torch.Tensor  # [B, T, Hv]  in (0, 1], or (0, 2] with negative eigenvalues allowed
    # [B, T, Hv]: g_t <= 0, the state is scaled by exp(g_t); [B, T, Hv, d_k] (KDA): row c of the state is
    # scaled by exp(g_t[c]), S_t = diag(exp(g_t)) S_{t-1} before the delta update; None: no decay
    log_decay: torch.Tensor | None
    #: False: plain (gated) linear attention, S_t = a_t S_{t-1} + k_t v_t^T (beta unused), no delta correction
    delta_rule: bool = True
    #: whether the rule L2-normalises q and k first (the delta-rule families do; GLA does not)
    qk_l2norm: bool = True
    #: (a, b) [B, T, Hv, d_k]: the diagonal-plus-low-rank rule of RWKV-7 instead,
    #: S_t = diag(exp(g_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T (beta unused; :mod:`staterank.backends.rwkv7`)
    dplr: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_projections(
        cls,
        layer: int,
        hidden: torch.Tensor,
        shape: LayerShape,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        beta: torch.Tensor,
        log_decay: torch.Tensor | None,
        delta_rule: bool = True,
        qk_l2norm: bool = True,
        dplr: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> HeadFeatures:
        """Features from q, k ``[B, T, Hk * d_k]`` and v ``[B, T, Hv * d_v]`` as the layer's projections give
        them, split into heads; ``[B, T * n, ...]`` for n delta steps per token (Gated DeltaProduct)."""
        batch = hidden.shape[0]
        if dplr is not None:
            dplr = tuple(x.reshape(batch, -1, shape.num_v_heads, shape.head_k_dim) for x in dplr)
        return cls(
            layer,
            hidden,
            q.reshape(batch, -1, shape.num_k_heads, shape.head_k_dim),
            k.reshape(batch, -1, shape.num_k_heads, shape.head_k_dim),
            v.reshape(batch, -1, shape.num_v_heads, shape.head_v_dim),
            beta,
            log_decay,
            delta_rule,
            qk_l2norm,
            dplr,
        )


FeatureCallback = Callable[[HeadFeatures], None]


class ModelAdapter(ABC):
    """One model family behind the interface the algorithms use. Subclasses: one file each."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: bytes of one recurrent-state element as the family's cache holds it (None: model dtype)
    state_dtype: ClassVar[torch.dtype | None] = None
    #: whether the model classes come from flash-linear-attention (``import fla`` registers them)
    requires_fla: ClassVar[bool] = False
    #: the module names LoRA adapts by default: the projections that feed the linear-attention state
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: parameter-name endings exempt from weight decay besides every vector (per-head decay and gates)
    no_decay_suffixes: ClassVar[tuple[str, ...]] = ()
    #: model_type of the family's per-layer head-count configs (:mod:`staterank.models.varheads`); None: none
    per_layer_model_type: ClassVar[str | None] = None
    #: keyword arguments of the mixer's call that :meth:`features` takes besides its input (RWKV-7's v_first)
    tap_kwargs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    # --- layout -------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """All decoder blocks, linear attention or not."""

    @abstractmethod
    def mixer(self, layer: int) -> nn.Module | None:
        """The linear-attention module of a decoder block, or None if the block has another mixer."""

    @abstractmethod
    def layer_shape(self, layer: int) -> LayerShape:
        """Head counts and dims of a linear-attention layer."""

    def linear_layers(self) -> list[int]:
        return [i for i in range(len(self.decoder_layers())) if self.mixer(i) is not None]

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """Whether training leaves ``param`` undecayed: norm gains, biases and the per-head decay parameters,
        which weight decay would pull towards 0, a value that means something."""
        return param.ndim < 2 or name.endswith(self.no_decay_suffixes)

    def shapes(self) -> list[LayerShape]:
        return [self.layer_shape(i) for i in self.linear_layers()]

    @abstractmethod
    def conv_state_channels(self, layer: int) -> int:
        """Channels of the short-convolution cache of a layer (q, k and v together)."""

    @abstractmethod
    def conv_kernel_size(self, layer: int) -> int:
        """Width of the short convolution (the cache keeps this many columns per channel)."""

    def state_bytes_per_seq(self) -> int:
        """Recurrent-state plus convolution-cache bytes of all linear-attention layers, one sequence."""
        model_dtype = next(self.model.parameters()).dtype
        state_size = (self.state_dtype or model_dtype).itemsize
        total = 0
        for shape in self.shapes():
            total += shape.num_v_heads * shape.head_k_dim * shape.head_v_dim * state_size
            total += self.conv_state_channels(shape.layer) * self.conv_kernel_size(shape.layer) * model_dtype.itemsize
        return total

    # --- features -------------------------------------------------------------------------

    @abstractmethod
    def features(self, layer: int, hidden: torch.Tensor) -> HeadFeatures:
        """Compute the delta-rule inputs of ``layer`` from the mixer input ``hidden`` [B, T, hidden] (and the
        mixer call's keyword arguments named in :attr:`tap_kwargs`, if any)."""

    @contextmanager
    def tap(self, callback: FeatureCallback, layers: list[int] | None = None) -> Iterator[None]:
        """Call ``callback(features)`` for every linear-attention layer during each forward pass.

        Features are computed from each mixer's input as the model runs, so statistics can be
        streamed without keeping activations. Inside ``torch.no_grad()`` they carry no graph.
        With layers spread over devices (``device_map``) the features of a layer are on that
        layer's device.
        """
        handles = []
        for layer in layers if layers is not None else self.linear_layers():
            mixer = self.mixer(layer)

            def hook(module, args, kwargs, layer=layer):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                # accelerate moves a block's inputs to the block's device when the block is called, before its
                # mixer runs; this guards against a device map that splits a block.
                hidden = hidden.to(next(module.parameters()).device)
                callback(self.features(layer, hidden, **{name: kwargs.get(name) for name in self.tap_kwargs}))

            handles.append(mixer.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def qk_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the q and k projection weights per key head: ([Hk, d_k, hidden], [Hk, d_k, hidden])."""
        return self._qk_rows(layer, tuple(p.data for p in self.qk_parameters(layer)))

    def qk_grads(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradients of the same rows, laid out as :meth:`qk_weights` (after a backward pass)."""
        params = self.qk_parameters(layer)
        if any(p.grad is None for p in params):
            raise RuntimeError(f"layer {layer}: no gradient on the q/k projections; run a backward pass first")
        return self._qk_rows(layer, tuple(p.grad for p in params))

    @abstractmethod
    def cached_state(self, cache, layer: int) -> torch.Tensor:
        """The recurrent state a forward with ``use_cache=True`` left in ``cache``: [B, Hv, d_k, d_v]."""

    def decoding_cache(self, batch_size: int, max_cache_len: int):
        """A cache for decoding in place (every tensor keeps its address from step to step), to pass to the model's
        first forward pass; None when the model's own cache already is one (fla's caches without attention)."""
        return None

    def static_cache_tensors(self, cache) -> list[torch.Tensor]:
        """The tensors of a decoding cache that hold its whole, fixed-size state (recurrent states, convolution
        windows), in an order that every call on the family's caches repeats.

        A decoding step returns a cache holding new tensors of the same shapes in their place; copying those into
        the tensors returned before and putting these back (:meth:`set_static_cache_tensors`) makes every step read
        and write the same memory, as a CUDA graph needs. Raises :class:`StaticCacheError`, with the reason, for a
        cache that grows with the sequence (attention layers' key/value caches) or that the family does not keep
        in place.
        """
        raise StaticCacheError(f"{type(cache).__name__} is not a recurrent cache of fixed size ({self.family})")

    def set_static_cache_tensors(self, cache, tensors: list[torch.Tensor]) -> None:
        """Put ``tensors`` (ordered as :meth:`static_cache_tensors` returns them) into ``cache`` in place of its own."""
        raise StaticCacheError(f"{type(cache).__name__} is not a recurrent cache of fixed size ({self.family})")

    @abstractmethod
    def qk_conv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of the short-convolution kernels of the q and k channels: ([Hk, d_k, W], [Hk, d_k, W]).

        None when the layer has no short convolution on q and k.
        """

    @abstractmethod
    def qk_parameters(self, layer: int) -> tuple[nn.Parameter, ...]:
        """The parameters that hold the q and k projection rows (possibly fused with others)."""

    @abstractmethod
    def _qk_rows(self, layer: int, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the q and k rows per key head in tensors shaped like ``qk_parameters`` (weights or grads)."""

    # --- surgery --------------------------------------------------------------------------

    #: Why this family's q/k channels cannot be pruned into a model its stock classes describe (None: they can).
    channel_pruning_refusal: str | None = None
    #: Why its heads cannot be removed so (None: they can).
    head_pruning_refusal: str | None = None

    def check_channel_pruning(self) -> None:
        """PruningShapeError, in one line, if the family refuses q/k channel pruning."""
        if self.channel_pruning_refusal is not None:
            raise PruningShapeError(f"{self.family}: q/k channels cannot be pruned: {self.channel_pruning_refusal}")

    def check_head_pruning(self) -> None:
        """PruningShapeError, in one line, if the family refuses head pruning."""
        if self.head_pruning_refusal is not None:
            raise PruningShapeError(f"{self.family}: heads cannot be removed: {self.head_pruning_refusal}")

    def keep_qk_channels(self, keep: dict[int, torch.Tensor]) -> None:
        """Keep, per linear layer and key head, the given q/k channels (the same for q and k).

        ``keep[layer]`` is a LongTensor [Hk, d_k'] of channel indices in [0, d_k); every layer
        keeps the same d_k' because the configuration holds one key-head dim. Layers not in
        ``keep`` are left alone only if they already have d_k' channels. Changes the model in
        place and updates its config.
        """
        self.check_channel_pruning()
        layers = self.linear_layers()
        missing = [i for i in keep if i not in layers]
        if missing:
            raise PruningShapeError(f"layers {missing} are not linear-attention layers (those are {layers})")
        kept_dims = {int(idx.shape[-1]) for idx in keep.values()}
        if len(kept_dims) != 1:
            raise PruningShapeError(f"every layer must keep the same number of q/k channels per head, got {kept_dims}")
        new_dim = kept_dims.pop()
        if new_dim < 1:
            raise PruningShapeError("at least one q/k channel per head must be kept")
        for layer in layers:
            shape = self.layer_shape(layer)
            if layer not in keep:
                if shape.head_k_dim != new_dim:
                    raise PruningShapeError(f"layer {layer} has no channel selection but d_k={shape.head_k_dim}")
                continue
            index = keep[layer].to(torch.long).cpu()
            if index.shape != (shape.num_k_heads, new_dim):
                raise PruningShapeError(
                    f"layer {layer}: expected kept channels of shape {(shape.num_k_heads, new_dim)}, "
                    f"got {tuple(index.shape)}"
                )
            if index.min() < 0 or index.max() >= shape.head_k_dim:
                raise PruningShapeError(f"layer {layer}: channel index outside [0, {shape.head_k_dim})")
            if any(len(set(row.tolist())) != new_dim for row in index):
                raise PruningShapeError(f"layer {layer}: repeated channel index within a head")
            self._keep_qk_channels(layer, index)
        self._set_head_k_dim(new_dim)

    def remove_heads(self, remove: dict[int, list[int]], per_layer: bool = False) -> None:
        """Remove whole value heads (their state, and key heads left serving none), and update the config.

        ``remove[layer]`` lists value-head indices. Every layer must end with the same head
        layout, because a stock configuration holds one count, unless ``per_layer``: layers left
        with different layouts are then described by the family's per-layer config
        (:attr:`per_layer_model_type`, see :mod:`staterank.models.varheads`). With grouped heads,
        every key head that keeps any value head must keep the same number of them (the kernels
        assume equal groups), and a key head that keeps none is removed with its q/k channels.
        """
        self.check_head_pruning()
        layers = self.linear_layers()
        layouts = set()
        plans = {}
        for layer in layers:
            shape = self.layer_shape(layer)
            removed = sorted(set(int(h) for h in remove.get(layer, [])))
            if any(h < 0 or h >= shape.num_v_heads for h in removed):
                raise PruningShapeError(f"layer {layer}: head index outside [0, {shape.num_v_heads})")
            kept_v = [h for h in range(shape.num_v_heads) if h not in removed]
            if not kept_v:
                raise PruningShapeError(f"layer {layer}: removing every head leaves no linear attention")
            per_group: dict[int, list[int]] = {}
            for h in kept_v:
                per_group.setdefault(shape.key_head_of(h), []).append(h)
            group_sizes = {len(v) for v in per_group.values()}
            if len(group_sizes) != 1:
                raise PruningShapeError(
                    f"layer {layer}: with grouped heads every remaining key head must keep the same number of "
                    f"value heads, got {sorted(len(v) for v in per_group.values())}"
                )
            kept_k = sorted(per_group)
            layouts.add((len(kept_k), len(kept_v)))
            plans[layer] = (torch.tensor(kept_k), torch.tensor(kept_v))
        if len(layouts) != 1 and not (per_layer and self.per_layer_model_type):
            support = "" if not per_layer else f"{self.family} has no per-layer head-count config, so "
            raise PruningShapeError(
                f"every layer must keep the same numbers of (key, value) heads, got {sorted(layouts)}; "
                f"{support}remove the same number of heads in every layer"
            )
        for layer, (kept_k, kept_v) in plans.items():
            if len(kept_v) < self.layer_shape(layer).num_v_heads:
                self.keep_heads(layer, kept_k, kept_v)
        if len(layouts) == 1 and not self.has_per_layer_heads():
            num_k, num_v = layouts.pop()
            self._set_head_counts(num_k, num_v)
        else:  # different counts, or a per-layer config already: its staterank_layer_heads must say the new ones
            from staterank.models.per_layer import to_per_layer_heads

            to_per_layer_heads(self.model, self)

    def has_per_layer_heads(self) -> bool:
        """Whether the model is described by a per-layer head-count config (``staterank_*`` model types)."""
        return getattr(self.config, "staterank_layer_heads", None) is not None

    @abstractmethod
    def _keep_qk_channels(self, layer: int, index: torch.Tensor) -> None:
        """Slice one layer's q/k channels to ``index`` [Hk, d_k'] (projection rows, conv channels, ...)."""

    @abstractmethod
    def keep_heads(self, layer: int, kept_k: torch.Tensor, kept_v: torch.Tensor) -> None:
        """Slice one layer to the key heads ``kept_k`` [G] and value heads ``kept_v`` [G * r'] (sorted; r' per key
        head, grouped as :meth:`remove_heads` checks). Changes that layer's modules only, not the config."""

    @abstractmethod
    def head_count_fields(self, num_k_heads: int, num_v_heads: int) -> dict[str, Any]:
        """The config fields that make the family build ``num_k_heads`` key and ``num_v_heads`` value heads per
        linear-attention layer at this model's head dims (the text config's, for multimodal configs)."""

    @abstractmethod
    def _set_head_k_dim(self, head_k_dim: int) -> None:
        """Update the config (and the modules' cached sizes) to a new key-head dim."""

    def _set_head_counts(self, num_k_heads: int, num_v_heads: int) -> None:
        """Update the config (and the modules' cached sizes) to new head counts: by default, write
        :meth:`head_count_fields` into the config that holds them (the text config of multimodal configs)."""
        config = self.config.get_text_config(decoder=True)
        for name, value in self.head_count_fields(num_k_heads, num_v_heads).items():
            setattr(config, name, value)

    # --- loading and serving (for model cards: class-level, they describe a checkpoint's model_type) -----------

    @classmethod
    def load_import(cls, model_type: str) -> tuple[str, str]:
        """What loading a ``model_type`` checkpoint with transformers needs first: the import line (with a comment
        saying why; '' when stock transformers knows the type) and a sentence for the reader."""
        if model_type == cls.per_layer_model_type:
            return (
                "import staterank  # registers the staterank_* model types (per-layer head counts) with transformers",
                "The layers keep different numbers of heads (`staterank_layer_heads` in config.json), which "
                "`import staterank` teaches transformers to build.",
            )
        return "", "Stock transformers loads it; no extra import is needed."

    @classmethod
    def serving_notes(cls, model_type: str, shapes: list[LayerShape]) -> list[str]:
        """What serving a ``model_type`` checkpoint whose linear-attention layers have ``shapes`` needs, or what
        stops it (inference engines, kernel limits): one Markdown sentence each."""
        if model_type == cls.per_layer_model_type:
            return [
                "vLLM and SGLang need one uniform head layout across layers (one `linear_key_head_dim`, one head "
                "count in the config): this model's layers keep different numbers of heads, so it is not servable "
                "there; serve it with transformers after `import staterank`."
            ]
        return []


# --- small helpers shared by the adapters ------------------------------------------------------


def slice_linear_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep the given output rows of a linear layer, in place."""
    rows = rows.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(0, rows).clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows).clone(), linear.bias.requires_grad)
    linear.out_features = int(rows.numel())


def slice_linear_columns(linear: nn.Linear, columns: torch.Tensor) -> None:
    """Keep the given input columns of a linear layer, in place."""
    columns = columns.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(1, columns).clone(), linear.weight.requires_grad)
    linear.in_features = int(columns.numel())


def slice_conv_channels(conv: nn.Conv1d, channels: torch.Tensor) -> None:
    """Keep the given channels of a depthwise convolution, in place."""
    channels = channels.to(conv.weight.device)
    conv.weight = nn.Parameter(conv.weight.data.index_select(0, channels).clone(), conv.weight.requires_grad)
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.data.index_select(0, channels).clone(), conv.bias.requires_grad)
    conv.in_channels = conv.out_channels = conv.groups = int(channels.numel())
    if hasattr(conv, "hidden_size"):
        conv.hidden_size = conv.in_channels


def slice_vector(param: nn.Parameter, index: torch.Tensor) -> nn.Parameter:
    """A new parameter holding the given entries of a per-head vector parameter."""
    return nn.Parameter(param.data.index_select(0, index.to(param.device)).clone(), param.requires_grad)


def head_channels(heads: torch.Tensor, dim: int) -> torch.Tensor:
    """Flat channel indices of whole heads of size ``dim``: heads [n] -> [n * dim]."""
    return (heads[:, None] * dim + torch.arange(dim)[None, :]).reshape(-1)


def per_head_channels(index: torch.Tensor, dim: int) -> torch.Tensor:
    """Flat channel indices of a per-head selection: index [H, d'] of channels in [0, dim) -> [H * d']."""
    heads = torch.arange(index.shape[0])[:, None]
    return (heads * dim + index).reshape(-1)
