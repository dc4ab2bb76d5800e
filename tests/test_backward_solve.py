"""``solve_in_backward=True``: the direction computed during backward, in place of the
weight gradient (proxoptim.backward_solve), against the dense float64 oracle and against
the default path (``solve_in_backward=False``).

What every test here relies on: from the second step on (the first makes the plan), a
layer whose plan solves in the dual form with δ holds v = M⁻¹g (or k CG iterations) in
``.grad`` as soon as backward returns, where g is what plain autograd would have left.
The oracle (tests/oracle.py) builds M from the autograd Jacobian of a hook-free twin of
the model and shares no code with the library.

Tolerances, float64: M = I/τθ + ŨŨᵀ has κ(M) ≤ 1 + τθ‖Ũ‖²_F, with Ũ the layer's n
input columns [x; 1] (im2col patches for convolutions). Inputs in [0, 1] and tanh/ReLU
activations of order 1, at most 48 columns of at most 49 entries: κ ≤ ~10³. A
backward-stable solve is then off by κ·u64 ≈ 1e-13 at worst (measured over this file:
≤ 2.5e-14), so :data:`TOLERANCE` = 1e-10 has a factor 10³ to spare while a wrong
direction (the plain gradient, a per-call sum, a missed call, δ in the wrong layout) is
off by O(0.1-1).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from functools import partial

import pytest
import torch
from layer_cases import LAYER_CASES
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from test_distributed import run_ranks
from test_reliability import assert_unchanged, snapshot
from torch import nn
from torch.utils.checkpoint import checkpoint

from proxoptim import ProxPropOptimizer
from proxoptim.backward_solve import NOT_DUAL, SEVERAL_CALLS

TOLERANCE = 1e-10
# Two float64 computations of the same quantity by different but equally stable routes
# (the backward solve and the step's δ-form solve of the same system; autograd's weight
# gradient and the library's adjoint): a few ulps times κ(M) ≤ 10³ (measured: ≤ 8e-15).
SAME = 1e-12
TAU = 0.5


def make_mlp(d_in=20, hidden=16, bias=True, dtype=torch.float64, seed=0) -> nn.Module:
    """Two hidden Linear layers (fan-in 20 and 16) and an output layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden, bias=bias),
        nn.Tanh(),
        nn.Linear(hidden, hidden, bias=bias),
        nn.Tanh(),
        nn.Linear(hidden, 3, bias=bias),
    ).to(dtype)


def make_batch(seed, leading=(4,), d_in=20, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1000 + seed)
    x = torch.rand(*leading, d_in, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, leading, generator=generator)
    return x, y


def loss_of(model, x, y):
    out = model(x)
    return nn.functional.cross_entropy(
        out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"
    )


def weighted_sum(model, x, weights):
    return (model(x) * weights).sum()


def mean_loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def is_layer(module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def plain_reference(model, build, batches, loss=loss_of):
    """What plain autograd gives on a hook-free twin of ``model`` (built by ``build``,
    loaded with the model's current parameters): the twin, its gradients by parameter name
    and every layer's inputs by module name, after ``loss(twin, *batch).backward()`` for
    each batch (micro-batches accumulate)."""
    twin = build()
    twin.load_state_dict(model.state_dict())
    inputs = defaultdict(list)
    handles = [
        module.register_forward_hook(
            lambda _m, args, _out, name=name: inputs[name].append(args[0].detach())
        )
        for name, module in twin.named_modules()
        if is_layer(module)
    ]
    for batch in batches:
        loss(twin, *batch).backward()
    for handle in handles:
        handle.remove()
    grads = {name: p.grad.detach().clone() for name, p in twin.named_parameters()}
    return twin, grads, inputs


def flat_grad(grads, name, bias=True):
    """The layer ``name``'s gradient (weight and bias) as one flat vector ("": the model
    is the layer)."""
    prefix = f"{name}." if name else ""
    return flatten_pair(grads[f"{prefix}weight"], grads.get(f"{prefix}bias") if bias else None)


def oracle(twin, grads, inputs, name, cg_iters, modules=None):
    """M⁻¹g (or per-row textbook CG) for the layer ``name`` over every input its modules
    (``modules``: tied modules sharing its weight) saw."""
    module = twin.get_submodule(name)
    calls = [x for m in (modules or [name]) for x in inputs[m]]
    grad = flat_grad(grads, name, module.bias is not None)
    return oracle_direction(module, calls, grad, TAU, cg_iters)


def flat_parameters(model, name):
    layer = model.get_submodule(name)
    return flatten_pair(layer.weight, layer.bias).detach().clone()


def held(model, name):
    """The layer's ``.grad`` (weight and bias) as one flat vector."""
    layer = model.get_submodule(name)
    return flatten_pair(layer.weight.grad, None if layer.bias is None else layer.bias.grad)


def seen(opt, model, name):
    """What the (recording) inner optimizer was handed for the layer in the last step."""
    layer = model.get_submodule(name)
    last = opt.inner.seen[-1]
    return flatten_pair(last[layer.weight], None if layer.bias is None else last[layer.bias])


def summary(opt):
    return {
        name: (stats.solved_in_backward, stats.backward_fallback)
        for name, stats in opt.last_stats.items()
    }


SOLVERS = [
    pytest.param({"solver": "exact"}, None, id="exact-auto"),
    # At these sizes the cost model prices CG cheapest in the primal form even where n < d
    # (the dual form pays for CG from d ≈ 512 on a CPU): the dual form is asked for.
    pytest.param({"solver": "cg", "cg_iters": 3, "solver_form": "dual"}, 3, id="cg3-dual"),
]


# ----------------------------------------------------------------------------- directions


@pytest.mark.parametrize(("solver", "cg_iters"), SOLVERS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("leading", [(4,), (2, 3)], ids=["batch", "leading-dims"])
def test_grad_after_backward_is_the_oracle_direction(solver, cg_iters, bias, leading):
    """Batch rows n (4, or 2 × 3 leading positions) below fan-in: from the second step on,
    ``.grad`` holds M⁻¹g right after backward, still holds it after ``step()``, and it is
    what the inner optimizer gets; the default path hands the inner optimizer the same."""
    model = make_mlp(bias=bias)
    default = make_mlp(bias=bias)
    opt = ProxPropOptimizer(model, Recorder, tau_prox=TAU, solve_in_backward=True, **solver)
    default_opt = ProxPropOptimizer(default, Recorder, tau_prox=TAU, **solver)
    assert opt.solve_in_backward and opt.tapped_layers == []
    for step in range(3):
        x, y = make_batch(step, leading)
        twin, grads, inputs = plain_reference(model, lambda: make_mlp(bias=bias), [(x, y)])
        for each, each_opt in ((model, opt), (default, default_opt)):
            each_opt.zero_grad()
            loss_of(each, x, y).backward()
        after_backward = {name: held(model, name) for name in ("0", "2", "4")}
        opt.step()
        default_opt.step()
        # The output layer keeps the plain gradient (exclude_last), on either path.
        assert relative_error(after_backward["4"], flat_grad(grads, "4", bias)) <= SAME
        assert "4" not in opt.last_stats
        for name in ("0", "2"):
            expected = oracle(twin, grads, inputs, name, cg_iters)
            assert relative_error(seen(default_opt, default, name), expected) <= TOLERANCE
            if step == 0:  # the plan is made: the default path, the plain gradient in .grad
                assert summary(opt)[name] == (False, None)
                assert relative_error(after_backward[name], flat_grad(grads, name, bias)) <= SAME
                assert relative_error(seen(opt, model, name), expected) <= TOLERANCE
                continue
            assert summary(opt)[name] == (True, None), name
            assert relative_error(after_backward[name], expected) <= TOLERANCE, name
            assert torch.equal(held(model, name), after_backward[name])  # step() left v
            assert torch.equal(seen(opt, model, name), after_backward[name])
            assert relative_error(after_backward[name], seen(default_opt, default, name)) <= SAME
            assert opt.last_stats[name].form == "dual"
            assert opt.last_stats[name].columns == math.prod(leading)
            assert opt.last_stats[name].iterations == (cg_iters or 0)
        assert opt.tapped_layers == ["0", "2"]


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_batch_above_fan_in_keeps_the_default_path(solver):
    """n = 200 rows into fan-ins 6 and 8: no plan is dual with δ, so nothing is tapped and
    every step is the default path's, bit for bit."""
    model, default = make_mlp(d_in=6, hidden=8), make_mlp(d_in=6, hidden=8)
    opt = ProxPropOptimizer(model, Recorder, solver=solver, tau_prox=TAU, solve_in_backward=True)
    default_opt = ProxPropOptimizer(default, Recorder, solver=solver, tau_prox=TAU)
    for step in range(3):
        x, y = make_batch(step, (200,), d_in=6)
        _, grads, _ = plain_reference(model, lambda: make_mlp(d_in=6, hidden=8), [(x, y)])
        for each, each_opt in ((model, opt), (default, default_opt)):
            each_opt.zero_grad()
            loss_of(each, x, y).backward()
        for name in ("0", "2"):  # the plain gradient, which backward computed itself
            assert torch.equal(held(model, name), flat_grad(grads, name))
        opt.step()
        default_opt.step()
        assert opt.tapped_layers == []
        for name in ("0", "2"):
            assert opt.plans[name].form_if_delta != "dual"
            assert summary(opt)[name] == (False, None)
            assert torch.equal(seen(opt, model, name), seen(default_opt, default, name))


def test_tapped_layer_whose_new_shapes_plan_another_form_falls_back():
    """Tapped at n = 4, then n = 128 rows (a primal plan at this size): backward leaves the
    gradient (the library's adjoint of δ, not autograd's) and the step solves it, as the
    default path does; the next step at n = 128 is not tapped. (The oracle's Jacobian of
    128 × 16 outputs would take a minute: at n = 128 the default path, itself checked
    against the oracle in test_directions.py, is the reference.)"""
    model, default = make_mlp(), make_mlp()
    opt = ProxPropOptimizer(model, Recorder, solver="exact", tau_prox=TAU, solve_in_backward=True)
    default_opt = ProxPropOptimizer(default, Recorder, solver="exact", tau_prox=TAU)
    for step, rows in enumerate((4, 4, 128, 128)):
        x, y = make_batch(step, (rows,))
        twin, grads, inputs = plain_reference(model, make_mlp, [(x, y)])
        for each, each_opt in ((model, opt), (default, default_opt)):
            each_opt.zero_grad()
            loss_of(each, x, y).backward()
        after_backward = {name: held(model, name) for name in ("0", "2")}
        opt.step()
        default_opt.step()
        expected_summary = {4: (step == 1, None), 128: (False, NOT_DUAL if step == 2 else None)}
        for name in ("0", "2"):
            assert summary(opt)[name] == expected_summary[rows], (step, name)
            direction = seen(opt, model, name)
            assert relative_error(direction, seen(default_opt, default, name)) <= SAME
            if rows == 4:
                expected = oracle(twin, grads, inputs, name, None)
                assert relative_error(direction, expected) <= TOLERANCE
            else:
                assert opt.plans[name].form_if_delta != "dual"
            if step != 1:
                assert relative_error(after_backward[name], flat_grad(grads, name)) <= SAME
        assert opt.tapped_layers == (["0", "2"] if rows == 4 else [])


@pytest.mark.parametrize(("solver", "cg_iters"), SOLVERS)
def test_sgd_trajectory_matches_the_default_path(solver, cg_iters):
    """SGD with momentum over five steps: both paths hand the inner optimizer the same
    directions, so the parameters follow the same trajectory (to float64 rounding, which
    momentum carries along but does not amplify: ≤ 5 steps × a few ulps × κ)."""
    model, default = make_mlp(), make_mlp()
    kwargs = {"lr": 0.1, "momentum": 0.9, "tau_prox": TAU, **solver}
    opt = ProxPropOptimizer(model, torch.optim.SGD, solve_in_backward=True, **kwargs)
    default_opt = ProxPropOptimizer(default, torch.optim.SGD, **kwargs)
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        x, y = make_batch(step)
        for each, each_opt in ((model, opt), (default, default_opt)):
            each_opt.zero_grad()
            loss_of(each, x, y).backward()
            each_opt.step()
        assert summary(opt) == {"0": (step > 0, None), "2": (step > 0, None)}
        for mine, reference in zip(model.parameters(), default.parameters(), strict=True):
            assert relative_error(mine.detach(), reference.detach()) <= SAME
    moved = [relative_error(p.detach(), s) for p, s in zip(model.parameters(), start, strict=True)]
    assert min(moved) > 1e-3  # the trajectory went somewhere


SINGLE_GROUP = [case for case in LAYER_CASES if getattr(case.build(), "groups", 1) == 1]
GROUPED = [case for case in LAYER_CASES if getattr(case.build(), "groups", 1) != 1]


@pytest.mark.parametrize("case", SINGLE_GROUP + GROUPED, ids=lambda case: case.name)
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_every_layer_kind_alone(case, unbatched):
    """Each layer kind of tests/layer_cases.py alone (exclude_last=False, the dual form
    asked for): Linear layers and one-group convolutions are solved in backward, exactly
    and with 3 CG iterations (δ read in the patches' order); grouped convolutions have no
    dual form and keep the default path. Unbatched inputs too."""
    for solver, cg_iters in (("exact", None), ("cg", 3)):
        module, sample = case.make()
        opt = ProxPropOptimizer(
            module,
            Recorder,
            exclude_last=False,
            solver=solver,
            cg_iters=3,
            solver_form="dual",
            tau_prox=TAU,
            solve_in_backward=True,
        )
        generator = torch.Generator().manual_seed(7)
        for _ in range(2):
            x = sample(1)[0] if unbatched else sample(3)
            opt.zero_grad()
            out = module(x)
            weights = torch.randn(out.shape, generator=generator, dtype=out.dtype)
            (out * weights).sum().backward()
            after_backward = held(module, "")
            opt.step()
        twin, grads, inputs = plain_reference(
            module, lambda: case.build().double(), [(x, weights)], weighted_sum
        )
        expected = oracle(twin, grads, inputs, "", cg_iters)
        stats = opt.last_stats[""]
        assert stats.solved_in_backward == (case in SINGLE_GROUP), (case.name, solver)
        assert relative_error(seen(opt, module, ""), expected) <= TOLERANCE, (case.name, solver)
        if stats.solved_in_backward:
            assert relative_error(after_backward, expected) <= TOLERANCE, (case.name, solver)
        else:
            assert torch.equal(after_backward, flat_grad(grads, "", module.bias is not None))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_inplace_activation_and_checkpointing_keep_the_direction(use_reentrant):
    """``ReLU(inplace=True)`` on a tapped layer's output (the direction node marks the
    output dirty and stays under it), and activation checkpointing (the recomputation,
    under reentrant checkpointing the only forward with grad, is solved once)."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(20, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
        ).double()

    def checkpointed_loss(m, x, y):
        hidden = checkpoint(m[:4], x.requires_grad_(use_reentrant), use_reentrant=use_reentrant)
        return nn.functional.cross_entropy(m[4](hidden), y, reduction="sum")

    model = build()
    opt = ProxPropOptimizer(model, Recorder, solver="exact", tau_prox=TAU, solve_in_backward=True)
    for step in range(2):
        x, y = make_batch(step)
        twin, grads, inputs = plain_reference(model, build, [(x, y)])
        opt.zero_grad()
        checkpointed_loss(model, x.clone(), y).backward()
        opt.step()
    assert summary(opt) == {"0": (True, None), "2": (True, None)}
    assert opt.last_stats["0"].columns == 4  # the checkpointed forward counted once
    for name in ("0", "2"):
        expected = oracle(twin, grads, inputs, name, None)
        assert relative_error(held(model, name), expected) <= TOLERANCE


# ----------------------------------------------------------------- several calls in a step


class Repeated(nn.Module):
    """``a`` applied ``repeat`` times (the same module, or with ``tied`` a second module
    sharing its weight and bias for the second call), then the output layer ``b``."""

    def __init__(self, tied=False, repeat=1):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 3)
        self.tied = tied
        if tied:
            self.a2 = nn.Linear(16, 16)
            self.a2.weight, self.a2.bias = self.a.weight, self.a.bias
        self.repeat = repeat
        self.double()

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.repeat == 2:
            h = torch.tanh((self.a2 if self.tied else self.a)(h))
        return self.b(h)


def expected_outcomes(calls_per_step):
    """(solved_in_backward, backward_fallback) per step for a layer called that many times:
    tapped after a step with one call, solved on a step with one call; a tapped layer that
    meets several calls falls back once ("several calls") and is untapped from then on."""
    outcomes, tapped = [], False
    for calls in calls_per_step:
        if calls == 1:
            outcomes.append((tapped, None))
        else:
            outcomes.append((False, SEVERAL_CALLS if tapped else None))
        tapped = calls == 1
    return outcomes


@pytest.mark.parametrize("tied", [False, True], ids=["same-module", "tied-modules"])
@pytest.mark.parametrize(("solver", "cg_iters"), SOLVERS)
def test_shared_weights_solve_the_summed_system(tied, solver, cg_iters):
    """A layer called once per step (tapped), then twice in one forward: the transition
    step and the next solve the system of both calls' inputs for the summed gradient, as
    the default path does, never the sum of per-call directions; back to one call, the
    layer is tapped again after a step."""
    schedule = (1, 1, 2, 2, 1, 1)
    model, default = Repeated(tied), Repeated(tied)
    opt = ProxPropOptimizer(model, Recorder, tau_prox=TAU, solve_in_backward=True, **solver)
    default_opt = ProxPropOptimizer(default, Recorder, tau_prox=TAU, **solver)
    assert opt.layer_names == ["a", "b"]
    outcomes = []
    for step, repeat in enumerate(schedule):
        x, y = make_batch(step, d_in=16)
        model.repeat = default.repeat = repeat
        twin, grads, inputs = plain_reference(model, partial(Repeated, tied, repeat), [(x, y)])
        for each, each_opt in ((model, opt), (default, default_opt)):
            each_opt.zero_grad()
            loss_of(each, x, y).backward()
        after_backward = held(model, "a")
        opt.step()
        default_opt.step()
        outcomes.append(summary(opt)["a"])
        assert opt.last_stats["a"].columns == 4 * repeat
        expected = oracle(twin, grads, inputs, "a", cg_iters, ["a", "a2"] if tied else ["a"])
        assert relative_error(seen(opt, model, "a"), expected) <= TOLERANCE, step
        assert relative_error(seen(opt, model, "a"), seen(default_opt, default, "a")) <= SAME
        # The summed gradient in .grad wherever the step solved (g₁ + g₂ − v₁ + v₁ on the
        # transition step), the direction where backward did.
        solved = outcomes[-1][0]
        reference = expected if solved else flat_grad(grads, "a")
        assert relative_error(after_backward, reference) <= (TOLERANCE if solved else SAME)
    assert outcomes == expected_outcomes(schedule)


@pytest.mark.parametrize(("solver", "cg_iters"), SOLVERS)
def test_gradient_accumulation_solves_the_summed_system(solver, cg_iters):
    """One micro-batch per step (tapped), then 3 and 2 micro-batches (a backward each):
    the direction is that of all micro-batches' inputs stacked, for the summed gradient."""
    schedule = (1, 1, 3, 2, 1, 1)
    model, default = make_mlp(), make_mlp()
    opt = ProxPropOptimizer(model, Recorder, tau_prox=TAU, solve_in_backward=True, **solver)
    default_opt = ProxPropOptimizer(default, Recorder, tau_prox=TAU, **solver)
    outcomes = []
    for step, micro_batches in enumerate(schedule):
        x, y = make_batch(step, (6,))
        parts = torch.arange(6).tensor_split(micro_batches)
        micro = [(x[rows], y[rows]) for rows in parts]
        twin, grads, inputs = plain_reference(model, make_mlp, micro)
        for each, each_opt in ((model, opt), (default, default_opt)):
            each_opt.zero_grad()
            for rows in parts:
                loss_of(each, x[rows], y[rows]).backward()
        after_backward = {name: held(model, name) for name in ("0", "2")}
        opt.step()
        default_opt.step()
        outcomes.append(summary(opt))
        if micro_batches == 3:
            # What the tolerances tell apart: the sum of per-micro-batch directions (each
            # call's own M⁻¹g) is far from the direction of the summed system.
            per_call = sum(
                oracle(*plain_reference(model, make_mlp, [batch]), "0", cg_iters) for batch in micro
            )
            assert relative_error(per_call, oracle(twin, grads, inputs, "0", cg_iters)) > 0.1
        for name in ("0", "2"):
            assert len(inputs[name]) == micro_batches
            assert opt.last_stats[name].columns == 6
            expected = oracle(twin, grads, inputs, name, cg_iters)
            assert relative_error(seen(opt, model, name), expected) <= TOLERANCE, (step, name)
            assert relative_error(seen(opt, model, name), seen(default_opt, default, name)) <= SAME
            solved = outcomes[-1][name][0]
            reference = expected if solved else flat_grad(grads, name)
            assert relative_error(after_backward[name], reference) <= (
                TOLERANCE if solved else SAME
            )
    for name in ("0", "2"):
        assert [outcome[name] for outcome in outcomes] == expected_outcomes(schedule)


# ------------------------------------------------------------------ .grad, clipping, AMP


def test_clip_grad_norm_clips_the_direction():
    """``.grad`` holds v after backward: clip_grad_norm_ scales v (with the output layer's
    plain gradient) and SGD at lr = 1 steps by exactly the clipped v, which ``.grad`` still
    holds after the step."""
    model = make_mlp()
    opt = ProxPropOptimizer(
        model, torch.optim.SGD, lr=1.0, solver="exact", tau_prox=TAU, solve_in_backward=True
    )
    for step in range(2):
        x, y = make_batch(step)
        twin, grads, inputs = plain_reference(model, make_mlp, [(x, y)])
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if step == 0:
            opt.step()
    for name in ("0", "2"):
        assert (
            relative_error(held(model, name), oracle(twin, grads, inputs, name, None)) <= TOLERANCE
        )
    unclipped = {name: held(model, name) for name in ("0", "2", "4")}
    total = math.sqrt(sum(float(v @ v) for v in unclipped.values()))
    before = {name: flat_parameters(model, name) for name in unclipped}
    returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=total / 10)
    assert float(returned) == pytest.approx(total, rel=1e-12)
    clipped = {name: held(model, name) for name in unclipped}
    for name in unclipped:
        # clip_grad_norm_ multiplies by max_norm / (total + 1e-6).
        factor = (total / 10) / (total + 1e-6)
        assert relative_error(clipped[name], unclipped[name] * factor) <= SAME
    opt.step()
    assert summary(opt) == {"0": (True, None), "2": (True, None)}
    for name in unclipped:
        step = before[name] - flat_parameters(model, name)
        assert relative_error(step, clipped[name]) <= SAME, name
        assert torch.equal(held(model, name), clipped[name])


def test_grad_scaler_gives_the_unscaled_steps_and_skips_an_inf():
    """float32 with a power-of-two scale: the scaled δ gives the scaled v (v is linear in
    δ), unscaled exactly, so every step equals the unscaled run's (measured: identical;
    1e-6 leaves a few ulps of u32 = 6e-8 for a BLAS kernel summing in another order). An
    inf in the loss turns the solved directions non-finite; the scaler then skips the
    step (parameters untouched) and halves the scale, and the next step is clean."""
    build = lambda: make_mlp(dtype=torch.float32)  # noqa: E731
    model, reference = build(), build()
    kwargs = {
        "lr": 0.1,
        "momentum": 0.9,
        "solver": "exact",
        "tau_prox": TAU,
        "solve_in_backward": True,
    }
    opt = ProxPropOptimizer(model, torch.optim.SGD, **kwargs)
    reference_opt = ProxPropOptimizer(reference, torch.optim.SGD, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(5):
        x, y = make_batch(step, dtype=torch.float32)
        if step == 2:
            opt.zero_grad()
            scaler.scale(loss_of(model, x, y) * float("inf")).backward()
            assert not torch.isfinite(model[0].weight.grad).all()
            parameters = copy.deepcopy(model.state_dict())
            state = str(opt.state_dict())
            scaler.step(opt)
            scaler.update()
            assert scaler.get_scale() == 2.0**9
            for name, value in model.state_dict().items():
                assert torch.equal(value, parameters[name]), name
            assert str(opt.state_dict()) == state
            continue
        reference_opt.zero_grad()
        loss_of(reference, x, y).backward()
        reference_opt.step()
        opt.zero_grad()
        scaler.scale(loss_of(model, x, y)).backward()
        scaler.unscale_(opt)
        for name in ("0", "2"):
            assert relative_error(held(model, name), held(reference, name)) <= 1e-6
        scaler.step(opt)
        scaler.update()
        assert summary(opt) == {"0": (step > 0, None), "2": (step > 0, None)}
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            assert relative_error(mine.detach(), theirs.detach()) <= 1e-6


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_input_to_a_solved_layer(policy):
    """A NaN in the input of a solved layer makes its direction (in .grad) NaN: "raise"
    raises and changes nothing, "skip" skips the step and counts it; either way the next
    clean step is solved in backward and correct."""
    model = make_mlp()
    opt = ProxPropOptimizer(
        model,
        torch.optim.Adam,
        lr=1e-2,
        solver="exact",
        tau_prox=TAU,
        nonfinite=policy,
        solve_in_backward=True,
    )
    for step in range(2):
        opt.zero_grad()
        loss_of(model, *make_batch(step)).backward()
        opt.step()
    x, y = make_batch(2)
    x[1, 3] = float("nan")
    opt.zero_grad()
    loss_of(model, x, y).backward()
    assert torch.isnan(model[0].weight.grad).any()
    before = snapshot(model, opt)
    last_stats = opt.last_stats
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
        assert opt.skipped_steps == 0 and opt.last_stats is last_stats
    else:
        with pytest.warns(UserWarning, match="step skipped"):
            opt.step()
        assert opt.skipped_steps == 1 and opt.last_stats == {}
    assert_unchanged(model, opt, before)
    assert_next_step_solved(model, opt)


def assert_next_step_solved(model, opt):
    """The next step of make_mlp() under an exact optimizer is solved in backward, and
    right: both hidden layers hold the oracle direction after backward."""
    x, y = make_batch(3)
    twin, grads, inputs = plain_reference(model, make_mlp, [(x, y)])
    opt.zero_grad()
    loss_of(model, x, y).backward()
    for name in ("0", "2"):
        assert (
            relative_error(held(model, name), oracle(twin, grads, inputs, name, None)) <= TOLERANCE
        )
    opt.step()
    assert summary(opt) == {"0": (True, None), "2": (True, None)}


# ----------------------------------------------------------------- the model, left as it was


def hooks(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_model_is_unmodified_from_the_users_side():
    """Same class, state_dict keys, repr and outputs as an untouched copy; every parameter
    requires grad after a tapped forward and after a forward that raised inside a tapped
    layer; remove_hooks leaves no hook and later steps take the plain gradient; a second
    optimizer is refused while the first is attached."""
    model = make_mlp()
    plain = copy.deepcopy(model)
    plain_repr = repr(model)
    opt = ProxPropOptimizer(model, Recorder, solver="exact", tau_prox=TAU, solve_in_backward=True)
    for step in range(3):
        x, y = make_batch(step)
        opt.zero_grad()
        out = model(x)
        assert all(p.requires_grad for p in model.parameters())
        assert torch.equal(out, plain(x))
        nn.functional.cross_entropy(out, y, reduction="sum").backward()
        opt.step()
    assert opt.tapped_layers == ["0", "2"]
    assert type(model) is nn.Sequential and repr(model) == plain_repr
    assert list(model.state_dict()) == list(plain.state_dict())
    # A forward that raises inside a tapped layer (its weight had requires_grad switched off).
    with pytest.raises(RuntimeError, match="shapes"):
        model(torch.rand(4, 7, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="shapes"):
        model[2](torch.rand(4, 5, dtype=torch.float64))
    assert all(p.requires_grad for p in model.parameters())
    # The failed forwards left nothing behind: the next step is solved in backward, right.
    assert_next_step_solved(model, opt)

    hooked = hooks(model)
    for kwargs in ({}, {"solve_in_backward": True}):
        with pytest.raises(ValueError, match="remove_hooks"):
            ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, **kwargs)
    assert hooks(model) == hooked  # the refused optimizers hooked nothing

    opt.remove_hooks()
    opt.remove_hooks()
    assert hooks(model) == [(0, 0)] * len(list(model.modules()))
    assert opt.tapped_layers == []
    x, y = make_batch(4)
    _, grads, _ = plain_reference(model, make_mlp, [(x, y)])
    opt.zero_grad()
    loss_of(model, x, y).backward()
    for name in ("0", "2", "4"):
        assert torch.equal(held(model, name), flat_grad(grads, name))
    with pytest.warns(UserWarning, match="no captured input"):
        opt.step()
    for name in ("0", "2", "4"):
        assert torch.equal(seen(opt, model, name), flat_grad(grads, name))
    ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, solve_in_backward=True).remove_hooks()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solve_in_backward": "yes"}, "solve_in_backward must be True or False"),
        ({"solve_in_backward": 1}, "solve_in_backward must be True or False"),
        ({"solve_in_backward": None}, "solve_in_backward must be True or False"),
        ({"solve_in_backward": True, "solver": "none"}, "solver='none'"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    model = make_mlp()
    with pytest.raises(ValueError, match=message):
        ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, **kwargs)
    assert hooks(model) == [(0, 0)] * len(list(model.modules()))
    ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)  # nothing claimed the layers


# ------------------------------------------------------------------------------ DDP (gloo)


def test_ddp_local_mode_and_gradient_accumulation(tmp_path):
    """Two gloo ranks (tests/distributed_worker.py, mode "backward"), float64, the Conv +
    Linear model of test_distributed.py with 3 rows per rank:

    * solve_in_backward=True is refused with distributed="global" and with the default
      (global inside a group), hooking nothing;
    * "local", exact: after each backward from the second step on, every rank's ``.grad``
      of a solved layer is the average over ranks of each rank's own oracle direction
      M_r⁻¹g_r; unsolved layers hold the averaged plain gradient; replicas stay
      bit-identical;
    * gradient accumulation under no_sync (all micro-batches but the last): on steps with
      two micro-batches, and on the untapped single-batch step after them, the directions
      equal solve_in_backward=False's in the same processes (the default "local" path on
      the summed system);
    * a tapped layer called again after its direction was all-reduced raises, naming
      no_sync;
    * ranks with different shapes in one step (dynamic padding) solve alike.
    """
    from distributed_worker import ACCUMULATION, PER_RANK, global_batch, make_model

    world_size, steps = 2, 4
    ranks = run_ranks(tmp_path, world_size, "backward", steps=steps)
    layers = ("0", "3", "5", "7")
    for result in ranks:
        assert set(result["refusals"]) == {"global", "default"}
        for message in result["refusals"].values():
            assert "distributed='local'" in message
        assert result["hooks_after_refusals"] == 0
        assert "no_sync" in result["synced_twice"]
    for result in ranks[1:]:
        for mine, theirs in zip(result["local_final"], ranks[0]["local_final"], strict=True):
            assert torch.equal(mine, theirs)

    names = [name for name, _ in make_model().named_parameters()]
    for step in range(steps):
        x, y = global_batch(step, world_size)
        start = ranks[0]["local"][step]["parameters"]
        state = dict(zip(names, start, strict=True))
        holder = make_model()
        holder.load_state_dict(state)
        per_rank = []
        for rank in range(world_size):
            rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            twin, grads, inputs = plain_reference(
                holder, make_model, [(x[rows], y[rows])], mean_loss
            )
            per_rank.append((twin, grads, inputs))
        expected = {}  # (layer, solved): the average over ranks, computed once
        for result in ranks:
            record = result["local"][step]
            assert all(torch.equal(a, b) for a, b in zip(record["parameters"], start, strict=True))
            held_grads = dict(zip(names, record["grads"], strict=True))
            for name in layers:
                # The Linear layers are solved from the second step on; the one-group
                # convolution (48 columns against fan-in 19) wherever its plan is dual.
                solved, fallback = record["stats"].get(name, (False, None))
                assert fallback is None
                if name in ("3", "5"):
                    assert solved == (step > 0), (step, name)
                elif name == "7" or step == 0:
                    assert not solved, (step, name)
                if (name, solved) not in expected:
                    expected[name, solved] = sum(
                        oracle(*reference, name, None) if solved else flat_grad(reference[1], name)
                        for reference in per_rank
                    ) / len(per_rank)
                actual = flat_grad(held_grads, name)
                assert relative_error(actual, expected[name, solved]) <= TOLERANCE, (step, name)

    counts = [1 if calls == 1 else 2 for calls in ACCUMULATION]
    for result in ranks:
        tapped, default = result["accumulation"][True], result["accumulation"][False]
        for name in ("0", "3", "5"):
            outcomes = [record["stats"][name] for record in tapped]
            assert outcomes == expected_outcomes(counts), name
            assert all(record["stats"][name] == (False, None) for record in default)
        for step, (mine, theirs) in enumerate(zip(tapped, default, strict=True)):
            solved = mine["stats"]["3"][0]
            for a, b in zip(mine["directions"], theirs["directions"], strict=True):
                if solved:  # Σ_r M_r⁻¹g_r / R, not Σ_r M_r⁻¹ḡ / R: a different direction
                    continue
                assert relative_error(a, b) <= SAME, step
            if ACCUMULATION[step] > 1:  # .grad: the averaged summed gradient on both paths
                for a, b in zip(mine["grads"], theirs["grads"], strict=True):
                    assert relative_error(a, b) <= SAME, step
        assert any(record["stats"]["3"][0] for record in tapped)

    # Ranks whose shapes differ in a step (rank 1's plan would not be dual) still solve
    # the tapped layer in backward alike, and the replicas stay identical.
    for result in ranks:
        assert [record["0"] for record in result["ragged"]["stats"]] == [
            (False, None),
            (True, None),
            (True, None),
        ]
    for mine, theirs in zip(
        ranks[1]["ragged"]["parameters"], ranks[0]["ragged"]["parameters"], strict=True
    ):
        assert torch.equal(mine, theirs)


# ----------------------------------------------------------------------- autocast, compile


def test_bf16_autocast_is_solved_in_backward_close_to_float32():
    """Under CPU bf16 autocast the layers' inputs and δ are bf16 (unit roundoff
    u = 2⁻⁸ ≈ 3.9e-3), the solve runs in float32 and v comes back as float32. The direction
    is linear in δ and depends on the inputs through the kernel: each carries a few u of
    relative rounding through the forward and backward of two tanh layers, so a few u
    overall (measured over 8 model and batch seeds: ≤ 8.6e-3); 2.5e-2 (≈ 6u) leaves a
    factor 3, while the direction of another batch or the plain gradient is off by O(1)."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)
        )

    directions = {}
    for autocast in (False, True):
        model = build()
        opt = ProxPropOptimizer(
            model, Recorder, solver="exact", tau_prox=TAU, solve_in_backward=True
        )
        for step in range(2):
            x, y = make_batch(step, (8,), d_in=64, dtype=torch.float32)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
            nn.functional.cross_entropy(out.float(), y).backward()
            opt.step()
        assert summary(opt) == {"0": (True, None), "2": (True, None)}
        directions[autocast] = {name: held(model, name) for name in ("0", "2")}
        assert all(direction.dtype == torch.float32 for direction in directions[autocast].values())
    for name in ("0", "2"):
        assert relative_error(directions[True][name], directions[False][name]) <= 2.5e-2, name


@pytest.mark.parametrize("target", ["compiled", "original"])
def test_torch_compile_gives_the_eager_steps(target):
    """torch.compile (inductor) with the optimizer built on the compiled module or on the
    original: the layers are solved in backward (the hooks switch requires_grad and
    re-guard the graphs) and the steps equal eager ones. Float32: inductor's fused kernels
    may round the activations a few ulps differently from eager (u32 = 6e-8), which the
    solve amplifies by at most κ(M) ≈ 10²: 1e-5 (measured: identical)."""

    def build():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
        )

    eager, model = build(), build()
    compiled = torch.compile(model)
    kwargs = {"lr": 0.1, "solver": "exact", "tau_prox": TAU, "solve_in_backward": True}
    eager_opt = ProxPropOptimizer(eager, torch.optim.SGD, **kwargs)
    opt = ProxPropOptimizer(compiled if target == "compiled" else model, torch.optim.SGD, **kwargs)
    for step in range(3):
        x, y = make_batch(step, dtype=torch.float32)
        for forward, each_opt in ((eager, eager_opt), (compiled, opt)):
            each_opt.zero_grad()
            loss_of(forward, x, y).backward()
        for name in ("0", "2"):
            assert relative_error(held(model, name), held(eager, name)) <= 1e-5, (step, name)
        eager_opt.step()
        opt.step()
        assert summary(opt) == summary(eager_opt) == {"0": (step > 0, None), "2": (step > 0, None)}
        assert all(p.requires_grad for p in model.parameters())
    for mine, theirs in zip(model.parameters(), eager.parameters(), strict=True):
        assert relative_error(mine.detach(), theirs.detach()) <= 1e-5


# ------------------------------------------------------------- calls that are not training


def tapped_model(**kwargs):
    """make_mlp() under an exact solve_in_backward optimizer after one normal step (its
    hidden layers are then tapped)."""
    model = make_mlp()
    opt = ProxPropOptimizer(
        model, Recorder, tau_prox=TAU, solver="exact", solve_in_backward=True, **kwargs
    )
    opt.zero_grad()
    loss_of(model, *make_batch(0)).backward()
    opt.step()
    assert opt.tapped_layers == ["0", "2"]
    return model, opt


def test_backward_twice_over_one_graph_adds_the_directions():
    # .grad would hold 2g by plain autograd; M counts the call once, so v = M⁻¹(2g).
    model, opt = tapped_model()
    batch = make_batch(1)
    opt.zero_grad()
    loss = loss_of(model, *batch)
    loss.backward(retain_graph=True)
    loss.backward()
    twin, grads, inputs = plain_reference(model, make_mlp, [batch])
    for name in ("0", "2"):
        expected = 2 * oracle(twin, grads, inputs, name, None)
        assert relative_error(held(model, name), expected) < TOLERANCE
    opt.step()
    assert summary(opt) == {"0": (True, None), "2": (True, None)}


def test_input_gradient_calls_never_reach_the_weights_direction():
    # torch.autograd.grad with respect to the input (a saliency map) runs the layers'
    # backward but reaches no .grad: it must neither count as the layer's call nor
    # leave anything to undo.
    model, opt = tapped_model()
    batch = make_batch(1)
    opt.zero_grad()
    probe = batch[0].clone().requires_grad_()
    torch.autograd.grad(loss_of(model, probe, batch[1]), probe)
    loss_of(model, *batch).backward()
    twin, grads, inputs = plain_reference(model, make_mlp, [batch])
    for name in ("0", "2"):
        assert relative_error(held(model, name), oracle(twin, grads, inputs, name, None)) < (
            TOLERANCE
        )
    opt.step()
    assert summary(opt)["0"] == (True, None)


def test_a_pre_hook_registered_later_changes_the_input_the_direction_uses():
    model, opt = tapped_model()
    model[0].register_forward_pre_hook(lambda _module, args: (args[0] * 2,))
    batch = make_batch(1)
    opt.zero_grad()
    loss_of(model, *batch).backward()
    twin, grads, _ = plain_reference(model, make_mlp, [(2 * batch[0], batch[1])])
    expected = oracle_direction(twin[0], [2 * batch[0]], flat_grad(grads, "0"), TAU, None)
    assert relative_error(held(model, "0"), expected) < TOLERANCE


def test_substituted_parameters_are_not_tapped():
    # torch.func.functional_call puts other tensors in the layer's place for one call:
    # non-leaf fast weights (MAML), leaf copies, torch.func.grad. None of them is the
    # layer's weight, so none is tapped: their gradients are plain, the layer's own
    # .grad is untouched by them.
    from torch.func import functional_call, grad

    model, opt = tapped_model()
    batch = make_batch(1)
    opt.zero_grad()
    names = dict(model.named_parameters())
    fast = {name: p - 0.1 for name, p in names.items()}  # non-leaf
    loss_of_fast = loss_of(lambda x: functional_call(model, fast, (x,)), *batch)
    loss_of_fast.backward()  # reaches the real parameters through p - 0.1
    assert all(p.requires_grad for p in model.parameters())
    copies = {name: p.detach().clone().requires_grad_() for name, p in names.items()}
    loss_of(lambda x: functional_call(model, copies, (x,)), *batch).backward()
    _, plain, _ = plain_reference(model, make_mlp, [batch])
    for name, copy_ in copies.items():
        assert relative_error(copy_.grad, plain[name]) < SAME
    gradients = grad(
        lambda params: loss_of(lambda x: functional_call(model, params, (x,)), *batch)
    )({name: p.detach() for name, p in names.items()})
    for name, value in gradients.items():
        assert relative_error(value, plain[name]) < SAME


def test_a_deleted_optimizer_leaves_no_hooks():
    import gc

    model, opt = tapped_model()
    del opt
    gc.collect()
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())
    loss_of(model, *make_batch(1)).backward()  # a plain model again
    assert all(p.requires_grad for p in model.parameters())
