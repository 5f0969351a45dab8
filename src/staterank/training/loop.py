"""The one training loop, shared by pretraining and LoRA recovery, read top to bottom like nanoGPT's train.py.

:func:`train_loop` takes what differs between runs as arguments (the loss of a batch, the parameter
groups to optimise, the files a checkpoint needs besides its state, a validation hook) and does the rest:

1. AdamW (betas 0.9, 0.95; fused on CUDA), the learning rate of :func:`lr_at` (linear warmup, then a
   cosine down to ``min_lr_ratio * lr``), gradient-norm clipping, bf16 autocast on CUDA;
2. the batch of a step from :func:`batch_at`, optionally split into micro-batches whose gradients add up to
   the whole batch's (gradient accumulation);
3. under torchrun, data parallel (DDP): every rank takes ``batch_size / W`` rows of each batch and DDP
   averages the gradients, so a step is the step one process takes on the whole batch; rank 0 writes;
4. the mean losses every :data:`LOG_EVERY` steps, validation every ``validate_every`` steps and at the end;
5. a checkpoint every ``save_every`` steps and when stopped early (``stop_after``): the trained parameters,
   the optimizer, every rank's random-number state and the :class:`State`.

Resuming gives the same final weights as an uninterrupted run: the learning rate and the batch of a step
are pure functions of the step (no scheduler or data-loader state), and the checkpoint holds everything
else that changes. :func:`write_output` then writes the final output, atomically.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from staterank import distributed
from staterank.data import load_sequences
from staterank.errors import DataError, OutputExistsError, StaterankError
from staterank.io import output_dir
from staterank.loading import input_device
from staterank.validate import check_output_path

ADAM_BETAS = (0.9, 0.95)
#: 2: parameters and optimizer state keyed by parameter name, gathered in full (any sharding, any world size)
CHECKPOINT_VERSION = 2
LOG_EVERY = 10  # steps between reading the losses back from the device (each read waits for the GPU)

#: The loss of a batch: (the model to call, token ids [rows, seq_len]) -> named scalar losses. The first,
#: "loss", is minimised; the others (its parts) are only logged.
Loss = Callable[[torch.nn.Module, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class State:
    """Where a run is; every checkpoint holds it."""

    step: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0  # spent in training steps (validation and checkpoints left out)
    losses: list[dict[str, float]] = field(default_factory=list)  # every LOG_EVERY steps: the step, each mean loss
    validations: list[dict[str, Any]] = field(default_factory=list)  # the validate hook's results, step and tokens
    final_loss: float = math.nan  # the mean loss of the last logged steps
    finished: bool = False  # all the steps done (not stopped early)
    peak_memory_gib_by_rank: list[float] | None = None  # CUDA: the largest memory allocated, on each rank


def train_loop(
    model: torch.nn.Module,
    loss: Loss,
    param_groups: list[dict[str, Any]],
    sequences: torch.Tensor,
    options: dict[str, Any],
    run_defining: tuple[str, ...],
    checkpoint_dir: Path,
    *,
    resume: bool = False,
    save_every: int = 0,
    checkpoint_files: Callable[[Path], None] | None = None,
    validate: Callable[[int], dict[str, Any]] | None = None,
    validate_every: int = 0,
    micro_batch_size: int | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    name: str = "train",
    parallel: str = "ddp",
    blocks: list[torch.nn.Module] | None = None,
) -> State:
    """Train MODEL's parameters in ``param_groups`` on SEQUENCES [n, seq_len]; return the run's :class:`State`.

    ``options`` are the run's options, recorded in every checkpoint; the loop reads ``steps``,
    ``batch_size``, ``lr``, ``warmup_steps``, ``min_lr_ratio``, ``grad_clip`` and ``seed`` from them, and a
    resume refuses a checkpoint whose ``run_defining`` options differ. ``param_groups`` are AdamW's
    groups, each with its ``weight_decay``; every parameter that requires a gradient is clipped and
    checkpointed. ``checkpoint_files(directory)`` writes what a resume needs besides the state (a
    tokenizer). ``validate(step)`` returns a record (printing it is the hook's part), kept in
    ``State.validations`` with the step and the tokens seen. ``micro_batch_size``: rows per forward and
    backward pass on each rank (None: the rank's whole slice of the batch).

    ``parallel``: ``"ddp"`` keeps a replica of the model on every rank of a launch (DDP); ``"fsdp"`` shards it
    over the ranks with FSDP2 (``fully_shard`` on each of ``blocks``, the decoder layers, then on the whole
    model; bf16 parameters and float32 gradient reduction on CUDA), also in one process (inside
    :func:`staterank.distributed.process_group`). Checkpoints hold the trained parameters and their optimizer
    state gathered in full (through ``torch.distributed.checkpoint.state_dict``), so a run resumes with another
    world size or the other choice.
    """
    steps, batch_size, seed = options["steps"], options["batch_size"], options["seed"]
    device = input_device(model)  # where batches go: the embedding's device (a device map spreads the rest)
    here = distributed.world()
    rows = distributed.split_batch(batch_size)  # this rank's rows of every batch
    # DDP averages the gradients of the ranks' slices: the gradient of the mean loss over the whole batch.
    trained = model
    if parallel == "fsdp":
        param_groups = shard(model, blocks or [], device, param_groups)
    elif here.parallel:
        trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups, lr=options["lr"], betas=ADAM_BETAS, fused=device.type == "cuda")
    autocast = mixed_precision(device)
    # the trained parameters and their optimizer state, gathered in full whatever the sharding
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)

    # -- the state, or the checkpoint's --------------------------------------------------------
    state = State()
    if resume:
        with distributed.together():  # every rank reads the checkpoint rank 0 wrote
            saved = load_checkpoint(checkpoint_dir, options, run_defining, sequences.shape[0])
        # the trained parameters (the others are rebuilt) and their optimizer state, sharded as this run is
        set_state_dict(model, optimizer, model_state_dict=saved["parameters"], optim_state_dict=saved["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))  # fmt: skip
        state = State(**saved["state"])
        ranks_rng = saved["rng_by_rank"]
        restore_rng_state(ranks_rng[here.rank] if len(ranks_rng) == here.size else saved["rng"], device)
        if distributed.is_main():
            print(f"resuming at step {state.step} of {steps}")

    def save_checkpoint() -> None:
        parameters, optimizer_state = get_state_dict(model, optimizer, options=full)  # every rank takes part
        saved = {
            "version": CHECKPOINT_VERSION,
            "parameters": parameters,
            "optimizer": optimizer_state,
            "state": asdict(state),
            "options": options,
            "num_sequences": sequences.shape[0],  # the data position is the step; this guards the data
            "rng": rng_state(device),
            "rng_by_rank": distributed.gather_objects(rng_state(device)),
        }
        with distributed.together():
            if distributed.is_main():
                with output_dir(checkpoint_dir, overwrite=True) as tmp:
                    torch.save(saved, tmp / "state.pt")
                    if checkpoint_files is not None:
                        checkpoint_files(tmp)

    # -- the loop ------------------------------------------------------------------------------
    if device.type == "cuda":  # the run's own peak, not an earlier run's in this process
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    end = steps if stop_after is None else min(steps, state.step + stop_after)
    shown = progress and distributed.is_main()
    bar = tqdm(total=steps, initial=state.step, unit="step", desc=name, disable=not shown, dynamic_ncols=True)
    window: dict[str, torch.Tensor] = {}  # loss sums kept on the device, read every LOG_EVERY steps
    window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
    while state.step < end:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state.step, options["lr"], options["warmup_steps"], steps, options["min_lr_ratio"])
        batch = batch_at(sequences, state.step, batch_size, seed)  # [batch_size, seq_len]
        step_losses = backward(trained, loss, batch[rows].to(device, non_blocking=True), micro_batch_size, autocast)
        torch.nn.utils.clip_grad_norm_(trainable, options["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.tokens_seen += batch.numel()
        window = {key: window.get(key, 0) + value for key, value in step_losses.items()}
        window_steps += 1
        window_tokens += batch.numel()
        if window_steps == LOG_EVERY or state.step == end:
            # The ranks' slices are equal: the mean of their means is the batch's mean.
            sums = distributed.all_reduce_sum(torch.stack(list(window.values()))).tolist()
            means = {key: total / (window_steps * here.size) for key, total in zip(window, sums, strict=True)}
            state.losses.append({"step": state.step, **means})
            state.final_loss = means["loss"]
            rate = window_tokens / (time.perf_counter() - window_start)
            lr = optimizer.param_groups[0]["lr"]
            memory = {}
            if device.type == "cuda":  # this rank's peak (rank 0's, as the bar shows)
                memory["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"
            bar.set_postfix(loss=f"{means['loss']:.3f}", tok_s=f"{rate:,.0f}", lr=f"{lr:.2e}", **memory)
            window = {}
            window_steps, window_tokens, window_start = 0, 0, time.perf_counter()
        bar.update(1)
        state.seconds += time.perf_counter() - started

        periodic = validate_every and state.step % validate_every == 0
        if validate is not None and (periodic or state.step == steps):
            state.validations.append({"step": state.step, "tokens": state.tokens_seen, **validate(state.step)})
            window_start = time.perf_counter()  # keep validation time out of the tokens/s figure
        if state.step < steps and (state.step == end or (save_every and state.step % save_every == 0)):
            save_checkpoint()
            window_start = time.perf_counter()
    bar.close()

    state.finished = state.step == steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        state.peak_memory_gib_by_rank = [round(x, 2) for x in distributed.gather_objects(peak)]
    if not state.finished and distributed.is_main():
        print(f"stopped at step {state.step} of {steps}; continue with --resume")
    return state


def backward(
    model: torch.nn.Module,
    loss: Loss,
    batch: torch.Tensor,
    micro_batch_size: int | None,
    autocast: torch.autocast,
) -> dict[str, torch.Tensor]:
    """Backpropagate the loss of BATCH [rows, seq_len] in micro-batches; return the batch's losses, detached.

    Every micro-batch's losses are means over its tokens, so weighted by its share of the rows they
    add up to the batch's mean, and so do the gradients. Under DDP the gradients are averaged over
    the ranks at the last micro-batch only.
    """
    micro_batches = batch.split(micro_batch_size or batch.shape[0])
    totals: dict[str, torch.Tensor] = {}
    for i, micro in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if isinstance(model, FSDPModule):  # reduce-scatter the gradients at the last micro-batch only
            model.set_requires_gradient_sync(last)
        accumulating = isinstance(model, DistributedDataParallel) and not last
        with model.no_sync() if accumulating else contextlib.nullcontext():
            with autocast:
                losses = loss(model, micro)
            share = micro.shape[0] / batch.shape[0]
            (losses["loss"] * share).backward()
        totals = {key: totals.get(key, 0) + value.detach() * share for key, value in losses.items()}
    return totals


def shard(
    model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device, param_groups: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Shard MODEL over the launch's ranks with FSDP2, in place: each of ``blocks``, then the rest; return
    ``param_groups`` with the sharded parameters (``fully_shard`` replaces every parameter by a DTensor one).

    Needs a process group (the launch's, or :func:`staterank.distributed.process_group`'s group of one).
    """
    if not dist.is_initialized():
        raise StaterankError("sharding needs a process group: launch with torchrun, or run in a group of one")
    names = {id(p): name for name, p in model.named_parameters()}
    grouped = [[names[id(p)] for p in group["params"]] for group in param_groups]
    # bf16 compute with the float32 LoRA weights sharded as float32 masters, gradients reduced in float32
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    now = dict(model.named_parameters())
    return [{**group, "params": [now[n] for n in group_names]} for group, group_names in zip(param_groups, grouped,
                                                                                           strict=True)]


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 matrix products on GPU with float32 master weights and optimizer; off on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of every token after the first, predicted from the ones before it.

    ``logits`` [batch, seq, vocab] of ``input_ids`` [batch, seq]; a mean (or sum) over batch x (seq - 1) tokens.
    """
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


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


def training_sequences(
    data: str, tokenizer: Any, seq_len: int, batch_size: int, max_tokens: int | None, seed: int
) -> torch.Tensor:
    """DATA as packed sequences [n, seq_len], documents shuffled by SEED: at least one batch, the same on every rank."""
    with distributed.together():  # load_sequences raises DataError when the corpus holds no sequence of seq_len
        sequences = load_sequences(data, tokenizer, seq_len, max_tokens=max_tokens, shuffle=True, seed=seed)
        if sequences.shape[0] < batch_size:
            raise DataError(
                f"{data}: {sequences.shape[0]} sequences of {seq_len} tokens, fewer than one batch of {batch_size}"
            )
    if distributed.world().parallel:
        distributed.check_same("data", distributed.data_fingerprint(sequences), "training data")
    return sequences


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
        # The old OUT stays in place until the new output replaces it; only a stale checkpoint goes.
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return checkpoint_dir


def load_checkpoint(checkpoint_dir: Path, options: dict, run_defining: tuple[str, ...], num_sequences: int) -> dict:
    """The checkpoint's contents, after checking that the run it continues is this one."""
    out = checkpoint_dir.parent
    saved = torch.load(checkpoint_dir / "state.pt", map_location="cpu", weights_only=True)
    if saved.get("version") != CHECKPOINT_VERSION:
        raise StaterankError(f"{out}: the checkpoint is of an older staterank; start again with --overwrite")
    changed = [k for k in run_defining if saved["options"][k] != options[k]]
    if changed:
        was = ", ".join(f"{k}={saved['options'][k]!r} (now {options[k]!r})" for k in changed)
        raise StaterankError(f"{out}: cannot resume with different options: the checkpoint has {was}")
    if saved["num_sequences"] != num_sequences:
        raise StaterankError(f"{out}: the training data differs from the checkpoint's")
    return saved


def rng_state(device: torch.device) -> dict:
    """The random-number state a checkpoint keeps, so that a resumed run draws what the whole run would."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_output(out: Path, save: Callable[[Path], None], state: State) -> None:
    """Rank 0 writes OUT with ``save(directory)``: into a temporary directory renamed into place, replacing OUT
    and the checkpoint in it. Every rank waits for it."""
    with distributed.together():
        if distributed.is_main():
            with output_dir(out, overwrite=True) as tmp:
                save(tmp)
            print(f"wrote {out}: {state.tokens_seen:,} tokens seen in {state.seconds:.0f} s")
