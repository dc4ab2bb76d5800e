"""What the dual form must compute beyond backprop, piece by piece, on the paper MLP.

A lower bound on the step-time ratio of any dual-form ProxProp step (docs/performance.md,
"The floor"): for every preconditioned Linear layer, timed in the same process as the
backprop step and interleaved with it, the pieces no dual-form step can skip:

- floor: the one extra weight-gradient-sized product v = c·X (m×n times n×d),
- kernel: K = XXᵀ (from its upper blocks, as proxoptim builds it),
- factor: the float64 Cholesky factor and inverse of I/τθ + K (exact step),
- association: the cheaper of (I/τθ + K)⁻¹X and δᵀ(I/τθ + K)⁻¹ (both forms),
- eigh, change of basis: K's eigendecomposition and δᵀQ (CG in K's eigenbasis),
- probe: the pass over ``.grad`` that verifies it is s·δᵀX,
- stats: ‖g‖², ‖v‖², ⟨v, g⟩ for ``last_stats``.

It prints each piece per layer and the ratio (backprop + pieces) / backprop for an exact
step and for CG (the CG recurrences themselves excluded, so that bound is loose).

    python benchmarks/dual_budget.py --repeats 15
"""

from __future__ import annotations

import argparse

import torch
from conv_gram_cost import median_ms
from step_ratio import build_network, make_step
from torch import Tensor, nn

from proxoptim.dual import symmetric_product
from proxoptim.experiments.provenance import provenance_comment

TARGETS = {"exact": 1.5, "cg3": 1.6, "cg10": 1.7}

PIECES = ("floor", "kernel", "factor", "association", "eigh", "change of basis", "probe", "stats")
EXACT_PIECES = ("floor", "kernel", "factor", "association", "probe", "stats")
CG_PIECES = ("floor", "kernel", "eigh", "change of basis", "association", "probe", "stats")


def captured_layers(model: nn.Module, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """(X (n, d), δ (n, m), g (m, d)) of every Linear layer but the output layer."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)][:-1]
    inputs: dict[nn.Module, Tensor] = {}
    output_grads: dict[nn.Module, Tensor] = {}

    def keep(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        inputs[module] = args[0].detach()
        output.register_hook(lambda grad: output_grads.__setitem__(module, grad.detach()))

    handles = [module.register_forward_hook(keep) for module in linears]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    return [(inputs[m], output_grads[m], m.weight.grad.detach().clone()) for m in linears]


def layer_pieces(inputs: Tensor, deltas: Tensor, grad: Tensor, tau_prox: float) -> dict:
    """Each piece of one layer as a zero-argument function (see the module docstring)."""
    rows, columns = grad.shape
    kernel = symmetric_product(inputs)
    eye = torch.eye(inputs.shape[0], dtype=torch.float64)
    shifted = kernel.double() + eye / tau_prox
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(shifted)).float()
    _, basis = torch.linalg.eigh(kernel)
    coefficients = torch.randn(rows, inputs.shape[0])
    direction = torch.empty_like(grad)
    probe = torch.randn(columns)

    def factor() -> Tensor:
        factor_, _ = torch.linalg.cholesky_ex(kernel.double() + eye / tau_prox)
        return torch.cholesky_inverse(factor_).float()

    def association() -> Tensor:  # the association proxoptim.dual.DualKernel.expand picks
        return inverse @ inputs if rows > columns else deltas.T @ inverse

    def probe_pass() -> Tensor:
        return torch.stack([(grad @ probe).norm(), (deltas.T @ (inputs @ probe)).norm()])

    def stats() -> Tensor:
        flat_grad, flat_direction = grad.reshape(-1), direction.reshape(-1)
        return torch.stack(
            [
                torch.dot(flat_grad, flat_grad),
                torch.dot(flat_direction, flat_direction),
                torch.dot(flat_direction, flat_grad),
            ]
        )

    return {
        "floor": lambda: torch.mm(coefficients, inputs, out=direction),
        "kernel": lambda: symmetric_product(inputs),
        "factor": factor,
        "association": association,
        "eigh": lambda: torch.linalg.eigh(kernel),
        "change of basis": lambda: deltas.T @ basis,
        "probe": probe_pass,
        "stats": stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tau-prox", type=float, default=1.0)
    args = parser.parse_args()
    print(provenance_comment())

    torch.manual_seed(0)
    model = build_network("mlp", 1.0)
    x = torch.rand(args.batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch_size,))
    layers = captured_layers(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.95, nesterov=True)
    functions = {"backprop": make_step(model, opt, x, y)}
    for index, (inputs, deltas, grad) in enumerate(layers):
        for piece, function in layer_pieces(inputs, deltas, grad, args.tau_prox).items():
            functions[f"{index}/{piece}"] = function
    times = median_ms(functions, args.repeats)

    backprop = times["backprop"]
    print(
        f"paper MLP, batch {args.batch_size}, CPU, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; medians of {args.repeats} interleaved runs [ms]; "
        f"backprop step (Nesterov SGD) {backprop:.1f} ms"
    )
    print()
    shapes = [f"layer {i + 1} ({g.shape[0]}×{x.shape[1]})" for i, (x, _, g) in enumerate(layers)]
    print("| piece | " + " | ".join(shapes) + " | total |")
    print("|---|" + "---|" * (len(layers) + 1))
    totals = {}
    for piece in PIECES:
        cells = [times[f"{index}/{piece}"] for index in range(len(layers))]
        totals[piece] = sum(cells)
        print(f"| {piece} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {totals[piece]:.1f} |")
    print()
    print("| step | backprop + its pieces [ms] | ratio ≥ | target |")
    print("|---|---|---|---|")
    rows = [
        ("floor alone", ("floor",), None),
        ("exact", EXACT_PIECES, TARGETS["exact"]),
        ("CG, recurrences excluded", CG_PIECES, TARGETS["cg3"]),
    ]
    for name, pieces, target in rows:
        total = backprop + sum(totals[piece] for piece in pieces)
        target_cell = "–" if target is None else f"{target}"
        print(f"| {name} | {total:.1f} | {total / backprop:.2f} | {target_cell} |")


if __name__ == "__main__":
    main()
