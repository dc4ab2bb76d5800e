"""LayerStats: computed from g and v (read back once per step), and packed for
broadcasting without loss."""

import math

import pytest
import torch

from proxoptim.operators import LayerSystem, RowLayout, kind_for
from proxoptim.solvers import Solution
from proxoptim.stats import LayerStats, layer_stats, pack, resolve_stats, unpack


def test_pack_round_trip():
    stats = LayerStats("dual", 3, 0.25, 0.5, 0.01, 500, 0.125)
    assert unpack(pack(stats)) == stats
    assert unpack(pack(LayerStats("primal", 0, 1e-9, 1.0, 2.0, 7))).output_grad_scale is None


def test_layer_stats_measure_cosine_and_residual_and_keep_nans():
    layer = torch.nn.Linear(3, 2)
    system = LayerSystem(
        RowLayout(layer.weight.shape, 1, True),
        [(layer, kind_for(layer), torch.rand(4, 3), None)],
        torch.float32,
    )
    grad_weight, grad_bias = torch.ones(2, 3), torch.ones(2)
    solution = Solution(2 * grad_weight, 2 * grad_bias, 3, torch.tensor(0.5))
    pending = layer_stats("primal", solution, grad_weight, grad_bias, 0.1, system, None)
    assert pending.values.dtype == torch.float64  # still a tensor: no sync per layer
    stats = resolve_stats({"layer": pending})["layer"]
    assert stats.cosine == pytest.approx(1.0)
    assert stats.relative_residual == pytest.approx(0.5 / math.sqrt(8))
    assert stats.columns == 4 and stats.iterations == 3
    broken = Solution(grad_weight * float("nan"), grad_bias, 3, torch.tensor(0.5))
    pending = {
        "broken": layer_stats("primal", broken, grad_weight, grad_bias, 0, system, None),
        "fine": layer_stats("dual", solution, grad_weight, grad_bias, 0, system, 2.0),
    }
    resolved = resolve_stats(pending)
    assert math.isnan(resolved["broken"].cosine)
    assert resolved["fine"].cosine == pytest.approx(1.0)
    assert resolved["fine"].form == "dual" and resolved["fine"].output_grad_scale == 2.0
