"""Bad numbers and failures at every stage never corrupt the model or the optimizer."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from oracle import Recorder
from torch import nn

from proxoptim import ProxPropOptimizer


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(10, 6, generator=generator), torch.randint(0, 3, (10,), generator=generator)


def trained(optimizer=torch.optim.Adam, **kwargs):
    """A model and a ProxProp(Adam) after two steps, with a third backward done."""
    model = make_model()
    opt = ProxPropOptimizer(model, optimizer, lr=1e-2, **kwargs)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if _ < 2:
            opt.step()
    return model, opt


def snapshot(model, opt):
    return (
        copy.deepcopy(model.state_dict()),
        {name: p.grad.clone() for name, p in model.named_parameters()},
        copy.deepcopy(opt.state_dict()),
    )


def assert_unchanged(model, opt, before):
    params, grads, state = before
    for name, value in model.state_dict().items():
        assert torch.equal(value, params[name]), name
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]) or (
            torch.isnan(p.grad).any() and torch.equal(p.grad.isnan(), grads[name].isnan())
        ), name
    assert str(opt.state_dict()) == str(state)


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        (lambda m: m[0].weight.grad.__setitem__((0, 0), float("nan")), "gradient of '0.weight'"),
        (lambda m: m[2].bias.grad.__setitem__(0, float("inf")), "gradient of '2.bias'"),
        (lambda m: m[4].weight.grad.__setitem__((0, 0), float("nan")), "gradient of '4.weight'"),
    ],
)
def test_nonfinite_gradients_raise_and_change_nothing(poison, message):
    model, opt = trained()
    poison(model)
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=message):
        opt.step()
    assert_unchanged(model, opt, before)


def test_nonfinite_captured_input_is_named():
    model = make_model()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch()
    hidden = torch.tanh(model[0](x)).detach()
    hidden[0, 0] = float("nan")
    out = model[4](torch.tanh(model[2](hidden)))
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    for p in model.parameters():  # keep every gradient finite: only the input is bad
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0)
    with pytest.raises(FloatingPointError, match="captured input of layer '2'"):
        opt.step()


def test_nonfinite_solve_is_named():
    model = make_model()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, tau_prox=1e300, solver="exact")
    model.double()
    x, y = batch()
    (nn.functional.cross_entropy(model(x.double() * 1e200), y) * 1e300).backward()
    for p in model.parameters():
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    with pytest.raises(FloatingPointError, match="produced a non-finite direction"):
        opt.step()


def singular_dual_step(nonfinite):
    """A model whose first layer's exact dual solve meets a kernel that is not positive
    definite in float64, one Adam step into training, its backward done: two equal samples
    x = (3, 4) make K = XXᵀ = 25·[[1, 1], [1, 1]] singular, and τθ = 1e16 puts I/τθ below
    half an ulp of 25, so I/τθ + K rounds to K itself. Every operation of its Cholesky
    factorisation is exact (√25 = 5, 25/5, 25 − 5·5), so the last pivot is exactly 0 on any
    LAPACK: an honest input, no mocked factorisation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3, bias=False), nn.Tanh(), nn.Linear(3, 2)).double()
    opt = ProxPropOptimizer(
        model,
        torch.optim.Adam,
        lr=1e-2,
        tau_prox=1e16,
        solver="exact",
        solver_form="dual",
        nonfinite=nonfinite,
    )
    y = torch.tensor([0, 1])
    distinct = torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=torch.float64)
    nn.functional.cross_entropy(model(distinct), y).backward()
    opt.step()  # a regular step, so that there is optimizer state to keep
    assert opt.last_stats["0"].form == "dual"
    opt.zero_grad()
    equal = torch.tensor([[3.0, 4.0], [3.0, 4.0]], dtype=torch.float64)
    shifted = equal @ equal.T + torch.eye(2, dtype=torch.float64) / opt.tau_prox
    assert int(torch.linalg.cholesky_ex(shifted).info) != 0  # the path under test
    nn.functional.cross_entropy(model(equal), y).backward()
    return model, opt


def test_exact_dual_solve_that_is_not_positive_definite_in_float64_is_named():
    model, opt = singular_dual_step("raise")
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="solve for layer '0' produced a non-finite"):
        opt.step()
    assert_unchanged(model, opt, before)


def test_exact_dual_solve_that_is_not_positive_definite_in_float64_is_skipped():
    model, opt = singular_dual_step("skip")
    before = snapshot(model, opt)
    with pytest.warns(UserWarning, match="solve for layer '0' produced a non-finite.*skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_stats == {}
    assert_unchanged(model, opt, before)


def test_skip_policy_warns_counts_and_keeps_training():
    model, opt = trained(nonfinite="skip")
    model[0].weight.grad[0, 0] = float("nan")
    before = snapshot(model, opt)
    with pytest.warns(UserWarning, match="step skipped"):
        opt.step()
    assert opt.skipped_steps == 1 and opt.last_stats == {}
    assert_unchanged(model, opt, before)
    x, y = batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.skipped_steps == 1 and set(opt.last_stats) == {"0", "2"}


def test_bad_nonfinite_policy():
    with pytest.raises(ValueError, match="nonfinite"):
        ProxPropOptimizer(make_model(), torch.optim.SGD, lr=0.1, nonfinite="ignore")


@pytest.mark.parametrize(
    "stage",
    [
        "proxoptim.pipeline.LayerSystem",  # reading the captured inputs
        "proxoptim.pipeline.signature_of",  # finding the layer's plan
        "proxoptim.pipeline.solve",  # the solve
        "proxoptim.pipeline.layer_stats",  # the stats
    ],
)
def test_failure_at_each_stage_leaves_everything_as_it_was(monkeypatch, stage):
    model, opt = trained()
    before = snapshot(model, opt)

    def broken(*args, **kwargs):
        raise RuntimeError(f"{stage} failed")

    monkeypatch.setattr(stage, broken)
    with pytest.raises(RuntimeError, match="failed"):
        opt.step()
    assert_unchanged(model, opt, before)
    monkeypatch.undo()
    opt.step()  # the captured inputs survived: the step can be retried
    assert set(opt.last_stats) == {"0", "2"}


def test_failing_inner_step_puts_the_gradients_back(monkeypatch):
    model, opt = trained()
    before = snapshot(model, opt)

    def explode(closure=None):
        raise RuntimeError("inner failed")

    monkeypatch.setattr(opt.inner, "step", explode)
    with pytest.raises(RuntimeError, match="inner failed"):
        opt.step()
    assert_unchanged(model, opt, before)


def test_captured_tensors_are_released_after_step():
    model = make_model()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch()
    x = x.clone()
    reference = weakref.ref(x)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    del x
    gc.collect()
    assert reference() is None


def test_captured_tensors_are_released_before_the_inner_step():
    """The inner step is a training step's memory peak: the inputs and output gradients
    ProxProp captured must not be alive during it."""
    alive_during_step = []

    class Checking(torch.optim.SGD):
        def step(self, closure=None):
            gc.collect()
            alive_during_step.append(reference() is not None)
            return super().step(closure)

    model = make_model()
    opt = ProxPropOptimizer(model, Checking, lr=0.1)
    x, y = batch()
    x = x.clone()
    reference = weakref.ref(x)
    nn.functional.cross_entropy(model(x), y).backward()
    del x
    opt.step()
    assert alive_during_step == [False]
    assert set(opt.last_stats) == {"0", "2"}


def test_zero_grad_between_forward_and_backward_still_counts_the_call():
    model = make_model()
    opt = ProxPropOptimizer(model, Recorder)
    x, y = batch()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()  # clears earlier captures; this forward is confirmed by its backward
    loss.backward()
    opt.step()
    assert opt.last_stats["0"].columns == 10


def test_load_state_dict_with_a_state_tensor_of_the_wrong_shape_keeps_the_old_state():
    """torch.optim would load it silently and fail (or broadcast) at a later step."""
    model, opt = trained()
    good = copy.deepcopy(opt.state_dict())
    # The state of the last parameter ('4.bias', (3,)): every earlier entry is fine.
    last = max(good["state"])
    bad = copy.deepcopy(good)
    bad["state"][last]["exp_avg_sq"] = torch.zeros(4)
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of '4.bias' has shape \(4,\)"):
        opt.load_state_dict(bad)
    assert_same_state(opt.state_dict(), good)
    opt.step()  # still usable, with the state it had


def assert_same_state(actual, expected):
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for key, entries in expected["state"].items():
        assert actual["state"][key].keys() == entries.keys()
        for name, value in entries.items():
            assert torch.equal(actual["state"][key][name], value), (key, name)


def test_load_state_dict_mismatch_raises_value_error_and_keeps_the_optimizer():
    model, opt = trained()
    good = copy.deepcopy(opt.state_dict())
    other = ProxPropOptimizer(nn.Sequential(nn.Linear(6, 3)), torch.optim.Adam, lr=1e-2)
    with pytest.raises(ValueError, match="parameter group"):
        opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict("not a dict")
    assert str(opt.state_dict()) == str(good)
    opt.step()  # still usable
    opt.load_state_dict(good)


def test_one_finiteness_check_serves_a_finite_step(monkeypatch):
    """The step's finiteness check is one fused read of the largest magnitudes: the
    per-tensor culprit search runs only when it fails."""
    import proxoptim.checks as checks_module

    model = make_model()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    searched = []
    monkeypatch.setattr(checks_module, "finite", lambda tensor: searched.append(tensor))
    opt.step()
    assert searched == []
    assert set(opt.last_stats) == {"0", "2"}


def test_the_fused_check_sees_every_nan_and_inf_in_any_dtype():
    """A NaN or inf anywhere, in any dtype, fails the fused check; finite tensors of every
    dtype pass it."""
    from proxoptim.checks import all_finite

    parts = [
        torch.randn(4, 4),
        torch.randn(3, dtype=torch.float64),
        torch.randn(5).half(),
        torch.empty(0),
    ]
    assert all_finite(parts)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for bad in (math.nan, math.inf, -math.inf):
            poisoned = torch.zeros(6, dtype=dtype)
            poisoned[4] = bad
            assert not all_finite([*parts, poisoned]), (dtype, bad)


def test_finite_values_whose_norm_overflows_pass_after_the_culprit_search():
    """float32 elements of 1e30 overflow a 2-norm: the fused check reads that as non-finite,
    the per-tensor search finds every element finite, and the step is not refused."""
    model = make_model()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.0, solver="none", nonfinite="raise")
    x, y = batch()
    nn.functional.cross_entropy(model(x), y).backward()
    for param in model.parameters():
        param.grad.fill_(1e30)
    assert torch.isinf(model[0].weight.grad.norm())
    opt.step()  # no FloatingPointError
    assert opt.skipped_steps == 0
