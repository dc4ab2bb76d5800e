"""The dual-kernel form for Linear layers: the solve in the n-dimensional sample space.

Notation (DESIGN.md §2): X ``(n, d_in)`` the layer's stacked inputs, Ũ = [Xᵀ; 1ᵀ] the
``d × n`` patch matrix (the row of ones only with a trainable bias), K = ŨᵀŨ = XXᵀ (+ 1)
the ``n × n`` kernel, g = (g_W, g_b) the ``m`` gradient rows, h = gŨ = g_W Xᵀ + g_b 1ᵀ
``(m, n)``, and δ ``(n, m)`` the gradient the layer's output received.

Every vector CG touches lies in span{g} ⊕ range(Ũ), so every iterate is v = a·g + c Ũᵀ
with a per-row scalar ``a`` and coefficients ``c ∈ ℝⁿ``:

    ⟨a g + c Ũᵀ, a' g + c' Ũᵀ⟩ = a a' ‖g‖² + a (h·c') + a' (h·c) + c K c'ᵀ
    M (a g + c Ũᵀ)             = (a/τθ) g + (c/τθ + a h + c K) Ũᵀ

CG runs on these coordinates in one of two bases, whichever :func:`dual_cg_costs` finds
cheaper on the layer's device: in K's eigenbasis (K = QΛQᵀ, c̃ = cQ, h̃ = hQ) every one of
them is elementwise, so an iteration costs O(m·n) after one eigendecomposition (the CPU
choice); in the coefficients c themselves an iteration costs two (m × n)(n × n) products
and nothing is factorised (the accelerator choice: an n × n eigh takes milliseconds
there, whatever n). The exact solve is Woodbury's identity

    v = τθ (g − h (I/τθ + K)⁻¹ Ũᵀ).

When ``.grad`` is exactly s·δᵀŨᵀ (checked by a random probe, never assumed: gradient
clipping, loss-scale unscaling and DDP averaging all change ``.grad``), g lies in range(Ũ),
a stays 0, h = s·δᵀK is never formed, and the exact solve is v = s·δᵀ (I/τθ + K)⁻¹ Ũᵀ:
the only product with the layer's size is the final one, as large as the weight gradient.

The exact step's Cholesky factorisation and inverse run in float64 (I/τθ + K is often
ill-conditioned in float32), and so do the general form's recurrences (their inner
products cancel) and every recurrence in the coefficient basis; the eigendecomposition for
CG, the δ-form's eigenbasis recurrences and every product with X, g and δ run in the
working dtype (float32 CG directions agree with a
float64 reference as closely in this form as in the others: ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from proxoptim.cg import Recurrences, cg_recurrences
from proxoptim.operators import LayerSystem
from proxoptim.readback import read_back
from proxoptim.rowwise import guarded_ratio, row_dot
from proxoptim.workspace import Workspace

# Relative mismatch up to which .grad counts as a multiple of δᵀŨᵀ. Rounding in the two
# float32 products stays near 1e-7; anything added to the gradient above this (weight
# decay, other uses of the weight, averaging over ranks) sends the layer to the general form.
PROBE_TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-5}

# The exact solve reports its residual measured on this many rows (the full residual would
# cost a product of the layer's size).
RESIDUAL_SAMPLE_ROWS = 16

# Batches from which the kernel XXᵀ is built from its upper blocks only (symmetry saves a
# quarter of the flops; below this the smaller products run too slowly to gain).
SYMMETRIC_KERNEL_MIN_COLUMNS = 256


@dataclass
class DualSolution:
    """v = (weight, bias), CG iterations (0: exact) and ‖g − M v‖ (0-d, float64; None when
    not asked for)."""

    weight: Tensor
    bias: Tensor | None
    iterations: int
    residual_norm: Tensor | None


class DualKernel:
    """X, K and the products with them for one Linear layer's confirmed calls.

    Args:
        system: the layer's calls (Linear, or a one-group convolution whose im2col patches
            serve as X); their inputs are stacked into X.
    """

    def __init__(self, system: LayerSystem) -> None:
        self.has_bias = system.layout.has_bias
        self.costs = system.costs
        self.inputs = _stack([call.kind.dual_inputs(call.module, call.x) for call in system.calls])
        self.constants = system.constants
        self._product: Tensor | None = None
        self._kernel: Tensor | None = None
        self.output_grads = None
        if all(call.output_grad is not None for call in system.calls):
            self.output_grads = _stack(
                [call.kind.output_grad_rows(call.module, call.output_grad) for call in system.calls]
            ).to(self.inputs.dtype)

    @property
    def columns(self) -> int:
        return self.inputs.shape[0]

    @property
    def product(self) -> Tensor:
        """X Xᵀ whose lower triangle is exact (all a Cholesky factorisation or an eigh
        reads); symmetrised only where n is large enough for the block product."""
        if self._product is None:
            if self.columns < SYMMETRIC_KERNEL_MIN_COLUMNS:
                self._product = self.inputs @ self.inputs.T
            else:
                self._product = symmetric_product(self.inputs)
        return self._product

    @property
    def kernel(self) -> Tensor:
        """K = X Xᵀ (+ 1 with a bias), exactly symmetric; made on first use."""
        if self._kernel is None:
            product = self.product
            if self.columns < SYMMETRIC_KERNEL_MIN_COLUMNS:
                product = _symmetrised(product)
            self._kernel = product + 1.0 if self.has_bias else product
        return self._kernel

    @property
    def lower_kernel(self) -> Tensor:
        """K with its lower triangle exact (all a Cholesky factorisation or an eigh reads):
        no symmetrising."""
        if self._kernel is not None:
            return self._kernel
        return self.product + 1.0 if self.has_bias else self.product

    def shifted64(self, tau_prox: float) -> Tensor:
        """I/τθ + K in float64 (lower triangle exact): the exact solve's matrix. Three
        operators with the plan's constant I/τθ (+ 1 with a bias)."""
        columns, device, has_bias = self.columns, self.inputs.device, self.has_bias

        def shift() -> Tensor:
            eye = torch.eye(columns, dtype=torch.float64, device=device) / tau_prox
            return eye + 1.0 if has_bias else eye

        if self.constants is None:
            constant = shift()
        else:
            constant = self.constants.constant(f"dual-shift:{columns}:{tau_prox}", shift)
        return self.product.double() + constant

    def project(self, grad_weight: Tensor, grad_bias: Tensor | None) -> Tensor:
        """h = g Ũ, shape (m, n)."""
        projected = grad_weight @ self.inputs.T
        if self.has_bias:
            projected += grad_bias.unsqueeze(1)
        return projected

    def expand(
        self,
        left: Tensor,
        right: Tensor | None,
        grad_weight: Tensor,
        grad_bias: Tensor | None,
        gradient_scale: Tensor | None,
        out: tuple[Tensor, Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """v = diag(gradient_scale)·g + (left @ right) Ũᵀ for left (m, n), right (n, n) or
        None (the identity): :meth:`expand_blocks` on one block. ``out`` receives (W, b)
        when given."""
        rows = left.shape[0]
        weight_part, bias_part = self.expand_blocks([(slice(0, rows), left)], right, rows, out)
        if gradient_scale is None:
            return weight_part, bias_part
        weight_part.addcmul_(grad_weight, gradient_scale.unsqueeze(1))
        if self.has_bias:
            bias_part.addcmul_(grad_bias, gradient_scale)
        return weight_part, bias_part

    def expand_blocks(
        self,
        blocks: Iterable[tuple[slice, Tensor]],
        right: Tensor | None,
        rows: int,
        out: tuple[Tensor, Tensor | None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """v[index] = (left @ right) Ũᵀ for every (index, left) a block at a time.

        ``blocks`` yields row slices and their ``left`` (len(index), n); ``right`` is
        (n, n) or None (the identity) and ``rows`` the total m. The product is associated
        the cheaper way, once for all blocks: (left·right)·X costs 2mn² + 2mnd flops,
        left·(right·X) 2n²d + 2mnd. Only one block of coefficients need exist, so a solve
        run in blocks never holds an
        m × n array.
        """
        dim = self.inputs.shape[1]
        out_weight, out_bias = out if out is not None else (None, None)
        if out_weight is None:
            out_weight = self.inputs.new_empty(rows, dim)
        if self.has_bias and out_bias is None:
            out_bias = self.inputs.new_empty(rows)
        right_first = right is not None and rows > dim
        if right_first:
            projected, right_sums = right @ self.inputs, right.sum(1)
        for index, left in blocks:
            # (A block of every row writes the buffers themselves: a slice is an operator.)
            whole = left.shape[0] == rows
            weight_rows = out_weight if whole else out_weight[index]
            bias_rows = out_bias if whole or not self.has_bias else out_bias[index]
            if right_first:
                torch.mm(left, projected, out=weight_rows)
                if self.has_bias:
                    torch.mv(left, right_sums, out=bias_rows)
            else:
                coefficients = left if right is None else torch.mm(left, right)
                torch.mm(coefficients, self.inputs, out=weight_rows)
                if self.has_bias:
                    torch.sum(coefficients, 1, out=bias_rows)
        return out_weight, out_bias if self.has_bias else None


def draw_probe(grad_weight: Tensor, grad_bias: Tensor | None, generator: torch.Generator) -> Tensor:
    """A standard normal probe ω for the gradient's rows: (d_in,), or (d_in + 1,) with a
    bias (its last entry probes the bias column)."""
    size = grad_weight.shape[1] + (grad_bias is not None)
    return torch.randn(
        size, generator=generator, dtype=grad_weight.dtype, device=grad_weight.device
    )


def probe_numbers_for(
    system: LayerSystem, grad_weight: Tensor, grad_bias: Tensor | None, probe: Tensor
) -> Tensor:
    """(‖δ̂‖², s, ‖ĝ − s·δ̂‖, ‖ĝ‖) for ĝ = gω and δ̂ = δᵀ(Ũᵀω) summed over the calls, s
    their least-squares ratio; shape (4,), float64, on the device (nothing is read back, so
    a CUDA graph can compute it). Every call must have its δ.

    O((m + n)·d) work, against the O(m·n·d) the δ form can save, in 13 operators (11
    without a bias, 3 more per further call): each product with ω is one matrix-vector
    product with the bias term fused in, and the mismatch is the norm of the residual
    vector itself, not ‖ĝ‖² − s²‖δ̂‖², whose cancellation would blur it far above a float64
    layer's tolerance.
    """
    dtype = grad_weight.dtype
    rows = system.layout.rows
    if grad_bias is None:
        weight_probe, bias_probe = probe, None
    else:
        weight_probe, bias_probe = probe.split(grad_weight.shape[1])  # (d_in,), (1,)
    probed_grad = torch.mv(grad_weight, weight_probe)
    if bias_probe is not None:
        probed_grad.addcmul_(grad_bias, bias_probe)
    probed_delta = None
    for call in system.calls:
        # Ũᵀω: X ω_W + ω_b per sample, in one product.
        if bias_probe is None:
            probed_inputs = torch.mv(call.x, weight_probe)
        else:
            probed_inputs = torch.addmv(bias_probe, call.x, weight_probe)
        delta = call.output_grad
        if delta.dim() != 2 or delta.shape[1] != rows:
            delta = delta.reshape(-1, rows)
        delta = delta.to(dtype).t()  # (m, n)
        if probed_delta is None:
            probed_delta = torch.mv(delta, probed_inputs)
        else:
            probed_delta = torch.addmv(probed_delta, delta, probed_inputs)
    delta_sq = torch.dot(probed_delta, probed_delta)
    scale = torch.dot(probed_grad, probed_delta) / delta_sq
    residual = torch.addcmul(probed_grad, probed_delta, scale, value=-1)
    # The norms are taken in float64 (cast as they are read), and stack widens the rest.
    mismatch = torch.linalg.vector_norm(residual, dtype=torch.float64)
    grad_norm = torch.linalg.vector_norm(probed_grad, dtype=torch.float64)
    return torch.stack([delta_sq, scale, mismatch, grad_norm])


def probe_verdicts(numbers: list[Tensor | None], dtypes: list[torch.dtype]) -> list[float | None]:
    """:func:`probe_verdict` for every layer's probe numbers (None: not probed), read back
    with one host sync per device."""
    return [
        None if row is None else probe_verdict(row, dtype)
        for row, dtype in zip(read_back(numbers), dtypes, strict=True)
    ]


def probe_verdict(numbers: list[float], dtype: torch.dtype) -> float | None:
    """s from :meth:`DualKernel.probe_numbers` read back, if the fit ĝ ≈ s·δ̂ is within
    :data:`PROBE_TOLERANCE`; else None (the general form runs)."""
    delta_sq, scale, mismatch, grad_norm = numbers
    tolerance = PROBE_TOLERANCE.get(dtype, 1e-3)
    if delta_sq > 0 and mismatch <= tolerance * grad_norm:
        return scale
    return None


def symmetric_product(inputs: Tensor) -> Tensor:
    """X Xᵀ for X (n, d), exactly symmetric; from three of its four blocks when n is large."""
    columns = inputs.shape[0]
    if columns < SYMMETRIC_KERNEL_MIN_COLUMNS:
        return _symmetrised(inputs @ inputs.T)
    half = columns // 2
    top, bottom = inputs[:half], inputs[half:]
    product = torch.empty(columns, columns, dtype=inputs.dtype, device=inputs.device)
    product[:half, :half] = _symmetrised(top @ top.T)
    product[:half, half:] = top @ bottom.T
    product[half:, :half] = product[:half, half:].T
    product[half:, half:] = _symmetrised(bottom @ bottom.T)
    return product


def _symmetrised(square: Tensor) -> Tensor:
    # A GEMM may round entries (i, j) and (j, i) differently.
    return (square + square.T).mul_(0.5)


def _stack(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def solve_dual(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    *,
    exact: bool,
    cg_iters: int,
    cg_tol: float | None,
    output_grad_scale: float | None,
    out: tuple[Tensor, Tensor | None] | None = None,
    workspace: Workspace | None = None,
    diagnostics: bool = True,
    basis: str | None = None,
) -> DualSolution:
    """v = M⁻¹g (``exact``) or ``cg_iters`` per-row CG iterations from v = 0, in the dual;
    CG runs in ``basis``, or where None in whichever basis :func:`dual_cg_costs` prices
    lower.

    Args:
        grad_weight: g_W, (m, d_in); grad_bias: g_b, (m,) or None.
        output_grad_scale: s when .grad is known to equal s·δᵀŨᵀ (see
            :func:`probe_numbers_for` and :func:`probe_verdict`); None for the general form.
        out: optional (W, b) buffers to write v into.
        workspace: scratch buffers reused across calls (a private one when None).
        diagnostics: also report ‖g − M v‖ (the exact solve then measures it on sampled
            rows; CG has it from its recurrence).
    """
    if exact:
        return _exact(kernel, grad_weight, grad_bias, tau_prox, output_grad_scale, out, diagnostics)
    if basis is None:
        from proxoptim.plan import cheaper_dual_basis  # (the plan module imports this one)

        known = output_grad_scale is not None
        basis = cheaper_dual_basis(
            kernel.costs, kernel.columns, grad_weight.shape[0], cg_iters, known
        )
    if basis == "coefficient":
        solution = _coefficient_cg(
            kernel, grad_weight, grad_bias, tau_prox, cg_iters, cg_tol, output_grad_scale, out
        )
    else:
        solution = _eigenbasis_cg(
            kernel,
            grad_weight,
            grad_bias,
            tau_prox,
            cg_iters,
            cg_tol,
            output_grad_scale,
            out,
            workspace if workspace is not None else Workspace(),
            need_residual=diagnostics,
        )
    if not diagnostics:
        solution.residual_norm = None
    return solution


@dataclass
class StackedLayer:
    """One layer's part in :func:`solve_dual_stacked`: its kernel (with δ), the verified
    scale s of ``.grad = s·δᵀŨᵀ`` and the (W, b) buffers that receive v."""

    kernel: DualKernel
    scale: float
    out: tuple[Tensor, Tensor | None]


def solve_dual_stacked(
    layers: list[StackedLayer], tau_prox: float, iterations: int, workspace: Workspace
) -> list[DualSolution]:
    """The δ-form eigenbasis CG of several Linear layers with the same n, as one recurrence.

    Every layer's rows are an independent CG on its own diagonal diag(1/τθ + λ) (DESIGN.md
    §1), so the rows of all layers can run through one :func:`proxoptim.cg.cg_recurrences`
    whose diagonal is given per row: its operators per iteration are dispatched once for the
    stack instead of once per layer. Each layer keeps its own eigh, start s·δᵀQ, scaling by
    √λ and final product; the CG at unit row norm (:func:`_unit_row_diagonal_cg`) runs once
    over the stack. The directions are those of :func:`solve_dual` on each layer alone
    (the same recurrences on the same rows; the inner products are per row either way).

    No tolerance, no residual: the caller stacks only CG of a fixed iteration count without
    diagnostics. Returns one DualSolution per layer, in order (``residual_norm`` None).
    """
    like = layers[0].kernel.inputs
    columns = layers[0].kernel.columns
    rows = tuple(layer.kernel.output_grads.shape[1] for layer in layers)
    starts, start_parts = workspace.take_split("stacked-start", rows, columns, like)
    diagonals, diagonal_parts = workspace.take_split("stacked-diagonal", rows, columns, like)
    coefficients, coefficient_parts = workspace.take_split(
        "stacked-coefficients", rows, columns, like
    )
    tiny = torch.finfo(like.dtype).tiny
    bases = []
    for layer, start, diagonal in zip(layers, start_parts, diagonal_parts, strict=True):
        # eigh reads the lower triangle only: K needs no symmetrising for it.
        eigenvalues, basis = torch.linalg.eigh(layer.kernel.lower_kernel)
        roots = eigenvalues.clamp_min_(0).sqrt()
        # û₀ = √λ·s·δᵀQ, the layer's rows of the stacked right-hand side (in the order of
        # _eigenbasis_cg's operations, so that each layer's rounding is the same as alone).
        torch.matmul(layer.kernel.output_grads.T, basis, out=start).mul_(layer.scale)
        start.mul_(roots)
        diagonal.copy_(eigenvalues.add_(1.0 / tau_prox))  # D = λ + 1/τθ on every row
        bases.append((roots.clamp_min_(tiny), basis))
    # One CG over the stack, each row on its own layer's diagonal.
    run, row_scale = _unit_row_diagonal_cg(
        starts, diagonals, iterations, None, workspace, keep_residual=False
    )
    # u = û/√λ times the row scale (components with λ = 0 are 0 in û: see _diagonal_cg).
    for solved, layer_coefficients, (roots, _) in zip(
        workspace.split(run.solution, rows), coefficient_parts, bases, strict=True
    ):
        torch.div(solved, roots, out=layer_coefficients)
    coefficients.mul_(row_scale)
    solutions = []
    for layer, layer_coefficients, (_, basis) in zip(layers, coefficient_parts, bases, strict=True):
        # v = uQᵀŨᵀ
        weight, bias = layer.kernel.expand_blocks(
            [(slice(0, layer_coefficients.shape[0]), layer_coefficients)],
            basis.T,
            layer_coefficients.shape[0],
            layer.out,
        )
        solutions.append(DualSolution(weight, bias, run.iterations, None))
    return solutions


def solve_dual_from_output_grads(
    kernel: DualKernel,
    rows: int,
    tau_prox: float,
    *,
    exact: bool,
    cg_iters: int,
    cg_tol: float | None,
    diagnostics: bool = False,
    basis: str | None = None,
    workspace: Workspace | None = None,
) -> DualSolution:
    """The δ form, v = δᵀ (I/τθ + K)⁻¹ Ũᵀ (or CG on it), from δ and X alone, where no
    gradient exists (``solve_in_backward``, proxoptim.backward_solve). ``rows``: m."""
    # The δ form reads g only for its row count, dtype and device: an empty stand-in.
    shape_only = kernel.inputs.new_empty((rows, 0))
    return solve_dual(
        kernel,
        shape_only,
        None,
        tau_prox,
        exact=exact,
        cg_iters=cg_iters,
        cg_tol=cg_tol,
        output_grad_scale=1.0,
        workspace=workspace,
        diagnostics=diagnostics,
        basis=basis,
    )


def _exact(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    scale: float | Tensor | None,
    out: tuple[Tensor, Tensor | None] | None,
    diagnostics: bool = True,
) -> DualSolution:
    """Woodbury: v = c Ũᵀ (+ τθ g in the general form) with c = ℓ (I/τθ + K)⁻¹, where
    ℓ = s·δᵀ (δ form) or ℓ = −τθ h (general form); (I/τθ + K) factorised in float64.

    Nothing here reads a value back to the host (so the solve can be captured as a CUDA
    graph): a kernel that is not positive definite in float64 (non-finite inputs, or
    repeated samples with a τθ so large that I/τθ vanishes beside K) turns the direction
    into NaN, which the optimizer names (tests/test_reliability.py).
    """
    dtype = grad_weight.dtype
    shifted = kernel.shifted64(tau_prox)
    factor, info = torch.linalg.cholesky_ex(shifted)
    factor = factor.masked_fill(info != 0, float("nan"))
    if scale is not None:
        # v = s·δᵀ (I/τθ + K)⁻¹ Ũᵀ
        left, gradient_scale = kernel.output_grads.T, None
    else:
        # v = τθ g − τθ h (I/τθ + K)⁻¹ Ũᵀ
        left = kernel.project(grad_weight, grad_bias) * (-tau_prox)
        gradient_scale = torch.full(
            (grad_weight.shape[0],), tau_prox, dtype=dtype, device=grad_weight.device
        )
    left_scale = 1.0 if scale is None else scale
    if kernel.costs.explicit_inverse:
        inverse = torch.cholesky_inverse(factor)
        right = inverse.to(dtype)
        if scale is not None:
            # The scalar goes into the n×n factor, not into the m×n δᵀ.
            right = right * scale
        weight, bias = kernel.expand(left, right, grad_weight, grad_bias, gradient_scale, out)

        def solved_rows(rows: Tensor) -> Tensor:
            return (left[rows].double() @ inverse) * left_scale

    else:
        # Triangular solves against ℓ itself: on a GPU the explicit inverse costs more than
        # solving for every row's coefficients (2·n²·m float64 flops).
        solved = torch.cholesky_solve(left.T.double(), factor).T
        if scale is not None:  # (no pass over m × n numbers to multiply by 1)
            solved = solved * scale
        coefficients = solved.to(dtype)
        weight, bias = kernel.expand(
            coefficients, None, grad_weight, grad_bias, gradient_scale, out
        )

        def solved_rows(rows: Tensor) -> Tensor:
            return solved[rows]

    if not diagnostics:
        return DualSolution(weight, bias, 0, None)
    sample = _sample_rows(left)
    started_sample = left[sample].double() * left_scale
    solved_sample = solved_rows(sample)
    residual = _sampled_residual(kernel, started_sample, solved_sample, shifted, left.shape[0])
    return DualSolution(weight, bias, 0, residual)


def _sample_rows(left: Tensor) -> Tensor:
    """Up to RESIDUAL_SAMPLE_ROWS evenly spaced row indices of ``left``."""
    rows = left.shape[0]
    count = min(rows, RESIDUAL_SAMPLE_ROWS)
    return torch.linspace(0, rows - 1, count, device=left.device).round().long()


def _sampled_residual(
    kernel: DualKernel, started: Tensor, solved: Tensor, shifted: Tensor, rows: int
) -> Tensor:
    """‖g − M v‖ estimated from sampled rows (float64), scaled to all ``rows``.

    ``started`` holds the sampled rows of ℓ, ``solved`` those of c = ℓ(I/τθ + K)⁻¹.
    δ form: v = cŨᵀ, g = ℓŨᵀ -> g − Mv = (ℓ − c(I/τθ + K)) Ũᵀ.
    General form: v = τθ g + cŨᵀ, ℓ = −τθ h -> g − Mv = (ℓ − c(I/τθ + K)) Ũᵀ as well.
    Either way the residual is ρŨᵀ and ‖ρŨᵀ‖² = ρ K ρᵀ.
    """
    rho = started - solved @ shifted
    squared = (rho @ kernel.kernel.double() * rho).sum()
    return (squared.clamp_min(0) * (rows / started.shape[0])).sqrt()


# The general form's squared residual counts as rounding noise (the row as converged)
# below this many machine epsilons of the magnitude of its terms.
ROUNDING_FLOOR = 64

# Rows per block of the CG recurrences: a block's vectors stay in cache across iterations,
# and the general form's float64 temporaries stay bounded.
CG_ROW_BLOCK = 1024


def _block_rows(kernel: DualKernel, rows: int) -> int:
    """Rows per block: CG_ROW_BLOCK where the device profits from it (a CPU's caches);
    elsewhere all rows at once, since every block costs its own operator launches."""
    return CG_ROW_BLOCK if kernel.costs.row_blocks else max(rows, 1)


def _gradient_sq(grad_weight: Tensor, grad_bias: Tensor | None) -> Tensor:
    """‖g_j‖² per row, (m, 1), float64."""
    # Squared and summed in float64 without a float64 copy of g (the norm casts as it
    # reads; addcmul_ into a float64 tensor multiplies in float64).
    gradient_sq = torch.linalg.vector_norm(
        grad_weight, dim=1, keepdim=True, dtype=torch.float64
    ).square_()
    if grad_bias is not None:
        bias = grad_bias.unsqueeze(1)
        gradient_sq.addcmul_(bias, bias)
    return gradient_sq


def _general_cg_blocks(
    projected: Tensor | None,
    gradient_sq: Tensor | None,
    kernel_times: Callable[[Tensor], Tensor],
    tau_prox: float,
    iterations: int,
    tol: float | None,
    dtype: torch.dtype,
    block_rows: int,
    start: Tensor | None = None,
) -> tuple[Tensor, int, Tensor, Tensor | None]:
    """:func:`_general_cg` on every block of ``block_rows`` rows: (c in ``dtype``, most
    iterations run, Σ squared residual norms, a in ``dtype`` or None for the δ form)."""
    reference = projected if projected is not None else start
    rows = reference.shape[0]

    def block_of(values: Tensor | None, index: slice) -> Tensor | None:
        # (No slicing operator where one block holds every row.)
        return values if values is None or block_rows >= rows else values[index]

    blocks = []
    for first in range(0, rows, block_rows):
        index = slice(first, first + block_rows)
        blocks.append(
            _general_cg(
                block_of(projected, index),
                block_of(gradient_sq, index),
                kernel_times,
                tau_prox,
                iterations,
                tol,
                block_of(start, index),
            )
        )
    done = max(block[1] for block in blocks)
    if len(blocks) == 1:
        coefficients, _, residual_sq, scales = blocks[0]
    else:
        coefficients = torch.cat([block[0] for block in blocks])
        residual_sq = torch.stack([block[2] for block in blocks]).sum()
        scales = torch.cat([block[3] for block in blocks])
    gradient_scale = None if start is not None else scales.squeeze(1).to(dtype)
    return coefficients.to(dtype), done, residual_sq, gradient_scale


def _coefficient_cg(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    iterations: int,
    tol: float | None,
    scale: float | None,
    out: tuple[Tensor, Tensor | None] | None,
) -> DualSolution:
    """CG on (a, c) coordinates with K itself (float64): no factorisation at all."""
    kernel64 = kernel.kernel.double()

    def kernel_times(coefficients: Tensor) -> Tensor:
        return coefficients @ kernel64

    start = None if scale is None else kernel.output_grads.T.double() * scale
    return _general_solution(
        kernel, grad_weight, grad_bias, tau_prox, iterations, tol, out, kernel_times, start=start
    )


def _general_solution(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    iterations: int,
    tol: float | None,
    out: tuple[Tensor, Tensor | None] | None,
    kernel_times: Callable[[Tensor], Tensor],
    basis: Tensor | None = None,
    start: Tensor | None = None,
) -> DualSolution:
    """:func:`_general_cg_blocks` in the coefficient basis (``basis`` None) or in the
    orthonormal ``basis`` whose K is ``kernel_times``, then v = a·g + c·basisᵀ·Ũᵀ.
    ``start``: s·δᵀ for the δ form (coefficient basis only); else CG starts from g, with
    h = gŨ (in ``basis``) and ‖g‖² in float64, where the general form's inner products
    cancel as the residual shrinks."""
    projected, gradient_sq = None, None
    if start is None:
        projected = kernel.project(grad_weight, grad_bias)
        if basis is not None:
            projected = projected @ basis
        projected, gradient_sq = projected.double(), _gradient_sq(grad_weight, grad_bias)
    coefficients, done, residual_sq, gradient_scale = _general_cg_blocks(
        projected,
        gradient_sq,
        kernel_times,
        tau_prox,
        iterations,
        tol,
        grad_weight.dtype,
        _block_rows(kernel, grad_weight.shape[0]),
        start,
    )
    right = None if basis is None else basis.T
    weight, bias = kernel.expand(coefficients, right, grad_weight, grad_bias, gradient_scale, out)
    return DualSolution(weight, bias, done, residual_sq.double().sqrt())


def _eigenbasis_cg(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    iterations: int,
    tol: float | None,
    scale: float | None,
    out: tuple[Tensor, Tensor | None] | None,
    workspace: Workspace,
    need_residual: bool = True,
) -> DualSolution:
    """CG on (a, c̃) coordinates in K's eigenbasis: every iteration elementwise.
    ``need_residual``: whether the δ form reports its final residual norm (None without)."""
    # eigh reads the lower triangle only: K needs no symmetrising for it.
    eigenvalues, basis = torch.linalg.eigh(kernel.lower_kernel)
    eigenvalues = eigenvalues.clamp_min(0)
    if scale is not None:
        # g = s·δᵀŨᵀ: r₀ = (0, s·δᵀQ), a stays 0, and every quantity is a plain diagonal CG
        # in the weighted inner product Σ λᵢ uᵢ wᵢ; it runs in the working dtype.
        blocks = _ShortcutBlocks(
            kernel, basis, eigenvalues, scale, tau_prox, iterations, tol, workspace, need_residual
        )
        weight, bias = kernel.expand_blocks(blocks, basis.T, grad_weight.shape[0], out)
        if not need_residual and tol is None:
            return DualSolution(weight, bias, blocks.done, None)
        residual_sq = blocks.residual_sq
        if residual_sq is None:  # no rows at all
            residual_sq = torch.zeros((), dtype=basis.dtype, device=basis.device)
        return DualSolution(weight, bias, blocks.done, residual_sq.double().sqrt())

    eigenvalues64 = eigenvalues.double()

    def kernel_times(coefficients: Tensor) -> Tensor:
        return coefficients * eigenvalues64

    return _general_solution(
        kernel, grad_weight, grad_bias, tau_prox, iterations, tol, out, kernel_times, basis
    )


class _ShortcutBlocks:
    """The δ-form CG a block of rows at a time: iterating yields (row slice, c̃ of the block).

    Each block's start s·δᵀQ, its recurrences and (in :meth:`DualKernel.expand_blocks`) its
    share of the final product run before the next block's, so only block-sized scratch
    exists; blocks of rows also keep the CG vectors in cache (measured 1.5x faster at
    m = 4000). ``done`` and ``residual_sq`` hold the most iterations and Σ‖r‖² so far
    (None before the first block).
    """

    def __init__(
        self,
        kernel: DualKernel,
        basis: Tensor,
        eigenvalues: Tensor,
        scale: float,
        tau_prox: float,
        iterations: int,
        tol: float | None,
        workspace: Workspace,
        need_residual: bool = True,
    ) -> None:
        self.kernel, self.basis, self.eigenvalues = kernel, basis, eigenvalues
        self.need_residual = need_residual
        self.scale, self.tau_prox, self.iterations, self.tol = scale, tau_prox, iterations, tol
        self.workspace = workspace
        self.done = 0
        self.residual_sq: Tensor | None = None

    def __iter__(self) -> Iterator[tuple[slice, Tensor]]:
        deltas = self.kernel.output_grads.T  # (m, n)
        rows = deltas.shape[0]
        block_rows = _block_rows(self.kernel, rows)
        shape = (min(rows, block_rows), self.kernel.columns)
        start = self.workspace.take("start", shape, self.basis)
        coefficients = self.workspace.take("coefficients", shape, self.basis)
        for first in range(0, rows, block_rows):
            index = slice(first, min(first + block_rows, rows))
            size = index.stop - index.start
            # (No slicing operators where one block holds every row.)
            block_start, block_coefficients, block_deltas = start, coefficients, deltas
            if size < shape[0]:
                block_start, block_coefficients = start[:size], coefficients[:size]
            if size < rows:
                block_deltas = deltas[index]
            torch.matmul(block_deltas, self.basis, out=block_start).mul_(self.scale)
            block_done, block_residual_sq = _diagonal_cg(
                block_start,
                block_coefficients,
                self.eigenvalues,
                self.tau_prox,
                self.iterations,
                self.tol,
                self.workspace,
                self.need_residual,
            )
            self.done = max(self.done, block_done)
            if block_residual_sq is None:
                pass
            elif self.residual_sq is None:
                self.residual_sq = block_residual_sq
            else:
                self.residual_sq = self.residual_sq + block_residual_sq
            yield index, block_coefficients


def _unit_row_diagonal_cg(
    scaled: Tensor,
    diagonal: Tensor,
    iterations: int,
    tol: float | None,
    workspace: Workspace,
    keep_residual: bool,
) -> tuple[Recurrences, Tensor]:
    """CG on the diagonal ``diagonal`` ((n,) for one layer's rows, or (rows, n) with each
    row's own) for every row of the √λ-scaled start ``scaled`` (rows, n), at unit row norm.

    CG is linear in its right-hand side: every row runs at unit norm and is scaled back by
    the caller, so that squared residuals of small gradients never sink into (slow)
    denormal floats. A zero row divides by the smallest normal instead, and stays 0.
    ``scaled`` is divided in place. Returns the recurrences' result (solution and residual
    of the unit rows) and the row norms, (rows, 1), to multiply them back by.

    Shared by the δ form of one layer (:func:`_diagonal_cg`) and of a stack of layers
    (:func:`solve_dual_stacked`), which differ only in how they enter and leave the √λ
    coordinates.
    """
    tiny = torch.finfo(scaled.dtype).tiny
    row_scale = torch.linalg.vector_norm(scaled, dim=1, keepdim=True).clamp_min_(tiny)
    scaled.div_(row_scale)

    def times_diagonal(rows: Tensor, out: Tensor) -> Tensor:
        return torch.mul(rows, diagonal, out=out)

    run = cg_recurrences(
        times_diagonal, scaled, iterations, tol, workspace, keep_residual=keep_residual
    )
    return run, row_scale


def _diagonal_cg(
    start: Tensor,
    solution: Tensor,
    eigenvalues: Tensor,
    tau_prox: float,
    iterations: int,
    tol: float | None,
    workspace: Workspace,
    need_residual: bool = True,
) -> tuple[int, Tensor | None]:
    """CG on diag(1/τθ + λ) for each row of ``start`` (rows, n), inner product Σ λ u w.

    Writes the iterate into ``solution`` (same shape); returns (iterations run, Σ over rows
    of the final squared residual norm, or None without ``need_residual`` and ``tol``: the
    last iteration then skips the residual). ``start`` is consumed.

    The recurrences run on √λ-scaled vectors û = √λ·u, where the weighted inner product is
    the plain one: every norm is one reduction pass (no matrix-vector product, whose
    multi-threaded BLAS call was up to 5x slower on a 2-vCPU machine) and the recurrences
    are :func:`proxoptim.cg.cg_recurrences` with the diagonal D = 1/τθ + λ (9 operators a
    full iteration). Components with λ = 0 do not reach v (their patch combination Ũq is
    0) and come out as 0.
    """
    roots = eigenvalues.sqrt()
    diagonal = eigenvalues + 1.0 / tau_prox
    scaled = start.mul_(roots)
    run, row_scale = _unit_row_diagonal_cg(
        scaled, diagonal, iterations, tol, workspace, keep_residual=need_residual
    )
    tiny = torch.finfo(start.dtype).tiny
    # Back from the scaled coordinates: u = û/√λ, times the row scale. Components with
    # λ = 0 are exactly 0 in û (r₀ = √λ·start and every update keep them so) and divide by
    # the smallest normal instead of 0; √λ is either 0 or far above it (√ of the smallest
    # subnormal), so every other component divides by √λ itself.
    torch.div(run.solution, roots.clamp_min(tiny), out=solution).mul_(row_scale)
    if run.negated_residual is None:
        return run.iterations, None
    # Σ over rows of ‖r·row scale‖², from the last residual (scaled in place: no longer
    # needed).
    return run.iterations, torch.linalg.vector_norm(run.negated_residual.mul_(row_scale)).square()


def _general_cg(
    projected: Tensor | None,
    gradient_sq: Tensor | None,
    kernel_times: Callable[[Tensor], Tensor],
    tau_prox: float,
    iterations: int,
    tol: float | None,
    start: Tensor | None = None,
) -> tuple[Tensor, int, Tensor, Tensor]:
    """CG on x = a·g + c Ũᵀ (float64 coordinates in some basis of ℝⁿ) for a block of rows.

    ``kernel_times`` applies K in that basis (K's eigenbasis: a diagonal scaling; the
    coefficient basis: a product with K). From r₀ = g (rows with h = gŨ ``projected`` and
    ‖g‖² ``gradient_sq``), or, given ``start`` = s·δᵀ (then g = s·δᵀŨᵀ, a stays 0 and
    ``projected``/``gradient_sq`` are None), from r₀ = (0, start).

    Returns (c of the solution, iterations run, Σ squared residual norms, a of the solution).
    """
    inverse_tau = 1.0 / tau_prox
    general = projected is not None
    reference = projected if general else start
    noise = ROUNDING_FLOOR * torch.finfo(reference.dtype).eps

    def residual_norm_sq(a: Tensor | None, b: Tensor) -> Tensor:
        # ‖a·g + bŨᵀ‖² = bKbᵀ + a²‖g‖² + 2a(h·b); where its terms cancel down to rounding,
        # the row has converged (exactly so once k reaches the rank) and is reported as 0,
        # which stops it: further steps would be driven by rounding noise, not by the
        # residual. (A value at or below 0 always lies under that floor.) In the δ form
        # a = 0: one term, nothing cancels, and only a negative rounding of it needs care.
        squares = row_dot(kernel_times(b), b)
        if not general:
            return squares.clamp_min_(0)
        squares.addcmul_(a * a, gradient_sq)
        cross = row_dot(projected, b).mul_(a)  # half the cross term
        value = torch.add(squares, cross, alpha=2.0)
        floor = torch.add(squares, cross.abs_(), alpha=2.0).mul_(noise)
        return value.masked_fill_(value <= floor, 0.0)

    # x₀ = 0 and r₀ = p₀: g itself, (a, b) = (1, 0), in the general form, (0, start) in the
    # δ form, where a stays 0 and is not carried at all. A b that is still 0 is None, and
    # the first iteration creates x, r and p instead of zero-filling and copying them;
    # ``start`` itself is never written. The (m, n) vectors are then updated in place: on a
    # GPU each of these passes is a kernel of its own. ⟨p, Mp⟩ = ⟨Mp, p⟩ is formed from
    # Mp = (p_a/τθ, p_b/τθ + w) and w = pŨ = p_a h + p_b K, which Mp needs anyway:
    # (p_a/τθ)·⟨p, g⟩ + (Mp)_b·w, with ⟨p, g⟩ = p_a‖g‖² + h·p_b.
    rows = reference.shape[0]
    residual_a = direction_a = solution_a = None
    residual_b = direction_b = solution_b = kernel_direction = None
    if general:
        residual_a = direction_a = torch.ones(
            rows, 1, dtype=reference.dtype, device=reference.device
        )
        residual_sq = gradient_sq
    else:
        residual_b = direction_b = start
        kernel_direction = kernel_times(start)  # K p₀, reused by the first iteration
        residual_sq = row_dot(kernel_direction, start)
    threshold_sq = None if tol is None else (tol * tol) * residual_sq
    new_residual_sq = residual_sq
    done = 0
    for done in range(1, iterations + 1):
        if direction_b is None:  # general form, p = g: Mp = (1/τθ, h), w = h, ⟨p, g⟩ = ‖g‖²
            image_b = kernel_direction = projected
            direction_dot_g = gradient_sq
        else:
            if kernel_direction is None:
                kernel_direction = kernel_times(direction_b)
            if general:
                kernel_direction.addcmul_(projected, direction_a)
            image_b = torch.add(kernel_direction, direction_b, alpha=inverse_tau)
            if general:
                direction_dot_g = row_dot(projected, direction_b)
                direction_dot_g.addcmul_(direction_a, gradient_sq)
        curvature = row_dot(image_b, kernel_direction)
        kernel_direction = None
        if general:
            image_a = direction_a * inverse_tau
            curvature.addcmul_(image_a, direction_dot_g)
        alpha = guarded_ratio(residual_sq, curvature)
        if general:
            solution_a = (
                direction_a * alpha
                if solution_a is None
                else torch.addcmul(solution_a, direction_a, alpha)
            )
            residual_a = torch.addcmul(residual_a, image_a, alpha, value=-1)
        if direction_b is not None:
            if solution_b is None:
                solution_b = direction_b * alpha
            else:
                solution_b.addcmul_(direction_b, alpha)
        if residual_b is None:
            residual_b = image_b * alpha.neg()
        elif residual_b is direction_b:  # r is still r₀ (δ form) or still p (general)
            residual_b = torch.addcmul(residual_b, image_b, alpha, value=-1)
        else:
            residual_b.addcmul_(image_b, alpha, value=-1)
        new_residual_sq = residual_norm_sq(residual_a, residual_b)
        if done == iterations or (
            threshold_sq is not None and bool((new_residual_sq <= threshold_sq).all())
        ):
            break
        beta = guarded_ratio(new_residual_sq, residual_sq)
        if general:
            direction_a = torch.addcmul(residual_a, direction_a, beta)
        if direction_b is None:  # p = r + β·(…, 0): its b is r's, shared until r moves
            direction_b = residual_b
        elif direction_b is start:
            direction_b = torch.addcmul(residual_b, direction_b, beta)
        else:
            # p ← r + β·p in one pass (out= fully overlapping an input is allowed).
            torch.addcmul(residual_b, direction_b, beta, out=direction_b)
        residual_sq = new_residual_sq
    if solution_b is None:  # general form after one iteration: x = (α, 0)
        solution_b = torch.zeros_like(reference)
    if solution_a is None:  # δ form: a stays 0
        solution_a = torch.zeros(rows, 1, dtype=reference.dtype, device=reference.device)
    return solution_b, done, new_residual_sq.sum(), solution_a
