"""Recover a pruned model with LoRA fine-tuning, optionally distilled from a teacher.

What LoRA recovery says; the loop, checkpoints, resume and DDP are :mod:`staterank.training.loop`'s:

1. the student (MODEL, often a pruned one) and, if given, the teacher (the unpruned model), which
   must share the student's tokenizer vocabulary;
2. the trained parameters: LoRA adapters through PEFT on the family adapter's ``lora_targets`` (the
   linear-attention input projections), the rest of the model frozen, no weight decay;
3. the loss: ``(1 - kd_weight) * LM cross-entropy + kd_weight * T² KL(p_teacher || p_student)``, both
   distributions at temperature T, averaged over the predicted tokens (Hinton et al.'s KD loss);
4. the LoRA weights merged into the model (``merge_and_unload``): OUT is a plain Hugging Face model of
   the student's shape (config, safetensors, tokenizer), ``finetune.json`` and a model card.

The student trains in float32 on CPU, and in the dtype it loads in (bfloat16) under bf16 autocast on
CUDA, where the LoRA weights stay float32. Under torchrun every rank takes ``batch_size / W`` rows of
each batch (with LoRA dropout every rank draws its own masks).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from staterank import distributed
from staterank.commands import load_model, save_model
from staterank.errors import StaterankError
from staterank.io import write_json
from staterank.loading import LoadedModel, default_device, input_device, load
from staterank.modelcard import finetune_card, model_facts, pruning_report, source_name, write_model_card
from staterank.options import FinetuneOptions, resolve
from staterank.training.loop import (
    checkpoint_dir_for,
    next_token_loss,
    shard,
    train_loop,
    training_sequences,
    write_output,
)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
    """T² KL(p_teacher || p_student) at temperature T, averaged over the tokens (logits [..., vocab]).

    The T² keeps the gradient's scale independent of T (Hinton et al., 2015).
    """
    student = F.log_softmax(student_logits.flatten(0, -2).float() / temp, dim=-1)
    teacher = F.log_softmax(teacher_logits.flatten(0, -2).float() / temp, dim=-1)
    # kl_div(input=log q, target=log p) sums p (log p - log q); "batchmean" divides by the token count.
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temp**2


def check_same_vocabulary(student: LoadedModel, teacher: LoadedModel) -> None:
    """Distillation compares distributions token by token: both models must mean the same by each id."""
    student_rows = student.model.get_output_embeddings().weight.shape[0]
    teacher_rows = teacher.model.get_output_embeddings().weight.shape[0]
    if student_rows != teacher_rows:
        raise StaterankError(
            f"{teacher.path}: the teacher predicts {teacher_rows} tokens, the student {student_rows}; "
            "distillation needs the same vocabulary"
        )
    if student.tokenizer.get_vocab() != teacher.tokenizer.get_vocab():
        raise StaterankError(f"{teacher.path}: the teacher's tokenizer differs from the student's")


def micro_batch_for(opts: FinetuneOptions, rows: int) -> int | None:
    """Rows per forward pass on a rank that takes ``rows`` of each batch: ``--micro-batch-size``, or the rows
    split into ``--grad-accum`` equal passes."""
    if opts.grad_accum is None:
        return opts.micro_batch_size
    if opts.micro_batch_size is not None:
        raise StaterankError("give --grad-accum or --micro-batch-size, not both")
    if rows % opts.grad_accum:
        raise StaterankError(
            f"--grad-accum {opts.grad_accum} does not divide the {rows} sequences each rank takes of a batch of "
            f"{opts.batch_size}"
        )
    return rows // opts.grad_accum


def merged_from_shards(peft_model, source, lora: LoraConfig, student: LoadedModel) -> LoadedModel:
    """The merged model of a sharded run, on rank 0: the LoRA weights gathered in full from every rank, put into
    a fresh copy of SOURCE on the CPU (in the dtype the run trained in) and merged; other ranks get ``student``."""
    lora_weights = get_model_state_dict(
        peft_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    )  # every rank takes part; rank 0 receives
    dtype = next(p for p in student.model.parameters() if not p.requires_grad).dtype
    merged = student
    with distributed.together():  # a failure on rank 0 reaches every rank
        if distributed.is_main():
            merged = load(source, device="cpu", dtype=dtype)
            fresh_peft = get_peft_model(merged.model, lora)
            missing = set(lora_weights) - set(dict(fresh_peft.named_parameters()))
            if missing:
                raise StaterankError(f"the gathered LoRA weights do not fit a fresh model: {sorted(missing)[:3]}")
            fresh_peft.load_state_dict(lora_weights, strict=False)
            merged.model = fresh_peft.merge_and_unload().eval()
    return merged


def finetune(
    model: str | os.PathLike | LoadedModel,
    data: str,
    out: str | os.PathLike,
    opts: FinetuneOptions | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """LoRA-fine-tune MODEL on DATA, merge the adapters and write the model to OUT; return the summary.

    ``opts`` (default ``FinetuneOptions()``) with ``overrides`` applied, e.g. ``finetune(model, data, out,
    teacher=original, steps=100)``; ``teacher`` may be a path, hub id or a loaded model. With a teacher
    the loss is ``(1 - kd_weight) * CE + kd_weight * KD``, where KD is :func:`kd_loss`; without one it is
    the cross-entropy alone. ``save_every`` steps a checkpoint goes to ``OUT/checkpoint``; ``resume``
    continues from it; ``stop_after`` ends this call after that many steps with a checkpoint (for jobs
    with a time limit), the summary then has ``"finished": False`` and no model is written.

    The summary (also ``OUT/finetune.json``) holds the steps, tokens seen, the final loss (mean of the
    last few steps), the loss history (every few steps: total, LM and KD parts), the seconds spent in
    training steps and the trainable parameter count; the returned dict has the merged model under
    ``"model"``.
    """
    # -- options ------------------------------------------------------------------------------
    opts = resolve(FinetuneOptions, opts, overrides)
    rows = distributed.split_batch(opts.batch_size)  # refuses a world size that does not divide the batch, first
    micro_batch_size = micro_batch_for(opts, rows.stop - rows.start)
    if opts.device_map is not None and opts.parallel == "fsdp":
        raise StaterankError("--device-map spreads one copy of the model over the GPUs; it excludes --parallel fsdp")
    if opts.parallel == "fsdp" and isinstance(model, LoadedModel) and (
        opts.resume or opts.stop_after is None or opts.stop_after >= opts.steps
    ):  # a run that stops early (stop_after) writes a checkpoint only, and needs no fresh copy
        raise StaterankError("--parallel fsdp merges the LoRA weights into a fresh copy of the model: give its path")
    teacher = opts.teacher
    # The run's options as the summary and the checkpoints record them (a resume must not change them).
    options = {name: getattr(opts, name) for name in FinetuneOptions.RUN_DEFINING}
    options["teacher"] = None if teacher is None else str(teacher.path if isinstance(teacher, LoadedModel) else teacher)
    options["kd_weight"] = opts.kd_weight if teacher is not None else 0.0

    out = Path(out)
    checkpoint_dir = checkpoint_dir_for(out, opts.resume, opts.overwrite)
    device_type = torch.device(opts.device).type if opts.device else default_device().type
    sharded = distributed.process_group(device_type) if opts.parallel == "fsdp" else contextlib.nullcontext()
    with sharded:
        return _finetune(model, data, out, opts, options, checkpoint_dir, micro_batch_size)


def _finetune(model, data, out: Path, opts: FinetuneOptions, options: dict, checkpoint_dir: Path,
              micro_batch_size: int | None) -> dict[str, Any]:
    teacher = opts.teacher

    # -- models -------------------------------------------------------------------------------
    student = load_model(model, device=opts.device, device_map=opts.device_map)
    device = input_device(student.model)  # with a device map: the embedding's
    teacher_model = None
    if teacher is not None:
        loaded_teacher = load_model(teacher, device=str(device))
        check_same_vocabulary(student, loaded_teacher)
        teacher_model = loaded_teacher.model.eval().requires_grad_(False)
        if opts.parallel == "fsdp":  # the teacher sharded as the student is: forward only, one layer gathered at a time
            shard(teacher_model, list(loaded_teacher.adapter.decoder_layers()), device, [])
    targets = opts.lora_targets or list(student.adapter.lora_targets)
    if not targets:
        raise StaterankError(f"no default LoRA targets for {student.adapter.family}; pass --lora-targets")
    options["lora_targets"] = targets

    # -- what differs: the trained parameters (LoRA) and the loss ----------------------------
    if opts.grad_checkpointing:  # non-reentrant: the frozen embeddings need not require grad
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Seeded before PEFT draws the LoRA A matrices, so a resumed run builds the same ones before loading.
    torch.manual_seed(opts.seed)
    lora = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets)  # fmt: skip
    try:
        peft_model = get_peft_model(student.model, lora)
    except ValueError as e:  # e.g. no module matches the targets
        raise StaterankError(f"LoRA targets {', '.join(targets)}: {str(e).splitlines()[0]}") from None
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    world_size = distributed.world().size
    if distributed.is_main():
        where = f"{world_size} x {device.type}" if world_size > 1 else str(device)
        print(
            f"LoRA rank {opts.lora_rank} on {', '.join(targets)}: {trainable_params:,} trainable parameters on {where}"
        )
    # No weight decay: it would pull the LoRA factors towards 0, i.e. towards the unadapted model.
    groups = [{"params": trainable, "weight_decay": 0.0}]

    def loss(trained: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = trained(input_ids=batch, use_cache=False).logits
        lm = next_token_loss(logits, batch)
        kd = torch.zeros((), device=batch.device)
        if teacher_model is not None:
            with torch.no_grad():
                teacher_logits = teacher_model(input_ids=batch, use_cache=False).logits
            kd = kd_loss(logits[:, :-1], teacher_logits[:, :-1], opts.kd_temp)
        return {"loss": (1 - options["kd_weight"]) * lm + options["kd_weight"] * kd, "lm": lm, "kd": kd}

    # -- data and the loop --------------------------------------------------------------------
    sequences = training_sequences(data, student.tokenizer, opts.seq_len, opts.batch_size, opts.max_train_tokens,
                                   opts.seed)  # fmt: skip
    state = train_loop(
        peft_model, loss, groups, sequences, options, FinetuneOptions.RUN_DEFINING, checkpoint_dir,
        resume=opts.resume, save_every=opts.save_every, micro_batch_size=micro_batch_size,
        stop_after=opts.stop_after, progress=opts.progress, name="finetune", parallel=opts.parallel,
        blocks=list(student.adapter.decoder_layers()),
    )  # fmt: skip

    summary = {
        "student": str(student.path),
        "data": data,
        "steps": state.step,
        "finished": state.finished,
        "tokens_seen": state.tokens_seen,
        "final_loss": state.final_loss,
        "losses": state.losses,
        "seconds": round(state.seconds, 1),
        "trainable_params": trainable_params,
        "device": str(device),
        "world_size": world_size,
        "parallel": opts.parallel,
        "grad_accum": opts.grad_accum,
        "grad_checkpointing": opts.grad_checkpointing,
        "peak_memory_gib_by_rank": state.peak_memory_gib_by_rank,
        "options": options,
    }
    if not state.finished:
        return {**summary, "model": peft_model}

    # -- the final model ----------------------------------------------------------------------
    # Merging folds B A into each target weight: OUT loads with plain transformers, no PEFT needed.
    if opts.parallel == "fsdp":
        student = merged_from_shards(peft_model, model, lora, student)
    else:
        student.model = peft_model.merge_and_unload().eval()

    def save(directory: Path) -> None:
        save_model(student, directory)
        write_json(directory / "finetune.json", summary)
        pruning = pruning_report(student.path)
        card = finetune_card(summary, model_facts(student.model), str(out), source_name(model, student.path), pruning)
        write_model_card(directory, card)

    write_output(out, save, state)
    return {**summary, "model": student.model}
