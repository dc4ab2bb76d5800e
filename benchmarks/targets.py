"""The step-time and memory table of docs/performance.md, from one command.

ProxProp step time / backprop step time (same inner optimizer, same process, interleaved,
median of the repeats after warm-up) for the paper's MLP (Nesterov SGD) and CNN (Adam) at
batch 500, and peak memory of each method against backprop's (each in a fresh process):
max RSS on a CPU (the target's measure), max_memory_allocated on a GPU, and on a CPU also
the peak of live tensors, the accounting max_memory_allocated does (no runtime in it).
The "floor" row is backprop plus one weight-gradient-sized product per preconditioned layer
(the least any dual-form step adds; see benchmarks/step_ratio.py).

    python benchmarks/targets.py                 # CPU
    python benchmarks/targets.py --device cuda   # GPU: max_memory_allocated for memory
    python benchmarks/targets.py --device cuda --graphs   # also each method with cuda_graphs=True
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_ratio import FLOOR, measure, peak_memory

from proxoptim.experiments.provenance import provenance_comment

# (network, inner optimizer, {method: target ratio}); None: no target, measured anyway.
TABLE = [
    ("mlp", "nesterov", {FLOOR: None, "cg3": 1.6, "exact": 1.5, "cg10": 1.7}),
    ("cnn", "adam", {"cg3": 2.0, "cg10": 4.0}),
]
MEMORY_TARGET = 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--graphs", action="store_true", help="also time every method with cuda_graphs=True"
    )
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive steps per method and turn (timing all but the first); 1 = strict "
        "alternation",
    )
    args = parser.parse_args()
    print(provenance_comment())
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(
        f"{device_name}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch 500, "
        f"median of {args.repeats} interleaved steps after {args.warmup} warm-up, "
        f"{'strict alternation' if args.block == 1 else f'turns of {args.block} steps'}"
    )
    tensor_column = not args.no_memory and not args.device.startswith("cuda")
    print(
        "| network | method | step [ms] | backprop [ms] | ratio | target "
        "| peak memory ratio | memory target |"
        + (" peak tensor memory ratio |" if tensor_column else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if tensor_column else ""))
    for network, optimizer, targets in TABLE:
        methods = list(targets)
        if args.graphs:
            methods += [f"{name}-graphs" for name in targets if name != FLOOR]
        times = measure(
            network,
            optimizer,
            methods,
            500,
            args.repeats,
            args.warmup,
            args.device,
            block=args.block,
        )
        baseline = statistics.median(times["backprop"])
        memory, tensor_memory = {}, {}
        if not args.no_memory:
            for name in ["backprop", *[m for m in methods if m != FLOOR]]:
                memory[name] = peak_memory(network, optimizer, name, 500, 3, args.device, 1.0, 1.0)
                if tensor_column:
                    tensor_memory[name] = peak_memory(
                        network, optimizer, name, 500, 3, args.device, 1.0, 1.0, tensors=True
                    )
        for name in methods:
            median = statistics.median(times[name])
            ratio = median / baseline
            target = targets.get(name)
            target_cell = (
                "–" if target is None else f"≤ {target} ({'met' if ratio <= target else 'missed'})"
            )
            memory_cell = "–"
            memory_mark = "–"
            if name in memory:
                memory_ratio = memory[name] / memory["backprop"]
                memory_cell = (
                    f"{memory_ratio:.2f} ({memory[name]:.0f} / {memory['backprop']:.0f} MiB)"
                )
                memory_mark = (
                    f"≤ {MEMORY_TARGET} ({'met' if memory_ratio <= MEMORY_TARGET else 'missed'})"
                )
            tensor_cell = ""
            if tensor_column:
                tensor_cell = " – |"
                if name in tensor_memory:
                    tensor_ratio = tensor_memory[name] / tensor_memory["backprop"]
                    tensor_cell = (
                        f" {tensor_ratio:.2f} ({tensor_memory[name]:.0f} / "
                        f"{tensor_memory['backprop']:.0f} MiB) |"
                    )
            print(
                f"| {network} ({optimizer}) | {name} | {1000 * median:.3g} | "
                f"{1000 * baseline:.3g} | {ratio:.2f} | {target_cell} | "
                f"{memory_cell} | {memory_mark} |{tensor_cell}"
            )


if __name__ == "__main__":
    main()
