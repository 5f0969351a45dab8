"""Pretrain a small linear-attention model from a config: the bundled tiny models are made here.

What pretraining says; the loop, checkpoints and resume are :mod:`staterank.training.loop`'s:

1. options: :class:`~staterank.options.TrainOptions` fields where set, else the config's ``"train"``
   section, else :data:`~staterank.options.TRAIN_DEFAULTS`;
2. tokenizer: an existing one, or a byte-level BPE trained on the training data;
3. model: ``AutoModelForCausalLM.from_config`` on the config's model fields, seeded;
4. the loss: next-token cross-entropy, every parameter trained, weight decay on the matrices and the
   embedding only (not on what the family adapter exempts: norms, biases, decay parameters);
5. validation perplexity on ``val_data`` every ``val_every`` steps and at the end;
6. the final model in Hugging Face format (config, safetensors, tokenizer, ``training.json``, a model
   card), in ``save_dtype``; the checkpoints hold the tokenizer too, so a resumed run uses the same one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from staterank import mqar
from staterank.data import load_sequences
from staterank.errors import StaterankError
from staterank.loading import prepare_runtime
from staterank.modelcard import model_facts, mqar_section, train_card, write_model_card
from staterank.models import adapter_for
from staterank.options import TrainOptions, resolve
from staterank.tokenizer import train_tokenizer
from staterank.training.loop import (
    checkpoint_dir_for,
    mixed_precision,
    next_token_loss,
    train_loop,
    training_sequences,
    write_output,
)

#: Options that define the trajectory of a run: a resume must not change them.
RUN_DEFINING = (
    "steps", "batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
    "seed", "max_train_tokens", "task",
)  # fmt: skip

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

MQAR_VAL_EXAMPLES = 1024  # validation examples of a mqar task, drawn with seed + 1
MQAR_CARD_EXAMPLES = 1000  # examples per cell of a model card's accuracy table, drawn with seed 1234
MQAR_CARD_SEED = 1234


def train(
    config: str | os.PathLike,
    data: str | None,
    out: str | os.PathLike,
    opts: TrainOptions | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain the model of CONFIG on DATA and write it to OUT; return the run's summary.

    ``opts`` (default ``TrainOptions()``) with ``overrides`` applied, e.g. ``train(config, data, out,
    steps=100)``; a field left at None takes the config's or the default value. ``resume`` continues
    from ``OUT/checkpoint``; ``stop_after`` ends this call after that many steps with a checkpoint to
    resume from (for jobs with a time limit); the summary then has ``"finished": False`` and no model
    is written.

    The summary (also written to ``OUT/training.json``) holds the tokens seen, the final training
    loss (the mean of the last few steps), the validation history, the seconds spent in training
    steps (validation and checkpoints left out) and the parameter count; the returned dict has the
    trained model too, under ``"model"``.

    A config whose ``"train"`` section names a ``task`` (``{"name": "mqar", "pairs": ..., "num_keys": ...,
    "num_values": ..., "examples": ...}``) trains on that synthetic task instead of DATA (which must then be
    None): :mod:`staterank.mqar`'s examples of ``seq_len`` tokens, the loss on the answers only, validation
    accuracy on 1,024 other examples, and the layout written beside the model (``mqar.json``) with the accuracy
    by number of pairs and sequence length on the model card.
    """
    # -- options ------------------------------------------------------------------------------
    opts = resolve(TrainOptions, opts, overrides)
    model_fields, section = read_config(config)
    run = opts.resolved(section)
    model_type = model_fields["model_type"]
    prepare_runtime(model_type)  # refuses unknown families; registers fla's classes; CPU runs through PyTorch ops

    out = Path(out)
    checkpoint_dir = checkpoint_dir_for(out, opts.resume, opts.overwrite)
    device = torch.device(run["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(run["seed"])

    layout = _task_layout(run, data)

    # -- tokenizer ----------------------------------------------------------------------------
    # A resumed run takes the tokenizer it started with, saved in the checkpoint.
    tokenizer_source = checkpoint_dir if opts.resume else run["tokenizer"]
    if layout is not None:
        tokenizer = mqar.tokenizer(layout)
    elif tokenizer_source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except (OSError, ValueError) as e:
            raise StaterankError(f"{tokenizer_source}: cannot load the tokenizer ({e})") from None
    else:
        vocab_size = run["vocab_size"] or model_fields.get("vocab_size", 4096)
        print(f"training a byte-level BPE tokenizer of {vocab_size} tokens on {data}")
        tokenizer = train_tokenizer(data, vocab_size)
    if tokenizer.eos_token_id is None:
        raise StaterankError(f"{tokenizer_source}: the tokenizer has no EOS token to separate documents")

    # -- model --------------------------------------------------------------------------------
    fields = {k: v for k, v in model_fields.items() if k != "model_type"}
    # The tokenizer decides the vocabulary and the special ids; EOS doubles as BOS and padding.
    fields.update(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    try:
        model_config = AutoConfig.for_model(model_type, **fields)
        model = AutoModelForCausalLM.from_config(model_config)
    except (ValueError, TypeError, KeyError) as e:
        raise StaterankError(f"{config}: cannot build a {model_type} model from it ({e})") from None
    model.to(device)
    params = sum(p.numel() for p in model.parameters())  # a tied embedding is counted once
    print(f"{model_type}: {params:,} parameters on {device}")

    # -- data ---------------------------------------------------------------------------------
    val_sequences = None
    if layout is not None:
        sequences = mqar.examples(layout, run["task"].get("examples", 65_536), run["seed"])
        if sequences.shape[0] < run["batch_size"]:
            raise StaterankError(
                f"mqar task: {sequences.shape[0]} examples, fewer than one batch of {run['batch_size']}"
            )
        data = "mqar"
    else:
        sequences = training_sequences(
            data, tokenizer, run["seq_len"], run["batch_size"], run["max_train_tokens"], run["seed"]
        )
        if run["val_data"]:
            val_sequences = load_sequences(run["val_data"], tokenizer, run["seq_len"], max_tokens=run["val_tokens"])
    batches_per_epoch = sequences.shape[0] // run["batch_size"]  # the last partial batch of an epoch is dropped
    print(
        f"data: {sequences.numel():,} tokens in {sequences.shape[0]:,} sequences of {run['seq_len']}, "
        f"{batches_per_epoch:,} batches of {run['batch_size']} an epoch, "
        f"{run['steps'] / batches_per_epoch:.2f} epochs"
    )

    # -- what differs: the loss, the parameters and their weight decay, validation -----------
    def loss(trained: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = trained(input_ids=batch, use_cache=False).logits
        return {"loss": next_token_loss(logits, batch) if layout is None else mqar.answer_loss(logits, batch, layout)}

    adapter = adapter_for(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if adapter.no_weight_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": run["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]

    def validate(step: int) -> dict[str, float]:
        if layout is not None:
            with mixed_precision(device):
                correct = mqar.accuracy(model, layout, MQAR_VAL_EXAMPLES, run["seed"] + 1, run["batch_size"])
            model.train()
            tqdm.write(f"step {step}: validation accuracy {correct:.4f}")
            return {"accuracy": correct}
        val_loss = mean_loss(model, val_sequences, run["batch_size"], mixed_precision(device))
        tqdm.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
        return {"loss": val_loss, "ppl": math.exp(val_loss)}

    state = train_loop(
        model, loss, groups, sequences, run, RUN_DEFINING, checkpoint_dir,
        resume=opts.resume, save_every=run["save_every"], checkpoint_files=tokenizer.save_pretrained,
        validate=validate if val_sequences is not None or layout is not None else None,
        validate_every=run["val_every"],
        micro_batch_size=run["micro_batch_size"], stop_after=opts.stop_after, progress=opts.progress, name="train",
    )  # fmt: skip

    summary = {
        "model_type": model_type,
        "params": params,
        "steps": state.step,
        "finished": state.finished,
        "tokens_seen": state.tokens_seen,
        "epochs": round(state.step / batches_per_epoch, 3),
        "final_train_loss": state.final_loss,
        "val_history": state.validations,
        "seconds": round(state.seconds, 1),
        "device": str(device),
        "data": data,
        "train_tokens": sequences.numel(),
        "options": run,
    }
    if not state.finished:
        return {**summary, "model": model}

    # -- the final model ----------------------------------------------------------------------
    # Converted in place: the returned model is exactly the one written.
    model.eval().to(SAVE_DTYPES[run["save_dtype"]])

    if layout is not None:
        summary["mqar"] = {"layout": layout.to_json(), "examples": MQAR_CARD_EXAMPLES, "seed": MQAR_CARD_SEED,
                           "accuracy": mqar_table(model, layout, run["batch_size"])}  # fmt: skip

    def save(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        (directory / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        card = train_card(summary, model_facts(model), str(out))
        if layout is not None:
            mqar.write_layout(directory, layout)
            card += "\n" + mqar_section(summary["mqar"])
        write_model_card(directory, card)

    write_output(out, save, state)
    return {**summary, "model": model}


@torch.no_grad()
def mean_loss(model: PreTrainedModel, sequences: torch.Tensor, batch_size: int, autocast: torch.autocast) -> float:
    """Mean next-token cross-entropy over SEQUENCES [n, seq_len], each scored from its own start."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, sequences.shape[0], batch_size):
        batch = sequences[start : start + batch_size].to(device)
        with autocast:
            logits = model(input_ids=batch, use_cache=False).logits
        total += next_token_loss(logits, batch, reduction="sum")
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total.item() / count


def read_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model fields and the ``"train"`` section of a training config file.

    The section's keys and values are checked by :meth:`TrainOptions.resolved`.
    """
    path = Path(path)
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise StaterankError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StaterankError(f"{path}: cannot read the config ({e})") from None
    except json.JSONDecodeError as e:
        raise StaterankError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise StaterankError(f"{path}: a config is a JSON object with a model_type (delta_net, gated_deltanet, ...)")
    train_section = config.pop("train", {})
    if not isinstance(train_section, dict):
        raise StaterankError(f"{path}: 'train' must be an object of training options")
    return config, train_section


def _task_layout(run: dict[str, Any], data: str | None) -> mqar.Layout | None:
    """The MQAR layout of the run's ``task``, or None for a corpus run; DATA and a task exclude each other."""
    task = run["task"]
    if task is None:
        if data is None:
            raise StaterankError("give --data (a training corpus), or a config whose train section names a task")
        return None
    if not isinstance(task, dict) or task.get("name") != "mqar":
        raise StaterankError(f'the train section\'s task must be {{"name": "mqar", ...}}, got {task!r}')
    if data is not None:
        raise StaterankError("the config trains on a mqar task; leave out --data")
    return mqar.Layout.from_task(task, run["seq_len"])


def mqar_table(model: PreTrainedModel, layout: mqar.Layout, batch_size: int) -> list[dict[str, Any]]:
    """Accuracy of a trained model by number of pairs (half, all, twice the training's) and length (1x, 2x)."""
    rows = []
    for seq_len in (layout.seq_len, 2 * layout.seq_len):
        for pairs in sorted({max(1, layout.pairs // 2), layout.pairs, 2 * layout.pairs}):
            try:
                shape = layout.with_shape(pairs, seq_len)
            except mqar.MQARError:
                continue  # too many pairs for the keys or the length
            correct = mqar.accuracy(model, shape, MQAR_CARD_EXAMPLES, MQAR_CARD_SEED, batch_size)
            rows.append({"pairs": pairs, "seq_len": seq_len, "accuracy": correct})
    return rows
