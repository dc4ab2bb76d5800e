"""Per-layer diagnostics of a step: what ProxProp reports in ``last_stats``.

Form, iterations, columns, the δ scale and host seconds are known without touching the
device, so they come free with every step. The relative residual and the cosine to the
gradient take reductions over the layer's gradient and direction (and, for an exact dual
solve, a sampled residual): they are computed only with ``diagnostics=True`` and are None
otherwise. The non-finite check does not depend on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from proxoptim.operators import LayerSystem
from proxoptim.readback import read_back
from proxoptim.solvers import FORMS, Solution


@dataclass(frozen=True)
class LayerStats:
    """Diagnostics of one layer's solve in the last step.

    Attributes:
        form: the solve form that ran ("matrix_free", "primal" or "dual").
        iterations: CG iterations run (0 for an exact solve).
        relative_residual: ‖g − M v‖ / ‖g‖ over the whole layer (CG: recurrence residual;
            exact dual solves: measured on a sample of rows); None unless the optimizer
            was built with ``diagnostics=True``.
        cosine: ⟨v, g⟩ / (‖v‖‖g‖), the cosine between the direction and the gradient;
            None unless ``diagnostics=True``.
        seconds: wall time of the solve, including building the Gram (host time; on an
            accelerator it includes only what the host waited for).
        columns: n, the number of columns of Ũ (samples × positions over all calls).
        output_grad_scale: s where ``.grad`` was verified to be s·δᵀŨᵀ (Linear layers:
            the dual form then needs one large product fewer), else None; 1 for layers
            solved in backward (v from δ itself).
        solved_in_backward: the direction was computed during backward and ``.grad``
            holds it (``solve_in_backward=True``; proxoptim.backward_solve).
        backward_fallback: why a layer ``solve_in_backward`` tapped was solved by the step
            instead ("several calls": the summed system of gradient accumulation or shared
            weights; "plan not dual with δ": this step's shapes chose another form); None
            otherwise.
    """

    form: str
    iterations: int
    relative_residual: float | None
    cosine: float | None
    seconds: float
    columns: int
    output_grad_scale: float | None = None
    solved_in_backward: bool = False
    backward_fallback: str | None = None


@dataclass(frozen=True)
class PendingStats:
    """A layer's stats whose numbers are still on the device (no host sync yet).

    ``values`` holds ‖g‖², ‖v‖², ⟨v, g⟩ and ‖g − M v‖ (float64, shape (4,)), or None
    without diagnostics; :func:`resolve_stats` reads every layer's back at once.
    """

    form: str
    iterations: int
    values: Tensor | None
    seconds: float
    columns: int
    output_grad_scale: float | None

    def resolve(self, numbers: list[float] | None) -> LayerStats:
        if numbers is None:
            return LayerStats(
                self.form,
                self.iterations,
                None,
                None,
                self.seconds,
                self.columns,
                self.output_grad_scale,
            )
        grad_sq, direction_sq, inner_product, residual = numbers
        grad_norm, direction_norm = math.sqrt(grad_sq), math.sqrt(direction_sq)
        denominator = grad_norm * direction_norm
        return LayerStats(
            form=self.form,
            iterations=self.iterations,
            # NaN stays NaN (it reports a non-finite g or v); only 0/0 becomes 0.
            relative_residual=residual / grad_norm if grad_norm != 0 else 0.0,
            cosine=inner_product / denominator if denominator != 0 else 0.0,
            seconds=self.seconds,
            columns=self.columns,
            output_grad_scale=self.output_grad_scale,
        )


def layer_stats(
    form: str,
    solution: Solution,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    seconds: float,
    system: LayerSystem,
    output_grad_scale: float | None,
    diagnostics: bool = True,
) -> PendingStats:
    """The quantities behind one layer's LayerStats, left on the device; without
    ``diagnostics`` only what the host knows (no operator runs)."""
    if not diagnostics:
        return PendingStats(
            form, solution.iterations, None, seconds, system.num_columns, output_grad_scale
        )

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return torch.dot(a.reshape(-1), b.reshape(-1))

    pairs = [(solution.weight, grad_weight)]
    if grad_bias is not None:
        pairs.append((solution.bias, grad_bias))
    grad_sq = sum(dot(g, g) for _, g in pairs)
    direction_sq = sum(dot(v, v) for v, _ in pairs)
    inner_product = sum(dot(v, g) for v, g in pairs)
    values = torch.cat(
        [
            torch.stack([grad_sq, direction_sq, inner_product]).double(),
            solution.residual_norm.double().reshape(1),
        ]
    )
    return PendingStats(
        form, solution.iterations, values, seconds, system.num_columns, output_grad_scale
    )


def resolve_stats(pending: dict[str, PendingStats]) -> dict[str, LayerStats]:
    """Every layer's LayerStats, reading the numbers back with one sync per device (not
    one per layer); none at all without diagnostics."""
    rows = read_back([stats.values for stats in pending.values()])
    return {
        name: stats.resolve(numbers)
        for (name, stats), numbers in zip(pending.items(), rows, strict=True)
    }


def pack(stats: LayerStats | None) -> Tensor:
    """LayerStats as 8 float64 numbers (NaN when None), for a broadcast."""
    if stats is None:
        return torch.full((8,), math.nan, dtype=torch.float64)
    scale = math.nan if stats.output_grad_scale is None else stats.output_grad_scale
    diagnosed = stats.cosine is not None
    values = [
        FORMS.index(stats.form),
        stats.iterations,
        stats.relative_residual if diagnosed else math.nan,
        stats.cosine if diagnosed else math.nan,
        stats.seconds,
        stats.columns,
        scale,
        float(diagnosed),  # a NaN cosine (non-finite v) is not the same as no cosine
    ]
    return torch.tensor(values, dtype=torch.float64)


def unpack(packed: Tensor) -> LayerStats:
    """The inverse of :func:`pack`."""
    values = packed.tolist()
    return LayerStats(
        form=FORMS[int(values[0])],
        iterations=int(values[1]),
        relative_residual=values[2] if values[7] else None,
        cosine=values[3] if values[7] else None,
        seconds=values[4],
        columns=int(values[5]),
        output_grad_scale=None if math.isnan(values[6]) else values[6],
    )
