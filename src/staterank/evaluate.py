"""Evaluation: perplexity over non-overlapping windows (more tasks arrive with the recovery work)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from staterank.data import iterate_batches, load_sequences
from staterank.loading import LoadedModel


@torch.no_grad()
def perplexity(
    loaded: LoadedModel,
    data: str,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Perplexity of the model over ``data`` cut into non-overlapping windows of ``seq_len`` tokens.

    Every window is scored from its own start (no context carried across windows), so the
    first token of each window is only an input: ``tokens`` counts the predicted ones,
    windows * (seq_len - 1). The corpus is read in order, truncated to ``max_tokens``.
    """
    model = loaded.model
    device = next(model.parameters()).device
    sequences = load_sequences(data, loaded.tokenizer, seq_len, max_tokens=max_tokens)
    nll_sum, tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=sequences.numel(), unit="tok", desc="ppl", disable=not progress, leave=False)
    for batch in iterate_batches(sequences, batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()  # [B, T, vocab]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll_sum += nll.item()
        tokens += batch[:, 1:].numel()
        bar.update(batch.numel())
        bar.set_postfix(ppl=f"{math.exp(nll_sum / tokens):.2f}")
    bar.close()
    return {
        "ppl": math.exp(nll_sum / tokens),
        "nll": nll_sum / tokens,
        "tokens": tokens,
        "windows": int(sequences.shape[0]),
        "seq_len": seq_len,
        "seconds": time.perf_counter() - start,
    }
