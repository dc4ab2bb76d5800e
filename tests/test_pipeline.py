"""The step pipeline (proxoptim.pipeline): several layers' δ-form CG as one recurrence.

Linear layers whose plans solve in the dual form with δ known share n (the batch), and
their eigenbasis CGs are row-wise independent: the pipeline stacks them into one
recurrence. Checked against the dense oracle (per-row textbook CG on the explicit M),
against each layer solved alone (bit for bit), and by the operators it dispatches.
"""

from __future__ import annotations

import pytest
import torch
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from proxoptim import ProxPropOptimizer


class Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x):
        return x.reshape(*self.shape)


def three_dual_layers() -> tuple[nn.Module, torch.Tensor]:
    """Hidden layers of fan-in 40, 30 and 35 on a batch of 12: each solves in the dual."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(40, 30),
        nn.Tanh(),
        nn.Linear(30, 35),
        nn.Tanh(),
        nn.Linear(35, 25),
        nn.Tanh(),
        nn.Linear(25, 5),
    )
    return model, torch.randn(12, 40)


def two_batch_sizes() -> tuple[nn.Module, torch.Tensor]:
    """A Linear over 6 × 4 tokens (n = 24), then two over the 6 samples (n = 6)."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(10, 30),
        nn.Tanh(),
        Reshape(6, 120),
        nn.Linear(120, 50),
        nn.Tanh(),
        nn.Linear(50, 40),
        nn.Tanh(),
        nn.Linear(40, 3),
    )
    return model, torch.randn(6, 4, 10)


def step(model, x, dtype=torch.float64, **kwargs):
    """One step with a recording inner optimizer: (optimizer, {layer: (input, flat g, flat
    v)}) for every hidden Linear layer."""
    model = model.to(dtype)
    x = x.to(dtype)
    linears = [module for module in model if isinstance(module, nn.Linear)][:-1]
    inputs = {}
    handles = [
        module.register_forward_hook(lambda m, args, out: inputs.__setitem__(m, args[0]))
        for module in linears
    ]
    opt = ProxPropOptimizer(model, Recorder, **kwargs)
    generator = torch.Generator().manual_seed(5)
    out = model(x)
    (out * torch.randn(out.shape, generator=generator, dtype=dtype)).sum().backward()
    grads = {m: flatten_pair(m.weight.grad, m.bias.grad).clone() for m in linears}
    opt.step()
    seen = opt.inner.seen[-1]
    for handle in handles:
        handle.remove()
    layers = {
        m: (inputs[m].detach(), grads[m], flatten_pair(seen[m.weight], seen[m.bias]))
        for m in linears
    }
    return opt, layers


@pytest.mark.parametrize("build", [three_dual_layers, two_batch_sizes])
@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_stacked_dual_cg_matches_textbook_cg_on_every_row(build, iterations):
    model, x = build()
    opt, layers = step(model, x, solver="cg", cg_iters=iterations, solver_form="dual", tau_prox=0.7)
    assert {stats.form for stats in opt.last_stats.values()} == {"dual"}
    assert all(stats.output_grad_scale is not None for stats in opt.last_stats.values())
    assert all(stats.iterations == iterations for stats in opt.last_stats.values())
    for module, (layer_input, grad, direction) in layers.items():
        expected = oracle_direction(module, [layer_input], grad, 0.7, cg_iters=iterations)
        assert relative_error(direction, expected) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_directions_are_those_of_each_layer_alone_bit_for_bit(dtype):
    """With ``diagnostics=True`` every layer is solved alone (its residual is per layer);
    the stacked recurrence runs the same operations on the same rows."""
    directions = []
    for diagnostics in (False, True):
        model, x = three_dual_layers()
        _, layers = step(model, x, dtype, solver="cg", cg_iters=4, diagnostics=diagnostics)
        directions.append([direction for _, _, direction in layers.values()])
    for stacked, alone in zip(*directions, strict=True):
        assert torch.equal(stacked, alone)


class CountOperators(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def operators_per_extra_iteration(build, **kwargs) -> float:
    """(operators of a step at 6 CG iterations − at 2) / 4, after warm-up steps."""
    counts = []
    for iterations in (2, 6):
        model, x = build()
        opt = ProxPropOptimizer(
            model,
            torch.optim.SGD,
            lr=1e-6,
            solver="cg",
            cg_iters=iterations,
            solver_form="dual",
            **kwargs,
        )
        for _ in range(3):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        opt.zero_grad()
        model(x).square().sum().backward()
        with CountOperators() as counter:
            opt.step()
        counts.append(counter.calls)
    return (counts[1] - counts[0]) / 4


def test_one_recurrence_serves_every_layer_with_the_same_n():
    """9 operators per CG iteration for three dual layers together (27 alone: the
    diagnostics path solves each layer alone); two recurrences where n differs."""
    assert operators_per_extra_iteration(three_dual_layers) == 9
    assert operators_per_extra_iteration(three_dual_layers, diagnostics=True) == 27
    assert operators_per_extra_iteration(two_batch_sizes) == 18


def test_stacks_stay_within_a_block_of_rows_on_the_cpu():
    """The CPU runs the dual CG a block of 1,024 rows at a time (its vectors stay in
    cache): layers of 600 rows each are not stacked past a block."""

    def wide() -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(2)
        model = nn.Sequential(
            nn.Linear(20, 600), nn.Tanh(), nn.Linear(600, 600), nn.Tanh(), nn.Linear(600, 3)
        )
        return model, torch.randn(8, 20)

    assert operators_per_extra_iteration(wide) == 18
