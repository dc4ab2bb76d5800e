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
* ``"sharded"``: the model is ``fully_shard``-ed (FSDP2), chosen by itself. Every parameter
  is a DTensor sharded on dim 0, its output rows, and M is block diagonal over rows, so
  each rank solves exactly the rows it owns against the global M (the rows of its local
  ``.grad`` shard, which FSDP's reduce-scatter already averaged over ranks). Linear layers
  all-gather their inputs and output gradients (δ then keeps this rank's columns) and
  solve locally in any form; convolutions all-reduce the primal Gram and solve in the
  primal form (a matrix-free product would need every rank's rows). No rank ever holds a
  full weight or gradient beyond FSDP's own all-gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # (absent where torch is built without distributed support)
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = Shard = None

MODES = ("global", "local")
SHARDED = "sharded"


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


@dataclass(frozen=True)
class ShardedRows:
    """Where a ``fully_shard``-ed parameter's rows live: this rank holds rows
    ``start:stop`` of ``total`` (DTensor's ``Shard(0)``, chunks of ⌈total / world⌉)."""

    start: int
    stop: int
    total: int

    def columns_of(self, output_grads: Tensor, channel_axis: int) -> Tensor:
        """δ's entries for this rank's rows (output units or channels on ``channel_axis``)."""
        return output_grads.narrow(channel_axis, self.start, self.stop - self.start)


def is_sharded(param: Tensor | None) -> bool:
    return param is not None and DTensor is not None and isinstance(param, DTensor)


def local_part(tensor: Tensor) -> Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def sharded_rows(param: Tensor) -> ShardedRows:
    """This rank's rows of a parameter ``fully_shard`` sharded on dim 0 of a 1-D mesh."""
    mesh = param.device_mesh
    total, world, rank = param.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-total // world)
    start = min(rank * chunk, total)
    stop = min(start + chunk, total)
    if param.to_local().shape[0] != stop - start:  # (a sharding other than torch.chunk's)
        raise ValueError(
            f"ProxProp: a parameter of shape {tuple(param.shape)} holds "
            f"{param.to_local().shape[0]} rows on rank {rank}, not the {stop - start} of "
            "fully_shard's even chunks; shard parameters with the default shard placement"
        )
    return ShardedRows(start, stop, total)


def sharded_process_group(params: list[Tensor]) -> dist.ProcessGroup:
    """The process group of ``fully_shard``-ed parameters, after checking what "sharded"
    mode supports: every parameter a DTensor on one 1-D mesh, sharded on dim 0.

    Raises:
        ValueError: a 2-D mesh (HSDP), another placement, or parameters on several meshes.
    """
    meshes = {param.device_mesh for param in params}
    if len(meshes) != 1:
        raise ValueError(
            "ProxProp: the preconditioned parameters live on several device meshes; "
            "fully_shard every layer with one mesh"
        )
    mesh = meshes.pop()
    if mesh.ndim != 1:
        raise ValueError(
            f"ProxProp: the model is sharded on a {mesh.ndim}-D device mesh (HSDP: "
            "replicate × shard); ProxProp supports fully_shard on a 1-D mesh only. Pass a "
            "1-D mesh to fully_shard, or use DistributedDataParallel"
        )
    for param in params:
        if tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"ProxProp: a parameter of shape {tuple(param.shape)} is placed "
                f"{tuple(param.placements)}; ProxProp needs fully_shard's Shard(0) (rows "
                "sharded over ranks)"
            )
    return mesh.get_group()


def as_sharded_grad(param: Tensor, local: Tensor) -> Tensor:
    """A direction for this rank's rows as a gradient of the DTensor ``param``."""
    return DTensor.from_local(
        local,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )


def agreed_problem(problem: str | None, communicator: Communicator) -> str | None:
    """``problem`` (a rank's own finding, or None), or, where only other ranks found one,
    a message saying so: every rank then raises or skips alike (one all-reduce)."""
    device = torch.device("cuda") if dist.get_backend(communicator.group) == "nccl" else None
    flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
    if communicator.all_reduce_(flag).item() == 0:
        return None
    return (
        problem or "a non-finite value on another rank of the fully_shard mesh (its error names it)"
    )


def layer_row_shards(layers: list[Any]) -> dict[int, ShardedRows]:
    """This rank's rows of every preconditioned layer, by layer index: found once, at
    construction (fully_shard's shards do not move). fully_shard splits dim 0 of every
    weight; each rank then owns whole rows only where dim 0 indexes output units and the
    layer has one group.

    Raises:
        ValueError: a preconditioned layer whose rows dim 0 does not split (named), or a
            sharding other than fully_shard's even chunks.
    """
    shards = {}
    for index, layer in enumerate(layers):
        if layer.excluded:
            continue
        groups = layer.kind.groups(layer.modules[0])
        if layer.kind.rows_axis != 0 or groups != 1:
            raise ValueError(
                f"ProxProp: layer {layer.name!r} ({type(layer.modules[0]).__name__}, groups "
                f"{groups}) does not keep its rows on weight dim 0, which fully_shard "
                "splits; pass exclude=[...] with its name to leave it to the inner optimizer"
            )
        shards[index] = sharded_rows(layer.weight)
    return shards


def refuse_fsdp1(model: Any) -> None:
    """FSDP1's wrapper flattens parameters, so no layer's rows can be found.

    Raises:
        ValueError: ``model`` is or holds a ``FullyShardedDataParallel`` wrapper.
    """
    if not dist.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise ValueError(
            "ProxProp: the model is wrapped in FullyShardedDataParallel (FSDP1), whose flat "
            "parameters hide each layer's rows; shard it with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead, which ProxProp supports"
        )


def placement(
    requested: str | None, process_group: Any, params: list[Tensor]
) -> tuple[str | None, Any]:
    """The distributed mode and process group for the preconditioned ``params``: "sharded"
    (with the mesh's group) where they are ``fully_shard``-ed DTensors, else
    :func:`default_mode` of ``requested`` with ``process_group``.

    Raises:
        ValueError: an unknown mode; a mode other than "sharded" for a sharded model; a
            model only partly sharded; a mesh "sharded" does not support.
    """
    sharded = [param for param in params if is_sharded(param)]
    if not sharded:
        if requested == SHARDED:
            raise ValueError(
                "distributed='sharded' is for models sharded with fully_shard (FSDP2); this "
                "model's layers are not DTensors. Pass distributed=None, 'global' or 'local'"
            )
        return default_mode(requested), process_group
    if len(sharded) != len(params):
        raise ValueError(
            "ProxProp: some preconditioned layers are fully_shard-ed and some are not; "
            "shard the whole model (fully_shard each layer block and the root)"
        )
    if requested not in (None, SHARDED):
        raise ValueError(
            f"distributed={requested!r} does not apply to a fully_shard-ed (FSDP2) model: "
            "each rank solves the rows it owns (distributed='sharded', chosen by itself); "
            "pass distributed=None"
        )
    return SHARDED, sharded_process_group(sharded)


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
