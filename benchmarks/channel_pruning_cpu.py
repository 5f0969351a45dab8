"""Q/K channel pruning of a bundled model on CPU: perplexity per criterion, and PCA's rotation error.

For each criterion and ratio, prunes MODEL with calibration on the shipped ``techdocs`` excerpt and
reports validation perplexity (techdocs-val). For ``pca`` it also measures how far the rotated
model's q/k features are from an exact rotation of the original features: the pruned layer
computes SiLU(conv'(U W x)), while a rotation that commuted with the convolution and SiLU would
give U SiLU(conv(W x)). The error is ‖pruned − U·original‖ / ‖U·original‖ over the features of
each layer's own input (the original model's), averaged over layers.

    python benchmarks/channel_pruning_cpu.py --model tiny-deltanet --ratios 0.25 0.5 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from staterank import api
from staterank.data import load_sequences
from staterank.prune.channels import CHANNEL_CRITERIA
from staterank.prune.qk import prune_channels


@torch.no_grad()
def rotation_error(original, pruned, result, sequences: torch.Tensor) -> float:
    """Mean over layers of ‖f_pruned − U f_original‖ / ‖U f_original‖ for f = q and k features."""
    inputs, errors = {}, []
    with original.adapter.tap(lambda f: inputs.setdefault(f.layer, f)):
        original.model(input_ids=sequences)
    for layer, before in inputs.items():
        after = pruned.adapter.features(layer, before.hidden)
        basis = result.selections[layer].basis.float()  # [Hk, d', d_k]
        for name in ("q", "k"):
            ideal = torch.einsum("hed,bthd->bthe", basis, getattr(before, name).float())
            errors.append(((getattr(after, name) - ideal).norm() / ideal.norm()).item())
    return sum(errors) / len(errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-deltanet")
    parser.add_argument(
        "--methods", nargs="+", default=[*sorted(CHANNEL_CRITERIA), "pca:rotate"], help="NAME or NAME:OPTION (true)"
    )
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--out")
    args = parser.parse_args()

    def ppl(loaded) -> float:
        return api.evaluate(loaded, "techdocs-val", seq_len=512, max_tokens=args.eval_tokens, progress=False)["ppl"]

    original = api.load_model(args.model, device="cpu")
    rows = [{"method": "none", "ratio": 0.0, "ppl": ppl(original)}]
    print(json.dumps(rows[-1]), flush=True)
    probe = load_sequences("techdocs-val", original.tokenizer, 512, max_tokens=4 * 512)
    for ratio in args.ratios:
        for method in args.methods:
            loaded = api.load_model(args.model, device="cpu")
            name, _, option = method.partition(":")
            start = time.perf_counter()
            result = prune_channels(
                loaded,
                name,
                ratio,
                data="techdocs",
                calib_tokens=args.calib_tokens,
                seq_len=512,
                align=1,
                progress=False,
                batch_size=8,
                options={option: True} if option else {},
            )
            row = {
                "method": method,
                "ratio": ratio,
                "head_k_dim": result.head_k_dim_after,
                "seconds": time.perf_counter() - start,
                "ppl": ppl(loaded),
            }
            if result.rotated:
                row["rotation_feature_error"] = rotation_error(original, loaded, result, probe)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n{args.model}, techdocs-val perplexity ({args.eval_tokens} tokens), calibration {args.calib_tokens} tokens"
    )
    print(f"{'method':<8} " + " ".join(f"{f'ratio {r}':>10}" for r in args.ratios))
    print(f"{'none':<8} {rows[0]['ppl']:>10.2f}")
    for method in args.methods:
        cells = [next(r for r in rows if r["method"] == method and r["ratio"] == ratio) for ratio in args.ratios]
        print(f"{method:<8} " + " ".join(f"{c['ppl']:>10.2f}" for c in cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
