"""`staterank analyze` at published shapes: the whole command on a fresh process, per-sample time, a profile.

Builds a random model with published shapes (DeltaNet at fla-hub's 1.3B, or Qwen3-Next-80B's linear layers,
fewer of them if asked), saves it with the bundled tokenizer, then:

1. runs ``staterank analyze`` on it in a fresh process twice, first with an empty Triton cache (what a fresh
   machine pays, compilation included) and then with the cache the first run filled, and reports both wall times;
2. in this process, after one warm-up sample, times the analysis of ``--samples`` sequences one by one and
   profiles one of them with torch.profiler (the operators that take the most time, GPU and host);
3. checks that the metrics (staterank's threaded LAPACK SVD of the float32 states) equal those of torch's SVD
   of the states in float64 on the GPU, on every state of one sample (effective ranks; the largest relative
   difference of the others).

    python benchmarks/analyze_speed.py --shapes deltanet-1.3B --samples 8 --seq-len 2048 --out DIR
    python benchmarks/analyze_speed.py --shapes qwen3-next-80B --experts 32 --samples 8 --check-layers 6 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from staterank.analysis import collect_metrics
from staterank.loading import load, prepare_runtime
from staterank.rank import log_positions, spectral_metrics, states_at

SHAPES = {
    "deltanet-1.3B": dict(
        model_type="delta_net", hidden_size=2048, num_hidden_layers=24, num_heads=16, vocab_size=32000
    ),
    # transformers' Qwen3-Next defaults are the 80B-A3B shapes: 48 layers, 3 Gated DeltaNet : 1 attention,
    # 16 key x 32 value heads of 128 x 128
    "qwen3-next-80B": dict(model_type="qwen3_next"),
}


def build(shapes: str, layers: int | None, experts: int | None, directory: Path, device: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(SHAPES[shapes])
    prepare_runtime(fields["model_type"])
    config = AutoConfig.for_model(**fields)
    if experts is not None:  # the routed experts' count does not change a linear-attention layer or the state
        if not hasattr(config, "num_experts"):
            raise SystemExit(f"--experts: {shapes} has no experts")
        config.num_experts = experts
        config.num_experts_per_tok = min(config.num_experts_per_tok, experts)
    if layers is not None:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = config.layer_types[:layers]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.save_pretrained(directory)
    bundled = Path(__file__).resolve().parents[1] / "src" / "staterank" / "bundled" / "tiny-deltanet"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled / name, directory / name)
    del model
    return directory


def command_seconds(model: Path, samples: int, seq_len: int, out: Path, triton_cache: Path, device: str) -> float:
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_cache))
    argv = [sys.executable, "-m", "staterank", "analyze", str(model), "--data", "techdocs-val", "--samples",
            str(samples), "--seq-len", str(seq_len), "--out", str(out), "--overwrite", "--device", device]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="deltanet-1.3B")
    parser.add_argument("--layers", type=int, help="fewer layers than the published model (say so when reporting)")
    parser.add_argument("--experts", type=int, help="fewer routed experts than the published model (say so)")
    parser.add_argument("--check-layers", type=int, help="check the metrics on this many layers only (default all)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--skip-command", action="store_true", help="only the in-process timings and profile")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    model_dir = build(args.shapes, args.layers, args.experts, work / "model", args.device)
    result: dict = {"shapes": args.shapes, "layers": args.layers, "experts": args.experts, "samples": args.samples,
                    "seq_len": args.seq_len, "device": torch.cuda.get_device_name() if cuda else "cpu"}  # fmt: skip

    if not args.skip_command:
        cache = work / "triton-cache"
        for run, directory in (("fresh", "a"), ("warm", "b")):
            seconds = command_seconds(model_dir, args.samples, args.seq_len, work / directory, cache, args.device)
            result[f"command_seconds_{run}"] = seconds
        print(json.dumps(result), flush=True)

    from staterank.data import load_sequences

    loaded = load(model_dir, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32)
    sequences = load_sequences("techdocs-val", loaded.tokenizer, args.seq_len, max_tokens=args.seq_len * args.samples)
    positions = log_positions(args.seq_len)
    one = sequences[:1]
    collect_metrics(loaded, one, positions, 1e-4, 1, False, "")  # warm-up: kernels, cuSOLVER, allocator
    per_sample = []
    for i in range(len(sequences)):
        synchronize()
        start = time.perf_counter()
        collect_metrics(loaded, sequences[i : i + 1], positions, 1e-4, 1, False, "")
        synchronize()
        per_sample.append(time.perf_counter() - start)
    result["per_sample_seconds"] = per_sample

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        collect_metrics(loaded, one, positions, 1e-4, 1, False, "")
        synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "cpu_time_total", row_limit=15)
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    (out / f"profile-{args.shapes}.txt").write_text(table + "\n\n" + table_cpu)

    # the metrics against torch's SVD of the same states in float64 on the device, every state of one sample
    features = {}
    with torch.no_grad(), loaded.adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        loaded.model(input_ids=one.to(args.device))
    worst = {"effective_rank_mismatches": 0, "states": 0}
    for f in list(features.values())[: args.check_layers]:
        states = states_at(f, positions).float()
        fast = spectral_metrics(states)
        sigma = torch.linalg.svdvals(states.double())
        exact = {"effective_rank": (sigma > 1e-4 * sigma[..., :1]).sum(-1).double(), "nuclear_norm": sigma.sum(-1),
                 "stable_rank": sigma.square().sum(-1) / sigma[..., 0].square().clamp_min(1e-300)}  # fmt: skip
        worst["effective_rank_mismatches"] += int((fast["effective_rank"].double() != exact["effective_rank"]).sum())
        worst["states"] += exact["effective_rank"].numel()
        for name in ("nuclear_norm", "stable_rank"):
            diff = ((fast[name].double() - exact[name]).abs() / exact[name].abs().clamp_min(1e-30)).max().item()
            worst[name] = max(worst.get(name, 0.0), diff)
    result["metrics_against_float64_svd"] = worst
    print(json.dumps(result, indent=2), flush=True)
    (out / f"analyze-{args.shapes}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
