"""Per-rank peak memory of a training step on a ``fully_shard`` (FSDP2) model: plain FSDP
training against ProxProp, on the same ranks, in one run.

    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py
    torchrun --standalone --nproc_per_node=2 benchmarks/fsdp_memory.py --width 2048

The model is an MLP 1024-W-W-W-10 in float32, every Linear and the root ``fully_shard``-ed
(gloo, CPU). For each method the script trains three steps from a fresh model and reports
the peak of this rank's memory over them (torch's ``MemTracker``: sharded parameters,
gradients, optimizer state and every tensor allocated during the steps, FSDP's all-gathered
weights included). Rank 0 prints, per method, that peak and its excess
over plain FSDP training with the same inner optimizer (Adam), beside what the design
allows ProxProp to add (proxoptim.distributed, "sharded" mode):

* its direction buffers: one per layer, the size of this rank's gradient shard;
* the gathered inputs and output gradients of the layer being solved (global batch × its
  fan-in and this rank's rows), and its Gram (fan-in²) or kernel (global batch²);

and, for contrast, one full weight of the widest layer: what a rank would hold if
anything all-gathered a weight or gradient beyond FSDP's own all-gather.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import fully_shard

from proxoptim import ProxPropOptimizer

MiB = 1 << 20


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(1024, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def peak_bytes(model: nn.Module, inner: torch.optim.Optimizer, step, steps: int) -> int:
    """The peak of this rank's tracked memory over ``steps`` training steps, the first
    included (optimizer state and ProxProp's buffers are made there): parameters, gradients,
    optimizer state and every tensor allocated while the steps run (torch's MemTracker)."""
    tracker = MemTracker()
    tracker.track_external(model, inner)
    with tracker:
        for _ in range(steps):
            step()
            tracker.reset_mod_stats()  # (per-module stats are per step; the peak stays)
    return int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def measure(method: str, width: int, batch: int, rank: int, world: int) -> int:
    model = make_model(width)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    if method == "backprop":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        solver, iterations = ("exact", 0) if method == "exact" else ("cg", int(method[2:]))
        opt = ProxPropOptimizer(
            model, torch.optim.Adam, lr=1e-3, tau_prox=1.0, solver=solver, cg_iters=iterations or 3
        )
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(batch, 1024, generator=generator)
    y = torch.randint(0, 10, (batch,), generator=generator)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return peak_bytes(model, opt if method == "backprop" else opt.inner, step, steps=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--methods", default="backprop,exact,cg3")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    peaks = {
        method: measure(method, args.width, args.batch_per_rank, rank, world) for method in methods
    }
    table = torch.tensor([peaks[m] for m in methods], dtype=torch.float64)
    gathered = [torch.zeros_like(table) for _ in range(world)]
    dist.all_gather(gathered, table)
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return

    from proxoptim.experiments.provenance import provenance_comment

    width, batch = args.width, args.batch_per_rank
    columns, rows = batch * world, -(-width // world)
    fan_ins = [1024, width, width]  # the three preconditioned layers (the output layer keeps g)
    # ProxProp's own memory, by the design: a direction buffer per layer (this rank's rows);
    # each layer's captured input and δ, held from forward to the step (this rank's batch;
    # the output layer's too, until the step knows it is the output layer); the widest
    # layer's solve: gathered inputs and δ columns, kernel or Gram, one shard-sized
    # temporary (the rows with their bias column).
    directions = 4 * rows * sum(fan_in + 1 for fan_in in fan_ins)
    captures = 4 * batch * (sum(fan_in + width for fan_in in fan_ins) + width + 10)
    widest = max(fan_ins) + 1
    solve = 4 * (columns * widest + columns * rows + min(columns, widest) ** 2 + rows * widest)
    budget = directions + captures + solve
    full_weight = 4 * width * width
    print(
        provenance_comment(
            f"torchrun --standalone --nproc_per_node={world} benchmarks/fsdp_memory.py "
            f"--width {width} --batch-per-rank {batch}"
        )
    )
    print(
        f"MLP 1024-{width}-{width}-{width}-10, float32, {world} ranks × batch {batch}, Adam; "
        "peak tracked memory per rank over three training steps [MiB]. ProxProp's budget "
        f"(proxoptim.distributed, 'sharded'): direction buffers {directions / MiB:.1f} "
        f"(this rank's gradient shards) + captured inputs and δ {captures / MiB:.1f} + the "
        f"widest layer's solve {solve / MiB:.1f} = {budget / MiB:.1f}. For contrast, one full "
        f"{width}×{width} weight is {full_weight / MiB:.1f}."
    )
    print()
    ranks = " | ".join(f"rank {r}" for r in range(world))
    print(f"| method | {ranks} | over plain FSDP, max | within ProxProp's budget |")
    print("|---" * (world + 3) + "|")
    base = (
        [float(g[methods.index("backprop")]) for g in gathered] if "backprop" in methods else None
    )
    for index, method in enumerate(methods):
        values = [float(g[index]) for g in gathered]
        excess = None if base is None else max(v - b for v, b in zip(values, base, strict=True))
        cell = "–" if excess is None else f"{excess / MiB:+.1f}"
        within = "–" if excess is None or method == "backprop" else str(excess <= budget)
        peaks_cells = " | ".join(f"{v / MiB:.1f}" for v in values)
        print(f"| {method} | {peaks_cells} | {cell} | {within} |")


if __name__ == "__main__":
    main()
