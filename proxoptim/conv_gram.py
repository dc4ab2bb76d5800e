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

Cost, for the paper CNN's 16→20 5×5 convolution on 16×16 inputs: about 1.4 GFLOP against
41 GFLOP for the im2col Gram (2·n·d²), and independent of the number of output channels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AxisGeometry:
    """One spatial dim of a stride-1 convolution on an unpadded input of length ``size``.

    Attributes:
        edges: the image indices that some kernel offset's window leaves out, ascending.
        excluded: (kernel, len(edges)) 0/1, whether offset a's window leaves out edges[e].
        starts: (kernel,) the first padded index of each offset's window, for window sums.
    """

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

    @property
    def edges(self) -> list[int]:
        left_out: set[int] = set()
        for offset in range(self.kernel):
            left_out |= set(range(self.size)) - set(self.window(offset))
        return sorted(left_out)

    def excluded(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        edges = self.edges
        mask = torch.zeros(self.kernel, len(edges), dtype=dtype, device=device)
        for offset in range(self.kernel):
            window = self.window(offset)
            for position, index in enumerate(edges):
                if index not in window:
                    mask[offset, position] = 1.0
        return mask


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
        near.update(range(max(0, start - axis.span), min(axis.size, stop + axis.span)))
    return sorted(near)


def _edge_correlation(x: Tensor, axes: list[AxisGeometry], held: tuple[int, ...]) -> Tensor:
    """Σ_e excluded[a, e] Φ_S(e; Δ) for S = ``held`` (0-based spatial dims), every a and Δ.

    Args:
        x: (n, groups, C_g, L_1..L_D).

    Returns:
        (groups, C_g, a_1..a_D, lag_1..lag_D, C_g): a_j of size k_j for held dims and 1
        for free ones (the term does not depend on it), lag_j of size 2k_j − 1.

    Free dims are summed by FFT (every lag at once). Along a held dim, each run of edge
    indices is paired with every index within the kernel's span of it (a contiguous slab,
    so no gather of shifted copies), and the lags are read off the small product.
    """
    dims = len(axes)
    free = [j for j in range(dims) if j not in held]
    lengths = [_fft_length(axes[j].size + axes[j].span) for j in free]
    # Along a held dim only the neighbourhoods of its edges enter: drop the other indices
    # before transforming (on large inputs most of the image).
    kept = {j: _neighbourhood(axes[j]) for j in held}
    for j in held:
        x = x.index_select(3 + j, torch.tensor(kept[j], device=x.device))
    slab = _spectrum_slab(x, axes, free, held, lengths)
    groups, channels = x.shape[1:3]
    frequencies = tuple(slab.shape[2 : 2 + len(free)])
    # Φ: (G, freqs..., C, lags (held)..., C', edges (held)...), edges last for the masks.
    phi = torch.empty(
        groups,
        *frequencies,
        channels,
        *[2 * axes[j].kernel - 1 for j in held],
        channels,
        *[len(axes[j].edges) for j in held],
        dtype=torch.promote_types(slab.dtype, torch.complex64) if free else slab.dtype,
        device=x.device,
    )
    for combination in itertools.product(*[_runs(axes[j].edges) for j in held]):
        lags = _run_product(slab, axes, held, combination, kept, complex_valued=bool(free))
        target = phi
        for position, ((start, stop), j) in enumerate(zip(combination, held, strict=True)):
            offset = axes[j].edges.index(start)
            target = target.narrow(phi.dim() - len(held) + position, offset, stop - start)
        # lags: (G, freqs..., runs..., C, lags..., C'): runs go last
        runs = tuple(range(1 + len(free), 1 + len(free) + len(held)))
        target.copy_(lags.movedim(runs, tuple(range(lags.dim() - len(held), lags.dim()))))
    phi = _contract_edges(phi, [axes[j].excluded(x.dtype, x.device) for j in held])
    if free:
        free_axes = list(range(1, 1 + len(free)))
        phi = torch.fft.irfftn(phi, s=lengths, dim=free_axes)
        for j, axis, length in zip(free, free_axes, lengths, strict=True):
            lag = torch.arange(-(axes[j].kernel - 1), axes[j].kernel, device=x.device)
            phi = phi.index_select(axis, (lag * axes[j].dilation) % length)
    # (G, lags (free)..., C, lags (held)..., C', a (held)...) -> (G, C, a..., lags..., C')
    channel_axis = 1 + len(free)
    second_channel_axis = channel_axis + 1 + len(held)
    offset_axes = [second_channel_axis + 1 + position for position in range(len(held))]
    lag_axes = [
        channel_axis + 1 + held.index(j) if j in held else 1 + free.index(j) for j in range(dims)
    ]
    phi = phi.permute(0, channel_axis, *offset_axes, *lag_axes, second_channel_axis)
    for j in free:
        phi = phi.unsqueeze(2 + j)
    return phi


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


def _run_product(
    slab: Tensor,
    axes: list[AxisGeometry],
    held: tuple[int, ...],
    combination: tuple[tuple[int, int], ...],
    kept: dict[int, list[int]],
    complex_valued: bool,
) -> Tensor:
    """Σ_n conj(x̂[run e]) x̂[e + δΔ] for one run [start, stop) per held dim.

    ``slab`` holds, along each held dim j, only the image indices ``kept[j]``.
    Returns (G, freqs..., runs..., C, lags..., C').
    """
    held_axis = slab.dim() - 2 - len(held)
    first, second = slab, slab
    shifts = []
    for position, (j, (start, stop)) in enumerate(zip(held, combination, strict=True)):
        low = max(0, start - axes[j].span)
        high = min(axes[j].size, stop + axes[j].span)
        shifts.append(start - low)
        # [low, high) is kept whole, so it is contiguous among the kept indices.
        first = first.narrow(held_axis + position, kept[j].index(start), stop - start)
        second = second.narrow(held_axis + position, kept[j].index(low), high - low)
    groups, channels, parts = slab.shape[1], slab.shape[-1], slab.shape[-2]
    frequencies = slab.shape[2:held_axis]
    sites = groups * math.prod(frequencies)
    # (n, G, freqs..., rows...) -> (G·freqs, rows, n): Σ_n over one stride.
    first_mat = first.movedim(0, -1).reshape(sites, -1, first.shape[0])
    second_mat = second.movedim(0, -1).reshape(sites, -1, second.shape[0])
    product = torch.bmm(first_mat, second_mat.transpose(1, 2)).reshape(
        groups,
        *frequencies,
        *first.shape[held_axis : held_axis + len(held)],
        parts,
        channels,
        *second.shape[held_axis : held_axis + len(held)],
        parts,
        channels,
    )
    first_part = held_axis - 1 + len(held)
    second_part = first_part + 2 + len(held)
    if complex_valued:
        # conj(a)·b = (Re a Re b + Im a Im b) + i(Re a Im b − Im a Re b)
        real_real, real_imag = product.select(first_part, 0).unbind(second_part - 1)
        imag_real, imag_imag = product.select(first_part, 1).unbind(second_part - 1)
        product = torch.complex(real_real + imag_imag, real_imag - imag_real)
    else:
        product = product.squeeze(second_part).squeeze(first_part)
    return _lags_from_neighbours(product, held, axes, shifts, held_axis - 1)


def _contract_edges(phi: Tensor, masks: list[Tensor]) -> Tensor:
    """(..., E_1..E_h) -> (..., a_1..a_h) by Σ_e excluded_j[a, e] over each trailing edge axis.

    For offset a that is the sum over the image indices its window leaves out.
    """
    masks = [mask.to(phi.dtype) for mask in masks]
    if len(masks) == 1:
        return phi @ masks[0].T
    if len(masks) == 2:
        return masks[0] @ (phi @ masks[1].T)
    if masks:
        edges, offsets = "xyz"[: len(masks)], "abc"[: len(masks)]
        operands = ",".join(f"{a}{e}" for a, e in zip(offsets, edges, strict=True))
        return torch.einsum(f"...{edges},{operands}->...{offsets}", phi, *masks)
    return phi


def _lags_from_neighbours(
    product: Tensor,
    held: tuple[int, ...],
    axes: list[AxisGeometry],
    shifts: list[int],
    first_run_axis: int,
) -> Tensor:
    """(G, freqs..., runs..., C, neighbours..., C') -> (G, freqs..., runs..., C, lags..., C').

    Entry (e, Δ) of a held dim is neighbour e + shift + δΔ − span (e counted from the run's
    start, neighbours from the neighbourhood's), zero where that leaves the image. After
    zero-padding every neighbour axis by the span on both sides, that is a strided view.
    """
    count = len(held)
    neighbour_axes = [first_run_axis + count + 1 + position for position in range(count)]
    padded_shape = list(product.shape)
    for position, j in enumerate(held):
        padded_shape[neighbour_axes[position]] += 2 * axes[j].span
    padded = product.new_zeros(padded_shape)
    interior = padded
    for position, j in enumerate(held):
        interior = interior.narrow(
            neighbour_axes[position], axes[j].span, product.shape[neighbour_axes[position]]
        )
    interior.copy_(product)
    sizes = list(padded.shape)
    strides = list(padded.stride())
    offset = padded.storage_offset()
    for position, j in enumerate(held):
        run_axis = first_run_axis + position
        neighbour_axis = neighbour_axes[position]
        neighbour_stride = strides[neighbour_axis]
        offset += shifts[position] * neighbour_stride
        strides[run_axis] += neighbour_stride
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
    axes = [
        AxisGeometry(size, kernel, dil, before, after)
        for size, kernel, dil, (before, after) in zip(
            x.shape[2:], kernel_size, dilation, padding, strict=True
        )
    ]
    group_channels = channels // groups
    # One contiguous copy up front: a cropped or channels-last input slows every FFT.
    grouped = x.contiguous().reshape(batch, groups, group_channels, *x.shape[2:])
    kernels = [axis.kernel for axis in axes]
    # Lag index b − a + (k − 1) for every pair of offsets, per dim: (k, k).
    lag_index = [
        torch.arange(k, device=x.device)[None, :]
        - torch.arange(k, device=x.device)[:, None]
        + (k - 1)
        for k in kernels
    ]
    psi = None
    for size in range(dims + 1):
        for held in itertools.combinations(range(dims), size):
            if any(not axes[j].edges for j in held):
                continue
            # (G, C, a..., lags..., C'), a of size 1 along dims not held
            term = _edge_correlation(grouped, axes, held)
            if psi is None:
                psi = torch.zeros(
                    groups,
                    group_channels,
                    *kernels,
                    *[2 * k - 1 for k in kernels],
                    group_channels,
                    dtype=term.dtype,
                    device=x.device,
                )
            psi.add_(term, alpha=-1.0 if size % 2 else 1.0)
    assert psi is not None
    # G[(c, a), (c', b)] = Ψ[c, a, b − a + k − 1, c']
    index = []
    for j, k in enumerate(kernels):
        shape = [1] * (2 * dims)
        shape[2 * j], shape[2 * j + 1] = k, k
        offsets = torch.arange(k, device=x.device)[:, None].expand(k, k)
        index.append((offsets, shape))
    offset_index = [offsets.reshape(shape) for offsets, shape in index]
    lag_index_shaped = [
        lag.reshape(shape) for lag, (_, shape) in zip(lag_index, index, strict=True)
    ]
    gram = psi[(slice(None), slice(None), *offset_index, *lag_index_shaped)]
    # (G, C, a_1, b_1, ..., a_D, b_D, C') -> (G, (C, a...), (C', b...))
    a_axes = [2 + 2 * j for j in range(dims)]
    b_axes = [3 + 2 * j for j in range(dims)]
    gram = gram.permute(0, 1, *a_axes, gram.dim() - 1, *b_axes)
    row_dim = group_channels * math.prod(kernels)
    gram = gram.reshape(groups, row_dim, row_dim)
    return gram, _patch_sums(grouped, axes).reshape(groups, row_dim)


def _patch_sums(x: Tensor, axes: list[AxisGeometry]) -> Tensor:
    """Σ_n Σ_{q ∈ W_a ∩ I} x[n, g, c, q] per offset a: (G, C, k_1..k_D)."""
    sums = x.sum(0)  # (G, C, L_1..L_D)
    for j, axis in enumerate(axes):
        dim = 2 + j
        cumulative = torch.nn.functional.pad(sums.movedim(dim, -1).cumsum(-1), (1, 0))
        windows = [axis.window(offset) for offset in range(axis.kernel)]
        stop = torch.tensor([w.stop if len(w) else 0 for w in windows], device=x.device)
        start = torch.tensor([w.start if len(w) else 0 for w in windows], device=x.device)
        sums = (cumulative[..., stop] - cumulative[..., start]).movedim(-1, dim)
    return sums


# Time of the FFTs, layout copies and gathers per input element and inclusion–exclusion
# term, in float32-GEMM-equivalent flops (calibrated on a 2-core AVX-512 CPU with the paper
# CNN's layers; it only steers the choice of form).
ELEMENT_COST = 850.0
# The batched products are small matrices (often complex, split in real parts): about 4x
# the time of the same flops in one large GEMM.
CONTRACTION_COST = 4.0


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
    axes = [
        AxisGeometry(size, kernel, dil, before, after)
        for size, kernel, dil, (before, after) in zip(
            shape[2:], kernel_size, dilation, padding, strict=True
        )
    ]
    dims = len(axes)
    total = 0.0
    for size in range(dims + 1):
        for held in itertools.combinations(range(dims), size):
            if any(not axes[j].edges for j in held):
                continue
            free = [j for j in range(dims) if j not in held]
            lengths = [_fft_length(axes[j].size + axes[j].span) for j in free]
            frequencies = math.prod(lengths[:-1]) * (lengths[-1] // 2 + 1) if free else 1
            elements = batch * channels * frequencies * math.prod(axes[j].size for j in held)
            total += ELEMENT_COST * elements
            per_contraction = 8.0 if free else 2.0  # complex: three real products, K = 4n
            for combination in itertools.product(*[_runs(axes[j].edges) for j in held]):
                rows = group_channels
                columns = group_channels
                for j, (start, stop) in zip(held, combination, strict=True):
                    rows *= stop - start
                    low = max(0, start - axes[j].span)
                    columns *= min(axes[j].size, stop + axes[j].span) - low
                total += (
                    CONTRACTION_COST
                    * per_contraction
                    * batch
                    * groups
                    * frequencies
                    * rows
                    * columns
                )
    return total
