"""How far the authors' published CG is from textbook CG on the paper's networks (issue 16).

The reference code (github.com/tfrerix/proxprop, ``ProxProp.py``,
``conjugate_gradient_block``) starts CG from the current weights (v = 0 here) and differs
from the textbook recurrences of docs/design.md ("Batched CG") in three ways:

- ``eps = 1e-6`` is added to both denominators: α = ‖r‖² / (pᵀMp + 1e-6) and
  β = ‖r'‖² / (‖r‖² + 1e-6). Where ‖r‖² and pᵀMp are near 1e-6 or below, the step is
  damped: the smaller the residual, the more.
- It stops early once the worst column has ‖r‖² < 1e-4 · mean over columns of ‖g‖².
- Its columns are a Linear layer's output units (one CG per row, as ours), but a Conv2d
  layer's parameters flattened into one vector (one CG for the whole layer: one α and β
  for all rows, inner products summed over them).

This script measures what that does to the direction on the networks of Figures 2 and 3
and Table 1 (the paper's MLP 3072-4000-1000-4000-10 at τθ = 0.05 and 1; the CNN of the
paper's text at τθ = 1), for one batch of 500 CIFAR-10 images at initialisation (seed 0)
and at any checkpoint given. For every preconditioned layer it solves M v = g both ways in
float64 and prints the 10%, 50% and 90% quantiles over rows of ‖v_reference‖ / ‖v_textbook‖
after 1, 3, 5 and 10 iterations. Both CGs are written out here, apart from the library.

Usage:
    python benchmarks/reference_cg_eps.py DATA_DIR [--checkpoint MODEL CHECKPOINT.pt]...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from proxoptim.experiments.data import load_cifar10
from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment

REFERENCE_EPS = 1e-6  # ProxProp.py, conjugate_gradient_block(eps=1e-6)
REFERENCE_TOL = 1e-2  # conjugate_gradient_block(tol=1e-2)
ITERATIONS = (1, 3, 5, 10)
TAUS = {"mlp": (0.05, 1.0), "cnn": (1.0,)}  # Figure 2 and Table 1; Figure 3


class RowSystems:
    """Every row's system v_j (I/τθ + G) = g_j, G = ŨŨᵀ the layer's Gram (every row's).

    In G's eigenbasis each system is the diagonal 1/τθ + λ, so both CGs below are diagonal
    CGs on the coordinates g_j Q, exact in float64 (and Q keeps norms). ``joint``: the
    reference runs one CG for all rows (inner products summed over rows), as it does for a
    Conv2d layer; the textbook CG is per row either way.
    """

    def __init__(self, gram: Tensor, grad: Tensor, joint: bool = False) -> None:
        eigenvalues, basis = torch.linalg.eigh(gram)
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.start = grad @ basis
        self.joint = joint

    def diagonal(self, tau_prox: float) -> Tensor:
        return self.eigenvalues + 1 / tau_prox

    def dot(self, u: Tensor, v: Tensor, joint: bool = False) -> Tensor:
        """Per row (rows, 1), or (``joint``) one sum over every row broadcast to (rows, 1)."""
        per_row = (u * v).sum(1, keepdim=True)
        return per_row.sum().expand_as(per_row) if joint else per_row


class DualRowSystems(RowSystems):
    """The same row systems from the n×n kernel ŨᵀŨ of a Linear layer with fewer inputs n
    than parameters per row d, without a d×d eigendecomposition.

    G's eigenvectors with λ > 0 are Ũu_i/√λ_i, from the kernel's eigenpairs (u_i, λ_i); in
    the rest of the space M is 1/τθ, so every CG keeps the part of g_j there on one line,
    and its norm is one coordinate (λ = 0). ``direction`` maps a solution back to the
    parameters' (rows, d) layout. Per row only (a Linear layer's systems).
    """

    def __init__(self, patches: Tensor, grad: Tensor) -> None:
        """``patches``: Ũᵀ, (n, d), one row per sample; ``grad``: (rows, d); float64."""
        eigenvalues, vectors = torch.linalg.eigh(patches @ patches.T)
        # Below n·eps of the largest the kernel's eigenvalues are rounding: left in the null part.
        kept = eigenvalues > eigenvalues[-1] * len(patches) * torch.finfo(patches.dtype).eps
        self.range_basis = (vectors[:, kept] / eigenvalues[kept].sqrt()).T @ patches  # (r, d)
        coordinates = grad @ self.range_basis.T
        null_sq = (grad.square().sum(1) - coordinates.square().sum(1)).clamp_min(0)
        self.grad = grad
        self.eigenvalues = torch.cat([eigenvalues[kept], eigenvalues.new_zeros(1)])
        self.start = torch.cat([coordinates, null_sq.sqrt()[:, None]], 1)
        self.joint = False

    def direction(self, solution: Tensor) -> Tensor:
        """v (rows, d) from a solution in these coordinates. The null part of g_j is
        g_j − c_j R (c_j its range coordinates, R the range basis), so v_j is
        (s_j − t_j c_j) R + t_j g_j with t_j = (null coordinate of v_j) / ‖null part of g_j‖:
        one (rows, r) × (r, d) product."""
        coordinates, null_norm = self.start[:, :-1], self.start[:, -1:]
        scale = torch.where(null_norm > 0, solution[:, -1:] / null_norm, 0.0)
        return (solution[:, :-1] - scale * coordinates) @ self.range_basis + scale * self.grad


def diagonal_cg(
    rows: RowSystems,
    tau_prox: float,
    iterations: int,
    eps: float = 0.0,
    tol: float | None = None,
    joint: bool = False,
) -> Tensor:
    """``iterations`` CG steps from v = 0 in G's eigenbasis, with ``eps`` added to α's and
    β's denominators, and (``tol``) the early stop once the worst column has
    ‖r‖² < tol² · mean initial ‖r‖². A zero denominator (a row with g = 0, without eps)
    gives a zero step."""
    diagonal = rows.diagonal(tau_prox)
    solution = torch.zeros_like(rows.start)
    residual = rows.start.clone()
    direction = residual.clone()
    residual_sq = rows.dot(residual, residual, joint)
    threshold = None if tol is None else tol**2 * residual_sq.mean()
    for step in range(1, iterations + 1):
        image = direction * diagonal
        curvature = rows.dot(direction, image, joint) + eps
        alpha = torch.where(curvature > 0, residual_sq / curvature, 0.0)
        solution += alpha * direction
        if step == iterations:
            break
        residual -= alpha * image
        next_sq = rows.dot(residual, residual, joint)
        if threshold is not None and next_sq.max() < threshold:
            break
        previous = residual_sq + eps
        direction = residual + torch.where(previous > 0, next_sq / previous, 0.0) * direction
        residual_sq = next_sq
    return solution


def textbook_cg(rows: RowSystems, tau_prox: float, iterations: int) -> Tensor:
    """Textbook CG per row (docs/design.md)."""
    return diagonal_cg(rows, tau_prox, iterations)


def reference_cg(rows: RowSystems, tau_prox: float, iterations: int) -> Tensor:
    """The published recurrences, in v = θ − θ_new coordinates: eps in both denominators,
    the early stop, one CG over the layer where ``rows.joint``."""
    return diagonal_cg(rows, tau_prox, iterations, REFERENCE_EPS, REFERENCE_TOL, rows.joint)


def row_gradient(module: nn.Module) -> Tensor:
    """g: one row per output unit or channel, [weight, bias], float64."""
    weight = module.weight.grad.reshape(module.weight.shape[0], -1)
    return torch.cat([weight, module.bias.grad[:, None]], 1).double()


def patches_of(module: nn.Module, inputs: Tensor) -> Tensor:
    """Ũᵀ: one row per sample and position, [patch, 1], float64."""
    if isinstance(module, nn.Conv2d):
        unfolded = nn.functional.unfold(
            inputs, module.kernel_size, module.dilation, module.padding, module.stride
        )
        inputs = unfolded.transpose(1, 2).reshape(-1, unfolded.shape[1])
    inputs = inputs.double()
    return torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], 1)


def layer_problems(model: nn.Module, x: Tensor, y: Tensor) -> list[tuple[str, RowSystems]]:
    """(name, row systems) of every Linear and Conv2d layer but the last (which keeps its
    gradient in both codes), from one mean cross-entropy backward, in float64."""
    inputs: dict[str, Tensor] = {}
    layers = [
        (name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    handles = [
        module.register_forward_hook(
            lambda module, args, out, name=name: inputs.__setitem__(name, args[0].detach())
        )
        for name, module in layers[:-1]
    ]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    for handle in handles:
        handle.remove()
    problems = []
    for name, module in layers[:-1]:
        gram = torch.zeros(())
        for chunk in inputs[name].split(100):  # the conv patches of 500 images: in chunks
            patches = patches_of(module, chunk)
            gram = gram + patches.T @ patches
        joint = isinstance(module, nn.Conv2d)
        problems.append((name, RowSystems(gram, row_gradient(module), joint=joint)))
    return problems


def quantiles(values: Tensor) -> str:
    q = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return " / ".join(f"{v:.3g}" for v in q.tolist())


def report(title: str, model_name: str, model: nn.Module, x: Tensor, y: Tensor) -> None:
    print(f"\n## {title}\n")
    problems = layer_problems(model, x, y)
    header = " | ".join(f"cg{k}" for k in ITERATIONS)
    print(f"| τθ | layer (rows, one CG per) | ‖g_j‖² | {header} |")
    print("|---|---|---|" + "---|" * len(ITERATIONS))
    for tau_prox in TAUS[model_name]:
        for name, rows in problems:
            cells = []
            for k in ITERATIONS:
                ours = textbook_cg(rows, tau_prox, k).norm(dim=1)
                theirs = reference_cg(rows, tau_prox, k).norm(dim=1)
                # Rows with g = 0 have v = 0 both ways: left out of the ratio.
                live = ours > 0
                cells.append(quantiles(theirs[live] / ours[live]))
            per = "layer" if rows.joint else "row"
            grad_sq = quantiles(rows.start.square().sum(1))
            label = f"{name} ({len(rows.start)}, {per})"
            print(f"| {tau_prox:g} | {label} | {grad_sq} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument(
        "--checkpoint",
        nargs=2,
        action="append",
        default=[],
        metavar=("MODEL", "PATH"),
        help="also measure at a `proxoptim compare` checkpoint of model mlp or cnn",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    print(provenance_comment())
    splits = load_cifar10(args.data_dir, progress=False)
    x, y = splits.train_x[: args.batch_size], splits.train_y[: args.batch_size]
    print(
        "‖v_reference‖ / ‖v_textbook‖, quantiles 10% / 50% / 90% over the rows with g ≠ 0, "
        f"one batch of {args.batch_size}; reference eps {REFERENCE_EPS:g}, tol {REFERENCE_TOL:g}"
    )
    for model_name in ("mlp", "cnn"):
        torch.manual_seed(0)
        model = build_model(model_name, splits.input_shape)
        report(f"{model_name} at initialisation (seed 0)", model_name, model, x, y)
    for model_name, path in args.checkpoint:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model = build_model(model_name, splits.input_shape)
        model.load_state_dict(state["model"])
        epochs = len(state["result"].epochs) - 1
        title = f"{model_name} at {Path(path).name} ({state['result'].method}, {epochs} epochs)"
        report(title, model_name, model, x, y)


if __name__ == "__main__":
    main()
