"""Layer discovery: wrappers unwrapped, tied weights merged, exclusions resolved."""

import pytest
import torch
from torch import nn

from proxoptim.layers import find_layers, resolve_exclusions, unwrap


def test_unwrap_sees_through_data_parallel_and_compile():
    model = nn.Sequential(nn.Linear(2, 2))
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(torch.compile(model, backend="eager")) is model
    assert unwrap(model) is model


def test_tied_weights_with_different_biases_are_excluded_with_a_warning():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    with pytest.warns(UserWarning, match="shares its weight"):
        layers = find_layers(model, set())
    assert len(layers) == 1 and layers[0].excluded and len(layers[0].modules) == 2


def test_exclusions_cover_containers_and_accept_a_single_name():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 1))
    excluded = resolve_exclusions(model, "0")
    assert model[0][0] in excluded and model[0][1] in excluded and model[1] not in excluded
    layers = find_layers(model, excluded)
    assert [(layer.name, layer.excluded) for layer in layers] == [
        ("0.0", True),
        ("0.1", True),
        ("1", False),
    ]
