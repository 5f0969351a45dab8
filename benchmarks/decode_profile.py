"""Where one graphed decoding step spends its time: kernels by kind, their sum, and the gaps (needs a CUDA GPU).

For each model config (random weights, published shapes) and batch size: the graphed step's time (median of
``--repeats`` replays of ``--steps`` steps, as ``staterank bench`` times it) against the bandwidth bound, then the
same step run through the static cache without the graph under torch.profiler, whose kernels are summed by kind:

- ``recurrent``: the linear-attention update (fla's fused recurrent kernels, the delta rule's decoding step);
- ``matmul``: projections, MLPs and the output layer (cuBLAS / CUTLASS / nvjet GEMMs and GEMVs);
- ``conv``: the short causal convolutions;
- ``attention``: softmax attention of a hybrid's full-attention layers;
- ``routing``: a mixture of experts' router (top-k, sorting, and the gathers and scatters of tokens to experts);
- ``other``: norms, activations, copies and every other element-wise kernel;
- ``compiled``: with ``--compile``, the kernels Inductor generated (norms, activations and copies fused).

Each kernel runs as long with or without the graph, so ``graph time - kernel time`` is what the graph still
loses between kernels (launch gaps and dependencies inside the graph). For a mixture of experts the row also
holds ``routed_estimate_us_per_step``: the bound with only the experts a batch is expected to read under uniform
routing (``staterank.bench.routed_decode_bytes_per_step``), the figure its small batches are held against.
``--out`` is rewritten (atomically) after every row, so a run cut short keeps the rows it finished.

    python benchmarks/decode_profile.py configs/bench/deltanet-1.3B.json configs/bench/deltanet-1.3B-keys50.json \\
        --batch-sizes 1,256 --out decode-profile.json
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import torch

KINDS = (
    ("compiled", re.compile(r"^triton_(poi|red|per|tem)_")),  # Inductor's fused kernels (--compile)
    ("recurrent", re.compile(r"recurrent|delta_rule|kda|gla|decode_step", re.I)),
    ("conv", re.compile(r"conv", re.I)),
    ("attention", re.compile(r"flash|attn|attention|sdpa|fmha", re.I)),
    ("routing", re.compile(r"topk|sort|scatter|gather|index|histogram|bincount|cumsum", re.I)),
    ("matmul", re.compile(r"gemm|gemv|nvjet|cutlass|sm90_xmma|cublas|splitK|matmul", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def profile_step(decoder, steps: int) -> tuple[dict[str, float], list[tuple[str, float, int]]]:
    """Kernel microseconds per step by kind, and the top kernels (name, microseconds per step, launches per step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = {}
    per_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us() / steps
        per_kind[kind_of(event.name)] = per_kind.get(kind_of(event.name), 0.0) + us
        per_name.setdefault(event.name, []).append(us)
    top = sorted(((n, sum(t), len(t) // steps) for n, t in per_name.items()), key=lambda r: -r[1])[:12]
    return per_kind, top


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--row-major", action="store_true", help="keep every weight row-major (no relayout)")
    parser.add_argument("--compile", action="store_true", help="graph (and profile) the step compiled by torch.compile")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    from staterank.bench import (
        GraphedDecoder,
        StaticDecoder,
        decode_bytes_per_step,
        measure_bandwidth_bytes_per_s,
        routed_decode_bytes_per_step,
    )
    from staterank.commands import _from_config
    from staterank.io import write_json

    bandwidth = measure_bandwidth_bytes_per_s(torch.device("cuda"))
    result = {"device": torch.cuda.get_device_name(), "bandwidth_bytes_per_s": bandwidth, "steps": args.steps,
              "repeats": args.repeats, "compiled": args.compile}  # fmt: skip
    rows = []
    for config in args.configs:
        loaded = _from_config(config, "cuda", torch.bfloat16)
        state_bytes = loaded.adapter.state_bytes_per_seq()
        # largest batch first, as staterank bench does (fla autotunes its conv update once, whatever the batch)
        for batch in sorted((int(b) for b in args.batch_sizes.split(",")), reverse=True):
            prompt = torch.randint(0, loaded.model.config.vocab_size, (batch, 16), device="cuda")
            capacity = 4 + args.steps * (args.repeats + 2)
            graphed = GraphedDecoder(loaded.model, prompt, capacity, relayout=not args.row_major, compile=args.compile)
            times = []
            for _ in range(args.repeats + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.steps):
                    graphed.step()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - start) / args.steps * 1e6)
            graph_us = statistics.median(times[1:])
            transposed = graphed.transposed
            del graphed
            # profiled in the graphed layout (compiled alike; Inductor's cache makes that quick)
            static = StaticDecoder(loaded.model, prompt, 3 + 2 * args.steps, compile=args.compile)
            for _ in range(3):  # Triton's autotuning and first launches out of the profile
                static.step()
            per_kind, top = profile_step(static, args.steps)
            del static
            kernel_us = sum(per_kind.values())
            bound_us = 1e6 * decode_bytes_per_step(loaded.model, state_bytes, batch) / bandwidth
            routed = routed_decode_bytes_per_step(loaded.model, state_bytes, batch)
            row = {
                "config": config,
                "batch": batch,
                "graph_us_per_step": graph_us,
                "bound_us_per_step": bound_us,
                "of_bound": bound_us / graph_us,
                "routed_estimate_us_per_step": None if routed is None else 1e6 * routed / bandwidth,
                "transposed_projections": transposed,
                "kernel_us_per_step": kernel_us,
                "gaps_us_per_step": graph_us - kernel_us,
                "kernel_us_by_kind": per_kind,
                "top_kernels": [{"name": n[:120], "us_per_step": t, "launches_per_step": c} for n, t, c in top],
            }
            print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
            rows.append(row)
            # after every row, atomically: a run cut short (a time limit, the next model out of memory) keeps it
            write_json(args.out, {**result, "rows": rows})
        del loaded
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
