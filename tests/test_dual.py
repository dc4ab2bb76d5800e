"""The dual-kernel form: the δ shortcut is taken exactly when .grad allows it, never otherwise."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.dual import SYMMETRIC_KERNEL_MIN_COLUMNS, probe_verdicts, symmetric_product

BASES = {"eigenbasis": (0.0, 1.0), "coefficient": (1.0, 0.0)}


@pytest.fixture(params=sorted(BASES))
def cg_basis(request, monkeypatch):
    """Run the dual CG in the given basis (its cost model picks per device and size)."""
    costs = BASES[request.param]
    monkeypatch.setattr("proxoptim.plan.dual_cg_costs", lambda *args, **kwargs: costs)
    return request.param


@pytest.fixture(params=["inverse", "solve"])
def exact_path(request, monkeypatch):
    """The exact dual solve by the explicit inverse (the CPU's choice) or by triangular
    solves against the coefficients (the accelerators')."""
    from proxoptim import costs

    explicit = request.param == "inverse"
    monkeypatch.setattr(costs, "CPU", dataclasses.replace(costs.CPU, explicit_inverse=explicit))
    return request.param


TOLERANCE = 1e-8


def layer_and_batch(seed=0, n=6, d_in=9, m=4, bias=True):
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, m, bias=bias).double()
    x = torch.rand(n, d_in, dtype=torch.float64)
    weights = torch.randn(n, m, dtype=torch.float64)
    return layer, x, weights


def step_with(layer, x, weights, modify_grad=None, solver="exact", **kwargs):
    """One step, .grad optionally modified after backward; (direction, grad, stats)."""
    opt = ProxPropOptimizer(
        layer,
        Recorder,
        exclude_last=False,
        solver=solver,
        solver_form="dual",
        diagnostics=True,
        **kwargs,
    )
    (layer(x) * weights).sum().backward()
    if modify_grad is not None:
        modify_grad(layer)
    grad = flatten_pair(layer.weight.grad, layer.bias.grad if layer.bias is not None else None)
    opt.step()
    seen = opt.inner.seen[-1]
    direction = flatten_pair(seen[layer.weight], seen.get(layer.bias))
    (stats,) = opt.last_stats.values()
    opt.remove_hooks()
    return direction, grad.clone(), stats


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.usefixtures("exact_path")
def test_untouched_gradient_takes_the_output_gradient_shortcut(solver, bias):
    layer, x, weights = layer_and_batch(bias=bias)
    direction, grad, stats = step_with(layer, x, weights, solver=solver, tau_prox=0.7)
    assert stats.form == "dual" and stats.output_grad_scale == pytest.approx(1.0, rel=1e-12)
    expected = oracle_direction(layer, [x], grad, 0.7, None if solver == "exact" else 3)
    assert relative_error(direction, expected) <= TOLERANCE


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.usefixtures("exact_path")
def test_clipped_gradient_is_a_scaled_shortcut(solver):
    layer, x, weights = layer_and_batch(seed=1)

    def clip(module):
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.01)

    direction, grad, stats = step_with(layer, x, weights, clip, solver=solver)
    assert stats.output_grad_scale is not None and 0 < stats.output_grad_scale < 1
    expected = oracle_direction(layer, [x], grad, 1.0, None if solver == "exact" else 3)
    assert relative_error(direction, expected) <= TOLERANCE


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.usefixtures("exact_path")
def test_gradient_with_extra_terms_uses_the_general_form(solver):
    """Weight decay added to .grad, or a gradient averaged with another batch's (as DDP does):
    the probe must notice, and the general form must solve with the gradient as it is."""
    layer, x, weights = layer_and_batch(seed=2)
    other = torch.rand(6, 9, dtype=torch.float64)

    def weight_decay(module):
        module.weight.grad += 1e-3 * module.weight.detach()

    def averaged_with_other_rank(module):
        # The other rank's gradient of Σ (W x + b)·weights, computed by hand (a forward
        # through the hooked module would be captured).
        module.weight.grad.add_(weights.T @ other).mul_(0.5)
        module.bias.grad.add_(weights.sum(0)).mul_(0.5)

    for modify in (weight_decay, averaged_with_other_rank):
        layer.zero_grad()
        direction, grad, stats = step_with(layer, x, weights, modify, solver=solver)
        assert stats.form == "dual" and stats.output_grad_scale is None, modify.__name__
        expected = oracle_direction(layer, [x], grad, 1.0, None if solver == "exact" else 3)
        assert relative_error(direction, expected) <= TOLERANCE, modify.__name__


def test_grad_scaler_unscaling_gives_the_unscaled_direction():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.rand(6, 9), torch.randint(0, 3, (6,))
    reference = ProxPropOptimizer(model, Recorder, solver_form="dual")
    nn.functional.cross_entropy(model(x), y).backward()
    reference.step()
    expected = reference.inner.seen[-1][model[0].weight]
    reference.remove_hooks()
    model.zero_grad()

    opt = ProxPropOptimizer(model, Recorder, solver_form="dual")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    stats = opt.last_stats["0"]
    # δ was captured scaled by 2¹² and .grad is unscaled, both exactly (a power of two): the
    # probe's float32 ratio is 2⁻¹² up to its own rounding, a few ulps (u32 = 6e-8), and
    # the direction is the unscaled one up to that and the solve's rounding (measured: both
    # exact). Taking the scale as 1 would be off by a factor 4096.
    assert stats.output_grad_scale == pytest.approx(2.0**-12, rel=1e-5)
    assert relative_error(opt.inner.seen[-1][model[0].weight], expected) <= 1e-5


@pytest.mark.usefixtures("exact_path")
def test_rank_deficient_kernel():
    """More samples than fan-in, and repeated samples: K is singular, I/τθ + K is not."""
    layer, x, weights = layer_and_batch(seed=4, n=12, d_in=3)
    x[6:] = x[:6]
    for solver, iterations in (("exact", None), ("cg", 4)):
        layer.zero_grad()
        direction, grad, _ = step_with(layer, x, weights, solver=solver, cg_iters=iterations or 3)
        expected = oracle_direction(layer, [x], grad, 1.0, iterations)
        assert relative_error(direction, expected) <= TOLERANCE


def test_probe_leaves_the_global_random_stream_alone():
    layer, x, weights = layer_and_batch()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    step_with(layer, x, weights)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.usefixtures("exact_path")
def test_exact_dual_residual_is_reported():
    layer, x, weights = layer_and_batch(seed=5)
    _, _, stats = step_with(layer, x, weights)
    assert 0 <= stats.relative_residual < 1e-10
    layer.zero_grad()
    _, _, general = step_with(layer, x, weights, lambda m: m.weight.grad.add_(1.0))
    assert general.output_grad_scale is None and 0 <= general.relative_residual < 1e-10


@pytest.mark.parametrize("columns", [3, SYMMETRIC_KERNEL_MIN_COLUMNS + 1])
def test_kernel_is_x_xt_and_exactly_symmetric(columns):
    inputs = torch.randn(columns, 7, dtype=torch.float64)
    kernel = symmetric_product(inputs)
    assert relative_error(kernel, inputs @ inputs.T) <= 1e-14
    assert torch.equal(kernel, kernel.T)


@pytest.mark.parametrize("rows", [4, 7])  # both associations: m < d and m > d
@pytest.mark.parametrize("shortcut", [True, False])
def test_cg_in_row_blocks_matches_the_oracle(monkeypatch, rows, shortcut, cg_basis):
    """Rows solved (and expanded) a block at a time, the last block partial."""
    monkeypatch.setattr("proxoptim.dual.CG_ROW_BLOCK", 3)
    layer, x, weights = layer_and_batch(seed=4, d_in=5, m=rows)

    def add_decay(module):
        module.weight.grad += 0.1 * module.weight.detach()

    direction, grad, stats = step_with(
        layer, x, weights, None if shortcut else add_decay, solver="cg", cg_iters=3
    )
    assert (stats.output_grad_scale is not None) == shortcut
    expected = oracle_direction(layer, [x], grad, 1.0, 3)
    assert relative_error(direction, expected) <= TOLERANCE


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_dual_form_of_a_channels_last_convolution(solver):
    """One-group convolutions take the dual form from their patches, whatever the weight's
    memory format (the direction buffer of a channels-last weight is not a flat view)."""
    torch.manual_seed(6)
    conv = nn.Conv2d(3, 4, 3, padding=1).double().to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    opt = ProxPropOptimizer(
        conv, Recorder, exclude_last=False, solver=solver, solver_form="dual", tau_prox=0.4
    )
    (conv(x) * torch.randn(2, 4, 3, 3, dtype=torch.float64)).sum().backward()
    grad = flatten_pair(conv.weight.grad, conv.bias.grad)
    opt.step()
    seen = opt.inner.seen[-1]
    direction = flatten_pair(seen[conv.weight], seen[conv.bias])
    assert next(iter(opt.last_stats.values())).form == "dual"
    expected = oracle_direction(conv, [x], grad, 0.4, None if solver == "exact" else 3)
    assert relative_error(direction, expected) <= TOLERANCE


@pytest.mark.parametrize("cg_iters", [2, 4, 7])
def test_general_form_past_convergence_matches_the_oracle(cg_iters, cg_basis):
    """More iterations than the rank (n > d): once a row has converged, rounding noise in
    its cancelling residual norm must not drive further steps (found by hypothesis)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 1, (2, 1), bias=False).double()
    x = torch.rand(3, 1, 2, 4, dtype=torch.float64)
    opt = ProxPropOptimizer(
        conv, Recorder, exclude_last=False, solver_form="dual", cg_iters=cg_iters
    )
    (conv(x) * torch.randn(3, 1, 1, 4, dtype=torch.float64)).sum().backward()
    grad = conv.weight.grad.reshape(-1).clone()
    opt.step()
    direction = opt.inner.seen[-1][conv.weight].reshape(-1)
    expected = oracle_direction(conv, [x], grad, 1.0, cg_iters)
    assert relative_error(direction, expected) <= TOLERANCE


@pytest.mark.parametrize("modify", [None, "decay"])
@pytest.mark.parametrize("cg_iters", [1, 3, 8])
def test_cg_in_each_basis_matches_the_oracle(cg_basis, modify, cg_iters):
    """The δ form (untouched gradient) and the general form (weight decay added), in K's
    eigenbasis and in the coefficient basis, k below and past the rank (n = 6)."""
    layer, x, weights = layer_and_batch(seed=7)

    def add_decay(module):
        module.weight.grad += 0.1 * module.weight.detach()

    direction, grad, stats = step_with(
        layer,
        x,
        weights,
        add_decay if modify else None,
        solver="cg",
        cg_iters=cg_iters,
        tau_prox=0.6,
    )
    assert (stats.output_grad_scale is None) == (modify is not None)
    assert stats.iterations == cg_iters
    expected = oracle_direction(layer, [x], grad, 0.6, cg_iters)
    assert relative_error(direction, expected) <= TOLERANCE
    assert 0 <= stats.relative_residual < (1e-6 if cg_iters == 8 else 1.0)


def test_probe_verdicts_read_every_layer_at_once():
    """One list per device, one verdict per layer in order; None where not probed, where δ
    vanished, or where the fit misses the tolerance."""
    fits = torch.tensor([4.0, 0.5, 0.0, 2.0], dtype=torch.float64)
    misses = torch.tensor([4.0, 0.5, 1e-2, 2.0], dtype=torch.float64)
    no_delta = torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    verdicts = probe_verdicts(
        [fits, None, misses, no_delta, fits], [torch.float32] * 4 + [torch.float64]
    )
    assert verdicts == [0.5, None, None, None, 0.5]
    assert probe_verdicts([], []) == []


def test_every_layers_probe_is_read_back_at_once(monkeypatch):
    """The optimizer sets up every layer (and its probe) before any solve, and reads all
    the probes' numbers in one call: one host sync per step, not one per layer."""
    import proxoptim.pipeline as pipeline_module

    calls = []

    def counting(numbers, dtypes):
        calls.append(len(numbers))
        return probe_verdicts(numbers, dtypes)

    monkeypatch.setattr(pipeline_module, "probe_verdicts", counting)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = ProxPropOptimizer(model, Recorder, solver_form="dual")
    nn.functional.cross_entropy(model(torch.rand(6, 9)), torch.randint(0, 3, (6,))).backward()
    opt.step()
    assert calls == [2]  # both hidden layers' probes, in one read-back
    assert all(stats.output_grad_scale == pytest.approx(1.0) for stats in opt.last_stats.values())


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_only_layers_that_would_run_the_dual_form_are_probed(monkeypatch, solver):
    """The δ probe serves only the dual form: a layer the cost model solves in another form
    even with δ known is not probed (its operators and host sync would be spent for
    nothing), while every dual layer still is, and still gets the δ form."""
    import proxoptim.pipeline as pipeline_module

    probed = []
    real = pipeline_module.probe_numbers_for

    def recording(system, grad_weight, grad_bias, probe):
        probed.append(grad_weight.shape)
        return real(system, grad_weight, grad_bias, probe)

    monkeypatch.setattr(pipeline_module, "probe_numbers_for", recording)
    torch.manual_seed(0)
    # The digits MLP at batch 100: a narrow first layer (d = 65 < n) and a wide second one.
    model = nn.Sequential(
        nn.Linear(64, 400), nn.ReLU(), nn.Linear(400, 100), nn.ReLU(), nn.Linear(100, 10)
    )
    opt = ProxPropOptimizer(model, Recorder, solver=solver, tau_prox=0.05)
    x, y = torch.rand(100, 64), torch.randint(0, 10, (100,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    forms = {name: stats.form for name, stats in opt.last_stats.items()}
    assert set(forms.values()) == {"primal", "dual"}  # both kinds in one step
    dual_shapes = [model[int(name)].weight.shape for name, form in forms.items() if form == "dual"]
    assert probed == dual_shapes
    for name, form in forms.items():
        assert (opt.last_stats[name].output_grad_scale is not None) == (form == "dual")
