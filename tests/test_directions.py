"""The direction ProxPropOptimizer hands the inner optimizer, against the dense oracle.

Every layer kind and configuration, every solve form, float64, relative error ≤ 1e-8.
"""

from __future__ import annotations

import pytest
import torch
from layer_cases import LAYER_CASES
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.solvers import FORMS

TOLERANCE = 1e-8


def proxprop_direction(module, inputs, **kwargs):
    """(direction, gradient) flat, from one step with a recording inner optimizer."""
    opt = ProxPropOptimizer(module, Recorder, exclude_last=False, diagnostics=True, **kwargs)
    generator = torch.Generator().manual_seed(7)
    loss = 0.0
    for x in inputs:
        out = module(x)
        loss = loss + (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum()
    loss.backward()
    grad = flatten_pair(module.weight.grad, module.bias.grad if module.bias is not None else None)
    opt.step()
    seen = opt.inner.seen[-1]
    direction = flatten_pair(seen[module.weight], seen.get(module.bias))
    opt.remove_hooks()
    return direction, grad.clone(), opt


def forms_of(case, forms):
    """(case, form) pairs for the forms the case's layer can use (dual: one group)."""
    single_group = getattr(case.build(), "groups", 1) == 1
    return [
        pytest.param(case, form, id=f"{case.name}-{form}")
        for form in forms
        if single_group or form != "dual"
    ]


EXACT_FORMS = [p for case in LAYER_CASES for p in forms_of(case, ["primal", "dual"])]
CG_FORMS = [p for case in LAYER_CASES for p in forms_of(case, ["matrix_free", "primal", "dual"])]


@pytest.mark.parametrize(("case", "form"), EXACT_FORMS)
@pytest.mark.parametrize("tau_prox", [0.05, 2.0])
def test_exact_matches_dense_solve(case, form, tau_prox):
    module, sample = case.make()
    inputs = [sample(3)]
    direction, grad, opt = proxprop_direction(
        module, inputs, solver="exact", tau_prox=tau_prox, solver_form=form
    )
    expected = oracle_direction(module, inputs, grad, tau_prox, cg_iters=None)
    assert relative_error(direction, expected) <= TOLERANCE
    stats = next(iter(opt.last_stats.values()))
    assert stats.form == form and stats.iterations == 0
    assert stats.relative_residual < 1e-10


@pytest.mark.parametrize(("case", "form"), CG_FORMS)
@pytest.mark.parametrize("cg_iters", [1, 3, 6])
def test_cg_matches_textbook_cg_per_row(case, form, cg_iters):
    module, sample = case.make()
    inputs = [sample(2)]
    direction, grad, opt = proxprop_direction(
        module, inputs, solver="cg", cg_iters=cg_iters, tau_prox=0.5, solver_form=form
    )
    expected = oracle_direction(module, inputs, grad, 0.5, cg_iters=cg_iters)
    assert relative_error(direction, expected) <= TOLERANCE
    stats = next(iter(opt.last_stats.values()))
    assert stats.form == form and stats.iterations == cg_iters


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_several_calls_sum_into_m(case):
    """A layer called twice (weight sharing / micro-batches) contributes both inputs."""
    module, sample = case.make(seed=3)
    inputs = [sample(2), sample(1)]
    for form in ("matrix_free", "primal", "dual"):
        direction, grad, _ = proxprop_direction(
            module, inputs, solver="cg", cg_iters=4, tau_prox=1.0, solver_form=form
        )
        module.zero_grad()
        expected = oracle_direction(module, inputs, grad, 1.0, cg_iters=4)
        assert relative_error(direction, expected) <= TOLERANCE
    for form in ("primal", "dual"):
        direction, grad, _ = proxprop_direction(
            module, inputs, solver="exact", tau_prox=1.0, solver_form=form
        )
        module.zero_grad()
        expected = oracle_direction(module, inputs, grad, 1.0, cg_iters=None)
        assert relative_error(direction, expected) <= TOLERANCE


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_forms_agree_with_each_other(case):
    module, sample = case.make(seed=5)
    inputs = [sample(4)]
    results = {}
    forms = ("matrix_free", "primal", "dual") if case.name.startswith("linear") else FORMS[:2]
    for form in forms:
        results[form], _, opt = proxprop_direction(
            module, inputs, solver="cg", cg_iters=5, tau_prox=0.3, solver_form=form
        )
        assert next(iter(opt.last_stats.values())).form == form
        module.zero_grad()
    for form in forms[1:]:
        assert relative_error(results[form], results["matrix_free"]) <= TOLERANCE


def test_cg_converges_to_exact_solution():
    module, sample = LAYER_CASES[0].make()
    inputs = [sample(4)]
    exact, _, _ = proxprop_direction(module, inputs, solver="exact", tau_prox=1.0)
    module.zero_grad()
    # Each row's system has dimension 6: CG is exact after 6 iterations in exact arithmetic.
    iterated, _, _ = proxprop_direction(module, inputs, solver="cg", cg_iters=6, tau_prox=1.0)
    assert relative_error(iterated, exact) <= 1e-9


def test_closed_form_proximal_step_eq44():
    """SGD lr=1 + exact solve lands on argmin ½‖θã − z½‖² + 1/(2τθ)‖θ − θk‖² (eq. 11/44)."""
    torch.manual_seed(0)
    tau_prox = 0.7
    layer = nn.Linear(6, 4).double()
    x = torch.rand(9, 6, dtype=torch.float64)
    target = torch.randn(9, 4, dtype=torch.float64)
    theta_k = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1).clone()
    opt = ProxPropOptimizer(
        layer, torch.optim.SGD, lr=1.0, solver="exact", tau_prox=tau_prox, exclude_last=False
    )
    z = layer(x)
    loss = 0.5 * ((z - target) ** 2).sum()
    loss.backward()
    opt.step()
    # z½ = z − ∂loss/∂z, ã = [a; 1]: the paper's closed form (eq. 44), rows θ = [W, b].
    a_tilde = torch.cat([x, torch.ones(9, 1, dtype=torch.float64)], 1).T
    z_half = (z - (z - target)).detach().T
    eye = torch.eye(7, dtype=torch.float64)
    closed_form = (z_half @ a_tilde.T + theta_k / tau_prox) @ torch.linalg.inv(
        a_tilde @ a_tilde.T + eye / tau_prox
    )
    landed = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    assert relative_error(landed, closed_form) <= TOLERANCE


@pytest.mark.parametrize("cg_iters", [1, 2, 5])
@pytest.mark.parametrize("seed", range(4))
def test_cg_direction_is_descent_direction(cg_iters, seed):
    """Paper Prop. 5: any number of CG iterations gives ⟨v, g⟩ > 0 (per layer, per row)."""
    case = LAYER_CASES[seed * 2 % len(LAYER_CASES)]
    module, sample = case.make(seed=seed)
    module.float()
    inputs = [sample(3).float()]
    direction, grad, opt = proxprop_direction(
        module, inputs, solver="cg", cg_iters=cg_iters, tau_prox=10.0 ** (seed - 2)
    )
    assert float(direction @ grad) > 0
    assert next(iter(opt.last_stats.values())).cosine > 0
