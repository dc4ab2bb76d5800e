"""Scratch tensors reused across layers and steps.

Allocating a layer-sized tensor is not free: on the CPU every fresh large allocation is
mapped anew and page-faulted on first touch (often costing more than the arithmetic done
in it), on accelerators it churns the caching allocator. Solves ask a :class:`Workspace`
for named slots instead; each slot is one flat buffer, grown to the largest request and
viewed to the shape asked for. Layers are solved one after another, so slots are shared
by all layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class Workspace:
    """Named scratch buffers: ``take(slot, shape, like)`` returns an uninitialised tensor.

    Two takes of the same slot return overlapping memory: a caller uses distinct slots for
    tensors that are alive at the same time.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        key = (slot, like.dtype, like.device)
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buffer
        return buffer[:numel].view(shape)

    def clear(self) -> None:
        self._buffers.clear()
