"""The correlation-form Gram of stride-1 convolutions against the Jacobian and im2col.

proxoptim.conv_gram builds G = ŨŨᵀ from FFT correlations of the input plus edge
corrections; every entry must equal the im2col Gram (and so the diagonal blocks of JᵀJ)
for every padding, dilation, group count, kernel and input size, and the optimizer's
directions through it must match the dense oracle.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import jacobian, oracle_direction, relative_error, row_indices
from test_directions import proxprop_direction
from torch import nn

from proxoptim.conv_gram import AxisGeometry, conv_gram
from proxoptim.costs import CPU
from proxoptim.operators import LayerSystem, RowLayout, kind_for

CONFIGS = {
    "paper-conv-5x5-pad2": (lambda: nn.Conv2d(3, 4, 5, padding=2), (3, 7, 6)),
    "no-padding": (lambda: nn.Conv2d(2, 3, 3), (2, 5, 6)),
    "padding-beyond-the-kernel": (lambda: nn.Conv2d(2, 2, 2, padding=3), (2, 3, 4)),
    "dilation-groups": (
        lambda: nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(2, 3), groups=2),
        (4, 7, 6),
    ),
    "depthwise": (lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False), (3, 4, 5)),
    "one-by-one": (lambda: nn.Conv2d(3, 2, 1), (3, 4, 3)),
    "kernel-covers-the-input": (lambda: nn.Conv2d(2, 2, 4, padding=1), (2, 2, 3)),
    "conv1d-same-even-kernel": (lambda: nn.Conv1d(3, 2, 4, padding="same"), (3, 9)),
    "conv1d-reflect": (lambda: nn.Conv1d(2, 2, 3, padding=2, padding_mode="reflect"), (2, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, (3, 2, 3), padding=(1, 1, 2)), (2, 4, 3, 5)),
    "conv3d-dilation-no-bias": (
        lambda: nn.Conv3d(2, 2, 2, padding=1, dilation=(1, 2, 1), bias=False),
        (2, 3, 4, 3),
    ),
}


def build(name, batch=3, seed=0):
    factory, shape = CONFIGS[name]
    torch.manual_seed(seed)
    module = factory().double()
    x = torch.rand(batch, *shape, dtype=torch.float64)
    return module, x


def system(module, inputs, dtype=torch.float64, gram_sources=None):
    kind = kind_for(module)
    layout = RowLayout(module.weight.shape, kind.groups(module), module.bias is not None)
    calls = [(module, kind, x, None) for x in inputs]
    return LayerSystem(layout, calls, dtype, gram_sources=gram_sources)


def _prefer_correlations(monkeypatch):
    infinite_copies = dataclasses.replace(CPU, im2col_per_element=float("inf"))
    monkeypatch.setattr("proxoptim.operators.device_costs", lambda device: infinite_copies)


@pytest.fixture
def from_correlations(monkeypatch):
    """Make every stride-1 convolution build its Gram from correlations."""
    _prefer_correlations(monkeypatch)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gram_is_each_diagonal_block_of_jtj(name, from_correlations):
    module, x = build(name)
    layer = system(module, [x, x[:1] * 2.0])
    assert all(source for source, _ in layer.gram_sources())
    jac = jacobian(module, [x, x[:1] * 2.0])
    jtj = jac.T @ jac
    gram = layer.gram()
    rows_per_group = module.weight.shape[0] // module.groups
    for row, index in enumerate(row_indices(module)):
        block = jtj[index][:, index]
        assert relative_error(gram[row // rows_per_group], block) <= 1e-12


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_correlation_and_patches_give_the_same_gram(name, monkeypatch):
    module, x = build(name, batch=4, seed=1)
    _prefer_correlations(monkeypatch)
    layer = system(module, [x])
    assert all(source for source, _ in layer.gram_sources())
    correlated = layer.gram()
    patched = system(module, [x], gram_sources=[(False, 0.0)])
    assert relative_error(correlated, patched.gram()) <= 1e-12


def test_float32_correlation_gram_is_accurate():
    """FFT rounding stays at float32 level for a paper-CNN-sized layer."""
    torch.manual_seed(0)
    x = torch.rand(8, 16, 16, 16)
    padding = ((2, 2), (2, 2))
    single, single_sums = conv_gram(x, (5, 5), (1, 1), padding, 1)
    double, double_sums = conv_gram(x.double(), (5, 5), (1, 1), padding, 1)
    assert single.dtype == torch.float32
    # FFT roundoff grows like u32·c·log₂N (u32 = 6e-8, c ≤ 5, transforms of N ≤ 20² points:
    # about 45 ulps, 2.7e-6) plus a few ulps for the batch sum; measured 2.9e-7. The patch
    # sums add 2048 inputs: pairwise summation stays within log₂2048 = 11 ulps (measured
    # 3e-8). Cancellation in the edge corrections would cost far more than either bound.
    assert relative_error(single.double(), double) <= 4e-6
    assert relative_error(single_sums.double(), double_sums) <= 1e-6


@pytest.mark.parametrize("name", ["paper-conv-5x5-pad2", "dilation-groups", "conv3d"])
@pytest.mark.parametrize("cg_iters", [None, 3])
def test_directions_through_the_correlation_gram(name, cg_iters, from_correlations):
    module, x = build(name, batch=2)
    solver = {"solver": "exact"} if cg_iters is None else {"solver": "cg", "cg_iters": cg_iters}
    direction, grad, opt = proxprop_direction(
        module, [x], tau_prox=0.7, solver_form="primal", **solver
    )
    expected = oracle_direction(module, [x], grad, 0.7, cg_iters=cg_iters)
    assert relative_error(direction, expected) <= 1e-8
    assert next(iter(opt.last_stats.values())).form == "primal"


def test_strided_convolutions_use_patches():
    module = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    layer = system(module, [torch.rand(2, 2, 6, 6, dtype=torch.float64)])
    assert kind_for(module).correlation_gram(module, layer.calls[0].raw, torch.float64) is None
    assert layer.gram_sources() == [(False, layer.gram_cost())]


def test_cost_prefers_correlations_for_many_positions_and_im2col_for_few():
    """Many positions per channel pair (the paper CNN): correlations; ResNet-18's last
    stage (512 channels on 7×7 at batch 32): im2col, whose GEMM wins there (measured with
    benchmarks/conv_gram_cost.py)."""
    paper = nn.Conv2d(16, 20, 5, padding=2)
    small = system(paper, [torch.zeros(50, 16, 16, 16)], torch.float32)
    large = system(paper, [torch.zeros(500, 16, 16, 16)], torch.float32)
    assert large.gram_sources()[0][0]
    assert small.gram_cost() < large.gram_cost() < 10 * small.gram_cost()
    deep = nn.Conv2d(512, 512, 3, padding=1, bias=False)
    assert not system(deep, [torch.zeros(32, 512, 7, 7)], torch.float32).gram_sources()[0][0]


def test_axis_geometry_edges_and_windows():
    # 'same' 5-tap convolution on 8 positions: offsets 0, 1 leave out the last 2, 1
    # positions, offsets 3, 4 the first 1, 2.
    axis = AxisGeometry(size=8, kernel=5, dilation=1, pad_before=2, pad_after=2)
    assert axis.outputs == 8
    assert [list(axis.window(a)) for a in (0, 2, 4)] == [
        list(range(0, 6)),
        list(range(0, 8)),
        list(range(2, 8)),
    ]
    assert axis.edges == [0, 1, 6, 7]
    mask = axis.excluded(torch.float64, torch.device("cpu"))
    assert mask.tolist() == [
        [0, 0, 1, 1],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
        [1, 0, 0, 0],
        [1, 1, 0, 0],
    ]


@st.composite
def stride_one_convolutions(draw):
    dims = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 4))) for _ in range(dims))
    sizes = tuple(
        max(draw(st.integers(1, 7)), d * (k - 1) + 1 - before - after)
        for k, d, (before, after) in zip(kernel, dilation, padding, strict=True)
    )
    channels = groups * draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    return dims, groups, kernel, dilation, padding, sizes, channels, batch


@given(stride_one_convolutions(), st.integers(0, 2**16))
@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])  # deadline: profile
def test_correlation_gram_equals_im2col_for_random_geometries(config, seed):
    """Asymmetric zero padding (any amount), dilation, groups, 1-3 spatial dims."""
    dims, groups, kernel, dilation, padding, sizes, channels, batch = config
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *sizes, generator=generator, dtype=torch.float64)
    gram, sums = conv_gram(x, kernel, dilation, padding, groups)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](
        channels, groups, kernel, dilation=dilation, groups=groups
    ).double()
    flat_padding = [amount for before_after in reversed(padding) for amount in before_after]
    padded = nn.functional.pad(x, flat_padding)
    patches = torch.cat(list(kind_for(conv).patches(conv, padded)), dim=1)
    expected = patches.transpose(1, 2) @ patches
    # Absolute tolerance from the input's scale: a window may miss the image (G = 0 there,
    # while FFT rounding leaves ~1e-16).
    scale = 1e-12 * float(x.square().sum() + 1.0)
    assert torch.allclose(gram, expected, rtol=1e-12, atol=scale)
    assert torch.allclose(sums, patches.sum(1), rtol=1e-12, atol=scale)


@pytest.mark.parametrize("name", ["paper-conv-5x5-pad2", "dilation-groups", "conv3d"])
def test_frequency_chunks_give_the_same_gram(name, monkeypatch):
    """Products taken one frequency at a time (the memory bound) change nothing."""
    module, x = build(name, batch=2, seed=3)
    padding = kind_for(module)._padding(module)
    whole, whole_sums = conv_gram(x, module.kernel_size, module.dilation, padding, module.groups)
    monkeypatch.setattr("proxoptim.conv_gram.PRODUCT_CHUNK_ELEMENTS", 1)
    chunked, chunked_sums = conv_gram(
        x, module.kernel_size, module.dilation, padding, module.groups
    )
    assert relative_error(chunked, whole) <= 1e-13
    assert torch.equal(chunked_sums, whole_sums)


@pytest.mark.parametrize("name", ["paper-conv-5x5-pad2", "conv1d-reflect"])
def test_unbatched_and_channels_last_inputs(name, from_correlations):
    module, x = build(name, batch=2, seed=5)
    reference = system(module, [x[:1]]).gram()
    assert relative_error(system(module, [x[0]]).gram(), reference) <= 1e-12
    if x.dim() == 4:
        channels_last = x[:1].contiguous(memory_format=torch.channels_last)
        assert relative_error(system(module, [channels_last]).gram(), reference) <= 1e-12
