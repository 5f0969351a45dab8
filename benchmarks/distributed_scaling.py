"""Data-parallel throughput of calibration (rrqr statistics) and LoRA fine-tuning on 1, 2, ... GPUs.

A model of a config with random weights (bfloat16 on GPU, float32 on CPU) on every rank, the
shipped ``techdocs`` corpus tokenised by the bundled tokenizer. Launch once per GPU count:

    for n in 1 2; do
        PYTHONPATH=src python -m torch.distributed.run --standalone --nproc-per-node $n \\
            benchmarks/distributed_scaling.py --config configs/bench/deltanet-1.3B.json --out runs/scaling/gpus-$n.json
    done

With ``--parallel fsdp`` the fine-tuning is sharded (FSDP2, as ``staterank finetune --parallel fsdp``), with
``--grad-checkpointing`` and ``--grad-accum`` as there; ``--finetune-only`` skips calibration. A recovery at
Kimi-Linear-48B shapes on one GPU, for its peak memory and tokens/s:

    PYTHONPATH=src python benchmarks/distributed_scaling.py --config configs/bench/kimi-linear-48B.json \
        --finetune-only --parallel fsdp --grad-checkpointing --batch-per-gpu 4 --grad-accum 2 --steps 4 \
        --warmup-steps 1 --out runs/kimi-fsdp.json

Calibration streams a fixed set of sequences (``--calib-tokens``), split over the ranks: its
tokens/s shows how much faster the same job ends. Fine-tuning keeps ``--batch-per-gpu`` sequences
per rank, so the global batch grows with the GPUs (DDP's usual weak scaling). Both are measured
after a warm-up that compiles the kernels; a CPU smoke test:

    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/distributed_scaling.py \\
        --config configs/tiny-deltanet.json --device cpu --seq-len 64 --calib-tokens 4096 --batch-per-gpu 2 \\
        --steps 2 --out /tmp/scaling.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from staterank import distributed
from staterank.calibrate import calibrate
from staterank.data import load_sequences
from staterank.io import write_json
from staterank.loading import LoadedModel, bundled_path, load, prepare_runtime
from staterank.models import adapter_for
from staterank.training.lora import finetune


def build(config_path: Path, device: torch.device, tokenizer, seed: int = 0) -> LoadedModel:
    """The config's model with random weights, the same on every rank (same seed, same device type)."""
    fields = json.loads(config_path.read_text())
    fields.pop("train", None)
    prepare_runtime(fields["model_type"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=dtype).eval()
    return LoadedModel(model, tokenizer, adapter_for(model), config_path)


def free(device: torch.device) -> None:
    """Give the memory of deleted models back (the next one may need all of it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/bench/deltanet-1.3B.json"))
    parser.add_argument("--out", type=Path, required=True, help="JSON results (written by rank 0)")
    parser.add_argument("--device", help="cpu or cuda (default: this rank's GPU if there is one)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-tokens", type=int, default=64 * 2048, help="calibration tokens, split over ranks")
    parser.add_argument("--calib-batch", type=int, default=4, help="calibration sequences per forward")
    parser.add_argument("--batch-per-gpu", type=int, default=8, help="fine-tuning sequences per rank and step")
    parser.add_argument("--steps", type=int, default=20, help="measured fine-tuning steps (after --warmup-steps)")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=32)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="how fine-tuning spreads")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per rank and step")
    parser.add_argument("--finetune-only", action="store_true", help="skip the calibration measurement")
    args = parser.parse_args()

    here = distributed.world()
    began = time.perf_counter()

    def stage(what: str) -> None:  # where a long run's time went, as it goes
        if distributed.is_main():
            print(f"[{time.perf_counter() - began:7.1f} s] {what}", flush=True)

    device = torch.device(distributed.device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load(bundled_path("tiny-deltanet"), device="cpu").tokenizer
    sequences = load_sequences("techdocs", tokenizer, args.seq_len, max_tokens=args.calib_tokens)
    # -- calibration: a warm-up batch per rank, then the whole set ---------------------------------
    calibration = None
    if not args.finetune_only:
        loaded = build(args.config, device, tokenizer)
        distributed.check_same_model(loaded.model, str(args.config))
        stage("model built")
        calibrate(loaded.adapter, sequences[: args.calib_batch * here.size], args.calib_batch, progress=False)
        synchronize(device)
        start = time.perf_counter()
        stats = calibrate(loaded.adapter, sequences, args.calib_batch, progress=False)
        synchronize(device)
        calib_seconds = time.perf_counter() - start
        calibration = {
            "tokens": int(sequences.numel()),
            "batch_per_forward": args.calib_batch,
            "seconds": calib_seconds,
            "tokens_per_s": sequences.numel() / calib_seconds,
        }
        del stats, loaded
        free(device)

    # -- LoRA fine-tuning: a warm-up run compiles forward and backward, a fresh run is measured ----
    work = Path(tempfile.mkdtemp(prefix="scaling-")) if here.rank == 0 else None
    work = Path(distributed.gather_objects(str(work))[0])
    options = {
        "batch_size": args.batch_per_gpu * here.size, "seq_len": args.seq_len, "lora_rank": args.lora_rank,
        "lora_alpha": 2 * args.lora_rank, "warmup_steps": 1, "save_every": 0, "progress": False, "overwrite": True,
        "device": str(device), "steps": args.warmup_steps + args.steps + 1, "parallel": args.parallel,
        "grad_checkpointing": args.grad_checkpointing, "grad_accum": args.grad_accum,
    }  # fmt: skip
    warm = build(args.config, device, tokenizer)
    params = sum(p.numel() for p in warm.model.parameters())
    stage("built for the warm-up run")
    finetune(warm, "techdocs", work / "warmup", stop_after=args.warmup_steps, **options)
    stage("warm-up run done")
    del warm
    free(device)
    fresh = build(args.config, device, tokenizer)
    stage("built again for the measured run")
    measured = finetune(fresh, "techdocs", work / "run", stop_after=args.steps, **options)
    stage("measured run done")
    if distributed.is_main():
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "config": str(args.config),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": here.size,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "params": params,
        "seq_len": args.seq_len,
        "calibration": calibration,
        "finetune": {
            "parallel": args.parallel,
            "grad_checkpointing": args.grad_checkpointing,
            "grad_accum": measured["grad_accum"],
            "peak_memory_gib_by_rank": measured["peak_memory_gib_by_rank"],
            "trainable_params": measured["trainable_params"],
            "lora_rank": args.lora_rank,
            "batch_per_gpu": args.batch_per_gpu,
            "global_batch": args.batch_per_gpu * here.size,
            "steps": measured["steps"],
            "tokens": measured["tokens_seen"],
            "seconds": measured["seconds"],
            "tokens_per_s": measured["tokens_seen"] / measured["seconds"],
        },
    }
    if distributed.is_main():
        write_json(args.out, result)
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
