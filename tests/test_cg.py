"""Batched CG (proxoptim.cg) against textbook CG on explicit SPD matrices, row by row."""

from __future__ import annotations

import pytest
import torch
from oracle import relative_error, textbook_cg
from spd_problems import random_problem

from proxoptim.cg import batched_cg
from proxoptim.primal import cholesky_solve_rows, primal_operator, shifted_gram


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
    """The product, two row inner products (two operators each), two step ratios (two
    each) and three updates: 12 operators a full iteration, 7 for the last one, 2 to start."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    gram, rhs = random_problem()
    apply_m = primal_operator(gram, 0.5)
    counts = []
    for iterations in (1, 2, 5):
        Count.calls = 0
        with Count():
            batched_cg(apply_m, rhs, iterations)
        counts.append(Count.calls)
    assert counts == [2 + 7, 2 + 12 + 7, 2 + 4 * 12 + 7]
