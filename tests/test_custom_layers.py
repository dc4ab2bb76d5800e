"""register_layer: layers ProxProp has never seen, checked against the dense oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn

from proxoptim import ProxPropOptimizer, register_layer, unregister_layer


def conv_transpose(module, x, weight, bias):
    return F.conv_transpose2d(
        x,
        weight,
        bias,
        module.stride,
        module.padding,
        module.output_padding,
        module.groups,
        module.dilation,
    )


class DoubledLinear(nn.Module):
    """A custom layer with its own weight: z = x (2W)ᵀ + b."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in) / fan_in**0.5)
        self.bias = nn.Parameter(torch.zeros(fan_out))

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias)


@pytest.fixture
def registered():
    kinds = [
        register_layer(nn.ConvTranspose2d, conv_transpose, rows_axis=1),
        register_layer(DoubledLinear, lambda m, x, w, b: F.linear(x, 2 * w, b)),
    ]
    yield kinds
    unregister_layer(nn.ConvTranspose2d)
    unregister_layer(DoubledLinear)


def direction_of(module, x, rows_axis, **kwargs):
    opt = ProxPropOptimizer(module, Recorder, exclude_last=False, diagnostics=True, **kwargs)
    out = module(x)
    generator = torch.Generator().manual_seed(3)
    (out * torch.randn(out.shape, generator=generator, dtype=out.dtype)).sum().backward()
    grad = flatten_pair(module.weight.grad, module.bias.grad)
    opt.step()
    seen = opt.inner.seen[-1]
    (stats,) = opt.last_stats.values()
    opt.remove_hooks()
    module.zero_grad()
    return flatten_pair(seen[module.weight], seen[module.bias]), grad, stats


@pytest.mark.parametrize("solver", ["cg", "exact"])
def test_conv_transpose_matches_the_dense_oracle(registered, solver):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1).double()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    if solver == "exact":
        with pytest.warns(UserWarning, match="CG to convergence"):
            direction, grad, stats = direction_of(layer, x, 1, solver="exact")
        expected = oracle_direction(layer, [x], grad, 1.0, None, rows_axis=1)
    else:
        direction, grad, stats = direction_of(layer, x, 1, solver="cg", cg_iters=4)
        expected = oracle_direction(layer, [x], grad, 1.0, 4, rows_axis=1)
    assert stats.form == "matrix_free"
    assert relative_error(direction, expected) <= 1e-8


def test_custom_module_with_its_own_weight(registered):
    torch.manual_seed(0)
    layer = DoubledLinear(5, 3).double()
    x = torch.rand(4, 5, dtype=torch.float64)
    direction, grad, _ = direction_of(layer, x, 0, solver="cg", cg_iters=3, tau_prox=0.5)
    expected = oracle_direction(layer, [x], grad, 0.5, 3)
    assert relative_error(direction, expected) <= 1e-8


def test_register_layer_rejects_bad_and_duplicate_registrations(registered):
    with pytest.raises(ValueError, match="already registered"):
        register_layer(nn.ConvTranspose2d, conv_transpose)
    with pytest.raises(ValueError, match="already registered"):
        register_layer(nn.Linear, F.linear)
    with pytest.raises(ValueError, match="nn.Module subclass"):
        register_layer("Linear", F.linear)


def test_unregistered_layers_pass_through():
    model = nn.Sequential(nn.ConvTranspose2d(2, 2, 2), nn.Flatten(), nn.Linear(2 * 5 * 5, 3))
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1)
    assert opt.layer_names == ["2"]


def test_exact_solve_without_room_for_the_gram_runs_cg_to_convergence():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="no Gram within the memory limit"):
        direction, grad, stats = direction_of(layer, x, 0, solver="exact", max_gram_elements=10)
    assert stats.form == "matrix_free" and stats.iterations > 1
    assert stats.relative_residual <= 1e-11
    expected = oracle_direction(layer, [x], grad, 1.0, None)
    assert relative_error(direction, expected) <= 1e-8
