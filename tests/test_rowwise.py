"""Row-wise inner products and guarded ratios shared by every batched CG."""

from __future__ import annotations

import torch

from proxoptim.rowwise import guarded_ratio, row_dot


def test_row_dot_is_accurate_in_float32():
    """CG amplifies rounding in its inner products: a float32 row_dot of long rows must stay
    within a few ulps of the float64 value (a batched-GEMV einsum was off by 3e-6)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 500, 3073, generator=generator)
    b = torch.rand(2, 500, 3073, generator=generator)
    result = row_dot(a, b)
    assert result.shape == (2, 500, 1)
    expected = (a.double() * b.double()).sum(-1, keepdim=True)
    assert ((result.double() - expected).abs() / expected).max() <= 1e-6


def test_guarded_ratio_is_zero_where_the_denominator_is_not_positive():
    numerator = torch.tensor([1.0, 2.0, 0.0, 3.0])
    denominator = torch.tensor([2.0, 0.0, 0.0, -1.0])
    assert torch.equal(guarded_ratio(numerator, denominator), torch.tensor([0.5, 0.0, 0.0, 0.0]))


def test_guarded_ratio_keeps_a_nan_denominator_for_the_non_finite_check():
    """Three operators (divide, compare, fill): a zero or negative denominator gives 0, a NaN
    one gives NaN (no comparison with NaN holds), so a corrupted row is not silently
    stopped."""
    result = guarded_ratio(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([float("nan"), 0.0, -0.0]))
    assert torch.isnan(result[0]) and torch.equal(result[1:], torch.zeros(2))
