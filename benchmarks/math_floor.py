"""The bare math of an exact step on the digits MLP: what no implementation can skip.

    python benchmarks/math_floor.py

For each of the three layers ``proxoptim compare``'s network preconditions (MLP
64-400-100-400-10, batch 100; the forms the cost model picks for an exact step: primal,
dual, primal), the products and factorisations of its exact solve, and nothing else:

* primal (d = fan-in + 1, m rows): the Gram of [X, 1] with I/τθ, its Cholesky factor and
  inverse, and the product g·M⁻¹;
* dual (n = batch): the kernel XXᵀ + 1 + I/τθ in float64, its Cholesky factor and inverse,
  and the two products δᵀ(I/τθ + K)⁻¹ and that times [X, 1].

It prints the median time of the three together, next to backprop's step on the same
network, so the extra time of a ProxProp step (``benchmarks/step_ops.py``) can be split
into this floor and everything around it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment

TAU_PROX = 0.05


def primal_layer(columns: int, fan_in: int, rows: int) -> Callable[[], object]:
    inputs, ones = torch.rand(columns, fan_in), torch.ones(columns, 1)
    gradient = torch.randn(1, rows, fan_in + 1)
    shift = torch.eye(fan_in + 1) / TAU_PROX

    def solve() -> object:
        augmented = torch.cat([inputs, ones], 1)
        factor, _ = torch.linalg.cholesky_ex(torch.addmm(shift, augmented.T, augmented))
        return torch.bmm(gradient, torch.cholesky_inverse(factor).unsqueeze(0))

    return solve


def dual_layer(columns: int, fan_in: int, rows: int) -> Callable[[], object]:
    inputs, deltas = torch.rand(columns, fan_in), torch.randn(columns, rows)
    shift = torch.eye(columns, dtype=torch.float64) / TAU_PROX + 1.0

    def solve() -> object:
        factor, _ = torch.linalg.cholesky_ex((inputs @ inputs.T).double() + shift)
        coefficients = deltas.T @ torch.cholesky_inverse(factor).float()
        return coefficients @ inputs, coefficients.sum(1)

    return solve


def median_ms(run: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return 1000 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=51)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(provenance_comment("python benchmarks/math_floor.py"))
    layers = [primal_layer(100, 64, 400), dual_layer(100, 400, 100), primal_layer(100, 100, 400)]

    def exact_math() -> None:
        for layer in layers:
            layer()

    model = build_model("mlp", (1, 8, 8), 10, 0.1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.95, nesterov=True)
    x, y = torch.rand(100, 1, 8, 8), torch.randint(0, 10, (100,))

    def backprop() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    floor, step = median_ms(exact_math, args.repeats), median_ms(backprop, args.repeats)
    print("| digits MLP, batch 100, CPU 2 threads | median [ms] |")
    print("|---|---|")
    print(f"| backprop step | {step:.2f} |")
    print(f"| exact solves' math alone (3 layers) | {floor:.2f} |")
    print(f"| backprop + that math, as a ratio | {(step + floor) / step:.2f} |")


if __name__ == "__main__":
    main()
