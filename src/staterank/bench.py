"""Side-by-side speed and memory of models: prefill throughput, decode time per token, state bytes.

All models run in one process on the same inputs; repeats are interleaved (model A, model B, A, B,
...) so drifting clocks and caches hit every model alike; medians and spreads are reported with the
ratios to the first model. Decoding here is eager (one forward per generated token through the
model's cache); it is launch-bound on GPUs, which hides the effect of a smaller state (see
docs/RESULTS.md).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from staterank.errors import StaterankError
from staterank.loading import LoadedModel


class BenchError(StaterankError):
    """Models or options that cannot be benchmarked side by side."""


@dataclass
class Timing:
    median: float
    spread: float  # (max - min) / median over the repeats

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        median = statistics.median(samples)
        return cls(median, (max(samples) - min(samples)) / median if median > 0 else 0.0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def _prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False)


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, steps: int) -> None:
    """Greedy-free decoding: feed fixed tokens one at a time through the cache (the cost, not the text)."""
    out = model(input_ids=prompt, use_cache=True)
    cache = out.past_key_values
    token = prompt[:, -1:]
    for _ in range(steps):
        cache = model(input_ids=token, past_key_values=cache, use_cache=True).past_key_values


def bench(
    models: list[LoadedModel],
    names: list[str],
    batch_size: int = 8,
    seq_len: int = 2048,
    decode_batch_sizes: tuple[int, ...] = (1, 64),
    decode_steps: int = 32,
    warmup: int = 1,
    repeats: int = 5,
    memory_budget_bytes: int | None = None,
    seed: int = 0,
) -> dict:
    """Measure every model on the same random token ids; return the JSON of DESIGN.md section 6."""
    if not models:
        raise BenchError("give at least one model")
    vocab_sizes = {m.model.config.vocab_size for m in models}
    if len(vocab_sizes) > 1:
        raise BenchError(f"models with different vocabularies ({sorted(vocab_sizes)}) cannot share inputs")
    device = next(models[0].model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    vocab = vocab_sizes.pop()
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    prompts = {b: torch.randint(0, vocab, (b, 16), generator=generator).to(device) for b in decode_batch_sizes}

    prefill: dict[int, list[float]] = {i: [] for i in range(len(models))}
    decode: dict[tuple[int, int], list[float]] = {(i, b): [] for i in range(len(models)) for b in decode_batch_sizes}
    peak: dict[int, int | None] = {}
    for repeat in range(warmup + repeats):
        for i, loaded in enumerate(models):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = _timed(lambda m=loaded.model: _prefill(m, ids), device)
            if repeat >= warmup:
                prefill[i].append(seconds)
                peak[i] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            for b in decode_batch_sizes:
                seconds = _timed(lambda m=loaded.model, p=prompts[b]: _decode(m, p, decode_steps), device)
                if repeat >= warmup:
                    decode[(i, b)].append(seconds)

    rows = []
    for i, (loaded, name) in enumerate(zip(models, names, strict=True)):
        prefill_time = Timing.of(prefill[i])
        state_bytes = loaded.adapter.state_bytes_per_seq()
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        row = {
            "name": name,
            "prefill_tokens_per_s": batch_size * seq_len / prefill_time.median,
            "prefill_spread": prefill_time.spread,
            "decode_ms_per_token": {},
            "decode_spread": {},
            "peak_mem_bytes": peak.get(i),
            "state_bytes_per_seq": state_bytes,
            "weight_bytes": weight_bytes,
        }
        for b in decode_batch_sizes:
            # the prompt's prefill is part of each run; at 16 tokens it is small next to decode_steps steps
            timing = Timing.of(decode[(i, b)])
            row["decode_ms_per_token"][str(b)] = 1000 * timing.median / decode_steps
            row["decode_spread"][str(b)] = timing.spread
        if memory_budget_bytes is not None:
            row["max_batch_in_budget"] = max(0, (memory_budget_bytes - weight_bytes) // state_bytes)
        rows.append(row)

    first = rows[0]
    speedup = {
        row["name"]: {
            "prefill": row["prefill_tokens_per_s"] / first["prefill_tokens_per_s"],
            "decode": {
                b: first["decode_ms_per_token"][b] / row["decode_ms_per_token"][b] for b in row["decode_ms_per_token"]
            },
            "state_bytes": first["state_bytes_per_seq"] / row["state_bytes_per_seq"],
        }
        for row in rows[1:]
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(next(models[0].model.parameters()).dtype).removeprefix("torch."),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "decode_steps": decode_steps,
        "warmup": warmup,
        "repeats": repeats,
        "decode_mode": "eager",
        "models": rows,
        "speedup": speedup,
    }
