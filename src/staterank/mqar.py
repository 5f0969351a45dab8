"""Multi-query associative recall (MQAR, as in Zoology: Arora et al., 2023): examples, token layout, accuracy.

An example of ``seq_len`` tokens with ``pairs`` key-value pairs, then queries of keys seen earlier::

    k_1 v_1 k_2 v_2 ... k_P v_P   q_1 a_1 q_2 a_2 ... q_Q a_Q        Q = (seq_len - 2P) / 2

- token ids: 0 is ``<eos>`` and never appears; keys are ``[key_low, key_low + num_keys)`` (tokens ``k0``,
  ``k1``, ...), values ``[value_low, value_low + num_values)`` (``v0``, ``v1``, ...), ``key_low = 1`` and
  ``value_low = 1 + num_keys``;
- the context keys ``k_i`` are distinct (drawn uniformly without replacement), the values ``v_i`` are drawn
  uniformly with replacement; every query ``q_j`` is a context key drawn uniformly with replacement and
  ``a_j`` is its value;
- scored: every answer ``a_j``, predicted greedily (argmax over the whole vocabulary) from the logits at the
  position of ``q_j``: zero-based positions ``2P + 2j``, j = 0 .. Q-1. Accuracy is the share of correct
  answers over all examples and queries. Training minimises the cross-entropy of those answers only.

A model trained on it carries its :class:`Layout` in ``mqar.json`` beside its weights, so that
``staterank evaluate --tasks mqar`` (and an evaluator written elsewhere) can rebuild the examples.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from staterank.errors import StaterankError
from staterank.loading import input_device

LAYOUT_FILE = "mqar.json"


class MQARError(StaterankError):
    """An MQAR layout that cannot be built, or a model without one."""


@dataclass(frozen=True)
class Layout:
    """Where keys and values live in the vocabulary, and the shape of an example."""

    num_keys: int
    num_values: int
    pairs: int
    seq_len: int

    def __post_init__(self) -> None:
        for name in ("num_keys", "num_values", "pairs", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise MQARError(f"mqar: {name} must be a positive integer, got {value!r}")
        if self.pairs > self.num_keys:
            raise MQARError(f"mqar: {self.pairs} pairs need as many distinct keys, but there are {self.num_keys}")
        rest = self.seq_len - 2 * self.pairs
        if rest < 2 or rest % 2:
            raise MQARError(
                f"mqar: seq_len {self.seq_len} must leave an even number (at least 2) of tokens for queries after "
                f"{self.pairs} pairs ({2 * self.pairs} tokens)"
            )

    @property
    def key_low(self) -> int:
        return 1

    @property
    def value_low(self) -> int:
        return 1 + self.num_keys

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values

    @property
    def queries(self) -> int:
        return (self.seq_len - 2 * self.pairs) // 2

    def query_positions(self) -> torch.Tensor:
        """Zero-based positions ``[Q]`` of the query keys, whose logits must give the answers."""
        return 2 * self.pairs + 2 * torch.arange(self.queries)

    def with_shape(self, pairs: int | None = None, seq_len: int | None = None) -> Layout:
        """The same vocabulary with another number of pairs or sequence length."""
        return replace(self, pairs=pairs or self.pairs, seq_len=seq_len or self.seq_len)

    def to_json(self) -> dict[str, Any]:
        return {
            "task": "mqar",
            **asdict(self),
            "key_ids": [self.key_low, self.key_low + self.num_keys],  # half-open ranges
            "value_ids": [self.value_low, self.value_low + self.num_values],
            "queries": self.queries,
            "query_positions": "2 * pairs + 2 * j for j in range(queries), zero-based; the answer follows each",
        }

    @classmethod
    def from_task(cls, task: dict[str, Any], seq_len: int) -> Layout:
        """The layout of a config's ``"task"`` (``name``, ``pairs``, ``num_keys``, ``num_values``; ``examples``)."""
        known = {"name", "pairs", "num_keys", "num_values", "examples"}
        unknown = sorted(set(task) - known)
        if unknown:
            raise MQARError(f"mqar task: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        missing = sorted({"pairs", "num_keys", "num_values"} - set(task))
        if missing:
            raise MQARError(f"mqar task: missing field(s) {', '.join(missing)}")
        return cls(task["num_keys"], task["num_values"], task["pairs"], seq_len)


def read_layout(model_dir: str | os.PathLike) -> Layout:
    """The layout a model was trained on, from its ``mqar.json``."""
    path = Path(model_dir) / LAYOUT_FILE
    if not path.is_file():
        raise MQARError(f"{model_dir}: no {LAYOUT_FILE}, so no MQAR layout to evaluate (train one with a mqar task)")
    try:
        fields = json.loads(path.read_text())
        return Layout(fields["num_keys"], fields["num_values"], fields["pairs"], fields["seq_len"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise MQARError(f"{path}: not a readable MQAR layout ({e})") from None


def write_layout(directory: str | os.PathLike, layout: Layout) -> None:
    (Path(directory) / LAYOUT_FILE).write_text(json.dumps(layout.to_json(), indent=2) + "\n")


def examples(layout: Layout, n: int, seed: int) -> torch.Tensor:
    """``n`` examples ``[n, seq_len]`` of the layout, drawn from a generator seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    P, Q = layout.pairs, layout.queries
    keys = torch.rand(n, layout.num_keys, generator=generator).argsort(dim=1)[:, :P] + layout.key_low  # distinct
    values = torch.randint(0, layout.num_values, (n, P), generator=generator) + layout.value_low
    asked = torch.randint(0, P, (n, Q), generator=generator)  # which pair each query asks for
    ids = torch.empty(n, layout.seq_len, dtype=torch.long)
    ids[:, 0 : 2 * P : 2], ids[:, 1 : 2 * P : 2] = keys, values
    ids[:, 2 * P :: 2], ids[:, 2 * P + 1 :: 2] = keys.gather(1, asked), values.gather(1, asked)
    return ids


def answer_loss(logits: torch.Tensor, ids: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Mean cross-entropy of the answers, from the logits ``[B, T, V]`` at the query positions of ``ids``."""
    positions = layout.query_positions().to(ids.device)
    return F.cross_entropy(logits[:, positions].flatten(0, 1).float(), ids[:, positions + 1].flatten())


@torch.no_grad()
def accuracy(model: torch.nn.Module, layout: Layout, n: int, seed: int, batch_size: int = 64) -> float:
    """Greedy accuracy of MODEL on ``n`` examples of ``layout`` (every query of every example)."""
    return greedy_accuracy(model, examples(layout, n, seed), layout.query_positions(), batch_size)


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, inputs: torch.Tensor, positions: torch.Tensor, batch_size: int) -> float:
    """Share of ``positions`` [P] at which the argmax of the logits is the next token, over inputs [N, T]."""
    device = input_device(model)
    correct = 0
    for batch in inputs.split(batch_size):
        batch = batch.to(device)
        predicted = model(input_ids=batch).logits[:, positions].argmax(-1)  # [B, P]
        correct += int((predicted == batch[:, positions + 1]).sum())
    return correct / (inputs.shape[0] * positions.numel())


def tokenizer(layout: Layout):
    """A word-level tokenizer of the vocabulary: ``<eos>`` = 0, ``k0`` ..., then ``v0`` ...; splits at spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0}
    vocab.update({f"k{i}": layout.key_low + i for i in range(layout.num_keys)})
    vocab.update({f"v{i}": layout.value_low + i for i in range(layout.num_values)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
