"""Strong rank-revealing QR (Gu & Eisenstat, SIAM J. Sci. Comput. 17(4), 1996) for choosing k columns of a matrix.

QR with column pivoting (QRCP: repeatedly take the column with the largest residual norm) usually picks k columns
that span A almost as well as its top k singular vectors, but can be off by a factor 2^k (Kahan's matrix). Strong RRQR
starts from QRCP and exchanges a selected column for an unselected one while that grows |det R11| by more than a
factor f > 1 (their Algorithm 4, with the QR recomputed after each exchange instead of updated). On return, with

    A P = Q [R11 R12]        R11 [k, k], R12 [k, n-k], R22 [min(m, n)-k, n-k],
            [ 0  R22]

every |(R11^{-1} R12)_ij| <= f, and (their Theorem 3.2) for all i <= k < k + j:

    sigma_i(R11) >= sigma_i(A) / sqrt(1 + f^2 k (n-k)),    sigma_j(R22) <= sigma_{k+j}(A) sqrt(1 + f^2 k (n-k)).

Everything the algorithm looks at (residual column norms, R11^{-1} R12, |det R11|) depends on A only through the
inner products of its columns, A^T A. Any F with F^T F = A^T A therefore yields the same pivots and the same
selection, so the selection can run on a factor of an accumulated Gram matrix (:func:`gram_factor`) instead of the
tokens x channels feature matrix itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.linalg
import torch
from torch import Tensor


@dataclass(frozen=True)
class RRQRInfo:
    """What :func:`strong_rrqr` did."""

    swaps: int  # column exchanges after QRCP
    rank: int  # numerical rank of A found by QRCP; the strong bound covers the first min(k, rank) columns
    max_coefficient: float  # max |(R11^{-1} R12)_ij| on return (<= f when converged)
    max_ratio: float  # max rho_ij on return: the most one more exchange could grow |det R11| by
    converged: bool  # max_ratio <= f, i.e. max_swaps did not run out


def swap_ratios(r: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """R11^{-1} R12 and the determinant ratios rho of all exchanges, for an upper-triangular R [p, n] (p >= k).

    Exchanging selected column i < k with unselected column k + j and retriangularising changes the leading block
    to R11' with |det R11'| = rho_ij |det R11| (Gu & Eisenstat, Lemma 3.1), where

        rho_ij^2 = (R11^{-1} R12)_ij^2 + (gamma_j(R22) / omega_i(R11))^2,
        gamma_j(R22) = ||R22[:, j]||  (the residual norm of column k + j),
        omega_i(R11) = 1 / ||R11^{-1}[i, :]||.

    R11 must be nonsingular. Returns (R11^{-1} R12 [k, n-k], rho [k, n-k]), float64.
    """
    r = r.to(torch.float64)
    r11, r12, r22 = r[:k, :k], r[:k, k:], r[k:, k:]
    r11_inv = torch.linalg.solve_triangular(r11, torch.eye(k, dtype=r.dtype), upper=True)
    coefficients = r11_inv @ r12
    gamma = torch.linalg.vector_norm(r22, dim=0)  # [n-k]; zeros when R has no rows below k
    inv_omega = torch.linalg.vector_norm(r11_inv, dim=1)  # [k]
    return coefficients, torch.hypot(coefficients, torch.outer(inv_omega, gamma))


def strong_rrqr(
    a: Tensor, k: int, f: float = 1.5, max_swaps: int = 1000, rtol: float | None = None
) -> tuple[Tensor, RRQRInfo]:
    """Strong RRQR of A [m, n]: a column permutation [n] (LongTensor) whose first k entries are the selected columns.

    Each exchange takes the pair (i, j) with the largest rho_ij (see :func:`swap_ratios`) while that exceeds f, so
    |det R11| grows by more than f per exchange and the loop ends; ``max_swaps`` only guards against pathological
    round-off, and ``info.converged`` says whether the bound was met. Computes in float64.

    Rank deficiency: QRCP's |R_ii| are non-increasing; columns from the first i with |R_ii| <= rtol |R_00| on lie
    in the span of the earlier ones (numerically), and ``info.rank`` is that i. If rank < k, every k-subset has
    det R11 = 0, so the determinant criterion cannot rank them: the exchanges then run for the leading rank columns
    only (a nonsingular block, so no division by zero) and the remaining k - rank selected columns are the next
    pivots, which add no direction anyway. For k <= rank the k selected columns are independent, whatever zero or
    duplicate columns A has. ``rtol`` defaults to max(m, n) * eps, as numpy.linalg.matrix_rank.
    """
    if a.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(a.shape)}")
    m, n = a.shape
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, {n}]")
    if not f > 1:
        raise ValueError(f"f must exceed 1 (so that every exchange grows |det R11| and the exchanges end), got {f}")
    a = a.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError("the matrix has NaN or Inf entries")

    r, pivots = scipy.linalg.qr(a.numpy(), mode="r", pivoting=True)  # LAPACK geqp3: greedy max residual norm
    r, perm = torch.from_numpy(r), torch.from_numpy(pivots).long()
    diag = r.diagonal().abs()
    tol = (max(m, n) * torch.finfo(torch.float64).eps if rtol is None else rtol) * (diag[0] if len(diag) else 0.0)
    rank = int((diag > tol).sum())
    k_eff = min(k, rank)

    # A = Q R P^T, so R's columns in the original order have A's inner products: retriangularise those, not A.
    base = r[:, torch.argsort(perm)]
    swaps = 0
    coefficients = ratios = torch.zeros(0, dtype=torch.float64)
    while 0 < k_eff < n:  # with nothing selected, or nothing left out, there is nothing to exchange
        coefficients, ratios = swap_ratios(r, k_eff)
        best = int(ratios.argmax())
        if ratios.flatten()[best] <= f or swaps == max_swaps:
            break
        i, j = divmod(best, n - k_eff)
        perm[[i, k_eff + j]] = perm[[k_eff + j, i]]
        r = torch.linalg.qr(base[:, perm], mode="r").R
        swaps += 1

    max_coefficient = float(coefficients.abs().max()) if coefficients.numel() else 0.0
    max_ratio = float(ratios.max()) if ratios.numel() else 0.0
    return perm, RRQRInfo(swaps, rank, max_coefficient, max_ratio, converged=max_ratio <= f)


def gram_factor(gram: Tensor) -> Tensor:
    """A square factor F [n, n] with F^T F = gram, for a symmetric positive semi-definite gram [n, n] (float64).

    F = diag(sqrt(lambda)) V^T from gram = V diag(lambda) V^T, which needs no definiteness (unlike Cholesky). QRCP
    and strong RRQR of F pick the same columns as of any M with M^T M = gram (see the module docstring).

    Eigenvalues below n * eps * lambda_max are set to zero: at that size they are the rounding error of the Gram
    matrix, not directions of M (the Gram resolves M's singular values only down to about sqrt(eps) sigma_max).
    Kept, their square roots would put noise of ~1e-8 ||F|| into F and make exactly dependent columns look
    independent to the rank test of :func:`strong_rrqr`; zeroed, F is exactly rank-deficient there.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(gram.shape)}")
    gram = gram.detach().to("cpu", torch.float64)
    if not torch.isfinite(gram).all():
        raise ValueError("the Gram matrix has NaN or Inf entries")
    eigenvalues, eigenvectors = torch.linalg.eigh((gram + gram.T) / 2)
    floor = gram.shape[0] * torch.finfo(torch.float64).eps * eigenvalues[-1].clamp(min=0.0)
    eigenvalues = torch.where(eigenvalues > floor, eigenvalues, torch.zeros_like(eigenvalues))
    return eigenvalues.sqrt()[:, None] * eigenvectors.T
