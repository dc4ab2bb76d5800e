"""The Gram of a stride-1 convolution from correlations of its input with itself.

For a stride-1 convolution with kernel offsets a, b (one per spatial dim), dilation δ and
zero padding, the im2col Gram is

    G[(c, a), (c', b)] = Σ_n Σ_{p ∈ P} x̄[n, c, p + δa] · x̄[n, c', p + δb],

x̄ the zero-padded input and P the output positions. With q = p + δa this is a sum of the
product field f_Δ(q) = Σ_n x[n, c, q] x[n, c', q + δΔ], Δ = b − a, over the window W_a = P + δa,
which is a box. The input is zero outside the image I, so only W_a ∩ I matters, and I \\ W_a
is, per dim, at most δ(k − 1) indices at either edge of the image. Inclusion–exclusion
over the dims then writes every entry through

    Φ_S(e_S; Δ) = Σ_n Σ_{q: q_j = e_j for j ∈ S} x[n, c, q] x[n, c', q + δΔ],

for each set S of dims held at an edge index e_j (the other dims summed over): with S
empty it is the full correlation of the input with itself, computed for every lag at once
by FFTs over the batch-summed cross-spectra; with S non-empty only edge slices enter.

The cost does not depend on the number of output channels, and the batch enters only
through (C × n)·(n × C) products per frequency: for the paper CNN's 16→20 5×5 convolution
on 16×16 inputs at batch 500 the Gram takes 44 ms here against 355 ms from im2col
(2·n·d² = 41 GFLOP) and 33 ms for one matrix-free CG product
(benchmarks/conv_gram_cost.py). Where few positions meet many channels the per-channel-
pair bookkeeping outweighs the GEMM it saves; :func:`conv_gram_cost` lets the cost model
see that.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# The largest batched product (elements) formed at once; frequencies are taken in chunks
# below it, so the correlation form's memory stays a few times the input's.
PRODUCT_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial dim of a stride-1 convolution on an unpadded input of length ``size``,
    zero-padded by ``pad_before`` and ``pad_after``."""

    size: int
    kernel: int
    dilation: int
    pad_before: int
    pad_after: int

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1)

    @property
    def outputs(self) -> int:
        return self.size + self.pad_before + self.pad_after - self.span

    def window(self, offset: int) -> range:
        """Image indices covered by the window of kernel offset ``offset``."""
        first = offset * self.dilation - self.pad_before
        return range(max(first, 0), min(first + self.outputs, self.size))

    @functools.cached_property
    def edges(self) -> list[int]:
        """The image indices that some kernel offset's window leaves out, ascending."""
        left_out: set[int] = set()
        for offset in range(self.kernel):
            left_out |= set(range(self.size)) - set(self.window(offset))
        return sorted(left_out)

    def neighbourhood(self, start: int, stop: int) -> range:
        """The image indices within the kernel's span of the run [start, stop)."""
        return range(max(0, start - self.span), min(self.size, stop + self.span))

    def excluded(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(kernel, len(edges)) 0/1: whether offset a's window leaves out edges[e]."""
        edges = self.edges
        rows = [
            [0.0 if index in self.window(offset) else 1.0 for index in edges]
            for offset in range(self.kernel)
        ]
        # Built on the host and moved once: no per-element writes on an accelerator.
        return torch.tensor(rows, dtype=dtype).reshape(self.kernel, len(edges)).to(device)


def _axes(
    sizes: Sequence[int],
    kernel_size: Sequence[int],
    dilation: Sequence[int],
    padding: Sequence[tuple[int, int]],
) -> list[AxisGeometry]:
    return [
        AxisGeometry(size, kernel, dil, before, after)
        for size, kernel, dil, (before, after) in zip(
            sizes, kernel_size, dilation, padding, strict=True
        )
    ]


def _fft_length(minimum: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ minimum (pocketfft and cuFFT are fastest there)."""
    length = minimum
    while True:
        remainder = length
        for prime in (2, 3, 5):
            while remainder % prime == 0:
                remainder //= prime
        if remainder == 1:
            return length
        length += 1


# The small index, mask and transform tensors depend only on the geometry: they are built
# once per geometry, dtype and device and reused, so a step on an accelerator copies
# nothing from the host (each such copy would wait for the queued work).
_CACHE_SIZE = 512


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _index(values: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long).to(device)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, stop) of consecutive integers in a sorted list."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _neighbourhood(axis: AxisGeometry) -> list[int]:
    """The image indices within the kernel's span of an edge index, ascending."""
    near: set[int] = set()
    for start, stop in _runs(axis.edges):
        near.update(axis.neighbourhood(start, stop))
    return sorted(near)


def _terms(axes: list[AxisGeometry]) -> Iterator[tuple[int, ...]]:
    """The inclusion–exclusion terms: every set of held dims, each with edges to hold."""
    for size in range(len(axes) + 1):
        for held in itertools.combinations(range(len(axes)), size):
            if all(axes[j].edges for j in held):
                yield held


def _edge_correlation(x: Tensor, axes: list[AxisGeometry], held: tuple[int, ...]) -> Tensor:
    """The Gram term Σ_e excluded[a, e] Φ_S(e; b − a) for S = ``held`` (0-based dims).

    Args:
        x: (n, groups, C_g, L_1..L_D).

    Returns:
        ((a_1, b_1), ..., (a_D, b_D), groups, C_g, C_g): one axis of k_j² offset pairs per
        spatial dim (a view with that axis order).

    Free dims are summed by FFT: the batch-summed cross-spectra are taken back to the
    (2k − 1) lags that matter by a small DFT matrix, a chunk of frequencies at a time, so
    no full inverse transform (all lags, all channel pairs) is ever held. Along a held
    dim, each run of edge indices is paired with every index within the kernel's span of
    it (a contiguous slab, so no gather of shifted copies), and the lags are read off the
    small product. Channel pairs stay the trailing (contiguous) axes throughout, so every
    step on the small axes is one pass of a plain matrix product or gather.
    """
    dims = len(axes)
    free = [j for j in range(dims) if j not in held]
    lengths = [_fft_length(axes[j].size + axes[j].span) for j in free]
    # Along a held dim only the neighbourhoods of its edges enter: drop the other indices
    # before transforming (on large inputs most of the image).
    kept = {j: _neighbourhood(axes[j]) for j in held}
    for j in held:
        x = x.index_select(3 + j, _index(tuple(kept[j]), x.device))
    slab = _spectrum_slab(x, axes, free, held, lengths)
    groups, channels = x.shape[1:3]
    # (lags of the free dims, frequencies, re/im of first, re/im of second)
    to_lags = _lag_transform(tuple(axes), tuple(free), tuple(lengths), slab.dtype, slab.device)
    # Φ: ((edge_j, lag_j) per held dim..., lags (free), G, C, C')
    pairs = [size for j in held for size in (len(axes[j].edges), 2 * axes[j].kernel - 1)]
    phi = slab.new_empty(*pairs, to_lags.shape[0], groups, channels, channels)
    for combination in itertools.product(*[_runs(axes[j].edges) for j in held]):
        target = phi
        for position, ((start, stop), j) in enumerate(zip(combination, held, strict=True)):
            target = target.narrow(2 * position, axes[j].edges.index(start), stop - start)
        _run_correlation(slab, axes, held, combination, kept, to_lags, out=target)
    for position, j in enumerate(held):
        # (edge, lag) -> (a, b): Σ_e excluded[a, e] Φ(e, b − a); one (k² × E·(2k − 1))
        # product per combination of the pairs before it.
        transfer = _held_transfer(axes[j], phi.dtype, phi.device)
        leading = phi.shape[:position]
        source = phi.reshape(math.prod(leading), transfer.shape[1], -1)
        contracted = phi.new_empty(source.shape[0], transfer.shape[0], source.shape[2])
        for index in range(source.shape[0]):
            torch.mm(transfer, source[index], out=contracted[index])
        phi = contracted.reshape(*leading, transfer.shape[0], *phi.shape[position + 2 :])
    # Free dims: lag -> (a, b), a gather of lag b − a + k − 1.
    count = len(held)
    phi = phi.reshape(*phi.shape[:count], *[2 * axes[j].kernel - 1 for j in free], *phi.shape[-3:])
    for position, j in enumerate(free):
        kernel = axes[j].kernel
        offsets = torch.arange(kernel, device=phi.device)
        lag = (offsets[None, :] - offsets[:, None] + kernel - 1).reshape(-1)
        phi = phi.index_select(count + position, lag)
    order = [held.index(j) if j in held else count + free.index(j) for j in range(dims)]
    return phi.permute(*order, dims, dims + 1, dims + 2)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _held_transfer(axis: AxisGeometry, dtype: torch.dtype, device: torch.device) -> Tensor:
    """T[(a, b), (e, l)] = excluded[a, e]·[l = b − a + k − 1]: (k², len(edges)·(2k − 1))."""
    kernel, lags = axis.kernel, 2 * axis.kernel - 1
    mask = axis.excluded(dtype, torch.device("cpu"))
    transfer = torch.zeros(kernel, kernel, mask.shape[1], lags, dtype=dtype)
    for a in range(kernel):
        for b in range(kernel):
            transfer[a, b, :, b - a + kernel - 1] = mask[a]
    return transfer.reshape(kernel * kernel, -1).to(device)


def _spectrum_slab(
    x: Tensor, axes: list[AxisGeometry], free: list[int], held: tuple[int, ...], lengths: list[int]
) -> Tensor:
    """x transformed along the free dims, laid out (n, G, freqs..., held..., re/im, C).

    Per site (G, freqs) the rows (held..., re/im, C) are contiguous and the contraction n is
    one stride, which BLAS reads in place; the copy into this layout transposes within each
    sample only. Without free dims the re/im axis has size 1.
    """
    dims = len(axes)
    spatial = [3 + j for j in free] + [3 + j for j in held]
    if not free:
        return x.permute(0, 1, *spatial, 2).contiguous().unsqueeze(-2)
    # Pad explicitly: rfftn's own zero padding (s=) is about twice as slow on CPUs.
    padding = [0, 0] * dims
    for j, length in zip(free, lengths, strict=True):
        padding[2 * (dims - 1 - j) + 1] = length - axes[j].size
    spectrum = torch.view_as_real(torch.fft.rfftn(F.pad(x, padding), dim=[3 + j for j in free]))
    return spectrum.permute(0, 1, *spatial, spectrum.dim() - 1, 2).contiguous()


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _lag_transform(
    axes: tuple[AxisGeometry, ...],
    free: tuple[int, ...],
    lengths: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The real matrix taking batch-summed cross-spectra to correlations at the lags used.

    For free dims with FFT lengths N_j (a real FFT along the last), the correlation at
    shift s = δΔ is Σ_f w_f Re(Φ(f) e^{iθ}), θ = 2π Σ_j f_j s_j / N_j, w_f = 1/ΠN_j (doubled
    for the half-spectrum bins whose mirror image is not stored). With Φ = Σ conj(a)·b:
    Re Φ = P₀₀ + P₁₁ and Im Φ = P₀₁ − P₁₀, P_pq the product of part p of a and part q of b.

    Returns (Π(2k_j − 1), Π frequencies, 2, 2); (1, 1, 1, 1) of ones without free dims.
    """
    if not free:
        return torch.ones(1, 1, 1, 1, dtype=dtype, device=device)
    grids = []
    for position, (j, length) in enumerate(zip(free, lengths, strict=True)):
        last = position == len(free) - 1
        frequencies = torch.arange(length // 2 + 1 if last else length, dtype=torch.float64)
        shifts = torch.arange(-(axes[j].kernel - 1), axes[j].kernel, dtype=torch.float64)
        grids.append(torch.outer(shifts * axes[j].dilation, frequencies) * (2 * math.pi / length))
    angle = grids[0]
    for grid in grids[1:]:
        angle = (angle[:, None, :, None] + grid[None, :, None, :]).reshape(
            angle.shape[0] * grid.shape[0], angle.shape[1] * grid.shape[1]
        )
    last_length = lengths[-1]
    weight = torch.full((last_length // 2 + 1,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if last_length % 2 == 0:
        weight[-1] = 1.0
    weight = weight.repeat(math.prod(lengths[:-1])) / math.prod(lengths)
    cosine, sine = torch.cos(angle) * weight, torch.sin(angle) * weight
    transform = torch.stack([torch.stack([cosine, -sine], -1), torch.stack([sine, cosine], -1)], -2)
    return transform.to(dtype=dtype, device=device)


def _run_correlation(
    slab: Tensor,
    axes: list[AxisGeometry],
    held: tuple[int, ...],
    combination: tuple[tuple[int, int], ...],
    kept: dict[int, list[int]],
    to_lags: Tensor,
    out: Tensor,
) -> None:
    """Σ_n conj(x̂[e]) x̂[e + δΔ] for one run [start, stop) per held dim, at every lag.

    ``slab`` (n, G, freqs..., held..., re/im, C) holds, along each held dim j, only the
    image indices ``kept[j]``. Writes ``out``: ((run_j, lag_j)..., lags (free), G, C, C').
    """
    count = len(held)
    held_axis = slab.dim() - 2 - count
    first, second = slab, slab
    shifts = []
    for position, (j, (start, stop)) in enumerate(zip(held, combination, strict=True)):
        near = axes[j].neighbourhood(start, stop)
        shifts.append(start - near.start)
        # The neighbourhood is kept whole, so it is contiguous among the kept indices.
        first = first.narrow(held_axis + position, kept[j].index(start), stop - start)
        second = second.narrow(held_axis + position, kept[j].index(near.start), len(near))
    batch, groups = slab.shape[:2]
    parts, channels = slab.shape[-2], slab.shape[-1]
    # One frequency axis: (n, G, F, rows...)
    first = first.reshape(batch, groups, -1, *first.shape[held_axis:])
    second = second.reshape(batch, groups, -1, *second.shape[held_axis:])
    run_sizes = first.shape[3 : 3 + count]
    neighbour_sizes = second.shape[3 : 3 + count]
    frequencies = first.shape[2]
    rows, columns = first[0, 0, 0].numel(), second[0, 0, 0].numel()
    chunk = max(1, PRODUCT_CHUNK_ELEMENTS // max(1, groups * rows * columns))
    total = None
    for begin in range(0, frequencies, chunk):
        size = min(chunk, frequencies - begin)
        # (n, G, f, rows...) -> (G·f, rows, n): Σ_n over one stride.
        first_mat = first.narrow(2, begin, size).movedim(0, -1).reshape(groups * size, rows, batch)
        second_mat = (
            second.narrow(2, begin, size).movedim(0, -1).reshape(groups * size, columns, batch)
        )
        product = torch.bmm(first_mat, second_mat.transpose(1, 2)).reshape(
            groups, size, *run_sizes, parts, channels, *neighbour_sizes, parts, channels
        )
        run_axes = list(range(2, 2 + count))
        neighbour_axes = [4 + count + position for position in range(count)]
        product = _lags_from_neighbours(product, held, axes, shifts, run_axes, neighbour_axes)
        # (G, f, runs..., p, C, lags..., q, C') -> (G, f·p·q, (run_j, lag_j)..., C, C')
        first_part, second_part = 2 + count, 4 + 2 * count
        interleaved = [axis for pair in zip(run_axes, neighbour_axes, strict=True) for axis in pair]
        product = product.permute(
            0, 1, first_part, second_part, *interleaved, first_part + 1, second_part + 1
        ).reshape(groups, size * parts * parts, -1)
        weights = to_lags[:, begin : begin + size].reshape(to_lags.shape[0], -1)
        part_sum = torch.matmul(weights, product)  # (G, lags (free), pairs·C·C')
        total = part_sum if total is None else total.add_(part_sum)
    assert total is not None
    # (G, lags (free), (run_j, lag_j)..., C, C') -> ((run_j, lag_j)..., lags (free), G, C, C')
    total = total.reshape(groups, to_lags.shape[0], *out.shape[: 2 * count], channels, channels)
    out.copy_(total.permute(*range(2, 2 + 2 * count), 1, 0, -2, -1))


def _lags_from_neighbours(
    product: Tensor,
    held: tuple[int, ...],
    axes: list[AxisGeometry],
    shifts: list[int],
    run_axes: list[int],
    neighbour_axes: list[int],
) -> Tensor:
    """Replaces each held dim's neighbour axis by its lag axis (2k − 1).

    Entry (e, Δ) of a held dim is neighbour e + shift + δΔ − span (e counted from the run's
    start, neighbours from the neighbourhood's), zero where that leaves the image. After
    zero-padding every neighbour axis by the span on both sides, that is a strided view.
    """
    if not held:
        return product
    padded_shape = list(product.shape)
    for position, j in enumerate(held):
        padded_shape[neighbour_axes[position]] += 2 * axes[j].span
    padded = product.new_empty(padded_shape)
    interior = padded
    for position, j in enumerate(held):
        axis, span = neighbour_axes[position], axes[j].span
        # Zero only the margins: the interior is overwritten below.
        padded.narrow(axis, 0, span).zero_()
        padded.narrow(axis, padded.shape[axis] - span, span).zero_()
        interior = interior.narrow(axis, span, product.shape[axis])
    interior.copy_(product)
    sizes = list(padded.shape)
    strides = list(padded.stride())
    offset = padded.storage_offset()
    for position, j in enumerate(held):
        neighbour_axis = neighbour_axes[position]
        neighbour_stride = strides[neighbour_axis]
        offset += shifts[position] * neighbour_stride
        strides[run_axes[position]] += neighbour_stride
        sizes[neighbour_axis] = 2 * axes[j].kernel - 1
        strides[neighbour_axis] = neighbour_stride * axes[j].dilation
    return padded.as_strided(sizes, strides, offset)


def conv_gram(
    x: Tensor,
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    groups: int,
) -> tuple[Tensor, Tensor]:
    """Im2col Gram and patch sums of a stride-1 zero-padded convolution, without im2col.

    Args:
        x: the unpadded input, (n, C, L_1..L_D).
        kernel_size, dilation: per spatial dim.
        padding: (before, after) zero padding per spatial dim.
        groups: the convolution's groups; channel pairs are taken within a group.

    Returns:
        gram: (groups, d, d), d = (C/groups)·Πk, entries ordered like weight[j].flatten().
        patch_sums: (groups, d), Σ over columns of each patch entry (the bias column).
    """
    batch, channels = x.shape[:2]
    dims = x.dim() - 2
    axes = _axes(x.shape[2:], kernel_size, dilation, padding)
    group_channels = channels // groups
    # One contiguous copy up front: a cropped or channels-last input slows every FFT.
    grouped = x.contiguous().reshape(batch, groups, group_channels, *x.shape[2:])
    kernels = [axis.kernel for axis in axes]
    # Σ over the inclusion–exclusion terms: ((a_1, b_1), ..., (a_D, b_D), G, C, C')
    total = grouped.new_zeros(*[k * k for k in kernels], groups, group_channels, group_channels)
    for held in _terms(axes):
        term = _edge_correlation(grouped, axes, held)
        total.add_(term, alpha=-1.0 if len(held) % 2 else 1.0)
    # -> (G, (C, a...), (C', b...))
    gram = total.reshape(*[k for k in kernels for _ in range(2)], *total.shape[-3:])
    a_axes, b_axes = range(0, 2 * dims, 2), range(1, 2 * dims, 2)
    gram = gram.permute(2 * dims, 2 * dims + 1, *a_axes, 2 * dims + 2, *b_axes)
    row_dim = group_channels * math.prod(kernels)
    gram = gram.reshape(groups, row_dim, row_dim)
    return gram, _patch_sums(grouped, axes).reshape(groups, row_dim)


def _patch_sums(x: Tensor, axes: list[AxisGeometry]) -> Tensor:
    """Σ_n Σ_{q ∈ W_a ∩ I} x[n, g, c, q] per offset a: (G, C, k_1..k_D)."""
    sums = x.sum(0)  # (G, C, L_1..L_D)
    for j, axis in enumerate(axes):
        dim = 2 + j
        cumulative = F.pad(sums.movedim(dim, -1).cumsum(-1), (1, 0))
        windows = [axis.window(offset) for offset in range(axis.kernel)]
        stop = _index(tuple(w.stop if len(w) else 0 for w in windows), x.device)
        start = _index(tuple(w.start if len(w) else 0 for w in windows), x.device)
        sums = (cumulative[..., stop] - cumulative[..., start]).movedim(-1, dim)
    return sums


# Cost model constants, in float32-GEMM-equivalent flops, fitted to measured times on a
# 2-core AVX-512 CPU (the paper CNN's layers at batch 500, ResNet-18's stride-1 layers at
# batch 32; `python benchmarks/conv_gram_cost.py` shows the fit). They only steer the
# choice of form: per input element and inclusion–exclusion term (FFTs, layout copies),
ELEMENT_COST = 1100.0
# per flop of the batched products (small matrices, complex split in real parts),
CONTRACTION_COST = 2.0
# per flop of the products back to lags (a short contraction: bound by memory traffic),
LAG_TRANSFORM_COST = 28.0
# and per element of the per-channel-pair terms (Φ, its lag-to-offset maps, the sums).
ASSEMBLY_COST = 800.0


def conv_gram_cost(
    shape: tuple[int, ...],
    kernel_size: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[tuple[int, int], ...],
    groups: int,
) -> float:
    """Estimated cost of :func:`conv_gram` for an unpadded input of ``shape``."""
    batch, channels = shape[:2]
    group_channels = channels // groups
    pairs = groups * group_channels * group_channels
    axes = _axes(shape[2:], kernel_size, dilation, padding)
    dims = len(axes)
    offset_pairs = math.prod(axis.kernel**2 for axis in axes)
    total = ASSEMBLY_COST * pairs * offset_pairs  # the final layout copy
    for held in _terms(axes):
        free = [j for j in range(dims) if j not in held]
        lengths = [_fft_length(axes[j].size + axes[j].span) for j in free]
        frequencies = math.prod(lengths[:-1]) * (lengths[-1] // 2 + 1) if free else 1
        kept = math.prod(len(_neighbourhood(axes[j])) for j in held)
        total += ELEMENT_COST * batch * channels * frequencies * kept
        free_lags = math.prod(2 * axes[j].kernel - 1 for j in free)
        parts = 4 if free else 1  # re/im of both factors
        for combination in itertools.product(*[_runs(axes[j].edges) for j in held]):
            rows = columns = group_channels * (2 if free else 1)
            run_lags = 1
            for j, (start, stop) in zip(held, combination, strict=True):
                rows *= stop - start
                columns *= len(axes[j].neighbourhood(start, stop))
                run_lags *= (stop - start) * (2 * axes[j].kernel - 1)
            total += CONTRACTION_COST * 2.0 * batch * groups * frequencies * rows * columns
            # back to lags: (free lags × frequencies·parts) @ (… × run_lags·pairs)
            total += LAG_TRANSFORM_COST * 2.0 * free_lags * frequencies * parts * run_lags * pairs
        held_lags = math.prod(len(axes[j].edges) * (2 * axes[j].kernel - 1) for j in held)
        total += ASSEMBLY_COST * pairs * (held_lags * free_lags + 2 * offset_pairs)
    return total
