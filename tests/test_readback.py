"""read_back: every tensor's numbers, in order, None kept."""

from __future__ import annotations

import torch

from proxoptim.readback import read_back


def test_numbers_come_back_in_order_with_none_kept():
    first = torch.tensor([1.0, 2.0], dtype=torch.float64)
    second = torch.tensor([3.0, 4.5], dtype=torch.float64)
    assert read_back([first, None, second]) == [[1.0, 2.0], None, [3.0, 4.5]]
    assert read_back([None]) == [None]
    assert read_back([]) == []
