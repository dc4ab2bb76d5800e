"""Solves of the ProxProp system  v M = g,  M = I/τθ + Ũ Ũᵀ,  for every row at once.

Rows are independent systems (DESIGN.md §1): the right-hand side ``g`` and the solution
``v`` are ``(groups, rows_per_group, row_dim)`` and every row of a group shares the same
symmetric positive definite M. Since M is symmetric, ``v M = g`` is ``M vᵀ = gᵀ``.

Two forms of the same computation (DESIGN.md §2) are implemented:

* ``"matrix_free"``: CG whose M-products are ``V/τθ + A*(A V)``, one forward and one
  weight-gradient product per iteration; costs ``2·n·d·m`` flops per iteration.
* ``"primal"``: build ``G = Ũ Ũᵀ`` once (``n·d²``), then CG with ``V/τθ + V G``
  (``m·d²`` per iteration) or an exact Cholesky solve (``d³/3 + 2·m·d²``).

Both give the same iterates up to rounding; the plan (:func:`proxoptim.plan.choose_form`)
picks the cheaper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from proxoptim.dual import DualKernel, solve_dual
from proxoptim.operators import LayerSystem
from proxoptim.rowwise import row_dot, step_ratio
from proxoptim.workspace import Workspace

if TYPE_CHECKING:
    from proxoptim.plan import PlanState

FORMS = ("matrix_free", "primal", "dual")

# An exact solve in a precision narrower than float64 whose relative residual ‖g − vM‖/‖g‖
# exceeds this is redone in float64.
EXACT_RESIDUAL_LIMIT = 1e-4


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


def matrix_free_operator(system: LayerSystem, tau_prox: float) -> Callable[[Tensor], Tensor]:
    """V ↦ V/τθ + A*(A V), evaluated with the layer's own forward and weight gradient."""
    inverse_tau = 1.0 / tau_prox

    def apply_m(rows: Tensor) -> Tensor:
        return system.gram_apply(rows).add_(rows, alpha=inverse_tau)

    return apply_m


def primal_operator(gram: Tensor, tau_prox: float) -> Callable[[Tensor], Tensor]:
    """V ↦ V/τθ + V G with the primal Gram G, (groups, d, d)."""
    inverse_tau = 1.0 / tau_prox

    def apply_m(rows: Tensor) -> Tensor:
        return torch.baddbmm(rows, rows, gram, beta=inverse_tau)

    return apply_m


# An exact solve without a Gram or kernel runs CG until every row's relative residual is
# below this (per dtype), for at most EXACT_CG_MAX_ITERATIONS iterations.
EXACT_CG_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
EXACT_CG_MAX_ITERATIONS = 1000


def exact_cg_budget(row_dim: int, dtype: torch.dtype) -> tuple[int, float]:
    """(iterations, tolerance) for an exact solve by CG on rows of dimension ``row_dim``."""
    return min(2 * row_dim, EXACT_CG_MAX_ITERATIONS), EXACT_CG_TOLERANCE.get(dtype, 1e-3)


@dataclass
class Solution:
    """A layer's direction v = (weight, bias) and how it was obtained.

    Attributes:
        iterations: CG iterations run (0 for an exact solve).
        residual_norm: ‖g − M v‖, 0-d (CG: by recurrence); None when not asked for.
    """

    weight: Tensor
    bias: Tensor | None
    iterations: int
    residual_norm: Tensor | None


def solve(
    system: LayerSystem,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    *,
    exact: bool,
    cg_iters: int,
    cg_tol: float | None,
    form: str,
    output_grad_scale: float | None = None,
    out: tuple[Tensor, Tensor | None] | None = None,
    workspace: Workspace | None = None,
    diagnostics: bool = True,
    dual_basis: str | None = None,
    constants: PlanState | None = None,
) -> Solution:
    """v = M⁻¹g (exact) or k CG iterations on it, in the given form.

    Args:
        grad_weight, grad_bias: g, shaped like the layer's weight and bias (bias None when
            the layer has no trainable bias).
        form: "matrix_free", "primal" or "dual" (Linear layers, one-group convolutions).
        output_grad_scale: for the dual form, s with .grad = s·δᵀŨᵀ, when verified.
        out: optional (W, b) buffers that receive v (reused across steps by the optimizer).
        workspace: scratch buffers shared by all layers' solves.
        diagnostics: also compute ‖g − M v‖ (``Solution.residual_norm``; None otherwise).
        dual_basis: the dual CG's basis as a plan chose it ("eigenbasis" or
            "coefficient"; None: priced here).
        constants: the plan's kept constants (None: built for this solve).
    """
    if form == "dual":
        kernel = DualKernel(system)
        # The dual form works on (m, d_weight) rows: a convolution's weight flattened.
        rows = grad_weight.shape[0]
        flat = grad_weight.dim() == 2  # a Linear weight is its rows already (no views)
        flat_out = None
        if out is not None and out[0].is_contiguous():
            flat_out = out if flat else (out[0].view(rows, -1), out[1])
        result = solve_dual(
            kernel,
            grad_weight if flat else grad_weight.reshape(rows, -1),
            grad_bias,
            tau_prox,
            exact=exact,
            cg_iters=cg_iters,
            cg_tol=cg_tol,
            output_grad_scale=output_grad_scale,
            out=flat_out,
            workspace=workspace,
            diagnostics=diagnostics,
            basis=dual_basis,
        )
        weight = result.weight if flat else result.weight.view(grad_weight.shape)
        bias = result.bias
        if out is not None and flat_out is None:
            weight = out[0].copy_(weight)
            bias = out[1].copy_(bias) if bias is not None else None
        return Solution(weight, bias, result.iterations, result.residual_norm)
    layout = system.layout
    rhs = layout.to_rows(grad_weight, grad_bias)
    if form == "primal":
        gram = system.gram()
        if exact:
            rows = cholesky_solve_rows(gram, rhs, tau_prox, diagnostics, constants)
        else:
            rows = batched_cg(
                primal_operator(gram, tau_prox), rhs, cg_iters, cg_tol, need_residual=diagnostics
            )
    elif form == "matrix_free":
        if exact:
            iterations, tol = exact_cg_budget(layout.row_dim, rhs.dtype)
        else:
            iterations, tol = cg_iters, cg_tol
        rows = batched_cg(
            matrix_free_operator(system, tau_prox), rhs, iterations, tol, need_residual=diagnostics
        )
    else:
        raise ValueError(f"unknown solve form {form!r}; expected one of {FORMS}")
    if out is not None:
        layout.write_rows(rows.direction, out[0], out[1] if layout.has_bias else None)
        weight, bias = out[0], out[1] if layout.has_bias else None
    else:
        weight, bias = layout.from_rows(rows.direction)
    residual_norm = rows.residual.norm() if diagnostics else None
    return Solution(weight, bias, rows.iterations, residual_norm)
