"""Operators each solve form dispatches: the source of proxoptim.costs' operator counts.

    python benchmarks/form_operators.py

The cost model prices a form's operators (on an accelerator each eager operator is host
time; see proxoptim.costs). This script measures them the way the table states them: a
whole training step (zero_grad, forward, backward, step) of a two-layer network whose
first layer is preconditioned, counted by a ``TorchDispatchMode``, minus the same step of
plain backprop, for each form forced with ``solver_form`` and 2 and 3 CG iterations
(base = 3·count(2) − 2·count(3), per iteration = count(3) − count(2): the first
iteration of a CG, which starts from x₀ = 0 without filling buffers, can differ from the
others by an operator, and base + k·per is then exact for every k ≥ 2). The dual form's CG is
counted per basis, with δ known (the probe holds) and without (``probe="never"``); its
base is the exact δ-form solve's count. Counts do not depend on the layer's sizes (they
are operators, not flops), except where a form works in blocks of rows.
"""

from __future__ import annotations

import argparse
import copy

import torch
from step_ops import count_operators
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.provenance import provenance_comment


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


def extra_operators(**kwargs: object) -> int:
    """Operators of one ProxProp step beyond backprop's, after two warm-up steps."""
    x = torch.rand(50, 64)
    y = torch.randint(0, 10, (50,))
    template = network()

    def stepper(opt: torch.optim.Optimizer, model: nn.Module):
        def step() -> None:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        return step

    counts = []
    for prox in (False, True):
        model = copy.deepcopy(template)
        if prox:
            opt = ProxPropOptimizer(model, torch.optim.SGD, lr=1e-6, tau_prox=0.05, **kwargs)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=1e-6)
        step = stepper(opt, model)
        step()
        step()
        counts.append(sum(count_operators(step).values()))
    return counts[1] - counts[0]


def base_and_per_iteration(**kwargs: object) -> tuple[int, int]:
    two = extra_operators(cg_iters=2, **kwargs)
    three = extra_operators(cg_iters=3, **kwargs)
    return 3 * two - 2 * three, three - two


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.set_num_threads(2)
    print(provenance_comment("python benchmarks/form_operators.py"))
    print("| form | base | per CG iteration |")
    print("|---|---|---|")
    for form in ("matrix_free", "primal"):
        base, per_iteration = base_and_per_iteration(solver="cg", solver_form=form, probe="never")
        print(f"| {form} | {base} | {per_iteration} |")
    exact_primal = extra_operators(solver="exact", solver_form="primal")
    exact_dual = extra_operators(solver="exact", solver_form="dual", probe="eager")
    print(f"| primal, exact | {exact_primal} | – |")
    print(f"| dual, exact (δ form, probe included) | {exact_dual} | – |")
    print()
    print("| dual CG basis | δ known | base (probe included where δ is known) | per CG iteration |")
    print("|---|---|---|---|")
    for basis in ("eigenbasis", "coefficient"):
        for probe, known in (("eager", True), ("never", False)):
            base, per_iteration = base_and_per_iteration(
                solver="cg", solver_form="dual", dual_basis=basis, probe=probe
            )
            print(f"| {basis} | {known} | {base} | {per_iteration} |")
    print()
    print(f"δ probe alone: {probe_operators()} operators")


def probe_operators() -> int:
    """Operators of one layer's δ probe, before the shared read-back (its vector is drawn
    once per plan, so a step dispatches only the numbers)."""
    from proxoptim.dual import draw_probe, probe_numbers_for
    from proxoptim.operators import LayerSystem, RowLayout, kind_for

    layer = nn.Linear(64, 100)
    x, delta = torch.rand(50, 64), torch.rand(50, 100)
    layout = RowLayout(layer.weight.shape, 1, True)
    system = LayerSystem(layout, [(layer, kind_for(layer), x, delta)], torch.float32)
    grad_weight, grad_bias = delta.T @ x, delta.sum(0)
    vector = draw_probe(grad_weight, grad_bias, torch.Generator().manual_seed(0))

    def probe() -> None:
        probe_numbers_for(system, grad_weight, grad_bias, vector)

    return sum(count_operators(probe).values())


if __name__ == "__main__":
    main()
