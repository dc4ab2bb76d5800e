"""One rank of the multi-process tests in test_distributed.py (run as a script).

Usage: python distributed_worker.py OUT_DIR MODE STEPS SOLVER [bare], with RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT set ("bare": ProxProp on the module inside DDP).
Trains a small Conv + Linear model wrapped in DDP (gloo, float64) with ProxProp and saves
the first step's directions and the final parameters.

MODE "backward" (tests/test_backward_solve.py) instead runs the ``solve_in_backward=True``
checks of :func:`backward_solve_checks` (STEPS: the steps of its "local" run; SOLVER unused).
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from oracle import Recorder
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
        self.seen.append(
            [self.keep(p.grad) for group in self.param_groups for p in group["params"]]
        )
        return super().step(closure)

    @staticmethod
    def keep(grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()


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


def local_batch(step: int, rank: int, world_size: int):
    x, y = global_batch(step, world_size)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[rows], y[rows]


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# Micro-batches per step of the gradient-accumulation run: single-call steps tap the layers
# (the dual form asked for), the first two-call step is the transition, the second runs
# untapped; the first single-call step after them runs untapped too (its predecessor had
# two calls), the next is tapped again.
ACCUMULATION = (1, 1, 2, 2, 1, 1)


def backward_solve_checks(out_dir: str, steps: int) -> None:
    """``solve_in_backward=True`` under DDP ("local" mode), saved for the test to check.

    * refusals: ``distributed="global"`` and the default (global inside a group), and how
      many hooks the refused constructions left on the model;
    * a "local" run with ``RecordingSGD``: per step, the parameters before it, every
      ``.grad`` after backward (DDP-averaged) and the stats; the final parameters;
    * gradient accumulation (micro-batches per step: ACCUMULATION, all but the last under
      ``no_sync``) with solve_in_backward True and False side by side on one model's
      replicas (inner ``Recorder``: the parameters never move), per step the directions
      handed to the inner optimizer and the stats;
    * a tapped layer called again after its direction was all-reduced (no ``no_sync``):
      the error message.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result: dict = {"refusals": {}}
    model = nn.parallel.DistributedDataParallel(make_model())
    for label, kwargs in (("global", {"distributed": "global"}), ("default", {})):
        try:
            ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, solve_in_backward=True, **kwargs)
        except ValueError as error:
            result["refusals"][label] = str(error)
    result["hooks_after_refusals"] = hook_count(model)

    opt = ProxPropOptimizer(
        model,
        RecordingSGD,
        lr=0.5,
        momentum=0.9,
        tau_prox=0.5,
        solver="exact",
        distributed="local",
        solve_in_backward=True,
    )
    records = []
    for step in range(steps):
        x, y = local_batch(step, rank, world_size)
        before = [p.detach().clone() for p in model.module.parameters()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.module.parameters()]
        opt.step()
        stats = {n: (s.solved_in_backward, s.backward_fallback) for n, s in opt.last_stats.items()}
        records.append({"parameters": before, "grads": grads, "stats": stats})
    result["local"] = records
    result["local_final"] = [p.detach().clone() for p in model.module.parameters()]

    replicas = {}
    for in_backward in (True, False):
        replica = nn.parallel.DistributedDataParallel(make_model())
        replica_opt = ProxPropOptimizer(
            replica,
            Recorder,
            tau_prox=0.5,
            solver="cg",
            cg_iters=3,
            solver_form="dual",
            distributed="local",
            solve_in_backward=in_backward,
        )
        replicas[in_backward] = (replica, replica_opt)
    accumulation = {True: [], False: []}
    for step, micro_batches in enumerate(ACCUMULATION):
        x, y = local_batch(step, rank, world_size)
        parts = [slice(0, PER_RANK)] if micro_batches == 1 else [slice(0, 2), slice(2, PER_RANK)]
        for in_backward, (replica, replica_opt) in replicas.items():
            replica_opt.zero_grad()
            for number, rows in enumerate(parts):
                last = number == len(parts) - 1
                with nullcontext() if last else replica.no_sync():
                    loss = nn.functional.cross_entropy(replica(x[rows]), y[rows], reduction="sum")
                    loss.backward()
            grads = [p.grad.clone() for p in replica.module.parameters()]
            replica_opt.step()
            seen = replica_opt.inner.seen[-1]
            accumulation[in_backward].append(
                {
                    "grads": grads,
                    "directions": [seen[p].clone() for p in replica.module.parameters()],
                    "stats": {
                        n: (s.solved_in_backward, s.backward_fallback)
                        for n, s in replica_opt.last_stats.items()
                    },
                }
            )
    result["accumulation"] = accumulation

    # Per-rank shapes (dynamic padding): on the last step rank 1's sequences have 64
    # positions (128 columns against fan-in 20: a plan that is not dual), rank 0's 2. The
    # layer stays tapped and solved in the dual form on both ranks: DDP must average
    # directions with directions.
    torch.manual_seed(0)
    ragged = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    )
    ragged_opt = ProxPropOptimizer(
        ragged,
        torch.optim.SGD,
        lr=0.1,
        solver="exact",
        distributed="local",
        solve_in_backward=True,
    )
    generator = torch.Generator().manual_seed(rank)
    ragged_stats = []
    for step in range(3):
        length = 64 if step == 2 and rank == 1 else 2
        x = torch.rand(2, length, 20, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (2, length), generator=generator)
        ragged_opt.zero_grad()
        nn.functional.cross_entropy(ragged(x).reshape(-1, 3), y.reshape(-1)).backward()
        ragged_opt.step()
        ragged_stats.append(
            {
                n: (s.solved_in_backward, s.backward_fallback)
                for n, s in ragged_opt.last_stats.items()
            }
        )
    result["ragged"] = {
        "stats": ragged_stats,
        "parameters": [p.detach().clone() for p in ragged.module.parameters()],
    }

    # The tapped replica (its last step had one call), two micro-batches, both synced.
    replica, replica_opt = replicas[True]
    replica_opt.zero_grad()
    x, y = local_batch(len(ACCUMULATION), rank, world_size)
    try:
        for rows in (slice(0, 2), slice(2, PER_RANK)):
            nn.functional.cross_entropy(replica(x[rows]), y[rows]).backward()
    except RuntimeError as error:
        result["synced_twice"] = str(error)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def main() -> None:
    out_dir, mode, steps, solver = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    bare = len(sys.argv) > 5 and sys.argv[5] == "bare"
    dist.init_process_group("gloo")
    if mode == "backward":
        backward_solve_checks(out_dir, steps)
        dist.barrier()
        dist.destroy_process_group()
        return
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
