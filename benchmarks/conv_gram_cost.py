"""What a convolution's Gram costs, per layer, against im2col and matrix-free CG.

For each stride-1 convolution of the paper's CNN (batch 500) and of torchvision's
ResNet-18 at 224×224 (batch 32) this times, interleaved in one process, the
correlation-form Gram (proxoptim.conv_gram), the im2col Gram (patches in chunks) and one
matrix-free CG product (a convolution and its weight gradient), and prints the cost
model's ratios beside the measured ones. A cg_k solve costs one Gram (any k) or k
matrix-free products; the cost model picks.

    python benchmarks/conv_gram_cost.py
    python benchmarks/conv_gram_cost.py --network paper --skip-im2col
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from proxoptim.costs import CPU
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.operators import LayerSystem, RowLayout, kind_for
from proxoptim.plan import estimate_costs

# (in channels, out channels, input size, kernel, padding, batch)
LAYERS = {
    "paper": [(3, 16, 32, 5, 2, 500), (16, 20, 16, 5, 2, 500), (20, 20, 8, 5, 2, 500)],
    "resnet18": [(c, c, size, 3, 1, 32) for c, size in ((64, 56), (128, 28), (256, 14), (512, 7))],
}


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
    parser.add_argument("--network", choices=(*LAYERS, "all"), default="all")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-im2col", action="store_true", help="the slowest column")
    args = parser.parse_args()
    print(provenance_comment())
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads, medians of {args.repeats} [ms]")
    print(
        "| layer | batch | correlation Gram | im2col Gram | one matrix-free product "
        "| correlation / product (measured, model) | correlation / im2col (measured, model) |"
    )
    print("|---|---|---|---|---|---|---|")
    networks = list(LAYERS) if args.network == "all" else [args.network]
    for in_channels, out_channels, size, kernel, padding, batch in (
        layer for network in networks for layer in LAYERS[network]
    ):
        module = nn.Conv2d(in_channels, out_channels, kernel, padding=padding)
        kind = kind_for(module)
        layout = RowLayout(module.weight.shape, 1, True)
        x = torch.rand(batch, in_channels, size, size)
        calls = [(module, kind, x, None)]
        system = LayerSystem(layout, calls, torch.float32)
        from_correlation = LayerSystem(layout, calls, torch.float32, gram_sources=[(True, 0.0)])
        from_patches = LayerSystem(layout, calls, torch.float32, gram_sources=[(False, 0.0)])
        rows = layout.to_rows(module.weight.detach(), module.bias.detach())

        def correlation(system: LayerSystem = from_correlation) -> None:
            system.gram()

        def im2col(system: LayerSystem = from_patches) -> None:
            system.gram()

        functions: dict[str, Callable[[], object]] = {"correlation": correlation}
        if not args.skip_im2col:
            functions["im2col"] = im2col
        functions["product"] = lambda system=system, rows=rows: system.gram_apply(rows)
        times = median_ms(functions, args.repeats)
        correlation_cost = kind.correlation_gram_cost(module, system.calls[0].raw)
        columns, dim = system.num_columns, in_channels * kernel * kernel
        im2col_cost = 2.0 * columns * dim * dim + CPU.im2col_per_element * columns * dim
        product_cost = estimate_costs(system, exact=False, cg_iters=1).matrix_free
        im2col_cell, versus_im2col = "–", "–"
        if not args.skip_im2col:
            im2col_cell = f"{times['im2col']:.1f}"
            versus_im2col = (
                f"{times['correlation'] / times['im2col']:.2f}, "
                f"{correlation_cost / im2col_cost:.2f}"
            )
        print(
            f"| conv {in_channels}→{out_channels} {kernel}×{kernel} on {size}×{size} | {batch} | "
            f"{times['correlation']:.1f} | {im2col_cell} | {times['product']:.1f} | "
            f"{times['correlation'] / times['product']:.2f}, "
            f"{correlation_cost / product_cost:.2f} | {versus_im2col} |"
        )


if __name__ == "__main__":
    main()
