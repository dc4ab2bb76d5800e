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


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_a_gradient_hook_that_changes_grad_is_never_taken_for_the_shortcut(solver):
    """A tensor hook on the weight changes .grad during backward (here: a fixed
    perturbation well above rounding, far below the gradient): the probe must reject it,
    and the general form solves with the gradient as it is."""
    layer, x, weights = layer_and_batch(seed=4)
    perturbation = 1e-4 * torch.randn(layer.weight.shape, dtype=torch.float64)
    handle = layer.weight.register_hook(lambda grad: grad + perturbation)
    direction, grad, stats = step_with(layer, x, weights, solver=solver)
    handle.remove()
    assert stats.form == "dual" and stats.output_grad_scale is None
    expected = oracle_direction(layer, [x], grad, 1.0, None if solver == "exact" else 3)
    assert relative_error(direction, expected) <= TOLERANCE


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


def _count_operators(run):
    """The aten operators ``run()`` dispatches, and its result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        result = run()
    return Count.calls, result


@pytest.mark.parametrize("tol", [None, 1e-30, 0.05])
@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_diagonal_cg_is_textbook_cg_in_the_scaled_coordinates(iterations, tol):
    """The δ form's eigenbasis CG: textbook CG on diag(1/τθ + λ) for û = √λ·u, rows run at
    unit norm and scaled back (a zero row, a tiny row and a null direction of K included),
    from x₀ = 0 without zero-filled or copied vectors, the last iteration's β and direction
    skipped; its Σ‖r‖² is that of the true residuals."""
    from oracle import textbook_cg

    from proxoptim.dual import _diagonal_cg
    from proxoptim.workspace import Workspace

    generator = torch.Generator().manual_seed(7)
    rows, n, tau_prox = 4, 6, 0.4
    eigenvalues = 3 * torch.rand(n, generator=generator, dtype=torch.float64)
    eigenvalues[0] = 0.0
    start = torch.randn(rows, n, generator=generator, dtype=torch.float64)
    start[2] = 0.0
    start[3] *= 1e-30
    original = start.clone()
    solution = torch.full_like(start, float("nan"))  # every entry must be written
    done, residual_sq = _diagonal_cg(
        start, solution, eigenvalues, tau_prox, iterations, tol, Workspace()
    )
    # A tolerance met stops every row early (here after 2 iterations), and only then.
    assert done == (min(iterations, 2) if tol == 0.05 else iterations)
    roots = eigenvalues.sqrt()
    diagonal = torch.diag(eigenvalues + 1.0 / tau_prox)
    expected_sq = 0.0
    for row in range(rows):
        rhs = original[row] * roots
        scaled = textbook_cg(diagonal, rhs, done)
        if tol == 0.05 and done < iterations:
            assert (rhs - diagonal @ scaled).norm() <= tol * rhs.norm()
        expected = scaled / torch.where(roots > 0, roots, 1.0)
        expected_sq += float((rhs - diagonal @ scaled).square().sum())
        if row == 2:
            assert torch.equal(solution[row], torch.zeros(n, dtype=torch.float64))
        else:
            assert relative_error(solution[row], expected) <= 1e-10
    assert float(residual_sq) == pytest.approx(expected_sq, rel=1e-9)


def test_diagonal_cg_operators_per_iteration():
    """Every full iteration of the δ form's eigenbasis CG dispatches 9 operators: the
    diagonal product, two row inner products (two each), α, the fused iterate/residual
    update, β and the direction (proxoptim.cg.cg_recurrences)."""
    from proxoptim.dual import _diagonal_cg
    from proxoptim.workspace import Workspace

    generator = torch.Generator().manual_seed(0)
    eigenvalues = torch.rand(8, generator=generator)
    start = torch.randn(5, 8, generator=generator)
    counts = []
    for iterations in (2, 6):
        workspace = Workspace()
        # (Slots made before counting.)
        _diagonal_cg(start.clone(), torch.empty_like(start), eigenvalues, 0.5, 2, None, workspace)
        count, _ = _count_operators(
            lambda iterations=iterations, workspace=workspace: _diagonal_cg(
                start.clone(),
                torch.empty_like(start),
                eigenvalues,
                0.5,
                iterations,
                None,
                workspace,
            )
        )
        counts.append(count)
    assert counts[1] - counts[0] == 4 * 9


@pytest.mark.parametrize("tol", [None, 0.3])
@pytest.mark.parametrize("iterations", [1, 2, 4])
@pytest.mark.parametrize("delta_form", [False, True])
def test_general_cg_is_textbook_cg_on_every_row(iterations, delta_form, tol):
    """The dual CG on (a, c) coordinates, v = a·g + cŨᵀ: the same iterates as textbook CG
    on M = I/τθ + ŨŨᵀ row by row, from g (general form; a zero row included) or from
    start = s·δᵀ (δ form: a stays 0, ``start`` is never written); Σ‖r‖² is that of the
    true residuals."""
    from oracle import textbook_cg

    from proxoptim.dual import _general_cg

    generator = torch.Generator().manual_seed(11)
    rows, d, n, tau_prox = 3, 7, 5, 0.6
    patches = torch.randn(d, n, generator=generator, dtype=torch.float64)  # Ũ
    kernel = patches.T @ patches
    matrix = torch.eye(d, dtype=torch.float64) / tau_prox + patches @ patches.T

    def kernel_times(coefficients):
        return coefficients @ kernel

    if delta_form:
        start = torch.randn(rows, n, generator=generator, dtype=torch.float64)
        original = start.clone()
        grad = start @ patches.T
        coefficients, done, residual_sq, scales = _general_cg(
            None, None, kernel_times, tau_prox, iterations, tol, start=start
        )
        assert torch.equal(start, original)
        assert torch.equal(scales, torch.zeros(rows, 1, dtype=torch.float64))
    else:
        grad = torch.randn(rows, d, generator=generator, dtype=torch.float64)
        grad[1] = 0.0
        projected = grad @ patches
        gradient_sq = grad.square().sum(1, keepdim=True)
        coefficients, done, residual_sq, scales = _general_cg(
            projected, gradient_sq, kernel_times, tau_prox, iterations, tol
        )
    # A tolerance stops CG after the first iteration at which every row meets it.
    expected_done = iterations
    for k in range(1, iterations):
        textbook = torch.stack([textbook_cg(matrix, row, k) for row in grad])
        if tol and ((grad - textbook @ matrix).norm(dim=1) <= tol * grad.norm(dim=1)).all():
            expected_done = k
            break
    assert done == expected_done
    assert not (tol and iterations == 4) or done < iterations  # (the case is exercised)
    direction = scales * grad + coefficients @ patches.T
    if tol and done < iterations:
        row_residual = (grad - direction @ matrix).norm(dim=1)
        assert (row_residual <= tol * grad.norm(dim=1)).all()
    for row in range(rows):
        expected = textbook_cg(matrix, grad[row], done)
        if row == 1 and not delta_form:
            assert torch.equal(direction[row], torch.zeros(d, dtype=torch.float64))
        else:
            assert relative_error(direction[row], expected) <= 1e-10
    true_residual_sq = float((grad - direction @ matrix).square().sum())
    assert float(residual_sq) == pytest.approx(true_residual_sq, rel=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_probe_numbers_match_a_float64_reference(bias, dtype):
    """(‖δ̂‖², s, ‖ĝ − sδ̂‖, ‖ĝ‖) in float64 for two calls (one with a δ of three
    dimensions), ĝ = gω, δ̂ = Σ δᵀ(Xω_W + ω_b): equal to the float64 formulas; the
    verdict holds for .grad = s·δᵀŨᵀ and fails once weight decay is added to it."""
    from types import SimpleNamespace

    from proxoptim.dual import probe_numbers_for, probe_verdict

    generator = torch.Generator().manual_seed(3)
    rows, d_in = 5, 4

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    xs, deltas = [randn(6, d_in), randn(6, d_in)], [randn(6, rows), randn(2, 3, rows)]
    calls = [
        SimpleNamespace(x=x.to(dtype), output_grad=delta.to(dtype))
        for x, delta in zip(xs, deltas, strict=True)
    ]
    system = SimpleNamespace(layout=SimpleNamespace(rows=rows), calls=calls)
    flat = [delta.reshape(-1, rows) for delta in deltas]
    scale = 0.375
    grad_weight = scale * sum(delta.T @ x for delta, x in zip(flat, xs, strict=True))
    grad_bias = scale * sum(delta.sum(0) for delta in flat) if bias else None
    probe = randn(d_in + bias)
    weight_probe = probe[:d_in]
    bias_probe = probe[d_in] if bias else 0.0
    for decay in (0.0, 1e-3):
        weight = grad_weight + decay * randn(rows, d_in)
        probed_grad = weight @ weight_probe + (grad_bias * bias_probe if bias else 0.0)
        probed_delta = sum(
            delta.T @ (x @ weight_probe + bias_probe) for delta, x in zip(flat, xs, strict=True)
        )
        delta_sq = float(probed_delta @ probed_delta)
        fit = float(probed_grad @ probed_delta) / delta_sq
        expected = [
            delta_sq,
            fit,
            float((probed_grad - fit * probed_delta).norm()),
            float(probed_grad.norm()),
        ]
        numbers = probe_numbers_for(
            system,
            weight.to(dtype),
            None if grad_bias is None else grad_bias.to(dtype),
            probe.to(dtype),
        )
        assert numbers.dtype == torch.float64 and numbers.shape == (4,)
        verdict = probe_verdict(numbers.tolist(), dtype)
        if decay == 0.0:
            assert verdict == pytest.approx(scale, rel=1e-5 if dtype == torch.float32 else 1e-12)
            assert numbers[2] <= (1e-6 if dtype == torch.float32 else 1e-14) * numbers[3]
        else:
            assert verdict is None
            # (The mismatch to rounding of the working dtype relative to ‖ĝ‖.)
            tolerance = 1e-5 if dtype == torch.float32 else 1e-12
            got = numbers.tolist()
            assert got[:2] + got[3:] == pytest.approx(expected[:2] + expected[3:], rel=tolerance)
            assert abs(got[2] - expected[2]) <= tolerance * expected[3]


def test_probe_operators():
    """The δ probe of one call dispatches 13 operators with a bias, 11 without."""
    from types import SimpleNamespace

    from proxoptim.dual import probe_numbers_for

    x, delta = torch.randn(6, 4), torch.randn(6, 5)
    system = SimpleNamespace(
        layout=SimpleNamespace(rows=5), calls=[SimpleNamespace(x=x, output_grad=delta)]
    )
    grad_weight, grad_bias = delta.T @ x, delta.sum(0)
    with_bias, _ = _count_operators(
        lambda: probe_numbers_for(system, grad_weight, grad_bias, torch.randn(5))
    )
    without, _ = _count_operators(
        lambda: probe_numbers_for(system, grad_weight, None, torch.randn(4))
    )
    assert (with_bias, without) == (13 + 1, 11 + 1)  # (+ the probe's own randn)
