"""staterank.training.lora on CPU: LoRA recovery of a tiny DeltaNet, merged output, resume, distillation, bad input."""

from __future__ import annotations

import pytest
import torch
from reference import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from staterank.data import read_documents
from staterank.errors import DataError, StaterankError
from staterank.loading import load, prepare_runtime
from staterank.tokenizer import train_tokenizer
from staterank.training.lora import finetune, kd_loss

prepare_runtime("delta_net")

# 8 sequences of 32 tokens and batches of 8: every step sees the same data, so the loss must fall.
QUICK = {"batch_size": 8, "seq_len": 32, "max_train_tokens": 256, "lr": 3e-2, "warmup_steps": 1, "lora_rank": 4,
         "lora_alpha": 8, "progress": False}  # fmt: skip
LORA_TARGETS = ("q_proj", "k_proj", "v_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((doc[:3000] for doc in read_documents("techdocs-val")), vocab_size=300)


@pytest.fixture(scope="module")
def student(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("delta_net", len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lora_lowers_loss_and_writes_a_plain_merged_model(student, tmp_path):
    out = tmp_path / "out"
    summary = finetune(student, "techdocs-val", out, steps=20, **QUICK)
    assert summary["finished"] and summary["steps"] == 20 and summary["trainable_params"] > 0
    # Means of steps 1-10 and 11-20. LoRA on q, k, v alone moves a random tiny model slowly.
    assert summary["losses"][1]["loss"] < summary["losses"][0]["loss"] - 0.05
    assert (out / "finetune.json").is_file() and not (out / "checkpoint").exists()

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in reloaded.named_modules())
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, summary["model"](ids).logits)

    before, after = load_file(student / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for name, weight in before.items():
        assert after[name].shape == weight.shape, name
        assert torch.equal(after[name], weight) != name.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS)), name


def test_resume_gives_the_same_weights(student, tmp_path):
    options = {**QUICK, "steps": 6, "save_every": 2, "lora_dropout": 0.1}  # dropout: the RNG state matters too
    finetune(student, "techdocs-val", tmp_path / "whole", **options)
    first = finetune(student, "techdocs-val", tmp_path / "split", stop_after=3, **options)
    assert not first["finished"] and (tmp_path / "split" / "checkpoint" / "state.pt").is_file()
    finetune(student, "techdocs-val", tmp_path / "split", resume=True, **options)
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    before = load_file(student / "model.safetensors")
    assert not all(torch.equal(whole[name], before[name]) for name in before)  # and it did train


def test_kd_loss_by_hand():
    generator = torch.Generator().manual_seed(2)
    student_logits = torch.randn(2, 5, 7, generator=generator)
    teacher_logits = torch.randn(2, 5, 7, generator=generator)
    temp = 2.0
    p = torch.softmax(teacher_logits / temp, -1)
    q = torch.softmax(student_logits / temp, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temp**2
    assert kd_loss(student_logits, teacher_logits, temp).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(teacher_logits, teacher_logits, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_distilling_from_itself_starts_at_zero(student, tmp_path):
    # LoRA starts as the identity (B = 0), so a student distilled from its own weights starts with KL 0.
    summary = finetune(student, "techdocs-val", tmp_path / "out", teacher=student, kd_weight=1.0, steps=1, **QUICK)
    assert summary["losses"][0]["kd"] == pytest.approx(0.0, abs=1e-5)
    assert summary["losses"][0]["loss"] == pytest.approx(0.0, abs=1e-5)


def test_bad_input(student, tokenizer, tmp_path):
    with pytest.raises(StaterankError, match="no checkpoint"):
        finetune(student, "techdocs-val", tmp_path / "none", resume=True, steps=2, **QUICK)
    with pytest.raises(DataError):
        finetune(student, "techdocs-val", tmp_path / "long", steps=2, **{**QUICK, "seq_len": 10_000})

    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(tiny_config("delta_net", 320)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(StaterankError, match="same vocabulary"):
        finetune(student, "techdocs-val", tmp_path / "kd", teacher=other, steps=2, **QUICK)


def test_accumulation_checkpointing_and_sharding_give_the_same_weights(student, tmp_path):
    """--grad-accum (gradients added over passes), --grad-checkpointing (activations recomputed) and
    --parallel fsdp in a process group of one merge to the weights of the plain run."""
    options = {**QUICK, "batch_size": 4, "steps": 4}
    finetune(student, "techdocs-val", tmp_path / "plain", **options)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    variants = {"accum": {"grad_accum": 4}, "checkpointing": {"grad_checkpointing": True},
                "fsdp": {"parallel": "fsdp", "grad_accum": 2}}  # fmt: skip
    for name, extra in variants.items():
        summary = finetune(student, "techdocs-val", tmp_path / name, **options, **extra)
        assert summary["grad_accum"] == extra.get("grad_accum")
        other = load_file(tmp_path / name / "model.safetensors")
        for key, value in plain.items():
            torch.testing.assert_close(other[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    assert not torch.distributed.is_initialized()  # the group of one is gone


@pytest.mark.parametrize(
    "extra, message",
    [({"grad_accum": 2, "micro_batch_size": 2}, "not both"), ({"grad_accum": 3}, "does not divide"),
     ({"device_map": "auto", "parallel": "fsdp"}, "excludes --parallel fsdp")],
)  # fmt: skip
def test_bad_accumulation_and_sharding_options(student, tmp_path, extra, message):
    with pytest.raises(StaterankError, match=message):
        finetune(student, "techdocs-val", tmp_path / "out", **{**QUICK, "batch_size": 4}, **extra)
    assert not (tmp_path / "out").exists()


def test_sharding_a_loaded_model_runs_only_when_it_stops_early(student, tmp_path):
    """A sharded run merges into a fresh copy read from the model's path, so a model given loaded is refused,
    unless the run stops early (``stop_after``): then it writes its checkpoint and no model."""
    loaded = load(student, device="cpu")
    with pytest.raises(StaterankError, match="give its path"):
        finetune(loaded, "techdocs-val", tmp_path / "refused", parallel="fsdp", steps=2, **QUICK)
    summary = finetune(loaded, "techdocs-val", tmp_path / "stopped", parallel="fsdp", steps=2, stop_after=1, **QUICK)
    assert summary["steps"] == 1 and not summary["finished"]
    assert (tmp_path / "stopped" / "checkpoint" / "state.pt").is_file()
    assert not (tmp_path / "stopped" / "model.safetensors").exists()
