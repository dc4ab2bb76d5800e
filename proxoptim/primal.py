"""The primal form: the d × d Gram G = Ũ Ũᵀ of each group, then CG on V ↦ V/τθ + V G
(``m·d²`` flops per iteration) or an exact Cholesky solve (``d³/3 + 2·m·d²``).

Rows are independent systems (DESIGN.md §1): the right-hand side ``g`` and the solution
``v`` are ``(groups, rows_per_group, row_dim)`` and every row of a group shares the same
symmetric positive definite M = G + I/τθ. Since M is symmetric, ``v M = g`` is
``M vᵀ = gᵀ``. The Gram itself is built by the layer's system (proxoptim.operators, and
proxoptim.conv_gram for stride-1 convolutions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from proxoptim.cg import SolveResult

if TYPE_CHECKING:
    from proxoptim.plan import PlanState

# An exact solve in a precision narrower than float64 whose relative residual ‖g − vM‖/‖g‖
# exceeds this is redone in float64.
EXACT_RESIDUAL_LIMIT = 1e-4


def shifted_gram(gram: Tensor, tau_prox: float, constants: PlanState | None = None) -> Tensor:
    """M = G + I/τθ, shape (groups, d, d); I/τθ kept in ``constants`` where given."""
    dim, dtype, device = gram.shape[-1], gram.dtype, gram.device

    def scaled_eye() -> Tensor:
        return torch.eye(dim, dtype=dtype, device=device) / tau_prox

    if constants is None:
        return gram + scaled_eye()
    return gram + constants.constant(f"eye/tau:{dim}:{dtype}", scaled_eye)


# With at least this many rows per Gram dimension, the primal exact solve multiplies by the
# explicit inverse (a d³ LAPACK call, then one GEMM) instead of solving triangular systems
# for every row. Measured on the CPU (2 threads, torch 2.14; per solve, µs, explicit
# inverse against cholesky_solve): d = 65, m = 400: 197 / 405; d = 101, m = 400:
# 362 / 623; d = 401, m = 100: 2,743 / 1,093 (the digits MLP's three layers).
EXPLICIT_INVERSE_MIN_ROWS_PER_DIM = 2


def cholesky_solve_rows(
    gram: Tensor,
    rhs: Tensor,
    tau_prox: float,
    diagnostics: bool = True,
    constants: PlanState | None = None,
) -> SolveResult:
    """Exact v = g M⁻¹ per group by Cholesky, M = G + I/τθ.

    Args:
        gram: G, (groups, d, d).
        rhs: g, (groups, rows_per_group, d).
        diagnostics: also return the residual in float64 (narrower dtypes compute it
            anyway, for their accuracy check).
        constants: the plan's kept constants (I/τθ).

    In float64 nothing is read back: a factorisation that fails (M not numerically positive
    definite: non-finite inputs, or a τθ so large that I/τθ vanishes against a singular G)
    gives a NaN direction, which the optimizer's non-finite check names. In a narrower
    dtype (M is ill-conditioned in float32 when τθ·‖G‖ is large) one read-back of two norms
    checks the residual R = g − vM in a random combination of its rows: ‖ωᵀR‖ against
    ‖ωᵀg‖ for a fixed Gaussian ω (per group) estimates ‖R‖_F/‖g‖_F, whose expectations
    they are (squared), at the cost of three products with one row instead of a full
    (m × d)(d × d) product as large as the solve's own. If it exceeds
    :data:`EXACT_RESIDUAL_LIMIT` (or is NaN: a failed factorisation), the whole solve is
    redone in float64.
    """
    shifted = shifted_gram(gram, tau_prox, constants)
    factor, info = torch.linalg.cholesky_ex(shifted)
    if rhs.shape[-2] >= EXPLICIT_INVERSE_MIN_ROWS_PER_DIM * rhs.shape[-1]:
        # bmm itself: the @ operator dispatches five more (expands and views) around it.
        direction = torch.bmm(rhs, torch.cholesky_inverse(factor))
    else:
        direction = torch.cholesky_solve(rhs.transpose(-1, -2), factor).transpose(-1, -2)
    if rhs.dtype == torch.float64:
        direction = direction.masked_fill(info.ne(0).reshape(-1, 1, 1), float("nan"))
        residual = torch.baddbmm(rhs, direction, shifted, alpha=-1) if diagnostics else None
        return SolveResult(direction, 0, residual)
    combination = _row_combination(rhs, constants)
    combined_rhs = torch.bmm(combination, rhs)
    combined_residual = torch.baddbmm(
        combined_rhs, torch.bmm(combination, direction), shifted, alpha=-1
    )
    norms = torch.stack(torch._foreach_norm([combined_residual, combined_rhs])).tolist()
    # (A NaN residual norm fails this comparison too.)
    if norms[0] <= EXACT_RESIDUAL_LIMIT * norms[1]:
        residual = torch.baddbmm(rhs, direction, shifted, alpha=-1) if diagnostics else None
        return SolveResult(direction, 0, residual)
    wide = cholesky_solve_rows(gram.double(), rhs.double(), tau_prox)
    direction, residual = wide.direction.to(rhs.dtype), wide.residual.to(rhs.dtype)
    return SolveResult(direction, 0, residual)


def _row_combination(rhs: Tensor, constants: PlanState | None) -> Tensor:
    """A fixed Gaussian ω per group, (groups, 1, rows), from a seeded stream (the same on
    every step and every run), kept by the plan."""
    groups, rows = rhs.shape[0], rhs.shape[1]

    def draw() -> Tensor:
        generator = torch.Generator().manual_seed(0xC0DE)
        weights = torch.randn(groups, 1, rows, generator=generator, dtype=torch.float64)
        return weights.to(device=rhs.device, dtype=rhs.dtype)

    if constants is None:
        return draw()
    return constants.constant(f"row-combination:{groups}:{rows}:{rhs.dtype}", draw)


def primal_operator(gram: Tensor, tau_prox: float) -> Callable[[Tensor, Tensor], Tensor]:
    """(V, out) ↦ out = V/τθ + V G with the primal Gram G, (groups, d, d): one operator."""
    inverse_tau = 1.0 / tau_prox

    def apply_m(rows: Tensor, out: Tensor) -> Tensor:
        return torch.baddbmm(rows, rows, gram, beta=inverse_tau, out=out)

    return apply_m
