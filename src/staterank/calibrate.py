"""Calibration: forward (and backward) passes that stream sufficient statistics per layer and head.

Nothing here keeps activations: every statistic is a running sum whose size depends on the model
only (d_k x d_k Gram matrices per head, one vector per layer input), so peak memory does not grow
with the number of calibration tokens. Strong RRQR needs only the R factor of the stacked feature
matrix M, and R^T R = M^T M, so it runs on a factor of the accumulated Gram matrix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from staterank import distributed
from staterank.errors import StaterankError
from staterank.loading import input_device
from staterank.models import HeadFeatures, ModelAdapter


class CalibrationError(StaterankError):
    """Calibration data that produce unusable statistics (NaN or Inf features)."""


@dataclass
class LayerStats:
    """Running sums over calibration tokens for one linear-attention layer (float64).

    q and k are the features the delta rule receives before its L2 norm (after the short
    convolution and activation), per key head; ``*_normed`` are the same after the L2 norm.
    """

    layer: int
    tokens: int = 0
    gram_q: torch.Tensor | None = None  # [Hk, d_k, d_k]  sum_t q_t q_t^T
    gram_k: torch.Tensor | None = None  # [Hk, d_k, d_k]  sum_t k_t k_t^T
    gram_q_normed: torch.Tensor | None = None  # [Hk, d_k, d_k]  of q_t / |q_t|
    gram_k_normed: torch.Tensor | None = None  # [Hk, d_k, d_k]  of k_t / |k_t|
    input_sq: torch.Tensor | None = None  # [hidden]  sum_t x_t^2, x the input of the q/k projections
    taylor_q: torch.Tensor | None = None  # [Hk, d_k]  sum over batches of sum_j |W_q ⊙ dL/dW_q| per row
    taylor_k: torch.Tensor | None = None  # [Hk, d_k]
    grad_batches: int = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        """Add to a running sum, kept in float64 on the value's device until :meth:`to_cpu`."""
        value = value.detach().to(torch.float64)
        current = getattr(self, name)
        setattr(self, name, value if current is None else current.add_(value))

    def all_reduce(self) -> None:
        """Sum the statistics over the ranks of a data-parallel run (every rank ends with the totals)."""
        counts = torch.tensor([self.tokens, self.grad_batches], dtype=torch.float64)
        self.tokens, self.grad_batches = (int(c) for c in distributed.all_reduce_sum(counts).tolist())
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                distributed.all_reduce_sum(value)

    def to_cpu(self) -> None:
        for name, value in list(vars(self).items()):
            if isinstance(value, torch.Tensor):
                setattr(self, name, value.cpu())


@dataclass
class Calibration:
    """Statistics of every linear-attention layer, and how they were gathered."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def __getitem__(self, layer: int) -> LayerStats:
        return self.layers[layer]


def _l2_normalise(x: torch.Tensor) -> torch.Tensor:
    """As the kernels do: x / sqrt(|x|^2 + 1e-6)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d] -> sum over B, T of x x^T per head: [H, d, d] (accumulated in float64)."""
    x = x.double().flatten(0, 1)  # [N, H, d]
    return torch.einsum("nhi,nhj->hij", x, x)


def _check_finite(features: HeadFeatures) -> None:
    for name in ("q", "k"):
        values = getattr(features, name)
        bad = ~torch.isfinite(values).flatten(0, 1).all(dim=(0, 2))  # [H]
        if bad.any():
            heads = bad.nonzero().flatten().tolist()
            raise CalibrationError(
                f"layer {features.layer}, head(s) {heads}: NaN or Inf in the {name} features of the calibration "
                "data; check the model's weights and dtype (try float32)"
            )


def calibrate(
    adapter: ModelAdapter,
    sequences: torch.Tensor,
    batch_size: int = 4,
    gradients: bool = False,
    progress: bool = True,
) -> Calibration:
    """Stream the statistics of ``sequences`` [n, seq_len] through the model.

    With ``gradients`` every batch also runs backward on the language-model loss and adds
    |W ⊙ dL/dW| of the q/k projection rows (the first-order Taylor score).

    In a data-parallel run every rank streams its share of the batches
    (:func:`~staterank.distributed.shard_batches`) and the sums are added over the ranks, so
    every rank returns the statistics of all of ``sequences``.
    """
    model = adapter.model
    device = input_device(model)
    result = Calibration({layer: LayerStats(layer) for layer in adapter.linear_layers()})

    def collect(features: HeadFeatures) -> None:
        with torch.no_grad():
            _check_finite(features)
            stats = result.layers[features.layer]
            q, k = features.q.float(), features.k.float()
            stats.add("gram_q", _gram(q))
            stats.add("gram_k", _gram(k))
            stats.add("gram_q_normed", _gram(_l2_normalise(q)))
            stats.add("gram_k_normed", _gram(_l2_normalise(k)))
            stats.add("input_sq", features.hidden.double().pow(2).sum(dim=(0, 1)))
            stats.tokens += q.shape[0] * q.shape[1]

    start = time.perf_counter()
    batches = [batch for _, batch in distributed.shard_batches(sequences, batch_size, "calibration")]
    was_training = model.training
    model.eval()
    bar = tqdm(
        total=sum(batch.numel() for batch in batches),
        unit="tok",
        unit_scale=True,
        desc="calibrate",
        disable=not progress or not distributed.is_main(),
    )
    with distributed.together():  # a failure on one rank (NaN features) stops every rank
        try:
            for batch in batches:
                batch = batch.to(device)
                if gradients:
                    model.zero_grad(set_to_none=True)
                    with adapter.tap(collect):
                        logits = model(input_ids=batch).logits
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                    loss.backward()
                    with torch.no_grad():
                        for layer, stats in result.layers.items():
                            for name, weight, grad in zip(
                                ("taylor_q", "taylor_k"),
                                adapter.qk_weights(layer),
                                adapter.qk_grads(layer),
                                strict=True,
                            ):
                                stats.add(name, (weight.float() * grad.float()).abs().sum(-1))
                            stats.grad_batches += 1
                else:
                    with torch.no_grad(), adapter.tap(collect):
                        model(input_ids=batch)
                bar.update(batch.numel())
        finally:
            bar.close()
            model.zero_grad(set_to_none=True)
            model.train(was_training)
    result.tokens = sequences.numel()
    for stats in result.layers.values():
        stats.all_reduce()
        stats.to_cpu()
    result.seconds = time.perf_counter() - start
    if not math.isfinite(result.seconds) or result.tokens == 0:
        raise CalibrationError("no calibration tokens")
    return result
