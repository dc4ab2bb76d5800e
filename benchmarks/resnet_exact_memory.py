"""Peak memory of an exact ProxProp step on torchvision's ResNet-18 at 224×224 (CPU).

    python benchmarks/resnet_exact_memory.py --batch-size 32

Runs one backprop step and one exact ProxProp step, each in a fresh process, and prints
the peak resident set size and step time of each: the exact solve must stay within a
bound (docs/reliability.md), never run out of memory.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch
import torchvision
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.provenance import provenance_comment


def child(method: str, batch_size: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.rand(batch_size, 3, 224, 224), torch.randint(0, 10, (batch_size,))
    if method == "backprop":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    else:
        opt = ProxPropOptimizer(model, torch.optim.SGD, lr=1e-3, solver="exact")
    started = time.perf_counter()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    seconds = time.perf_counter() - started
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    forms = sorted({s.form for s in getattr(opt, "last_stats", {}).values()})
    print(f"{method}\t{peak:.0f}\t{seconds:.1f}\t{forms}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch_size)
        return
    print(provenance_comment())
    print(f"ResNet-18, 224×224, batch {args.batch_size}, CPU, one step")
    print("| method | peak RSS [MiB] | step [s] | forms |")
    print("|---|---|---|---|")
    for method in ("backprop", "exact"):
        out = (
            subprocess.run(
                [sys.executable, __file__, "--child", method, "--batch-size", str(args.batch_size)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
            .split("\t")
        )
        print(f"| {out[0]} | {out[1]} | {out[2]} | {out[3]} |")


if __name__ == "__main__":
    main()
