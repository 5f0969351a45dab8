"""staterank.train and staterank.tokenizer on CPU, with models small enough to train in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from reference import MINI_MODELS
from transformers import AutoModelForCausalLM, AutoTokenizer

from staterank.errors import DataError, OutputExistsError, StaterankError, UnsupportedModelError
from staterank.tokenizer import ENDOFTEXT, train_tokenizer
from staterank.train import train

# Few steps on a few tokens; a high learning rate so that a dozen steps visibly lower the loss.
QUICK = {
    "batch_size": 4,
    "seq_len": 32,
    "lr": 1e-2,
    "warmup_steps": 2,
    "max_train_tokens": 20_000,
    "val_tokens": 2048,
}


def write_config(path, model_type: str, **train_section) -> str:
    config = {**MINI_MODELS[model_type], "intermediate_size": 64, "tie_word_embeddings": True}
    if train_section:
        config["train"] = train_section
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small tokenizer trained once for the tests that don't test tokenizer training itself."""
    directory = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer("techdocs", vocab_size=300).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("model_type", sorted(MINI_MODELS))
def test_train_lowers_the_loss_and_saves_a_loadable_model(tmp_path, model_type):
    config = write_config(tmp_path / "config.json", model_type, vocab_size=300)  # the tokenizer is trained here
    out = tmp_path / "model"
    summary = train(config, "techdocs", out, steps=12, val_data="techdocs-val", val_every=4, progress=False, **QUICK)

    losses = [v["loss"] for v in summary["val_history"]]
    assert [v["step"] for v in summary["val_history"]] == [4, 8, 12]
    assert losses[-1] < losses[0] < torch.log(torch.tensor(300.0)).item() + 0.5
    assert summary["tokens_seen"] == 12 * 4 * 32 and summary["finished"]
    assert summary["params"] == sum(p.numel() for p in summary["model"].parameters())
    written = json.loads((out / "training.json").read_text())
    assert written["tokens_seen"] == summary["tokens_seen"] and "model" not in written
    assert not (out / "checkpoint").exists()

    import fla  # noqa: F401  (registers fla's model classes with the Auto classes)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == loaded.config.vocab_size == 300
    ids = tokenizer("The kernel schedules tasks on every CPU.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, summary["model"](input_ids=ids).logits)


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, tokenizer_dir):
    config = write_config(tmp_path / "config.json", "delta_net", tokenizer=tokenizer_dir, **QUICK)
    whole = train(config, "techdocs", tmp_path / "whole", steps=6, progress=False)

    out = tmp_path / "resumed"
    half = train(config, "techdocs", out, steps=6, stop_after=3, progress=False)
    assert not half["finished"] and half["steps"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint"]
    with pytest.raises(OutputExistsError, match="--resume"):
        train(config, "techdocs", out, steps=6, progress=False)
    with pytest.raises(StaterankError, match="different options"):
        train(config, "techdocs", out, steps=7, resume=True, progress=False)
    resumed = train(config, "techdocs", out, steps=6, resume=True, progress=False)

    assert resumed["finished"] and resumed["tokens_seen"] == whole["tokens_seen"]
    expected = whole["model"].state_dict()
    for name, tensor in resumed["model"].state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_tokenizer_round_trips_text_and_is_deterministic(tmp_path):
    documents = ["def f(x):\n    return x ** 2  # square\n", "Ünïcödé, emoji 🚀 and\ttabs   and spaces."] * 20
    tokenizer = train_tokenizer(documents, vocab_size=300)
    again = train_tokenizer(documents, vocab_size=300)
    assert tokenizer.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == ENDOFTEXT

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in [*documents[:2], "never seen: 語 ∑ \x00 \r\n", ""]:
        ids = reloaded(text, add_special_tokens=False)["input_ids"]
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert reloaded.decode(ids) == text


def test_bad_input_is_a_clear_error(tmp_path, tokenizer_dir):
    good = write_config(tmp_path / "good.json", "delta_net", tokenizer=tokenizer_dir)
    with pytest.raises(StaterankError, match="no such config file"):
        train(tmp_path / "missing.json", "techdocs", tmp_path / "out")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(StaterankError, match="not valid JSON"):
        train(tmp_path / "broken.json", "techdocs", tmp_path / "out")
    (tmp_path / "untyped.json").write_text(json.dumps({"hidden_size": 32}))
    with pytest.raises(StaterankError, match="model_type"):
        train(tmp_path / "untyped.json", "techdocs", tmp_path / "out")
    (tmp_path / "unknown.json").write_text(json.dumps({"model_type": "mamba9"}))
    with pytest.raises(UnsupportedModelError, match="mamba9"):
        train(tmp_path / "unknown.json", "techdocs", tmp_path / "out")
    (tmp_path / "typo.json").write_text(json.dumps({"model_type": "delta_net", "train": {"stpes": 5}}))
    with pytest.raises(StaterankError, match="stpes"):
        train(tmp_path / "typo.json", "techdocs", tmp_path / "out")
    with pytest.raises(StaterankError, match="batch_size"):
        train(good, "techdocs", tmp_path / "out", batch_size=0)

    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty"):
        train(good, str(tmp_path / "empty.txt"), tmp_path / "out")
    untokenized = write_config(tmp_path / "untokenized.json", "delta_net", vocab_size=300)
    with pytest.raises(DataError, match="no text"):
        train(untokenized, str(tmp_path / "empty.txt"), tmp_path / "out")
    with pytest.raises(StaterankError, match="no checkpoint"):
        train(good, "techdocs", tmp_path / "out", resume=True)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError):
        train(good, "techdocs", tmp_path / "taken")
