"""What a convolution's Gram costs, per layer of the paper CNN, against matrix-free CG.

For each convolution of the paper's CNN (batch 500 by default) this times, interleaved in
one process, the correlation-form Gram (proxoptim.conv_gram), the im2col Gram (patches in
chunks, as LayerSystem builds it for strided convolutions) and one matrix-free CG product
(a convolution and its weight gradient), and prints the cost model's estimates beside
them. A cg_k solve costs one Gram (any k) or k matrix-free products.

    python benchmarks/conv_gram_cost.py
    python benchmarks/conv_gram_cost.py --batch-size 128 --skip-im2col
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from proxoptim.operators import LayerSystem, RowLayout, kind_for
from proxoptim.solvers import estimate_costs

# (in channels, out channels, input size) of the paper CNN's 5×5, padding-2 convolutions.
PAPER_CNN = [(3, 16, 32), (16, 20, 16), (20, 20, 8)]


def median_ms(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-im2col", action="store_true", help="the slowest column")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads, batch {args.batch_size}, medians [ms]")
    print(
        "| layer | correlation Gram | im2col Gram | one matrix-free product "
        "| Gram / product (measured) | (cost model) |"
    )
    print("|---|---|---|---|---|---|")
    for in_channels, out_channels, size in PAPER_CNN:
        module = nn.Conv2d(in_channels, out_channels, 5, padding=2)
        kind = kind_for(module)
        layout = RowLayout(module.weight.shape, 1, True)
        x = torch.rand(args.batch_size, in_channels, size, size)
        system = LayerSystem(layout, [(module, kind, x, None)], torch.float32)
        rows = layout.to_rows(module.weight.detach(), module.bias.detach())

        def correlation(system: LayerSystem = system) -> None:
            system._sources = [(True, 0.0)]
            system.gram()

        def im2col(system: LayerSystem = system) -> None:
            system._sources = [(False, 0.0)]
            system.gram()

        functions: dict[str, Callable[[], object]] = {"correlation": correlation}
        if not args.skip_im2col:
            functions["im2col"] = im2col
        functions["product"] = lambda system=system, rows=rows: system.gram_apply(rows)
        times = median_ms(functions, args.repeats)
        system._sources = None
        modelled = system.gram_cost() / estimate_costs(system, exact=False, cg_iters=1).matrix_free
        im2col_cell = "–" if args.skip_im2col else f"{times['im2col']:.1f}"
        print(
            f"| conv {in_channels}→{out_channels} on {size}×{size} | {times['correlation']:.1f} | "
            f"{im2col_cell} | {times['product']:.1f} | "
            f"{times['correlation'] / times['product']:.2f} | {modelled:.2f} |"
        )


if __name__ == "__main__":
    main()
