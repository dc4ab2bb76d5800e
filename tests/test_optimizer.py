"""ProxPropOptimizer as a torch.optim.Optimizer: construction, step semantics, integration."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from proxoptim import LayerStats, ProxPropOptimizer


def make_mlp(seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(dtype)


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def batch(seed: int, n: int = 10, shape=(6,), dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *shape, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=generator)
    return x, y


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def train(model, opt, steps: int, shape=(6,), dtype=torch.float64, start: int = 0):
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, shape=shape, dtype=dtype)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- construction


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau_prox": 0.0}, "tau_prox"),
        ({"tau_prox": -1.0}, "tau_prox"),
        ({"tau_prox": float("nan")}, "tau_prox"),
        ({"cg_iters": 0}, "cg_iters"),
        ({"cg_iters": 2.5}, "cg_iters"),
        ({"cg_tol": -1.0}, "cg_tol"),
        ({"solver": "newton"}, "solver"),
        ({"solver_form": "dense"}, "solver_form"),
        ({"solver": "exact", "solver_form": "matrix_free"}, "primal"),
        ({"exclude": ["decoder"]}, "named_modules"),
        ({"exclude": ["0.weight"]}, "named_modules"),
        ({"exclude": [nn.Linear(2, 2)]}, "not part of the model"),
        ({"exclude": [3]}, "module names"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    model = make_mlp()
    with pytest.raises(ValueError, match=message):
        ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, **kwargs)
    # Nothing was left attached: a valid optimizer can still be built on the model.
    ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)


def test_model_must_be_a_module():
    model = make_mlp()
    with pytest.raises(ValueError, match="nn.Module"):
        ProxPropOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)


def test_optimizer_must_be_an_optimizer_class_or_instance():
    model = make_mlp()
    with pytest.raises(ValueError, match="torch.optim.Adam"):
        ProxPropOptimizer(model, "adam")
    with pytest.raises(ValueError, match="class"):
        ProxPropOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), lr=0.2)
    with pytest.raises(ValueError, match="LBFGS"):
        ProxPropOptimizer(model, torch.optim.LBFGS)


def test_exclude_name_suggests_close_names():
    model = make_mlp()
    with pytest.raises(ValueError, match=r"did you mean"):
        ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, exclude=["4.weight"])


def test_is_a_torch_optimizer_sharing_the_inner_containers():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.Adam, lr=1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt.inner, torch.optim.Adam)
    assert opt.param_groups is opt.inner.param_groups
    assert opt.state is opt.inner.state
    assert opt.defaults is opt.inner.defaults
    assert opt.param_groups[0]["lr"] == 1e-3
    assert opt.layer_names == ["0", "2", "4"]
    assert "tau_prox=1.0" in repr(opt)


# ----------------------------------------------------------------------------- plain steps


@pytest.mark.parametrize(
    ("optimizer", "kwargs"),
    [
        (torch.optim.Adam, {"lr": 1e-2}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ],
)
def test_solver_none_reproduces_inner_optimizer_bit_for_bit(optimizer, kwargs):
    reference = make_cnn()
    proxprop = copy.deepcopy(reference)
    train(
        reference,
        optimizer(reference.parameters(), **kwargs),
        5,
        shape=(2, 8, 8),
        dtype=torch.float32,
    )
    opt = ProxPropOptimizer(proxprop, optimizer, solver="none", **kwargs)
    train(proxprop, opt, 5, shape=(2, 8, 8), dtype=torch.float32)
    for expected, actual in zip(
        reference.state_dict().values(), proxprop.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual)
    assert opt.last_stats == {}


def test_at_a_large_step_proxprop_converges_where_backprop_oscillates():
    """SGD with lr = 1 and momentum 0.9 on one fixed batch for 40 steps: the step is too
    large for backprop, whose loss jumps above where it started (to 4.2 from 1.17) and ends
    near 0.8; ProxProp's never rises above its start and ends near 0.01. Stability at a
    large step (the paper's claim), not wall-clock speed, which the benchmarks measure."""
    x, _ = batch(0, n=64)
    y = (x[:, :3] - x[:, 3:]).argmax(1)
    losses = {}
    for solver in ("none", "cg"):
        model = make_mlp()
        opt = ProxPropOptimizer(
            model,
            torch.optim.SGD,
            lr=1.0,
            momentum=0.9,
            tau_prox=0.5,
            solver=solver,
            diagnostics=True,
        )
        losses[solver] = train_on(model, opt, x, y, steps=40)
    backprop, proxprop = losses["none"], losses["cg"]
    assert max(backprop) > 2 * backprop[0] and backprop[-1] > 0.5
    assert max(proxprop) <= proxprop[0] and proxprop[-1] < 0.05
    assert set(opt.last_stats) == {"0", "2"}  # "4" is the output layer
    for stats in opt.last_stats.values():
        assert isinstance(stats, LayerStats)
        assert stats.iterations == 3 and stats.form in ("matrix_free", "primal")
        assert 0 < stats.cosine <= 1 and 0 <= stats.relative_residual < 1
        assert stats.seconds >= 0 and stats.columns == 64


def train_on(model, opt, x, y, steps):
    """The loss before each of ``steps`` steps on one batch, and after the last."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_of(model, x, y).item())
    return losses


def test_grad_after_step_is_the_backward_gradient():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_output_layer_keeps_its_gradient_unless_asked():
    for exclude_last, expect_preconditioned in ((True, {"0", "2"}), (False, {"0", "2", "4"})):
        model = make_mlp()
        opt = ProxPropOptimizer(model, Recorder, exclude_last=exclude_last)
        x, y = batch(0)
        loss_of(model, x, y).backward()
        opt.step()
        seen = opt.inner.seen[-1]
        assert set(opt.last_stats) == expect_preconditioned
        for name, module in model.named_children():
            if isinstance(module, nn.Linear):
                unchanged = torch.equal(seen[module.weight], module.weight.grad)
                assert unchanged == (name not in expect_preconditioned), name


def test_output_layer_is_the_one_that_ran_last_not_the_last_registered():
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.body = nn.Linear(6, 8)

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model = Reordered().double()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    opt.step()
    assert set(opt.last_stats) == {"body"}


def test_exclude_by_name_container_and_object():
    model = nn.Sequential(make_mlp(), nn.Sequential(nn.ReLU(), nn.Linear(3, 3).double()))
    x, y = batch(0)
    for exclude, expected in (
        (["0.0"], {"0.2", "0.4"}),
        (["0"], set()),
        ([model[0][2]], {"0.0", "0.4"}),
        ("0.4", {"0.0", "0.2"}),
    ):
        opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.0, exclude=exclude)
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
        assert set(opt.last_stats) == expected, exclude
        opt.remove_hooks()


def test_instance_optimizer_with_parameters_outside_the_model():
    model = make_mlp()
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    inner = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    opt = ProxPropOptimizer(model, inner)
    assert opt.inner is inner
    x, y = batch(0)
    (loss_of(model, x, y) + (extra**2).sum()).backward()
    opt.step()
    assert torch.allclose(extra.detach(), torch.full((3,), 0.8, dtype=torch.float64))
    assert set(opt.last_stats) == {"0", "2"}


def test_layers_the_inner_optimizer_does_not_step_are_left_alone():
    model = make_mlp()
    inner = torch.optim.SGD(model[4].parameters(), lr=0.1)  # only the head
    opt = ProxPropOptimizer(model, inner, exclude_last=False)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    before = model[0].weight.detach().clone()
    opt.step()
    assert set(opt.last_stats) == {"4"}
    assert torch.equal(model[0].weight, before)


def test_frozen_layers_and_frozen_bias():
    model = make_mlp()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    opt = ProxPropOptimizer(model, Recorder, exclude_last=False)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    opt.step()
    assert set(opt.last_stats) == {"2", "4"}
    # Layer "2" without its bias: rows are W_j only, d = 8.
    assert model[2].bias not in opt.inner.seen[-1]


def test_non_supported_modules_pass_through():
    model = make_cnn()
    opt = ProxPropOptimizer(model, Recorder)
    x, y = batch(0, shape=(2, 8, 8), dtype=torch.float32)
    loss_of(model, x, y).backward()
    opt.step()
    seen = opt.inner.seen[-1]
    assert torch.equal(seen[model[1].weight], model[1].weight.grad)  # BatchNorm
    assert not torch.equal(seen[model[0].weight], model[0].weight.grad)
    assert set(opt.last_stats) == {"0", "3"}


def test_layernorm_and_embedding_pass_through_to_the_inner_optimizer():
    """Their update is the plain inner optimizer's, bit for bit; the Linear layers around
    them are preconditioned. (SGD, whose update is linear in the gradient: Adam's would
    hide a gradient changed by a common factor.)"""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(7, 6), nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 7, (10,), generator=generator)
    y = torch.randint(0, 3, (10,), generator=generator)
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, momentum=0.9)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for net, optimizer in ((model, opt), (reference, plain)):
        loss_of(net, tokens, y).backward()
        optimizer.step()
    assert set(opt.last_stats) == {"1"}  # "4" is the output layer
    for name in ("0.weight", "2.weight", "2.bias"):
        assert torch.equal(model.get_parameter(name), reference.get_parameter(name)), name
    assert not torch.equal(model[1].weight, reference[1].weight)


def test_subclass_overriding_forward_is_not_preconditioned():
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * self.weight.norm()

    model = nn.Sequential(Scaled(4, 4), nn.Linear(4, 2))
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    assert opt.layer_names == ["1"]


# ----------------------------------------------------------------------------- capture rules


def direction_after(model, opt, forwards, backward_of):
    """Runs ``forwards`` (callables returning outputs), backward of ``backward_of`` of them."""
    outputs = [forward() for forward in forwards]
    loss = sum(nn.functional.cross_entropy(outputs[i], batch(i)[1]) for i in backward_of)
    loss.backward()
    opt.step()
    return {
        name: opt.inner.seen[-1][m.weight]
        for name, m in model.named_children()
        if isinstance(m, nn.Linear)
    }


def assert_same_directions(first, second):
    for name in first:
        assert relative_error(first[name], second[name]) <= 1e-12, name


def test_forward_under_no_grad_is_ignored():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    plain = direction_after(model, opt, [lambda: model(batch(0)[0])], [0])
    opt.zero_grad()
    with torch.no_grad():
        model(batch(5)[0])
    extra = direction_after(model, opt, [lambda: model(batch(0)[0])], [0])
    assert_same_directions(plain, extra)


def test_forward_that_never_met_backward_is_ignored():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    plain = direction_after(model, opt, [lambda: model(batch(0)[0])], [0])
    opt.zero_grad()
    extra = direction_after(
        model, opt, [lambda: model(batch(0)[0]), lambda: model(batch(1)[0])], [0]
    )
    assert_same_directions(plain, extra)


def test_eval_mode_forward_with_grad_still_counts():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    train_mode = direction_after(model, opt, [lambda: model(batch(0)[0])], [0])
    opt.zero_grad()
    model.eval()
    eval_mode = direction_after(model, opt, [lambda: model(batch(0)[0])], [0])
    assert_same_directions(train_mode, eval_mode)
    assert opt.last_stats["0"].columns == 10


def test_two_micro_batches_equal_one_batch():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    x, y = batch(0, n=12)
    nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.step()
    whole = dict(opt.inner.seen[-1])
    opt.zero_grad()
    for part in (slice(0, 5), slice(5, 12)):
        nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum").backward()
    opt.step()
    split = opt.inner.seen[-1]
    assert opt.last_stats["0"].columns == 12
    for param in whole:
        assert relative_error(split[param], whole[param]) <= 1e-12


def test_backward_twice_over_one_graph_counts_each_call_once():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    loss = loss_of(model, *batch(0))
    loss.backward(retain_graph=True)
    loss.backward()
    opt.step()
    assert opt.last_stats["0"].columns == 10


def test_shared_module_called_twice_counts_both_calls():
    torch.manual_seed(0)
    shared = nn.Linear(6, 6).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 3).double())
    opt = ProxPropOptimizer(model, Recorder)
    assert opt.layer_names == ["0", "4"]
    loss_of(model, *batch(0)).backward()
    opt.step()
    assert opt.last_stats["0"].columns == 20


def test_tied_weights_across_modules_are_one_layer():
    torch.manual_seed(0)
    first, second = nn.Linear(6, 6).double(), nn.Linear(6, 6).double()
    second.weight, second.bias = first.weight, first.bias
    model = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(6, 3).double())
    opt = ProxPropOptimizer(model, Recorder)
    assert opt.layer_names == ["0", "4"]
    loss_of(model, *batch(0)).backward()
    opt.step()
    assert opt.last_stats["0"].columns == 20


def test_zero_grad_and_step_clear_the_capture():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    loss_of(model, *batch(0)).backward()
    opt.zero_grad()
    assert opt.captured_calls == 0
    loss_of(model, *batch(0)).backward()
    opt.step()
    assert opt.captured_calls == 0
    assert opt.last_stats["0"].columns == 10


def test_step_without_captured_input_warns_once_and_uses_gradient():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    with torch.no_grad():
        out = model(batch(0)[0])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="no captured input"):
        opt.step()
    assert opt.last_stats == {}
    assert torch.equal(opt.inner.seen[-1][model[0].weight], model[0].weight.grad)
    del out


# ----------------------------------------------------------------------------- torch.optim API


def test_lr_scheduler_drives_the_inner_learning_rate():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=1.0, tau_prox=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected_lr in (1.0, 0.5, 0.25):
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr)
        before = model[0].weight.detach().clone()
        opt.zero_grad()
        loss_of(model, *batch(0)).backward()
        opt.step()
        scheduler.step()
        moved = (before - model[0].weight.detach()).norm()
        assert moved > 0
    assert scheduler.get_last_lr()[0] == pytest.approx(0.125)


def test_closure_is_evaluated_and_its_loss_returned():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [1] and torch.is_tensor(loss)
    assert set(opt.last_stats) == {"0", "2"}


def test_state_dict_round_trip_continues_identically():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.Adam, lr=1e-2, tau_prox=0.5)
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt.keys() == opt.inner.state_dict().keys()
    train(model, opt, 3, start=3)

    resumed = make_mlp(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = ProxPropOptimizer(resumed, torch.optim.Adam, lr=1e-2, tau_prox=0.5)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.state is resumed_opt.inner.state
    for step in range(3, 6):
        x, y = batch(step)
        resumed_opt.zero_grad()
        loss_of(resumed, x, y).backward()
        resumed_opt.step()
    for expected, actual in zip(
        model.state_dict().values(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(expected, actual)


def test_grad_scaler_step_gives_the_unscaled_direction():
    model = make_mlp(dtype=torch.float32)
    reference = copy.deepcopy(model)
    x, y = batch(0, dtype=torch.float32)

    opt = ProxPropOptimizer(reference, Recorder)
    loss_of(reference, x, y).backward()
    opt.step()
    expected = opt.inner.seen[-1][reference[0].weight]

    scaled_opt = ProxPropOptimizer(model, Recorder)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_of(model, x, y)).backward()
    scaler.step(scaled_opt)
    scaler.update()
    # A power-of-two scale makes scaling and unscaling exact: the same float32 solve of the
    # same gradient (measured: identical). 1e-5 leaves a few ulps (u32 = 6e-8) times
    # κ(M) ≤ 71 for a BLAS kernel summing in another order; a direction solved for the
    # scaled gradient would be off by a factor 1024.
    assert relative_error(scaled_opt.inner.seen[-1][model[0].weight], expected) <= 1e-5


def test_clip_grad_norm_then_precondition():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    x, y = batch(0)
    loss_of(model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    layer = model[0]
    clipped = flatten_pair(layer.weight.grad, layer.bias.grad).clone()
    opt.step()
    assert torch.equal(flatten_pair(layer.weight.grad, layer.bias.grad), clipped)
    seen = opt.inner.seen[-1]
    direction = flatten_pair(seen[layer.weight], seen[layer.bias])
    # The clipped gradient, preconditioned: the dense oracle's 3 CG iterations on it (the
    # unclipped gradient would give this direction times the clipping factor). Float64 CG
    # with κ(M) ≤ 1 + τθ‖[X 1]‖_F² ≤ 71 differs from it by about κ·k·u64 ≈ 2e-14 (measured:
    # 6e-15).
    expected = oracle_direction(layer, [x], clipped, opt.tau_prox, opt.cg_iters)
    assert relative_error(direction, expected) <= 1e-12


def test_step_hooks_run():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    events = []
    opt.register_step_pre_hook(lambda *_: events.append("pre"))
    opt.register_step_post_hook(lambda *_: events.append("post"))
    loss_of(model, *batch(0)).backward()
    opt.step()
    assert events == ["pre", "post"]


# ----------------------------------------------------------------------------- failures, lifecycle


class Exploding(torch.optim.SGD):
    def step(self, closure=None):
        raise RuntimeError("inner step failed")


def test_failed_inner_step_restores_gradients_and_parameters():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Exploding, lr=0.1)
    loss_of(model, *batch(0)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="inner step failed"):
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]) and torch.equal(p.detach(), params[name])


def test_failed_solve_leaves_everything_untouched(monkeypatch):
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.Adam, lr=0.1)
    train(model, opt, 2)
    loss_of(model, *batch(9)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = copy.deepcopy(opt.state_dict())

    def broken(*args, **kwargs):
        raise RuntimeError("solve failed")

    monkeypatch.setattr("proxoptim.pipeline.solve", broken)
    with pytest.raises(RuntimeError, match="solve failed"):
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]) and torch.equal(p.detach(), params[name])
    assert str(opt.state_dict()) == str(state)
    monkeypatch.undo()
    opt.step()  # the captured inputs survived the failure: the step can be retried
    assert set(opt.last_stats) == {"0", "2"}


def test_remove_hooks_detaches_and_is_idempotent():
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder)
    assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
    opt.remove_hooks()
    opt.remove_hooks()
    assert all(len(m._forward_hooks) == 0 for m in model)
    loss_of(model, *batch(0)).backward()
    with pytest.warns(UserWarning, match="no captured input"):
        opt.step()


def test_second_optimizer_on_same_model_raises_until_first_detaches():
    model = make_mlp()
    first = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="remove_hooks"):
        ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    first.remove_hooks()
    ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)


def test_deleted_optimizer_releases_the_model():
    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    loss_of(model, *batch(0)).backward()
    opt.step()
    del opt
    assert all(len(m._forward_hooks) == 0 for m in model)  # no gc needed: no cycles
    ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)  # the model is free again

    model_ref = weakref.ref(model)
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    del model, opt
    gc.collect()
    assert model_ref() is None


def test_layers_of_equal_shape_get_their_own_direction_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    opt = ProxPropOptimizer(model, Recorder)
    for step in range(2):  # the second step reuses the buffers of the first
        opt.zero_grad()
        loss_of(model, *batch(step)).backward()
        opt.step()
    reused = opt.inner.seen[-1]
    assert reused[model[0].weight].data_ptr() != reused[model[2].weight].data_ptr()
    # The same step from an optimizer with fresh buffers gives the same directions.
    opt.remove_hooks()
    fresh = ProxPropOptimizer(model, Recorder)
    model.zero_grad()
    loss_of(model, *batch(1)).backward()
    fresh.step()
    for layer in (model[0], model[2]):
        expected = fresh.inner.seen[-1][layer.weight]
        assert torch.equal(reused[layer.weight], expected)
        assert relative_error(expected, layer.weight.grad) > 1e-3


def test_multihead_attention_out_proj_gets_the_plain_gradient_with_a_warning():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    head = nn.Linear(8, 3)
    model = nn.ModuleDict({"attention": attention, "head": head})
    opt = ProxPropOptimizer(model, Recorder, exclude_last=False)
    x = torch.rand(4, 5, 8)
    hidden, _ = attention(x, x, x)
    head(hidden).sum().backward()
    with pytest.warns(UserWarning, match="'attention.out_proj' has a gradient but no captured"):
        opt.step()
    seen = opt.inner.seen[-1]
    assert torch.equal(seen[attention.out_proj.weight], attention.out_proj.weight.grad)
    assert torch.equal(seen[attention.in_proj_weight], attention.in_proj_weight.grad)
    assert set(opt.last_stats) == {"head"}


def test_profiler_sees_each_phase_of_a_step():
    """torch.profiler shows where a step's time goes: per-layer setup and solve ranges (one
    range for layers whose CG runs as one recurrence, named after all of them), the one
    probe read-back, the stats read-back and the non-finite check."""
    from torch.profiler import ProfilerActivity, profile

    model = make_mlp()
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, solver_form="dual")
    nn.functional.mse_loss(
        model(torch.rand(5, 6, dtype=torch.float64)), torch.zeros(5, 3)
    ).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    names = {event.key for event in prof.key_averages()}
    for layer in ("0", "2"):  # the output layer keeps its gradient
        assert f"ProxProp.prepare#{layer}" in names
    assert "ProxProp.solve#0+2" in names  # (both dual layers' δ-form CG in one recurrence)
    assert "ProxProp.prepare#4" not in names
    assert {
        "ProxProp.probe_verdicts",
        "ProxProp.resolve_stats",
        "ProxProp.nonfinite_check",
    } <= names


class Operators(TorchDispatchMode):
    """Records the name of every operator dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_profiler_ranges_cost_nothing_without_a_profiler():
    """A step's phases are named for torch.profiler only while one runs: otherwise each
    range would dispatch two operators per layer and phase."""
    ranges = {}
    for solver in ("none", "exact"):
        model = make_mlp()
        opt = ProxPropOptimizer(model, Recorder, solver=solver)
        x, y = batch(0)
        loss_of(model, x, y).backward()
        with Operators() as counter:
            opt.step()
        ranges[solver] = [name for name in counter.names if name.startswith("profiler.")]
    assert set(opt.last_stats) == {"0", "2"}
    # torch.optim's own "Optimizer.step#..." ranges remain, the same without any solve.
    assert ranges["exact"] == ranges["none"]


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_diagnostics_are_computed_only_on_request(solver):
    """Without diagnostics a step reports what it knows for free (form, iterations,
    columns, seconds, the δ scale) and dispatches no reduction for residual or cosine; with
    them, the residual and cosine are those of the direction it returned."""
    x, y = batch(0)
    reports, operators = {}, {}
    for diagnostics in (False, True):
        model = make_mlp()
        opt = ProxPropOptimizer(
            model, Recorder, solver=solver, tau_prox=0.5, diagnostics=diagnostics
        )
        loss_of(model, x, y).backward()
        with Operators() as counter:
            opt.step()
        reports[diagnostics], operators[diagnostics] = opt.last_stats, counter.names
        if diagnostics:
            for name, stats in opt.last_stats.items():
                layer = dict(model.named_modules())[name]
                v = flatten_pair(opt.inner.seen[-1][layer.weight], opt.inner.seen[-1][layer.bias])
                g = flatten_pair(layer.weight.grad, layer.bias.grad)
                assert stats.cosine == pytest.approx(float(v @ g / (v.norm() * g.norm())))
                assert 0 <= stats.relative_residual < (1e-10 if solver == "exact" else 1)
    for name, plain in reports[False].items():
        full = reports[True][name]
        assert plain.relative_residual is None and plain.cosine is None
        assert (plain.form, plain.iterations, plain.columns) == (
            full.form,
            full.iterations,
            full.columns,
        )
        assert plain.output_grad_scale == full.output_grad_scale
    # The stats' ‖g‖², ‖v‖² and ⟨v, g⟩ (the δ probe has dot products of its own).
    dots = {key: names.count("aten.dot.default") for key, names in operators.items()}
    assert dots[True] - dots[False] >= 3 * len(reports[True])
    assert len(operators[False]) < len(operators[True])


def test_diagnostics_must_be_a_bool():
    with pytest.raises(ValueError, match="diagnostics must be True or False"):
        ProxPropOptimizer(make_mlp(), torch.optim.SGD, lr=0.1, diagnostics="yes")


def test_solver_none_hooks_nothing_but_still_claims_the_layers():
    """With the plain gradient nothing captured would ever be read: no hooks run, and the
    layers stay claimed (a second optimizer on the model is still refused)."""
    model = make_mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="none")
    assert all(not module._forward_hooks for module in model.modules())
    loss_of(model, *batch(0)).backward()
    assert opt.captured_calls == 0
    with pytest.raises(ValueError, match="already tracked by another ProxPropOptimizer"):
        ProxPropOptimizer(model, Recorder)
    opt.step()
    assert opt.inner.seen[-1][model[0].weight] is not None
