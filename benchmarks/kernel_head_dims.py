"""Which key-head dims fla's kernels accept, and how one mixer's time varies with d_k (needs a CUDA GPU).

For the published 1.3B shapes (DeltaNet: hidden 2048, 16 heads, d_v 128; Gated DeltaNet: hidden
2048, 6 heads, d_v 512) and a list of d_k, builds one fla mixer with random bf16 weights and
measures, on B x T tokens: whether the chunk kernel (prefill/training) and the fused recurrent
kernel (decoding, one token) run and agree with a float32 reference on the CPU backend, and the
median forward time of the whole mixer (projections, convolutions, kernel, norm, output).

Triton compiles (and autotunes) every new shape, which takes tens of seconds; ``--warm`` runs one
process per shape in parallel first so that the timed run finds the kernels in Triton's cache.

    python benchmarks/kernel_head_dims.py --family delta_net --dims 128 112 96 80 64 48 32 --out dims.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def build(family: str, head_k_dim: int):
    from fla.layers import DeltaNet, GatedDeltaNet

    if family == "delta_net":  # fla-hub/delta_net-1.3B-100B: 16 heads of d_k = d_v = 128
        return DeltaNet(
            hidden_size=2048, num_heads=16, expand_k=16 * head_k_dim / 2048, expand_v=1.0, use_gate=False, layer_idx=0
        )
    # fla-hub/gated_deltanet-1.3B-100B: 6 heads, head_dim 256, d_v 512
    return GatedDeltaNet(hidden_size=2048, num_heads=6, head_dim=head_k_dim, expand_v=512 / head_k_dim, layer_idx=0)


def check_shape(family: str, head_k_dim: int, batch: int, seq_len: int, repeats: int) -> dict:
    from triton.testing import do_bench

    torch.manual_seed(0)
    mixer = build(family, head_k_dim).cuda().to(torch.bfloat16).eval()
    x = torch.randn(batch, seq_len, 2048, device="cuda", dtype=torch.bfloat16)
    row: dict = {"family": family, "head_k_dim": head_k_dim}
    try:
        with torch.no_grad():
            out = mixer(x)[0]
            small = x[:1, :256]
            reference = mixer.float().cpu()(small.float().cpu())[0]
            mixer.cuda().to(torch.bfloat16)
            chunk = mixer(small)[0].float().cpu()
        row["chunk_ok"] = bool(torch.isfinite(out).all())
        row["chunk_rel_err_vs_cpu_fp32"] = ((chunk - reference).norm() / reference.norm()).item()
    except Exception as e:  # the kernel's own error says why a shape is refused
        row["chunk_ok"], row["chunk_error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        from fla.models.utils import Cache

        with torch.no_grad():
            cache = Cache()
            mixer(x[:, :16], past_key_values=cache, use_cache=True)
            step = mixer(x[:, 16:17], past_key_values=cache, use_cache=True)[0]
        row["recurrent_ok"] = bool(torch.isfinite(step).all())
    except Exception as e:
        row["recurrent_ok"], row["recurrent_error"] = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if row["chunk_ok"]:
        with torch.no_grad():
            row["mixer_ms"] = do_bench(lambda: mixer(x), warmup=200, rep=repeats, return_mode="median")
        row["tokens"] = batch * seq_len
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["delta_net", "gated_deltanet"], default="delta_net")
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 112, 96, 80, 64, 48, 32])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=500, help="milliseconds of timed repeats per shape")
    parser.add_argument("--warm", action="store_true", help="compile every shape in parallel processes first")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: warm one shape and exit
    parser.add_argument("--out")
    args = parser.parse_args()
    from staterank.loading import prepare_runtime

    prepare_runtime(args.family)
    if args.one is not None:
        check_shape(args.family, args.one, args.batch, args.seq_len, repeats=20)
        return 0
    if args.warm:
        start = time.perf_counter()
        common = ["--family", args.family, "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
        jobs = [subprocess.Popen([sys.executable, __file__, *common, "--one", str(d)]) for d in args.dims]
        for job in jobs:
            job.wait()
        print(f"warmed {len(jobs)} shapes in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for dim in args.dims:
        rows.append(check_shape(args.family, dim, args.batch, args.seq_len, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["mixer_ms"] for r in rows if r["head_k_dim"] == max(args.dims) and "mixer_ms" in r), None)
    print(f"\n{args.family}, one mixer, {args.batch} x {args.seq_len} tokens, bf16, {torch.cuda.get_device_name()}")
    print(f"{'d_k':>4} {'chunk':>6} {'recurrent':>9} {'ms':>8} {'speed-up':>8} {'rel err':>8}")
    for r in rows:
        ms = r.get("mixer_ms")
        print(
            f"{r['head_k_dim']:>4} {str(r['chunk_ok']):>6} {str(r['recurrent_ok']):>9} "
            f"{ms if ms is None else f'{ms:8.2f}':>8} {'' if ms is None or base is None else f'{base / ms:7.2f}x':>8} "
            f"{r.get('chunk_rel_err_vs_cpu_fp32', float('nan')):8.1e}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
