"""Batched CG, Cholesky and the cost rule on explicit SPD matrices."""

from __future__ import annotations

import pytest
import torch
from layer_cases import LAYER_CASES
from oracle import relative_error, textbook_cg

from proxoptim.costs import CPU, OPERATOR_CALLS, PATCH_CHUNK_CALLS
from proxoptim.operators import LayerSystem, RowLayout, kind_for
from proxoptim.plan import MAX_GRAM_ELEMENTS, choose_form, estimate_costs
from proxoptim.solvers import batched_cg, cholesky_solve_rows, primal_operator, shifted_gram


def random_problem(groups=2, rows=5, dim=7, columns=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    patches = torch.randn(groups, dim, columns, generator=generator, dtype=dtype)
    gram = patches @ patches.transpose(1, 2)
    rhs = torch.randn(groups, rows, dim, generator=generator, dtype=dtype)
    return gram, rhs


@pytest.mark.parametrize("iterations", [1, 2, 4, 7])
def test_batched_cg_equals_textbook_cg_row_by_row(iterations):
    tau_prox = 0.3
    gram, rhs = random_problem()
    result = batched_cg(primal_operator(gram, tau_prox), rhs, iterations)
    matrix = shifted_gram(gram, tau_prox)
    for group in range(rhs.shape[0]):
        for row in range(rhs.shape[1]):
            expected = textbook_cg(matrix[group], rhs[group, row], iterations)
            assert relative_error(result.direction[group, row], expected) <= 1e-10
    assert result.iterations == iterations
    true_residual = rhs - result.direction @ matrix
    assert (result.residual - true_residual).norm() <= 1e-10 * rhs.norm()


def test_zero_rows_stay_zero_without_nans():
    gram, rhs = random_problem()
    rhs[0, 2] = 0
    rhs[1] = 0
    result = batched_cg(primal_operator(gram, 1.0), rhs, 5)
    assert torch.isfinite(result.direction).all()
    assert torch.all(result.direction[0, 2] == 0) and torch.all(result.direction[1] == 0)


def test_converged_rows_stop_moving():
    # dim 3: CG converges in 3 iterations; more iterations must not produce 0/0.
    gram, rhs = random_problem(dim=3, columns=2)
    exact = cholesky_solve_rows(gram, rhs, 1.0).direction
    result = batched_cg(primal_operator(gram, 1.0), rhs, 10)
    assert torch.isfinite(result.direction).all()
    assert relative_error(result.direction, exact) <= 1e-10


def test_tolerance_stops_early_once_every_row_is_converged():
    gram, rhs = random_problem(dim=30, columns=90)
    result = batched_cg(primal_operator(gram, 1.0), rhs, 30, tol=1e-6)
    assert result.iterations < 30
    row_residual = result.residual.norm(dim=-1) / rhs.norm(dim=-1)
    assert row_residual.max() <= 1e-6
    loose = batched_cg(primal_operator(gram, 1.0), rhs, 30, tol=0.5)
    assert loose.iterations < result.iterations


@pytest.mark.parametrize("tol", [None, 1e-30])
@pytest.mark.parametrize("iterations", [1, 3])
def test_batched_cg_leaves_rhs_alone_and_skips_only_what_nobody_reads(iterations, tol):
    """CG starts from r₀ = p₀ = g read from ``rhs`` itself, so ``rhs`` must come back
    untouched; the last iteration skips ‖r‖², β and the direction update (a tolerance that
    is never met must not change that), and its residual is still the true g − vM."""
    tau_prox = 0.3
    gram, rhs = random_problem(seed=5)
    original = rhs.clone()
    result = batched_cg(primal_operator(gram, tau_prox), rhs, iterations, tol=tol)
    assert torch.equal(rhs, original)
    assert result.residual is not rhs and result.direction is not rhs
    assert result.iterations == iterations
    matrix = shifted_gram(gram, tau_prox)
    for group in range(rhs.shape[0]):
        for row in range(rhs.shape[1]):
            expected = textbook_cg(matrix[group], rhs[group, row], iterations)
            assert relative_error(result.direction[group, row], expected) <= 1e-10
    true_residual = rhs - result.direction @ matrix
    assert (result.residual - true_residual).norm() <= 1e-10 * rhs.norm()


def test_batched_cg_operators_per_iteration():
    """The product, two row inner products (two operators each), two step ratios (two
    each) and three updates: 12 operators a full iteration, 7 for the last one, 2 to start."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    gram, rhs = random_problem()
    apply_m = primal_operator(gram, 0.5)
    counts = []
    for iterations in (1, 2, 5):
        Count.calls = 0
        with Count():
            batched_cg(apply_m, rhs, iterations)
        counts.append(Count.calls)
    assert counts == [2 + 7, 2 + 12 + 7, 2 + 4 * 12 + 7]


@pytest.mark.parametrize("rows", [5, 30])  # triangular solves; the explicit inverse (m ≥ 2d)
def test_cholesky_equals_linalg_solve(rows):
    gram, rhs = random_problem(rows=rows, seed=3)
    result = cholesky_solve_rows(gram, rhs, 0.05)
    matrix = shifted_gram(gram, 0.05)
    for group in range(gram.shape[0]):
        expected = torch.linalg.solve(matrix[group], rhs[group].T).T
        assert relative_error(result.direction[group], expected) <= 1e-12
    assert result.residual.norm() <= 1e-10 * rhs.norm()


def test_cholesky_redoes_an_inaccurate_float32_solve_in_float64():
    # Rank-one Gram with a huge eigenvalue: G + I/τ is SPD but so ill-conditioned that a
    # float32 Cholesky solve is off by percent.
    vector = torch.ones(1, 40, 1, dtype=torch.float32)
    gram = vector @ vector.transpose(1, 2) * 1e9
    gram[0, 0, 1] += 1.0
    gram[0, 1, 0] += 1.0
    rhs = torch.randn(1, 3, 40)
    result = cholesky_solve_rows(gram, rhs, 1e-3)
    assert torch.isfinite(result.direction).all()
    expected = torch.linalg.solve(shifted_gram(gram.double(), 1e-3)[0], rhs[0].double().T).T
    assert relative_error(result.direction[0].double(), expected) <= 1e-5


def test_cholesky_in_float64_reads_nothing_back_and_names_a_failure_as_nan(monkeypatch):
    """A float64 exact solve never syncs: a group whose M is not numerically positive
    definite (two equal columns of 5, τθ = 1e16: I/τθ vanishes beside 25·[[1,1],[1,1]])
    gets a NaN direction for the optimizer's non-finite check; other groups solve."""
    good = torch.eye(2, dtype=torch.float64)
    singular = torch.full((2, 2), 25.0, dtype=torch.float64)
    gram = torch.stack([good, singular])
    rhs = torch.ones(2, 3, 2, dtype=torch.float64)
    monkeypatch.setattr(
        torch.Tensor, "__bool__", lambda self: pytest.fail("read back from the device")
    )
    result = cholesky_solve_rows(gram, rhs, 1e16, diagnostics=False)
    monkeypatch.undo()
    assert torch.isnan(result.direction[1]).all()
    assert torch.allclose(result.direction[0], rhs[0] / (1 + 1e-16))
    assert result.residual is None


def _system(module, batch, size=32):
    kind = kind_for(module)
    layout = RowLayout(module.weight.shape, kind.groups(module), module.bias is not None)
    x = torch.zeros(batch, *module_input_shape(module, size))
    return LayerSystem(layout, [(module, kind, x, None)], torch.float32)


def module_input_shape(module, size=32):
    if isinstance(module, torch.nn.Linear):
        return (module.in_features,)
    return (module.in_channels, size, size)


def test_cost_rule_picks_the_cheaper_form():
    # Wide Linear, big batch, many iterations: Gram (d² per iteration) is cheaper.
    wide = _system(torch.nn.Linear(64, 512), batch=4096)
    assert choose_form(wide, exact=False, cg_iters=10) == "primal"
    # Fan-in large, few rows, small batch: matrix-free products are cheaper.
    narrow = _system(torch.nn.Linear(3072, 16), batch=64)
    assert choose_form(narrow, exact=False, cg_iters=3) == "matrix_free"
    costs = estimate_costs(narrow, exact=False, cg_iters=3)
    assert costs.matrix_free < costs.primal
    # An exact solve needs the Gram or the kernel: the kernel when the batch is small.
    assert choose_form(narrow, exact=True, cg_iters=3) == "dual"
    assert choose_form(wide, exact=True, cg_iters=3) == "primal"
    # The paper's MLP layer at batch 500: n = 500 < d = 3073, the dual form.
    paper = _system(torch.nn.Linear(3072, 4000), batch=500)
    for exact, iterations in ((False, 3), (False, 10), (True, 3)):
        assert choose_form(paper, exact=exact, cg_iters=iterations) == "dual"
    # Grouped convolutions have no dual form; an explicit request wins wherever it applies.
    grouped = _system(torch.nn.Conv2d(16, 20, 5, padding=2, groups=4), batch=8)
    assert estimate_costs(grouped, exact=False, cg_iters=3).dual == float("inf")
    assert choose_form(grouped, exact=False, cg_iters=3, requested="dual") != "dual"
    # A deep convolution on a small image (ResNet-18's last stage on CIFAR-10: 1×1 outputs,
    # n = 128 columns, d = 4609): the n×n kernel of its patches is the cheap form.
    deep = _system(torch.nn.Conv2d(512, 512, 3, padding=1), batch=128, size=1)
    assert choose_form(deep, exact=False, cg_iters=3) == "dual"
    assert choose_form(deep, exact=True, cg_iters=3) == "dual"
    assert choose_form(wide, exact=False, cg_iters=10, requested="matrix_free") == "matrix_free"
    assert choose_form(wide, exact=False, cg_iters=10, requested="dual") == "dual"


def test_cost_rule_for_the_paper_cnn():
    """Stride-1 convolutions build their Gram from input correlations (proxoptim.conv_gram):
    at batch 500 that beats three matrix-free iterations on the paper CNN's first two
    layers and four or more on all three (measured on CPU: benchmarks/conv_gram_cost.py); a
    single iteration stays matrix-free on the widest one (docs/design.md quotes this)."""
    shapes = [(3, 16, 32), (16, 20, 16), (20, 20, 8)]
    for index, (in_channels, out_channels, size) in enumerate(shapes):
        module = torch.nn.Conv2d(in_channels, out_channels, 5, padding=2)
        conv = _system(module, batch=500, size=size)
        call = conv.calls[0]
        correlation = call.kind.correlation_gram_cost(call.module, call.raw)
        assert conv.gram_cost() == correlation  # cheaper than im2col
        assert choose_form(conv, exact=False, cg_iters=10) == "primal"
        assert choose_form(conv, exact=True, cg_iters=3) == "primal"
        if index < 2:
            assert choose_form(conv, exact=False, cg_iters=3) == "primal"
        else:  # 20 → 20 channels on 8×8: three product pairs beat its Gram, four do not
            assert choose_form(conv, exact=False, cg_iters=3) == "matrix_free"
            assert choose_form(conv, exact=False, cg_iters=4) == "primal"
    conv2 = _system(torch.nn.Conv2d(16, 20, 5, padding=2), batch=500, size=16)
    assert choose_form(conv2, exact=False, cg_iters=1) == "matrix_free"
    # A strided convolution has no correlation form: its Gram costs 2·n·d² plus im2col.
    strided = _system(torch.nn.Conv2d(16, 20, 5, stride=2, padding=2), batch=500, size=16)
    assert choose_form(strided, exact=False, cg_iters=3) == "matrix_free"


def test_cost_rule_never_builds_a_huge_gram_for_cg(monkeypatch):
    # d = 65 (with the bias): the cheapest form builds the 65 × 65 Gram, as long as it fits.
    wide = _system(torch.nn.Linear(64, 512), batch=4096)
    assert MAX_GRAM_ELEMENTS >= 65 * 65
    assert choose_form(wide, exact=False, cg_iters=10) == "primal"
    monkeypatch.setattr("proxoptim.plan.MAX_GRAM_ELEMENTS", 65 * 65)
    assert choose_form(wide, exact=False, cg_iters=10) == "primal"  # the limit is inclusive
    # One element less and neither the Gram nor the 4096 × 4096 kernel may be built.
    monkeypatch.setattr("proxoptim.plan.MAX_GRAM_ELEMENTS", 65 * 65 - 1)
    costs = estimate_costs(wide, exact=False, cg_iters=10)
    assert costs.primal == costs.dual == float("inf")
    assert choose_form(wide, exact=False, cg_iters=10) == "matrix_free"


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_cost_estimates_count_columns_rows_and_dims(case):
    module, sample = case.make()
    kind = kind_for(module)
    layout = RowLayout(module.weight.shape, kind.groups(module), module.bias is not None)
    system = LayerSystem(layout, [(module, kind, sample(3), None)], torch.float64)
    n, d, m = system.num_columns, layout.row_dim, layout.rows
    costs = estimate_costs(system, exact=False, cg_iters=2)
    conv = system.im2col
    assert conv == case.name.startswith("conv")
    slowdown = CPU.conv_product_slowdown if conv else 1.0
    # k = 2 iterations, two products each, plus the operators each form dispatches (on a CPU
    # one thread does both: the costs add).
    dispatch = {
        form: (base + 2 * per_iteration) * CPU.operator_call
        for form, (base, per_iteration) in OPERATOR_CALLS.items()
    }
    assert costs.matrix_free == pytest.approx(
        slowdown * 4 * 2 * n * d * m + dispatch["matrix_free"]
    )
    assert costs.primal == pytest.approx(
        system.gram_cost() + 2 * 2 * m * d * d + dispatch["primal"]
    )
    # The Gram is built the cheaper way; from patches it costs 2·n·d² per group plus the copy.
    groups, weight_dim = layout.groups, layout.weight_row_dim
    patches = 2 * groups * n * weight_dim**2
    if conv:
        patches += CPU.im2col_per_element * groups * n * weight_dim
        patches += CPU.operator_call * PATCH_CHUNK_CALLS
    correlation = kind.correlation_gram_cost(module, system.calls[0].raw)
    assert system.gram_cost() == pytest.approx(min(patches, correlation))
    strided = conv and any(stride != 1 for stride in module.stride)
    assert (correlation == float("inf")) == (strided or not conv)
