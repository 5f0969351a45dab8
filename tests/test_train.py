"""staterank.training (pretraining, the loop) and staterank.tokenizer on CPU, with models that train in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from reference import MINI_MODELS
from transformers import AutoModelForCausalLM, AutoTokenizer

from staterank.errors import DataError, OutputExistsError, StaterankError, UnsupportedModelError
from staterank.tokenizer import ENDOFTEXT, train_tokenizer
from staterank.training.loop import backward, mixed_precision, next_token_loss, train_loop
from staterank.training.pretrain import train

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


def _toy_lm() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50))


def _toy_loss(model, batch):
    return {"loss": next_token_loss(model(batch), batch), "twice": 2 * next_token_loss(model(batch), batch)}


def test_micro_batches_add_up_to_the_gradient_and_the_loss_of_the_whole_batch():
    batch = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(0))
    whole = _toy_lm()
    expected = next_token_loss(whole(batch), batch)  # the mean over all 8 x 11 predicted tokens
    expected.backward()
    micro = _toy_lm()
    losses = backward(micro, _toy_loss, batch, 3, mixed_precision(torch.device("cpu")))  # rows 3, 3 and 2
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses["twice"].item() == pytest.approx(2 * expected.item(), rel=1e-6)
    for p, q in zip(whole.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)


def test_micro_batches_take_the_steps_of_the_whole_batch(tmp_path):
    """Gradient accumulation in the loop: micro-batches of 3, 3 and 2 rows give the weights of batches of 8."""
    sequences = torch.randint(0, 50, (16, 12), generator=torch.Generator().manual_seed(0))
    options = {"steps": 4, "batch_size": 8, "lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 0.1, "grad_clip": 0.5,
               "seed": 0}  # fmt: skip

    def run(micro_batch_size):
        model = _toy_lm()
        groups = [{"params": list(model.parameters()), "weight_decay": 0.1}]
        state = train_loop(model, _toy_loss, groups, sequences, options, (), tmp_path / "checkpoint",
                           micro_batch_size=micro_batch_size, progress=False)  # fmt: skip
        return model, state

    whole, whole_state = run(None)
    micro, micro_state = run(3)
    assert micro_state.finished and micro_state.tokens_seen == whole_state.tokens_seen == 4 * 8 * 12
    assert micro_state.final_loss == pytest.approx(whole_state.final_loss, rel=1e-6)
    for (name, p), q in zip(whole.named_parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert not (tmp_path / "checkpoint").exists()  # save_every 0 and no early stop: no checkpoint
