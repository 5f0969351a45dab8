"""Lottery-ticket channel pruning: each round's kept channels and the rewind, against a computation of its own."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from staterank import api
from staterank.data import load_sequences
from staterank.loading import load
from staterank.models import adapter_for
from staterank.prune.channels import CriterionError, get_criterion
from staterank.prune.channels.lottery import round_dims
from staterank.training.loop import ADAM_BETAS, batch_at

SETTINGS = dict(data="techdocs-val", calib_tokens=2048, seq_len=128, batch_size=4, seed=3)
STEPS, TRAIN_STEPS, LR = 2, 2, 1e-3


def fine_tuned(model, sequences: torch.Tensor, seed: int) -> torch.nn.Module:
    """AdamW on the q, k and v projections only, written out step by step: the batches of ``batch_at``."""
    params = [p for name, p in model.named_parameters() if name.split(".")[-2] in ("q_proj", "k_proj", "v_proj")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([{"params": params, "weight_decay": 0.0}], lr=LR, betas=ADAM_BETAS)
    model.train()
    for step in range(TRAIN_STEPS):
        batch = batch_at(sequences, step, SETTINGS["batch_size"], seed)
        logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def test_rounds_and_rewind_match_an_independent_computation(tmp_path, one_thread):
    out = tmp_path / "lottery"
    report = api.prune("tiny-deltanet", "lottery", 0.5, out, options={"steps": STEPS, "train_steps": TRAIN_STEPS,
                       "lr": LR}, **SETTINGS)  # fmt: skip
    original = load("tiny-deltanet", device="cpu", dtype=torch.float32)
    adapter, layers = original.adapter, original.adapter.linear_layers()
    d_k, heads = adapter.layer_shape(layers[0]).head_k_dim, adapter.layer_shape(layers[0]).num_k_heads
    sequences = load_sequences(SETTINGS["data"], original.tokenizer, SETTINGS["seq_len"],
                               max_tokens=SETTINGS["calib_tokens"], shuffle=True, seed=SETTINGS["seed"])  # fmt: skip

    kept = {layer: [list(range(d_k)) for _ in range(heads)] for layer in layers}
    assert [r["head_k_dim"] for r in report["rounds"]] == [48, 32]
    for number, record in enumerate(report["rounds"], start=1):
        work = copy.deepcopy(original.model)
        if number > 1:
            adapter_for(work).keep_qk_channels({layer: torch.tensor(kept[layer]) for layer in layers})
        work = fine_tuned(work, sequences, SETTINGS["seed"] + number)
        for layer in layers:
            q_rows, k_rows = adapter_for(work).qk_weights(layer)  # [Hk, channels this round started with, hidden]
            for head in range(heads):
                norms = [float(torch.cat([q_rows[head, c], k_rows[head, c]]).double().norm()) for c in range(len(kept[layer][head]))]  # noqa: E501
                best = sorted(range(len(norms)), key=lambda c: -norms[c])[: record["head_k_dim"]]
                kept[layer][head] = sorted(kept[layer][head][c] for c in best)
            assert record["kept"][str(layer)] == {str(h): kept[layer][h] for h in range(heads)}
    assert report["kept"] == report["rounds"][-1]["kept"]

    # the rewind: the written model is the original cut to the kept channels, fine-tuned values nowhere
    pruned = load(out, device="cpu", dtype=torch.float32)
    for layer in layers:
        index = torch.tensor(kept[layer])  # [Hk, 32]
        for before, after in zip(adapter.qk_weights(layer), pruned.adapter.qk_weights(layer), strict=True):
            torch.testing.assert_close(after, before.gather(1, index[..., None].expand(-1, -1, before.shape[-1])),
                                       rtol=0, atol=0)  # fmt: skip
    untouched = {name: p for name, p in original.model.named_parameters() if "q_proj" not in name
                 and "k_proj" not in name and "q_conv" not in name and "k_conv" not in name}  # fmt: skip
    for name, param in pruned.model.named_parameters():
        if name in untouched:
            torch.testing.assert_close(param, untouched[name], rtol=0, atol=0)
    assert json.loads((out / "pruning.json").read_text())["rewound"].startswith("every weight")


def test_round_schedule_and_option_checks():
    assert round_dims(64, 32, 2) == [48, 32]
    assert round_dims(64, 16, 3) == [48, 32, 16]
    assert round_dims(128, 64, 1) == [64]
    for options in ({"steps": 0}, {"train_steps": 0}, {"lr": 0.0}, {"magnitude": "l3"}):
        with pytest.raises(CriterionError):
            get_criterion("lottery", **options)


def test_lottery_without_data_is_refused(tmp_path, capsys):
    from staterank.cli import main

    assert main(["prune", "tiny-deltanet", "--method", "lottery", "--ratio", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "data-driven: pass --data" in capsys.readouterr().err
