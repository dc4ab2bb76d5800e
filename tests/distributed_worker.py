"""One rank of the multi-process tests in test_distributed.py (run as a script).

Usage: python distributed_worker.py OUT_DIR MODE STEPS SOLVER [bare], with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set ("bare": ProxProp on the module inside DDP).
Trains a small Conv + Linear model wrapped in DDP (gloo, float64) with ProxProp and saves
the first step's directions and the final parameters.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from proxoptim import ProxPropOptimizer

PER_RANK = 3


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of every gradient it is handed."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 8),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    ).double()


def global_batch(step: int, world_size: int):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.rand(PER_RANK * world_size, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (PER_RANK * world_size,), generator=generator)
    return x, y


def train(model, opt, steps, world_size, rank=None):
    for step in range(steps):
        x, y = global_batch(step, world_size)
        if rank is not None:
            x, y = (
                x[rank * PER_RANK : (rank + 1) * PER_RANK],
                y[rank * PER_RANK : (rank + 1) * PER_RANK],
            )
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def optimizer_for(model, **kwargs):
    return ProxPropOptimizer(
        model, RecordingSGD, lr=0.5, momentum=0.9, tau_prox=0.5, solver_form="auto", **kwargs
    )


def main() -> None:
    out_dir, mode, steps, solver = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    bare = len(sys.argv) > 5 and sys.argv[5] == "bare"
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = nn.parallel.DistributedDataParallel(make_model())
    # ProxProp on the DDP wrapper, or on the bare module inside it: the same layers.
    opt = optimizer_for(model.module if bare else model, distributed=mode, solver=solver)
    assert opt.distributed == mode
    train(model, opt, steps, world_size, rank)
    torch.save(
        {
            "directions": opt.inner.seen[0],
            "parameters": [p.detach().clone() for p in model.module.parameters()],
            "forms": {name: s.form for name, s in opt.last_stats.items()},
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
