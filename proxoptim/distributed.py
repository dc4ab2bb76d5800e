"""What M needs across ranks (DESIGN.md §5).

Under DistributedDataParallel every rank's ``.grad`` is the average over ranks, so the
preconditioner must describe the global batch: M = I/τθ + Σ_ranks A_r* A_r.

* ``"global"``: every rank computes the direction a single process would compute on the
  concatenation of all ranks' batches. Linear layers all-gather their inputs and output
  gradients (the dual form then works on the global kernel; the probe sees .grad = δᵀŨᵀ/R);
  convolutions all-reduce the primal Gram once, or every matrix-free CG product. All ranks
  then run identical arithmetic on identical tensors, so replicas stay bit-identical.
  Linear layers, whose solve needs no further communication once gathered, are spread
  over the ranks round-robin and their directions broadcast from the rank that solved.
* ``"local"``: each rank solves with its own M and the directions are averaged with one
  all-reduce: still a descent direction, cheaper on wide layers, a different
  preconditioner from the single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

MODES = ("global", "local")


@dataclass(frozen=True)
class Communicator:
    """Collectives over one process group (SUM reductions, rank-ordered gathers)."""

    group: dist.ProcessGroup | None = None

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def broadcast_(self, tensor: Tensor, source: int) -> Tensor:
        """``tensor`` of the rank ``source`` (its rank within the group), in place."""
        dist.broadcast(
            tensor,
            dist.get_global_rank(self.group, source) if self.group else source,
            group=self.group,
        )
        return tensor

    def all_reduce_(self, tensor: Tensor) -> Tensor:
        """Σ over ranks, in place; every rank receives the same bytes."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def average_(self, tensor: Tensor) -> Tensor:
        return self.all_reduce_(tensor).div_(self.world_size)

    def gather_rows(self, tensor: Tensor) -> Tensor:
        """The ranks' ``tensor`` (n_r, ...) stacked in rank order (n_r may differ)."""
        rows = torch.tensor([tensor.shape[0]], device=tensor.device)
        all_rows = [torch.zeros_like(rows) for _ in range(self.world_size)]
        dist.all_gather(all_rows, rows, group=self.group)
        sizes = [int(r) for r in all_rows]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def default_mode(requested: str | None) -> str | None:
    """The mode to run: ``requested``, else "global" inside an initialised process group of
    more than one rank, else None (single process)."""
    if requested is not None:
        if requested not in MODES:
            raise ValueError(f"unknown distributed mode {requested!r}; pass one of {MODES}")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                f"distributed={requested!r} needs an initialised process group: call "
                "torch.distributed.init_process_group first (or leave distributed=None)"
            )
        return requested
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "global"
    return None


def gathered_linear_calls(
    calls: list[tuple[Any, Any, Tensor, Tensor | None]],
    dtype: torch.dtype,
    communicator: Communicator,
) -> list[tuple[Any, Any, Tensor, Tensor | None]]:
    """One call holding every rank's Linear-layer inputs and output gradients, stacked in
    rank order: ``(module, kind, input, output_grad)`` tuples in, one tuple out."""
    module, kind = calls[0][0], calls[0][1]
    inputs = torch.cat([x.reshape(-1, x.shape[-1]).to(dtype) for _, _, x, _ in calls])
    grads = [g for _, _, _, g in calls]
    output_grads = None
    if all(g is not None for g in grads):
        output_grads = torch.cat([g.reshape(-1, g.shape[-1]).to(dtype) for g in grads])
        output_grads = communicator.gather_rows(output_grads)
    return [(module, kind, communicator.gather_rows(inputs), output_grads)]


def average_over_ranks(tensors: list[Tensor], communicator: Communicator) -> None:
    """Averages every tensor over ranks with one all-reduce of their concatenation."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    communicator.average_(flat)
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def solving_ranks(
    communicates: list[bool], mode: str | None, communicator: Communicator | None
) -> list[int | None]:
    """Which rank solves each layer to precondition, in layer order (the same answer on
    every rank): under ``"global"``, layers that need no communication once their inputs
    are gathered (Linear layers: ``communicates`` False) go round-robin over the ranks, and
    their directions are broadcast from there; every other layer is solved by every rank
    alike (None), convolutions all-reducing their Gram or products."""
    if mode != "global":
        return [None] * len(communicates)
    owners: list[int | None] = []
    owned = 0
    for needs_communication in communicates:
        if needs_communication:
            owners.append(None)
        else:
            owners.append(owned % communicator.world_size)
            owned += 1
    return owners
