"""Evaluation of a loaded model: perplexity (plain, strided, by position) and in-context recall probes.

Every function takes a :class:`~staterank.loading.LoadedModel`, runs one forward pass per batch and
returns a JSON-able dict. lm-evaluation-harness tasks live in :mod:`staterank.lm_eval_bridge`.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from staterank import distributed
from staterank.data import token_stream
from staterank.errors import DataError, StaterankError
from staterank.loading import LoadedModel, input_device
from staterank.mqar import greedy_accuracy


def windows(stream: torch.Tensor, seq_len: int, stride: int) -> torch.Tensor:
    """Windows [W, seq_len] of a token stream [N] starting every ``stride`` tokens; a partial last one is dropped."""
    if stream.numel() < seq_len:
        raise DataError(f"only {stream.numel()} tokens: fewer than one sequence of {seq_len}")
    return stream.unfold(0, seq_len, stride).contiguous()


@torch.no_grad()
def token_nll(model, batch: torch.Tensor) -> torch.Tensor:
    """NLL [B, T - 1] of each token of ``batch`` [B, T] given the tokens before it in its row."""
    logits = model(input_ids=batch).logits.float()  # [B, T, vocab]
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")


@torch.no_grad()
def perplexity(
    loaded: LoadedModel,
    data: str,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    stride: int | None = None,
) -> dict:
    """Perplexity of the model over ``data`` (read in order, truncated to ``max_tokens``).

    With ``stride`` None (or ``seq_len``) the corpus is cut into non-overlapping windows of
    ``seq_len`` tokens, each scored from its own start: the first token of a window is only an
    input, so ``tokens`` counts windows * (seq_len - 1).

    With ``stride`` < ``seq_len`` windows start every ``stride`` tokens (Hugging Face's "strided
    perplexity"): the first window scores its tokens 1..seq_len-1, every later one only its last
    ``stride`` tokens, the ones no earlier window scored. Each token is scored once, with
    seq_len - stride to seq_len - 1 tokens of context (fewer only in the first window); ``tokens``
    counts (seq_len - 1) + (windows - 1) * stride. A partial window at the end is dropped.

    In a data-parallel run every rank scores its share of the batches of windows and the NLL
    sums and token counts are added over the ranks.
    """
    if stride is not None and not 1 <= stride <= seq_len:
        raise StaterankError(f"stride must be between 1 and seq_len ({seq_len})")
    step = seq_len if stride is None else stride
    scored = min(step, seq_len - 1)  # tokens a window after the first one scores
    model = loaded.model
    device = input_device(model)
    sequences = windows(token_stream(data, loaded.tokenizer, max_tokens=max_tokens), seq_len, step)
    nll_sum, tokens = 0.0, 0
    start = time.perf_counter()
    batches = distributed.shard_batches(sequences, batch_size, "evaluation")
    shown = progress and distributed.is_main()
    bar = tqdm(total=sum(b.shape[0] for _, b in batches), unit="win", desc="ppl", disable=not shown, leave=False)
    with distributed.together():
        for index, batch in batches:
            nll = token_nll(model, batch.to(device))  # [B, seq_len - 1]
            keep = torch.zeros_like(nll, dtype=torch.bool)
            keep[:, -scored:] = True
            if index == 0:
                keep[0] = True  # the first window scores all its tokens
            nll_sum += nll[keep].sum().item()
            tokens += int(keep.sum())
            bar.update(batch.shape[0])
            if shown:
                bar.set_postfix(ppl=f"{math.exp(nll_sum / tokens):.2f}")
        bar.close()
    totals = distributed.all_reduce_sum(torch.tensor([nll_sum, tokens], dtype=torch.float64))
    nll_sum, tokens = totals[0].item(), int(totals[1])
    return {
        "ppl": math.exp(nll_sum / tokens),
        "nll": nll_sum / tokens,
        "tokens": tokens,
        "windows": int(sequences.shape[0]),
        "seq_len": seq_len,
        "stride": step,
        "seconds": time.perf_counter() - start,
    }


def position_buckets(seq_len: int, buckets: int) -> list[int]:
    """Log-spaced edges of position buckets over the predicted positions 1..seq_len-1.

    Bucket i holds the tokens at positions edges[i] <= t < edges[i + 1] of a window, a token at
    position t being predicted from t tokens of context. Edges are rounded to integers and
    duplicates dropped, so short windows get fewer than ``buckets`` buckets. Log spacing gives the
    first tokens of a window, where the loss falls fastest, their own buckets.
    """
    if buckets < 1:
        raise StaterankError("buckets must be at least 1")
    edges = np.unique(np.round(np.geomspace(1, seq_len, buckets + 1)).astype(int))
    return [int(e) for e in edges]


@torch.no_grad()
def ppl_by_position(
    loaded: LoadedModel,
    data: str,
    seq_len: int = 2048,
    buckets: int = 8,
    max_tokens: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Mean NLL and perplexity per position bucket (see :func:`position_buckets`) in non-overlapping windows.

    Returns {"bucket_edges": [K + 1], "nll": [K], "ppl": [K], "tokens": [K], "windows", "seq_len"};
    the token-weighted mean of ``nll`` is the NLL :func:`perplexity` reports for the same windows.
    """
    edges = position_buckets(seq_len, buckets)
    model = loaded.model
    device = input_device(model)
    sequences = windows(token_stream(data, loaded.tokenizer, max_tokens=max_tokens), seq_len, seq_len)
    nll_by_position = torch.zeros(seq_len - 1, dtype=torch.float64)  # index t - 1 for position t
    batches = distributed.shard_batches(sequences, batch_size, "evaluation")
    shown = progress and distributed.is_main()
    total = sum(b.shape[0] for _, b in batches)
    bar = tqdm(total=total, unit="win", desc="ppl by position", disable=not shown, leave=False)
    with distributed.together():
        for _, batch in batches:
            nll_by_position += token_nll(model, batch.to(device)).double().sum(0).cpu()
            bar.update(batch.shape[0])
        bar.close()
    distributed.all_reduce_sum(nll_by_position)  # sums over the ranks' windows
    count = sequences.shape[0]
    bounds = list(zip(edges[:-1], edges[1:], strict=True))
    tokens = [count * (hi - lo) for lo, hi in bounds]
    nll = [nll_by_position[lo - 1 : hi - 1].sum().item() / n for (lo, hi), n in zip(bounds, tokens, strict=True)]
    return {
        "bucket_edges": edges,
        "nll": nll,
        "ppl": [math.exp(x) for x in nll],
        "tokens": tokens,
        "windows": count,
        "seq_len": seq_len,
    }


def recall_vocabulary(loaded: LoadedModel, vocab_low: int = 0) -> torch.Tensor:
    """Token ids [V] the recall probes draw from: ids >= ``vocab_low`` the tokenizer and model share, not special."""
    high = min(len(loaded.tokenizer), loaded.model.config.vocab_size)
    special = set(loaded.tokenizer.all_special_ids)
    ids = torch.tensor([i for i in range(vocab_low, high) if i not in special], dtype=torch.long)
    if ids.numel() < 2:
        raise StaterankError(f"only {ids.numel()} usable token ids from {vocab_low} to {high}")
    return ids


def _sample(vocab: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Token ids of ``shape`` drawn uniformly with replacement from ``vocab`` [V]."""
    return vocab[torch.randint(0, vocab.numel(), shape, generator=generator)]


def _distinct(vocab: torch.Tensor, trials: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """[trials, n] token ids from ``vocab`` [V], distinct within each row."""
    return vocab[torch.rand(trials, vocab.numel(), generator=generator).argsort(dim=1)[:, :n]]


def _rows(prefix: list[int], *parts: torch.Tensor) -> torch.Tensor:
    """Rows [N, len(prefix) + ...]: ``prefix`` then the parts [N, *] side by side."""
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(parts[0].shape[0], -1), *parts], dim=1)


def recall(
    loaded: LoadedModel,
    *,
    num_items: tuple[int, ...] = (4, 16, 64),
    distances: tuple[int, ...] = (32, 128, 512, 2048),
    copy_len: int = 16,
    trials: int = 32,
    seed: int = 0,
    vocab_low: int = 0,
    batch_size: int = 8,
) -> dict:
    """In-context retrieval probes on random tokens: greedy accuracy, no training, one forward pass per batch.

    Tokens come from :func:`recall_vocabulary` (special tokens excluded); a BOS token, if the
    tokenizer has one, starts every sequence.

    - copy: ``copy_len`` random tokens, random filler, then the same tokens again; the second copy
      starts ``distance`` tokens after the first (so filler = distance - copy_len). Accuracy is
      over the tokens of the second copy after its first, each predicted from the one before it.
    - kv (multi-query associative recall): ``N`` pairs "key value" with distinct keys, then every
      key again in a random order, each followed by its value. Keys and values come from disjoint
      halves of the vocabulary; accuracy is over the predicted values of the queries.

    Returns {"copy": {"length", "distance": [D], "accuracy": [D], "chance"}, "kv": {"items": [K],
    "accuracy": [K], "chance"}, "trials", "seed"}; ``chance`` is 1 / the number of ids a target is drawn from.
    """
    if any(d < copy_len for d in distances) or copy_len < 2:
        raise StaterankError(f"copy_len must be >= 2 and every distance >= copy_len ({copy_len})")
    if trials < 1 or any(n < 1 for n in num_items):
        raise StaterankError("trials and num_items must be positive")
    vocab = recall_vocabulary(loaded, vocab_low)
    keys_vocab, values_vocab = vocab[::2], vocab[1::2]
    if max(num_items, default=0) > keys_vocab.numel():
        raise StaterankError(f"{max(num_items)} distinct keys need more than {vocab.numel()} usable token ids")
    bos = loaded.tokenizer.bos_token_id
    prefix = [] if bos is None else [bos]
    generator = torch.Generator().manual_seed(seed)

    copy_accuracy = []
    for distance in distances:
        tokens = _sample(vocab, (trials, copy_len), generator)
        filler = _sample(vocab, (trials, distance - copy_len), generator)
        inputs = _rows(prefix, tokens, filler, tokens)
        second = len(prefix) + distance  # index of the second copy's first token
        positions = torch.arange(second, second + copy_len - 1)  # logits there predict tokens 1.. of the copy
        copy_accuracy.append(greedy_accuracy(loaded.model, inputs, positions, batch_size))

    kv_accuracy = []
    for n in num_items:
        keys = _distinct(keys_vocab, trials, n, generator)  # [trials, n]
        values = _sample(values_vocab, (trials, n), generator)
        order = torch.rand(trials, n, generator=generator).argsort(dim=1)
        context = torch.stack([keys, values], dim=2).flatten(1)  # k1 v1 k2 v2 ...
        queries = torch.stack([keys.gather(1, order), values.gather(1, order)], dim=2).flatten(1)
        inputs = _rows(prefix, context, queries)
        positions = len(prefix) + 2 * n + 2 * torch.arange(n)  # the query keys; their logits predict values
        kv_accuracy.append(greedy_accuracy(loaded.model, inputs, positions, batch_size))

    return {
        "copy": {
            "length": copy_len,
            "distance": list(distances),
            "accuracy": copy_accuracy,
            "chance": 1 / vocab.numel(),
        },
        "kv": {"items": list(num_items), "accuracy": kv_accuracy, "chance": 1 / values_vocab.numel()},
        "trials": trials,
        "seed": seed,
    }
