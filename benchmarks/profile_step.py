"""Where a ProxProp step's time goes: phases, per-layer solves and the top operators.

python benchmarks/profile_step.py                      # paper MLP, cg3, Nesterov SGD
python benchmarks/profile_step.py --network cnn --optimizer adam --method cg10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.experiments.training import Method, make_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="mlp")
    parser.add_argument("--optimizer", default="nesterov")
    parser.add_argument("--method", default="cg3")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(provenance_comment())

    torch.manual_seed(0)
    model = build_model(args.network, (3, 32, 32), 10)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    opt = make_optimizer(model, Method.parse(args.method), args.optimizer, 1e-6, 1.0)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    layers: dict[str, list[float]] = {}
    for index in range(args.steps + 2):
        opt.zero_grad()
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        opt.step()
        done = time.perf_counter()
        if index < 2:
            continue  # warm-up
        phases["forward"].append(forward - started)
        phases["backward"].append(backward - forward)
        phases["step"].append(done - backward)
        for name, stats in getattr(opt, "last_stats", {}).items():
            layers.setdefault(f"{name} ({stats.form})", []).append(stats.seconds)

    print(
        f"{args.network}, {args.method}, {args.optimizer}, batch {args.batch_size}, CPU, "
        f"{torch.get_num_threads()} threads; medians of {args.steps} steps [ms]"
    )
    print("| phase | ms |\n|---|---|")
    for name, samples in phases.items():
        print(
            f"| {name} (incl. ProxProp solves) | {1000 * statistics.median(samples):.1f} |"
            if name == "step"
            else f"| {name} | {1000 * statistics.median(samples):.1f} |"
        )
    for name, samples in layers.items():
        print(f"| solve of layer {name} | {1000 * statistics.median(samples):.1f} |")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
