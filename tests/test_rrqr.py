"""Strong RRQR and the Gram-matrix factor, on small matrices with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch

from staterank.rrqr import gram_factor, strong_rrqr, swap_ratios


def kahan(n: int, c: float, tau: float = 1e-3) -> torch.Tensor:
    """Kahan's matrix diag(s^i) (I - c * strict upper ones), s^2 + c^2 = 1, where QRCP fails to reveal the rank.

    Its columns all have norm 1, and so have their residuals at every QRCP step; the column scaling (1 - tau)^j
    breaks those ties so that QRCP surely keeps the identity order (the classic construction).
    """
    s = np.sqrt(1 - c * c)
    matrix = np.diag(s ** np.arange(n)) @ (np.eye(n) - c * np.triu(np.ones((n, n)), 1))
    return torch.from_numpy(matrix * (1 - tau) ** np.arange(n))


def blocks(a: torch.Tensor, perm: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(R11^{-1} R12, R22) of the QR of A[:, perm], computed here independently of the module."""
    r = np.linalg.qr(a[:, perm].numpy(), mode="r")
    return scipy.linalg.solve_triangular(r[:k, :k], r[:k, k:]), r[k:, k:]


def rank(a: torch.Tensor) -> int:
    return int(np.linalg.matrix_rank(a.numpy()))


def test_known_rank_selects_independent_columns():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 12, generator=g, dtype=torch.float64)
    for k in (2, 4, 6):
        perm, info = strong_rrqr(a, k)
        assert sorted(perm.tolist()) == list(range(12))
        assert info.rank == 4
        assert rank(a[:, perm[:k]]) == min(k, 4)
        assert np.isfinite(info.max_coefficient) and info.max_coefficient <= 1.5


def test_agrees_with_qrcp_when_spectrum_is_well_separated():
    # Nearly orthogonal columns with norms 2^-i, shuffled: QRCP takes them by norm, and that is already strong.
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(30, 10, generator=g, dtype=torch.float64))
    mix = torch.eye(10, dtype=torch.float64) + 0.05 * torch.randn(10, 10, generator=g, dtype=torch.float64)
    a = (u * 2.0 ** -torch.arange(10.0, dtype=torch.float64)) @ mix
    a = a[:, torch.randperm(10, generator=g)]
    _, pivots = scipy.linalg.qr(a.numpy(), mode="r", pivoting=True)
    for k in (1, 3, 5, 9):
        perm, info = strong_rrqr(a, k)
        assert info.swaps == 0
        assert perm.tolist() == pivots.tolist()


def test_swap_ratios_are_determinant_ratios():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, 7, generator=g, dtype=torch.float64)
    k = 3
    r = torch.linalg.qr(a, mode="r").R
    coefficients, ratios = swap_ratios(r, k)
    det = abs(np.prod(np.diag(r.numpy()[:k, :k])))
    for i, j in itertools.product(range(k), range(7 - k)):
        perm = list(range(7))
        perm[i], perm[k + j] = perm[k + j], perm[i]
        swapped = np.linalg.qr(a[:, perm].numpy(), mode="r")
        assert ratios[i, j].item() == pytest.approx(abs(np.prod(np.diag(swapped[:k, :k]))) / det, rel=1e-10)
    expected, _ = blocks(a, torch.arange(7), k)
    np.testing.assert_allclose(coefficients.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_kahan_matrix_needs_swaps_and_then_meets_the_strong_bounds():
    n, k, f = 20, 19, 1.5
    a = kahan(n, 0.5)
    r, pivots = scipy.linalg.qr(a.numpy(), mode="r", pivoting=True)
    assert pivots.tolist() == list(range(n))  # QRCP does not pivot ...
    _, ratios = swap_ratios(torch.from_numpy(r), k)
    assert ratios.max() > 100 * f  # ... and misses the rank by far

    perm, info = strong_rrqr(a, k, f, max_swaps=0)
    assert perm.tolist() == pivots.tolist() and not info.converged and info.max_ratio == ratios.max().item()
    perm, info = strong_rrqr(a, k, f)
    assert info.swaps > 0 and info.converged
    coefficients, r22 = blocks(a, perm, k)
    assert np.abs(coefficients).max() <= f
    assert info.max_coefficient == pytest.approx(np.abs(coefficients).max())
    # Gu & Eisenstat, Theorem 3.2
    sigma = np.linalg.svd(a.numpy(), compute_uv=False)
    r11 = np.linalg.qr(a[:, perm[:k]].numpy(), mode="r")
    bound = np.sqrt(1 + f**2 * k * (n - k))
    assert np.linalg.svd(r11, compute_uv=False)[-1] >= sigma[k - 1] / bound
    assert np.linalg.norm(r22, 2) <= sigma[k] * bound


@pytest.mark.parametrize("k", [3, 8, 12])
def test_bound_holds_on_random_matrices(k):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(50, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -6, 16, dtype=torch.float64)
    perm, info = strong_rrqr(a, k, f=1.1)
    coefficients, r22 = blocks(a, perm, k)
    r11_inv = np.linalg.inv(np.linalg.qr(a[:, perm].numpy(), mode="r")[:k, :k])
    rho = np.hypot(coefficients, np.outer(np.linalg.norm(r11_inv, axis=1), np.linalg.norm(r22, axis=0)))
    assert info.converged and rho.max() <= 1.1
    assert info.max_ratio == pytest.approx(rho.max())


def test_same_selection_from_the_gram_factor():
    g = torch.Generator().manual_seed(5)
    m = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    factor = gram_factor(m.T @ m)
    torch.testing.assert_close(factor.T @ factor, m.T @ m)
    r_m, pivots_m = scipy.linalg.qr(m.numpy(), mode="r", pivoting=True)
    r_f, pivots_f = scipy.linalg.qr(factor.numpy(), mode="r", pivoting=True)
    assert pivots_f.tolist() == pivots_m.tolist()
    np.testing.assert_allclose(np.abs(np.diag(r_f)), np.abs(np.diag(r_m)), rtol=1e-8)

    kahan_m = torch.randn(60, 20, generator=g, dtype=torch.float64)
    kahan_m = torch.linalg.qr(kahan_m).Q @ kahan(20, 0.5)  # Kahan's matrix in 60 dims: QRCP fails here too
    for a, k in ((m, 4), (m, 9), (kahan_m, 19)):
        perm, info = strong_rrqr(a, k)
        perm_f, info_f = strong_rrqr(gram_factor(a.T @ a), k)
        assert sorted(perm_f[:k].tolist()) == sorted(perm[:k].tolist())
        assert info_f.swaps == info.swaps
    assert info.swaps > 0


def test_gram_factor_of_semidefinite_gram():
    g = torch.Generator().manual_seed(6)
    m = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)
    gram = m.T @ m
    factor = gram_factor(gram)
    assert torch.isfinite(factor).all()
    torch.testing.assert_close(factor.T @ factor, gram)
    assert int((factor.abs().sum(1) > 0).sum()) == 3  # rounding-level eigenvalues are dropped, not square-rooted
    assert not gram_factor(torch.zeros(4, 4, dtype=torch.float64)).any()


def test_zero_and_duplicate_columns():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(30, 5, generator=g, dtype=torch.float64)
    # columns: 0 zero, 1-5 independent, 6 duplicates 2, 7 zero, 8 duplicates 4 (scaled)
    a = torch.cat([torch.zeros(30, 1), base, base[:, 1:2], torch.zeros(30, 1), 3 * base[:, 3:4]], dim=1)
    for source in (a, gram_factor(a.T @ a)):
        for k in (3, 5):
            perm, info = strong_rrqr(source, k)
            selected = set(perm[:k].tolist())
            assert info.rank == 5 and info.converged
            assert not selected & {0, 7} and not {2, 6} <= selected and not {4, 8} <= selected
            assert rank(a[:, perm[:k]]) == k
        perm, info = strong_rrqr(source, 7)  # more columns than the rank: no NaN, still a permutation
        assert sorted(perm.tolist()) == list(range(9)) and info.rank == 5 and np.isfinite(info.max_ratio)
        assert rank(a[:, perm[:7]]) == 5


def test_degenerate_inputs():
    perm, info = strong_rrqr(torch.zeros(5, 4), 2)
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and info.rank == 0 and info.swaps == 0
    a = torch.randn(3, 6, dtype=torch.float64)  # wide: rank 3 < k = 4
    perm, info = strong_rrqr(a, 4)
    assert info.rank == 3 and rank(a[:, perm[:4]]) == 3
    assert strong_rrqr(a, 6)[0].sort().values.tolist() == list(range(6))
    assert strong_rrqr(a, 0)[1].swaps == 0
    small = torch.eye(4, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1e-3, 1e-6], dtype=torch.float64)
    assert strong_rrqr(small, 2)[1].rank == 4
    assert strong_rrqr(small, 2, rtol=1e-2)[1].rank == 2


@pytest.mark.parametrize(
    "call",
    [
        lambda: strong_rrqr(torch.eye(3), 4),
        lambda: strong_rrqr(torch.eye(3), 1, f=1.0),
        lambda: strong_rrqr(torch.tensor([[float("nan"), 1.0]]), 1),
        lambda: strong_rrqr(torch.ones(3), 1),
        lambda: gram_factor(torch.ones(2, 3)),
    ],
)
def test_invalid_input(call):
    with pytest.raises(ValueError):
        call()
