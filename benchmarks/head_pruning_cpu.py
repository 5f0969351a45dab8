"""Head pruning of the bundled models on CPU: JRNP against its ablations.

For each model, ratio and method: removes heads (calibration on the shipped ``techdocs`` excerpt,
states read at the last of 2,048 tokens) and reports the recurrent-state bytes per sequence and the
techdocs-val perplexity, with no recovery.

    python benchmarks/head_pruning_cpu.py --models tiny-deltanet tiny-gated-deltanet --ratios 0.2 0.4
"""

from __future__ import annotations

import argparse
import json

from staterank import api
from staterank.prune.heads import HEAD_CRITERIA, HeadCriterionError, get_head_criterion, prune_heads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-deltanet", "tiny-gated-deltanet"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument(
        "--methods", nargs="+", default=["jrnp", "heads-rank", "heads-norm", "heads-low-rank", "heads-random"]
    )
    parser.add_argument("--calib-tokens", type=int, default=32768)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    assert set(args.methods) <= set(HEAD_CRITERIA)
    rows = []
    for name in args.models:
        loaded = api.load_model(name, device="cpu")
        ppl = api.evaluate(loaded, "techdocs-val", seq_len=512, max_tokens=args.eval_tokens, progress=False)["ppl"]
        rows.append(
            {
                "model": name,
                "method": "none",
                "ratio": 0.0,
                "heads_removed_per_layer": 0,
                "state_bytes": loaded.adapter.state_bytes_per_seq(),
                "ppl": ppl,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        for ratio in args.ratios:
            for method in args.methods:
                loaded = api.load_model(name, device="cpu")
                try:
                    result = prune_heads(
                        loaded,
                        get_head_criterion(method),
                        ratio,
                        data="techdocs",
                        calib_tokens=args.calib_tokens,
                        seq_len=2048,
                        seed=args.seed,
                        progress=False,
                    )
                except HeadCriterionError as refusal:  # a ratio the layers cannot honour: recorded, not run
                    rows.append({"model": name, "method": method, "ratio": ratio, "refused": str(refusal)})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                evaluation = api.evaluate(
                    loaded, "techdocs-val", seq_len=512, max_tokens=args.eval_tokens, progress=False
                )
                rows.append(
                    {
                        "model": name,
                        "method": method,
                        "ratio": ratio,
                        "heads_removed_per_layer": len(next(iter(result.removed.values()))),
                        "kept_ratio": result.kept_ratio,
                        "removed": result.removed,
                        "state_bytes": loaded.adapter.state_bytes_per_seq(),
                        "ppl": evaluation["ppl"],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
