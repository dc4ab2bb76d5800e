"""v = M⁻¹g in the form a layer's plan chose: the dispatch over the forms.

* ``"matrix_free"`` (proxoptim.matrix_free) and ``"primal"`` (proxoptim.primal) run on
  ``(groups, rows_per_group, row_dim)`` rows, with batched CG (proxoptim.cg) or Cholesky;
* ``"dual"`` (proxoptim.dual) works in the n-dimensional sample space.

All give the same direction up to rounding; the plan (:func:`proxoptim.plan.choose_form`)
picks the cheapest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from proxoptim.cg import batched_cg
from proxoptim.dual import DualKernel, solve_dual
from proxoptim.matrix_free import exact_cg_budget, matrix_free_operator
from proxoptim.operators import LayerSystem
from proxoptim.primal import cholesky_solve_rows, primal_operator
from proxoptim.workspace import Workspace

if TYPE_CHECKING:
    from proxoptim.plan import PlanState

FORMS = ("matrix_free", "primal", "dual")


@dataclass
class Solution:
    """A layer's direction v = (weight, bias) and how it was obtained.

    Attributes:
        iterations: CG iterations run (0 for an exact solve).
        residual_norm: ‖g − M v‖, 0-d (CG: by recurrence); None when not asked for.
    """

    weight: Tensor
    bias: Tensor | None
    iterations: int
    residual_norm: Tensor | None


def solve(
    system: LayerSystem,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    *,
    exact: bool,
    cg_iters: int,
    cg_tol: float | None,
    form: str,
    output_grad_scale: float | None = None,
    out: tuple[Tensor, Tensor | None] | None = None,
    workspace: Workspace | None = None,
    diagnostics: bool = True,
    dual_basis: str | None = None,
    constants: PlanState | None = None,
) -> Solution:
    """v = M⁻¹g (exact) or k CG iterations on it, in the given form.

    Args:
        grad_weight, grad_bias: g, shaped like the layer's weight and bias (bias None when
            the layer has no trainable bias).
        form: "matrix_free", "primal" or "dual" (Linear layers, one-group convolutions).
        output_grad_scale: for the dual form, s with .grad = s·δᵀŨᵀ, when verified.
        out: optional (W, b) buffers that receive v (reused across steps by the optimizer).
        workspace: scratch buffers shared by all layers' solves.
        diagnostics: also compute ‖g − M v‖ (``Solution.residual_norm``; None otherwise).
        dual_basis: the dual CG's basis as a plan chose it ("eigenbasis" or
            "coefficient"; None: priced here).
        constants: the plan's kept constants (None: built for this solve).
    """
    if grad_weight.shape[system.layout.rows_axis] == 0:
        # A fully_shard-ed rank holding none of the layer's rows: nothing to solve, but a
        # Gram summed over ranks still needs this rank's part.
        if form == "primal" and system.communicator is not None:
            system.gram()
        empty = grad_weight.new_zeros(())
        return Solution(
            grad_weight.clone(),
            None if grad_bias is None else grad_bias.clone(),
            0,
            empty if diagnostics else None,
        )
    if form == "dual":
        kernel = DualKernel(system)
        # The dual form works on (m, d_weight) rows: a convolution's weight flattened.
        rows = grad_weight.shape[0]
        flat = grad_weight.dim() == 2  # a Linear weight is its rows already (no views)
        flat_out = None
        if out is not None and out[0].is_contiguous():
            flat_out = out if flat else (out[0].view(rows, -1), out[1])
        result = solve_dual(
            kernel,
            grad_weight if flat else grad_weight.reshape(rows, -1),
            grad_bias,
            tau_prox,
            exact=exact,
            cg_iters=cg_iters,
            cg_tol=cg_tol,
            output_grad_scale=output_grad_scale,
            out=flat_out,
            workspace=workspace,
            diagnostics=diagnostics,
            basis=dual_basis,
        )
        weight = result.weight if flat else result.weight.view(grad_weight.shape)
        bias = result.bias
        if out is not None and flat_out is None:
            weight = out[0].copy_(weight)
            bias = out[1].copy_(bias) if bias is not None else None
        return Solution(weight, bias, result.iterations, result.residual_norm)
    layout = system.layout
    rhs = layout.to_rows(grad_weight, grad_bias)
    # CG's vectors live in the shared workspace only where the direction is copied out of
    # them at once; a direction returned as is must own its memory.
    cg_workspace = workspace if out is not None else None
    if form == "primal":
        gram = system.gram()
        if exact:
            rows = cholesky_solve_rows(gram, rhs, tau_prox, diagnostics, constants)
        else:
            rows = batched_cg(
                primal_operator(gram, tau_prox),
                rhs,
                cg_iters,
                cg_tol,
                need_residual=diagnostics,
                workspace=cg_workspace,
            )
    elif form == "matrix_free":
        if exact:
            iterations, tol = exact_cg_budget(layout.row_dim, rhs.dtype)
        else:
            iterations, tol = cg_iters, cg_tol
        rows = batched_cg(
            matrix_free_operator(system, tau_prox),
            rhs,
            iterations,
            tol,
            need_residual=diagnostics,
            workspace=cg_workspace,
        )
    else:
        raise ValueError(f"unknown solve form {form!r}; expected one of {FORMS}")
    if out is not None:
        layout.write_rows(rows.direction, out[0], out[1] if layout.has_bias else None)
        weight, bias = out[0], out[1] if layout.has_bias else None
    else:
        weight, bias = layout.from_rows(rows.direction)
    residual_norm = rows.residual.norm() if diagnostics else None
    return Solution(weight, bias, rows.iterations, residual_norm)
