"""Pretrain a small linear-attention model from a config: the bundled tiny models are made here.

One function, :func:`train`, read top to bottom like nanoGPT's train.py:

1. options: built-in defaults < the config's ``"train"`` section < explicit arguments (CLI flags);
2. tokenizer: an existing one, or a byte-level BPE trained on the training data;
3. model: ``AutoModelForCausalLM.from_config`` on the config's model fields, seeded;
4. data: the training corpus, documents shuffled by seed, packed into sequences of ``seq_len``
   tokens and visited in a seeded random order, epoch after epoch;
5. AdamW (no weight decay on norms, biases, ``A_log`` and ``dt_bias``), linear warmup then
   cosine decay to ``min_lr_ratio * lr``, gradient-norm clipping, bf16 autocast on CUDA;
6. periodic validation perplexity, checkpoints in ``OUT/checkpoint`` to resume from;
7. the final model in Hugging Face format (config, safetensors, tokenizer, ``training.json``),
   written to a temporary directory beside OUT and renamed into place.

Resuming gives the same final weights as an uninterrupted run: the learning rate and the batch
order are pure functions of the step, and the checkpoint holds the model, the optimizer and the
random-number generators.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from staterank.data import load_sequences
from staterank.errors import DataError, OutputExistsError, StaterankError
from staterank.io import output_dir
from staterank.loading import prepare_runtime
from staterank.modelcard import model_facts, train_card, write_model_card
from staterank.models import adapter_for
from staterank.tokenizer import train_tokenizer
from staterank.validate import (
    check_output_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    random_seed,
    sequence_length,
)

#: Every option of a run, with its default. The config's "train" section may set any of them.
DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 32,
    "seq_len": 512,
    "lr": 3e-3,
    "warmup_steps": 100,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "val_data": None,  # data spec scored every val_every steps and at the end
    "val_every": 250,  # 0: validate at the end only
    "val_tokens": 262_144,  # the first this many tokens of val_data
    "save_every": 500,  # checkpoint period in steps (0: only when stopped early)
    "seed": 0,
    "device": None,  # cuda if available, else cpu
    "tokenizer": None,  # an existing tokenizer directory; None: train one on the training data
    "vocab_size": None,  # size of a tokenizer trained here; None: the model config's, else 4096
    "max_train_tokens": None,  # use at most this many tokens of the training corpus
    "save_dtype": "float32",  # dtype of the saved weights: float32 or bfloat16
}

#: Options that define the trajectory of a run: a resume must not change them.
RUN_DEFINING = (
    "steps", "batch_size", "seq_len", "lr", "warmup_steps", "min_lr_ratio", "weight_decay", "grad_clip",
    "seed", "max_train_tokens",
)  # fmt: skip

ADAM_BETAS = (0.9, 0.95)
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LOG_EVERY = 10  # steps between reading the loss back from the device (each read waits for the GPU)


def checkpoint_dir_for(out: Path, resume: bool, overwrite: bool) -> Path:
    """The checkpoint folder of a run writing OUT: it must exist to resume; OUT must not, unless overwritten."""
    check_output_path(out)
    checkpoint_dir = out / "checkpoint"
    if resume:
        if not (checkpoint_dir / "state.pt").is_file():
            raise StaterankError(f"{out}: no checkpoint to resume from ({checkpoint_dir}/state.pt is missing)")
    elif out.exists():
        if not overwrite:
            raise OutputExistsError(f"{out} exists; pass --overwrite to replace it, or --resume to continue it")
        # The old OUT stays in place until the new model replaces it; only a stale checkpoint goes.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return checkpoint_dir


def load_checkpoint(
    checkpoint_dir: Path, out: Path, opts: dict, run_defining: tuple[str, ...], num_sequences: int
) -> dict:
    """The checkpoint's state, after checking that the run it continues is this one."""
    state = torch.load(checkpoint_dir / "state.pt", map_location="cpu", weights_only=True)
    changed = [k for k in run_defining if state["options"][k] != opts[k]]
    if changed:
        was = ", ".join(f"{k}={state['options'][k]!r} (now {opts[k]!r})" for k in changed)
        raise StaterankError(f"{out}: cannot resume with different options: the checkpoint has {was}")
    if state["num_sequences"] != num_sequences:
        raise StaterankError(f"{out}: the training data differs from the checkpoint's")
    return state


def rng_state(device: torch.device) -> dict:
    """The random-number state a checkpoint keeps, so that a resumed run draws what the whole run would."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def lr_at(step: int, lr: float, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Linear warmup from lr/warmup to lr, then a cosine from lr down to min_lr_ratio * lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(1, steps - warmup_steps)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done)))


def batch_at(sequences: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The batch of a step: epoch e visits the sequences in a permutation seeded by (seed, e).

    Any step's batch is known without replaying the ones before it, which is what resume needs.
    """
    batches_per_epoch = sequences.shape[0] // batch_size  # the last partial batch of an epoch is dropped
    epoch, index = divmod(step, batches_per_epoch)
    order = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return sequences[order[index * batch_size : (index + 1) * batch_size]]


def train(
    config: str | os.PathLike,
    data: str,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """Pretrain the model of CONFIG on DATA and write it to OUT; return the run's summary.

    ``options`` are those of :data:`DEFAULTS`; a value of None leaves the config's or the
    default value. ``resume`` continues from ``OUT/checkpoint``. ``stop_after`` ends this call
    after that many steps with a checkpoint to resume from (for jobs with a time limit);
    the summary then has ``"finished": False`` and no model is written.

    The summary (also written to ``OUT/training.json``) holds the tokens seen, the final training
    loss (the mean of the last few steps), the validation history, the seconds spent in training
    steps (validation and checkpoints left out) and the parameter count; the returned dict has the
    trained model too, under ``"model"``.
    """
    # -- options ------------------------------------------------------------------------------
    model_fields, train_section = read_config(config)
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise StaterankError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    opts = {**DEFAULTS, **train_section, **{k: v for k, v in options.items() if v is not None}}
    if opts["save_dtype"] not in SAVE_DTYPES:
        raise StaterankError(f"save_dtype {opts['save_dtype']!r}: use one of {', '.join(SAVE_DTYPES)}")
    rules = {
        "steps": positive_int, "batch_size": positive_int, "seq_len": sequence_length, "lr": positive_float,
        "warmup_steps": non_negative_int, "min_lr_ratio": probability, "weight_decay": non_negative_float,
        "grad_clip": positive_float, "val_every": non_negative_int, "val_tokens": positive_int,
        "save_every": non_negative_int, "seed": random_seed, "vocab_size": positive_int,
        "max_train_tokens": positive_int,
    }  # fmt: skip
    for name, rule in rules.items():
        rule.check(name, opts[name], optional=name in ("vocab_size", "max_train_tokens"))  # None: the default

    model_type = model_fields["model_type"]
    prepare_runtime(model_type)  # refuses unknown families; registers fla's classes; CPU runs through PyTorch ops

    out = Path(out)
    checkpoint_dir = checkpoint_dir_for(out, resume, overwrite)

    device = torch.device(opts["device"] or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Mixed precision on GPU: float32 master weights and optimizer, bf16 matrix products.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    torch.manual_seed(opts["seed"])

    # -- tokenizer ----------------------------------------------------------------------------
    # A resumed run takes the tokenizer it started with, saved in the checkpoint.
    tokenizer_source = checkpoint_dir if resume else opts["tokenizer"]
    if tokenizer_source is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        except (OSError, ValueError) as e:
            raise StaterankError(f"{tokenizer_source}: cannot load the tokenizer ({e})") from None
    else:
        vocab_size = opts["vocab_size"] or model_fields.get("vocab_size", 4096)
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
    sequences = load_sequences(
        data, tokenizer, opts["seq_len"], max_tokens=opts["max_train_tokens"], shuffle=True, seed=opts["seed"]
    )
    batches_per_epoch = sequences.shape[0] // opts["batch_size"]  # the last partial batch of an epoch is dropped
    if batches_per_epoch == 0:
        raise DataError(
            f"{data}: {sequences.shape[0]} sequences of {opts['seq_len']} tokens, "
            f"fewer than one batch of {opts['batch_size']}"
        )
    val_sequences = None
    if opts["val_data"]:
        val_sequences = load_sequences(opts["val_data"], tokenizer, opts["seq_len"], max_tokens=opts["val_tokens"])
    print(
        f"data: {sequences.numel():,} tokens in {sequences.shape[0]:,} sequences of {opts['seq_len']}, "
        f"{batches_per_epoch:,} batches of {opts['batch_size']} an epoch, "
        f"{opts['steps'] / batches_per_epoch:.2f} epochs"
    )

    # -- optimizer ----------------------------------------------------------------------------
    # Weight decay shrinks matrices (and the embedding) only, not what the adapter exempts.
    adapter = adapter_for(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if adapter.no_weight_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": opts["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opts["lr"],
        betas=ADAM_BETAS,
        fused=device.type == "cuda",
    )

    # -- state, or the checkpoint's -----------------------------------------------------------
    step, tokens_seen, seconds, val_history = 0, 0, 0.0, []
    if resume:
        state = load_checkpoint(checkpoint_dir, out, opts, RUN_DEFINING, sequences.shape[0])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, tokens_seen, seconds, val_history = (
            state["step"], state["tokens_seen"], state["seconds"], state["val_history"]
        )  # fmt: skip
        restore_rng_state(state["rng"], device)
        print(f"resuming at step {step} of {opts['steps']}")

    def save_checkpoint() -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            "seconds": seconds,
            "val_history": val_history,
            "options": opts,
            "num_sequences": sequences.shape[0],  # the data position is the step; this guards the data
            "rng": rng_state(device),
        }
        with output_dir(checkpoint_dir, overwrite=True) as tmp:
            torch.save(state, tmp / "state.pt")
            tokenizer.save_pretrained(tmp)

    def validate() -> None:
        loss = mean_loss(model, val_sequences, opts["batch_size"], autocast)
        val_history.append({"step": step, "tokens": tokens_seen, "loss": loss, "ppl": math.exp(loss)})
        tqdm.write(f"step {step}: validation loss {loss:.4f}, perplexity {math.exp(loss):.2f}")

    # -- training loop ------------------------------------------------------------------------
    model.train()
    end = opts["steps"] if stop_after is None else min(opts["steps"], step + stop_after)
    bar = tqdm(total=opts["steps"], initial=step, unit="step", desc="train", disable=not progress, dynamic_ncols=True)
    window_loss = torch.zeros((), device=device)  # summed on the device, read every LOG_EVERY steps
    window_steps, train_loss = 0, float("nan")
    window_start, window_tokens = time.perf_counter(), 0
    while step < end:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, opts["lr"], opts["warmup_steps"], opts["steps"], opts["min_lr_ratio"])
        batch = batch_at(sequences, step, opts["batch_size"], opts["seed"]).to(device, non_blocking=True)
        with autocast:
            logits = model(input_ids=batch, use_cache=False).logits
        # Every token after the first of a sequence is predicted from the ones before it.
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opts["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        step += 1
        tokens_seen += batch.numel()
        window_loss += loss.detach()
        window_steps += 1
        window_tokens += batch.numel()
        if window_steps == LOG_EVERY or step == end:
            train_loss = window_loss.item() / window_steps
            rate = window_tokens / (time.perf_counter() - window_start)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{rate:,.0f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            window_loss.zero_()
            window_steps, window_start, window_tokens = 0, time.perf_counter(), 0
        bar.update(1)
        seconds += time.perf_counter() - started

        periodic = opts["val_every"] and step % opts["val_every"] == 0
        if val_sequences is not None and (periodic or step == opts["steps"]):
            validate()
            window_start = time.perf_counter()  # keep validation time out of the tokens/s figure
        if step < opts["steps"] and (step == end or (opts["save_every"] and step % opts["save_every"] == 0)):
            save_checkpoint()
            window_start = time.perf_counter()
    bar.close()

    summary = {
        "model_type": model_type,
        "params": params,
        "steps": step,
        "finished": step == opts["steps"],
        "tokens_seen": tokens_seen,
        "epochs": round(step / batches_per_epoch, 3),
        "final_train_loss": train_loss,
        "val_history": val_history,
        "seconds": round(seconds, 1),
        "device": str(device),
        "data": data,
        "train_tokens": sequences.numel(),
        "options": opts,
    }
    if not summary["finished"]:
        print(f"stopped at step {step} of {opts['steps']}; continue with --resume")
        return {**summary, "model": model}

    # -- the final model ----------------------------------------------------------------------
    # Converted in place: the returned model is exactly the one written.
    model.eval().to(SAVE_DTYPES[opts["save_dtype"]])
    with output_dir(out, overwrite=True) as tmp:  # replaces OUT, the checkpoint with it
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_model_card(tmp, train_card(summary, model_facts(model), str(out)))
    print(f"wrote {out}: {tokens_seen:,} tokens seen in {seconds:.0f} s")
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
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total.item() / count


def read_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model fields and the ``"train"`` section of a training config file."""
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
    unknown = sorted(set(train_section) - set(DEFAULTS))
    if unknown:
        raise StaterankError(f"{path}: unknown training option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    return config, train_section


def train_from_cli(args: Any) -> int:
    """``staterank train``: the CLI's arguments mapped onto :func:`train`."""
    summary = train(
        args.config,
        args.data,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        val_data=args.val_data,
        tokenizer=args.tokenizer,
        seed=args.seed,
        device=args.device,
    )
    if summary["val_history"]:
        print(f"final validation perplexity {summary['val_history'][-1]['ppl']:.2f}")
    return 0
