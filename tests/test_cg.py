"""Batched CG (proxoptim.cg) against textbook CG on explicit SPD matrices, row by row."""

from __future__ import annotations

import pytest
import torch
from oracle import relative_error, textbook_cg
from spd_problems import random_problem

from proxoptim.cg import batched_cg, row_dot_into
from proxoptim.primal import cholesky_solve_rows, primal_operator, shifted_gram
from proxoptim.workspace import Workspace


@pytest.mark.parametrize("iterations", [1, 2, 4, 7])
def test_batched_cg_equals_textbook_cg_row_by_row(iterations):
    tau_prox = 0.3
    gram, rhs = random_problem()
    result = batched_cg(primal_operator(gram, tau_prox), rhs, iterations)
    matrix = shifted_gram(gram, tau_prox)
    for group in range(rhs.shape[0]):
        for row in range(rhs.shape[1]):
            expected = textbook_cg(matrix[group], rhs[group, row], iterations)
            assert relative_error(result.direction[group, row], expected) <= 1e-10
    assert result.iterations == iterations
    true_residual = rhs - result.direction @ matrix
    assert (result.residual - true_residual).norm() <= 1e-10 * rhs.norm()


def test_zero_rows_stay_zero_without_nans():
    gram, rhs = random_problem()
    rhs[0, 2] = 0
    rhs[1] = 0
    result = batched_cg(primal_operator(gram, 1.0), rhs, 5)
    assert torch.isfinite(result.direction).all()
    assert torch.all(result.direction[0, 2] == 0) and torch.all(result.direction[1] == 0)


def test_converged_rows_stop_moving():
    # dim 3: CG converges in 3 iterations; more iterations must not produce 0/0.
    gram, rhs = random_problem(dim=3, columns=2)
    exact = cholesky_solve_rows(gram, rhs, 1.0).direction
    result = batched_cg(primal_operator(gram, 1.0), rhs, 10)
    assert torch.isfinite(result.direction).all()
    assert relative_error(result.direction, exact) <= 1e-10


def test_tolerance_stops_early_once_every_row_is_converged():
    gram, rhs = random_problem(dim=30, columns=90)
    result = batched_cg(primal_operator(gram, 1.0), rhs, 30, tol=1e-6)
    assert result.iterations < 30
    row_residual = result.residual.norm(dim=-1) / rhs.norm(dim=-1)
    assert row_residual.max() <= 1e-6
    loose = batched_cg(primal_operator(gram, 1.0), rhs, 30, tol=0.5)
    assert loose.iterations < result.iterations


@pytest.mark.parametrize("tol", [None, 1e-30])
@pytest.mark.parametrize("iterations", [1, 3])
def test_batched_cg_leaves_rhs_alone_and_skips_only_what_nobody_reads(iterations, tol):
    """CG starts from r₀ = p₀ = g read from ``rhs`` itself, so ``rhs`` must come back
    untouched; the last iteration skips ‖r‖², β and the direction update (a tolerance that
    is never met must not change that), and its residual is still the true g − vM."""
    tau_prox = 0.3
    gram, rhs = random_problem(seed=5)
    original = rhs.clone()
    result = batched_cg(primal_operator(gram, tau_prox), rhs, iterations, tol=tol)
    assert torch.equal(rhs, original)
    assert result.residual is not rhs and result.direction is not rhs
    assert result.iterations == iterations
    matrix = shifted_gram(gram, tau_prox)
    for group in range(rhs.shape[0]):
        for row in range(rhs.shape[1]):
            expected = textbook_cg(matrix[group], rhs[group, row], iterations)
            assert relative_error(result.direction[group, row], expected) <= 1e-10
    true_residual = rhs - result.direction @ matrix
    assert (result.residual - true_residual).norm() <= 1e-10 * rhs.norm()


def test_batched_cg_operators_per_iteration():
    """With its workspace's buffers made: 3 operators to start (p'₀ = −g and ‖g‖²), 10 for
    the first full iteration (x₁ and s₁ apart), 9 for every further one (the product, two
    inner products of two, α, the fused x/s update, β, the direction) and 5 for the last."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    gram, rhs = random_problem()
    apply_m = primal_operator(gram, 0.5)
    workspace = Workspace()
    batched_cg(apply_m, rhs, 2, need_residual=False, workspace=workspace)
    counts = []
    for iterations in (1, 2, 5):
        Count.calls = 0
        with Count():
            batched_cg(apply_m, rhs, iterations, need_residual=False, workspace=workspace)
        counts.append(Count.calls)
    assert counts == [3 + 5, 3 + 10 + 5, 3 + 10 + 3 * 9 + 5]


def test_row_dot_into_is_positive_on_a_zero_row_and_exact_elsewhere():
    """The guard that replaces CG's guarded ratios: a zero row's ‖r‖² is n·tiny > 0 (so α
    and β are 1 and its zero p and r stay zero), while any row that has not converged gets
    its inner product unchanged in float32 (n·tiny is far below one ulp)."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(3, 50, generator=generator)
    a[1] = 0
    workspace = Workspace()
    out = torch.empty(3, 1)
    row_dot_into(out, a, a, torch.empty_like(a), workspace.tiny(a))
    tiny = torch.finfo(torch.float32).tiny
    assert out[1, 0] == pytest.approx(50 * tiny, rel=1e-6)
    assert torch.equal(out[[0, 2]], (a[[0, 2]] * a[[0, 2]]).sum(-1, keepdim=True))


def test_a_nan_gradient_row_gives_a_nan_direction_for_the_non_finite_check():
    gram, rhs = random_problem()
    rhs[0, 1, 2] = float("nan")
    result = batched_cg(primal_operator(gram, 1.0), rhs, 3)
    assert torch.isnan(result.direction[0, 1]).all()
    assert torch.isfinite(result.direction[1]).all()


def test_the_workspace_direction_is_a_view_reused_by_the_next_solve():
    """With a workspace the direction lives in its buffers (no allocation per step), so the
    next CG overwrites it; without one, each call's direction is its own."""
    gram, rhs = random_problem()
    apply_m = primal_operator(gram, 1.0)
    workspace = Workspace()
    first = batched_cg(apply_m, rhs, 3, workspace=workspace).direction
    kept = first.clone()
    second = batched_cg(apply_m, 2 * rhs, 3, workspace=workspace).direction
    assert second.data_ptr() == first.data_ptr()
    assert torch.allclose(second, 2 * kept, rtol=1e-12, atol=0)
    own = batched_cg(apply_m, rhs, 3).direction
    assert own.data_ptr() != first.data_ptr() and torch.allclose(own, kept, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_row_whose_residual_is_exactly_zero_takes_no_further_step(dtype):
    """M = I/τθ (a Gram of zeros) is solved exactly by the first step, whose residual is
    then exactly 0 (α = ‖g‖²/(‖g‖²/τθ) with τθ = 1). Later iterations must not move x:
    the guard makes β = n·tiny/‖g‖², and the step along that vanishing direction is of the
    order of tiny, not a repeat of the first step (which a rescaled recurrence would take)."""
    generator = torch.Generator().manual_seed(11)
    rhs = torch.randn(2, 5, 8, generator=generator, dtype=dtype)
    gram = torch.zeros(2, 8, 8, dtype=dtype)
    first = batched_cg(primal_operator(gram, 1.0), rhs, 1)
    assert torch.equal(first.residual, torch.zeros_like(rhs))
    result = batched_cg(primal_operator(gram, 1.0), rhs, 6)
    assert torch.isfinite(result.direction).all()
    assert relative_error(result.direction, rhs) <= 4 * torch.finfo(dtype).eps
