"""Time of the dual CG's elementwise recurrences on one block of rows, per process.

The MLP's CG steps spend part of their time in the recurrences on (1024, 500) blocks
(proxoptim.dual._diagonal_cg). When their weighted norms were BLAS matrix-vector
products, that time depended on the process (4-5x slower in about one process in four on
a 2-vCPU VM); this script runs the same block in several fresh processes, on 2 threads
and on 1, and prints each median, so that such a dependence shows.

    python benchmarks/dual_cg_block.py --processes 8
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from proxoptim.dual import _diagonal_cg
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.workspace import Workspace


def child(threads: int, iterations: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    eigenvalues = torch.rand(500, generator=generator) * 4e5 + 90
    start = torch.randn(1024, 500, generator=generator) * 1e-3
    workspace, solution = Workspace(), torch.empty(1024, 500)
    times = []
    for repeat in range(repeats + 1):
        residual = start.clone()
        started = time.perf_counter()
        _diagonal_cg(residual, solution, eigenvalues, 1.0, iterations, None, workspace)
        if repeat:
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(child(args.child, args.iterations, args.repeats))
        return
    print(provenance_comment())
    print(f"dual CG, {args.iterations} iterations on a 1024×500 block, median [ms] per process")
    print("| process | 2 threads | 1 thread |")
    print("|---|---|---|")
    for process in range(args.processes):
        cells = []
        for threads in (2, 1):
            command = [sys.executable, __file__, "--child", str(threads)]
            command += ["--iterations", str(args.iterations), "--repeats", str(args.repeats)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            cells.append(f"{float(output.strip()):.1f}")
        print(f"| {process + 1} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
