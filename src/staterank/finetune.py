"""Recover a pruned model with LoRA fine-tuning, optionally distilled from a teacher.

One function, :func:`finetune`, read top to bottom like nanoGPT's train.py:

1. the student (MODEL, often a pruned one) and, if given, the teacher (the unpruned model), which
   must share the student's tokenizer vocabulary;
2. LoRA adapters through PEFT on the linear-attention input projections (the adapter's ``lora_targets``),
   the rest of the model frozen;
3. data: packed sequences visited in a seeded random order, as in :mod:`staterank.train`;
4. AdamW on the LoRA weights, linear warmup then cosine decay to ``min_lr_ratio * lr``, gradient-norm
   clipping, bf16 autocast on CUDA (float32 on CPU);
5. the loss: ``(1 - kd_weight) * LM cross-entropy + kd_weight * T² KL(p_teacher || p_student)``, both
   distributions at temperature T, averaged over the predicted tokens (Hinton et al.'s KD loss);
6. checkpoints in ``OUT/checkpoint`` (LoRA weights, optimizer, RNG, step) to resume from;
7. the LoRA weights merged into the model (``merge_and_unload``): OUT is a plain Hugging Face model of
   the student's shape (config, safetensors, tokenizer) and ``finetune.json``, written atomically.

Resuming gives the same final weights as an uninterrupted run: the learning rate and the batch of a
step are pure functions of the step (no scheduler state to save), and the checkpoint holds the
trainable weights, the optimizer and the random-number generators (LoRA dropout draws from them).

Launched by torchrun with W processes, the run is data-parallel (DDP): every rank takes its slice of
rows of each step's batch (W must divide ``batch_size``), DDP averages the gradients, so a step is
the step one process takes on the whole batch; rank 0 writes checkpoints and the model, and every
rank resumes from the same checkpoint. (With LoRA dropout every rank draws its own masks.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from staterank import distributed
from staterank.api import load_model, save_model
from staterank.data import load_sequences
from staterank.errors import DataError, StaterankError
from staterank.io import output_dir, write_json
from staterank.loading import LoadedModel
from staterank.modelcard import finetune_card, model_facts, pruning_report, source_name, write_model_card
from staterank.train import (
    ADAM_BETAS,
    LOG_EVERY,
    batch_at,
    checkpoint_dir_for,
    load_checkpoint,
    lr_at,
    restore_rng_state,
    rng_state,
)
from staterank.validate import (
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    random_seed,
    sequence_length,
)

#: Options that define the trajectory of a run: a resume must not change them.
RUN_DEFINING = (
    "teacher", "kd_temp", "kd_weight", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "steps",
    "batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "grad_clip", "seed", "max_train_tokens",
)  # fmt: skip


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


def finetune(
    model: str | os.PathLike | LoadedModel,
    data: str,
    out: str | os.PathLike,
    *,
    teacher: str | os.PathLike | LoadedModel | None = None,
    kd_temp: float = 2.0,
    kd_weight: float = 0.5,
    lora_rank: int = 32,
    lora_alpha: int = 64,
    lora_dropout: float = 0.0,
    lora_targets: list[str] | None = None,
    steps: int = 200,
    batch_size: int = 8,
    seq_len: int = 512,
    lr: float = 1e-4,
    warmup_steps: int = 20,
    min_lr_ratio: float = 0.1,
    grad_clip: float = 1.0,
    seed: int = 0,
    save_every: int = 50,
    resume: bool = False,
    overwrite: bool = False,
    device: str | None = None,
    progress: bool = True,
    max_train_tokens: int | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """LoRA-fine-tune MODEL on DATA, merge the adapters and write the model to OUT; return the summary.

    With a ``teacher`` the loss is ``(1 - kd_weight) * CE + kd_weight * KD``, where KD is
    :func:`kd_loss`: ``T² KL(p_teacher || p_student)`` at temperature ``kd_temp``; without one it is
    the cross-entropy alone. ``lora_targets`` are module names (default: the adapter's ``lora_targets``).
    The student trains in float32 on CPU, and in the dtype it loads in (bfloat16) under bf16 autocast
    on CUDA, where the LoRA weights stay float32; OUT has the weights in that dtype.

    ``save_every`` steps a checkpoint goes to ``OUT/checkpoint``; ``resume`` continues from it.
    ``stop_after`` ends this call after that many steps with a checkpoint (for jobs with a time limit);
    the summary then has ``"finished": False`` and no model is written.

    The summary (also ``OUT/finetune.json``) holds the steps, tokens seen, the final loss (mean of the
    last few steps), the loss history (every few steps: total, LM and KD parts), the seconds spent in
    training steps and the trainable parameter count; the returned dict has the merged model under
    ``"model"``.
    """
    # -- options ------------------------------------------------------------------------------
    rules = (
        ("steps", steps, positive_int), ("batch_size", batch_size, positive_int), ("seq_len", seq_len, sequence_length),
        ("lora_rank", lora_rank, positive_int), ("lora_alpha", lora_alpha, positive_float),
        ("lora_dropout", lora_dropout, fraction), ("kd_temp", kd_temp, positive_float),
        ("kd_weight", kd_weight, probability), ("lr", lr, positive_float),
        ("warmup_steps", warmup_steps, non_negative_int), ("min_lr_ratio", min_lr_ratio, probability),
        ("grad_clip", grad_clip, positive_float), ("save_every", save_every, non_negative_int),
        ("seed", seed, random_seed), ("max_train_tokens", max_train_tokens, positive_int),
        ("stop_after", stop_after, positive_int),
    )  # fmt: skip
    for name, value, rule in rules:
        rule.check(name, value, optional=name in ("max_train_tokens", "stop_after"))  # None: no limit
    rows = distributed.split_batch(batch_size)  # this rank's rows of every batch
    rank, world_size = distributed.world().rank, distributed.world().size
    if isinstance(teacher, LoadedModel):
        teacher_name = str(teacher.path)
    else:
        teacher_name = str(teacher) if teacher is not None else None
    opts = {
        "teacher": teacher_name, "kd_temp": kd_temp, "kd_weight": kd_weight if teacher is not None else 0.0,
        "lora_rank": lora_rank, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "lora_targets": lora_targets,
        "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "lr": lr, "warmup_steps": warmup_steps,
        "min_lr_ratio": min_lr_ratio, "grad_clip": grad_clip, "seed": seed, "max_train_tokens": max_train_tokens,
    }  # fmt: skip

    out = Path(out)
    checkpoint_dir = checkpoint_dir_for(out, resume, overwrite)

    # -- models -------------------------------------------------------------------------------
    student = load_model(model, device=device)
    run_device = next(student.model.parameters()).device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=run_device.type == "cuda")
    teacher_model = None
    if teacher is not None:
        loaded_teacher = load_model(teacher, device=str(run_device))
        check_same_vocabulary(student, loaded_teacher)
        teacher_model = loaded_teacher.model.eval().requires_grad_(False)
    targets = lora_targets or list(student.adapter.lora_targets)
    if not targets:
        raise StaterankError(f"no default LoRA targets for {student.adapter.family}; pass --lora-targets")
    opts["lora_targets"] = targets

    # Seeded before PEFT draws the LoRA A matrices, so a resumed run builds the same ones before loading.
    torch.manual_seed(seed)
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets)
    try:
        peft_model = get_peft_model(student.model, lora)
    except ValueError as e:  # e.g. no module matches the targets
        raise StaterankError(f"LoRA targets {', '.join(targets)}: {str(e).splitlines()[0]}") from None
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    trainable_params = sum(p.numel() for p in trainable)
    if distributed.is_main():
        where = f"{world_size} x {run_device.type}" if world_size > 1 else str(run_device)
        print(f"LoRA rank {lora_rank} on {', '.join(targets)}: {trainable_params:,} trainable parameters on {where}")
    # DDP averages the gradients of the ranks' slices: the gradient of the mean loss over the whole batch.
    trained = peft_model
    if world_size > 1:
        device_ids = [run_device] if run_device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(peft_model, device_ids=device_ids)

    # -- data ---------------------------------------------------------------------------------
    # load_sequences raises DataError when the corpus holds no sequence of seq_len tokens.
    with distributed.together():
        sequences = load_sequences(
            data, student.tokenizer, seq_len, max_tokens=max_train_tokens, shuffle=True, seed=seed
        )
        if sequences.shape[0] < batch_size:
            raise DataError(
                f"{data}: {sequences.shape[0]} sequences of {seq_len} tokens, fewer than one batch of {batch_size}"
            )
    distributed.check_same("data", distributed.data_fingerprint(sequences), "training data")

    # -- optimizer and state, or the checkpoint's ---------------------------------------------
    # No weight decay: it would pull the LoRA factors towards 0, i.e. towards the unadapted model.
    optimizer = torch.optim.AdamW(trainable, lr=lr, betas=ADAM_BETAS, weight_decay=0.0)
    step, tokens_seen, seconds, history = 0, 0, 0.0, []
    if resume:
        with distributed.together():  # every rank reads the checkpoint rank 0 wrote
            state = load_checkpoint(checkpoint_dir, out, opts, RUN_DEFINING, sequences.shape[0])
        set_peft_model_state_dict(peft_model, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, seconds, history = state["step"], state["tokens_seen"], state["seconds"], state["history"]
        ranks_rng = state.get("rng_by_rank") or []
        restore_rng_state(ranks_rng[rank] if len(ranks_rng) == world_size else state["rng"], run_device)
        if distributed.is_main():
            print(f"resuming at step {step} of {steps}")

    def save_checkpoint() -> None:
        state = {
            "lora": get_peft_model_state_dict(peft_model),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            "seconds": seconds,
            "history": history,
            "options": opts,
            "num_sequences": sequences.shape[0],  # the data position is the step; this guards the data
            "rng": rng_state(run_device),
            "rng_by_rank": distributed.gather_objects(rng_state(run_device)),
        }
        with distributed.together():
            if distributed.is_main():
                with output_dir(checkpoint_dir, overwrite=True) as tmp:
                    torch.save(state, tmp / "state.pt")

    # -- training loop ------------------------------------------------------------------------
    peft_model.train()
    end = steps if stop_after is None else min(steps, step + stop_after)
    shown = progress and distributed.is_main()
    bar = tqdm(total=steps, initial=step, unit="step", desc="finetune", disable=not shown, dynamic_ncols=True)
    # Sums kept on the device and read every LOG_EVERY steps (each read waits for the GPU): total, LM, KD.
    window = torch.zeros(3, device=run_device)
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    final_loss = float("nan")
    while step < end:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, lr, warmup_steps, steps, min_lr_ratio)
        batch = batch_at(sequences, step, batch_size, seed)[rows].to(run_device, non_blocking=True)
        with autocast:
            logits = trained(input_ids=batch, use_cache=False).logits[:, :-1]
        # Every token after the first of a sequence is predicted from the ones before it.
        lm = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        kd = torch.zeros((), device=run_device)
        if teacher_model is not None:
            with torch.no_grad(), autocast:
                teacher_logits = teacher_model(input_ids=batch, use_cache=False).logits[:, :-1]
            kd = kd_loss(logits, teacher_logits, kd_temp)
        loss = (1 - opts["kd_weight"]) * lm + opts["kd_weight"] * kd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1
        tokens_seen += batch.numel() * world_size
        window += torch.stack([loss.detach(), lm.detach(), kd.detach()])
        window_steps += 1
        window_tokens += batch.numel() * world_size
        if window_steps == LOG_EVERY or step == end:
            distributed.all_reduce_sum(window)  # the ranks' slices are equal: their mean is the batch's mean
            total, lm_mean, kd_mean = (window / (window_steps * world_size)).tolist()
            history.append({"step": step, "loss": total, "lm": lm_mean, "kd": kd_mean})
            final_loss = total
            rate = window_tokens / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{rate:,.0f}")
            window.zero_()
            window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        bar.update(1)
        seconds += time.perf_counter() - started

        if step < steps and (step == end or (save_every and step % save_every == 0)):
            save_checkpoint()
            window_start = time.perf_counter()  # keep checkpoint time out of the tokens/s figure
    bar.close()

    summary = {
        "student": str(student.path),
        "data": data,
        "steps": step,
        "finished": step == steps,
        "tokens_seen": tokens_seen,
        "final_loss": final_loss,
        "losses": history,
        "seconds": round(seconds, 1),
        "trainable_params": trainable_params,
        "device": str(run_device),
        "world_size": world_size,
        "options": opts,
    }
    if not summary["finished"]:
        if distributed.is_main():
            print(f"stopped at step {step} of {steps}; continue with --resume")
        return {**summary, "model": peft_model}

    # -- the final model ----------------------------------------------------------------------
    # Merging folds B A into each target weight: OUT loads with plain transformers, no PEFT needed.
    student.model = peft_model.merge_and_unload().eval()
    with distributed.together():
        if distributed.is_main():
            with output_dir(out, overwrite=True) as tmp:  # replaces OUT, the checkpoint with it
                save_model(student, tmp)
                write_json(tmp / "finetune.json", summary)
                card = finetune_card(
                    summary,
                    model_facts(student.model),
                    str(out),
                    source_name(model, student.path),
                    pruning=pruning_report(student.path),
                )
                write_model_card(tmp, card)
            print(f"wrote {out}: {tokens_seen:,} tokens seen in {seconds:.0f} s")
    return {**summary, "model": student.model}


def finetune_from_cli(args: Any) -> int:
    """``staterank finetune``: the CLI's arguments mapped onto :func:`finetune`."""
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    summary = finetune(
        args.model,
        args.data,
        args.out,
        teacher=args.teacher,
        kd_temp=args.kd_temp,
        kd_weight=args.kd_weight,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_targets=targets,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        grad_clip=args.grad_clip,
        save_every=args.save_every,
        resume=args.resume,
        overwrite=args.overwrite,
        seed=args.seed,
        device=args.device,
    )
    print(
        f"finetuned {summary['steps']} steps, {summary['tokens_seen']:,} tokens, final loss "
        f"{summary['final_loss']:.4f}, {summary['trainable_params']:,} LoRA parameters merged, "
        f"{summary['seconds']:.0f} s -> {args.out}"
    )
    return 0
