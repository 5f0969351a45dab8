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
import sys

import torch
import torch.nn.functional as F

from staterank.bench import graph_seconds_per_call


def per_call_us(fn) -> float:
    return 1e6 * graph_seconds_per_call(fn, calls=100, repeats=20)


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
