"""Row-wise helpers shared by every batched CG: each row of a tensor is its own system."""

from __future__ import annotations

import torch
from torch import Tensor


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a_j, b_j⟩ for every row j, shape (..., 1)."""
    return (a * b).sum(-1, keepdim=True)


def guarded_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator per row, 0 where the denominator is not positive (no 0/0)."""
    return torch.where(denominator > 0, numerator / denominator, torch.zeros_like(denominator))
