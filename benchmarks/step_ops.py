"""Operators a whole training step dispatches, and its time, against plain backprop.

    python benchmarks/step_ops.py                              # digits MLP, batch 100
    python benchmarks/step_ops.py --network mlp --batch-size 500 --input 3,32,32 \
        --optimizer nesterov                                   # the paper MLP
    python benchmarks/step_ops.py --network cnn --input 3,32,32 --optimizer adam \
        --batch-size 500 --methods cg3,cg10                    # the paper CNN

A step here is what a training loop runs: zero_grad, forward, backward, step. Each method
runs on its own copy of one network, from the same weights, on the same batch, in one
process. The script reports two things per method:

- the aten operators one step dispatches, counted by a ``TorchDispatchMode`` (what reaches a
  kernel: composite operators appear as the operators they decompose into), and the extra
  operators per preconditioned layer beyond backprop's step. On a GPU every eager operator
  costs host time, and on small networks the CPU's time goes the same way, so this count
  is the step's overhead, measured without timing noise;
- the median step time over interleaved repeats, as a ratio to backprop's.

The default network is the one ``proxoptim compare`` trains: MLP 64-400-100-400-10 on 8×8
digits images, Nesterov SGD, batch 100. ``none`` is ProxProp with ``solver="none"``: the
wrapper and its fused non-finite check, without hooks or solves. The targets printed are issue 14's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import Counter
from collections.abc import Callable

import torch
from step_ratio import (  # one training step: zero_grad, forward, backward, step
    interleaved_times,
    make_step,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.experiments.training import Method, make_optimizer

# Issue 14's targets, for the default network (digits MLP, batch 100): step time over
# backprop's, and extra aten operators per preconditioned layer in a whole training step.
RATIO_TARGETS = {"none": 1.15, "exact": 1.7, "cg3": 2.4}
OPERATOR_TARGETS = {"exact": 25, "cg3": 50, "cg10": 110}


class OperatorCounter(TorchDispatchMode):
    """Counts every operator dispatched while active, by name (``aten.mm.default``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_operators(run: Callable[[], object]) -> Counter[str]:
    """The operators ``run()`` dispatches, by name."""
    with OperatorCounter() as counter:
        run()
    return counter.counts


def build_optimizer(
    model: nn.Module, method: str, optimizer: str, tau_prox: float
) -> torch.optim.Optimizer:
    # A tiny learning rate keeps the weights, and so the work per step, stationary.
    if method == "none":
        inner, kwargs = (
            (torch.optim.SGD, {"lr": 1e-6, "momentum": 0.95, "nesterov": True})
            if optimizer == "nesterov"
            else (torch.optim.Adam, {"lr": 1e-6})
        )
        return ProxPropOptimizer(model, inner, tau_prox=tau_prox, solver="none", **kwargs)
    return make_optimizer(model, Method.parse(method), optimizer, 1e-6, tau_prox)


def preconditioned_layers(model: nn.Module) -> int:
    """Layers a default ProxPropOptimizer preconditions: every Linear/Conv but the output."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return sum(isinstance(module, kinds) for module in model.modules()) - 1


def measure(args: argparse.Namespace) -> list[dict[str, object]]:
    torch.manual_seed(0)
    input_shape = tuple(int(size) for size in args.input.split(","))
    template = build_model(args.network, input_shape, 10, args.width)
    x = torch.rand(args.batch_size, *input_shape)
    y = torch.randint(0, 10, (args.batch_size,))
    names = ["backprop", *[name for name in args.methods.split(",") if name != "backprop"]]
    steps = {}
    for name in names:
        model = copy.deepcopy(template)
        opt = build_optimizer(model, name, args.optimizer, args.tau_prox)
        steps[name] = make_step(model, opt, x, y)
    times = interleaved_times(steps, args.repeats, args.warmup)
    # Counted after the warm-up: a step's first sighting of a layer may set up buffers.
    operators = {name: sum(count_operators(step).values()) for name, step in steps.items()}
    layers = preconditioned_layers(template)
    backprop_time = statistics.median(times["backprop"])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        extra = None if name == "backprop" else (operators[name] - operators["backprop"]) / layers
        rows.append(
            {
                "method": name,
                "step_ms": 1000 * median,
                "ratio": median / backprop_time,
                "operators": operators[name],
                "extra_per_layer": extra,
            }
        )
    return rows


def _target(value: float | None, bound: float | None, fmt: str) -> str:
    if value is None or bound is None:
        return "–"
    return f"≤ {bound:{fmt}} ({'met' if value <= bound else 'missed'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="mlp", choices=("mlp", "cnn", "cnn-reference"))
    parser.add_argument("--input", default="1,8,8", help="one sample's shape; default 8×8 digits")
    parser.add_argument("--width", type=float, default=None, help="default 0.1 on 8×8, else 1")
    parser.add_argument("--optimizer", default="nesterov", choices=("nesterov", "adam"))
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--tau-prox", type=float, default=0.05)
    parser.add_argument("--methods", default="none,exact,cg3,cg10")
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    if args.width is None:
        args.width = 0.1 if args.input == "1,8,8" else 1.0
    print(provenance_comment())
    rows = measure(args)
    digits = (args.network, args.input, args.width, args.batch_size) == ("mlp", "1,8,8", 0.1, 100)
    print(
        f"{args.network} (width {args.width:g}) on {args.input.replace(',', '×')} inputs, "
        f"{args.optimizer}, batch {args.batch_size}, CPU {torch.get_num_threads()} threads; "
        f"median of {args.repeats} interleaved steps after {args.warmup} warm-up; operators "
        "of one whole training step (zero_grad, forward, backward, step)"
    )
    print(
        "| method | step [ms] | ratio | ratio target | aten ops per step | "
        "extra ops per preconditioned layer | ops target |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        name, extra = row["method"], row["extra_per_layer"]
        ratio_target = RATIO_TARGETS.get(name) if digits else None
        print(
            f"| {name} | {row['step_ms']:.2f} | {row['ratio']:.2f} | "
            f"{_target(row['ratio'], ratio_target, '.2f')} | {row['operators']} | "
            f"{'–' if extra is None else f'{extra:.1f}'} | "
            f"{_target(extra, OPERATOR_TARGETS.get(name), 'd')} |"
        )


if __name__ == "__main__":
    main()
