"""Both papers' retrieval claims on the bundled recall models: MQAR accuracy under pruning, query noise, head removal.

For each recall model (default: the bundled ``mqar-deltanet`` and ``mqar-gated-deltanet``), on MQAR examples in
its own layout (``--data mqar``; accuracy on ``--examples`` fresh examples, seed 7):

1. **criteria x ratios**: every q/k channel criterion at key ratios 0.25 / 0.5 / 0.75, calibrated on MQAR
   examples, accuracy after pruning and after a short LoRA + distillation recovery on MQAR (the unpruned model as
   teacher); beside each, the mean effective rank of the final states (threshold 1e-4 sigma_1);
2. **paper 1's mechanism**: accuracy against Gaussian noise added to the queries (the output of every q
   projection, standard deviation ``sigma`` times that output's root mean square) for the full model and for
   rrqr-pruned ones, beside each model's state effective rank;
3. **paper 2's asymmetry**: accuracy after removing the highest Saturation Scores (``jrnp``: high-rank heads, which
   paper 2 calls redundant) against the lowest (``heads-low-rank``: the low-rank heads it says carry retrieval),
   at the same count.

    python benchmarks/mqar_study.py --out mqar-study.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from staterank import api, mqar
from staterank.analysis import collect_metrics
from staterank.data import load_sequences
from staterank.prune.channels import CHANNEL_CRITERIA

EVAL_SEED = 7


def accuracy(loaded, examples: int) -> float:
    layout = mqar.read_layout(loaded.path)
    return mqar.accuracy(loaded.model, layout, examples, EVAL_SEED, batch_size=64)


def effective_rank(loaded, samples: int = 16) -> float:
    """Mean effective rank over heads and samples of the states after a whole MQAR example."""
    layout = mqar.read_layout(loaded.path)
    sequences = load_sequences("mqar", loaded.tokenizer, layout.seq_len, max_tokens=samples * layout.seq_len, seed=11)
    values, _, _ = collect_metrics(loaded, sequences, [layout.seq_len], 1e-4, samples, False, "")
    return float(values["effective_rank"].mean())


class QueryNoise:
    """Gaussian noise on the output of every linear-attention layer's q projection (sigma x its rms)."""

    def __init__(self, model, sigma: float, seed: int = 0):
        self.sigma, self.handles = sigma, []
        self.generator = torch.Generator().manual_seed(seed)
        for name, module in model.named_modules():
            if name.endswith("q_proj"):
                self.handles.append(module.register_forward_hook(self.hook))
        if not self.handles:
            raise SystemExit("no q_proj modules to add query noise to")

    def hook(self, module, inputs, output):
        rms = output.float().pow(2).mean().sqrt()
        noise = torch.randn(output.shape, generator=self.generator, dtype=torch.float32)
        return output + (self.sigma * rms * noise).to(output)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mqar-deltanet", "mqar-gated-deltanet"])
    parser.add_argument("--methods", nargs="+", default=sorted(set(CHANNEL_CRITERIA) - {"pca"}) + ["pca"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--examples", type=int, default=500)
    parser.add_argument("--calib-examples", type=int, default=64)
    parser.add_argument("--recovery-steps", type=int, default=100)
    parser.add_argument("--head-ratio", type=float, default=0.25)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp())
    result: dict = {"examples": args.examples, "eval_seed": EVAL_SEED, "models": {}}

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=2))

    for name in args.models:
        original = api.load_model(name, device="cpu")
        layout = mqar.read_layout(original.path)
        L = layout.seq_len
        rows: dict = {"layout": layout.to_json(), "full": {"accuracy": accuracy(original, args.examples),
                                                          "effective_rank": effective_rank(original)}}  # fmt: skip
        result["models"][name] = rows
        print(name, json.dumps(rows["full"]), flush=True)

        rows["channels"] = []
        for method in args.methods:
            for ratio in args.ratios:
                pruned_dir = work / f"{name}-{method}-{ratio}"
                start = time.perf_counter()
                api.prune(name, method, ratio, pruned_dir, data="mqar", calib_tokens=args.calib_examples * L,
                          seq_len=L, batch_size=16, align=1, progress=False, overwrite=True)  # fmt: skip
                seconds = time.perf_counter() - start
                pruned = api.load_model(pruned_dir, device="cpu")
                recovered_dir = work / f"{name}-{method}-{ratio}-lora"
                api.finetune(pruned_dir, "mqar", recovered_dir, teacher=name, steps=args.recovery_steps,
                             batch_size=16, seq_len=L, lr=1e-3, save_every=0, progress=False,
                             overwrite=True)  # fmt: skip
                recovered = api.load_model(recovered_dir, device="cpu")
                row = {"method": method, "ratio": ratio, "prune_seconds": seconds,
                       "accuracy": accuracy(pruned, args.examples), "effective_rank": effective_rank(pruned),
                       "recovered_accuracy": accuracy(recovered, args.examples),
                       "recovered_effective_rank": effective_rank(recovered)}  # fmt: skip
                rows["channels"].append(row)
                print(name, json.dumps(row), flush=True)
                save()

        rows["query_noise"] = []
        for label in ["full"] + [f"rrqr-{r}" for r in args.ratios]:
            recovered = work / f"{name}-rrqr-{label[5:]}-lora"
            loaded = original if label == "full" else api.load_model(recovered, device="cpu")
            for sigma in args.sigmas:
                with QueryNoise(loaded.model, sigma):
                    correct = accuracy(loaded, args.examples)
                rows["query_noise"].append({"model": label + ("" if label == "full" else " + LoRA"), "sigma": sigma,
                                            "accuracy": correct})  # fmt: skip
            print(name, json.dumps(rows["query_noise"][-len(args.sigmas) :]), flush=True)
            save()

        rows["heads"] = []
        for method in ("jrnp", "heads-low-rank", "heads-random"):
            out = work / f"{name}-{method}"
            report = api.prune(name, method, args.head_ratio, out, data="mqar", calib_tokens=args.calib_examples * L,
                               seq_len=L, batch_size=16, progress=False, overwrite=True)  # fmt: skip
            pruned = api.load_model(out, device="cpu")
            row = {"method": method, "ratio": args.head_ratio, "removed": report.get("removed"),
                   "accuracy": accuracy(pruned, args.examples)}  # fmt: skip
            rows["heads"].append(row)
            print(name, json.dumps(row), flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
