"""ProxProp combined with what real training runs use: AMP, torch.compile, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from oracle import Recorder, relative_error
from torch import nn
from torch.utils.checkpoint import checkpoint

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.models import mlp


def directions_of(model, forward, **kwargs):
    """{weight name: direction} of one step with a recording inner optimizer."""
    opt = ProxPropOptimizer(model, Recorder, **kwargs)
    forward(model).backward()
    opt.step()
    named = dict(model.named_parameters())
    seen = opt.inner.seen[-1]
    result = {
        name.replace("_orig_mod.", ""): seen[p].float() for name, p in named.items() if p in seen
    }
    opt.remove_hooks()
    return result, opt


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_bf16_autocast_direction_matches_fp32_on_the_paper_mlp():
    torch.manual_seed(0)
    model = mlp((3, 32, 32))
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))

    def loss(m):
        return nn.functional.cross_entropy(m(x), y)

    def autocast_loss(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.cross_entropy(m(x), y)

    full, _ = directions_of(model, loss)
    model.zero_grad()
    mixed, opt = directions_of(model, autocast_loss)
    assert {stats.form for stats in opt.last_stats.values()} == {"dual"}
    for name in ("1.weight", "3.weight", "5.weight"):
        assert cosine(mixed[name], full[name]) >= 0.99, name


def test_bf16_parameters_are_solved_in_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    x, y = torch.rand(10, 6, dtype=torch.bfloat16), torch.randint(0, 3, (10,))
    opt = ProxPropOptimizer(model, Recorder, exclude_last=False)
    nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()
    direction = opt.inner.seen[-1][model[0].weight]
    assert direction.dtype == torch.bfloat16 and torch.isfinite(direction).all()
    assert float((direction.float() * model[0].weight.grad.float()).sum()) > 0


def test_grad_scaler_skipped_step_leaves_the_next_step_clean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(10, 6), torch.randint(0, 3, (10,))
    opt = ProxPropOptimizer(model, Recorder)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)  # skipped: found inf
    scaler.update()
    assert opt.inner.seen == []
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    assert opt.last_stats["0"].columns == 10  # only the second step's batch
    clean, _ = directions_of(copy.deepcopy(model), lambda m: nn.functional.cross_entropy(m(x), y))
    assert relative_error(opt.inner.seen[-1][model[0].weight], clean["0.weight"]) < 1e-4


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_direction(use_reentrant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(10, 6, requires_grad=use_reentrant), torch.randint(0, 3, (10,))

    def plain(m):
        return nn.functional.cross_entropy(m(x), y)

    def checkpointed(m):
        hidden = checkpoint(m[:4], x, use_reentrant=use_reentrant)
        return nn.functional.cross_entropy(m[4](hidden), y)

    expected, _ = directions_of(model, plain)
    model.zero_grad()
    actual, opt = directions_of(model, checkpointed)
    assert opt.last_stats["0"].columns == 10  # the recomputation is not counted twice
    for name, direction in expected.items():
        assert relative_error(actual[name], direction) <= 1e-6, name


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_torch_compile_gives_the_eager_direction(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(10, 6), torch.randint(0, 3, (10,))

    def loss(m):
        return nn.functional.cross_entropy(m(x), y)

    expected, _ = directions_of(model, loss)
    model.zero_grad()
    compiled = torch.compile(model, backend=backend)
    actual, opt = directions_of(compiled, loss)
    assert set(opt.last_stats) == {"0", "2"}  # names of the user's model, not _orig_mod.*
    for name, direction in expected.items():
        assert relative_error(actual[name], direction) <= 1e-5
