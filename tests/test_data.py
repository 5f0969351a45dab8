"""The one data loader: formats, packing, determinism, bad input."""

from __future__ import annotations

import gzip
import json
import lzma

import pytest

from staterank.data import load_sequences, read_documents, token_stream
from staterank.errors import DataError


class CharTokenizer:
    """A stand-in tokenizer with the HF call signature: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def write_jsonl(path, docs, opener=open):
    with opener(path, "wt") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")


@pytest.mark.parametrize("suffix,opener", [(".jsonl", open), (".jsonl.gz", gzip.open), (".jsonl.xz", lzma.open)])
def test_jsonl_formats(tmp_path, suffix, opener):
    path = tmp_path / f"corpus{suffix}"
    write_jsonl(path, ["alpha", "beta"], opener)
    assert list(read_documents(str(path))) == ["alpha", "beta"]


def test_text_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    write_jsonl(tmp_path / "a.jsonl", ["first"])
    (tmp_path / "notes.md").write_text("ignored")
    assert list(read_documents(str(tmp_path))) == ["first", "second"]
    assert list(read_documents(str(tmp_path / "b.txt"))) == ["second"]


def test_shipped_corpora_are_readable():
    first = next(read_documents("techdocs-val"))
    assert len(first) > 100
    wikitext = next(read_documents("wikitext-test"))
    assert "@-@" in wikitext


def test_stream_separates_documents_with_eos_and_packs(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ["ab", "", "cde"])
    stream = token_stream(str(tmp_path / "c.jsonl"), CharTokenizer())
    assert stream.tolist() == [97, 98, 0, 99, 100, 101, 0]
    sequences = load_sequences(str(tmp_path / "c.jsonl"), CharTokenizer(), seq_len=3)
    assert sequences.tolist() == [[97, 98, 0], [99, 100, 101]]
    assert token_stream(str(tmp_path / "c.jsonl"), CharTokenizer(), max_tokens=4).tolist() == [97, 98, 0, 99]


def test_shuffle_is_deterministic_by_seed(tmp_path):
    docs = [chr(97 + i) * 3 for i in range(20)]
    write_jsonl(tmp_path / "d.jsonl", docs)
    spec = str(tmp_path / "d.jsonl")
    a = token_stream(spec, CharTokenizer(), shuffle=True, seed=1)
    b = token_stream(spec, CharTokenizer(), shuffle=True, seed=1)
    c = token_stream(spec, CharTokenizer(), shuffle=True, seed=2)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    assert sorted(a.tolist()) == sorted(token_stream(spec, CharTokenizer()).tolist())


def test_bad_data(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        token_stream(str(tmp_path / "empty.txt"), CharTokenizer())
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no string 'text' field"):
        list(read_documents(str(tmp_path / "notext.jsonl")))
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="not valid JSON"):
        list(read_documents(str(tmp_path / "broken.jsonl")))
    (tmp_path / "corrupt.jsonl.xz").write_bytes(b"not xz at all")
    with pytest.raises(DataError, match="cannot read"):
        list(read_documents(str(tmp_path / "corrupt.jsonl.xz")))
    (tmp_path / "table.csv").write_text("a,b")
    with pytest.raises(DataError, match="unknown data format"):
        list(read_documents(str(tmp_path / "table.csv")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no"):
        list(read_documents(str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="fewer than one sequence"):
        load_sequences("wikitext-test", CharTokenizer(), seq_len=10, max_tokens=5)
