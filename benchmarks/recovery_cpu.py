"""Prune tiny-deltanet's q/k channels by half, then recover with LoRA, with and without distillation.

For rrqr and l1 at ratio 0.5: perplexity (techdocs-val) and the recall probe before pruning, after
pruning, and after a short LoRA recovery on the shipped techdocs excerpt without and with
distillation from the unpruned model. Everything on CPU.

    python benchmarks/recovery_cpu.py --steps 100 --out recovery.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from staterank import api
from staterank.training.lora import finetune


def measure(model, eval_tokens: int) -> dict:
    result = api.evaluate(model, "techdocs-val", tasks=["ppl", "recall"], seq_len=512, max_tokens=eval_tokens,
                          progress=False)
    return {"ppl": result["ppl"], "recall": result["recall"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-deltanet")
    parser.add_argument("--methods", nargs="+", default=["rrqr", "l1"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows = [{"model": args.model, "stage": "original", **measure(args.model, args.eval_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods:
            pruned = Path(scratch) / f"{method}"
            api.prune(args.model, method, args.ratio, pruned, data="techdocs", seq_len=512, progress=False)
            rows.append({"method": method, "stage": "pruned", **measure(pruned, args.eval_tokens)})
            print(json.dumps(rows[-1]), flush=True)
            for teacher in (None, args.model):
                recovered = Path(scratch) / f"{method}-lora{'-kd' if teacher else ''}"
                summary = finetune(pruned, "techdocs", recovered, teacher=teacher, steps=args.steps,
                                   batch_size=args.batch_size, seq_len=args.seq_len, progress=False)
                stage = "LoRA + distillation" if teacher else "LoRA"
                rows.append({"method": method, "stage": stage, "seconds": summary.get("seconds"),
                             **measure(recovered, args.eval_tokens)})
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
