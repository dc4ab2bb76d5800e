"""Replaying a layer's fixed-work solve as a CUDA graph (``cuda_graphs=True``).

On a GPU a ProxProp step is mostly host-bound: a layer's solve dispatches 100-200 eager operators
whose launches cost more host time than their kernels take (docs/performance.md). A CUDA
graph records them once and replays them with one launch. The graph reads fixed ("static")
tensors, so every step copies the layer's captured inputs and gradient into them, replays,
and hands out the graph's own output tensors (overwritten by the next replay).

Only solves whose work is fixed in advance are graphed: CG without ``cg_tol`` (an early
stop reads the residual back) and exact solves in the dual form (the primal exact solve
reads its factorisation's status back), never with a communicator. δ-form graphs take
the scale from the δ probe's numbers on the device (never a number baked into the graph),
and when speculating compute the probe themselves; the optimizer reads the verdict
afterwards and falls back to the general form where it failed. A graph is captured the
second time its key (the layer's plan signature, the form, δ or not) is seen, so the
first step runs eagerly and warms every library handle; a capture that fails leaves that
key eager for good. Each graph keeps a private memory pool for its temporaries: graphs
trade memory for launches. :func:`graphed_layer_solve` builds a pipeline task's solve on
the graph's static copies of its inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from proxoptim.dual import probe_numbers_for
from proxoptim.operators import LayerSystem
from proxoptim.solvers import solve
from proxoptim.stats import layer_stats
from proxoptim.workspace import Workspace

if TYPE_CHECKING:
    from proxoptim.pipeline import LayerTask
    from proxoptim.plan import SolveOptions

# Builds a layer's outputs from its static inputs, inside the capture; also returns the
# CG iteration count, a host-side number fixed at capture.
Solve = Callable[[Sequence[Tensor]], tuple[list[Tensor | None], int]]


class _Entry:
    """One captured solve: its static inputs, outputs and replay handle."""

    def __init__(self, static: list[Tensor], solve: Solve) -> None:
        self.static, self.solve = static, solve
        self.outputs: list[Tensor | None] = []
        self.iterations = 0
        self.graph: torch.cuda.CUDAGraph | None = None


class GraphRunner(Protocol):
    """How captured solves run: ``ProxPropOptimizer(..., cuda_graphs=runner)`` takes any
    object with these three methods (``cuda_graphs=True`` means :class:`CudaGraphRunner`).
    """

    def supports(self, device: torch.device) -> bool:
        """Whether solves of tensors on ``device`` can be captured."""
        ...

    def capture(self, entry: _Entry) -> None:
        """Runs ``entry.solve(entry.static)`` once, recording it, and sets
        ``entry.outputs`` and ``entry.iterations``; raises if it cannot."""
        ...

    def replay(self, entry: _Entry) -> None:
        """Reruns the recorded solve on the current contents of ``entry.static``, leaving
        its results in ``entry.outputs``."""
        ...


class CudaGraphRunner:
    """Captures a solve into one ``torch.cuda.CUDAGraph`` and replays it."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cuda"

    def capture(self, entry: _Entry) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # a warm-up outside the capture, as CUDA asks
            entry.solve(entry.static)
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph):
            entry.outputs, entry.iterations = entry.solve(entry.static)

    def replay(self, entry: _Entry) -> None:
        entry.graph.replay()


class EagerRunner:
    """The same bookkeeping without CUDA: a replay reruns the solve on the static inputs
    and copies its results into the first run's outputs.

    Public on purpose: ``ProxPropOptimizer(..., cuda_graphs=EagerRunner())`` checks the
    graph plumbing (keys, static inputs, outputs, fallbacks) on machines without a GPU, in
    the tests and in ``benchmarks/gpu_check.py --device cpu``, which exercises the
    graphs-against-eager check before a device run depends on it."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return True

    def capture(self, entry: _Entry) -> None:
        entry.outputs, entry.iterations = entry.solve(entry.static)

    def replay(self, entry: _Entry) -> None:
        outputs, _ = entry.solve(entry.static)
        for kept, fresh in zip(entry.outputs, outputs, strict=True):
            if kept is not None:
                kept.copy_(fresh)


class SolveGraphs:
    """Per-key captured solves; :meth:`run` returns (outputs, iterations) or None when the
    caller should solve eagerly (first sighting of a key, or a key whose capture failed).

    Keys are tuples whose first element is the owner's plan signature: :meth:`forget`
    drops a dropped plan's graphs, static copies and memory pools with it, so the graphs
    are bounded as the plans are (proxoptim.plan.PlanCache).
    """

    def __init__(self, runner: GraphRunner | None = None) -> None:
        self.runner = runner if runner is not None else CudaGraphRunner()
        self._seen: set[Hashable] = set()
        self._disabled: set[Hashable] = set()
        self._entries: dict[Hashable, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._seen.clear()
        self._disabled.clear()
        self._entries.clear()

    def forget(self, owner: Hashable) -> None:
        """Drops every key whose first element is ``owner``."""
        for keys in (self._seen, self._disabled, self._entries):
            for key in [key for key in keys if key[0] == owner]:
                if isinstance(keys, set):
                    keys.discard(key)
                else:
                    del keys[key]

    def run(
        self, key: Hashable, inputs: Sequence[Tensor], solve: Solve
    ) -> tuple[list[Tensor | None], int] | None:
        entry = self._entries.get(key)
        if entry is None:
            if key in self._disabled or key not in self._seen:
                self._seen.add(key)
                return None
            entry = self._capture(key, inputs, solve)
            if entry is None:
                return None
        for static, value in zip(entry.static, inputs, strict=True):
            static.copy_(value)
        self.runner.replay(entry)
        return entry.outputs, entry.iterations

    def _capture(self, key: Hashable, inputs: Sequence[Tensor], solve: Solve) -> _Entry | None:
        entry = _Entry([value.clone() for value in inputs], solve)
        try:
            self.runner.capture(entry)
        except Exception as error:  # noqa: BLE001 - whatever went wrong, stay eager
            self._disabled.add(key)
            warnings.warn(
                f"ProxProp: a solve could not be captured as a CUDA graph ({error}); it "
                "runs eagerly from now on",
                stacklevel=4,
            )
            return None
        self._entries[key] = entry
        return entry


def graphed_layer_solve(
    graphs: SolveGraphs,
    task: LayerTask,
    options: SolveOptions,
    form: str,
    probe: Tensor | None,
    speculative: bool = False,
) -> tuple[list[Tensor | None], int] | None:
    """A pipeline task's solve through ``graphs``: (v weight, v bias, the stats'
    numbers) and the iteration count, or None where it runs eagerly this step (a key
    not yet captured, or one whose capture failed). ``probe``: the layer's probe
    numbers when its verdict was δ; the scale then stays on the device, one of the
    graph's inputs, and the graph runs the δ form. With ``speculative``, ``probe`` is
    the probe vector ω instead: the graph computes the probe's numbers itself, runs the
    δ form with their scale and returns the numbers as a fourth output."""
    modules = [call.module for call in task.calls]
    inputs = [call.input for call in task.calls]
    if probe is not None:
        inputs += [call.output_grad for call in task.calls] + [probe]
    inputs.append(task.grad_weight)
    if task.grad_bias is not None:
        inputs.append(task.grad_bias)
    plan = task.plan
    mode = "speculative" if speculative else probe is not None
    # The plan's signature fixes the inputs' shapes, dtypes and strides.
    key = (plan.signature, form, mode)
    kind, layout, dtype = task.layer.kind, plan.layout, plan.dtype
    calls = len(modules)
    dual_basis = plan.dual_basis[probe is not None]

    def solve_static(static: list[Tensor]) -> tuple[list[Tensor | None], int]:
        xs, rest = static[:calls], static[calls:]
        output_grads: list[Tensor | None] = [None] * calls
        probed = None
        if probe is not None:
            output_grads, probed, rest = rest[:calls], rest[calls], rest[calls + 1 :]
        static_weight, static_bias = rest[0], rest[1] if len(rest) > 1 else None
        system = LayerSystem(
            layout,
            [
                (module, kind, x, grad)
                for module, x, grad in zip(modules, xs, output_grads, strict=True)
            ],
            dtype,
            costs=options.device_costs,
            gram_sources=plan.gram_sources,
        )
        numbers = probed
        if speculative:
            numbers = probe_numbers_for(system, static_weight, static_bias, probed)
        solution = solve(
            system,
            static_weight,
            static_bias,
            options.tau_prox,
            exact=options.exact,
            cg_iters=options.cg_iters,
            cg_tol=None,
            form=form,
            output_grad_scale=None if numbers is None else numbers[1],
            workspace=Workspace(),  # the graph's own: shared slots could be reallocated
            diagnostics=options.diagnostics,
            dual_basis=dual_basis,
        )
        pending = layer_stats(
            form, solution, static_weight, static_bias, 0.0, system, None, options.diagnostics
        )
        outputs = [solution.weight, solution.bias, pending.values]
        if speculative:
            outputs.append(numbers)
        return outputs, solution.iterations

    return graphs.run(key, inputs, solve_static)
