"""State-rank analysis: staterank's chunked states + batched SVD against the reference code's way.

The reference implementation of the rank analysis walks the sequence token by token in Python,
updates each head's state with NumPy and takes one SVD per head per step. Both run here on the
same model, the same input and the same tapped features (q, k, v, beta, decay); the reference
way reads its metrics at every step, ours only at the requested positions. Reported: the time of
each, their ratio, and the largest relative difference of the metrics at the shared positions.

    python benchmarks/rank_analysis_speed.py --model tiny-deltanet --seq-len 2048
    python benchmarks/rank_analysis_speed.py --from-config delta_net-1.3B --device cuda --reference-layers 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from staterank.models import HeadFeatures
from staterank.rank import log_positions, spectral_metrics, states_at

COMPARED = ("effective_rank", "stable_rank", "entropy_rank", "nuclear_norm")


def reference_metrics(features: HeadFeatures, positions: list[int], eps: float) -> dict[str, np.ndarray]:
    """Token-by-token NumPy recurrence with one SVD per head per step: metrics [P, Hv] at ``positions``."""
    q_heads = features.k.shape[2]
    k = features.k[0].double().cpu().numpy()  # [T, Hk, d_k], first sample
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    v = features.v[0].double().cpu().numpy()  # [T, Hv, d_v]
    beta = features.beta[0].double().cpu().numpy()  # [T, Hv]
    decay = None if features.log_decay is None else np.exp(features.log_decay[0].double().cpu().numpy())
    heads, group = v.shape[1], v.shape[1] // q_heads
    state = np.zeros((heads, k.shape[-1], v.shape[-1]))
    wanted = {t: i for i, t in enumerate(positions)}
    out = {name: np.zeros((len(positions), heads)) for name in COMPARED}
    for t in range(k.shape[0]):
        for h in range(heads):
            kt = k[t, h // group]
            s = state[h] * (decay[t, h] if decay is not None else 1.0)
            s = s + beta[t, h] * np.outer(kt, v[t, h] - kt @ s)
            state[h] = s
            sigma = np.linalg.svd(s, compute_uv=False)  # every step, as the reference does
            if t + 1 in wanted:
                i = wanted[t + 1]
                p = sigma / sigma.sum()
                out["effective_rank"][i, h] = (sigma > eps * sigma[0]).sum()
                out["stable_rank"][i, h] = (sigma**2).sum() / sigma[0] ** 2
                out["entropy_rank"][i, h] = np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
                out["nuclear_norm"][i, h] = sigma.sum()
    return out


def build(args):
    from staterank import api

    if args.from_config is None:
        return api.load_model(args.model, device=args.device)
    from fla.models import DeltaNetConfig
    from transformers import AutoModelForCausalLM

    from staterank.loading import LoadedModel, prepare_runtime
    from staterank.models import adapter_for

    prepare_runtime("delta_net")
    config = DeltaNetConfig(hidden_size=2048, num_hidden_layers=24, num_heads=16, vocab_size=32000)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return LoadedModel(model, None, adapter_for(model), args.from_config)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-deltanet")
    parser.add_argument("--from-config", choices=["delta_net-1.3B"], help="random weights with published shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eps", type=float, default=1e-4)
    parser.add_argument("--reference-layers", type=int, help="run the slow reference on the first N layers only")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = build(args)
    device = next(loaded.model.parameters()).device
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    if loaded.tokenizer is not None:
        from staterank.data import load_sequences

        ids = load_sequences("techdocs-val", loaded.tokenizer, args.seq_len, max_tokens=args.seq_len)[:1].to(device)
    positions = log_positions(args.seq_len)

    features: dict[int, HeadFeatures] = {}
    with torch.no_grad(), loaded.adapter.tap(lambda f: features.__setitem__(f.layer, f)):
        loaded.model(input_ids=ids)
    layers = sorted(features)

    def ours() -> dict[int, dict[str, torch.Tensor]]:
        return {layer: spectral_metrics(states_at(features[layer], positions).float(), args.eps) for layer in layers}

    ours()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fast = ours()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours_seconds = time.perf_counter() - start

    reference_layers = layers[: args.reference_layers] if args.reference_layers else layers
    start = time.perf_counter()
    slow = {layer: reference_metrics(features[layer], positions, args.eps) for layer in reference_layers}
    reference_seconds = time.perf_counter() - start

    worst = {}
    for name in COMPARED:
        diffs = []
        for layer in reference_layers:
            mine = fast[layer][name][:, 0].double().cpu().numpy()  # [P, Hv], first sample
            theirs = slow[layer][name]
            diffs.append(np.abs(mine - theirs).max() / max(np.abs(theirs).max(), 1e-12))
        worst[name] = float(max(diffs))
    per_layer_ours = ours_seconds / len(layers)
    per_layer_reference = reference_seconds / len(reference_layers)
    row = {
        "model": str(args.from_config or args.model),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "seq_len": args.seq_len,
        "positions": len(positions),
        "layers": len(layers),
        "reference_layers": len(reference_layers),
        "ours_seconds": ours_seconds,
        "reference_seconds": reference_seconds,
        "speedup_per_layer": per_layer_reference / per_layer_ours,
        "max_relative_metric_diff": worst,
    }
    print(json.dumps(row, indent=2))
    print(
        f"\n{row['model']}, {args.seq_len} tokens, {len(positions)} positions, {row['device']}: "
        f"ours {ours_seconds:.2f} s for {len(layers)} layers, reference {reference_seconds:.1f} s for "
        f"{len(reference_layers)} layers: {row['speedup_per_layer']:.0f}x per layer; "
        f"largest relative metric difference {max(worst.values()):.1e}"
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
