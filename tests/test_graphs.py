"""cuda_graphs=True: captured solves replay with each step's inputs and give the eager
directions. The CUDA capture itself needs a GPU (benchmarks/gpu_check.py checks it there);
here EagerRunner stands in for it, so the keys, static inputs, outputs and fallbacks are
what is tested."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from oracle import Recorder
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.graphs import EagerRunner


def network():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 5 * 5, 7),
        nn.ReLU(),
        nn.Linear(7, 3),
    )


def batch(seed, size=4):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 2, 5, 5, generator=generator), torch.randint(
        0, 3, (size,), generator=generator
    )


def run_steps(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return opt.inner.seen


def assert_same_directions(seen, expected, **tolerance):
    """Every step's directions, parameter by parameter (Recorder.seen of two runs).

    A replay runs the same float32 operations on the same numbers as the eager solve
    (measured: identical directions); the tests' rtol=1e-5 (about 170 ulps) leaves room
    only for a kernel that sums in another order on differently aligned static copies,
    amplified by CG, while a stale static input or a lost copy moves a direction by O(1).
    """
    for step_seen, step_expected in zip(seen, expected, strict=True):
        for direction, reference in zip(step_seen.values(), step_expected.values(), strict=True):
            torch.testing.assert_close(direction, reference, **tolerance)


def with_probe_policy(kwargs):
    """As on an accelerator at these sizes: CG does not probe for δ and nothing
    speculates, so these tests graph the general form; exact solves probe eagerly (the δ
    form's graphs, probed eagerly or speculatively, are tested where they are asked for)."""
    kwargs.setdefault("probe", "eager" if kwargs.get("solver") == "exact" else "never")
    return kwargs


def graphed(model, runner=None, **kwargs):
    runner = runner if runner is not None else EagerRunner()
    return ProxPropOptimizer(model, Recorder, cuda_graphs=runner, **with_probe_policy(kwargs))


def eager_optimizer(model, **kwargs):
    """The same optimizer without graphs."""
    return ProxPropOptimizer(model, Recorder, **with_probe_policy(kwargs))


@pytest.mark.parametrize("form", ["auto", "matrix_free", "primal", "dual"])
def test_replayed_solves_give_the_eager_directions(form):
    model = network()
    eager_model = copy.deepcopy(model)
    batches = [batch(seed) for seed in range(4)]
    opt = graphed(model, solver_form=form, cg_iters=4, tau_prox=0.3, diagnostics=True)
    eager = eager_optimizer(
        eager_model, solver_form=form, cg_iters=4, tau_prox=0.3, diagnostics=True
    )
    seen = run_steps(opt, model, batches)
    expected = run_steps(eager, eager_model, batches)
    # Step 1 eager, step 2 captures, steps 3-4 replay with new inputs.
    assert opt.captured_graphs == 2  # the conv and the hidden Linear; the output layer is plain
    assert_same_directions(seen, expected, rtol=1e-5, atol=1e-7)
    for name, stats in opt.last_stats.items():
        reference = eager.last_stats[name]
        assert (stats.form, stats.iterations, stats.columns) == (
            reference.form,
            reference.iterations,
            reference.columns,
        )
        assert stats.cosine == pytest.approx(reference.cosine, rel=1e-5)
        assert stats.relative_residual == pytest.approx(reference.relative_residual, rel=1e-4)


def test_remove_hooks_drops_the_graphs():
    model = network()
    opt = graphed(model)
    run_steps(opt, model, [batch(0), batch(1)])
    assert opt.captured_graphs == 2
    opt.remove_hooks()
    assert opt.captured_graphs == 0


def test_a_new_shape_is_captured_on_its_second_sighting():
    model = network()
    opt = graphed(model)
    run_steps(opt, model, [batch(0), batch(1)])
    assert opt.captured_graphs == 2
    run_steps(opt, model, [batch(2, size=6)])
    assert opt.captured_graphs == 2  # the new batch size ran eagerly once
    run_steps(opt, model, [batch(3, size=6)])
    assert opt.captured_graphs == 4


@pytest.mark.parametrize("kwargs", [{"solver": "exact", "solver_form": "primal"}, {"cg_tol": 1e-3}])
def test_solves_with_host_decisions_stay_eager(kwargs):
    model = network()
    opt = graphed(model, **kwargs)
    run_steps(opt, model, [batch(seed) for seed in range(3)])
    assert opt.captured_graphs == 0


def test_cpu_tensors_are_never_captured_by_the_cuda_runner():
    model = network()
    opt = ProxPropOptimizer(model, Recorder, cuda_graphs=True)
    run_steps(opt, model, [batch(seed) for seed in range(3)])
    assert opt.captured_graphs == 0


def test_a_failed_capture_warns_and_stays_eager():
    class Failing(EagerRunner):
        def capture(self, entry):
            raise RuntimeError("operation not permitted when stream is capturing")

    model = network()
    eager_model = copy.deepcopy(model)
    batches = [batch(seed) for seed in range(3)]
    opt = graphed(model, Failing())
    with pytest.warns(UserWarning, match="could not be captured"):
        seen = run_steps(opt, model, batches)
    expected = run_steps(eager_optimizer(eager_model), eager_model, batches)
    assert opt.captured_graphs == 0
    assert_same_directions(seen, expected)


def test_cuda_graphs_takes_a_bool_or_a_runner():
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or a runner"):
        ProxPropOptimizer(network(), torch.optim.SGD, lr=0.1, cuda_graphs="yes")
    with pytest.raises(ValueError, match="speculation_backoff must be an integer >= 0"):
        ProxPropOptimizer(network(), torch.optim.SGD, lr=0.1, speculation_backoff=-1)
    # A runner object is the public way to choose how solves are captured and replayed.
    opt = ProxPropOptimizer(network(), torch.optim.SGD, lr=0.1, cuda_graphs=EagerRunner())
    assert opt.captured_graphs == 0


def run_scaled_steps(opt, model, batches, factors):
    """Steps whose .grad is scaled after backward (as clipping does): the probe's s = factor."""
    scales = []
    for (x, y), factor in zip(batches, factors, strict=True):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for param in model.parameters():
            param.grad.mul_(factor)
        opt.step()
        scales.append(opt.last_stats["3"].output_grad_scale)
    return opt.inner.seen, scales


# Each step's .grad scaled by these after backward: the δ probe's scale changes every step.
FACTORS = [1.0, 0.5, 0.25, 2.0]


def probed_runs(solver, probe):
    """The same scaled steps with graphs (probing as ``probe`` says) and eagerly (probing
    eagerly), the δ form wherever it applies: (graphed optimizer, its directions and
    scales, the eager directions and scales)."""
    model = network()
    eager_model = copy.deepcopy(model)
    batches = [batch(seed) for seed in range(len(FACTORS))]
    kwargs = {"solver": solver, "solver_form": "dual", "tau_prox": 0.3}
    opt = graphed(model, probe=probe, **kwargs)
    seen, scales = run_scaled_steps(opt, model, batches, FACTORS)
    eager = eager_optimizer(eager_model, probe="eager", **kwargs)
    expected, eager_scales = run_scaled_steps(eager, eager_model, batches, FACTORS)
    return opt, seen, scales, expected, eager_scales


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_probed_layers_replay_the_delta_form_with_each_steps_scale(solver):
    """The probe's scale is one of the graph's inputs (on the device), not a captured number:
    replays with another step's scale give that step's eager direction."""
    opt, seen, scales, expected, eager_scales = probed_runs(solver, "eager")
    assert opt.captured_graphs == 2  # the conv (dual from its patches) and the Linear layer
    assert scales == pytest.approx(FACTORS, rel=1e-5)
    assert scales == pytest.approx(eager_scales, rel=1e-12)
    assert_same_directions(seen, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("explicit_inverse", [True, False])
def test_exact_dual_solves_replay(explicit_inverse):
    """Exact solves replay in the dual form (nothing in it reads a value back), with the
    inverse (CPU) or the triangular solves (accelerators)."""
    from proxoptim.costs import CPU

    table = dataclasses.replace(CPU, explicit_inverse=explicit_inverse)
    kwargs = {"solver": "exact", "solver_form": "dual", "device_costs": table}
    model = network()
    eager_model = copy.deepcopy(model)
    batches = [batch(seed) for seed in range(4)]
    opt = graphed(model, **kwargs)
    seen = run_steps(opt, model, batches)
    eager = eager_optimizer(eager_model, **kwargs)
    expected = run_steps(eager, eager_model, batches)
    assert opt.captured_graphs == 2
    assert_same_directions(seen, expected, rtol=1e-5, atol=1e-7)


def test_exact_primal_solves_stay_eager():
    """The primal exact solve reads its factorisation's status back: no graph."""
    model = network()
    opt = graphed(model, solver="exact", solver_form="primal")
    run_steps(opt, model, [batch(seed) for seed in range(3)])
    assert opt.captured_graphs == 0


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_speculative_delta_graphs_give_the_eager_directions(solver):
    """With graphs the probe runs inside the δ-form solve's graph, before its verdict is
    known; where it holds, the directions and scales are the eager probed ones."""
    opt, seen, scales, expected, eager_scales = probed_runs(solver, "auto")
    # The Linear layer, whose δ is captured, speculates; the conv has no δ.
    assert [name for name, plan in opt.plans.items() if plan.speculate] == ["3"]
    assert opt.plans["3"].graphed
    assert scales == pytest.approx(FACTORS, rel=1e-5)
    assert scales == pytest.approx(eager_scales, rel=1e-12)
    assert_same_directions(seen, expected, rtol=1e-5, atol=1e-7)


def test_failed_speculation_redoes_the_layer_in_the_general_form_and_backs_off():
    """A step whose gradient is not s·δᵀŨᵀ (weight decay added to it) fails the probe
    inside the speculative graph: the layer is solved again in the general form, and
    speculates again only after ``speculation_backoff`` steps."""
    model = network()
    eager_model = copy.deepcopy(model)
    batches = [batch(seed) for seed in range(7)]
    decayed = {2}

    def run(opt, model, record):
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step in decayed:
                model[3].weight.grad.add_(model[3].weight.detach(), alpha=1e-2)
            opt.step()
            record.append((opt.last_stats["3"].output_grad_scale, opt.speculation_countdown))
        return opt.inner.seen

    opt = graphed(model, solver="exact", solver_form="dual", speculation_backoff=2, probe="auto")
    eager = eager_optimizer(eager_model, solver="exact", solver_form="dual")
    record, eager_record = [], []
    seen = run(opt, model, record)
    expected = run(eager, eager_model, eager_record)
    assert_same_directions(seen, expected, rtol=1e-5, atol=1e-7)
    scales = [scale for scale, _ in record]
    assert scales[2] is None  # the general form, after the failed speculation
    assert all(scale == pytest.approx(1.0) for i, scale in enumerate(scales) if i != 2)
    assert [scale for scale, _ in eager_record] == pytest.approx(scales)
    backoff = [state.get("3", 0) for _, state in record]
    # Set at the failure, counted down on the next two steps, speculating again after.
    assert backoff == [0, 0, 2, 1, 0, 0, 0]
