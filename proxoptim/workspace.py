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
        # The views handed out, per buffer and shape: a view made again every step would
        # dispatch two operators (a slice and a view) for nothing.
        self._views: dict[tuple[str, torch.dtype, torch.device], dict[tuple[int, ...], Tensor]] = {}
        # Parts of a slot (its views' unbind), and small constants, kept for the same reason.
        self._parts: dict[tuple[str, torch.dtype, torch.device, tuple[int, ...]], tuple] = {}
        self._tiny: dict[tuple[torch.dtype, torch.device], Tensor] = {}
        self._splits: dict[tuple[int, tuple[int, ...]], tuple[Tensor, tuple[Tensor, ...]]] = {}

    def take(self, slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        key = (slot, like.dtype, like.device)
        views = self._views.get(key)
        if views is not None:
            view = views.get(shape)
            if view is not None:
                return view
        numel = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            if buffer is not None:
                self._forget_views_of(key, buffer)
            buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
            self._buffers[key] = buffer
            views = self._views[key] = {}  # views of the old buffer are of no more use
        view = buffer[:numel].view(shape)
        self._views.setdefault(key, {})[shape] = view
        return view

    def _forget_views_of(self, key: tuple[str, torch.dtype, torch.device], old: Tensor) -> None:
        """Drops the kept parts and splits of an outgrown buffer, so that they do not keep
        it alive (they are remade on their next use); every other slot's stay."""
        self._parts = {k: v for k, v in self._parts.items() if k[:3] != key}
        storage = old.untyped_storage().data_ptr()
        self._splits = {
            k: v for k, v in self._splits.items() if v[0].untyped_storage().data_ptr() != storage
        }

    def take_parts(
        self, slot: str, parts: int, shape: tuple[int, ...], like: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``take(slot, (parts, *shape), like)`` and its ``parts`` sub-tensors of ``shape``:
        one buffer, so a single operator can update every part at once."""
        whole = self.take(slot, (parts, *shape), like)
        key = (slot, like.dtype, like.device, whole.shape)
        kept = self._parts.get(key)
        if kept is None or kept[0] is not whole:
            kept = self._parts[key] = (whole, whole.unbind(0))
        return whole, kept[1]

    def take_split(
        self, slot: str, sizes: tuple[int, ...], columns: int, like: Tensor
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """``take(slot, (sum(sizes), columns), like)`` and its blocks of ``sizes`` rows."""
        whole = self.take(slot, (sum(sizes), columns), like)
        return whole, self.split(whole, sizes)

    def split(self, tensor: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        """``tensor.split(sizes)`` for a tensor this workspace handed out, kept: the same
        blocks are asked for every step."""
        key = (id(tensor), sizes)
        kept = self._splits.get(key)
        if kept is None or kept[0] is not tensor:
            kept = self._splits[key] = (tensor, tensor.split(sizes))
        return kept[1]

    def tiny(self, like: Tensor) -> Tensor:
        """The smallest normal number of ``like``'s dtype as a 0-dim tensor on its device."""
        key = (like.dtype, like.device)
        value = self._tiny.get(key)
        if value is None:
            value = self._tiny[key] = torch.full(
                (), torch.finfo(like.dtype).tiny, dtype=like.dtype, device=like.device
            )
        return value

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()
        self._parts.clear()
        self._tiny.clear()
        self._splits.clear()
