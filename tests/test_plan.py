"""Plans (proxoptim.plan): the cost model runs once per layer signature, a changed
signature re-plans and still solves exactly, and the cache stays bounded; and the cost
model's rule for each form."""

from __future__ import annotations

import pytest
import torch
from layer_cases import LAYER_CASES
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn

import proxoptim.plan as plan_module
from proxoptim import ProxPropOptimizer
from proxoptim.costs import CPU, OPERATOR_CALLS, PATCH_CHUNK_CALLS
from proxoptim.graphs import EagerRunner
from proxoptim.operators import LayerSystem, RowLayout, kind_for
from proxoptim.plan import (
    MAX_GRAM_ELEMENTS,
    PLANS_PER_LAYER,
    PlanCache,
    choose_form,
    estimate_costs,
)


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    ).to(dtype)


def step(opt, model, batch_size, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 5, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (batch_size,), generator=generator)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return x, gradients


def hidden_inputs(model, x):
    """Each hidden Linear layer's input for batch x: {index: input}."""
    with torch.no_grad():
        first = x
        second = torch.tanh(model[0](x))
    return {0: first, 2: second}


def assert_exact(model, opt, x, gradients, tau_prox):
    """Every hidden layer's direction equals the dense oracle's M⁻¹g (float64)."""
    inputs = hidden_inputs(model, x)
    seen = opt.inner.seen[-1]
    for index, layer_input in inputs.items():
        module = model[index]
        bias_grad = gradients[f"{index}.bias"] if module.bias.requires_grad else None
        grad = flatten_pair(gradients[f"{index}.weight"], bias_grad)
        reference = module
        if bias_grad is None:  # M without the bias columns: the same layer without a bias
            reference = nn.Linear(module.in_features, module.out_features, bias=False)
            reference = reference.to(module.weight.dtype)
            reference.weight.data.copy_(module.weight)
        expected = oracle_direction(reference, [layer_input], grad, tau_prox, None)
        bias_seen = seen[module.bias] if module.bias.requires_grad else None
        assert relative_error(flatten_pair(seen[module.weight], bias_seen), expected) <= 1e-10


def counting_choose_form(monkeypatch):
    calls = []
    real = plan_module.choose_form

    def counting(*args, **kwargs):
        calls.append(args[0].num_columns)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "choose_form", counting)
    return calls


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_the_cost_model_runs_once_per_signature(monkeypatch, solver):
    calls = counting_choose_form(monkeypatch)
    model = mlp()
    opt = ProxPropOptimizer(model, Recorder, solver=solver, tau_prox=0.5)
    for seed in range(5):
        step(opt, model, 8, seed)
    # Two hidden layers, each priced with δ unknown and with δ known, on the first step only.
    assert len(calls) == 4
    assert opt.plans_made == 2
    forms = {name: plan.form for name, plan in opt.plans.items()}
    assert set(forms) == {"0", "2"}
    assert all(stats.form in ("primal", "dual") for stats in opt.last_stats.values())


def test_a_smaller_last_batch_re_plans_and_stays_exact(monkeypatch):
    calls = counting_choose_form(monkeypatch)
    model = mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="exact", tau_prox=0.5)
    step(opt, model, 8, 0)
    x, gradients = step(opt, model, 3, 1)  # an epoch's last, smaller batch
    assert opt.plans_made == 4
    assert sorted(set(calls)) == [3, 8]
    assert_exact(model, opt, x, gradients, 0.5)
    assert all(stats.columns == 3 for stats in opt.last_stats.values())
    x, gradients = step(opt, model, 8, 2)  # back to the full batch: its plan is reused
    assert opt.plans_made == 4
    assert_exact(model, opt, x, gradients, 0.5)


def test_model_double_re_plans_in_float64():
    model = mlp(torch.float32)
    opt = ProxPropOptimizer(model, Recorder, solver="exact", tau_prox=0.5)
    step(opt, model, 8, 0, torch.float32)
    assert {plan.dtype for plan in opt.plans.values()} == {torch.float32}
    model.double()
    x, gradients = step(opt, model, 8, 1)
    assert {plan.dtype for plan in opt.plans.values()} == {torch.float64}
    assert_exact(model, opt, x, gradients, 0.5)


def test_a_bias_frozen_mid_training_re_plans_without_it():
    model = mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="exact", tau_prox=0.5)
    step(opt, model, 8, 0)
    assert opt.plans["0"].layout.has_bias
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None
    x, gradients = step(opt, model, 8, 1)
    assert not opt.plans["0"].layout.has_bias
    assert opt.plans["2"].layout.has_bias
    assert_exact(model, opt, x, gradients, 0.5)


def test_a_thousand_batch_shapes_keep_a_bounded_cache():
    """Plans (and graph entries) are bounded per layer: memory does not grow with the
    number of distinct batch shapes."""
    model = mlp()
    opt = ProxPropOptimizer(
        model, Recorder, solver="cg", tau_prox=0.5, cuda_graphs=EagerRunner(), probe="never"
    )
    opt.inner.seen = _Discard()  # the recorder would keep every step's gradients
    for size in range(1, 1001):
        step(opt, model, size, size)
        step(opt, model, size, size)  # the second sighting captures the solve's graph
    assert opt.plans_made == 2000
    assert opt.plans_cached == 2 * PLANS_PER_LAYER
    # One graph per kept plan (general form, probe="never"): dropped with its plan.
    assert opt.captured_graphs == 2 * PLANS_PER_LAYER
    x, gradients = step(opt, model, 1000, 1000)  # a recent shape: replayed, no new plan
    assert opt.plans_made == 2000


class _Discard(list):
    def append(self, item):
        pass


def test_plan_cache_drops_the_least_recently_used_signature():
    cache = PlanCache(per_layer=2)
    plans = [_FakePlan(layer=0, key=key) for key in "abc"]
    cache.add(plans[0])
    cache.add(plans[1])
    assert cache.get(plans[0].signature) is plans[0]  # now a is the most recent
    cache.add(plans[2])
    assert cache.get(plans[1].signature) is None
    assert cache.get(plans[0].signature) is plans[0]
    assert len(cache) == 2 and cache.made == 3
    assert cache.latest(0) is plans[0]


class _FakeSignature:
    def __init__(self, layer, key):
        self.layer, self.key = layer, key

    def __hash__(self):
        return hash((self.layer, self.key))

    def __eq__(self, other):
        return (self.layer, self.key) == (other.layer, other.key)


class _FakePlan:
    def __init__(self, layer, key):
        self.signature = _FakeSignature(layer, key)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probe": "sometimes"}, "unknown probe policy"),
        ({"dual_basis": "fourier"}, "unknown dual_basis"),
        ({"max_gram_elements": 0}, "max_gram_elements must be None or an integer >= 1"),
        ({"max_gram_elements": 1.5}, "max_gram_elements must be None or an integer >= 1"),
        ({"device_costs": "cpu"}, "device_costs must be None or a proxoptim.costs.DeviceCosts"),
    ],
)
def test_plan_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProxPropOptimizer(mlp(), torch.optim.SGD, lr=0.1, **kwargs)


def test_probe_never_solves_the_general_form():
    model = mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="exact", solver_form="dual", probe="never")
    x, gradients = step(opt, model, 8, 0)
    assert all(not plan.probe for plan in opt.plans.values())
    assert all(stats.output_grad_scale is None for stats in opt.last_stats.values())
    assert_exact(model, opt, x, gradients, 1.0)


# -- the cost model ----------------------------------------------------------------------


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


def test_max_gram_elements_and_device_costs_reach_the_plan():
    """A Gram limit below a layer's Gram rules the primal form out of its plan, and a
    cost table passed in prices the forms instead of the device's own."""
    import dataclasses

    model = mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="cg", solver_form="primal", max_gram_elements=8)
    step(opt, model, 8, 0)
    assert all(plan.form != "primal" for plan in opt.plans.values())
    # A table on which every operator costs an eternity: the form with the fewest
    # operators wins (primal CG: 12 + 12 per iteration, against matrix-free's 8 + 24 and
    # the general dual form's 29 + 34; benchmarks/form_operators.py).
    table = dataclasses.replace(CPU, operator_call=1e15)
    model = mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="cg", device_costs=table, probe="never")
    step(opt, model, 8, 0)
    assert {plan.form for plan in opt.plans.values()} == {"primal"}
