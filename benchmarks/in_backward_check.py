"""``solve_in_backward=True`` against the default path on a real network: the same update.

    python benchmarks/in_backward_check.py                                 # ResNet-18, float64
    python benchmarks/in_backward_check.py --solver cg --batch-size 32
    python benchmarks/in_backward_check.py --dtype float32 --batch-size 128 --solver cg

Two copies of one torchvision ResNet-18 (CIFAR-10 size inputs, 10 classes) take the same
``--steps`` SGD steps on the same batch, one with ``solve_in_backward=True``. It prints
which layers were solved in backward in the last step (form and columns) and the largest
relative difference, over the parameters, of their total updates: in float64 it is
rounding (the forms differ, the math does not); in float32 the forms' roundings differ.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.provenance import provenance_comment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--solver", choices=("exact", "cg"), default="exact")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tau-prox", type=float, default=1.0)
    args = parser.parse_args()
    import torchvision

    print(provenance_comment())
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    base = torchvision.models.resnet18(num_classes=10).to(dtype)
    x = torch.rand(args.batch_size, 3, 32, 32, dtype=dtype)
    y = torch.randint(0, 10, (args.batch_size,))
    updated = {}
    for in_backward in (False, True):
        model = copy.deepcopy(base)
        opt = ProxPropOptimizer(
            model,
            torch.optim.SGD,
            lr=0.01,
            tau_prox=args.tau_prox,
            solver=args.solver,
            solve_in_backward=in_backward,
        )
        for _ in range(args.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        updated[in_backward] = {name: p.detach() for name, p in model.named_parameters()}
        if in_backward:
            solved = {
                name: (stats.form, stats.columns)
                for name, stats in opt.last_stats.items()
                if stats.solved_in_backward
            }
            print(
                f"ResNet-18, {args.dtype}, batch {args.batch_size}, {args.solver}, "
                f"{args.steps} steps: {len(solved)} of {len(opt.last_stats)} preconditioned "
                f"layers solved in backward: {solved}"
            )
    start = {name: p.detach() for name, p in base.named_parameters()}
    worst = 0.0
    for name, parameter in updated[False].items():
        update = parameter - start[name]
        if update.norm() > 0:
            difference = updated[True][name] - parameter
            worst = max(worst, float(difference.norm() / update.norm()))
    print(f"largest relative difference of a parameter's total update: {worst:.2e}")


if __name__ == "__main__":
    main()
