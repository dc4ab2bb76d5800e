"""Dense float64 references for tiny layers: explicit M, linalg.solve, textbook CG.

Nothing here shares code with the library: M is built from the autograd Jacobian of the
layer output with respect to the flat parameter vector θ = [W.flatten(), b], without
assuming the row structure the library relies on (tests check that structure separately).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim import Optimizer


def flat_parameters(module: nn.Module) -> Tensor:
    parts = [module.weight.detach().flatten()]
    if module.bias is not None:
        parts.append(module.bias.detach().flatten())
    return torch.cat(parts)


def flatten_pair(weight: Tensor, bias: Tensor | None) -> Tensor:
    parts = [weight.flatten()] + ([] if bias is None else [bias.flatten()])
    return torch.cat(parts)


def jacobian(module: nn.Module, inputs: Sequence[Tensor]) -> Tensor:
    """J = ∂ vec(outputs of every call) / ∂θ, shape (total outputs, |θ|)."""
    weight_numel = module.weight.numel()

    def outputs(theta: Tensor) -> Tensor:
        params = {"weight": theta[:weight_numel].reshape(module.weight.shape)}
        if module.bias is not None:
            params["bias"] = theta[weight_numel:]
        return torch.cat([functional_call(module, params, (x,)).flatten() for x in inputs])

    return torch.autograd.functional.jacobian(outputs, flat_parameters(module))


def dense_m(module: nn.Module, inputs: Sequence[Tensor], tau_prox: float) -> Tensor:
    """M = I/τθ + JᵀJ over all calls, (|θ|, |θ|)."""
    jac = jacobian(module, inputs)
    return torch.eye(jac.shape[1], dtype=jac.dtype) / tau_prox + jac.T @ jac


def row_indices(module: nn.Module, rows_axis: int = 0) -> list[Tensor]:
    """Indices into θ of each output unit/channel's row [W_j flattened, b_j]; the unit
    indexes weight axis ``rows_axis`` (1 for ConvTranspose)."""
    positions = torch.arange(module.weight.numel()).reshape(module.weight.shape)
    weight_numel = module.weight.numel()
    rows = []
    for j in range(module.weight.shape[rows_axis]):
        index = positions.select(rows_axis, j).flatten().tolist()
        if module.bias is not None:
            index.append(weight_numel + j)
        rows.append(torch.tensor(index))
    return rows


def textbook_cg(matrix: Tensor, rhs: Tensor, iterations: int) -> Tensor:
    """Plain CG from x = 0 on one system, scalar by scalar (Nocedal & Wright, Alg. 5.2)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    for _ in range(iterations):
        rr = float(r @ r)
        if rr == 0.0:
            break
        mp = matrix @ p
        alpha = rr / float(p @ mp)
        x = x + alpha * p
        r = r - alpha * mp
        beta = float(r @ r) / rr
        p = r + beta * p
    return x


def oracle_direction(
    module: nn.Module,
    inputs: Sequence[Tensor],
    grad: Tensor,
    tau_prox: float,
    cg_iters: int | None,
    rows_axis: int = 0,
) -> Tensor:
    """The flat direction: M⁻¹g (cg_iters=None) or per-row textbook CG with k iterations."""
    matrix = dense_m(module, inputs, tau_prox)
    if cg_iters is None:
        return torch.linalg.solve(matrix, grad)
    direction = torch.zeros_like(grad)
    for index in row_indices(module, rows_axis):
        block = matrix[index][:, index]
        direction[index] = textbook_cg(block, grad[index], cg_iters)
    return direction


class Recorder(Optimizer):
    """An inner optimizer that takes no step and records the gradients it was handed."""

    def __init__(self, params) -> None:
        super().__init__(params, {})
        self.seen: list[dict[Tensor, Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(
            {
                p: p.grad.clone()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())
