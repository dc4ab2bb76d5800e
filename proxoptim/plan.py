"""Plans: what one preconditioned layer's step will do, decided once per signature.

A layer's **signature** is everything the cost model's decisions depend on: the layer,
its weight's shape, dtype and device, whether the bias is trained, every confirmed call's
input shape, dtype and layout and whether its δ was captured, the solve dtype, and (under
the "global" distributed mode) the global column count and Gram cost the ranks agreed on.
The optimizer's solve settings are fixed at construction (:class:`SolveOptions`), so they
are part of the cache, not of the key.

The first time a signature appears, :func:`make_plan` runs the whole cost model
(:func:`choose_form`, the Gram sources, the dual basis, the probe and
graph policies) and freezes its answers into a :class:`LayerPlan`. Every later step with
that signature reads the plan: no form is priced again. A new signature (the last, smaller
batch of an epoch; a new sequence length; ``model.double()``; a bias frozen mid-training)
makes a new plan. :class:`PlanCache` keeps at most :data:`PLANS_PER_LAYER` signatures per
layer, least recently used first out, so a model fed 1,000 distinct batch shapes holds at
most that many plans per layer (each a few host objects and O(n) or O(d²) constants).

A plan's mutable companion, :class:`PlanState`, holds what the plan's solves reuse across
steps: constants built once (I/τθ, a column of ones). Layer-sized buffers (the directions,
scratch) are not per plan but per layer or shared (proxoptim.pipeline), so that the plans
of several batch shapes do not multiply them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from proxoptim.costs import (
    DUAL_CG_ACCESSES,
    DUAL_CG_CALLS,
    PRIMAL_EXACT_SYNCS,
    PROBE_CALLS,
    ROW_CG_ACCESSES,
    DeviceCosts,
    combined,
    form_operators,
)
from proxoptim.dual import CG_ROW_BLOCK
from proxoptim.operators import LayerSystem, RowLayout
from proxoptim.solvers import FORMS

# Signatures kept per layer. A training loop sees one or two batch shapes per layer (the
# full batch and the last, smaller one), evaluation never steps, and sequence models a few
# lengths; beyond this many the least recently used plan is dropped (and made again, by
# the same rule, if its signature returns).
PLANS_PER_LAYER = 8


@dataclass(frozen=True)
class SolveOptions:
    """The solve settings every plan is made under, fixed at construction.

    Attributes:
        solver: "cg", "exact" or "none".
        cg_iters: CG iterations (the most, with ``cg_tol``).
        cg_tol: CG's relative residual to stop at, or None for exactly ``cg_iters``.
        tau_prox: τθ.
        form: the requested form ("auto" lets the cost model choose per layer).
        diagnostics: whether each solve also computes its residual and cosine.
        probe: when ``.grad`` is probed for s·δᵀŨᵀ (only ever where the δ form would be
            the dual form): "auto" (the cost rule, :func:`probe_pays`;
            speculatively inside the δ form's CUDA graph where one replays), "eager"
            (every such layer, before its solve, never speculatively) or "never".
        dual_basis: where the dual CG runs: "auto" (the cheaper by the cost model),
            "eigenbasis" or "coefficient".
        max_gram_elements: the largest Gram or kernel (all groups, in elements) a form
            may build (None: :data:`MAX_GRAM_ELEMENTS`).
        device_costs: the cost table to price forms with (None: that of the layer's
            device, proxoptim.costs).
    """

    solver: str
    cg_iters: int
    cg_tol: float | None
    tau_prox: float
    form: str
    diagnostics: bool
    probe: str = "auto"
    dual_basis: str = "auto"
    max_gram_elements: int | None = None
    device_costs: DeviceCosts | None = None

    @property
    def exact(self) -> bool:
        return self.solver == "exact"


@dataclass(frozen=True)
class CallSignature:
    """One confirmed call as planning sees it."""

    input_shape: tuple[int, ...]
    input_dtype: torch.dtype
    input_strides: tuple[int, ...]
    output_grad_shape: tuple[int, ...] | None


@dataclass(frozen=True)
class LayerSignature:
    """What a layer's plan depends on; equal signatures share a plan."""

    layer: int
    weight_shape: tuple[int, ...]
    weight_dtype: torch.dtype
    device: torch.device
    has_bias: bool
    calls: tuple[CallSignature, ...]
    solve_dtype: torch.dtype
    # Under the "global" distributed mode: (global columns, global Gram cost) as agreed by
    # every rank this step, so that all ranks plan alike even when their batches differ.
    global_facts: tuple[int, float] | None = None


@dataclass
class PlanState:
    """What a plan's solves reuse across steps (mutable; owned by one plan)."""

    constants: dict[str, Tensor] = field(default_factory=dict)

    def constant(self, name: str, make: Callable[[], Tensor]) -> Tensor:
        """The tensor ``make()`` built on first use and kept (constants never change)."""
        value = self.constants.get(name)
        if value is None:
            value = make()
            self.constants[name] = value
        return value


@dataclass(frozen=True)
class LayerPlan:
    """The decisions for one layer signature.

    Attributes:
        signature: what the plan was made for.
        layout: how (W, b) map to rows.
        dtype: the solve dtype (float64 for float64 weights, float32 otherwise).
        form: the form run when δ is unknown or the probe fails ("matrix_free",
            "primal" or "dual").
        form_if_delta: the form run when ``.grad`` is verified to be s·δᵀŨᵀ; None where
            δ was not captured or the layer has no dual form.
        probe: whether each step probes ``.grad`` for s·δᵀŨᵀ eagerly (only where
            ``form_if_delta`` is "dual": no other form uses δ), where it does not
            speculate.
        speculate: whether the δ form runs speculatively inside a CUDA graph, its probe
            verified afterwards (``cuda_graphs`` only; steps backing off after a failed
            speculation probe eagerly where ``probe`` says so).
        graphed: whether solves may replay as CUDA graphs.
        dual_basis: where CG runs in the dual form, "eigenbasis" or "coefficient", with δ
            unknown and with δ known.
        gram_sources: per call, whether its Gram comes from correlations of the input
            (and its estimated cost); fed back to the layer's system on later steps.
        exact_without_gram: an exact solve that must run CG to convergence (no Gram or
            kernel within the memory limit).
        state: buffers and constants the solves reuse.
    """

    signature: LayerSignature
    layout: RowLayout
    dtype: torch.dtype
    form: str
    form_if_delta: str | None
    probe: bool
    speculate: bool
    graphed: bool
    dual_basis: tuple[str, str]
    gram_sources: tuple[tuple[bool, float], ...]
    exact_without_gram: bool
    state: PlanState = field(default_factory=PlanState, compare=False, repr=False)


def signature_of(
    index: int,
    weight: Tensor,
    has_bias: bool,
    system: LayerSystem,
) -> LayerSignature:
    """The layer's signature this step (host work only: shapes and dtypes)."""
    calls = tuple(
        CallSignature(
            tuple(call.raw.shape),
            call.raw.dtype,
            call.raw.stride(),
            None if call.output_grad is None else tuple(call.output_grad.shape),
        )
        for call in system.calls
    )
    global_facts = None
    if system.communicator is not None:
        global_facts = (system.num_columns, system.gram_cost())
    return LayerSignature(
        index,
        tuple(weight.shape),
        weight.dtype,
        weight.device,
        has_bias,
        calls,
        system.dtype,
        global_facts,
    )


def make_plan(
    signature: LayerSignature,
    system: LayerSystem,
    options: SolveOptions,
    graphs_supported: bool,
) -> LayerPlan:
    """The cost model, run once for ``signature``.

    Args:
        system: the layer's system this step (its shapes are the signature's).
        graphs_supported: whether a CUDA-graph runner is on and supports the layer's
            device; solves then replay where their work is fixed (CG without ``cg_tol``,
            exact solves in the dual form) and no communicator is involved.
    """
    exact = options.exact
    graphs_apply = (
        graphs_supported and (exact or options.cg_tol is None) and system.communicator is None
    )
    graphed_pricing = graphs_apply and not exact
    limit = options.max_gram_elements
    form = choose_form(system, exact, options.cg_iters, options.form, False, graphed_pricing, limit)
    delta_captured = system.supports_dual and all(
        call.output_grad is not None for call in system.calls
    )
    form_if_delta = None
    if delta_captured:
        form_if_delta = choose_form(
            system, exact, options.cg_iters, options.form, True, graphed_pricing, limit
        )
    dual_with_delta = form_if_delta == "dual"
    # Speculation is how "auto" probes where the δ form replays as a graph; "probe" is the
    # eager probe, which also serves steps in which speculation backs off.
    speculate = options.probe == "auto" and graphs_apply and dual_with_delta
    probe = dual_with_delta and (
        options.probe == "eager" or (options.probe == "auto" and probe_pays(system, exact))
    )
    bases = (options.dual_basis, options.dual_basis)
    if options.dual_basis == "auto":
        bases = ("eigenbasis", "eigenbasis")
        if not exact and "dual" in (form, form_if_delta):
            bases = tuple(  # type: ignore[assignment]
                cheaper_dual_basis(
                    system.costs, system.num_columns, system.layout.rows, options.cg_iters, known
                )
                for known in (False, True)
            )
    return LayerPlan(
        signature=signature,
        layout=system.layout,
        dtype=system.dtype,
        form=form,
        form_if_delta=form_if_delta,
        probe=probe,
        speculate=speculate,
        graphed=graphs_apply,
        dual_basis=bases,
        gram_sources=tuple(system.gram_sources()),
        exact_without_gram=exact and form == "matrix_free",
    )


def cheaper_dual_basis(
    costs: DeviceCosts, columns: int, rows: int, cg_iters: int, output_grad_known: bool
) -> str:
    """The dual CG's basis :func:`dual_cg_costs` prices lower on ``costs``' device."""
    eigenbasis, coefficient = dual_cg_costs(
        costs, columns, rows, cg_iters, output_grad_known=output_grad_known
    )
    return BASES[1] if coefficient < eigenbasis else BASES[0]


# -- the cost model ----------------------------------------------------------------------
# Every form gives the same direction; the plan runs the cheapest on the layer's device,
# priced with the tables of proxoptim.costs (measured constants and where they come from).

# Largest primal Gram (all groups together, in elements) the "auto" rule will build:
# 2^26 float32 elements are 256 MiB.
MAX_GRAM_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Costs:
    """Flop estimates of each form for one layer (DESIGN.md §2); inf where inapplicable."""

    matrix_free: float
    primal: float
    dual: float

    def cheapest(self, allowed: tuple[str, ...]) -> str:
        return min(allowed, key=lambda form: getattr(self, form))


def estimate_costs(
    system: LayerSystem,
    exact: bool,
    cg_iters: int,
    output_grad_known: bool = False,
    graphed: bool = False,
    max_gram_elements: int | None = None,
) -> Costs:
    """Cost of each form for n columns, row dim d, m rows in total, k iterations, in the
    float32-GEMM flops of the layer's device (proxoptim.costs): the device work of its
    products, dense factorisations and memory traffic, and the operators it dispatches,
    combined as the device does (:func:`proxoptim.costs.combined`; ``graphed``: replayed
    from a CUDA graph).

    Forms whose memory (a Gram or kernel above ``max_gram_elements``, default
    :data:`MAX_GRAM_ELEMENTS`) or layer kind rule
    them out cost inf; so does matrix-free for an exact solve.
    """
    layout = system.layout
    n, d, m, groups = system.num_columns, layout.row_dim, layout.rows, layout.groups
    k = 0 if exact else cg_iters
    device = system.costs
    # Both row forms' CG recurrences pass over (m, d) rows in the working dtype.
    row_traffic = k * ROW_CG_ACCESSES * system.dtype.itemsize * m * d * device.memory_byte

    matrix_free = float("inf")
    if not exact and system.matrix_free_allowed:
        work = 4.0 * k * n * d * m
        if system.im2col:
            work *= device.conv_product_slowdown
        work += row_traffic
        matrix_free = combined(device, work, form_operators("matrix_free", k), graphed)

    primal = float("inf")
    limit = MAX_GRAM_ELEMENTS if max_gram_elements is None else max_gram_elements
    if groups * d * d <= limit and system.has_patches:
        work = system.gram_cost() + row_traffic
        if exact:
            work += groups * (device.cholesky_fixed + d**3 / 3.0) + 4.0 * m * d * d
        else:
            work += 2.0 * k * m * d * d
        primal = combined(device, work, form_operators("primal", k, exact), graphed)
        if exact and system.dtype != torch.float64:
            primal += PRIMAL_EXACT_SYNCS * device.host_sync

    dual = float("inf")
    patches_fit = not system.im2col or n * d <= limit
    if system.supports_dual and n * n <= limit and patches_fit:
        work = 2.0 * n * n * d + 2.0 * n * m * d  # the kernel and the final product
        operators = form_operators("dual", k, exact)
        if system.im2col:
            work += device.im2col_per_element * n * d  # the patches, copied once
        if not output_grad_known:
            work += 2.0 * n * m * d  # h = gŨ
        if exact:
            work += device.cholesky_fixed
            if device.explicit_inverse:
                work += device.inverse_per_cube * n**3 + 2.0 * m * n * n
            else:
                work += 2.0 * m * n * n * device.float64_slowdown  # two triangular solves
            dual = combined(device, work, operators, graphed)
        else:
            parts = dual_cg_parts(device, n, m, k, output_grad_known)
            dual = min(
                combined(device, work + basis_work, operators + basis_operators, graphed)
                for basis_work, basis_operators in parts.values()
            )
    return Costs(matrix_free, primal, dual)


def choose_form(
    system: LayerSystem,
    exact: bool,
    cg_iters: int,
    requested: str = "auto",
    output_grad_known: bool = False,
    graphed: bool = False,
    max_gram_elements: int | None = None,
) -> str:
    """The form to run for one layer.

    A requested form runs wherever the layer allows it (dual: Linear layers; primal: layers
    with patches whose Gram fits the memory limit); elsewhere, and under "auto", the
    cheapest by :func:`estimate_costs` (``graphed``: priced as replayed in a CUDA graph).
    An exact solve with neither a Gram nor a kernel available runs "matrix_free" CG to
    convergence.
    """
    costs = estimate_costs(system, exact, cg_iters, output_grad_known, graphed, max_gram_elements)
    if requested != "auto" and getattr(costs, requested) < float("inf"):
        return requested
    cheapest = costs.cheapest(FORMS)
    if getattr(costs, cheapest) == float("inf"):
        if not system.matrix_free_allowed:
            raise ValueError(
                f"ProxProp: a fully_shard-ed layer's Gram ({system.layout.groups} × "
                f"{system.layout.row_dim}²) exceeds max_gram_elements, and its rows, split "
                "over ranks, cannot run matrix-free CG; raise max_gram_elements"
            )
        # No Gram or kernel fits (or the layer has none): CG runs matrix-free, and an exact
        # solve becomes CG run to convergence (see :func:`solve`).
        return "matrix_free"
    return cheapest


def dual_cg_costs(
    costs: DeviceCosts,
    columns: int,
    rows: int,
    iterations: int,
    graphed: bool = False,
    output_grad_known: bool = False,
) -> tuple[float, float]:
    """(eigenbasis, coefficient-basis) cost of the dual CG's n-dimensional work on its own
    (:func:`dual_cg_parts` combined by :func:`proxoptim.costs.combined`)."""
    parts = dual_cg_parts(costs, columns, rows, iterations, output_grad_known)
    eigenbasis, coefficient = (combined(costs, *parts[basis], graphed) for basis in BASES)
    return eigenbasis, coefficient


BASES = ("eigenbasis", "coefficient")


def dual_cg_parts(
    costs: DeviceCosts, columns: int, rows: int, iterations: int, output_grad_known: bool
) -> dict[str, tuple[float, int]]:
    """(device work, operators) of the dual CG's n-dimensional work per basis, the work in
    the device's float32-GEMM flops: one eigh plus the changes of basis (2·m·n² each way)
    against two (m × n)(n × n) float64 products per iteration, each basis with the memory
    traffic of its recurrences and the operators they dispatch per block of rows, in the
    δ form (``output_grad_known``) or the general one."""
    n, m = columns, rows
    blocks = -(-m // CG_ROW_BLOCK) if costs.row_blocks else 1
    parts = {}
    for basis in BASES:
        accesses, item = DUAL_CG_ACCESSES[(basis, output_grad_known)]
        work = iterations * accesses * item * m * n * costs.memory_byte
        if basis == "eigenbasis":
            work += (
                costs.eigh_fixed
                + costs.eigh_per_square * n**2
                + costs.eigh_per_cube * n**3
                + 4.0 * m * n * n
            )
        else:
            work += iterations * 4.0 * m * n * n * costs.float64_slowdown
        operators = iterations * blocks * DUAL_CG_CALLS[(basis, output_grad_known)]
        parts[basis] = (work, operators)
    return parts


def probe_pays(system: LayerSystem, exact: bool) -> bool:
    """Whether to probe for δ (see :func:`proxoptim.dual.probe_numbers_for`; every call must have
    captured δ). An exact solve always does: its direction from δ avoids the
    cancellation of τθ·g against the row-space part, which the general form suffers in
    float32 (relative errors of ~3e-2 against float64 on the paper MLP on a GPU). For
    CG the probe can save one (m × n)(n × d) product and costs a few small operators and
    a host sync, which on an accelerator outweigh that product at the paper's sizes
    (proxoptim.costs)."""
    if any(call.output_grad is None for call in system.calls):
        return False
    if exact:
        return True
    layout, costs = system.layout, system.costs
    saved = 2.0 * system.num_columns * layout.rows * layout.row_dim
    return costs.always_probe or saved > PROBE_CALLS * costs.operator_call + costs.host_sync


class PlanCache:
    """Plans by signature, at most ``per_layer`` per layer (least recently used out;
    ``on_drop`` is told its signature)."""

    def __init__(
        self,
        per_layer: int = PLANS_PER_LAYER,
        on_drop: Callable[[LayerSignature], None] | None = None,
    ) -> None:
        self.per_layer = per_layer
        self.on_drop = on_drop  # told of every plan dropped, to free what it owned
        self._plans: dict[int, OrderedDict[LayerSignature, LayerPlan]] = {}
        self.made = 0  # plans made so far (a re-made, evicted signature counts again)

    def __len__(self) -> int:
        return sum(len(plans) for plans in self._plans.values())

    def get(self, signature: LayerSignature) -> LayerPlan | None:
        plans = self._plans.get(signature.layer)
        if plans is None:
            return None
        plan = plans.get(signature)
        if plan is not None:
            plans.move_to_end(signature)
        return plan

    def add(self, plan: LayerPlan) -> None:
        plans = self._plans.setdefault(plan.signature.layer, OrderedDict())
        plans[plan.signature] = plan
        self.made += 1
        while len(plans) > self.per_layer:
            dropped, _ = plans.popitem(last=False)
            if self.on_drop is not None:
                self.on_drop(dropped)

    def latest(self, layer: int) -> LayerPlan | None:
        """The layer's most recently used plan, or None."""
        plans = self._plans.get(layer)
        if not plans:
            return None
        return next(reversed(plans.values()))

    def clear(self) -> None:
        self._plans.clear()
