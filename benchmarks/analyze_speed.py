"""`staterank analyze` at published shapes: where the time goes, per-sample time, and the whole command fresh.

Builds a random model with published shapes (DeltaNet at fla-hub's 1.3B, or Qwen3-Next-80B's linear layers,
with fewer layers or routed experts if asked: say so), saves it with the bundled tokenizer, then, in this
process with an empty Triton cache:

1. the first sample under cProfile: its wall time and how much of it is Triton compiling and autotuning;
2. each of ``--samples`` sequences timed one by one, and one sample split into its phases (the model's forward
   with the feature tap, the state reconstruction, the singular values);
3. one sample under torch.profiler (the operators that take the most time, GPU and host);
4. the metrics against torch's SVD of the same states in float64 on the CPU (effective ranks must be equal;
   the largest relative difference of the others), on ``--check-layers`` layers of one sample;

and finally ``staterank analyze`` in fresh processes: first with an empty Triton cache (what a fresh machine
pays, compilation included), then with the cache that run filled, and once more so under cProfile (where the
time outside the samples goes); with ``--torch-kernels`` these run with ``STATERANK_TORCH_KERNELS=all``
(staterank's PyTorch kernels instead of fla's Triton ones: nothing to compile), and ``--also-torch-kernels``
adds a fresh command with them.

    python benchmarks/analyze_speed.py --shapes deltanet-1.3B --samples 8 --seq-len 2048 --out DIR
    python benchmarks/analyze_speed.py --shapes qwen3-next-80B --experts 32 --samples 8 --check-layers 6 --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":  # before Triton is imported: the in-process runs start from an empty cache
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-cache-"))

import torch  # noqa: E402

from staterank import rank  # noqa: E402
from staterank.analysis import collect_metrics  # noqa: E402
from staterank.loading import load, prepare_runtime  # noqa: E402
from staterank.rank import log_positions, spectral_metrics, states_at  # noqa: E402

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


def command_seconds(
    model: Path,
    samples: int,
    seq_len: int,
    out: Path,
    triton_cache: Path,
    device: str,
    torch_kernels: bool,
    profile: Path | None = None,
) -> float:
    """Wall time of ``staterank analyze`` in a fresh process; under cProfile (stats to ``profile``) if given."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(triton_cache))
    if torch_kernels:
        env["STATERANK_TORCH_KERNELS"] = "all"
    profiler = [] if profile is None else ["-m", "cProfile", "-o", str(profile)]
    argv = [sys.executable, *profiler, "-m", "staterank", "analyze", str(model), "--data", "techdocs-val", "--samples",
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
    parser.add_argument("--skip-in-process", action="store_true", help="only the whole command, fresh and warm")
    parser.add_argument("--torch-kernels", action="store_true", help="the commands with STATERANK_TORCH_KERNELS=all")
    parser.add_argument(
        "--also-torch-kernels", action="store_true", help="then the fresh command once more with the PyTorch kernels"
    )
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
                    "seq_len": args.seq_len, "device": torch.cuda.get_device_name() if cuda else "cpu",
                    "torch_kernels_in_command": args.torch_kernels}  # fmt: skip

    def report() -> None:
        print(json.dumps(result), flush=True)
        (out / f"analyze-{args.shapes}.json").write_text(json.dumps(result, indent=2))

    if not args.skip_in_process:
        from staterank.data import load_sequences

        start = time.perf_counter()
        loaded = load(model_dir, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32)
        synchronize()
        result["load_seconds"] = time.perf_counter() - start
        sequences = load_sequences(
            "techdocs-val", loaded.tokenizer, args.seq_len, max_tokens=args.seq_len * args.samples
        )
        positions = log_positions(args.seq_len)
        one = sequences[:1]

        def sample(i: int) -> float:
            synchronize()
            begin = time.perf_counter()
            collect_metrics(loaded, sequences[i : i + 1], positions, 1e-4, 1, False, "")
            synchronize()
            return time.perf_counter() - begin

        # 1. the first sample, compilation included
        profiler = cProfile.Profile()
        profiler.enable()
        result["first_sample_seconds"] = sample(0)
        profiler.disable()
        stats = pstats.Stats(profiler)
        # the compiler's stages (Triton IR to cubin, ptxas included), and the autotuner's benchmarking of configs
        # (which holds the compiling of the configs it tries)
        result["first_sample_triton_compile_seconds"] = sum(
            entry[3] for (path, _, name), entry in stats.stats.items()
            if path.endswith("backends/nvidia/compiler.py") and name.startswith("make_")
        )  # fmt: skip
        result["first_sample_autotune_seconds"] = sum(
            entry[3] for (path, _, name), entry in stats.stats.items()
            if path.endswith("runtime/autotuner.py") and name == "_bench"
        )  # fmt: skip
        listing = io.StringIO()
        pstats.Stats(profiler, stream=listing).sort_stats("cumulative").print_stats(40)
        (out / f"first-sample-{args.shapes}.txt").write_text(listing.getvalue())
        report()

        # 2. every sample
        result["per_sample_seconds"] = [sample(i) for i in range(len(sequences))]
        report()

        features = {}
        synchronize()
        begin = time.perf_counter()
        with torch.no_grad(), loaded.adapter.tap(lambda f: features.__setitem__(f.layer, f)):
            loaded.model(input_ids=one.to(args.device))
        synchronize()
        phases = {"forward_with_tap": time.perf_counter() - begin}
        begin = time.perf_counter()
        states = [states_at(f, positions).float() for f in features.values()]
        synchronize()
        phases["states"] = time.perf_counter() - begin
        begin = time.perf_counter()
        rank.singular_values_of(states)
        phases["singular_values"] = time.perf_counter() - begin
        begin = time.perf_counter()
        pending = {}
        with torch.no_grad(), rank.HostSingularValues() as spectra, loaded.adapter.tap(
            lambda f: pending.__setitem__(f.layer, spectra.submit(states_at(f, positions).float()))
        ):
            loaded.model(input_ids=one.to(args.device))
            [sigma() for sigma in pending.values()]
        phases["overlapped_forward_states_singular_values"] = time.perf_counter() - begin
        result["one_sample_phases_seconds"] = phases
        result["states_per_sample"] = sum(x[..., 0, 0].numel() for x in states)
        report()

        # 3. a torch.profiler table of one sample
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            collect_metrics(loaded, one, positions, 1e-4, 1, False, "")
            synchronize()
        table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "cpu_time_total", row_limit=15)
        table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        (out / f"profile-{args.shapes}.txt").write_text(table + "\n\n" + table_cpu)

        # 4. the metrics against torch's float64 SVD on the CPU
        worst = {"effective_rank_mismatches": 0, "states": 0}
        for state in states[: args.check_layers]:
            fast = spectral_metrics(state)
            sigma = torch.linalg.svdvals(state.double().cpu())
            exact = {"effective_rank": (sigma > 1e-4 * sigma[..., :1]).sum(-1).double(), "nuclear_norm": sigma.sum(-1),
                     "stable_rank": sigma.square().sum(-1) / sigma[..., 0].square().clamp_min(1e-300)}  # fmt: skip
            fast = {name: value.double().cpu() for name, value in fast.items()}
            worst["effective_rank_mismatches"] += int((fast["effective_rank"] != exact["effective_rank"]).sum())
            worst["states"] += exact["effective_rank"].numel()
            for name in ("nuclear_norm", "stable_rank"):
                diff = ((fast[name] - exact[name]).abs() / exact[name].abs().clamp_min(1e-30)).max().item()
                worst[name] = max(worst.get(name, 0.0), diff)
        result["metrics_against_float64_svd"] = worst
        report()

    # 5. the whole command in fresh processes: an empty Triton cache, then the one it filled, then that once more
    # under cProfile (where a warm command's time goes outside its samples)
    if not args.skip_command:
        cache = work / "triton-cache-command"
        runs = [("fresh", "a", args.torch_kernels, None), ("warm", "b", args.torch_kernels, None),
                ("warm_profiled", "c", args.torch_kernels, work / "command.prof")]  # fmt: skip
        if args.also_torch_kernels:
            runs.append(("fresh_torch_kernels", "d", True, None))
        for run, directory, torch_kernels, profile in runs:
            run_cache = work / f"triton-cache-{run}" if run.startswith("fresh_") else cache
            seconds = command_seconds(
                model_dir, args.samples, args.seq_len, work / directory, run_cache, args.device, torch_kernels, profile
            )
            result[f"command_seconds_{run}"] = seconds
            if profile is not None:
                listing = io.StringIO()
                pstats.Stats(str(profile), stream=listing).sort_stats("cumulative").print_stats(60)
                (out / f"command-profile-{args.shapes}.txt").write_text(listing.getvalue())
                result["command_seconds_analysis_itself"] = json.loads((work / directory / "rank.json").read_text())[
                    "seconds"
                ]
            report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
