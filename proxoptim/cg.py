"""Batched conjugate gradients: one textbook CG per row, every row at once.

Shared by the matrix-free and the primal forms (proxoptim.matrix_free, proxoptim.primal),
whose M-products differ; the dual form runs its own recurrences in the n-dimensional sample
space (proxoptim.dual).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from proxoptim.rowwise import row_dot, step_ratio


@dataclass
class SolveResult:
    """A solution and how it was obtained.

    Attributes:
        direction: v, same shape as the right-hand side.
        iterations: CG iterations run (0 for an exact solve).
        residual: the final residual g − v M (CG: by recurrence; exact: computed), or None
            where not asked for.
    """

    direction: Tensor
    iterations: int
    residual: Tensor | None


def batched_cg(
    apply_m: Callable[[Tensor], Tensor],
    rhs: Tensor,
    iterations: int,
    tol: float | None = None,
    need_residual: bool = True,
) -> SolveResult:
    """Textbook conjugate gradients on every row of ``rhs`` at once, from v = 0.

    Each row has its own step sizes α_j, β_j. A row whose residual is exactly zero stays put
    (its α and β are set to 0 instead of 0/0). With ``tol``, iteration stops early once
    every row satisfies ‖r_j‖ ≤ tol·‖g_j‖ (this reads a scalar back from the device).

    Args:
        apply_m: V ↦ V M for a symmetric positive definite M, on tensors shaped like rhs.
        rhs: g, shape (..., row_dim).
        iterations: the most CG iterations to run (k ≥ 1).
        tol: optional relative residual at which to stop early.
        need_residual: whether the caller reads the final residual; without it (and
            without ``tol``) the last iteration does not update it (``residual`` None).

    Returns:
        The iterate after ``iterations`` (or fewer) steps and its recurrence residual.
    """
    if iterations < 1:
        return SolveResult(torch.zeros_like(rhs), 0, rhs.clone())
    # From x₀ = 0: r₀ = p₀ = g, read from ``rhs`` itself (never written), so the first
    # iteration creates x, r and p instead of zero-filling and copying them. Every full
    # iteration then dispatches 12 operators: the product, two row inner products (two
    # each), two guarded ratios (two each) and three fused updates, all of them in place.
    residual = direction = rhs
    residual_sq = row_dot(rhs, rhs)
    threshold_sq = None if tol is None else (tol * tol) * residual_sq
    solution = None
    done = 0
    for done in range(1, iterations + 1):
        m_direction = apply_m(direction)
        alpha = step_ratio(residual_sq, row_dot(direction, m_direction))
        last = done == iterations
        if solution is None:
            solution = direction * alpha
        else:
            solution.addcmul_(direction, alpha)
        if last and not need_residual and tol is None:
            residual = None  # (nobody reads the final residual)
            break
        if residual is rhs:
            residual = torch.addcmul(rhs, m_direction, alpha, value=-1)
        else:
            residual.addcmul_(m_direction, alpha, value=-1)
        if last:
            # The last iterate's residual norm, β and direction would serve no one.
            break
        new_residual_sq = row_dot(residual, residual)
        if threshold_sq is not None and bool((new_residual_sq <= threshold_sq).all()):
            break
        beta = step_ratio(new_residual_sq, residual_sq)
        if direction is rhs:
            direction = torch.addcmul(residual, direction, beta)
        else:
            # p ← r + β·p in one pass (out= fully overlapping an input is allowed).
            torch.addcmul(residual, direction, beta, out=direction)
        residual_sq = new_residual_sq
    return SolveResult(solution, done, residual)
