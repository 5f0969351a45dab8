"""MQAR: examples against their definition read back by a loop, accuracy against an oracle and against models that
cannot recall, the training task's refusals, and the bundled recall models under `staterank evaluate --tasks mqar`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from reference import tiny_config
from transformers import AutoModelForCausalLM

from staterank import api, mqar
from staterank.cli import main
from staterank.loading import bundled_path, prepare_runtime

LAYOUT = mqar.Layout(num_keys=20, num_values=12, pairs=6, seq_len=30)


def test_examples_follow_the_layout():
    ids = mqar.examples(LAYOUT, 50, seed=3)
    assert ids.shape == (50, 30) and ids.dtype == torch.long
    P = LAYOUT.pairs
    for row in ids.tolist():
        context = dict(zip(row[0 : 2 * P : 2], row[1 : 2 * P : 2], strict=True))
        assert len(context) == P  # distinct keys
        assert all(1 <= k <= 20 for k in context) and all(21 <= v <= 32 for v in context.values())
        queries = list(zip(row[2 * P :: 2], row[2 * P + 1 :: 2], strict=True))
        assert len(queries) == LAYOUT.queries == 9
        assert all(context[q] == a for q, a in queries)  # every query is a context key, answered by its value
    assert LAYOUT.query_positions().tolist() == [12 + 2 * j for j in range(9)]
    assert torch.equal(ids, mqar.examples(LAYOUT, 50, seed=3)) and not torch.equal(ids, mqar.examples(LAYOUT, 50, 4))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_keys=4, num_values=8, pairs=5, seq_len=30), "distinct keys"),
        (dict(num_keys=20, num_values=8, pairs=6, seq_len=13), "even number"),
        (dict(num_keys=20, num_values=8, pairs=6, seq_len=12), "at least 2"),
        (dict(num_keys=20, num_values=0, pairs=6, seq_len=30), "positive"),
    ],
)
def test_layout_refuses_impossible_shapes(fields, message):
    with pytest.raises(mqar.MQARError, match=message):
        mqar.Layout(**fields)


class Oracle(torch.nn.Module):
    """Logits that name, at every position, the value the last occurrence of the token there was paired with."""

    def __init__(self, layout: mqar.Layout, wrong: bool = False):
        super().__init__()
        self.layout, self.wrong = layout, wrong
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a parameter for input_device

    def forward(self, input_ids: torch.Tensor, **_):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.layout.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            pairs = {row[i]: row[i + 1] for i in range(0, 2 * self.layout.pairs, 2)}
            for t, token in enumerate(row):
                answer = pairs.get(token, 0)
                if self.wrong:  # the value of another key: never right
                    answer = self.layout.value_low + (answer - self.layout.value_low + 1) % self.layout.num_values
                logits[b, t, answer] = 1.0
        return type("Output", (), {"logits": logits})()


def test_accuracy_of_an_oracle_and_of_models_that_cannot_recall():
    assert mqar.accuracy(Oracle(LAYOUT), LAYOUT, 40, seed=1, batch_size=16) == 1.0
    assert mqar.accuracy(Oracle(LAYOUT, wrong=True), LAYOUT, 40, seed=1, batch_size=16) == 0.0

    class Constant(Oracle):  # always the first value token: right exactly where that is the answer
        def forward(self, input_ids, **_):
            logits = torch.zeros(*input_ids.shape, self.layout.vocab_size)
            logits[..., self.layout.value_low] = 1.0
            return type("Output", (), {"logits": logits})()

    ids = mqar.examples(LAYOUT, 40, seed=1)
    answers = ids[:, LAYOUT.query_positions() + 1]
    expected = (answers == LAYOUT.value_low).float().mean().item()
    assert mqar.accuracy(Constant(LAYOUT), LAYOUT, 40, seed=1, batch_size=16) == pytest.approx(expected)


def test_answer_loss_is_the_cross_entropy_of_the_answers_only():
    ids = mqar.examples(LAYOUT, 4, seed=0)
    logits = torch.randn(4, LAYOUT.seq_len, LAYOUT.vocab_size, generator=torch.Generator().manual_seed(0))
    terms = [
        F.cross_entropy(logits[b, p][None], ids[b, p + 1][None])
        for b in range(4)
        for p in LAYOUT.query_positions().tolist()
    ]
    torch.testing.assert_close(mqar.answer_loss(logits, ids, LAYOUT), torch.stack(terms).mean())


def test_tokenizer_names_every_id_of_the_layout():
    tokenizer = mqar.tokenizer(LAYOUT)
    assert len(tokenizer) == LAYOUT.vocab_size and tokenizer.eos_token_id == 0
    assert tokenizer("k0 k19 v0 v11")["input_ids"] == [1, 20, 21, 32]


def test_a_random_model_reads_chance(tmp_path):
    prepare_runtime("delta_net")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("delta_net", LAYOUT.vocab_size)).eval()
    accuracy = mqar.accuracy(model, LAYOUT, 64, seed=2, batch_size=32)
    assert accuracy < 0.2  # chance is 1/12 over the values; an untrained model spreads over all 33 ids


def test_train_refuses_data_beside_a_task_and_unknown_task_fields(tmp_path, capsys):
    config = json.loads((bundled_path("mqar-deltanet") / "training.json").read_text())["options"]
    task = config["task"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "delta_net", "hidden_size": 32, "num_hidden_layers": 1,
                                "num_heads": 2, "train": {"task": task, "seq_len": 64}}))  # fmt: skip
    assert main(["train", str(path), "--data", "techdocs-val", "--out", str(tmp_path / "a")]) == 2
    assert "leave out --data" in capsys.readouterr().err
    path.write_text(json.dumps({"model_type": "delta_net", "train": {"task": {**task, "keys": 3}, "seq_len": 64}}))
    assert main(["train", str(path), "--out", str(tmp_path / "b")]) == 2
    assert "unknown field(s) keys" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mqar-deltanet", "mqar-gated-deltanet"])
def test_bundled_recall_models_recall_as_their_cards_say(name, tmp_path, capsys):
    path = bundled_path(name)
    layout = mqar.read_layout(path)
    card = json.loads((path / "training.json").read_text())["mqar"]["accuracy"]
    trained = next(r for r in card if (r["pairs"], r["seq_len"]) == (layout.pairs, layout.seq_len))
    assert trained["accuracy"] >= 0.95
    out = tmp_path / "eval.json"
    # fresh examples (another seed than the card's): the accuracy is the model's, not that of one draw
    assert main(["evaluate", name, "--tasks", "mqar", "--mqar-examples", "300", "--seed", "7", "--out", str(out)]) == 0
    measured = json.loads(out.read_text())["mqar"]
    assert (measured["pairs"], measured["seq_len"]) == (layout.pairs, layout.seq_len)
    queries = 300 * layout.queries
    spread = 4 * (trained["accuracy"] * (1 - trained["accuracy"]) / queries) ** 0.5 + 2 / queries
    assert measured["accuracy"] >= 0.95 and abs(measured["accuracy"] - trained["accuracy"]) <= spread


def test_pruned_recall_model_keeps_its_layout_and_loses_recall(tmp_path):
    out = tmp_path / "pruned"
    api.prune("mqar-deltanet", "rrqr", 0.75, out, data="mqar", calib_tokens=8 * 128, seq_len=128, align=1)
    assert mqar.read_layout(out) == mqar.read_layout(bundled_path("mqar-deltanet"))
    full = api.evaluate("mqar-deltanet", tasks=["mqar"], mqar_examples=100)["mqar"]["accuracy"]
    pruned = api.evaluate(str(out), tasks=["mqar"], mqar_examples=100)["mqar"]["accuracy"]
    assert pruned < full
