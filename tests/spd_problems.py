"""Random symmetric positive definite systems for the row-form solvers' tests."""

from __future__ import annotations

import torch


def random_problem(groups=2, rows=5, dim=7, columns=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(groups, dim, columns, generator=generator, dtype=dtype)
    gram = patches @ patches.transpose(1, 2)
    rhs = torch.randn(groups, rows, dim, generator=generator, dtype=dtype)
    return gram, rhs
