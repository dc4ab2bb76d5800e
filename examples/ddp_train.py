"""ProxProp under DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py            # CPU (gloo)
    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 20 --mode local

Every rank trains on its own shard of each batch; with ``--mode global`` (the default)
ProxProp gives every rank the direction one process would compute on the whole batch, so
the replicas stay identical. The script checks that at the end.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn

from proxoptim import ProxPropOptimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--mode", choices=("global", "local"), default="global")
    parser.add_argument("--batch-per-rank", type=int, default=64)
    args = parser.parse_args()

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
    )

    torch.manual_seed(0)  # same initial weights on every rank
    model = nn.Sequential(
        nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 4)
    ).to(device)
    model = nn.parallel.DistributedDataParallel(model)
    opt = ProxPropOptimizer(
        model, torch.optim.Adam, lr=1e-3, tau_prox=1.0, cg_iters=3, distributed=args.mode
    )

    generator = torch.Generator().manual_seed(1234)
    teacher = torch.randn(20, 4, generator=generator)
    for step in range(args.steps):
        x = torch.randn(world_size * args.batch_per_rank, 20, generator=generator)
        y = (x @ teacher).argmax(1)
        shard = slice(rank * args.batch_per_rank, (rank + 1) * args.batch_per_rank)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[shard].to(device)), y[shard].to(device))
        loss.backward()
        opt.step()
        if rank == 0 and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss (rank 0 shard) {loss.item():.4f}")

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    identical = all(torch.equal(gathered[0], other) for other in gathered[1:])
    if rank == 0:
        forms = {name: stats.form for name, stats in opt.last_stats.items()}
        print(
            f"{world_size} ranks, mode={args.mode}, forms {forms}, replicas identical: {identical}"
        )
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()
    if not identical:
        raise SystemExit("replicas diverged")


if __name__ == "__main__":
    main()
