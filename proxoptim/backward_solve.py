"""``solve_in_backward=True``: a layer's direction computed during backward, in place of its
weight gradient.

Where a layer's plan solves in the dual form with δ known (proxoptim.dual), the direction
needs only δ, the gradient of the layer's output, and the layer's input X:

    v = δᵀ (I/τθ + K)⁻¹ Ũᵀ,   K = ŨᵀŨ = XXᵀ (+ 1),

(or ``cg_iters`` CG iterations on it). The default path first lets autograd compute
g = δᵀŨᵀ into ``.grad``, then solves: one (m × n)(n × d) product, as large as the weight
gradient, is spent on g. Here that product is never computed:

* a forward pre-hook lets the layer's own forward run with its weight and bias not
  requiring grad, so autograd records only the input's gradient for it;
* a forward hook gives the output a second autograd node in place (:class:`_Direction`,
  ``mark_dirty``: the output stays the same tensor, and in-place operations on it, such
  as ``ReLU(inplace=True)``, still work). Its backward receives δ, passes it on unchanged
  to the input's gradient, and returns v as the weight's and bias's gradient, which
  autograd accumulates into ``.grad`` (and DDP all-reduces, and GradScaler unscales: v is
  linear in δ).

Which layers: a layer is solved in backward from the step after its plan (made for a step
with exactly one call of the layer) chose the dual form with δ. The cost model does so for
Linear layers with fewer batch rows than fan-in (d ≫ n; docs/performance.md), and for
one-group convolutions whose columns n = batch × output positions are fewer than their
fan-in C_in·k (deep layers on small images: ResNet-18's last stage on CIFAR-10, n = 128·16
against d = 512·9); for those δ is read in the im2col patches' (sample, position) order.
It must not be the output layer (``exclude_last``). Every other layer keeps the default
path.

Several calls in one step (gradient accumulation, shared weights): the direction must be
that of the summed system, never a sum of per-call directions. A layer that had several
calls in its last step is not tapped. A layer tapped on a single-call history that then
meets a second call returns that call's gradient plus g₁ − v₁ for its first call (v₁
recomputed from the kept δ₁ and X₁), so ``.grad`` holds g₁ + g₂ and the step solves the
summed system as the default path does; ``last_stats`` says so. Under DDP this needs the
first call's gradient not to have been all-reduced yet (``no_sync`` on every micro-batch
but the last, as gradient accumulation under DDP does anyway); otherwise it raises.

What else reaches the node, and what it does:

* a second backward over a retained graph adds the call's direction for the new δ (M is
  the call's own and v is linear in δ: the sum is M⁻¹ of the summed gradient);
* a backward that does not reach the weight (``torch.autograd.grad`` with respect to
  inputs only, a saliency map) passes δ through and solves nothing;
* a forward with other tensors in the layer's place (``torch.func.functional_call``, fast
  weights) is not tapped: it is not the layer's weight;
* ``torch.autograd.grad`` with respect to a tapped layer's weight returns v;
* ``.grad`` left from a previous step (no ``zero_grad``) accumulates v on top, where the
  default path would solve the summed gradient;
* under ``distributed="local"``, the ranks agree after every step on which layers are
  tapped (one all-reduce of a flag per layer), a tapped layer is solved in the dual form
  whatever its local shapes, and a step raises if a layer was solved on some ranks only.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from proxoptim.capture import Capture, CapturedCall
from proxoptim.dual import DualKernel, solve_dual_from_output_grads
from proxoptim.layers import Layer
from proxoptim.pipeline import solve_dtype
from proxoptim.solvers import Solution
from proxoptim.stats import PendingStats, layer_stats

if TYPE_CHECKING:
    from proxoptim.distributed import Communicator
    from proxoptim.operators import LayerSystem
    from proxoptim.pipeline import StepPipeline
    from proxoptim.plan import LayerPlan, SolveOptions

# Why a tapped layer's direction was left to the step (``LayerStats.backward_fallback``).
SEVERAL_CALLS = "several calls"
NOT_DUAL = "plan not dual with δ"

# plan_taps' verdicts kept (per layer and call signature) before they are dropped.
MAX_VERDICTS = 256


@dataclass(eq=False)
class TappedCall:
    """One forward call of a tapped layer: its module, input, what its forward switched
    off (restored by the forward hook), and what its backward did so far."""

    index: int
    module: nn.Module
    bias: Tensor | None  # the trained bias, also switched off
    synced: bool  # whether DDP all-reduces this call's gradients (decided at forward)
    input: Tensor | None = None  # as the forward got it (after every pre-hook)
    # δ summed over the backward passes that reached .grad through this call (several
    # over one retained graph), kept where the call was solved: its v may need undoing.
    output_grad: Tensor | None = field(default=None, repr=False)


@dataclass
class BackwardOutcome:
    """What backward did for one layer since the last step.

    Attributes:
        calls: tapped calls whose backward reached ``.grad``.
        solved: ``.grad`` holds the direction (one call, solved in the dual form);
            otherwise it holds the summed gradient and the step solves as usual.
        fallback: why not solved (None where solved).
        stats: the solve's stats (solved layers).
        first: the first call, while solved: a second call must undo its direction.
    """

    calls: int = 0
    solved: bool = False
    fallback: str | None = None
    stats: PendingStats | None = None
    first: TappedCall | None = field(default=None, repr=False)


class BackwardSolves:
    """The hooks and per-step bookkeeping of ``solve_in_backward=True``.

    Args:
        layers: the optimizer's layers.
        pipeline: the step pipeline, whose plan cache and systems the solves share.
        options: the solve settings.
        capture: the optimizer's capture (to tell the output layer during backward).
        exclude_last: whether the output layer keeps its plain gradient.
        gradient_sync: returns whether this backward all-reduces gradients (DDP's
            ``require_backward_grad_sync``), or None outside DDP.
        communicator: the process group of ``distributed="local"`` (ranks then agree on
            which layers are tapped, and a tapped layer is always solved in the dual
            form, whatever its local shapes: DDP must average like with like), or None.
    """

    def __init__(
        self,
        layers: list[Layer],
        pipeline: StepPipeline,
        options: SolveOptions,
        capture: Capture,
        exclude_last: bool,
        gradient_sync: Callable[[], bool] | None,
        communicator: Communicator | None = None,
    ) -> None:
        self.layers = layers
        self.pipeline = pipeline
        self.options = options
        self.capture = capture
        self.exclude_last = exclude_last
        self.gradient_sync = gradient_sync
        self.communicator = communicator
        self.tapped: set[int] = set()  # layers whose next calls are solved in backward
        self.outcomes: dict[int, BackwardOutcome] = {}
        self._first_reached: int | None = None  # the output layer, once backward knows
        self._in_flight: dict[nn.Module, TappedCall] = {}
        self._verdicts: dict[tuple[Any, ...], bool] = {}  # plan_taps' per call signature
        # The parameters each module had at construction: a forward run with others in
        # their place (torch.func.functional_call, MAML-style fast weights) is not tapped.
        self._registered: dict[nn.Module, tuple[Tensor, Tensor | None]] = {}
        handles: list[RemovableHandle] = []
        self_ref = weakref.ref(self)
        for index, layer in enumerate(layers):
            if layer.excluded or not layer.kind.supports_dual:
                continue
            for module in layer.modules:
                self._registered[module] = (module.weight, module.bias)
                handles.append(module.register_forward_pre_hook(_make_pre_hook(self_ref, index)))
                # First among the forward hooks (the capture's checks requires_grad), and
                # run even when the forward raises, so requires_grad is always restored.
                handles.append(
                    module.register_forward_hook(
                        _make_post_hook(self_ref), prepend=True, always_call=True
                    )
                )
        # The hooks hold only a weak reference to this object; once it is gone (the
        # optimizer deleted without remove_hooks), they go too.
        self._finalizer = weakref.finalize(self, _remove_handles, handles)

    def remove(self) -> None:
        self._finalizer()
        self.tapped.clear()
        self.clear()

    def clear(self) -> None:
        """Forgets this step's outcomes (after a step or ``zero_grad``)."""
        self.outcomes = {}
        self._first_reached = None

    def plan_taps(self, calls: dict[int, list[CapturedCall]], output_layer: int | None) -> None:
        """Which layers the next steps solve in backward: those with one call this step,
        not the output layer, whose plan with δ known solves in the dual form (on every
        rank, under a communicator). Layers that do not capture δ (convolutions: it is as
        large as their output) get that plan from δ's shape alone. Each verdict is kept
        per call signature: a step whose shapes were seen before only looks it up."""
        wanted = []
        for index, layer_calls in calls.items():
            if index == output_layer or len(layer_calls) != 1 or index >= len(self.layers):
                continue
            layer, call = self.layers[index], layer_calls[0]
            if layer.excluded or not layer.kind.supports_dual or call.input is None:
                continue
            key = (
                index,
                tuple(call.input.shape),
                call.input.dtype,
                call.input.stride(),
                call.output_shape,
                call.output_grad is not None,
            )
            verdict = self._verdicts.get(key)
            if verdict is None:
                verdict = self._dual_with_delta(index, call)
                if len(self._verdicts) >= MAX_VERDICTS:
                    self._verdicts.clear()  # (shapes that change every step: start over)
                self._verdicts[key] = verdict
            if verdict:
                wanted.append(index)
        if self.communicator is not None:
            flags = torch.zeros(len(self.layers), dtype=torch.float64)
            flags[wanted] = 1.0
            counts = self._summed_over_ranks(flags).tolist()
            world = self.communicator.world_size
            wanted = [index for index, count in enumerate(counts) if count == world]
        self.tapped = set(wanted)

    def _dual_with_delta(self, index: int, call: CapturedCall) -> bool:
        """Whether the plan of the call's signature, with δ known, is the dual form."""
        plan = self.pipeline.plans.latest(index)
        if call.output_grad is None:
            # A zero-stride stand-in: the cost model reads only δ's shape.
            stand_in = call.input.new_empty(()).expand(call.output_shape)
            _, plan = self._system(index, call.module, call.input, stand_in)
        return plan is not None and plan.form_if_delta == "dual"

    def check_agreement(self) -> None:
        """Under a communicator: raises if a layer was solved in backward on some ranks
        but not on others (DDP then averaged directions with gradients)."""
        if self.communicator is None:
            return
        solved = torch.zeros(len(self.layers), dtype=torch.float64)
        for index, outcome in self.outcomes.items():
            solved[index] = float(outcome.solved)
        counts = self._summed_over_ranks(solved)
        world = self.communicator.world_size
        mixed = [self.layers[i].name for i in range(len(self.layers)) if 0 < counts[i] < world]
        if mixed:
            raise RuntimeError(
                f"ProxProp: layers {mixed} were solved in backward on some ranks and not on "
                "others (a different number of calls per rank in this step), so DDP has "
                "averaged directions with gradients; run the same calls on every rank, or "
                "pass solve_in_backward=False"
            )

    def _summed_over_ranks(self, values: Tensor) -> Tensor:
        device = self.layers[0].weight.device if self.layers else values.device
        return self.communicator.all_reduce_(values.to(device)).cpu()

    # -- forward -------------------------------------------------------------------------

    def begin_call(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        if index not in self.tapped or not torch.is_grad_enabled() or not args:
            return
        weight, bias = self._registered[module]
        if module._parameters.get("weight") is not weight or not weight.requires_grad:
            return  # (parameters substituted for this call, or a frozen layer)
        if module._parameters.get("bias") is not bias or not isinstance(args[0], Tensor):
            return
        bias = bias if bias is not None and bias.requires_grad else None
        synced = self.gradient_sync is not None and self.gradient_sync()
        self._in_flight[module] = TappedCall(index, module, bias, synced)
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)

    def end_call(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        call = self._in_flight.pop(module, None)
        if call is None:
            return
        weight = self._registered[module][0]
        weight.requires_grad_(True)
        if call.bias is not None:
            call.bias.requires_grad_(True)
        if isinstance(output, Tensor):  # (None when the forward raised)
            call.input = args[0]
            _Direction.apply(output, weight, call.bias, _Tap(weakref.ref(self), call))

    # -- backward ------------------------------------------------------------------------

    def directions(
        self, call: TappedCall, output_grad: Tensor, weight_node: Any
    ) -> tuple[Tensor | None, Tensor | None]:
        """What one backward pass accumulates into the layer's ``.grad`` through one call:
        v (solved), or g plus the correction that turns an earlier call's v into its g;
        (None, None) where this backward does not reach the weight (``weight_node``, its
        AccumulateGrad: ``autograd.grad`` with respect to inputs only)."""
        if not torch._C._will_engine_execute_node(weight_node):
            return None, None
        layer = self.layers[call.index]
        outcome = self.outcomes.setdefault(call.index, BackwardOutcome())
        # The call's system (its input prepared) and plan, once: the solve and the
        # gradient both read it.
        system, plan = self._system(call.index, call.module, call.input, output_grad)
        if call is outcome.first:
            # Another backward over the same retained graph: M is the call's own, and
            # v is linear in δ, so its direction adds up as its gradient would.
            solution, _ = self._solve(system, plan)  # type: ignore[misc]
            call.output_grad = call.output_grad + output_grad
            return _cast(solution.weight, solution.bias, layer)
        outcome.calls += 1
        if outcome.calls == 1 and not self._is_output_layer(call.index):
            solved = self._solve(system, plan)
            if solved is not None:
                solution, stats = solved
                outcome.solved, outcome.stats, outcome.first = True, stats, call
                call.output_grad = output_grad
                return _cast(solution.weight, solution.bias, layer)
            outcome.fallback = NOT_DUAL
        weight_grad, bias_grad = self._gradient(layer, system)
        first = outcome.first
        if first is not None:
            # A second call: the summed system is the step's to solve. Turn the first
            # call's v (already accumulated, or about to be) into its g.
            if first.synced:
                raise RuntimeError(
                    f"ProxProp: layer {layer.name!r} was called again after its direction "
                    "was solved in backward and all-reduced by DDP; with solve_in_backward="
                    "True, accumulate micro-batches under model.no_sync() (all but the "
                    "last), or pass solve_in_backward=False"
                )
            first_system, first_plan = self._system(
                call.index, first.module, first.input, first.output_grad
            )
            first_v, _ = self._solve(first_system, first_plan)  # type: ignore[misc]
            first_g = self._gradient(layer, first_system)
            weight_grad = weight_grad + first_g[0] - first_v.weight.view_as(first_g[0])
            if bias_grad is not None:
                bias_grad = bias_grad + first_g[1] - first_v.bias
            first.output_grad = None
            outcome.solved, outcome.stats, outcome.first = False, None, None
            outcome.fallback = SEVERAL_CALLS
            self.tapped.discard(call.index)
        elif outcome.calls > 1:
            outcome.fallback = SEVERAL_CALLS
        return _cast(weight_grad, bias_grad, layer)

    def _is_output_layer(self, index: int) -> bool:
        """Whether the layer is the one backward reached first this step (its call was
        confirmed before any other): found once per step, at the first call that asks."""
        if not self.exclude_last:
            return False
        if self._first_reached is None:
            calls = self.capture.calls()
            if not calls:
                return False
            self._first_reached = min(
                calls, key=lambda key: min(c.confirmation for c in calls[key])
            )
        return self._first_reached == index

    def _system(
        self, index: int, module: nn.Module, x: Tensor, output_grad: Tensor | None
    ) -> tuple[LayerSystem, LayerPlan]:
        layer = self.layers[index]
        raw_calls = [(module, layer.kind, x, output_grad)]
        return self.pipeline.system_and_plan(index, layer, raw_calls, solve_dtype(layer.weight))

    def _solve(self, system: LayerSystem, plan: LayerPlan) -> tuple[Solution, PendingStats] | None:
        """v for one call's system in the dual form with δ, where its plan chose that form
        (under a communicator always: ranks must agree)."""
        started = time.perf_counter()
        dual = plan.form_if_delta == "dual"
        if not dual and self.communicator is None:
            return None
        options = self.options
        result = solve_dual_from_output_grads(
            DualKernel(system),
            system.layout.rows,
            options.tau_prox,
            exact=options.exact,
            cg_iters=options.cg_iters,
            cg_tol=options.cg_tol,
            diagnostics=options.diagnostics,
            basis=plan.dual_basis[1] if dual else None,
            workspace=self.pipeline.workspace,
        )
        solution = Solution(result.weight, result.bias, result.iterations, result.residual_norm)
        grad_weight = grad_bias = None
        if options.diagnostics:  # the cosine to g needs g itself: only when asked for
            layer = self.layers[plan.signature.layer]
            grad_weight, grad_bias = self._gradient(layer, system)
            grad_weight = grad_weight.reshape(solution.weight.shape)
        stats = layer_stats(
            "dual",
            solution,
            grad_weight,
            grad_bias,
            time.perf_counter() - started,
            system,
            1.0,
            options.diagnostics,
        )
        return solution, stats

    def _gradient(self, layer: Layer, system: LayerSystem) -> tuple[Tensor, Tensor | None]:
        """g = A*δ for the system's one call: the product autograd would have computed."""
        call = system.calls[0]
        output_grad = call.output_grad
        if not layer.kind.im2col:  # a Linear layer's adjoint takes δ as (n, m)
            output_grad = layer.kind.output_grad_rows(call.module, output_grad)
        grad_weight, grad_bias = layer.kind.adjoint(
            call.module, call.x, output_grad.to(system.dtype), layer.weight.shape
        )
        return grad_weight, grad_bias if system.layout.has_bias else None


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def gradient_sync(model: nn.Module) -> Callable[[], bool] | None:
    """Whether a forward of ``model`` now makes its backward all-reduce gradients (DDP
    outside ``no_sync``); None for a model that is not DDP-wrapped."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return lambda: bool(model.require_backward_grad_sync)
    return None


def _cast(weight: Tensor, bias: Tensor | None, layer: Layer) -> tuple[Tensor, Tensor | None]:
    weight = weight.reshape(layer.weight.shape).to(layer.weight.dtype)
    if bias is not None and layer.bias is not None:
        bias = bias.to(layer.bias.dtype)
    return weight, bias


@dataclass
class _Tap:
    """What a tapped call's backward needs: the solves (weakly) and the call."""

    solves: Callable[[], BackwardSolves | None]
    call: TappedCall


class _Direction(torch.autograd.Function):
    """Identity on the layer's output, in place; its backward turns δ into the weight's and
    bias's direction (the layer's own node then computes only the input's gradient)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, weight: Tensor, bias: Tensor | None, tap: _Tap) -> Tensor:
        ctx.mark_dirty(output)
        ctx.tap = tap
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, output_grad: Tensor) -> tuple[Any, ...]:
        solves = ctx.tap.solves()
        call = ctx.tap.call
        if solves is None:
            raise RuntimeError("ProxProp: the optimizer of this layer is gone")
        # ctx is the autograd node itself: its second edge leads to the weight.
        weight_grad, bias_grad = solves.directions(call, output_grad, ctx.next_functions[1][0])
        return output_grad, weight_grad, bias_grad if call.bias is not None else None, None


def _make_pre_hook(
    solves_ref: Callable[[], BackwardSolves | None], index: int
) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        solves = solves_ref()
        if solves is not None:
            solves.begin_call(index, module, args)

    return pre_hook


def _make_post_hook(
    solves_ref: Callable[[], BackwardSolves | None],
) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    def post_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        solves = solves_ref()
        if solves is not None:
            solves.end_call(module, args, output)

    return post_hook
