"""Workspace: slots are reused, grown on demand, and distinct from each other."""

import torch

from proxoptim.workspace import Workspace


def test_slots_are_reused_grown_and_distinct():
    workspace = Workspace()
    like = torch.zeros(1)
    first = workspace.take("a", (4, 5), like)
    again = workspace.take("a", (2, 3), like)
    assert again.data_ptr() == first.data_ptr() and again.shape == (2, 3)
    other = workspace.take("b", (4, 5), like)
    assert other.data_ptr() != first.data_ptr()
    grown = workspace.take("a", (10, 10), like)
    assert grown.shape == (10, 10) and grown.is_contiguous()
    assert workspace.take("a", (4, 5), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
