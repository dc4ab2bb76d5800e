"""The dual-kernel form for Linear layers: the solve in the n-dimensional sample space.

Notation (DESIGN.md §2): X ``(n, d_in)`` the layer's stacked inputs, Ũ = [Xᵀ; 1ᵀ] the
``d × n`` patch matrix (the row of ones only with a trainable bias), K = ŨᵀŨ = XXᵀ (+ 1)
the ``n × n`` kernel, g = (g_W, g_b) the ``m`` gradient rows, h = gŨ = g_W Xᵀ + g_b 1ᵀ
``(m, n)``, and δ ``(n, m)`` the gradient the layer's output received.

Every vector CG touches lies in span{g} ⊕ range(Ũ), so every iterate is v = a·g + c Ũᵀ
with a per-row scalar ``a`` and coefficients ``c ∈ ℝⁿ``:

    ⟨a g + c Ũᵀ, a' g + c' Ũᵀ⟩ = a a' ‖g‖² + a (h·c') + a' (h·c) + c K c'ᵀ
    M (a g + c Ũᵀ)             = (a/τθ) g + (c/τθ + a h + c K) Ũᵀ

In K's eigenbasis (K = QΛQᵀ, c̃ = cQ, h̃ = hQ) every one of these is elementwise, so a CG
iteration costs O(m·n) whatever k is. The exact solve is Woodbury's identity

    v = τθ (g − h (I/τθ + K)⁻¹ Ũᵀ).

When ``.grad`` is exactly s·δᵀŨᵀ (checked by a random probe, never assumed: gradient
clipping, loss-scale unscaling and DDP averaging all change ``.grad``), g lies in range(Ũ),
a stays 0, h = s·δᵀK is never formed, and the exact solve is v = s·δᵀ (I/τθ + K)⁻¹ Ũᵀ:
the only product with the layer's size is the final one, as large as the weight gradient.

The n × n factorisations run in float64 (they are cheap at n ≲ d and float32 ``eigh`` is
both slow and inaccurate); products with X, g and δ run in the working dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from proxoptim.operators import LayerSystem

# Relative mismatch up to which .grad counts as a multiple of δᵀŨᵀ. Rounding in the two
# float32 products stays near 1e-7; anything added to the gradient above this (weight
# decay, other uses of the weight, averaging over ranks) sends the layer to the general form.
PROBE_TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-5}

# The exact solve reports its residual measured on this many rows (the full residual would
# cost a product of the layer's size).
RESIDUAL_SAMPLE_ROWS = 64


@dataclass
class DualSolution:
    """v = (weight, bias), CG iterations (0: exact) and ‖g − M v‖ (0-d, float64)."""

    weight: Tensor
    bias: Tensor | None
    iterations: int
    residual_norm: Tensor


class DualKernel:
    """X, K and the products with them for one Linear layer's confirmed calls.

    Args:
        system: the layer's calls (Linear only); their inputs are stacked into X.
    """

    def __init__(self, system: LayerSystem) -> None:
        self.has_bias = system.layout.has_bias
        self.inputs = _stack([call.x for call in system.calls])
        self.kernel = self.inputs @ self.inputs.T
        if self.has_bias:
            self.kernel += 1.0
        grads = [call.output_grad for call in system.calls]
        self.output_grads = None
        if all(grad is not None for grad in grads):
            rows = system.layout.rows
            self.output_grads = _stack([grad.reshape(-1, rows) for grad in grads]).to(
                self.inputs.dtype
            )

    @property
    def columns(self) -> int:
        return self.inputs.shape[0]

    def project(self, grad_weight: Tensor, grad_bias: Tensor | None) -> Tensor:
        """h = g Ũ, shape (m, n)."""
        projected = grad_weight @ self.inputs.T
        if self.has_bias:
            projected += grad_bias.unsqueeze(1)
        return projected

    def expand(
        self,
        coefficients: Tensor,
        grad_weight: Tensor,
        grad_bias: Tensor | None,
        gradient_scale: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """v = diag(gradient_scale) g + coefficients Ũᵀ; (m, n) coefficients -> (W, b)."""
        if gradient_scale is None:
            weight = coefficients @ self.inputs
            bias = coefficients.sum(1) if self.has_bias else None
            return weight, bias
        weight = (grad_weight * gradient_scale.unsqueeze(1)).addmm_(coefficients, self.inputs)
        bias = None
        if self.has_bias:
            bias = torch.addmv(grad_bias * gradient_scale, coefficients, self.ones())
        return weight, bias

    def ones(self) -> Tensor:
        return torch.ones(self.columns, dtype=self.inputs.dtype, device=self.inputs.device)

    @staticmethod
    def probe_output_grad_scale(
        system: LayerSystem,
        grad_weight: Tensor,
        grad_bias: Tensor | None,
        generator: torch.Generator,
    ) -> float | None:
        """s with .grad = s·δᵀŨᵀ, checked on a random probe ω; None when it does not hold.

        Compares gω with δᵀ(Ũᵀω) summed over the calls: O((m + n)·d) work, against the
        O(m·n·d) it can save.
        """
        if any(call.output_grad is None for call in system.calls):
            return None
        dtype = grad_weight.dtype
        has_bias = grad_bias is not None
        probe = torch.randn(
            grad_weight.shape[1], generator=generator, dtype=dtype, device=grad_weight.device
        )
        probe_bias = 0.0
        if has_bias:
            probe_bias = float(
                torch.randn((), generator=generator, dtype=dtype, device=grad_weight.device)
            )
        probed_grad = grad_weight @ probe
        if has_bias:
            probed_grad += grad_bias * probe_bias
        probed_delta = torch.zeros_like(probed_grad)
        rows = system.layout.rows
        for call in system.calls:
            probed_inputs = call.x @ probe + probe_bias
            probed_delta += call.output_grad.reshape(-1, rows).to(dtype).T @ probed_inputs
        return _fitted_scale(probed_grad, probed_delta)


def _fitted_scale(probed_grad: Tensor, probed_delta: Tensor) -> float | None:
    """The least-squares s in probed_grad ≈ s·probed_delta, if the fit is within tolerance."""
    norm_delta = probed_delta.norm()
    if not bool(norm_delta > 0):
        return None
    scale = torch.dot(probed_grad, probed_delta) / norm_delta**2
    mismatch = (probed_grad - scale * probed_delta).norm()
    tolerance = PROBE_TOLERANCE.get(probed_grad.dtype, 1e-3)
    if bool(mismatch <= tolerance * probed_grad.norm()):
        return float(scale)
    return None


def _stack(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1, keepdim=True)


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
) -> DualSolution:
    """v = M⁻¹g (``exact``) or ``cg_iters`` per-row CG iterations from v = 0, in the dual.

    Args:
        grad_weight: g_W, (m, d_in); grad_bias: g_b, (m,) or None.
        output_grad_scale: s when .grad is known to equal s·δᵀŨᵀ (see
            :meth:`DualKernel.output_grad_scale`); None for the general form.
    """
    if exact:
        return _exact(kernel, grad_weight, grad_bias, tau_prox, output_grad_scale)
    return _cg(kernel, grad_weight, grad_bias, tau_prox, cg_iters, cg_tol, output_grad_scale)


def _exact(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    scale: float | None,
) -> DualSolution:
    dtype = grad_weight.dtype
    eye = torch.eye(kernel.columns, dtype=torch.float64, device=kernel.kernel.device)
    shifted = kernel.kernel.double() + eye / tau_prox
    inverse = torch.linalg.inv(shifted)
    if scale is not None:
        # v = s·δᵀ (I/τθ + K)⁻¹ Ũᵀ
        coefficients = (kernel.output_grads.T @ inverse.to(dtype)) * scale
        weight, bias = kernel.expand(coefficients, grad_weight, grad_bias, None)
        rhs_coefficients = kernel.output_grads.T * scale
        residual = _sampled_residual(kernel, coefficients, rhs_coefficients, shifted, None)
    else:
        # v = τθ (g − h (I/τθ + K)⁻¹ Ũᵀ)
        projected = kernel.project(grad_weight, grad_bias)
        coefficients = (projected @ inverse.to(dtype)) * (-tau_prox)
        gradient_scale = torch.full(
            (grad_weight.shape[0],), tau_prox, dtype=dtype, device=grad_weight.device
        )
        weight, bias = kernel.expand(coefficients, grad_weight, grad_bias, gradient_scale)
        residual = _sampled_residual(kernel, coefficients, projected, shifted, tau_prox)
    return DualSolution(weight, bias, 0, residual)


def _sampled_residual(
    kernel: DualKernel,
    coefficients: Tensor,
    rhs: Tensor,
    shifted: Tensor,
    tau_prox: float | None,
) -> Tensor:
    """‖g − M v‖ estimated from up to RESIDUAL_SAMPLE_ROWS evenly spaced rows, scaled to all.

    δ-form (``tau_prox`` None): v = cŨᵀ, g = rŨᵀ -> g − Mv = (r − c(I/τθ + K)) Ũᵀ.
    General form: v = τθ g + cŨᵀ with c = −τθ h(I/τθ+K)⁻¹ -> g − Mv = −(τθ h + c(I/τθ + K))Ũᵀ.
    Either way the residual is ρŨᵀ and ‖ρŨᵀ‖² = ρ K ρᵀ.
    """
    rows = coefficients.shape[0]
    index = torch.linspace(0, rows - 1, min(rows, RESIDUAL_SAMPLE_ROWS)).round().long()
    index = index.to(coefficients.device)
    sample = coefficients[index].double()
    if tau_prox is None:
        rho = rhs[index].double() - sample @ shifted
    else:
        rho = -(tau_prox * rhs[index].double() + sample @ shifted)
    squared = (rho @ kernel.kernel.double() * rho).sum()
    return (squared.clamp_min(0) * (rows / len(index))).sqrt()


def _cg(
    kernel: DualKernel,
    grad_weight: Tensor,
    grad_bias: Tensor | None,
    tau_prox: float,
    iterations: int,
    tol: float | None,
    scale: float | None,
) -> DualSolution:
    """Batched per-row CG on (a, c̃) coordinates in K's eigenbasis (module docstring)."""
    dtype = grad_weight.dtype
    eigenvalues, eigenvectors = torch.linalg.eigh(kernel.kernel.double())
    eigenvalues = eigenvalues.clamp_min(0)
    basis = eigenvectors.to(dtype)
    inverse_tau = 1.0 / tau_prox
    rows = grad_weight.shape[0]
    if scale is not None:
        # g = s·δᵀŨᵀ: r₀ = (0, s·δᵀQ) and a stays 0 throughout.
        projected = None
        residual_b = (kernel.output_grads.T @ basis).double() * scale
        residual_a = None
        gradient_sq = None
    else:
        projected = (kernel.project(grad_weight, grad_bias) @ basis).double()
        residual_b = torch.zeros_like(projected)
        residual_a = torch.ones(rows, 1, dtype=torch.float64, device=projected.device)
        gradient_sq = (grad_weight.double() ** 2).sum(1, keepdim=True)
        if grad_bias is not None:
            gradient_sq += grad_bias.double().unsqueeze(1) ** 2

    def inner(a1, b1, a2, b2):
        value = _row_dot(b1 * eigenvalues, b2)
        if projected is not None:
            value = value + a1 * a2 * gradient_sq + a1 * _row_dot(projected, b2)
            value = value + a2 * _row_dot(projected, b1)
        return value

    def apply_m(a, b):
        image_b = b * (inverse_tau + eigenvalues)
        if projected is None:
            return None, image_b
        return a * inverse_tau, image_b + a * projected

    def axpy(alpha, xa, xb, ya, yb):
        """x + alpha·y for (a, c̃) pairs (a may be None in the δ-form)."""
        return (None if xa is None else xa + alpha * ya), xb + alpha * yb

    solution_a = None if residual_a is None else torch.zeros_like(residual_a)
    solution_b = torch.zeros_like(residual_b)
    direction_a, direction_b = residual_a, residual_b
    residual_sq = inner(residual_a, residual_b, residual_a, residual_b).clamp_min(0)
    threshold_sq = None if tol is None else (tol * tol) * residual_sq
    done = 0
    for done in range(1, iterations + 1):
        image_a, image_b = apply_m(direction_a, direction_b)
        curvature = inner(direction_a, direction_b, image_a, image_b)
        alpha = torch.where(curvature > 0, residual_sq / curvature, torch.zeros_like(curvature))
        solution_a, solution_b = axpy(alpha, solution_a, solution_b, direction_a, direction_b)
        residual_a, residual_b = axpy(-alpha, residual_a, residual_b, image_a, image_b)
        new_residual_sq = inner(residual_a, residual_b, residual_a, residual_b).clamp_min(0)
        if threshold_sq is not None and bool((new_residual_sq <= threshold_sq).all()):
            break
        if done == iterations:
            break
        beta = torch.where(
            residual_sq > 0, new_residual_sq / residual_sq, torch.zeros_like(residual_sq)
        )
        direction_a, direction_b = axpy(beta, residual_a, residual_b, direction_a, direction_b)
        residual_sq = new_residual_sq
    coefficients = solution_b.to(dtype) @ basis.T
    gradient_scale = None if solution_a is None else solution_a.squeeze(1).to(dtype)
    weight, bias = kernel.expand(coefficients, grad_weight, grad_bias, gradient_scale)
    return DualSolution(weight, bias, done, new_residual_sq.sum().sqrt())
