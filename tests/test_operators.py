"""A, A*, A*A and the primal Gram of every layer kind against the autograd Jacobian."""

from __future__ import annotations

import pytest
import torch
from layer_cases import LAYER_CASES
from oracle import flatten_pair, jacobian, relative_error, row_indices
from torch import nn
from torch.nn.utils import parametrize

from proxoptim.operators import LayerSystem, LinearKind, RowLayout, kind_for


def system_for(module, inputs):
    kind = kind_for(module)
    layout = RowLayout(module.weight.shape, kind.groups(module), module.bias is not None)
    return layout, LayerSystem(layout, [(module, kind, x, None) for x in inputs], torch.float64)


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_forward_and_adjoint_are_the_jacobian_and_its_transpose(case):
    module, sample = case.make()
    x = sample(2)
    kind = kind_for(module)
    layout, system = system_for(module, [x])
    prepared = system.calls[0].x
    jac = jacobian(module, [x])
    theta = torch.randn(jac.shape[1], dtype=torch.float64)
    weight, bias = layout.from_rows(layout.to_rows(*_split(module, theta)))
    output = kind.forward(module, prepared, weight, bias)
    assert relative_error(output.flatten(), jac @ theta) <= 1e-12
    cotangent = torch.randn(output.shape, dtype=torch.float64)
    grad_weight, grad_bias = kind.adjoint(module, prepared, cotangent, module.weight.shape)
    expected = jac.T @ cotangent.flatten()
    actual = flatten_pair(grad_weight, grad_bias if module.bias is not None else None)
    assert relative_error(actual, expected) <= 1e-12


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_gram_apply_is_jtj(case):
    module, sample = case.make(seed=1)
    inputs = [sample(2), sample(1)]
    layout, system = system_for(module, inputs)
    jac = jacobian(module, inputs)
    theta = torch.randn(jac.shape[1], dtype=torch.float64)
    rows = layout.to_rows(*_split(module, theta))
    actual = flatten_pair(*layout.from_rows(system.gram_apply(rows)))
    assert relative_error(actual, jac.T @ (jac @ theta)) <= 1e-12
    assert system.num_columns == jac.shape[0] // module.weight.shape[0]


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
def test_jtj_is_block_diagonal_and_gram_is_each_block(case):
    """The row structure the library relies on, checked on the full JᵀJ."""
    module, sample = case.make(seed=2)
    inputs = [sample(3)]
    layout, system = system_for(module, inputs)
    jtj = jacobian(module, inputs).T @ jacobian(module, inputs)
    gram = system.gram()
    rows = row_indices(module)
    covered = torch.zeros_like(jtj, dtype=torch.bool)
    for j, index in enumerate(rows):
        block = jtj[index][:, index]
        group = j // layout.rows_per_group
        assert relative_error(gram[group], block) <= 1e-12
        covered[index.unsqueeze(1), index.unsqueeze(0)] = True
    assert torch.all(jtj[~covered] == 0)


def test_gram_chunking_gives_the_same_matrix(monkeypatch):
    module, sample = LAYER_CASES[4].make()
    inputs = [sample(5)]
    _, system = system_for(module, inputs)
    whole = system.gram()
    monkeypatch.setattr("proxoptim.operators.PATCH_CHUNK_ELEMENTS", 1)
    chunked = system.gram()
    assert relative_error(chunked, whole) <= 1e-14


def test_row_layout_round_trip():
    layout = RowLayout(torch.Size([6, 2, 3]), groups=3, has_bias=True)
    weight, bias = torch.randn(6, 2, 3), torch.randn(6)
    rows = layout.to_rows(weight, bias)
    assert rows.shape == (3, 2, 7)
    assert torch.equal(rows[1, 0, :6], weight[2].flatten()) and rows[1, 0, 6] == bias[2]
    back_weight, back_bias = layout.from_rows(rows)
    assert torch.equal(back_weight, weight) and torch.equal(back_bias, bias)
    no_bias = RowLayout(torch.Size([6, 2, 3]), groups=1, has_bias=False)
    assert no_bias.to_rows(weight, None).shape == (1, 6, 6)
    assert no_bias.from_rows(no_bias.to_rows(weight, None))[1] is None


@pytest.mark.parametrize(
    ("weight_shape", "groups", "has_bias", "rows_axis"),
    [
        ((5, 7), 1, True, 0),  # Linear
        ((5, 7), 1, False, 0),
        ((6, 2, 3, 3), 1, True, 0),  # Conv2d
        ((6, 2, 3, 3), 2, True, 0),  # grouped: the general path
        ((2, 6, 3, 3), 1, True, 1),  # ConvTranspose: rows on axis 1
    ],
)
def test_write_rows_copies_what_from_rows_gives(weight_shape, groups, has_bias, rows_axis):
    layout = RowLayout(torch.Size(weight_shape), groups, has_bias, rows_axis)
    rows = torch.randn(groups, layout.rows_per_group, layout.row_dim)
    weight, bias = torch.empty(weight_shape), torch.empty(layout.rows) if has_bias else None
    layout.write_rows(rows, weight, bias)
    expected_weight, expected_bias = layout.from_rows(rows)
    assert torch.equal(weight, expected_weight)
    assert (bias is None) == (expected_bias is None)
    if has_bias:
        assert torch.equal(bias, expected_bias)


def test_kind_for_recognises_supported_modules_only():
    assert isinstance(kind_for(nn.Linear(2, 2)), LinearKind)
    assert kind_for(nn.Conv3d(1, 1, 1)).spatial_dims == 3
    assert kind_for(nn.LazyLinear(3)) is not None
    assert kind_for(nn.BatchNorm1d(2)) is None
    assert kind_for(nn.ConvTranspose2d(1, 1, 2)) is None
    assert kind_for(nn.Bilinear(2, 2, 2)) is None

    class Overridden(nn.Linear):
        def forward(self, x):
            return super().forward(x**2)

    class Inherited(nn.Linear):
        pass

    assert kind_for(Overridden(2, 2)) is None
    assert kind_for(Inherited(2, 2)) is not None

    class Doubled(nn.Module):
        def forward(self, weight):
            return 2 * weight

    parametrized = nn.Linear(2, 2)
    parametrize.register_parametrization(parametrized, "weight", Doubled())
    assert kind_for(parametrized) is None


def _split(module, theta):
    weight_numel = module.weight.numel()
    weight = theta[:weight_numel].reshape(module.weight.shape)
    bias = theta[weight_numel:] if module.bias is not None else None
    return weight, bias


@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("batched", [True, False])
def test_columns_of_a_raw_input_match_the_prepared_one(case, batched):
    """Convolutions count n from the input's shape without preparing (padding) it."""
    module, sample = case.make()
    x = sample(3) if batched else sample(1)[0]
    kind = kind_for(module)
    prepared = kind.prepare(module, x, torch.float64)
    counted = kind.count_columns(module, x)
    assert counted == (kind.num_columns(module, prepared) if kind.im2col else None)
    assert LayerSystem(
        RowLayout(module.weight.shape, kind.groups(module), module.bias is not None),
        [(module, kind, x, None)],
        torch.float64,
    ).num_columns == kind.num_columns(module, prepared)
