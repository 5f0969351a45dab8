"""State ranks: states against the per-token recurrence, metrics on matrices of known spectrum, groups by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import delta_rule_loop

from staterank.models import HeadFeatures
from staterank.rank import (
    HostSingularValues,
    decided_at,
    log_positions,
    mean_pairwise_spearman,
    singular_values_of,
    spearman,
    spectral_metrics,
    split_groups,
    states_at,
)


def make_features(num_k: int, num_v: int, gated: bool, seq: int = 150, batch: int = 2) -> HeadFeatures:
    g = torch.Generator().manual_seed(7)
    d_k, d_v = 8, 6

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return HeadFeatures(
        layer=0,
        hidden=randn(batch, seq, 4),
        q=randn(batch, seq, num_k, d_k),
        k=randn(batch, seq, num_k, d_k),
        v=randn(batch, seq, num_v, d_v),
        beta=randn(batch, seq, num_v).sigmoid(),
        log_decay=-0.1 * F.softplus(randn(batch, seq, num_v)) if gated else None,
    )


def prefix(features: HeadFeatures, t: int) -> HeadFeatures:
    """The first t tokens of a batch of features."""
    return HeadFeatures(
        layer=features.layer,
        hidden=features.hidden[:, :t],
        q=features.q[:, :t],
        k=features.k[:, :t],
        v=features.v[:, :t],
        beta=features.beta[:, :t],
        log_decay=None if features.log_decay is None else features.log_decay[:, :t],
    )


@pytest.mark.parametrize(("num_k", "num_v", "gated"), [(3, 3, False), (2, 4, True)], ids=["deltanet", "gated-grouped"])
def test_states_match_per_token_recurrence(num_k, num_v, gated):
    features = make_features(num_k, num_v, gated)
    positions = [1, 2, 63, 64, 65, 100, 150]  # T = 150 is not a multiple of the chunk size 64
    states = states_at(features, positions, chunk_size=64, dtype=torch.float64)
    assert states.shape == (len(positions), 2, num_v, 8, 6)
    assert states.dtype == torch.float64
    for state, t in zip(states, positions, strict=True):
        torch.testing.assert_close(state, delta_rule_loop(prefix(features, t))[1], rtol=1e-10, atol=1e-10)


def test_states_default_float32_and_chunk_size_independent():
    features = make_features(2, 4, gated=True, seq=70)
    positions = [1, 17, 70]
    reference = torch.stack([delta_rule_loop(prefix(features, t))[1] for t in positions])
    for chunk_size in (8, 64):
        states = states_at(features, positions, chunk_size=chunk_size)
        assert states.dtype == torch.float32
        torch.testing.assert_close(states.double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positions", [[], [0, 5], [5, 71], [5, 3], [3, 3], [2.5]])
def test_states_reject_bad_positions(positions):
    with pytest.raises(ValueError, match="positions"):
        states_at(make_features(1, 1, gated=False, seq=70), positions)


def orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))[0]


def test_metrics_of_known_spectrum():
    g = torch.Generator().manual_seed(3)
    sigma = [3.0, 2.0, 1.0, 1e-6, 0.0]
    d_k, d_v = 5, 7
    matrices = []
    for scale in (1.0, 10.0, 0.5):  # every measure but the nuclear norm is scale invariant
        u, v = orthonormal(d_k, 5, g), orthonormal(d_v, 5, g)
        matrices.append(scale * u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ v.T)
    matrices.append(torch.zeros(d_k, d_v, dtype=torch.float64))
    states = torch.stack(matrices).reshape(2, 2, d_k, d_v)

    metrics = spectral_metrics(states, eps=1e-4)
    for name, value in metrics.items():
        expected_shape = (2, 2, 5) if name == "singular_values" else (2, 2)
        assert value.shape == expected_shape, name
        assert value.dtype == torch.float64, name

    flat = {name: value.reshape(4, *value.shape[2:]) for name, value in metrics.items()}
    total = sum(sigma)
    entropy = -sum(s / total * math.log(s / total) for s in sigma if s > 0)
    stable = sum(s * s for s in sigma) / 9.0
    for i, scale in enumerate((1.0, 10.0, 0.5)):
        torch.testing.assert_close(flat["singular_values"][i], scale * torch.tensor(sigma, dtype=torch.float64))
        assert flat["effective_rank"][i] == 3  # 1e-6 < 1e-4 * 3
        assert flat["stable_rank"][i].item() == pytest.approx(stable, rel=1e-12)
        assert flat["rank_utilization"][i].item() == pytest.approx(stable / 5, rel=1e-12)
        assert flat["entropy_rank"][i].item() == pytest.approx(math.exp(entropy), rel=1e-9)
        assert flat["nuclear_norm"][i].item() == pytest.approx(scale * total, rel=1e-12)
    for name, value in flat.items():
        assert torch.all(value[3] == 0), name


def test_singular_values_of_batches_of_mixed_shapes():
    # batches of 8 x 6 and 4 x 6 matrices, interleaved and of different batch shapes, with spectra set by hand
    g = torch.Generator().manual_seed(5)

    def known(spectra: torch.Tensor, d_k: int, d_v: int) -> torch.Tensor:
        flat = [orthonormal(d_k, len(s), g) @ torch.diag(s) @ orthonormal(d_v, len(s), g).T for s in spectra]
        return torch.stack(flat)

    spectra = [torch.rand(12, 4, generator=g, dtype=torch.float64).sort(-1, descending=True).values for _ in range(3)]
    spectra[1][:, 2:] = 0.0  # rank 2
    batches = [known(spectra[0], 8, 6).reshape(3, 4, 8, 6), known(spectra[1], 4, 6), known(spectra[2], 8, 6)]
    sigmas = singular_values_of(batches)
    assert [s.shape for s in sigmas] == [(3, 4, 6), (12, 4), (12, 6)]  # min(d_k, d_v) values each
    for sigma, expected in zip(sigmas, spectra, strict=True):
        padded = F.pad(expected, (0, sigma.shape[-1] - 4))  # an 8 x 6 matrix of rank <= 4 has two zeros more
        torch.testing.assert_close(sigma.reshape(12, -1), padded, atol=1e-12, rtol=1e-12)


def test_host_singular_values_while_the_caller_goes_on():
    # 150 matrices of 8 x 6 with spectra set by hand, in chunks of 64 over two worker threads, beside a second batch
    g = torch.Generator().manual_seed(11)
    spectra = torch.rand(150, 6, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    spectra[::7, 3:] = 0.0  # some of rank 3
    matrices = torch.stack([orthonormal(8, 6, g) @ torch.diag(s) @ orthonormal(6, 6, g).T for s in spectra])
    with HostSingularValues(workers=2, chunk=64) as host:
        first = host.submit(matrices.reshape(3, 50, 8, 6))
        second = host.submit(matrices[:5].transpose(-1, -2))
        torch.testing.assert_close(second(), spectra[:5], atol=1e-12, rtol=1e-12)
        sigma = first()
    assert sigma.shape == (3, 50, 6)
    torch.testing.assert_close(sigma.reshape(150, 6), spectra, atol=1e-12, rtol=1e-12)
    with pytest.raises(RuntimeError, match="outside"):
        host.submit(matrices)


def test_metrics_effective_rank_threshold_and_float32():
    states = torch.diag(torch.tensor([1.0, 1e-3, 1e-5, 0.0]))
    metrics = spectral_metrics(states, eps=1e-4)
    assert metrics["effective_rank"].dtype == torch.float32
    assert metrics["effective_rank"].item() == 2
    assert spectral_metrics(states, eps=1e-6)["effective_rank"].item() == 3
    # An orthogonal matrix uses its state fully by every measure.
    for name in ("effective_rank", "stable_rank", "entropy_rank"):
        assert spectral_metrics(torch.eye(4))[name].item() == pytest.approx(4.0)
    assert spectral_metrics(torch.eye(4))["rank_utilization"].item() == pytest.approx(1.0)


def test_split_groups_bimodal():
    values = torch.tensor([0.10, 0.12, 0.90, 0.11, 0.85, 0.95])
    split = split_groups(values)
    assert split.high.tolist() == [False, False, True, False, True, True]
    assert split.gap == pytest.approx(0.85 - 0.12)
    assert 0.12 < split.threshold < 0.85
    assert split.method == "otsu"
    assert torch.equal(values > split.threshold, split.high)


def test_split_groups_is_the_best_two_class_split():
    """Exhaustive check: no other cut of the sorted values has smaller summed within-group squared deviations."""
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        values = torch.cat((torch.rand(6, generator=g), 1.5 + torch.rand(4, generator=g))).double()
        values = values[torch.randperm(10, generator=g)]
        ordered = np.sort(values.numpy())

        def within(low: np.ndarray, high: np.ndarray) -> float:
            return float(((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum())

        best = min(within(ordered[:i], ordered[i:]) for i in range(1, 10))
        split = split_groups(values)
        chosen = within(values[~split.high].numpy(), values[split.high].numpy())
        assert chosen == pytest.approx(best, rel=1e-12)


def test_split_groups_degenerate_and_ties():
    for values in (torch.tensor([]), torch.tensor([2.0]), torch.full((4,), 3.0)):
        split = split_groups(values)
        assert not split.high.any()
        assert split.gap == 0.0
    tied = split_groups(torch.tensor([1.0, 5.0, 1.0, 1.0, 5.0]))
    assert tied.high.tolist() == [False, True, False, False, True]
    assert tied.gap == 4.0
    with pytest.raises(ValueError):
        split_groups(torch.tensor([1.0, math.nan]))


def test_decided_at_hand_trajectory():
    values = torch.tensor(
        [
            # head: always high, flips until row 3, drops at row 1, rises at the last row, sits at the threshold
            [0.9, 0.1, 0.9, 0.1, 0.5],
            [0.9, 0.9, 0.1, 0.1, 0.5],
            [0.9, 0.1, 0.1, 0.1, 0.5],
            [0.9, 0.9, 0.1, 0.1, 0.5],
            [0.9, 0.9, 0.1, 0.9, 0.5],
        ]
    )
    decided = decided_at(values, threshold=0.5)
    assert decided.dtype == torch.long
    assert decided.tolist() == [0, 3, 1, 4, 0]


def test_spearman_by_hand():
    a = [10.0, 20.0, 30.0, 40.0, 50.0]
    b = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)), with rank differences d = (0, -1, 1, -1, 1)
    assert spearman(a, b) == pytest.approx(1 - 6 * 4 / (5 * 24))
    assert math.isnan(spearman(a, [2.0] * 5))
    assert math.isnan(spearman([1.0], [2.0]))
    # with ties, Spearman is Pearson's correlation of the average ranks
    c, d = [1.0, 2.0, 2.0, 3.0], [4.0, 1.0, 3.0, 2.0]
    rc, rd = np.array([1, 2.5, 2.5, 4]), np.array([4.0, 1, 3, 2])
    assert spearman(c, d) == pytest.approx(np.corrcoef(rc, rd)[0, 1])


def test_mean_pairwise_spearman():
    rows = torch.tensor([[10.0, 20, 30, 40, 50], [1, 3, 2, 5, 4], [50, 40, 30, 20, 10]])
    # pairs: 0.8, -1, and (b, reversed a) with d^2 sum 36: 1 - 216 / 120 = -0.8
    assert mean_pairwise_spearman(rows) == pytest.approx((0.8 - 1 - 0.8) / 3)

    g = torch.Generator().manual_seed(2)
    per_sample = torch.randint(0, 4, (6, 7), generator=g).double()  # many ties
    per_sample[2] = 1.0  # a constant sample takes part in no pair
    pairs = [spearman(per_sample[i], per_sample[j]) for i, j in itertools.combinations(range(6), 2)]
    assert mean_pairwise_spearman(per_sample) == pytest.approx(np.nanmean(pairs))
    assert math.isnan(mean_pairwise_spearman(rows[:1]))


def test_log_positions():
    assert log_positions(4096, 13) == [2**i for i in range(13)]
    for seq_len, count in [(1, 12), (5, 12), (100, 12), (2048, 12), (1000, 2), (37, 1)]:
        grid = log_positions(seq_len, count)
        assert grid == sorted(set(grid))
        assert grid[-1] == seq_len
        assert 1 <= grid[0] and len(grid) <= count
        assert all(isinstance(t, int) for t in grid)
        if count >= 2:
            assert grid[0] == 1
    with pytest.raises(ValueError):
        log_positions(0)
