"""Property-based checks (hypothesis): random layers of every kind, every form, the oracle.

Every applicable solve form agrees with the dense float64 oracle, and every direction
(float32 and float64, any k) is a descent direction.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import Recorder, flatten_pair, oracle_direction, relative_error
from torch import nn

from proxoptim import ProxPropOptimizer


@st.composite
def layers(draw):
    """(module, input) for a random Linear or Conv{1,2,3}d configuration."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 4))
    if kind == "linear":
        fan_in, fan_out = draw(st.integers(1, 7)), draw(st.integers(1, 5))
        leading = draw(st.lists(st.integers(1, 3), max_size=2))
        return nn.Linear(fan_in, fan_out, bias=bias), (batch, *leading, fan_in)
    dims = int(kind[-2])
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 2))
    out_channels = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple(draw(st.integers(0, 1)) for _ in range(dims))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    size = tuple(
        max(draw(st.integers(1, 5)), d * (k - 1) + 1 - 2 * p, p + 1)
        for k, d, p in zip(kernel, dilation, padding, strict=True)
    )
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](
        in_channels,
        out_channels,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    return conv, (batch, in_channels, *size)


def step_direction(module, shape, seed, dtype, **kwargs):
    module = module.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=generator, dtype=dtype)
    opt = ProxPropOptimizer(module, Recorder, exclude_last=False, diagnostics=True, **kwargs)
    out = module(x)
    (out * torch.randn(out.shape, generator=generator, dtype=dtype)).sum().backward()
    bias_grad = module.bias.grad if module.bias is not None else None
    grad = flatten_pair(module.weight.grad, bias_grad).clone()
    opt.step()
    seen = opt.inner.seen[-1]
    direction = flatten_pair(seen[module.weight], seen.get(module.bias))
    (stats,) = opt.last_stats.values()
    opt.remove_hooks()
    module.zero_grad()
    return direction, grad, x, stats


# The number of examples, the deadline and derandomisation come from the profile
# (tests/conftest.py: 100 examples each, derandomised on CI).
PROPERTY_SETTINGS = settings(suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(
    layer=layers(),
    seed=st.integers(0, 10**6),
    cg_iters=st.integers(1, 6),
    tau_prox=st.sampled_from([0.05, 1.0, 20.0]),
)
def test_every_form_agrees_with_the_dense_oracle(layer, seed, cg_iters, tau_prox):
    module, shape = layer
    dual = ["dual"] if getattr(module, "groups", 1) == 1 else []
    for form in ["matrix_free", "primal", *dual]:
        direction, grad, x, stats = step_direction(
            module,
            shape,
            seed,
            torch.float64,
            solver="cg",
            cg_iters=cg_iters,
            tau_prox=tau_prox,
            solver_form=form,
        )
        assert stats.form == form
        if grad.norm() == 0:
            assert direction.norm() == 0
            continue
        expected = oracle_direction(module, [x], grad, tau_prox, cg_iters)
        assert relative_error(direction, expected) <= 1e-7, form
    for form in ["primal", *dual]:
        direction, grad, x, _ = step_direction(
            module,
            shape,
            seed,
            torch.float64,
            solver="exact",
            tau_prox=tau_prox,
            solver_form=form,
        )
        if grad.norm() > 0:
            expected = oracle_direction(module, [x], grad, tau_prox, None)
            assert relative_error(direction, expected) <= 1e-7, form


@PROPERTY_SETTINGS
@given(
    layer=layers(),
    seed=st.integers(0, 10**6),
    cg_iters=st.integers(1, 8),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    tau_prox=st.sampled_from([0.01, 1.0, 100.0]),
)
def test_every_direction_is_a_descent_direction(layer, seed, cg_iters, dtype, tau_prox):
    module, shape = layer
    direction, grad, _, stats = step_direction(
        module, shape, seed, dtype, solver="cg", cg_iters=cg_iters, tau_prox=tau_prox
    )
    if grad.norm() > 0:
        assert float((direction.double() * grad.double()).sum()) > 0
        assert stats.cosine > 0
