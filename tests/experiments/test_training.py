"""The shared training loop: methods, determinism, divergence, agreement with plain torch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.data import load_digits
from proxoptim.experiments.models import build_model
from proxoptim.experiments.training import Method, make_optimizer, train


@pytest.fixture(scope="module")
def digits():
    return load_digits().subset(train=300, val=100, test=100)


def factory():
    return build_model("mlp", (1, 8, 8), width=0.05)


def test_method_names():
    assert Method.parse("backprop") == Method("backprop", "none")
    assert Method.parse("BP").is_backprop
    assert Method.parse("cg7") == Method("cg7", "cg", 7)
    assert Method.parse("cg3-graphs") == Method("cg3-graphs", "cg", 3, cuda_graphs=True)
    assert Method.parse("exact-graphs") == Method("exact-graphs", "exact", cuda_graphs=True)
    assert Method.parse("exact").solver == "exact"
    assert Method.parse("exact-bw") == Method("exact-bw", "exact", solve_in_backward=True)
    assert Method.parse("cg3-graphs-bw") == Method(
        "cg3-graphs-bw", "cg", 3, cuda_graphs=True, solve_in_backward=True
    )
    for bad in ("cg0", "cg", "newton", "cg0-bw", "exact-bw-graphs"):
        with pytest.raises(ValueError, match="cg<k>"):
            Method.parse(bad)


def test_make_optimizer_wraps_only_proxprop_methods():
    model = factory()
    plain = make_optimizer(model, Method.parse("backprop"), "nesterov", 0.1, 1.0)
    assert type(plain) is torch.optim.SGD and plain.param_groups[0]["nesterov"]
    wrapped = make_optimizer(model, Method.parse("cg5"), "adam", 1e-3, 0.5)
    assert isinstance(wrapped, ProxPropOptimizer) and isinstance(wrapped.inner, torch.optim.Adam)
    assert wrapped.cg_iters == 5 and wrapped.tau_prox == 0.5
    assert not wrapped.solve_in_backward
    in_backward = make_optimizer(factory(), Method.parse("exact-bw"), "adam", 1e-3, 0.5)
    assert in_backward.solve_in_backward
    with pytest.raises(ValueError, match="nesterov"):
        make_optimizer(model, Method.parse("cg5"), "rmsprop", 1e-3, 0.5)


def test_runs_are_repeatable_and_record_every_epoch(digits):
    kwargs = dict(
        optimizer="nesterov", lr=1.0, tau_prox=0.05, epochs=3, batch_size=64, progress=False
    )
    first = train(factory, digits, Method.parse("cg3"), **kwargs)
    second = train(factory, digits, Method.parse("cg3"), **kwargs)
    assert [e.train_loss for e in first.epochs] == [e.train_loss for e in second.epochs]
    assert [e.epoch for e in first.epochs] == [0, 1, 2, 3]
    assert first.epochs[-1].train_loss < first.epochs[0].train_loss
    assert len(first.step_seconds) == 3 * math.ceil(300 / 64)
    seconds = [e.seconds for e in first.epochs]
    assert seconds[0] == 0 and seconds == sorted(seconds)
    assert 0 <= first.best_val_accuracy <= 1


def test_backprop_run_matches_a_plain_torch_loop(digits):
    result = train(
        factory,
        digits,
        Method.parse("backprop"),
        optimizer="adam",
        lr=1e-2,
        tau_prox=1.0,
        epochs=1,
        batch_size=100,
        seed=3,
        progress=False,
    )
    torch.manual_seed(3)
    model = factory()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(3)
    order = torch.randperm(300, generator=generator)
    for start in range(0, 300, 100):
        index = order[start : start + 100]
        opt.zero_grad()
        nn.functional.cross_entropy(model(digits.train_x[index]), digits.train_y[index]).backward()
        opt.step()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(digits.train_x), digits.train_y).item()
    assert result.epochs[-1].train_loss == pytest.approx(loss, rel=1e-6)


def test_divergence_is_recorded_not_raised(digits):
    result = train(
        factory,
        digits,
        Method.parse("backprop"),
        optimizer="nesterov",
        lr=1e5,
        tau_prox=1.0,
        epochs=3,
        batch_size=64,
        progress=False,
    )
    assert result.diverged and result.diverged_at_epoch == 1
    assert math.isnan(result.final_train_loss)
    assert result.to_json()["final_train_loss"] is None
