from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from staterank import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
N_LAYERS, N_HEADS, D = 3, 4, 16
POSITIONS = [16, 32, 64, 128, 256, 512]


def _result() -> tuple[dict[str, Any], dict[tuple[int, int], np.ndarray]]:
    """3 layers x 4 heads; heads 0-1 of every layer saturate low, heads 2-3 keep growing (the high-rank group)."""
    rng = np.random.default_rng(0)
    t = np.log2(np.asarray(POSITIONS, dtype=float))
    layers, spectra = [], {}
    for layer in range(N_LAYERS):
        heads = []
        for head in range(N_HEADS):
            high = head >= 2
            final = (9.0 + 2 * layer + head if high else 2.0 + 0.5 * head) + rng.uniform(0, 0.5)
            rank = final * (t / t[-1]) ** (1.0 if high else 0.3)
            heads.append(
                {
                    "head": head,
                    "effective_rank": rank.tolist(),
                    "stable_rank": (0.6 * rank).tolist(),
                    "rank_utilization": (rank / D).tolist(),
                    "entropy_rank": (1.1 * rank).tolist(),
                    "nuclear_norm": (5 * rank).tolist(),
                    "effective_rank_std": (0.05 * rank).tolist(),
                    "group": "high" if high else "low",
                    "decided_at": 2,
                }
            )
            spectra[layer, head] = np.exp(-np.arange(D) / (final / 2)) * 3.0
        layers.append({"layer": layer, "head_k_dim": D, "head_v_dim": 2 * D, "heads": heads})
    result = {
        "positions": POSITIONS,
        "eps": 1e-4,
        "layers": layers,
        "stratification": {"metric": "effective_rank", "threshold": 6.0, "gap": 3.0, "low": 6, "high": 6},
    }
    return result, spectra


def _check_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    height, width = image.shape[:2]
    assert 200 <= height <= 2000 and 300 <= width <= 2400, image.shape
    assert float(np.var(image[..., :3])) > 0


def test_analysis_plots_writes_every_figure(tmp_path: Path) -> None:
    result, spectra = _result()
    heads = [h for layer in result["layers"] for h in layer["heads"]]
    final = np.asarray([h["effective_rank"][-1] for h in heads])
    domain_ranks = {"wiki": final, "code": final * 0.9 + np.linspace(0, 1, len(final))}

    paths = plots.analysis_plots(result, spectra, tmp_path / "figs", domain_ranks=domain_ranks, spearman=0.87)

    names = [p.name for p in paths]
    assert names == [plots.HEATMAP, plots.TRAJECTORIES, plots.SPECTRA, plots.CROSS_DOMAIN]
    for path in paths:
        _check_png(path)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(names)  # no temporary files left


def test_analysis_plots_without_domains_or_spectra(tmp_path: Path) -> None:
    result, _ = _result()
    paths = plots.analysis_plots(result, None, tmp_path)
    assert [p.name for p in paths] == [plots.HEATMAP, plots.TRAJECTORIES]


def test_single_plots_options(tmp_path: Path) -> None:
    result, _ = _result()
    _check_png(plots.rank_heatmap(result, tmp_path / "h.png", metric="stable_rank", normalise=True))
    _check_png(plots.rank_trajectories(result, tmp_path / "t.png", layers=[1], metric="rank_utilization"))
    with pytest.raises(ValueError, match="not in the result"):
        plots.rank_trajectories(result, tmp_path / "bad.png", layers=[7])
    with pytest.raises(ValueError, match="exactly two"):
        plots.cross_domain_scatter({"a": np.ones(3)}, 1.0, tmp_path / "c.png")
