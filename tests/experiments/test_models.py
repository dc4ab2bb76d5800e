"""The paper's networks have the paper's shapes, and shrink to small inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from proxoptim.experiments.models import build_model, cnn, mlp


def linear_sizes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_paper_mlp_is_3072_4000_1000_4000_10():
    model = mlp((3, 32, 32))
    assert linear_sizes(model) == [(3072, 4000), (4000, 1000), (1000, 4000), (4000, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model) == 3
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(("variant", "fan_in"), [("paper", 320), ("reference", 1280)])
def test_paper_cnn_variants(variant, fan_in):
    model = cnn((3, 32, 32), variant)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 16), (16, 20), (20, 20)]
    assert all(c.kernel_size == (5, 5) and c.padding == (2, 2) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model) == (3 if variant == "paper" else 2)
    assert linear_sizes(model) == [(fan_in, 10)]
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_variants_run_on_digits_sized_inputs():
    for name in ("mlp", "cnn", "cnn-reference"):
        model = build_model(name, (1, 8, 8), classes=10, width=0.5)
        assert model(torch.rand(4, 1, 8, 8)).shape == (4, 10)
    assert linear_sizes(build_model("mlp", (1, 8, 8), width=0.1)) == [
        (64, 400),
        (400, 100),
        (100, 400),
        (400, 10),
    ]


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="mlp"):
        build_model("resnet", (1, 8, 8))
    with pytest.raises(ValueError, match="paper"):
        cnn((1, 8, 8), variant="other")
