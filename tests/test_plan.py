"""Plans (proxoptim.plan): the cost model runs once per layer signature, a changed
signature re-plans and still solves exactly, and the cache stays bounded."""

from __future__ import annotations

import pytest
import torch
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn

import proxoptim.plan as plan_module
from proxoptim import ProxPropOptimizer
from proxoptim.graphs import EagerRunner
from proxoptim.plan import PLANS_PER_LAYER, PlanCache


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
