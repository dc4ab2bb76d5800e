"""The primal form's exact solve (proxoptim.primal) against torch.linalg.solve."""

from __future__ import annotations

import pytest
import torch
from oracle import relative_error
from spd_problems import random_problem

from proxoptim.primal import cholesky_solve_rows, shifted_gram


@pytest.mark.parametrize("rows", [5, 30])  # triangular solves; the explicit inverse (m ≥ 2d)
def test_cholesky_equals_linalg_solve(rows):
    gram, rhs = random_problem(rows=rows, seed=3)
    result = cholesky_solve_rows(gram, rhs, 0.05)
    matrix = shifted_gram(gram, 0.05)
    for group in range(gram.shape[0]):
        expected = torch.linalg.solve(matrix[group], rhs[group].T).T
        assert relative_error(result.direction[group], expected) <= 1e-12
    assert result.residual.norm() <= 1e-10 * rhs.norm()


def test_cholesky_redoes_an_inaccurate_float32_solve_in_float64():
    # Rank-one Gram with a huge eigenvalue: G + I/τ is SPD but so ill-conditioned that a
    # float32 Cholesky solve is off by percent.
    vector = torch.ones(1, 40, 1, dtype=torch.float32)
    gram = vector @ vector.transpose(1, 2) * 1e9
    gram[0, 0, 1] += 1.0
    gram[0, 1, 0] += 1.0
    rhs = torch.randn(1, 3, 40)
    result = cholesky_solve_rows(gram, rhs, 1e-3)
    assert torch.isfinite(result.direction).all()
    expected = torch.linalg.solve(shifted_gram(gram.double(), 1e-3)[0], rhs[0].double().T).T
    assert relative_error(result.direction[0].double(), expected) <= 1e-5


def test_cholesky_in_float64_reads_nothing_back_and_names_a_failure_as_nan(monkeypatch):
    """A float64 exact solve never syncs: a group whose M is not numerically positive
    definite (two equal columns of 5, τθ = 1e16: I/τθ vanishes beside 25·[[1,1],[1,1]])
    gets a NaN direction for the optimizer's non-finite check; other groups solve."""
    good = torch.eye(2, dtype=torch.float64)
    singular = torch.full((2, 2), 25.0, dtype=torch.float64)
    gram = torch.stack([good, singular])
    rhs = torch.ones(2, 3, 2, dtype=torch.float64)
    monkeypatch.setattr(
        torch.Tensor, "__bool__", lambda self: pytest.fail("read back from the device")
    )
    result = cholesky_solve_rows(gram, rhs, 1e16, diagnostics=False)
    monkeypatch.undo()
    assert torch.isnan(result.direction[1]).all()
    assert torch.allclose(result.direction[0], rhs[0] / (1 + 1e-16))
    assert result.residual is None
