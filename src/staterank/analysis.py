"""State-rank analysis: the exact recurrent state of every linear-attention head, its spectrum, and
how heads stratify into low- and high-rank groups (Sun et al., "State Rank Dynamics in Linear
Attention LLMs", 2026).

For every sample, every linear-attention layer and every (value) head, the state S_t is rebuilt
from the model's own q, k, v, beta and decay (the adapter's feature tap) at the requested
positions, chunk-wise with matrix products on the model's device; their singular values are taken on host
threads (LAPACK) while the model goes on with the next layers (:class:`staterank.rank.HostSingularValues`).
Nothing but per-position metrics and final spectra is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from staterank import distributed
from staterank.data import load_sequences
from staterank.errors import StaterankError
from staterank.loading import LoadedModel, input_device
from staterank.models import HeadFeatures
from staterank.rank import (
    HostSingularValues,
    decided_at,
    log_positions,
    mean_pairwise_spearman,
    metrics_from_singular_values,
    spearman,
    split_groups,
    states_at,
)

METRICS = ("effective_rank", "stable_rank", "rank_utilization", "entropy_rank", "nuclear_norm")


class AnalysisError(StaterankError):
    """Options or data the analysis cannot use."""


@dataclass
class DomainRanks:
    """Per-sample metrics of one corpus: ``values[metric]`` is [samples, positions, heads] over all layers."""

    data: str
    values: dict[str, np.ndarray]
    spectra: np.ndarray  # [heads, min(d_k, d_v)]  final-position singular values, mean over samples
    samples: int = 0


@dataclass
class AnalysisResult:
    """rank.json (``as_json``), plus the final spectra and per-domain ranks the plots need."""

    json: dict
    spectra: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    domain_ranks: dict[str, np.ndarray] = field(default_factory=dict)
    cross_domain_spearman: float | None = None


def check_options(seq_len: int, positions: list[int] | None, eps: float, samples: int) -> list[int]:
    """Validate the options before any model is loaded; return the positions to use."""
    if not 0 < eps < 1:
        raise AnalysisError(f"--eps must be in (0, 1), got {eps}")
    if samples < 1:
        raise AnalysisError(f"--samples must be at least 1, got {samples}")
    if seq_len < 1:
        raise AnalysisError(f"--seq-len must be positive, got {seq_len}")
    if positions is None:
        return log_positions(seq_len)
    positions = sorted(set(int(t) for t in positions))
    if not positions:
        raise AnalysisError("no positions given; pass at least one token count, or none for the default")
    if positions[0] < 1:
        raise AnalysisError(f"positions count tokens and start at 1, got {positions[0]}")
    if positions[-1] > seq_len:
        raise AnalysisError(f"position {positions[-1]} is beyond the sequence length {seq_len}; raise --seq-len")
    return positions


def collect_metrics(
    loaded: LoadedModel,
    sequences: torch.Tensor,
    positions: list[int],
    eps: float,
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[int, int]]]:
    """Metrics [samples, positions, heads] for every metric, final spectra [heads, r], and the (layer, head) order.

    In a data-parallel run every rank measures its share of the batches, and the per-sample
    metrics of all ranks are gathered back into the order of ``sequences``.
    """
    adapter = loaded.adapter
    device = input_device(loaded.model)
    batches = distributed.shard_batches(sequences, batch_size, "analysis")
    mine: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # batch index -> layer -> metric [P, B, Hv, ...]
    pending = {}  # layer -> the singular values of its states [P, B, Hv, r], being taken on the host

    def collect(features: HeadFeatures) -> None:
        # [P, B, Hv, d_k, d_v]: their singular values are taken on host threads while the model runs on
        pending[features.layer] = spectra.submit(states_at(features, positions).float())

    shown = progress and distributed.is_main()
    bar = tqdm(total=sum(batch.shape[0] for _, batch in batches), unit="seq", desc=desc, disable=not shown)
    with distributed.together(), torch.no_grad(), HostSingularValues() as spectra, adapter.tap(collect):
        for index, batch in batches:
            pending.clear()
            loaded.model(input_ids=batch.to(device))
            mine[index] = {
                layer: {name: value.cpu() for name, value in metrics_from_singular_values(sigma(), eps).items()}
                for layer, sigma in pending.items()
            }
            bar.update(batch.shape[0])
    bar.close()
    everyone = {i: layers for part in distributed.gather_objects(mine) for i, layers in part.items()}
    per_batch = {layer: [everyone[i][layer] for i in sorted(everyone)] for layer in adapter.linear_layers()}

    order = [
        (layer, head) for layer in adapter.linear_layers() for head in range(adapter.layer_shape(layer).num_v_heads)
    ]
    values = {}
    for name in METRICS:
        # per layer [P, samples, Hv] -> [samples, P, Hv]; then heads of all layers side by side
        layers = [torch.cat([b[name] for b in per_batch[layer]], dim=1).permute(1, 0, 2) for layer in per_batch]
        values[name] = torch.cat(layers, dim=2).double().numpy()
    spectra = torch.cat(
        [torch.cat([b["singular_values"][-1] for b in per_batch[layer]]).mean(0) for layer in per_batch]
    )  # final position, mean over samples: [heads, r]
    return values, spectra.double().numpy(), order


def analyze(
    loaded: LoadedModel,
    data: list[str],
    samples: int = 8,
    seq_len: int = 2048,
    positions: list[int] | None = None,
    eps: float = 1e-4,
    seed: int = 0,
    batch_size: int = 1,
    progress: bool = True,
) -> AnalysisResult:
    """Rank analysis of ``loaded`` on the first corpus of ``data``, and cross-domain stability over all of them."""
    start = time.perf_counter()
    positions = check_options(seq_len, positions, eps, samples)
    if not loaded.adapter.linear_layers():
        raise AnalysisError("the model has no linear-attention layers to analyse")
    if not 1 <= len(data) <= 2:
        raise AnalysisError("give --data once, or twice to compare two domains")
    domains = []
    for spec in data:
        sequences = load_sequences(
            spec, loaded.tokenizer, seq_len, max_tokens=samples * seq_len, shuffle=True, seed=seed
        )
        values, spectra, order = collect_metrics(
            loaded, sequences, positions, eps, batch_size, progress, f"analyze {spec}"
        )
        domains.append(DomainRanks(spec, values, spectra, samples=int(sequences.shape[0])))

    main = domains[0]
    shapes = {s.layer: s for s in loaded.adapter.shapes()}
    capacity = np.array([min(shapes[layer].head_k_dim, shapes[layer].head_v_dim) for layer, _ in order], float)
    mean = {name: main.values[name].mean(0) for name in METRICS}  # [P, heads]
    spread = {name: main.values[name].std(0) for name in METRICS}
    # Stratify on the final effective rank as a fraction of the head's capacity min(d_k, d_v).
    normalised = mean["effective_rank"] / capacity  # [P, heads]
    split = split_groups(torch.from_numpy(normalised[-1]))
    high = split.high.numpy()
    decided = decided_at(torch.from_numpy(normalised), split.threshold).numpy()

    layers_json = []
    for layer in loaded.adapter.linear_layers():
        heads = []
        for index, (owner, head) in enumerate(order):
            if owner != layer:
                continue
            entry = {"head": head}
            for name in METRICS:
                entry[name] = mean[name][:, index].tolist()
                entry[f"{name}_std"] = spread[name][:, index].tolist()
            entry["group"] = "high" if high[index] else "low"
            entry["decided_at"] = int(decided[index])
            heads.append(entry)
        shape = shapes[layer]
        layers_json.append(
            {"layer": layer, "head_k_dim": shape.head_k_dim, "head_v_dim": shape.head_v_dim, "heads": heads}
        )

    final_ranks = main.values["effective_rank"][:, -1, :]  # [samples, heads]
    result = {
        "model": str(loaded.path),
        "data": data,
        "samples": main.samples,
        "seq_len": seq_len,
        "seed": seed,
        "eps": eps,
        "positions": positions,
        "layers": layers_json,
        "stratification": {
            "metric": "final effective rank / min(d_k, d_v), mean over samples",
            "method": split.method,
            "threshold": split.threshold,
            "gap": split.gap,
            "low": int((~high).sum()),
            "high": int(high.sum()),
            "decided_at_position": {
                "median": positions[int(np.median(decided))],
                "max": positions[int(decided.max())],
            },
        },
        "stability": {"across_samples_spearman": _finite(mean_pairwise_spearman(torch.from_numpy(final_ranks)))},
    }
    analysis = AnalysisResult(result, spectra={key: main.spectra[i] for i, key in enumerate(order)})
    if len(domains) == 2:
        a, b = (d.values["effective_rank"][:, -1, :].mean(0) for d in domains)
        rho = _finite(spearman(torch.from_numpy(a), torch.from_numpy(b)))
        result["stability"]["across_domains_spearman"] = rho
        result["domains"] = [
            {
                "data": d.data,
                "samples": d.samples,
                "final_effective_rank": d.values["effective_rank"][:, -1, :].mean(0).tolist(),
            }
            for d in domains
        ]
        analysis.domain_ranks = {domains[0].data: a, domains[1].data: b}
        analysis.cross_domain_spearman = rho
    result["seconds"] = time.perf_counter() - start
    return analysis


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined correlation (constant ranks, one sample) is null."""
    return None if value is None or math.isnan(value) else float(value)
