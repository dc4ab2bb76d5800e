"""One rank of the FSDP2 (``fully_shard``) tests in test_fsdp.py (run as a script).

Usage: python fsdp_worker.py OUT_DIR, with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set. Runs every case of :data:`CASES` on a ``fully_shard``-ed copy of :func:`make_model`
(gloo, float64) and saves, per case, the full directions handed to the inner optimizer at
every step and the final parameters (gathered with ``full_tensor``), for the test to set
beside one process on the concatenation of all ranks' batches. Also saves the gradient
accumulation and mixed-precision runs and the refusals (HSDP, solve_in_backward, a
mode other than "sharded").
"""

from __future__ import annotations

import os
import sys

import distributed_worker
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from proxoptim import ProxPropOptimizer

PER_RANK = 4
STEPS = 3
# (solver, solver_form) pairs: every form each layer kind allows under fully_shard (a
# convolution asked for another runs its primal form).
CASES = (
    ("exact", "auto"),
    ("exact", "primal"),
    ("exact", "dual"),
    ("cg", "auto"),
    ("cg", "primal"),
    ("cg", "dual"),
    ("cg", "matrix_free"),
)


class RecordingSGD(distributed_worker.RecordingSGD):
    """SGD that keeps every gradient it is handed, gathered whole (DTensor or not)."""

    @staticmethod
    def keep(grad: torch.Tensor) -> torch.Tensor:
        return _whole(grad)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    """Row counts 2, 2, 7, 2 (and the output layer's 3) split unevenly over 2 and 3 ranks
    (of 3 ranks, the last holds no row of either convolution or of the fourth layer); a
    convolution and a Linear layer without a bias."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(2, 2, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 7),
        nn.Tanh(),
        nn.Linear(7, 2, bias=False),
        nn.Tanh(),
        nn.Linear(2, 3),
    ).to(dtype)


def shard(model: nn.Module, **kwargs) -> nn.Module:
    for module in model:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def global_batch(step: int, world_size: int, dtype: torch.dtype = torch.float64):
    generator = torch.Generator().manual_seed(100 + step)
    x = torch.rand(PER_RANK * world_size, 2, 4, 4, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (PER_RANK * world_size,), generator=generator)
    return x, y


def optimizer_for(model: nn.Module, solver: str, form: str, **kwargs) -> ProxPropOptimizer:
    return ProxPropOptimizer(
        model,
        RecordingSGD,
        lr=0.5,
        momentum=0.9,
        tau_prox=0.5,
        solver=solver,
        cg_iters=3,
        solver_form=form,
        **kwargs,
    )


def adaptive_optimizer_for(model: nn.Module, inner: type) -> ProxPropOptimizer:
    """ProxProp (cg3) with an inner optimizer that keeps per-parameter state (Adam, AdamW)."""
    return ProxPropOptimizer(model, inner, lr=1e-2, tau_prox=0.5, solver="cg", cg_iters=3)


def train(model, opt, world_size, rank=None, micro_batches=1, dtype=torch.float64):
    """STEPS steps; with ``rank`` this rank's slice of each global batch; with several
    micro-batches, all but the last without gradient sync (FSDP) and losses summed."""
    for step in range(STEPS):
        x, y = global_batch(step, world_size, dtype)
        if rank is not None:
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            x, y = x[rows], y[rows]
        opt.zero_grad()
        parts = torch.arange(len(x)).chunk(micro_batches) if rank is not None else None
        if rank is None:  # one process: micro-batch b holds every rank's b-th part
            per_rank = torch.arange(PER_RANK).chunk(micro_batches)
            parts = [
                torch.cat([part + r * PER_RANK for r in range(world_size)]) for part in per_rank
            ]
        for number, part in enumerate(parts):
            if rank is not None and micro_batches > 1:
                model.set_requires_gradient_sync(number == len(parts) - 1)
            nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()


def refusals() -> dict[str, str]:
    found = {}
    mesh2d = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("r", "s"))
    attempts = {
        "hsdp": lambda: optimizer_for(shard(make_model(), mesh=mesh2d), "exact", "auto"),
        "in_backward": lambda: optimizer_for(
            shard(make_model()), "exact", "auto", solve_in_backward=True
        ),
        "global": lambda: optimizer_for(shard(make_model()), "exact", "auto", distributed="global"),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except ValueError as error:
            found[name] = str(error)
    return found


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = {"cases": {}}
    for solver, form in CASES:
        model = shard(make_model())
        opt = optimizer_for(model, solver, form)
        train(model, opt, world_size, rank)
        result["cases"][(solver, form)] = {
            "seen": opt.inner.seen,
            "final": [_whole(p) for p in model.parameters()],
            "forms": {name: stats.form for name, stats in opt.last_stats.items()},
        }
    for inner in (torch.optim.Adam, torch.optim.AdamW):
        model = shard(make_model())
        opt = adaptive_optimizer_for(model, inner)
        train(model, opt, world_size, rank)
        result[inner.__name__] = [_whole(p) for p in model.parameters()]

    model = shard(make_model())
    opt = optimizer_for(model, "exact", "auto")
    train(model, opt, world_size, rank, micro_batches=2)
    result["accumulation"] = {"seen": opt.inner.seen}

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model = shard(make_model(torch.float32), mp_policy=policy)
    opt = optimizer_for(model, "exact", "auto")
    train(model, opt, world_size, rank, dtype=torch.float32)
    result["mixed_precision"] = {"seen": opt.inner.seen}
    result["refusals"] = refusals()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
