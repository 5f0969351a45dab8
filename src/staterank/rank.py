"""How much of its recurrent state each head uses: states along a sequence, their spectra, and head groups.

The state of a value head after t tokens is the d_k x d_v matrix of the delta rule (see
:mod:`staterank.models.base`). Its singular values say how many directions the head actually
writes to; comparing heads by those numbers splits them into a low-rank group (candidates for a
smaller d_k) and a high-rank group, and comparing positions says how early that split is settled.

Everything here is a pure function on tensors; nothing touches a model.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch

from staterank.backends import chunk_delta_rule_torch, delta_rule_states_torch
from staterank.backends.rwkv7 import dplr_states
from staterank.models import HeadFeatures


def _checked_positions(positions: Sequence[int], seq_len: int) -> list[int]:
    """``positions`` as Python ints, or ValueError unless they are sorted, unique and within [1, seq_len]."""
    try:
        checked = [operator.index(t) for t in positions]
    except TypeError as error:
        raise ValueError(f"positions must be integers, got {list(positions)!r}") from error
    if not checked:
        raise ValueError("positions must not be empty")
    if any(b <= a for a, b in zip(checked[:-1], checked[1:], strict=True)):
        raise ValueError(f"positions must be sorted ascending without repeats, got {checked}")
    if checked[0] < 1 or checked[-1] > seq_len:
        raise ValueError(f"positions count tokens and must lie in [1, {seq_len}] (the sequence length), got {checked}")
    return checked


def states_at(
    features: HeadFeatures,
    positions: Sequence[int],
    chunk_size: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The recurrent state of every value head after ``t`` tokens, for each ``t`` in ``positions``.

    Args:
        features: one layer's delta-rule inputs (q, k before the L2 norm ``[B, T, Hk, d_k]``, v ``[B, T, Hv, d_v]``,
            beta ``[B, T, Hv]``, log decay ``[B, T, Hv]`` or, per key channel (KDA), ``[B, T, Hv, d_k]``).
        positions: token counts, sorted ascending and unique, in ``[1, T]``; ``T`` gives the final state.
        chunk_size: tokens per chunk of the chunked delta rule.
        dtype: computation and result dtype (float32, or float64 for exact comparisons).

    Returns:
        ``[P, B, Hv, d_k, d_v]``, one state per position.

    RWKV-7's diagonal-plus-low-rank rule (``features.dplr``) gives the states at the chunk starts in the WY form,
    then each position's remaining tokens one by one (:func:`staterank.backends.rwkv7.dplr_states`). With one
    decay per head (or none) the states come from one chunked pass that computes no outputs
    (:func:`staterank.backends.delta_rule_states_torch`). A per-channel decay (KDA, GLA) cuts the sequence at the
    requested positions instead and runs each segment through the chunked rule with the previous segment's final
    state as its initial state (one pass plus one partial chunk per position), in chunks of at most 32, whose
    pairwise per-channel ratios stay small.
    """
    seq_len = features.q.shape[1]
    positions = _checked_positions(positions, seq_len)
    if features.dplr is not None:  # RWKV-7: chunk starts, then the remaining tokens; no outputs
        k, v, a, b, log_decay = (x.to(dtype) for x in (features.k, features.v, *features.dplr, features.log_decay))
        return dplr_states(k, v, a, b, log_decay, positions)
    steps = features.k.shape[1] // seq_len  # delta steps per token: Gated DeltaProduct's num_householder, else 1
    k, v, beta = (x.to(dtype) for x in (features.k, features.v, features.beta))
    log_decay = None if features.log_decay is None else features.log_decay.to(dtype)
    if log_decay is None or log_decay.ndim == 3:
        return delta_rule_states_torch(
            k, v, beta, log_decay, [t * steps for t in positions],
            use_qk_l2norm=features.qk_l2norm, chunk_size=chunk_size, delta_rule=features.delta_rule,
        )  # fmt: skip

    # per key channel: [B, T, Hv, d_k]; q feeds only the outputs, which are discarded here
    chunk_size = min(chunk_size, 32)
    states = []
    state = None
    start = 0
    for end in positions:
        segment = slice(start * steps, end * steps)
        _, state = chunk_delta_rule_torch(
            k[:, segment], k[:, segment], v[:, segment], beta[:, segment], log_decay[:, segment],
            initial_state=state,
            output_final_state=True,
            chunk_size=min(chunk_size, (end - start) * steps),  # a short segment needs no padding to a full chunk
            use_qk_l2norm=features.qk_l2norm,
            delta_rule=features.delta_rule,
        )
        states.append(state)
        start = end
    return torch.stack(states)


def singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values ``[..., min(m, n)]``, descending, of a batch of matrices ``[..., m, n]``, on their device.

    Computed by LAPACK's divide-and-conquer SVD on the CPU (inputs on a GPU included), one chunk of the batch
    per thread, each LAPACK call single-threaded: torch's batched SVD runs its matrices one after another, and
    MKL's own threads only slow such small matrices down (on 2 cores, 1,152 states of 128 x 128 take 0.98 s in
    one call with 2 MKL threads, 0.65 s with 1, and 0.32 s in two threads of one). The GPU is no faster: for
    matrices larger than 32 x 32 torch makes one cuSOLVER call per matrix, for its SVD and for its symmetric
    eigensolver alike (on an H200, 4,608 states of 128 x 128, one sample at fla-hub's 1.3B shapes, took 2.97 s
    through float64 Gram matrices and ``eigvalsh`` against 0.58 s here), and cuSOLVER's batched ``gesvda``
    failed to converge on such states (error 77: rank-deficient, repeated zero singular values).
    """
    count = matrices[..., 0, 0].numel()
    workers = max(1, min(torch.get_num_threads(), count // 64))
    # the LAPACK calls release the GIL: one chunk of the batch per thread (:class:`HostSingularValues`)
    with HostSingularValues(workers, chunk=max(1, -(-count // workers))) as host:
        sigma = host.submit(matrices)()
    return sigma.to(matrices.device)


def singular_values_of(batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`singular_values` of several batches of matrices at once, e.g. every layer's states of a sample.

    Batches whose matrices have the same shape go through one threaded call, so that many small batches (one
    layer's states: 12 positions x 16 heads at fla-hub's 1.3B shapes) still use every thread; the result is the
    list of each batch's singular values, as :func:`singular_values` would give them one by one.
    """
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, matrices in enumerate(batches):
        by_shape.setdefault(tuple(matrices.shape[-2:]), []).append(i)
    result: list[torch.Tensor] = [torch.empty(0)] * len(batches)
    for indices in by_shape.values():
        flat = [batches[i].reshape(-1, *batches[i].shape[-2:]) for i in indices]
        sigma = singular_values(torch.cat(flat) if len(flat) > 1 else flat[0])
        for i, part in zip(indices, sigma.split([len(f) for f in flat]), strict=True):
            result[i] = part.reshape(*batches[i].shape[:-2], -1)
    return result


class HostSingularValues:
    """Singular values taken by LAPACK on host threads while the caller goes on (e.g. with the next layer).

    Use as a context manager; :meth:`submit` starts the copy of a batch of matrices to the host (into
    page-locked memory, without waiting, for matrices on a GPU: a pageable copy ran at 1.5 GB/s on an H200's
    host) and queues its singular values in chunks of ``chunk`` matrices, one single-threaded LAPACK call each
    (see :func:`singular_values` for why); it returns a function that waits for them and gives
    ``[..., min(m, n)]`` on the host, as :func:`singular_values` would. ``workers`` defaults to one thread
    fewer than torch's, the caller's thread keeping the GPU busy.
    """

    def __init__(self, workers: int | None = None, chunk: int = 64):
        self.workers = workers or max(1, torch.get_num_threads() - 1)
        self.chunk = chunk
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> HostSingularValues:
        # torch's thread count is per thread (OpenMP): the workers' LAPACK calls run on one thread each
        self._pool = ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads, initargs=(1,))
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def submit(self, matrices: torch.Tensor):
        if self._pool is None:
            raise RuntimeError("HostSingularValues.submit outside its with block")
        matrices = matrices.detach()
        copied = None
        if matrices.device.type == "cuda":
            host = torch.empty(matrices.shape, dtype=matrices.dtype, pin_memory=True)
            host.copy_(matrices, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host = matrices.cpu()
        shape = host.shape

        def svdvals(part: torch.Tensor) -> torch.Tensor:
            if copied is not None:
                copied.synchronize()
            return torch.linalg.svdvals(part)

        futures = [self._pool.submit(svdvals, part) for part in host.reshape(-1, *shape[-2:]).split(self.chunk)]

        def result() -> torch.Tensor:
            return torch.cat([future.result() for future in futures]).reshape(*shape[:-2], min(shape[-2:]))

        return result


def spectral_metrics(states: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Rank measures of a batch of states from their singular values sigma_1 >= sigma_2 >= ... >= 0.

    Args:
        states: ``[..., d_k, d_v]``, float32 or float64 (lower precisions are promoted to float32).
        eps: relative threshold of the effective rank.

    Returns:
        :func:`metrics_from_singular_values` of the states' singular values.
    """
    if states.ndim < 2:
        raise ValueError(f"states must be matrices [..., d_k, d_v], got shape {tuple(states.shape)}")
    states = states.to(torch.promote_types(states.dtype, torch.float32))
    return metrics_from_singular_values(singular_values(states).to(states.dtype), eps)


def metrics_from_singular_values(sigma: torch.Tensor, eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Rank measures from singular values ``[..., r]``, descending (see :func:`spectral_metrics`).

    Returns:
        A dict of tensors ``[...]`` on the singular values' device and in their dtype, so that
        metrics stack and average alike:

        - ``effective_rank``: #{i : sigma_i > eps * sigma_1} (a whole number);
        - ``stable_rank``: ||S||_F^2 / sigma_1^2, a continuous lower bound of the rank;
        - ``rank_utilization``: stable_rank / min(d_k, d_v), in [0, 1];
        - ``entropy_rank``: exp(-sum_i p_i log p_i) with p_i = sigma_i / sum_j sigma_j (0 log 0 = 0);
        - ``nuclear_norm``: sum_i sigma_i;

        every one 0 for an all-zero state; and ``singular_values`` ``[..., r]`` themselves.
    """
    top = sigma[..., 0]
    nonzero = top > 0
    # Dividing by 1 where the state is zero keeps the ratios finite; torch.where then sets them to 0.
    safe_top = torch.where(nonzero, top, torch.ones_like(top))
    nuclear = sigma.sum(-1)
    p = sigma / torch.where(nonzero, nuclear, torch.ones_like(nuclear))[..., None]
    entropy = -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0
    stable = torch.where(nonzero, sigma.square().sum(-1) / safe_top.square(), torch.zeros_like(top))
    return {
        # sigma_i > eps * 0 never holds, so a zero state gets rank 0 without a special case.
        "effective_rank": (sigma > eps * top[..., None]).sum(-1).to(sigma.dtype),
        "stable_rank": stable,
        "rank_utilization": stable / sigma.shape[-1],
        "entropy_rank": torch.where(nonzero, entropy.exp(), torch.zeros_like(top)),
        "nuclear_norm": nuclear,
        "singular_values": sigma,
    }


@dataclass
class GroupSplit:
    """Heads split into a low- and a high-rank group by one threshold: a head is high iff its value > threshold."""

    high: torch.Tensor  # [n] bool
    threshold: float  # midway between the largest low value and the smallest high value
    gap: float  # smallest high value minus largest low value (0 when there is no high group)
    method: str


def split_groups(values: torch.Tensor) -> GroupSplit:
    """Split heads into two groups along one measure (e.g. each head's stable rank), Otsu's way.

    The values are sorted and every cut between two distinct consecutive values is tried; the chosen
    cut maximises the between-group variance n_low n_high (mean_high - mean_low)^2 / n^2, which is
    the same as minimising the summed within-group squared deviations (two-class Jenks natural
    breaks). The search is exhaustive and deterministic: among equally good cuts the lowest wins.
    Equal values never end up in different groups.

    With fewer than two distinct values (n < 2, or all equal) there is nothing to split: every head
    is low, ``gap`` is 0 and ``threshold`` is the largest value (+inf when there are none).

    Args:
        values: ``[n]``, finite.

    Returns:
        A :class:`GroupSplit` with ``high`` ``[n]`` on the values' device.
    """
    if values.ndim != 1:
        raise ValueError(f"values must be one-dimensional [n], got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values must be finite to be split into groups")
    x = values.detach().cpu().double()
    high = torch.zeros(x.shape, dtype=torch.bool)
    n = x.numel()
    if n == 0 or x.min() == x.max():
        threshold = float(x.max()) if n else math.inf
        return GroupSplit(high.to(values.device), threshold, 0.0, "otsu")

    ordered, order = x.sort()
    n_low = torch.arange(1, n, dtype=torch.float64)  # cut i keeps ordered[:i] low, i = 1 .. n-1
    sum_low = ordered.cumsum(0)[:-1]
    mean_low = sum_low / n_low
    mean_high = (ordered.sum() - sum_low) / (n - n_low)
    between = n_low * (n - n_low) * (mean_high - mean_low).square() / n**2
    # A cut inside a run of equal values would separate identical heads: never choose one.
    between[ordered[1:] == ordered[:-1]] = -1.0
    cut = int(between.argmax()) + 1
    high[order[cut:]] = True
    lower, upper = float(ordered[cut - 1]), float(ordered[cut])
    return GroupSplit(high.to(values.device), (lower + upper) / 2, upper - lower, "otsu")


def decided_at(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head, the first position index from which its group (value > threshold) stays as it ends.

    Args:
        values: ``[P, n]``, one row per position (in order), one column per head.
        threshold: the group boundary (e.g. :attr:`GroupSplit.threshold`); a value equal to it is low.

    Returns:
        LongTensor ``[n]`` of row indices in ``[0, P)``: 0 when a head is in its final group at
        every position, ``P - 1`` when it only gets there at the last.
    """
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"values must be [P, n] with P >= 1, got shape {tuple(values.shape)}")
    group = values > threshold
    changed = group != group[-1]
    index = torch.arange(values.shape[0], device=values.device)[:, None]
    # The last row still in another group, or -1 when none is; the head is decided one row later.
    last_other = torch.where(changed, index, torch.full_like(index, -1)).amax(0)
    return last_other + 1


def _numpy(x: torch.Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double()
    return np.asarray(x, dtype=np.float64)


def spearman(a: torch.Tensor | np.ndarray | Sequence[float], b: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (ties get average ranks).

    nan when either is constant (or shorter than 2), where the correlation is undefined; scipy would
    warn and return nan too, but a constant head ranking is an expected case here, not a problem.
    """
    a, b = _numpy(a).ravel(), _numpy(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs equally long inputs, got {a.size} and {b.size}")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(scipy.stats.spearmanr(a, b).statistic)


def mean_pairwise_spearman(per_sample: torch.Tensor | np.ndarray) -> float:
    """Mean Spearman correlation over all pairs of samples: how consistently samples rank the heads.

    Args:
        per_sample: ``[S, n]``, one head measure per sample.

    Returns:
        The mean of :func:`spearman` over the S (S - 1) / 2 pairs of rows, leaving out pairs with a
        constant row (their correlation is undefined); nan when S < 2 or no pair is defined.

    The pairs are computed at once as Pearson correlations of average ranks, which is exactly
    Spearman's coefficient, so large S is cheap.
    """
    x = _numpy(per_sample)
    if x.ndim != 2:
        raise ValueError(f"per_sample must be [S, n], got shape {x.shape}")
    ranks = scipy.stats.rankdata(x, axis=1)
    centred = ranks - ranks.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    varying = np.flatnonzero(norms > 0)
    if varying.size < 2:
        return math.nan
    unit = centred[varying] / norms[varying, None]
    correlations = (unit @ unit.T)[np.triu_indices(varying.size, k=1)]
    return float(correlations.mean())


def log_positions(seq_len: int, count: int = 12) -> list[int]:
    """About ``count`` token counts spaced evenly in log scale over [1, seq_len]: where to look at states.

    The grid is ``round(seq_len ** (i / (count - 1)))`` for i = 0 .. count-1, deduplicated, so it
    always starts at 1 (for count >= 2), ends at ``seq_len``, and has fewer than ``count`` entries
    when ``seq_len`` is too short to hold that many distinct log-spaced integers.
    """
    if seq_len < 1 or count < 1:
        raise ValueError(f"seq_len and count must be positive, got seq_len={seq_len}, count={count}")
    if count == 1:
        return [seq_len]
    grid = np.rint(np.geomspace(1, seq_len, count)).astype(np.int64)
    # geomspace pins both ends, but guard the last one against rounding all the same.
    grid[-1] = seq_len
    return [int(t) for t in np.unique(grid)]
