"""Figures of a rank analysis: per-head rank heatmap, rank against position, singular-value spectra, cross-domain.

Every function takes the analysis result (the dict written to rank.json) or arrays derived from it, writes one PNG
atomically (a temporary file beside the target, then a rename) and returns its path. Only matplotlib's
object-oriented :class:`~matplotlib.figure.Figure` API is used, so no global pyplot state or GUI backend is touched.

Colours follow the Okabe-Ito colourblind-safe palette: the low-rank group is always blue, the high-rank group
always vermillion.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import NullFormatter

from staterank.io import atomic_file

DPI = 120
GROUP_COLOURS = {"low": "#0072B2", "high": "#D55E00"}
UNGROUPED_COLOUR = "#555555"
HEATMAP_CMAP = "viridis"
ANNOTATE_MAX_CELLS = 16  # annotate heatmap cells with their value when both dimensions are at most this

METRIC_LABELS = {
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "rank_utilization": "rank utilisation",
    "entropy_rank": "entropy rank",
    "nuclear_norm": "nuclear norm",
}

HEATMAP = "rank_heatmap.png"
TRAJECTORIES = "rank_trajectories.png"
SPECTRA = "spectra.png"
CROSS_DOMAIN = "cross_domain.png"


def _metric_label(metric: str) -> str:
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    """Save ``fig`` as PNG atomically."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
    return Path(path)


def _heads(result: Mapping[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """All (layer entry, head entry) pairs in (layer, head) order."""
    return [(layer, head) for layer in result["layers"] for head in layer["heads"]]


def _state_dim(layer: Mapping[str, Any]) -> int:
    return min(int(layer["head_k_dim"]), int(layer["head_v_dim"]))


def _final(head: Mapping[str, Any], metric: str) -> float:
    return float(head[metric][-1])


def _group_colour(group: str | None) -> str:
    return GROUP_COLOURS.get(group or "", UNGROUPED_COLOUR)


def _format_value(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _sparse_ticks(n: int, max_ticks: int = 24) -> np.ndarray:
    return np.arange(0, n, max(1, math.ceil(n / max_ticks)))


def _token_count(t: float) -> str:
    """1536 -> '1.5k', 65536 -> '66k', 2_000_000 -> '2M'."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if t >= div:
            return f"{t / div:.2g}{suffix}" if t < 10 * div else f"{t / div:.0f}{suffix}"
    return f"{t:.0f}"


def rank_heatmap(
    result: Mapping[str, Any], path: str | os.PathLike, metric: str = "effective_rank", normalise: bool = False
) -> Path:
    """Layers x heads heatmap of each head's ``metric`` at the last position; high-rank heads are outlined.

    With ``normalise`` each value is divided by its layer's state size min(d_k, d_v).
    """
    layers = result["layers"]
    n_layers = len(layers)
    n_heads = max(len(layer["heads"]) for layer in layers)
    values = np.full((n_layers, n_heads), np.nan)
    high = np.zeros((n_layers, n_heads), dtype=bool)
    for i, layer in enumerate(layers):
        scale = _state_dim(layer) if normalise else 1
        for j, head in enumerate(layer["heads"]):
            values[i, j] = _final(head, metric) / scale
            high[i, j] = head.get("group") == "high"

    label = _metric_label(metric)
    dims = {_state_dim(layer) for layer in layers}
    if normalise:
        cbar_label = f"{label} / min(d_k, d_v)"
    elif len(dims) == 1:
        cbar_label = f"{label}\n(state size min(d_k, d_v) = {dims.pop()})"
    else:
        cbar_label = label

    annotate = n_layers <= ANNOTATE_MAX_CELLS and n_heads <= ANNOTATE_MAX_CELLS
    cell = 0.6 if annotate else 0.3
    fig = Figure(
        figsize=(min(16.0, max(6.0, cell * n_heads + 2.5)), min(14.0, max(3.5, cell * n_layers + 1.8))),
        layout="constrained",
    )
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=HEATMAP_CMAP, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=cbar_label)

    if annotate:
        cmap, norm = image.cmap, image.norm
        for i, j in np.argwhere(np.isfinite(values)):
            r, g, b, _ = cmap(norm(values[i, j]))
            text_colour = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, _format_value(values[i, j]), ha="center", va="center", fontsize=8, color=text_colour)
    for i, j in np.argwhere(high):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=GROUP_COLOURS["high"], lw=2.5))

    ax.set_xticks(_sparse_ticks(n_heads))
    ax.set_yticks(_sparse_ticks(n_layers))
    ax.set_yticklabels([str(layers[i]["layer"]) for i in _sparse_ticks(n_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"Final-position {label} per head (t = {result['positions'][-1]})")
    fig.legend(
        handles=[Patch(fill=False, edgecolor=GROUP_COLOURS["high"], lw=2.5, label=f"high-rank group ({high.sum()})")],
        loc="outside lower center",
        frameon=False,
    )
    return _save(fig, path)


def _default_layers(result: Mapping[str, Any], max_layers: int = 4) -> list[int]:
    """Up to ``max_layers`` layer ids spread evenly across depth."""
    ids = [layer["layer"] for layer in result["layers"]]
    picks = np.linspace(0, len(ids) - 1, min(max_layers, len(ids))).round().astype(int)
    return [ids[i] for i in dict.fromkeys(picks.tolist())]


def rank_trajectories(
    result: Mapping[str, Any],
    path: str | os.PathLike,
    layers: Sequence[int] | None = None,
    metric: str = "effective_rank",
) -> Path:
    """``metric`` against position (log x) for every head, one panel per layer, lines coloured by group."""
    by_id = {layer["layer"]: layer for layer in result["layers"]}
    layer_ids = list(layers) if layers is not None else _default_layers(result)
    missing = [i for i in layer_ids if i not in by_id]
    if missing:
        raise ValueError(f"layers {missing} are not in the result (have {sorted(by_id)})")
    if not layer_ids:
        raise ValueError("no layers to plot")

    positions = np.asarray(result["positions"], dtype=float)
    label = _metric_label(metric)
    strat = result.get("stratification") or {}
    threshold = strat.get("threshold") if strat.get("metric") == metric else None

    ticks = positions[np.unique(np.linspace(0, len(positions) - 1, min(7, len(positions))).round().astype(int))]
    n = len(layer_ids)
    ncols = 2 if n == 4 else min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.4 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.remove()

    for ax, layer_id in zip(axes[:n], layer_ids, strict=True):
        layer = by_id[layer_id]
        # High-rank heads drawn last so the minority group is not hidden.
        for head in sorted(layer["heads"], key=lambda h: h.get("group") == "high"):
            colour = _group_colour(head.get("group"))
            mean = np.asarray(head[metric], dtype=float)
            ax.plot(positions, mean, color=colour, lw=1.4, alpha=0.85)
            std = head.get(f"{metric}_std")
            if std is not None:
                std = np.asarray(std, dtype=float)
                ax.fill_between(positions, mean - std, mean + std, color=colour, alpha=0.15, lw=0)
        if threshold is not None:
            ax.axhline(threshold, color="black", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xticks(ticks, labels=[_token_count(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(
            f"layer {layer_id}  ({len(layer['heads'])} heads, min(d_k, d_v) = {_state_dim(layer)})", fontsize=10
        )
        ax.grid(True, which="major", alpha=0.3)
    for k, ax in enumerate(axes[:n]):
        if k + ncols >= n:  # nothing below it in its column
            ax.tick_params(labelbottom=True)
            ax.set_xlabel("tokens seen")
        if k % ncols == 0:
            ax.set_ylabel(label)

    handles = [
        Line2D([], [], color=colour, lw=2, label=f"{group}-rank group") for group, colour in GROUP_COLOURS.items()
    ]
    if threshold is not None:
        handles.append(Line2D([], [], color="black", ls=":", lw=1, label=f"group threshold ({threshold:.3g})"))
    if any(f"{metric}_std" in head for _, head in _heads(result)):
        handles.append(Patch(color=UNGROUPED_COLOUR, alpha=0.25, label="± std over samples"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle(f"{label.capitalize()} of each head's state against position")
    return _save(fig, path)


def spectra(spectra: Mapping[tuple[int, int], np.ndarray], result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Final-position singular values (log y) of the lowest- and highest-effective-rank heads, with eps * sigma_1."""
    heads = [(layer, head) for layer, head in _heads(result) if (layer["layer"], head["head"]) in spectra]
    if not heads:
        raise ValueError("no head of the result has a spectrum")
    ranked = sorted(heads, key=lambda lh: _final(lh[1], "effective_rank"))
    chosen = [("lowest", ranked[0], "o", "--"), ("highest", ranked[-1], "s", ":")]
    eps = float(result["eps"])

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for which, (layer, head), marker, threshold_style in chosen:
        sigma = np.asarray(spectra[layer["layer"], head["head"]], dtype=float)
        colour = _group_colour(head.get("group"))
        index = np.arange(1, len(sigma) + 1)
        ax.plot(
            index,
            np.where(sigma > 0, sigma, np.nan),
            color=colour,
            marker=marker,
            ms=3.5,
            lw=1.4,
            markevery=max(1, len(sigma) // 32),
            label=f"{which}: layer {layer['layer']} head {head['head']} "
            f"(eff. rank {_final(head, 'effective_rank'):.3g}, {head.get('group', '?')} group)",
        )
        if sigma.size and sigma[0] > 0:
            ax.axhline(
                eps * sigma[0],
                color=colour,
                ls=threshold_style,
                lw=1.2,
                label=f"{which}: eps·σ₁ = {eps * sigma[0]:.2g}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σᵢ (mean over samples)")
    ax.set_title(f"State singular-value spectra at t = {result['positions'][-1]}: lowest vs highest effective rank")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


_plot_spectra = spectra  # analysis_plots' ``spectra`` argument shadows the function


def cross_domain_scatter(
    domain_ranks: Mapping[str, np.ndarray],
    spearman: float,
    path: str | os.PathLike,
    groups: Sequence[str] | None = None,
) -> Path:
    """Per-head final effective rank in one domain against another, with y = x; ``groups`` colours the points."""
    if len(domain_ranks) != 2:
        raise ValueError(f"need exactly two domains, got {len(domain_ranks)}")
    (name_a, a), (name_b, b) = ((name, np.asarray(r, dtype=float)) for name, r in domain_ranks.items())
    if a.shape != b.shape:
        raise ValueError(f"domains have different numbers of heads: {a.shape} vs {b.shape}")

    fig = Figure(figsize=(5.6, 5.4), layout="constrained")
    ax = fig.add_subplot()
    if groups is None:
        ax.scatter(a, b, s=22, color=UNGROUPED_COLOUR, alpha=0.8, edgecolors="none")
    else:
        groups = np.asarray(groups)
        for group, colour in GROUP_COLOURS.items():
            mask = groups == group
            ax.scatter(
                a[mask],
                b[mask],
                s=22,
                color=colour,
                alpha=0.8,
                edgecolors="none",
                label=f"{group}-rank group ({mask.sum()})",
            )
    lo, hi = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    pad = 0.05 * (hi - lo or 1.0)
    lims = (lo - pad, hi + pad)
    ax.plot(lims, lims, color="black", ls="--", lw=1, label="y = x")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_aspect("equal")
    ax.set_xlabel(f"effective rank on {name_a}")
    ax.set_ylabel(f"effective rank on {name_b}")
    ax.set_title(f"Per-head final effective rank across domains\n({len(a)} heads, Spearman ρ = {spearman:.3f})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def analysis_plots(
    result: Mapping[str, Any],
    spectra: Mapping[tuple[int, int], np.ndarray] | None,
    out_dir: str | os.PathLike,
    domain_ranks: Mapping[str, np.ndarray] | None = None,
    spearman: float | None = None,
) -> list[Path]:
    """Write every figure into ``out_dir`` under fixed names; return the paths written.

    The spectra figure needs ``spectra``; the cross-domain figure needs two domains in ``domain_ranks`` (its
    Spearman correlation is computed when ``spearman`` is not given).
    """
    out_dir = Path(out_dir)
    paths = [rank_heatmap(result, out_dir / HEATMAP), rank_trajectories(result, out_dir / TRAJECTORIES)]
    if spectra:
        paths.append(_plot_spectra(spectra, result, out_dir / SPECTRA))
    if domain_ranks is not None and len(domain_ranks) == 2:
        if spearman is None:
            from scipy.stats import spearmanr

            spearman = float(spearmanr(*domain_ranks.values()).statistic)
        groups = [head.get("group", "") for _, head in _heads(result)]
        if len(groups) != len(next(iter(domain_ranks.values()))):
            groups = None
        paths.append(cross_domain_scatter(domain_ranks, spearman, out_dir / CROSS_DOMAIN, groups=groups))
    return paths


def stratification_by_model(results: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per model (``results``: name -> its ``rank.json``): every head's final effective rank as a fraction
    of its capacity min(d_k, d_v), sorted, coloured by the head's group, with the split's threshold; the panels
    share the axis, so the architectures' separations read side by side."""
    if not results:
        raise ValueError("no models to plot")
    fig = Figure(figsize=(2.6 * len(results) + 0.8, 3.6), layout="constrained")
    axes = fig.subplots(1, len(results), sharey=True, squeeze=False).ravel()
    for ax, (name, result) in zip(axes, results.items(), strict=True):
        heads = sorted(
            ((_final(head, "effective_rank") / _state_dim(layer), head.get("group")) for layer, head in _heads(result)),
            key=lambda x: x[0],
        )
        values = np.array([v for v, _ in heads])
        ax.bar(np.arange(len(values)), values, width=1.0, color=[_group_colour(g) for _, g in heads])
        strata = result["stratification"]
        if math.isfinite(strata["threshold"]):
            ax.axhline(strata["threshold"], color="black", ls="--", lw=1)
        ax.set_title(f"{name}\n{strata['low']} low / {strata['high']} high, gap {strata['gap']:.3f}", fontsize=9)
        ax.set_xlabel("heads, sorted")
        ax.set_xticks([])
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("final effective rank / capacity")
    axes[0].set_ylim(0, 1.02)
    legend = [Patch(color=colour, label=f"{group}-rank group") for group, colour in GROUP_COLOURS.items()]
    fig.legend(handles=legend, loc="outside lower center", ncols=2, fontsize=8)
    return _save(fig, path)
