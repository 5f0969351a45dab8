"""One data loader: corpora -> documents -> token stream -> packed fixed-length sequences.

A data spec (``--data``) is one of:

- a shipped corpus name (:data:`SHIPPED`): ``techdocs``, ``techdocs-val``, ``wikitext-test``, ...;
- a ``.txt`` file (one document), a ``.jsonl`` / ``.jsonl.gz`` / ``.jsonl.xz`` file with a ``text``
  field per line (one document per line), or a directory of those (sorted, not recursive);
- ``hf:NAME[:CONFIG][:SPLIT]``: a dataset with a ``text`` column, through the ``datasets`` library;
- ``mqar``: multi-query associative recall examples (:mod:`staterank.mqar`) in the layout of the model the
  tokenizer belongs to (its ``mqar.json``), ``seq_len`` tokens each, drawn with ``seed`` (1,024 of them, or
  ``max_tokens // seq_len``): calibration and recovery of a recall model on its own task.

Documents are tokenised with the model's tokenizer, separated by EOS and packed into
sequences of ``seq_len`` tokens; the order of documents is shuffled by ``seed`` where asked,
so every run with the same seed sees the same tokens.
"""

from __future__ import annotations

import gzip
import json
import lzma
import random
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

from staterank.errors import DataError

#: Excerpts shipped with the package (see ``staterank/corpora/README.md`` for sources and licences).
SHIPPED = {
    "techdocs": "techdocs-train.jsonl.xz",
    "techdocs-val": "techdocs-val.jsonl.xz",
    "wikitext-test": "wikitext-2-test.txt.xz",
    "wikitext-valid": "wikitext-2-valid.txt.xz",
}

MQAR = "mqar"  # the data spec of MQAR examples in a recall model's own layout
MQAR_EXAMPLES = 1024  # examples of ``--data mqar`` unless max_tokens says otherwise

_TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.xz")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.xz")


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("staterank") / "corpora" / SHIPPED[name]))


def _open_text(path: Path):
    if path.name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _file_documents(path: Path) -> Iterator[str]:
    name = path.name
    try:
        if name.endswith(_TEXT_SUFFIXES):
            with _open_text(path) as f:
                yield f.read()
        elif name.endswith(_JSONL_SUFFIXES):
            with _open_text(path) as f:
                for line_number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise DataError(f"{path}:{line_number}: no string 'text' field")
                    yield record["text"]
        else:
            raise DataError(f"{path}: unknown data format; use .txt, .jsonl, .jsonl.gz or .jsonl.xz")
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None


def _hf_documents(spec: str) -> Iterator[str]:
    parts = spec.split(":")[1:]
    if not parts or not parts[0]:
        raise DataError("hf data spec must be hf:NAME[:CONFIG][:SPLIT]")
    name, config, split = parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    try:
        import datasets
    except ImportError:
        raise DataError("hf: data needs the 'datasets' package (pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the datasets library raises many types for "not reachable / not found"
        raise DataError(f"cannot load dataset {name!r} (config {config}, split {split}): {e}") from None
    if "text" not in dataset.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {dataset.column_names})")
    yield from dataset["text"]


def read_documents(spec: str) -> Iterator[str]:
    """Documents of a data spec, in file order."""
    if spec in SHIPPED:
        yield from _file_documents(shipped_path(spec))
        return
    if spec.startswith("hf:"):
        yield from _hf_documents(spec)
        return
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(_TEXT_SUFFIXES + _JSONL_SUFFIXES))
        if not files:
            raise DataError(f"{path}: directory holds no .txt or .jsonl(.gz/.xz) files")
        for file in files:
            yield from _file_documents(file)
    elif path.is_file():
        yield from _file_documents(path)
    else:
        names = ", ".join(SHIPPED)
        raise DataError(f"{spec}: no such file or directory (or use a shipped corpus: {names}, or hf:NAME)")


def token_stream(
    spec: str,
    tokenizer,
    max_tokens: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Tokenise a corpus into one stream [N] of token ids, documents separated by EOS.

    With ``shuffle`` the document order is permuted by ``seed`` first. Reading stops once
    ``max_tokens`` tokens are collected.
    """
    documents = (doc for doc in read_documents(spec) if doc.strip())
    if shuffle:
        documents = list(documents)
        random.Random(seed).shuffle(documents)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    pieces: list[list[int]] = []
    total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(ids + [eos])
            total += len(ids) + 1
        batch.clear()

    for doc in documents:
        if max_tokens is not None and len(doc) > _CHARS_PER_TOKEN_BOUND * max_tokens:
            doc = _budget_prefix(doc, tokenizer, max_tokens - total)
        batch.append(doc)
        if len(batch) == 64 or max_tokens is not None and total + sum(map(len, batch)) >= max_tokens:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    if batch:
        flush()
    if total == 0:
        raise DataError(f"{spec}: the corpus is empty")
    stream = torch.tensor([t for piece in pieces for t in piece], dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


#: No tokenizer we meet packs more than this many characters into one token on average.
_CHARS_PER_TOKEN_BOUND = 16


def _budget_prefix(doc: str, tokenizer, needed: int) -> str:
    """A prefix of a long document that still yields its first ``needed`` tokens unchanged.

    Tokenising a whole book to keep its first thousand tokens is wasteful. A cut only changes
    the tokens of the word it splits, so a prefix whose tokens outnumber ``needed`` by a margin
    gives the same first ``needed`` tokens as the whole document.
    """
    length = _CHARS_PER_TOKEN_BOUND * max(needed, 1)
    while length < len(doc):
        prefix = doc[:length]
        if len(tokenizer([prefix], add_special_tokens=False, verbose=False)["input_ids"][0]) > needed + 16:
            return prefix
        length *= 2
    return doc


def pack(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream [N] into non-overlapping sequences [N // seq_len, seq_len] (the tail is dropped)."""
    n = stream.numel() // seq_len
    if n == 0:
        raise DataError(f"only {stream.numel()} tokens: fewer than one sequence of {seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


def load_sequences(
    spec: str,
    tokenizer,
    seq_len: int,
    max_tokens: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """Packed sequences [n, seq_len] of a corpus: the one place batches of tokens are built."""
    if spec == MQAR:
        return _mqar_sequences(tokenizer, seq_len, max_tokens, seed)
    return pack(token_stream(spec, tokenizer, max_tokens=max_tokens, shuffle=shuffle, seed=seed), seq_len)


def _mqar_sequences(tokenizer, seq_len: int, max_tokens: int | None, seed: int) -> torch.Tensor:
    from staterank import mqar

    model_dir = Path(getattr(tokenizer, "name_or_path", "") or ".")
    if not (model_dir / mqar.LAYOUT_FILE).is_file():
        raise DataError(f"--data mqar: the model ({model_dir}) has no {mqar.LAYOUT_FILE}; it is not a recall model")
    layout = mqar.read_layout(model_dir).with_shape(seq_len=seq_len)
    count = MQAR_EXAMPLES if max_tokens is None else max(1, max_tokens // seq_len)
    return mqar.examples(layout, count, seed)


def iterate_batches(sequences: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive batches [<= batch_size, seq_len] of packed sequences."""
    for start in range(0, sequences.shape[0], batch_size):
        yield sequences[start : start + batch_size]
