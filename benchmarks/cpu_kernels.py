"""Two small CPU measurements behind choices in the solver, printed as tables.

    python benchmarks/cpu_kernels.py

* **eigh against n**, in float32-GEMM-equivalent flops (the cost model's unit,
  proxoptim.costs): the CPU table's ``eigh_fixed + eigh_per_square·n² + eigh_per_cube·n³``
  is fitted to these numbers. Below n ≈ 300 LAPACK's symmetric eigendecomposition is far
  from its n³ asymptote.
* **a row inner product two ways**: the multiply-and-sum that proxoptim.cg uses
  (``addcmul(tiny, a, b)`` into a buffer, then a row sum: two operators) against one
  batched product (``baddbmm(tiny, a[:, None, :], b[:, :, None])``: one operator), in time
  and in float32 accuracy against float64. CG dispatches two such inner products per
  iteration; the single operator would save two operators per iteration, at this cost.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from proxoptim.experiments.provenance import provenance_comment


def median_seconds(run: Callable[[], object], calls: int, repeats: int = 5) -> float:
    for _ in range(3):
        run()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        samples.append((time.perf_counter() - started) / calls)
    return sorted(samples)[repeats // 2]


def gemm_rate() -> float:
    a, b = torch.randn(1000, 1000), torch.randn(1000, 1000)
    return 2e9 / median_seconds(lambda: a @ b, 10)


def eigh_table(rate: float) -> list[str]:
    from proxoptim.costs import CPU

    lines = [
        f"float32 GEMM: {rate:.3g} flop/s",
        "| n | eigh [ms] | GEMM flops | per n³ | cost model (flops) |",
        "|---|---|---|---|---|",
    ]
    for n in (32, 50, 65, 100, 128, 200, 300, 500):
        generator = torch.Generator().manual_seed(n)
        x = torch.randn(n, 2 * n, generator=generator)
        kernel = x @ x.T
        seconds = median_seconds(lambda kernel=kernel: torch.linalg.eigh(kernel), max(5, 2000 // n))
        flops = seconds * rate
        model = CPU.eigh_fixed + CPU.eigh_per_square * n**2 + CPU.eigh_per_cube * n**3
        lines.append(
            f"| {n} | {1e3 * seconds:.3f} | {flops:.3g} | {flops / n**3:.1f} | {model:.3g} |"
        )
    return lines


def row_dot_table() -> list[str]:
    lines = [
        "| rows | n | multiply and sum [µs] | baddbmm [µs] | float32 error: sum | baddbmm |",
        "|---|---|---|---|---|---|",
    ]
    tiny = torch.tensor(torch.finfo(torch.float32).tiny)
    for rows in (100, 400, 1000):
        for n in (8, 65, 100, 256, 1024, 3073):
            generator = torch.Generator().manual_seed(rows + n)
            a = torch.randn(rows, n, generator=generator)
            b = torch.randn(rows, n, generator=generator)
            work, out = torch.empty(rows, n), torch.empty(rows, 1)
            out3 = out.view(rows, 1, 1)
            a3, b3 = a.view(rows, 1, n), b.view(rows, n, 1)

            def two_operators(a=a, b=b, work=work, out=out) -> object:
                return torch.sum(torch.addcmul(tiny, a, b, out=work), -1, keepdim=True, out=out)

            def one_operator(a3=a3, b3=b3, out3=out3) -> object:
                return torch.baddbmm(tiny, a3, b3, out=out3)

            exact = (a.double() * b.double()).sum(-1, keepdim=True)
            scale = (a.double() * b.double()).abs().sum(-1, keepdim=True)
            errors = []
            for run in (two_operators, one_operator):
                value = run().reshape(rows, 1).double()
                errors.append(float(((value - exact).abs() / scale).max()))
            times = [1e6 * median_seconds(run, 200) for run in (two_operators, one_operator)]
            lines.append(
                f"| {rows} | {n} | {times[0]:.1f} | {times[1]:.1f} | {errors[0]:.1e} "
                f"| {errors[1]:.1e} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(provenance_comment("python benchmarks/cpu_kernels.py"))
    print(f"CPU, {args.threads} threads; medians")
    print()
    print("\n".join(eigh_table(gemm_rate())))
    print()
    print("\n".join(row_dot_table()))


if __name__ == "__main__":
    main()
