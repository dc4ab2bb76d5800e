"""ProxProp on a model sharded with FSDP2 (``fully_shard``).

    torchrun --standalone --nproc_per_node=2 examples/fsdp_train.py           # CPU (gloo)
    torchrun --standalone --nproc_per_node=4 examples/fsdp_train.py --steps 50

The model is used unchanged: ``fully_shard`` each layer and the root, then build the
optimizer. Every parameter is then a DTensor sharded on its output rows, and ProxProp lets
each rank solve exactly the rows it owns against the M of the whole global batch; no rank
ever holds a full weight or gradient beyond FSDP's own all-gathers.

To show that nothing is lost, the script records the direction handed to the inner
optimizer at every step, then (rank 0, after the process group is gone) trains an
unsharded copy in one process on the concatenation of all ranks' batches and checks the
directions against it (float64, so they agree to rounding).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from proxoptim import ProxPropOptimizer


def make_model() -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank and in the reference
    return nn.Sequential(
        nn.Linear(20, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 4)
    ).double()


def record_directions(opt: ProxPropOptimizer, into: list) -> None:
    """Keeps, at every inner step, the directions it is handed, whole (gathered if sharded)."""

    def record(inner, args, kwargs):
        into.append(
            [
                (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                for group in inner.param_groups
                for p in group["params"]
            ]
        )

    opt.inner.register_step_pre_hook(record)


def batches(steps: int, size: int):
    generator = torch.Generator().manual_seed(1234)
    teacher = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    for _ in range(steps):
        x = torch.randn(size, 20, generator=generator, dtype=torch.float64)
        yield x, (x @ teacher).argmax(1)


def train(model, opt, steps, world_size, batch_per_rank, rank=None):
    for step, (x, y) in enumerate(batches(steps, world_size * batch_per_rank)):
        if rank is not None:  # this rank's shard of the global batch
            rows = slice(rank * batch_per_rank, (rank + 1) * batch_per_rank)
            x, y = x[rows], y[rows]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss (rank 0 shard) {loss.item():.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-per-rank", type=int, default=32)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = ProxPropOptimizer(model, torch.optim.Adam, lr=1e-3, tau_prox=1.0, solver="exact")
    sharded: list = []
    record_directions(opt, sharded)
    train(model, opt, args.steps, world_size, args.batch_per_rank, rank)
    forms = {name: stats.form for name, stats in opt.last_stats.items()}
    local_rows = {name: p.to_local().shape[0] for name, p in model.named_parameters()}
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
    if rank != 0:
        return

    print(f"{world_size} ranks, forms {forms}, rank 0's rows {local_rows}")
    reference = make_model()  # one process, no process group: the single-process step
    reference_opt = ProxPropOptimizer(
        reference, torch.optim.Adam, lr=1e-3, tau_prox=1.0, solver="exact"
    )
    single: list = []
    record_directions(reference_opt, single)
    train(reference, reference_opt, args.steps, world_size, args.batch_per_rank)
    worst = max(
        float((a - b).norm() / b.norm())
        for step_a, step_b in zip(sharded, single, strict=True)
        for a, b in zip(step_a, step_b, strict=True)
    )
    match = worst <= 1e-9
    print(f"largest relative difference over {args.steps} steps: {worst:.1e}")
    print(f"directions match single process: {match}")
    if not match:
        raise SystemExit("directions differ from the single-process ones")


if __name__ == "__main__":
    main()
