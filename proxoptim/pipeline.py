"""The step pipeline: from the captured calls to every layer's direction.

:meth:`StepPipeline.run` is the one call ``ProxPropOptimizer.step()`` makes. It works on
one :class:`LayerTask` per preconditioned layer and walks them through these stages, each
a pass over all tasks so that every device value a stage needs from the host is read in
one sync for the whole step, not one per layer::

    gather    each layer to precondition: its system (the captured calls), its gradient
              in the solve dtype, its signature and plan (proxoptim.plan; the cost model
              runs only for a new signature), its owner rank ("global" mode)
    probe     where the plan says so, the δ probe's numbers (proxoptim.dual), left on the
              device; under CUDA graphs a speculative δ-form solve instead
    verdicts  every probe's verdict in one host sync
    solve     each task's form (the plan's, with or without δ) through proxoptim.solvers
              (matrix-free and primal) or proxoptim.dual, or its graph (proxoptim.graphs)
    stats     the diagnostics, read back in one sync (none without ``diagnostics``)
    publish   directions of layers another rank solved, broadcast from their owner
              (proxoptim.distributed)

Under ``fully_shard`` (FSDP2, "sharded" mode) a task holds this rank's rows only: its
gradient is the local shard, its δ the matching columns, its system the global one (Linear
inputs gathered, convolution Grams all-reduced), and its direction goes back as a DTensor.

The optimizer then runs the fused non-finite check (proxoptim.checks) and lends
the directions to the inner optimizer. Nothing here writes a parameter, a ``.grad`` or
optimizer state, which is what lets a failed step leave everything as it was.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.autograd.profiler as autograd_profiler
import torch.distributed as dist
from torch import Tensor

from proxoptim.capture import CapturedCall
from proxoptim.distributed import (
    SHARDED,
    Communicator,
    ShardedRows,
    as_sharded_grad,
    gathered_linear_calls,
    local_part,
    solving_ranks,
)
from proxoptim.dual import (
    CG_ROW_BLOCK,
    DualKernel,
    StackedLayer,
    draw_probe,
    probe_numbers_for,
    probe_verdicts,
    solve_dual_stacked,
)
from proxoptim.graphs import SolveGraphs, graphed_layer_solve
from proxoptim.layers import Layer
from proxoptim.operators import LayerSystem, RowLayout
from proxoptim.plan import LayerPlan, PlanCache, SolveOptions, make_plan, signature_of
from proxoptim.solvers import Solution, solve
from proxoptim.stats import LayerStats, PendingStats, layer_stats, pack, resolve_stats, unpack
from proxoptim.workspace import Workspace

if TYPE_CHECKING:
    from proxoptim.backward_solve import BackwardOutcome

# After a speculative δ-form solve whose probe failed, the layer runs the general form for
# this many steps before speculating again: a gradient that is not s·δᵀŨᵀ once (weight
# decay added to it, a custom hook) usually stays so, and every failed speculation is a
# solve thrown away.
SPECULATION_BACKOFF = 100


@dataclass
class GraphOutputs:
    """A graphed solve's outputs; for a speculative δ-form graph, pending the probe's
    verdict."""

    weight: Tensor
    bias: Tensor | None
    values: Tensor | None  # the stats' numbers (proxoptim.stats.PendingStats.values)
    iterations: int


@dataclass
class LayerTask:
    """One preconditioned layer's step, as it moves through the stages.

    Attributes:
        layer: the layer (its modules, weight, bias, name).
        position: its index in the optimizer's layers (the order of every pass).
        plan: the decisions for this step's signature.
        calls: the captured calls it solves over.
        system: A*A for those calls, in the solve dtype.
        grad_weight, grad_bias: g in the solve dtype (bias None without a trained bias).
        owner: the rank that solves it ("global" mode; None: this rank, not broadcast).
        probe_numbers: the δ probe's numbers, on the device, once probed.
        speculation: a speculative δ-form graph's outputs, pending the verdict.
        scale: s where ``.grad`` was verified to be s·δᵀŨᵀ.
        seconds: host time spent on the layer so far.
        directions: {parameter: v} in the solve dtype, once solved (or the buffers the
            owner's broadcast fills).
        stats: the layer's stats, numbers possibly still on the device.
    """

    layer: Layer
    position: int
    plan: LayerPlan
    calls: list[CapturedCall]
    system: LayerSystem
    grad_weight: Tensor
    grad_bias: Tensor | None
    owner: int | None = None
    probe_numbers: Tensor | None = None
    speculation: GraphOutputs | None = None
    scale: float | None = None
    seconds: float = 0.0
    directions: dict[Tensor, Tensor] = field(default_factory=dict)
    stats: PendingStats | None = None


@dataclass
class StepResult:
    """What a step's pipeline hands the optimizer: {parameter: v} in the parameters'
    dtypes, and {layer name: LayerStats}."""

    directions: dict[Tensor, Tensor]
    stats: dict[str, LayerStats]


class StepPipeline:
    """The per-layer stages of a step and what persists between steps: plans, direction
    buffers, graphs, speculation backoff, warnings shown.

    Args:
        layers: the optimizer's layers, in model order.
        options: the solve settings.
        communicator: the process group's ("global" or "local" mode), or None.
        distributed: "global", "local" or None.
        graphs: the captured solves (``cuda_graphs``), or None.
        speculation_backoff: steps a layer runs the general form after a failed
            speculation.
        row_shards: under ``fully_shard`` ("sharded" mode), this rank's rows of each
            preconditioned layer, by layer index.
    """

    def __init__(
        self,
        layers: list[Layer],
        options: SolveOptions,
        communicator: Communicator | None,
        distributed: str | None,
        graphs: SolveGraphs | None,
        speculation_backoff: int,
        row_shards: dict[int, ShardedRows] | None = None,
    ) -> None:
        self.layers = layers
        self.options = options
        self.communicator = communicator
        self.distributed = distributed
        self.graphs = graphs
        self.speculation_backoff = speculation_backoff
        self.row_shards = row_shards
        self.plans = PlanCache(on_drop=None if graphs is None else graphs.forget)
        self.backoff: dict[str, int] = {}
        self._buffers: dict[Tensor, tuple[Tensor, Tensor | None]] = {}
        self.workspace = Workspace()
        self._warned: set[tuple[str, str]] = set()

    # -- the stages ------------------------------------------------------------------------

    def run(
        self,
        calls: dict[int, list[CapturedCall]],
        stepped: set[Tensor],
        output_layer: int | None,
        in_backward: dict[int, BackwardOutcome] | None = None,
    ) -> StepResult:
        """Every direction and the stats of the layers to precondition.

        Args:
            calls: the captured calls by layer index.
            stepped: the parameters the inner optimizer steps.
            output_layer: the index of the layer that keeps its plain gradient as the
                output layer, or None.
            in_backward: what ``solve_in_backward`` did per layer: layers whose ``.grad``
                already holds the direction are only reported; the others (several
                calls, another form) are solved here from the summed gradient.
        """
        in_backward = in_backward or {}
        tasks: list[LayerTask] = []
        waiting: list[LayerTask] = []  # solved by another rank
        chosen = []
        solved_in_backward: dict[str, PendingStats] = {}
        for index, layer in enumerate(self.layers):
            if layer.excluded or index == output_layer:
                continue
            outcome = in_backward.get(index)
            if outcome is not None and outcome.solved:
                solved_in_backward[layer.name] = outcome.stats
                # Its direction lives in .grad now: the layer-sized buffers are of no use.
                self._buffers.pop(layer.weight, None)
                continue
            if layer.weight.grad is None or layer.weight not in stepped:
                continue
            if index not in calls:
                self._warn_uncaptured(layer.name)
                continue
            chosen.append((index, layer))
        owners = solving_ranks(
            [layer.kind.im2col for _, layer in chosen], self.distributed, self.communicator
        )
        for (index, layer), owner in zip(chosen, owners, strict=True):
            with profiler_range(f"ProxProp.prepare#{layer.name}"):
                task = self.gather(index, layer, calls[index], owner)
            if owner is not None and owner != self.communicator.rank:
                waiting.append(task)
            else:
                tasks.append(task)
        for task in tasks:
            with profiler_range(f"ProxProp.probe#{task.layer.name}"):
                self.probe(task)
        with profiler_range("ProxProp.probe_verdicts"):
            scales = probe_verdicts(
                [task.probe_numbers for task in tasks], [task.plan.dtype for task in tasks]
            )
        for task, scale in zip(tasks, scales, strict=True):
            task.scale = scale
        for group in self.stacks(tasks):
            if len(group) == 1:
                with profiler_range(f"ProxProp.solve#{group[0].layer.name}"):
                    self.solve(group[0])
            else:
                names = "+".join(task.layer.name for task in group)
                with profiler_range(f"ProxProp.solve#{names}"):
                    self.solve_stacked(group)
        with profiler_range("ProxProp.resolve_stats"):
            pending = {task.layer.name: task.stats for task in tasks}
            if solved_in_backward:  # (reported in layer order, as the others)
                pending.update(solved_in_backward)
                order = {layer.name: position for position, layer in enumerate(self.layers)}
                pending = dict(sorted(pending.items(), key=lambda item: order[item[0]]))
            stats = resolve_stats(pending)
        for name in solved_in_backward:
            stats[name] = replace(stats[name], solved_in_backward=True)
        for task in tasks:
            outcome = in_backward.get(task.position)
            if outcome is not None and outcome.fallback is not None:
                stats[task.layer.name] = replace(
                    stats[task.layer.name], backward_fallback=outcome.fallback
                )
        directions: dict[Tensor, Tensor] = {}
        for task in tasks:
            directions.update(task.directions)
        if self.distributed == "global":
            self.publish(tasks + waiting, stats)
            for task in waiting:
                directions.update(task.directions)
        directions = {param: v.to(param.dtype) for param, v in directions.items()}
        if self.distributed == SHARDED:  # (this rank's rows, as the DTensor gradient)
            directions = {param: as_sharded_grad(param, v) for param, v in directions.items()}
        return StepResult(directions, stats)

    def gather(
        self, index: int, layer: Layer, calls: list[CapturedCall], owner: int | None
    ) -> LayerTask:
        """The layer's system, gradient and plan. A layer another rank owns gets only
        its gathers and the buffers the owner's broadcast will fill."""
        started = time.perf_counter()
        weight, bias = layer.weight, layer.bias
        has_bias = bias is not None and bias.requires_grad
        dtype = solve_dtype(weight)
        # (Under fully_shard: this rank's rows of the gradient, averaged over ranks.)
        grad_weight = local_part(weight.grad).to(dtype)
        grad_bias = None
        if has_bias:
            grad_bias = (
                local_part(bias.grad).to(dtype)
                if bias.grad is not None
                else torch.zeros_like(local_part(bias), dtype=dtype)
            )
        raw_calls = [(c.module, layer.kind, c.input, c.output_grad) for c in calls]
        communicator = None
        if self.distributed in ("global", SHARDED):
            if layer.kind.im2col:
                communicator = self.communicator  # all-reduce the Gram (or each product)
            else:
                raw_calls = gathered_linear_calls(raw_calls, dtype, self.communicator)
        if self.distributed == SHARDED:
            # δ's entries for this rank's rows: its output units, or channels (axis 1).
            rows = self.row_shards[index]
            axis = 1 if layer.kind.im2col else -1
            raw_calls = [
                (module, kind, x, None if grads is None else rows.columns_of(grads, axis))
                for module, kind, x, grads in raw_calls
            ]
        system, plan = self.system_and_plan(index, layer, raw_calls, dtype, communicator)
        task = LayerTask(layer, index, plan, calls, system, grad_weight, grad_bias, owner)
        if owner is not None and owner != self.communicator.rank:
            buffers = self._direction_buffers(weight, grad_weight, grad_bias)
            task.directions = {weight: buffers[0]}
            if has_bias and bias.grad is not None:
                task.directions[bias] = buffers[1]
        task.seconds = time.perf_counter() - started
        return task

    def system_and_plan(
        self,
        index: int,
        layer: Layer,
        raw_calls: list[tuple[Any, Any, Tensor, Tensor | None]],
        dtype: torch.dtype,
        communicator: Communicator | None = None,
    ) -> tuple[LayerSystem, LayerPlan]:
        """The layer's system over ``raw_calls`` (``(module, kind, input, δ)``) and the plan
        of its signature, made by the cost model only if the signature is new. Also serves
        the solves run during backward (proxoptim.backward_solve)."""
        weight, bias = layer.weight, layer.bias
        has_bias = bias is not None and bias.requires_grad
        latest = self.plans.latest(index)
        rows = local_part(weight)  # (this rank's rows under fully_shard)
        layout = RowLayout(
            rows.shape, layer.kind.groups(layer.modules[0]), has_bias, layer.kind.rows_axis
        )
        system = LayerSystem(
            layout,
            raw_calls,
            dtype,
            communicator,
            costs=self.options.device_costs,
            # The last plan's Gram sources, where it was made for the same inputs.
            gram_sources=_sources_if_same_inputs(latest, raw_calls),
            rows_sharded=self.distributed == SHARDED,
        )
        signature = signature_of(index, rows, has_bias, system)
        plan = self.plans.get(signature)
        if plan is None:
            graphs_supported = self.graphs is not None and self.graphs.runner.supports(
                weight.device
            )
            plan = make_plan(signature, system, self.options, graphs_supported)
            self.plans.add(plan)
        system.constants = plan.state
        return system, plan

    def probe(self, task: LayerTask) -> None:
        """Starts the layer's δ probe where its plan has one (its numbers stay on the
        device). Where the δ form replays as a graph, the probe runs inside it,
        speculatively: the direction is computed before the verdict is known, and redone
        in the general form if the probe fails (then the layer runs the general form for
        ``speculation_backoff`` steps before trying again)."""
        plan, name = task.plan, task.layer.name
        speculates = plan.speculate and self._speculation_due(name)
        if not (speculates or plan.probe):
            return
        started = time.perf_counter()
        # One probe per plan, drawn once from a fixed seed: a plan remade after a resume
        # (or an eviction) draws the same, so a resumed run's scale s, and with it every
        # direction, is bit-identical; and a step dispatches no random draw.
        grad_weight, grad_bias = task.grad_weight, task.grad_bias
        probe = plan.state.constant(
            "δ-probe",
            lambda: draw_probe(grad_weight, grad_bias, _probe_generator(grad_weight.device)),
        )
        if speculates:
            graphed = graphed_layer_solve(
                self.graphs, task, self.options, "dual", probe, speculative=True
            )
            if graphed is not None:
                (weight_v, bias_v, values, task.probe_numbers), iterations = graphed
                task.speculation = GraphOutputs(weight_v, bias_v, values, iterations)
        if task.speculation is None:  # eagerly (a graph's first sighting runs eagerly too)
            task.probe_numbers = probe_numbers_for(
                task.system, task.grad_weight, task.grad_bias, probe
            )
        task.seconds += time.perf_counter() - started

    def solve(self, task: LayerTask) -> None:
        """v = M⁻¹g (or k CG iterations) for one task, in the plan's form, into
        ``task.directions`` and ``task.stats``."""
        started = time.perf_counter()
        plan, layer = task.plan, task.layer
        if task.speculation is not None:
            if task.scale is not None:  # the speculation held
                self._graph_result(task, "dual", task.speculation)
                return
            # The probe failed: the general form, and no speculation for a while.
            self.backoff[layer.name] = self.speculation_backoff
        form = plan.form_if_delta if task.scale is not None else plan.form
        if plan.exact_without_gram:
            self._warn_once(
                layer.name,
                f"ProxProp: layer {layer.name!r} has no Gram within the memory limit "
                f"(d = {plan.layout.row_dim}"
                f"{'' if task.system.has_patches else ', no patches'}): "
                "its exact solve runs CG to convergence instead. This warning is shown once.",
            )
        options = self.options
        # Exact solves replay only in the dual form: the others read values back mid-solve.
        if plan.graphed and (not options.exact or form == "dual"):
            numbers = None if task.scale is None else task.probe_numbers
            graphed = graphed_layer_solve(self.graphs, task, self.options, form, numbers)
            if graphed is not None:
                (weight_v, bias_v, values), iterations = graphed
                task.seconds += time.perf_counter() - started
                self._graph_result(task, form, GraphOutputs(weight_v, bias_v, values, iterations))
                return
        solution = solve(
            task.system,
            task.grad_weight,
            task.grad_bias,
            options.tau_prox,
            exact=options.exact,
            cg_iters=options.cg_iters,
            cg_tol=options.cg_tol,
            form=form,
            output_grad_scale=task.scale,
            out=self._direction_buffers(layer.weight, task.grad_weight, task.grad_bias),
            workspace=self.workspace,
            diagnostics=options.diagnostics,
            dual_basis=plan.dual_basis[task.scale is not None],
            constants=plan.state,
        )
        task.seconds += time.perf_counter() - started
        self._solved(task, form, solution)

    def stacks(self, tasks: list[LayerTask]) -> list[list[LayerTask]]:
        """The tasks in solve order, grouped: Linear layers whose δ-form eigenbasis CG can
        share one recurrence (:func:`proxoptim.dual.solve_dual_stacked`: same n, dtype and
        device, a fixed iteration count, no diagnostics, not graphed) form one group, up to
        a block of rows where the device runs the dual CG in blocks (its vectors then stay
        in cache); every other task is a group of its own."""
        options = self.options
        if (
            options.exact
            or options.cg_tol is not None
            or options.diagnostics
            or self.distributed == SHARDED
        ):
            return [[task] for task in tasks]
        groups: list[list[LayerTask]] = []
        open_groups: dict[tuple[Any, ...], tuple[list[LayerTask], int]] = {}
        for task in tasks:
            plan = task.plan
            rows = task.grad_weight.shape[0]
            row_budget = CG_ROW_BLOCK if task.system.costs.row_blocks else None
            stackable = (
                task.scale is not None
                and task.speculation is None
                and not plan.graphed
                and plan.form_if_delta == "dual"
                and plan.dual_basis[True] == "eigenbasis"
                and task.grad_weight.dim() == 2
                and not task.layer.kind.im2col
                and rows > 0
                and (row_budget is None or rows <= row_budget)
            )
            if not stackable:
                groups.append([task])
                continue
            key = (plan.dtype, task.grad_weight.device, task.system.num_columns)
            group, used = open_groups.get(key, (None, 0))
            if group is None or (row_budget is not None and used + rows > row_budget):
                group, used = [], 0
                groups.append(group)
            group.append(task)
            open_groups[key] = (group, used + rows)
        return groups

    def solve_stacked(self, tasks: list[LayerTask]) -> None:
        """The δ-form eigenbasis CG of several layers as one recurrence (see
        :meth:`stacks`); each layer is charged an equal share of its time."""
        started = time.perf_counter()
        options = self.options
        layers = [
            StackedLayer(
                DualKernel(task.system),
                task.scale,
                self._direction_buffers(task.layer.weight, task.grad_weight, task.grad_bias),
            )
            for task in tasks
        ]
        solutions = solve_dual_stacked(layers, options.tau_prox, options.cg_iters, self.workspace)
        share = (time.perf_counter() - started) / len(tasks)
        for task, dual_solution in zip(tasks, solutions, strict=True):
            task.seconds += share
            self._solved(
                task,
                "dual",
                Solution(dual_solution.weight, dual_solution.bias, dual_solution.iterations, None),
            )

    def _solved(self, task: LayerTask, form: str, solution: Solution) -> None:
        """A task's direction and pending stats from its solution."""
        task.stats = layer_stats(
            form,
            solution,
            task.grad_weight,
            task.grad_bias,
            task.seconds,
            task.system,
            task.scale,
            self.options.diagnostics,
        )
        task.directions = _layer_directions(task, solution.weight, solution.bias)

    def publish(self, tasks: Iterable[LayerTask], stats: dict[str, LayerStats]) -> None:
        """Broadcasts each rank-owned layer's directions and stats from its owner, in
        layer order on every rank."""
        for task in sorted(tasks, key=lambda task: task.position):
            if task.owner is None:
                continue
            for direction in task.directions.values():
                self.communicator.broadcast_(direction, task.owner)
            packed = pack(stats.get(task.layer.name))
            if dist.get_backend(self.communicator.group) == "nccl":
                packed = packed.cuda()
            stats[task.layer.name] = unpack(self.communicator.broadcast_(packed, task.owner))

    # -- graphs --------------------------------------------------------------------------

    def _speculation_due(self, name: str) -> bool:
        backoff = self.backoff.get(name, 0)
        if backoff > 0:
            self.backoff[name] = backoff - 1
            return False
        return True

    def _graph_result(self, task: LayerTask, form: str, outputs: GraphOutputs) -> None:
        """A graph's outputs as the layer's directions and pending stats. The graph owns
        the directions: the layer's eager direction buffers are of no more use."""
        self._buffers.pop(task.layer.weight, None)
        task.stats = PendingStats(
            form,
            outputs.iterations,
            outputs.values,
            task.seconds,
            task.system.num_columns,
            task.scale,
        )
        task.directions = _layer_directions(task, outputs.weight, outputs.bias)

    # -- what persists ---------------------------------------------------------------------

    def _direction_buffers(
        self, weight: Tensor, grad_weight: Tensor, grad_bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The layer's buffers for v, kept across steps (one pair per layer, whatever the
        batch): allocating a layer-sized tensor every step costs page faults (CPU) or
        allocator churn (GPU)."""
        buffers = self._buffers.get(weight)
        if (
            buffers is None
            or not _same_layout(buffers[0], grad_weight)
            or (buffers[1] is None) != (grad_bias is None)
        ):
            bias = None if grad_bias is None else torch.empty_like(grad_bias)
            buffers = (torch.empty_like(grad_weight), bias)
            self._buffers[weight] = buffers
        return buffers

    def clear(self) -> None:
        """Drops plans, buffers and graphs (after ``remove_hooks``)."""
        self.plans.clear()
        self._buffers.clear()
        self.workspace.clear()
        if self.graphs is not None:
            self.graphs.clear()  # their static copies and memory pools are of no more use

    def _warn_uncaptured(self, name: str) -> None:
        self._warn_once(
            name,
            f"ProxProp: layer {name!r} has a gradient but no captured input since the last "
            "step (its forward ran under no_grad, its weight is used outside its forward, "
            "or no forward ran); it gets the plain gradient. This warning is shown once.",
        )

    def _warn_once(self, name: str, message: str) -> None:
        if (name, message) in self._warned:
            return
        self._warned.add((name, message))
        warnings.warn(message, stacklevel=5)


def _layer_directions(
    task: LayerTask, weight_v: Tensor, bias_v: Tensor | None
) -> dict[Tensor, Tensor]:
    """{parameter: direction} for a solved layer (the bias only where it has a gradient)."""
    directions = {task.layer.weight: weight_v}
    if task.grad_bias is not None and task.layer.bias.grad is not None:
        directions[task.layer.bias] = bias_v
    return directions


def _sources_if_same_inputs(
    plan: LayerPlan | None, raw_calls: list[tuple[Any, Any, Tensor, Any]]
) -> tuple[tuple[bool, float], ...] | None:
    """The plan's Gram sources where its calls had these inputs' shapes (the Gram source
    depends on nothing else), else None: the system then prices them itself."""
    if plan is None or len(plan.signature.calls) != len(raw_calls):
        return None
    for call, (_, _, raw, _) in zip(plan.signature.calls, raw_calls, strict=True):
        if call.input_shape != tuple(raw.shape) or call.input_dtype != raw.dtype:
            return None
    return plan.gram_sources


def _probe_generator(device: torch.device) -> torch.Generator:
    # A private, seeded stream: probing must never consume the user's random numbers.
    return torch.Generator(device=device).manual_seed(0x5EED)


def solve_dtype(weight: Tensor) -> torch.dtype:
    """Solves run in at least float32 whatever the parameter (or autocast input) dtype."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def profiler_range(name: str) -> contextlib.AbstractContextManager[Any]:
    """A profiler range named ``name`` for one phase of a step, when a profiler is running
    (``torch.profiler.profile``); otherwise nothing: each range costs two operators
    dispatched, a dozen per layer and step."""
    if autograd_profiler._is_profiler_enabled:
        return autograd_profiler.record_function(name)
    return contextlib.nullcontext()


def _same_layout(buffer: Tensor, like: Tensor) -> bool:
    return (buffer.shape, buffer.dtype, buffer.device) == (like.shape, like.dtype, like.device)
