"""The matrix-free form: CG whose M-products are ``V/τθ + A*(A V)``, one forward and one
weight-gradient product per iteration (``2·n·d·m`` flops), with no Gram at all; and the
budget of an exact solve that has no room for a Gram or kernel (CG run to convergence).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from proxoptim.operators import LayerSystem


def matrix_free_operator(
    system: LayerSystem, tau_prox: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """(V, out) ↦ out = V/τθ + A*(A V), evaluated with the layer's own forward and weight
    gradient."""
    inverse_tau = 1.0 / tau_prox

    def apply_m(rows: Tensor, out: Tensor) -> Tensor:
        return torch.add(system.gram_apply(rows), rows, alpha=inverse_tau, out=out)

    return apply_m


# An exact solve without a Gram or kernel runs CG until every row's relative residual is
# below this (per dtype), for at most EXACT_CG_MAX_ITERATIONS iterations.
EXACT_CG_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-6}
EXACT_CG_MAX_ITERATIONS = 1000


def exact_cg_budget(row_dim: int, dtype: torch.dtype) -> tuple[int, float]:
    """(iterations, tolerance) for an exact solve by CG on rows of dimension ``row_dim``."""
    return min(2 * row_dim, EXACT_CG_MAX_ITERATIONS), EXACT_CG_TOLERANCE.get(dtype, 1e-3)
