"""The linear map of a layer from its parameters to its outputs, at captured inputs.

For a layer with parameters θ = (W, b) and input a, the output z = φ(θ, a) is linear in θ.
Every output unit (Linear) or output channel (Conv) ``j`` depends only on its own *row*
θ_j = [W_j flattened, b_j], so we lay θ out as a tensor of rows::

    rows: (groups, rows_per_group, row_dim)      row_dim = d = fan_in_per_group (+1 with bias)

and write Ũ for the ``d × n`` matrix whose columns are the layer's input patches (im2col
columns for convolutions, one per sample and output position, with a trailing 1 when the
layer has a trainable bias). For grouped convolutions each group has its own Ũ.  Then

    A θ      = θ Ũ                 (the layer output, per group)
    A* δ     = δ Ũᵀ                (the weight gradient for output gradient δ)
    A* A V   = V Ũ Ũᵀ = V G        (``gram_apply``; G = Ũ Ũᵀ is the primal Gram, ``gram``)

A :class:`LayerSystem` holds every confirmed call of one layer since the last step and sums
over them, so ``G = Σ_calls Ũ_call Ũ_callᵀ`` (DESIGN.md §1: sum, not mean).

This module knows nothing about optimizers or solvers; it only evaluates A, A* and G with
``F.linear`` / ``F.convNd`` and their weight-gradient transposes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from proxoptim.conv_gram import conv_gram, conv_gram_cost
from proxoptim.costs import PATCH_CHUNK_CALLS, DeviceCosts, device_costs
from proxoptim.distributed import Communicator

# Gram matrices are accumulated from im2col patches in chunks of at most this many
# elements, so that building G never materialises the whole n × d patch matrix at once.
PATCH_CHUNK_ELEMENTS = 1 << 24


class LayerKind:
    """How one family of modules (Linear, ConvNd) maps parameters to outputs.

    Subclasses implement the map for a single call with a fixed input ``x`` (already
    passed through :meth:`prepare`). Weight-shaped tensors always have the module's
    ``weight.shape``; bias-shaped tensors have shape ``(out_features,)``.
    """

    module_type: type[nn.Module]
    # Whether the dual-kernel form applies (proxoptim.dual; also needs one group and, for
    # im2col kinds, no communicator), and whether solves may use δ, the gradient of the
    # layer output (captured only for kinds that do).
    supports_dual: bool = False
    uses_output_grad: bool = False
    # Whether Ũ is an im2col matrix (copied to build the Gram; products are convolutions).
    im2col: bool = False
    # Whether :meth:`patches` exists (the primal Gram needs it; matrix-free CG does not).
    has_patches: bool = True
    # The weight axis indexing output units (see RowLayout).
    rows_axis: int = 0

    def groups(self, module: nn.Module) -> int:
        return 1

    def prepare(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
        """Turns a captured input into the form the other methods take."""
        raise NotImplementedError

    def forward(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """z = φ((weight, bias), x)."""
        raise NotImplementedError

    def adjoint(
        self, module: nn.Module, x: Tensor, grad_output: Tensor, weight_shape: torch.Size
    ) -> tuple[Tensor, Tensor]:
        """(∂⟨z, grad_output⟩/∂W, ∂⟨z, grad_output⟩/∂b): the weight-gradient transpose A*."""
        raise NotImplementedError

    def patches(self, module: nn.Module, x: Tensor) -> Iterator[Tensor]:
        """Yields chunks of Ũᵀ without the bias column, each ``(groups, n_chunk, d_weight)``."""
        raise NotImplementedError

    def num_columns(self, module: nn.Module, x: Tensor) -> int:
        """n: the number of columns of Ũ this call contributes (samples × positions)."""
        raise NotImplementedError

    def dual_inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """Ũᵀ without the bias column, (n, d_weight), for the dual form (one group only)."""
        raise NotImplementedError

    def output_grad_rows(self, module: nn.Module, output_grad: Tensor) -> Tensor:
        """δ as (n, rows): one row per column of Ũ, in :meth:`dual_inputs`' order (outputs
        whose last axis indexes the output units, as a Linear layer's)."""
        return output_grad.reshape(-1, output_grad.shape[-1])

    def count_columns(self, module: nn.Module, raw: Tensor) -> int | None:
        """n of a captured (unprepared) input from its shape alone, or None when that needs
        the prepared input (:meth:`num_columns`)."""
        return None

    def correlation_gram(
        self, module: nn.Module, raw: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor] | None:
        """(G without the bias row and column, patch sums), both per group and in ``dtype``,
        built from the captured input without im2col; None where the layer has no such
        structure (see proxoptim.conv_gram)."""
        return None

    def correlation_gram_cost(self, module: nn.Module, raw: Tensor) -> float:
        """Estimated cost of :meth:`correlation_gram` (inf where it returns None)."""
        return float("inf")


class LinearKind(LayerKind):
    """nn.Linear with any number of leading dimensions: Ũ has one column per leading index."""

    module_type = nn.Linear
    supports_dual = True
    uses_output_grad = True

    def prepare(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
        if x.dim() != 2:  # (a reshape of a 2-d input is one more operator for nothing)
            x = x.reshape(-1, x.shape[-1])
        return x.to(dtype)

    def forward(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def adjoint(
        self, module: nn.Module, x: Tensor, grad_output: Tensor, weight_shape: torch.Size
    ) -> tuple[Tensor, Tensor]:
        return grad_output.transpose(0, 1) @ x, grad_output.sum(0)

    def patches(self, module: nn.Module, x: Tensor) -> Iterator[Tensor]:
        yield x.unsqueeze(0)

    def dual_inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        return x

    def num_columns(self, module: nn.Module, x: Tensor) -> int:
        return x.shape[0]


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_WEIGHT_GRADIENTS = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


class ConvKind(LayerKind):
    """nn.Conv{1,2,3}d with any stride, padding (and padding_mode), dilation and groups.

    The captured input is padded once in :meth:`prepare` exactly as the module pads it
    (``padding="same"`` included, and reflect/replicate/circular modes: the padded input is
    what the weights see), so every other method runs an unpadded convolution.
    """

    im2col = True
    # With few columns (deep layers on small images: n = samples × positions below the
    # fan-in) the n×n kernel of the im2col patches is the cheap form, as for Linear layers.
    supports_dual = True

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims
        self.module_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]
        self._conv = _CONV_FUNCTIONS[spatial_dims]
        self._conv_weight = _CONV_WEIGHT_GRADIENTS[spatial_dims]

    def groups(self, module: nn.Module) -> int:
        return module.groups

    def prepare(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
        if x.dim() == self.spatial_dims + 1:  # unbatched input
            x = x.unsqueeze(0)
        x = x.to(dtype)
        padding = module._reversed_padding_repeated_twice
        if any(padding):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, padding, mode=mode)
        # Channels-last convolutions (and their weight gradients) run 1.5-4x faster than
        # NCHW ones for the narrow channel counts of CG products on CPUs (oneDNN).
        return x.contiguous(memory_format=self._memory_format)

    @property
    def _memory_format(self) -> torch.memory_format:
        return {2: torch.channels_last, 3: torch.channels_last_3d}.get(
            self.spatial_dims, torch.contiguous_format
        )

    def forward(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        weight = weight.contiguous(memory_format=self._memory_format)
        return self._conv(x, weight, bias, module.stride, 0, module.dilation, module.groups)

    def adjoint(
        self, module: nn.Module, x: Tensor, grad_output: Tensor, weight_shape: torch.Size
    ) -> tuple[Tensor, Tensor]:
        grad_weight = self._conv_weight(
            x, weight_shape, grad_output, module.stride, 0, module.dilation, module.groups
        )
        sum_dims = [0, *range(2, grad_output.dim())]
        return grad_weight, grad_output.sum(sum_dims)

    def _output_size(self, module: nn.Module, x: Tensor) -> list[int]:
        """Output positions per spatial dim of the (padded) prepared input ``x``."""
        return _output_sizes(module, x.shape[2:])

    def num_columns(self, module: nn.Module, x: Tensor) -> int:
        return x.shape[0] * math.prod(self._output_size(module, x))

    def _padding(self, module: nn.Module) -> tuple[tuple[int, int], ...]:
        """(before, after) padding per spatial dim, whatever the padding mode."""
        dims = self.spatial_dims
        amounts = module._reversed_padding_repeated_twice
        return tuple(
            (amounts[2 * (dims - 1 - j)], amounts[2 * (dims - 1 - j) + 1]) for j in range(dims)
        )

    def _batched_shape(self, raw: Tensor) -> list[int]:
        return list(raw.shape if raw.dim() == self.spatial_dims + 2 else (1, *raw.shape))

    def _padded_sizes(self, module: nn.Module, raw: Tensor) -> list[int]:
        """The spatial sizes :meth:`prepare` gives, without preparing."""
        sizes = self._batched_shape(raw)[2:]
        return [
            size + before + after
            for size, (before, after) in zip(sizes, self._padding(module), strict=True)
        ]

    def count_columns(self, module: nn.Module, raw: Tensor) -> int:
        batch = self._batched_shape(raw)[0]
        return batch * math.prod(_output_sizes(module, self._padded_sizes(module, raw)))

    def _correlation_geometry(
        self, module: nn.Module, raw: Tensor
    ) -> tuple[list[int], tuple[tuple[int, int], ...]] | None:
        """(input shape, zero padding per dim) that conv_gram sees, or None (strided).

        Zero padding stays implicit (the raw input is used as it is); other padding modes
        pad first, and their padded values are the input.
        """
        if any(stride != 1 for stride in module.stride):
            return None
        shape = self._batched_shape(raw)
        if module.padding_mode != "zeros":
            shape[2:] = self._padded_sizes(module, raw)
            return shape, ((0, 0),) * self.spatial_dims
        return shape, self._padding(module)

    def correlation_gram(
        self, module: nn.Module, raw: Tensor, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor] | None:
        geometry = self._correlation_geometry(module, raw)
        if geometry is None:
            return None
        shape, padding = geometry
        if module.padding_mode != "zeros":
            x = self.prepare(module, raw, dtype)
        else:
            x = raw.reshape(shape).to(dtype)
        return conv_gram(x, module.kernel_size, module.dilation, padding, module.groups)

    def correlation_gram_cost(self, module: nn.Module, raw: Tensor) -> float:
        geometry = self._correlation_geometry(module, raw)
        if geometry is None:
            return float("inf")
        shape, padding = geometry
        return conv_gram_cost(
            tuple(shape), module.kernel_size, module.dilation, padding, module.groups
        )

    def dual_inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        return torch.cat([chunk[0] for chunk in self.patches(module, x)])

    def output_grad_rows(self, module: nn.Module, output_grad: Tensor) -> Tensor:
        # (N, C_out, O_1..O_dims) -> (N·O_1·…·O_dims, C_out): the patches' (sample,
        # position) order.
        if output_grad.dim() == self.spatial_dims + 1:  # unbatched
            output_grad = output_grad.unsqueeze(0)
        return output_grad.movedim(1, -1).reshape(-1, output_grad.shape[1])

    def patches(self, module: nn.Module, x: Tensor) -> Iterator[Tensor]:
        # Generic N-d im2col with Tensor.unfold: one window per output position and
        # spatial dim, then keep every dilation-th element of each window. The result is
        # ordered (channel, kernel positions), matching weight[j].flatten().
        dims = self.spatial_dims
        groups = module.groups
        channels = x.shape[1]
        positions = math.prod(self._output_size(module, x))
        row_elements = channels * math.prod(module.kernel_size) * max(positions, 1)
        chunk = max(1, PATCH_CHUNK_ELEMENTS // max(row_elements, 1))
        for start in range(0, x.shape[0], chunk):
            windows = x[start : start + chunk]
            for dim, (kernel, stride, dilation) in enumerate(
                zip(module.kernel_size, module.stride, module.dilation, strict=True)
            ):
                windows = windows.unfold(2 + dim, dilation * (kernel - 1) + 1, stride)
            if any(d != 1 for d in module.dilation):
                windows = windows[(...,) + tuple(slice(None, None, d) for d in module.dilation)]
            # windows: (N, C, O_1..O_dims, k_1..k_dims)
            batch = windows.shape[0]
            out_sizes = windows.shape[2 : 2 + dims]
            windows = windows.reshape(
                batch, groups, channels // groups, *out_sizes, *module.kernel_size
            )
            # -> (groups, N, O_1..O_dims, C/groups, k_1..k_dims)
            order = [1, 0, *range(3, 3 + dims), 2, *range(3 + dims, 3 + 2 * dims)]
            yield windows.permute(order).reshape(
                groups, -1, (channels // groups) * math.prod(module.kernel_size)
            )


def _output_sizes(module: nn.Module, padded_sizes: Sequence[int]) -> list[int]:
    """Output positions per spatial dim of a convolution on padded inputs of these sizes."""
    return [
        (size - dilation * (kernel - 1) - 1) // stride + 1
        for size, kernel, stride, dilation in zip(
            padded_sizes, module.kernel_size, module.stride, module.dilation, strict=True
        )
    ]


class FunctionalKind(LayerKind):
    """A user layer given by its map z = ``forward(module, x, weight, bias)``, linear in
    (weight, bias): A* comes from autograd, so only matrix-free CG (and, for exact solves,
    CG run to convergence) is available.

    Args:
        module_type: the module class (its instances must keep ``weight`` and ``bias``
            parameters; ``bias`` may be None).
        forward: z for given parameters; must be linear in them for a fixed input.
        rows_axis: the weight axis that indexes output units / channels.
        groups: groups of output units with their own inputs (as in grouped convolutions).
        columns: n for the cost model and statistics (default: the batch size).
    """

    has_patches = False

    def __init__(
        self,
        module_type: type[nn.Module],
        forward: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor],
        rows_axis: int = 0,
        groups: Callable[[nn.Module], int] | None = None,
        columns: Callable[[nn.Module, Tensor], int] | None = None,
    ) -> None:
        self.module_type = module_type
        self.rows_axis = rows_axis
        self._forward = forward
        self._groups = groups
        self._columns = columns

    def groups(self, module: nn.Module) -> int:
        return 1 if self._groups is None else self._groups(module)

    def prepare(self, module: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype)

    def forward(self, module: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._forward(module, x, weight, bias)

    def adjoint(
        self, module: nn.Module, x: Tensor, grad_output: Tensor, weight_shape: torch.Size
    ) -> tuple[Tensor, Tensor]:
        # The map is linear in θ, so its vector-Jacobian product at θ = 0 is A*.
        with torch.enable_grad():
            weight = torch.zeros(weight_shape, dtype=x.dtype, device=x.device, requires_grad=True)
            rows = weight_shape[self.rows_axis]
            bias = torch.zeros(rows, dtype=x.dtype, device=x.device, requires_grad=True)
            use_bias = module.bias is not None
            output = self._forward(module, x, weight, bias if use_bias else None)
            inputs = (weight, bias) if use_bias else (weight,)
            grads = torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
        grad_bias = grads[1] if use_bias else torch.zeros_like(bias)
        return grads[0], grad_bias

    def num_columns(self, module: nn.Module, x: Tensor) -> int:
        return x.shape[0] if self._columns is None else self._columns(module, x)


_REGISTRY: list[LayerKind] = [LinearKind(), ConvKind(1), ConvKind(2), ConvKind(3)]


def register_layer(
    module_type: type[nn.Module],
    forward: Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor] | LayerKind,
    *,
    rows_axis: int = 0,
) -> LayerKind:
    """Teaches ProxProp a layer that is linear in its parameters.

    Args:
        module_type: the module class; instances need a ``weight`` parameter (and ``bias``,
            possibly None), and the class must not be one ProxProp already knows.
        forward: ``forward(module, x, weight, bias) -> z`` computing the layer's output for
            given parameters, or a ready :class:`LayerKind`.
        rows_axis: the weight axis that indexes output units (1 for ConvTranspose).

    Returns the kind registered. Optimizers built afterwards hook the new layers; an
    exact solve on them runs CG to convergence (they have no Gram).

    Example::

        register_layer(nn.ConvTranspose2d, lambda m, x, w, b: F.conv_transpose2d(
            x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation),
            rows_axis=1)
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ValueError(f"register_layer needs an nn.Module subclass, got {module_type!r}")
    if any(kind.module_type is module_type for kind in _REGISTRY):
        raise ValueError(f"{module_type.__name__} is already registered")
    kind = (
        forward
        if isinstance(forward, LayerKind)
        else FunctionalKind(module_type, forward, rows_axis=rows_axis)
    )
    _REGISTRY.insert(0, kind)
    return kind


def unregister_layer(module_type: type[nn.Module]) -> None:
    """Removes a kind added by :func:`register_layer` (built-in kinds stay)."""
    _REGISTRY[:] = [
        kind
        for kind in _REGISTRY
        if kind.module_type is not module_type or isinstance(kind, (LinearKind, ConvKind))
    ]


def kind_for(module: nn.Module) -> LayerKind | None:
    """The registered kind for ``module``, or None when ProxProp cannot precondition it.

    A subclass of a registered module type counts only when it keeps the base class's
    ``forward`` (a subclass that overrides it may not be linear in its parameters), and only
    when ``weight`` is a plain registered parameter (not a parametrization).
    """
    for kind in _REGISTRY:
        base = kind.module_type
        if (
            isinstance(module, base)
            and type(module).forward is base.forward
            and isinstance(module._parameters.get("weight"), nn.Parameter)
        ):
            return kind
    return None


@dataclass(frozen=True)
class RowLayout:
    """How a layer's (W, b) map to rows ``(groups, rows_per_group, row_dim)``.

    ``rows_axis`` is the weight axis that indexes output units (0 for Linear and ConvNd;
    1 for ConvTranspose, whose weight is (C_in, C_out, k...)).
    """

    weight_shape: torch.Size
    groups: int
    has_bias: bool
    rows_axis: int = 0

    @property
    def rows(self) -> int:
        return self.weight_shape[self.rows_axis]

    @property
    def rows_per_group(self) -> int:
        return self.rows // self.groups

    @property
    def weight_row_dim(self) -> int:
        # (From the other axes, not numel / rows: a fully_shard-ed rank may hold no rows.)
        return math.prod(
            size for axis, size in enumerate(self.weight_shape) if axis != self.rows_axis
        )

    @property
    def row_dim(self) -> int:
        return self.weight_row_dim + int(self.has_bias)

    def to_rows(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """(W: weight_shape, b: (out,)) -> rows (groups, rows_per_group, row_dim)."""
        weight = weight.movedim(self.rows_axis, 0) if self.rows_axis else weight
        weight_rows = weight.reshape(self.groups, self.rows_per_group, self.weight_row_dim)
        if not self.has_bias:
            return weight_rows
        bias_rows = bias.reshape(self.groups, self.rows_per_group, 1)
        return torch.cat([weight_rows, bias_rows], dim=-1)

    def write_rows(self, rows: Tensor, weight: Tensor, bias: Tensor | None) -> None:
        """Writes rows into (W, b) buffers shaped like the weight and bias: what
        :meth:`from_rows` gives, copied. With one group (every Linear layer and most
        convolutions) in three operators: a split, and a sum over the size-1 group axis
        with ``out=`` for each part (a copy that needs no view of the buffers)."""
        if self.rows_axis or self.groups != 1 or not weight.is_contiguous():
            weight_rows, bias_rows = self.from_rows(rows)
            weight.copy_(weight_rows)
            if bias is not None:
                bias.copy_(bias_rows)
            return
        target = weight if weight.dim() == 2 else weight.view(self.rows, self.weight_row_dim)
        if not self.has_bias:
            torch.sum(rows, 0, out=target)
            return
        weight_rows, bias_rows = torch.split(rows, [self.weight_row_dim, 1], dim=-1)
        torch.sum(weight_rows, 0, out=target)
        torch.sum(bias_rows, (0, 2), out=bias)

    def from_rows(self, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """rows -> (W, b or None); the inverse of :meth:`to_rows`."""
        weight = rows[..., : self.weight_row_dim]
        if self.rows_axis:
            moved = list(self.weight_shape)
            moved.insert(0, moved.pop(self.rows_axis))
            weight = weight.reshape(moved).movedim(0, self.rows_axis)
        else:
            weight = weight.reshape(self.weight_shape)
        bias = rows[..., self.weight_row_dim].reshape(-1) if self.has_bias else None
        return weight, bias


class Call:
    """One confirmed forward call: the module run, its input and δ (or None).

    ``raw`` is the input as captured; ``x`` the prepared one (padded, flattened, cast),
    made on first use: a Gram built from correlations of the raw input never needs it.
    """

    def __init__(
        self,
        module: nn.Module,
        kind: LayerKind,
        raw: Tensor,
        dtype: torch.dtype,
        output_grad: Tensor | None = None,
    ) -> None:
        self.module = module
        self.kind = kind
        self.raw = raw
        self.dtype = dtype
        self.output_grad = output_grad
        self._prepared: Tensor | None = None
        counted = kind.count_columns(module, raw)
        self.columns = counted if counted is not None else kind.num_columns(module, self.x)

    @property
    def x(self) -> Tensor:
        if self._prepared is None:
            self._prepared = self.kind.prepare(self.module, self.raw, self.dtype)
        return self._prepared


class LayerSystem:
    """A*A for one layer, summed over its confirmed calls since the last step.

    Args:
        layout: the layer's row layout.
        calls: ``(module, kind, raw_input, output_grad)`` of every confirmed call (δ may be
            None); inputs are prepared (padded, flattened, cast to ``dtype``) here.
        dtype: the dtype every product is computed in.
        communicator: sums products and Grams over ranks (distributed "global" mode).
        costs: the cost table the form choice uses (default: that of the inputs' device).
        gram_sources: per call, whether its Gram comes from correlations and its cost, as
            a plan decided them for this signature (default: priced here).
        rows_sharded: the rows solved are this rank's only (``fully_shard``): products
            cannot be summed over ranks (each rank's rows differ), so under a communicator
            only the all-reduced Gram serves (:attr:`matrix_free_allowed` is False).
    """

    def __init__(
        self,
        layout: RowLayout,
        calls: Sequence[tuple[nn.Module, LayerKind, Tensor, Tensor | None]],
        dtype: torch.dtype,
        communicator: Communicator | None = None,
        costs: DeviceCosts | None = None,
        gram_sources: Sequence[tuple[bool, float]] | None = None,
        rows_sharded: bool = False,
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.communicator = communicator
        self.matrix_free_allowed = communicator is None or not rows_sharded
        self.calls = [
            Call(module, kind, x, dtype, output_grad) for module, kind, x, output_grad in calls
        ]
        # This process's n; num_columns becomes the global n under a communicator.
        self.local_columns = sum(call.columns for call in self.calls)
        self.num_columns = self.local_columns
        self.im2col = any(call.kind.im2col for call in self.calls)
        # The dual form needs every column on this rank: Linear layers gather them under a
        # communicator, convolutions do not.
        self.supports_dual = (
            all(call.kind.supports_dual for call in self.calls)
            and layout.groups == 1
            and not (self.im2col and communicator is not None)
        )
        self.has_patches = all(call.kind.has_patches for call in self.calls)
        # Constants the layer's plan keeps across steps (a PlanState), where one is set.
        self.constants: Any = None
        self.costs = costs if costs is not None else device_costs(self.calls[0].raw.device)
        self._sources = (
            list(gram_sources) if gram_sources is not None else self._build_gram_sources()
        )
        self._gram_cost = (
            sum(cost for _, cost in self._sources) if self.has_patches else float("inf")
        )
        if communicator is not None:
            # Every rank must see the global n and Gram cost: the cost model then decides
            # identically on all of them. Work adds up over ranks (as the global n does in
            # the other forms' products); the patch chunks' dispatch is priced from the
            # global patch count, as one process holding every rank's columns would be.
            elements, dispatch = self._patch_chunks()
            totals = torch.tensor(
                [float(self.local_columns), self._gram_cost - dispatch, float(elements)],
                dtype=torch.float64,
                device=self.calls[0].raw.device,
            )
            communicator.all_reduce_(totals)
            self.num_columns = round(float(totals[0]))
            self._gram_cost = float(totals[1]) + self._chunk_dispatch(round(float(totals[2])))

    def gram_apply(self, rows: Tensor) -> Tensor:
        """V ↦ V Ũ Ũᵀ = A*(A V) for rows V of shape (groups, rows_per_group, row_dim).

        With a communicator, Ũ is the concatenation of every rank's columns (summed here).
        """
        weight, bias = self.layout.from_rows(rows)
        # The first call's product starts the sum: no zero-filled layer-sized buffer.
        total_weight, total_bias = None, None
        for call in self.calls:
            output = call.kind.forward(call.module, call.x, weight, bias)
            grad_weight, grad_bias = call.kind.adjoint(call.module, call.x, output, weight.shape)
            if total_weight is None:
                total_weight, total_bias = grad_weight, grad_bias if bias is not None else None
                continue
            # Out of place: a registered kind's adjoint may return tensors it keeps.
            total_weight = total_weight + grad_weight
            if total_bias is not None:
                total_bias = total_bias + grad_bias
        product = self.layout.to_rows(total_weight, total_bias)
        if self.communicator is not None:
            if not self.matrix_free_allowed:
                raise RuntimeError("ProxProp: a product summed over ranks of different rows")
            self.communicator.all_reduce_(product)
        return product

    def _build_gram_sources(self) -> list[tuple[bool, float]]:
        """Per call: (whether its Gram comes from correlations, the cost of building it).

        Each call's Gram is built the cheaper way: from correlations of the input (stride-1
        convolutions, proxoptim.conv_gram; CPU only, see proxoptim.costs) or from im2col
        patches in chunks (2·n·d² flops plus the copy).
        """
        dim = self.layout.weight_row_dim
        groups = self.layout.groups
        costs = self.costs
        sources = []
        for call in self.calls:
            elements = groups * call.columns * dim
            patches = 2.0 * elements * dim
            if call.kind.im2col:
                patches += costs.im2col_per_element * elements + self._chunk_dispatch(elements)
            correlation = float("inf")
            if costs.correlation_gram:
                correlation = call.kind.correlation_gram_cost(call.module, call.raw)
            sources.append((correlation < patches, min(correlation, patches)))
        return sources

    def _chunk_dispatch(self, elements: int) -> float:
        """The operators' cost of building a Gram from ``elements`` patch elements in
        chunks of :data:`PATCH_CHUNK_ELEMENTS`."""
        chunks = -(-elements // PATCH_CHUNK_ELEMENTS)
        return self.costs.operator_call * PATCH_CHUNK_CALLS * chunks

    def _patch_chunks(self) -> tuple[int, float]:
        """(patch elements, their chunks' dispatch cost) over the calls whose Gram comes
        from im2col patches."""
        elements, dispatch = 0, 0.0
        dim, groups = self.layout.weight_row_dim, self.layout.groups
        for call, (from_correlation, _) in zip(self.calls, self._sources, strict=True):
            if call.kind.im2col and not from_correlation:
                call_elements = groups * call.columns * dim
                elements += call_elements
                dispatch += self._chunk_dispatch(call_elements)
        return elements, dispatch

    def _ones_column(self, patch: Tensor) -> Tensor:
        """A column of ones beside ``patch`` (the bias's), kept by the plan where set."""
        shape = (*patch.shape[:-1], 1)
        if self.constants is None:
            return patch.new_ones(shape)
        return self.constants.constant(f"ones:{shape}:{patch.dtype}", lambda: patch.new_ones(shape))

    def gram_sources(self) -> list[tuple[bool, float]]:
        """Per call: whether its Gram comes from correlations, and its estimated cost."""
        return self._sources

    def gram_cost(self) -> float:
        """Estimated cost of :meth:`gram` in float32-GEMM flops, summed over ranks under a
        communicator (inf for layers without patches)."""
        return self._gram_cost

    def gram(self) -> Tensor:
        """G = Σ_calls Ũ Ũᵀ, shape (groups, row_dim, row_dim); built from patches in chunks
        or from correlations of the input, whichever :meth:`gram_cost` finds cheaper."""
        layout = self.layout
        dim = layout.weight_row_dim
        device = self.calls[0].raw.device
        shape = (layout.groups, layout.row_dim, layout.row_dim)
        # The first full product starts the sum (no zero-filled Gram); slice updates need
        # a zeroed one to add into.
        gram: Tensor | None = None
        corner_from_count = False

        def zeroed() -> Tensor:
            nonlocal gram
            if gram is None:
                gram = torch.zeros(shape, dtype=self.dtype, device=device)
            return gram

        for call, (from_correlation, _) in zip(self.calls, self.gram_sources(), strict=True):
            correlation = (
                call.kind.correlation_gram(call.module, call.raw, self.dtype)
                if from_correlation
                else None
            )
            if correlation is not None:
                weight_gram, patch_sums = correlation
                target = zeroed()
                target[:, :dim, :dim] += weight_gram
                if layout.has_bias:
                    target[:, :dim, dim] += patch_sums
                    target[:, dim, :dim] += patch_sums
                    corner_from_count = True
                continue
            # A Linear layer's patch is its input itself: with the bias column appended
            # (one n × d copy) a single product gives the whole Gram, bias row, column and
            # corner included, in four operators instead of twenty. im2col chunks are
            # already copies of up to PATCH_CHUNK_ELEMENTS: they add the bias sums apart
            # rather than be copied again.
            augment = layout.has_bias and not call.kind.im2col
            for patch in call.kind.patches(call.module, call.x):
                if augment:
                    patch = torch.cat([patch, self._ones_column(patch)], dim=2)
                    if gram is None:
                        gram = torch.bmm(patch.transpose(1, 2), patch)
                    else:
                        gram.baddbmm_(patch.transpose(1, 2), patch)
                    continue
                target = zeroed()
                target[:, :dim, :dim].baddbmm_(patch.transpose(1, 2), patch)
                if layout.has_bias:
                    column_sums = patch.sum(1)
                    target[:, :dim, dim] += column_sums
                    target[:, dim, :dim] += column_sums
                    corner_from_count = True
        gram = zeroed()  # (a layer with no columns: the zero Gram)
        if corner_from_count:
            gram[:, dim, dim] = float(self.local_columns)
        if self.communicator is not None:
            self.communicator.all_reduce_(gram)
        return gram
