"""Perplexity of a unigram model next to the bundled models', on the same tokens.

A model that learned nothing about context scores at best like the unigram model: every token
predicted by its frequency in the training tokens, add-one smoothed, (count + 1) / (N + V).
A trained language model must sit far below it. The unigram model scores exactly the tokens that
``staterank evaluate --seq-len L`` scores: the corpus cut into windows of L tokens, every token of a
window but the first.

    python benchmarks/unigram_baseline.py --train TRAIN_DATA --model tiny-deltanet --model tiny-gated-deltanet

TRAIN_DATA is the models' training corpus (the training split of the full techdocs corpus for the
bundled models); the tokenizer is the first model's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math

import torch

from staterank import api
from staterank.data import load_sequences, token_stream


def unigram_log_probs(train_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log p(token) of the add-one smoothed unigram model of ``train_tokens``: [vocab_size]."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double()
    return ((counts + 1) / (counts.sum() + vocab_size)).log()


def unigram_perplexity(log_probs: torch.Tensor, sequences: torch.Tensor) -> tuple[float, int]:
    """Perplexity of the unigram model on every token of SEQUENCES [n, L] but each window's first, and their count."""
    targets = sequences[:, 1:].flatten()
    return math.exp(-log_probs[targets].mean().item()), targets.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True, help="the models' training corpus (data spec)")
    parser.add_argument("--model", action="append", required=True, help="model directory or bundled name (repeat)")
    parser.add_argument("--eval", nargs="+", default=["techdocs-val", "wikitext-test"], help="evaluation corpora")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    models = [api.load_model(name, device=args.device) for name in args.model]
    tokenizer = models[0].tokenizer
    if any(m.tokenizer.get_vocab() != tokenizer.get_vocab() for m in models[1:]):
        parser.error("the models have different tokenizers: compare them in separate runs")
    log_probs = unigram_log_probs(token_stream(args.train, tokenizer), len(tokenizer))

    print(f"| corpus | tokens scored | unigram | {' | '.join(args.model)} |")
    print(f"| --- | ---: | ---: | {' | '.join('---:' for _ in args.model)} |")
    for data in args.eval:
        unigram, tokens = unigram_perplexity(log_probs, load_sequences(data, tokenizer, args.seq_len))
        ppls = [api.evaluate(m, data, seq_len=args.seq_len, progress=False)["ppl"] for m in models]
        print(f"| {data} | {tokens:,} | {unigram:.1f} | {' | '.join(f'{p:.2f}' for p in ppls)} |")


if __name__ == "__main__":
    main()
