"""RRQR pruning of a 1.3B-shaped DeltaNet: wall time and peak memory against calibration tokens.

Random weights with the fla-hub ``delta_net-1.3B-100B`` shapes (hidden 2048, 24 layers, 16 heads,
d_k = d_v = 128) in bfloat16 on one GPU; random token ids as calibration data (the statistics'
sizes, and so the memory, do not depend on what the tokens are). Calibration streams Gram
matrices, so peak memory should not grow with the number of tokens.

    python benchmarks/prune_memory.py --tokens 65536 1048576 --out prune_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def run(tokens: int, seq_len: int, batch_size: int, ratio: float, layers: int, device: str) -> dict:
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    from staterank.calibrate import calibrate
    from staterank.models import adapter_for
    from staterank.prune.channels import get_criterion
    from staterank.prune.qk import kept_dim

    torch.manual_seed(0)
    config = DeltaNetConfig(hidden_size=2048, num_hidden_layers=layers, num_heads=16, vocab_size=32000)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # build on the device: host memory then measures calibration alone
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    cuda = device == "cuda"
    adapter = adapter_for(model)
    sequences = torch.randint(0, config.vocab_size, (tokens // seq_len, seq_len))
    with torch.no_grad():  # compile the kernels for these shapes outside the timed region
        model(input_ids=sequences[:batch_size].to(device))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    calibration = calibrate(adapter, sequences, batch_size=batch_size, progress=False)
    if cuda:
        torch.cuda.synchronize()
    calibrate_seconds = time.perf_counter() - start
    criterion = get_criterion("rrqr")
    keep = kept_dim(128, ratio)
    generator = torch.Generator().manual_seed(0)
    selections = {
        layer: criterion.select(calibration[layer], adapter.qk_weights(layer), keep, generator)
        for layer in adapter.linear_layers()
    }
    adapter.keep_qk_channels({layer: s.index for layer, s in selections.items()})
    if cuda:
        torch.cuda.synchronize()
    return {
        "calib_tokens": calibration.tokens,
        "calibrate_seconds": calibrate_seconds,
        "calibrate_tokens_per_s": calibration.tokens / calibrate_seconds,
        "select_seconds": time.perf_counter() - start - calibrate_seconds,
        "total_seconds": time.perf_counter() - start,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "peak_host_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[65536, 1048576])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    from staterank.loading import prepare_runtime

    prepare_runtime("delta_net")
    rows = []
    for tokens in args.tokens:  # one process each would isolate host RSS; ru_maxrss only grows, so go small first
        rows.append(run(tokens, args.seq_len, args.batch_size, args.ratio, args.layers, args.device))
        print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"\nRRQR at ratio {args.ratio}, DeltaNet 1.3B shapes ({args.layers} layers), {device_name}")
    print(f"{'tokens':>9} {'calib s':>8} {'tok/s':>9} {'select s':>8} {'peak GPU GiB':>12} {'peak host GiB':>13}")
    for r in rows:
        print(
            f"{r['calib_tokens']:>9} {r['calibrate_seconds']:>8.1f} {r['calibrate_tokens_per_s']:>9.0f} "
            f"{r['select_seconds']:>8.1f} {r['peak_gpu_bytes'] / 2**30:>12.2f} "
            f"{r['peak_host_rss_bytes'] / 2**30:>13.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
