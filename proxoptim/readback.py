"""Reading small device tensors back to the host in as few syncs as possible."""

from __future__ import annotations

import torch
from torch import Tensor


def read_back(values: list[Tensor | None]) -> list[list[float] | None]:
    """Each 1-d tensor of ``values`` as a list of floats (None stays None), with one host
    sync per device (not one per tensor: each sync stalls an accelerator's queue). The
    tensors on one device must share a shape."""
    by_device: dict[torch.device, list[int]] = {}
    for position, value in enumerate(values):
        if value is not None:
            by_device.setdefault(value.device, []).append(position)
    numbers: list[list[float] | None] = [None] * len(values)
    for positions in by_device.values():
        if len(positions) == 1:  # (a stack of one tensor is an operator for nothing)
            rows = [values[positions[0]].tolist()]
        else:
            rows = torch.stack([values[position] for position in positions]).tolist()
        for position, row in zip(positions, rows, strict=True):
            numbers[position] = row
    return numbers
