"""pytest-benchmark: step time of backprop and ProxProp on the paper's networks.

    pytest benchmarks/bench_step_time.py
    pytest benchmarks/bench_step_time.py -k mlp --benchmark-columns=median,iqr

Every case times one full step (zero_grad, forward, backward, step) at batch 500 with the
paper's inner optimizer (Nesterov SGD for the MLP, Adam for the CNN), on the CPU and, when
present, on CUDA, grouped by network and device. Compare rows within a group;
``step_ratio.py`` prints the ratios directly.

A benchmark, not a test: it measures and asserts nothing, so its name keeps it out of test
collection (``pytest``, ``pytest benchmarks``); pytest still collects a file named on its
command line, whatever its name.
"""

from __future__ import annotations

import pytest
import torch
from step_ratio import make_step

from proxoptim.experiments.models import build_model
from proxoptim.experiments.training import Method, make_optimizer

METHODS = ["backprop", "cg1", "cg3", "cg5", "cg10", "exact"]
NETWORKS = {"mlp": "nesterov", "cnn": "adam"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_step_time(benchmark, network, method, device):
    torch.manual_seed(0)
    model = build_model(network, (3, 32, 32), 10).to(device)
    x = torch.rand(500, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (500,), device=device)
    opt = make_optimizer(model, Method.parse(method), NETWORKS[network], 1e-6, 1.0)
    step = make_step(model, opt, x, y)

    def synchronized_step():
        step()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"{network}-{device}"
    benchmark.pedantic(synchronized_step, rounds=5, warmup_rounds=1)
