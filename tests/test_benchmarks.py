"""Every benchmark script imports against the current library (they run outside CI)."""

from __future__ import annotations

import importlib
import pathlib
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(
    path.stem
    for path in BENCHMARKS.glob("*.py")
    if path.stem != "conftest" and not path.stem.startswith("test_")
)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None))
    monkeypatch.delitem(sys.modules, name)


def test_dual_budget_captures_each_preconditioned_layers_input_delta_and_gradient(monkeypatch):
    """The budget times products of the real X, δ and g: g must be δᵀX (no bias column
    in these products; the bias gradient is δ's column sums) for every layer but the
    output layer, and every piece must run on them."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    budget = importlib.import_module("dual_budget")
    try:
        torch.manual_seed(0)
        model = budget.build_network("mlp", 0.02)
        x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
        layers = budget.captured_layers(model, x, y)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(layers) == len(linears) - 1
        for (inputs, deltas, grad), linear in zip(layers, linears, strict=False):
            assert inputs.shape == (12, linear.in_features)
            assert deltas.shape == (12, linear.out_features)
            torch.testing.assert_close(grad, deltas.T @ inputs, rtol=1e-4, atol=1e-6)
            pieces = budget.layer_pieces(inputs, deltas, grad, tau_prox=1.0)
            assert set(pieces) == set(budget.PIECES)
            for piece in pieces.values():
                piece()
    finally:
        monkeypatch.delitem(sys.modules, "dual_budget")


def test_peak_tensor_memory_counts_live_tensors_not_their_sum(monkeypatch):
    """The CPU stand-in for max_memory_allocated: 4 MiB and 2 MiB alive together peak at
    6 MiB; freed before a 5 MiB tensor, the peak stays 6 (not 11)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    step_ratio = importlib.import_module("step_ratio")
    try:

        def run() -> None:
            first = torch.ones(1 << 20)  # 4 MiB of float32
            second = torch.ones(1 << 19)  # 2 MiB
            del first, second
            third = torch.ones(5 << 18)  # 5 MiB
            del third

        assert abs(step_ratio.peak_tensor_mib(run) - 6.0) < 0.1
    finally:
        monkeypatch.delitem(sys.modules, "step_ratio")
