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


def test_parts_and_splits_are_views_of_one_buffer_kept_across_calls():
    """One operator can update every part at once (the CG's fused update), and the same
    views come back on the next step: no slicing operator per step."""
    workspace = Workspace()
    like = torch.zeros(1)
    whole, (first, second) = workspace.take_parts("cg", 2, (3, 4), like)
    whole.copy_(torch.arange(24.0).reshape(2, 3, 4))
    assert torch.equal(first, whole[0]) and torch.equal(second, whole[1])
    again, parts = workspace.take_parts("cg", 2, (3, 4), like)
    assert again is whole and parts[0] is first and parts[1] is second
    stacked, blocks = workspace.take_split("rows", (2, 5), 3, like)
    assert stacked.shape == (7, 3) and [block.shape for block in blocks] == [(2, 3), (5, 3)]
    assert blocks[1].data_ptr() == stacked[2:].data_ptr()
    assert workspace.split(stacked, (2, 5)) is blocks
    tiny = workspace.tiny(like)
    assert tiny.dim() == 0 and float(tiny) == torch.finfo(torch.float32).tiny
    assert workspace.tiny(like) is tiny


def test_a_grown_buffer_is_not_kept_alive_by_the_kept_views():
    """Kept parts and splits of an outgrown buffer are dropped with it (else every growth
    would leave a dead buffer behind)."""
    import gc
    import weakref

    workspace = Workspace()
    like = torch.zeros(1)
    whole, parts = workspace.take_parts("cg", 2, (3, 4), like)
    blocks = workspace.split(parts[0], (1, 2))
    old = weakref.ref(whole)
    del whole, parts, blocks
    workspace.take_parts("cg", 2, (30, 40), like)  # grows the slot's buffer
    gc.collect()
    assert old() is None
