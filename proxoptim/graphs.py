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
second time its key (layer, form, δ or not, exact or CG and its iteration count, τθ,
input shapes and dtypes) is seen, so the first step runs eagerly and warms every library
handle; a capture that fails leaves that key eager for good. Each graph keeps a private
memory pool for its temporaries: graphs trade memory for launches.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Protocol

import torch
from torch import Tensor

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
