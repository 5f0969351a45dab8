"""The batch-1 projections of a decoding step: which layout cuBLAS runs fastest (needs a CUDA GPU).

A pruned DeltaNet-1.3B decodes batch 1 slower than the full one because cuBLAS runs its 2048 -> 1024 q/k
projections with a kernel twice as slow as the full model's 2048 -> 2048 ones (see RESULTS.md). This times, for
bf16 inputs ``[B, 2048]`` and several output widths: ``F.linear`` (the layers' call) under cuBLAS and cuBLASLt,
and two products of the q and k weights concatenated, as one ``[2 * out, 2048]`` projection would run. Each
figure is the median of CUDA-graph replays of 100 calls, in microseconds per call.

    python benchmarks/projection_kernels.py --out projections.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F


def per_call_us(fn, calls: int = 100, repeats: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(times)


def layouts(x: torch.Tensor, w: torch.Tensor, both: torch.Tensor, width: int) -> dict[str, float]:
    row = {}
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        row[f"linear_{library}_us"] = per_call_us(lambda: F.linear(x, w))
        row[f"two_linear_{library}_us"] = per_call_us(lambda: (F.linear(x, w), F.linear(x, w)))
        row[f"fused_qk_{library}_us"] = per_call_us(lambda: F.linear(x, both).split(width, -1))
    torch.backends.cuda.preferred_blas_library("cublas")
    wt = w.t().contiguous()
    row["matmul_transposed_copy_us"] = per_call_us(lambda: x @ wt)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="*", default=[2048, 1536, 1024, 512])
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, args.hidden, device="cuda", dtype=torch.bfloat16)
        for width in args.widths:
            w = torch.randn(width, args.hidden, device="cuda", dtype=torch.bfloat16)
            both = torch.randn(2 * width, args.hidden, device="cuda", dtype=torch.bfloat16)
            row = {"batch": batch, "in": args.hidden, "out": width, **layouts(x, w, both, width)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
