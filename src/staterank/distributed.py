"""Data parallelism over processes launched by ``torchrun`` (or ``accelerate launch``), through torch.distributed.

The launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`world` reads
them and joins the process group (NCCL for CUDA tensors, gloo for CPU tensors and Python objects).
Without them everything here is a no-op and a run is one process, so the same code serves both.

How a data-parallel run equals a one-process run over the same data:

- every rank builds the same list of batches and takes whole batches ``rank, rank + W, ...``
  (:func:`shard_batches`); streamed sums and counts are added with :func:`all_reduce_sum`, so
  every rank ends with the statistics one process would have, and makes the same selection;
- fine-tuning splits each global batch into W equal slices under DDP, whose gradient mean over
  ranks is the gradient of the mean loss over the whole batch;
- only rank 0 writes outputs (:func:`is_main`).

Errors: a block that may fail on some ranks only (loading, reading data, writing) runs inside
:func:`together`, which exchanges every rank's outcome at its end, so that a failure on one
rank raises on all of them instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from staterank.data import iterate_batches
from staterank.errors import StaterankError

#: What torchrun and accelerate launch set for every process.
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Rank 0 may write a large model while the others wait at the next collective.
TIMEOUT = timedelta(minutes=60)


class DistributedError(StaterankError):
    """A launch, a split of the work or a model on which the ranks of a data-parallel run cannot agree."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``size`` 1 is a plain one-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


_WORLD: World | None = None


def _read_environment() -> World:
    environ = os.environ
    # RANK or WORLD_SIZE mark a launch; MASTER_ADDR alone is often set cluster-wide and means nothing here.
    if ("RANK" not in environ and "WORLD_SIZE" not in environ) or environ.get("WORLD_SIZE") == "1":
        return World()
    missing = [name for name in RENDEZVOUS if name not in environ]
    if missing:
        raise DistributedError(
            f"data-parallel launch: {', '.join(missing)} not set; launch with torchrun (or accelerate launch), "
            f"which sets {', '.join(RENDEZVOUS)}"
        )
    try:
        rank, size, local_rank = (int(environ[name]) for name in RENDEZVOUS[:3])
    except ValueError:
        values = ", ".join(f"{name}={environ[name]!r}" for name in RENDEZVOUS[:3])
        raise DistributedError(f"data-parallel launch: {values}; these must be integers") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise DistributedError(
            f"data-parallel launch: RANK={rank} outside [0, WORLD_SIZE={size}), or LOCAL_RANK={local_rank} < 0"
        )
    return World(rank, size, local_rank)


def world() -> World:
    """This process's :class:`World`, joining the process group on the first call of a launched process."""
    global _WORLD
    if _WORLD is None:
        found = _read_environment()
        if found.parallel and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(found.local_rank % torch.cuda.device_count())
                backend = "cpu:gloo,cuda:nccl"
            else:
                backend = "gloo"
            dist.init_process_group(backend, rank=found.rank, world_size=found.size, timeout=TIMEOUT)
        _WORLD = found
    return _WORLD


@contextmanager
def process_group(device_type: str) -> Iterator[None]:
    """A process group for the block: the launch's, or, in a one-process run, a group of one (for FSDP2, which
    shards over a device mesh even when it holds one rank), destroyed at the block's end."""
    world()
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process writes outputs and shows progress: rank 0, or the only process."""
    return world().rank == 0


def device(requested: str | torch.device | None) -> str | torch.device | None:
    """The device of this rank: a plain ``cuda`` (or no choice, on a GPU machine) means this rank's own GPU."""
    here = world()
    if not here.parallel or not torch.cuda.is_available():
        return requested
    if requested is None or str(requested) == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return requested


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` in a one-process run."""
    here = world()
    if not here.parallel:
        return [value]
    values: list[Any] = [None] * here.size
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place (on its own device); returns it."""
    if world().parallel:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@contextmanager
def together() -> Iterator[None]:
    """Run a block on every rank; if it raised on any rank, raise on every rank when the block ends.

    A rank whose block failed raises its own error; the others raise a :class:`DistributedError`
    (or a RuntimeError for an unexpected failure) naming the first failing rank and its message.
    """
    if not world().parallel:
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # re-raised below, after every rank has reported
        error = e
    outcomes = gather_objects(None if error is None else (isinstance(error, StaterankError), str(error)))
    if error is not None:
        raise error
    for rank, outcome in enumerate(outcomes):
        if outcome is not None:
            user_error, message = outcome
            if user_error:
                raise DistributedError(f"rank {rank}: {message}")
            raise RuntimeError(f"rank {rank} failed: {message}")


def shard_batches(sequences: torch.Tensor, batch_size: int, what: str) -> list[tuple[int, torch.Tensor]]:
    """This rank's (global index, batch) pairs of the batches of ``sequences`` [n, seq_len]: batches r, r + W, ...

    Every rank must hold the same sequences, and the world size must divide the number of batches
    (so every rank does the same amount of work); otherwise a :class:`DistributedError` on every rank.
    """
    batches = list(enumerate(iterate_batches(sequences, batch_size)))
    here = world()
    if not here.parallel:
        return batches
    check_same("data", data_fingerprint(sequences), f"the {what} data")
    if len(batches) % here.size:
        raise DistributedError(
            f"{len(batches)} {what} batches ({sequences.shape[0]} sequences, batches of {batch_size}) cannot be "
            f"split evenly over {here.size} ranks; choose the batch size or the amount of data so that the "
            f"number of batches is a multiple of {here.size}"
        )
    return batches[here.rank :: here.size]


def split_batch(batch_size: int) -> slice:
    """This rank's rows of every global batch of ``batch_size`` rows (fine-tuning): W equal slices."""
    here = world()
    if batch_size % here.size:
        raise DistributedError(
            f"a batch of {batch_size} sequences cannot be split evenly over {here.size} ranks; "
            f"use a --batch-size that is a multiple of {here.size}"
        )
    rows = batch_size // here.size
    return slice(here.rank * rows, (here.rank + 1) * rows)


def data_fingerprint(sequences: torch.Tensor) -> str:
    """A short hash of token ids [n, seq_len]: ranks that read different data disagree on it."""
    return hashlib.sha256(sequences.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> tuple[str, float]:
    """(hash of the config and every parameter's name, shape and dtype; a checksum of the weights).

    The checksum is the float64 sum of |w| over all parameters: equal weights give equal sums up
    to the order of the additions, so it is compared with a tolerance.
    """
    config = getattr(model, "config", None)
    layout = {
        "config": config.to_dict() if config is not None else None,
        "parameters": [(name, list(p.shape), str(p.dtype)) for name, p in model.named_parameters()],
    }
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True, default=str).encode()).hexdigest()[:16]
    with torch.no_grad():
        checksum = sum(float(p.detach().abs().sum(dtype=torch.float64)) for p in model.parameters())
    return digest, checksum


def check_same(name: str, value: Any, what: str) -> None:
    """Raise on every rank unless every rank has the same ``value`` of ``what``."""
    values = gather_objects(value)
    if any(v != values[0] for v in values):
        differing = [rank for rank, v in enumerate(values) if v != values[0]]
        raise DistributedError(
            f"the ranks read different {what} ({name} of rank 0 differs from ranks {differing}); "
            "every rank must see the same files"
        )


def check_same_model(model: torch.nn.Module, path: str) -> None:
    """Raise on every rank unless every rank loaded the same model (layout and weights)."""
    if not world().parallel:
        return
    digest, checksum = model_fingerprint(model)
    seen = gather_objects((path, digest, checksum))
    path0, digest0, checksum0 = seen[0]
    for rank, (other_path, other_digest, other_checksum) in enumerate(seen[1:], 1):
        same_weights = abs(other_checksum - checksum0) <= 1e-6 * max(abs(checksum0), 1.0)
        if other_digest != digest0 or not same_weights:
            what = "configuration or parameter shapes" if other_digest != digest0 else "weights"
            raise DistributedError(
                f"ranks disagree on the model: rank {rank} loaded {other_path}, rank 0 {path0}, and their {what} "
                "differ; every rank must load the same model"
            )
