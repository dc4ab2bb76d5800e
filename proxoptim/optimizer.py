"""ProxPropOptimizer: the torch.optim face of proximal backpropagation."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.profiler as autograd_profiler
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from proxoptim.capture import Capture, CapturedCall
from proxoptim.distributed import (
    Communicator,
    average_over_ranks,
    default_mode,
    gathered_linear_calls,
)
from proxoptim.dual import DualKernel, draw_probe, probe_numbers_for, probe_verdicts
from proxoptim.graphs import GraphRunner, SolveGraphs
from proxoptim.layers import Layer, adopt, claim, find_layers, release, resolve_exclusions, unwrap
from proxoptim.operators import LayerSystem, RowLayout
from proxoptim.readback import read_back
from proxoptim.solvers import FORMS, choose_form, solve
from proxoptim.stats import LayerStats, PendingStats, layer_stats, pack, resolve_stats, unpack
from proxoptim.workspace import Workspace

SOLVERS = ("cg", "exact", "none")
NONFINITE = ("raise", "skip")
SOLVER_FORMS = ("auto", *FORMS)


@dataclass
class _Prepared:
    """One layer's solve, set up: everything but the δ probe's verdict."""

    layer: Layer
    calls: list[CapturedCall]
    layout: RowLayout
    system: LayerSystem
    dtype: torch.dtype
    grad_weight: Tensor
    grad_bias: Tensor | None
    probe: Tensor | None  # probe_numbers_for's numbers, still on the device
    seconds: float  # host time spent setting it up
    # The form the cost model picks with δ known, where the probe step asked it: the solve
    # reuses it when the probe holds instead of pricing the forms again.
    form_if_delta: str | None = None


@dataclass
class _GraphOutputs:
    """A graphed solve's outputs; for a speculative δ-form graph, pending the probe's
    verdict."""

    weight: Tensor
    bias: Tensor | None
    values: Tensor | None  # the stats' numbers (proxoptim.stats.PendingStats.values)
    iterations: int


# After a speculative δ-form solve whose probe failed, the layer runs the general form for
# this many steps before speculating again: a gradient that is not s·δᵀŨᵀ once (weight
# decay added to it, a custom hook) usually stays so, and every failed speculation is a
# solve thrown away.
SPECULATION_BACKOFF = 100


class ProxPropOptimizer(Optimizer):
    r"""Proximal backpropagation (Frerix et al., ICLR 2018) around any torch.optim optimizer.

    For every preconditioned nn.Linear / nn.Conv{1,2,3}d layer with parameters θ = (W, b),
    the gradient g left by ``backward`` is replaced, for the duration of the inner step, by

    .. math::
        v = M^{-1} g, \qquad M = \tfrac{1}{\tau_\theta} I + A^* A,

    where A is the layer's linear map θ ↦ φ(θ, a) at the inputs a it saw since the last
    step (summed over samples, positions and calls). Each output unit/channel is its own
    system. The inner optimizer then steps as if v were the gradient; with SGD at lr = 1, no
    momentum and ``solver="exact"`` this is the proximal step of the paper's eq. (11).

    Args:
        model: the (unmodified) model; every supported layer in it is hooked.
        optimizer: a ``torch.optim.Optimizer`` subclass, built on the model's trainable
            parameters with ``optimizer_kwargs``, or a ready instance (whose parameters may
            include tensors outside the model; those just get the inner step).
        tau_prox: τθ > 0, the proximal step size; smaller means closer to the gradient.
        solver: ``"cg"`` (``cg_iters`` batched CG iterations from v = 0), ``"exact"``
            (M⁻¹g by Cholesky) or ``"none"`` (the plain gradient; the inner optimizer's own
            trajectory).
        cg_iters: k ≥ 1, the number of CG iterations (the most, when ``cg_tol`` is set).
        cg_tol: optional early stop once every row has ‖r_j‖ ≤ cg_tol·‖g_j‖ (the dual form
            checks rows in blocks of 1024, stopping each block once all its rows have).
        exclude_last: keep the plain gradient on the output layer, the hooked layer that ran
            last in the forward pass (the paper's explicit step on the last layer, eq. 12).
        exclude: module names (as in ``model.named_modules()``; a container's name covers
            everything inside it) or module objects whose layers keep the plain gradient.
        solver_form: ``"auto"`` (a per-layer cost rule), ``"matrix_free"``, ``"primal"`` or
            ``"dual"`` (Linear layers, one-group convolutions); a form a layer cannot use
            falls back to "auto" there.
        nonfinite: ``"raise"``: a NaN/inf in a gradient, a captured input or a solve raises
            ``FloatingPointError`` naming the layer and the quantity, before anything is
            written; ``"skip"``: the step is skipped with a warning and counted in
            ``skipped_steps``. Either way one fused check over every gradient and
            direction serves the whole step (one host sync); the culprit is looked for only
            when it fails.
        diagnostics: also compute each layer's relative residual ‖g − Mv‖/‖g‖ and cosine
            between v and g (``last_stats[name].relative_residual`` and ``.cosine``; None
            otherwise). They cost reductions over every preconditioned gradient and
            direction, and for exact dual solves a sampled residual, plus a host sync: off
            by default, so a step dispatches only its solves. Form, iterations, columns
            and seconds are always reported.
        cuda_graphs: replay each layer's solve as a CUDA graph (tensors on a CUDA device;
            CG without ``cg_tol``, and exact solves in the dual form; not under
            ``distributed``). One launch replaces the solve's 100-200, which is what a GPU
            step is bound by (docs/performance.md), and the form choice prices operators
            as replayed kernels. Where the dual form is chosen and δ was captured, the δ
            form runs speculatively: its probe runs inside the graph, and a layer whose
            probe fails is solved again in the general form (and stays with it for
            ``SPECULATION_BACKOFF`` steps). Each graph keeps copies of its layer's inputs,
            δ and gradient and a private memory pool. The first step with a given layer
            shape runs eagerly, the second captures.
            A runner object (:class:`proxoptim.graphs.GraphRunner`) instead of True
            decides how solves are captured and replayed: ``EagerRunner()`` reruns them
            through the same bookkeeping on any device.
        speculation_backoff: with ``cuda_graphs``, the steps a layer whose speculative δ
            probe failed runs the general form before speculating again (default
            :data:`SPECULATION_BACKOFF`; 0 speculates every step).
        distributed: ``"global"`` (default inside an initialised process group of several
            ranks: every rank gets the single-process direction on the concatenation of all
            ranks' batches) or ``"local"`` (each rank's own M, directions averaged); see
            :mod:`proxoptim.distributed`. Every rank must run the same layers each step.
        process_group: the group to communicate over (default: the world).
        **optimizer_kwargs: passed to ``optimizer`` when it is a class.

    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's own objects, so
    LR schedulers, ``GradScaler``, ``clip_grad_norm_`` and checkpointing work unchanged;
    ``state_dict()`` is the inner optimizer's. After ``step()``, ``.grad`` again holds the
    gradient ``backward`` left (ProxProp's direction is only lent to the inner step).

    Attributes:
        inner: the wrapped optimizer.
        last_stats: ``{layer name: LayerStats}`` for the layers preconditioned in the last step.
        captured_graphs: how many layer solves replay as CUDA graphs (``cuda_graphs=True``).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: type[Optimizer] | Optimizer,
        *,
        tau_prox: float = 1.0,
        solver: str = "cg",
        cg_iters: int = 3,
        cg_tol: float | None = None,
        exclude_last: bool = True,
        exclude: Iterable[str | nn.Module] = (),
        solver_form: str = "auto",
        nonfinite: str = "raise",
        diagnostics: bool = False,
        cuda_graphs: bool | GraphRunner = False,
        speculation_backoff: int = SPECULATION_BACKOFF,
        distributed: str | None = None,
        process_group: Any = None,
        **optimizer_kwargs: Any,
    ) -> None:
        _validate(
            model, optimizer, tau_prox, solver, cg_iters, cg_tol, solver_form, optimizer_kwargs
        )
        if nonfinite not in NONFINITE:
            raise ValueError(f"unknown nonfinite policy {nonfinite!r}; pass one of {NONFINITE}")
        if not isinstance(cuda_graphs, bool) and not all(
            callable(getattr(cuda_graphs, method, None))
            for method in ("supports", "capture", "replay")
        ):
            raise ValueError(
                f"cuda_graphs must be True, False or a runner (proxoptim.graphs.GraphRunner, "
                f"e.g. proxoptim.graphs.EagerRunner()), got {cuda_graphs!r}"
            )
        if (
            isinstance(speculation_backoff, bool)
            or not isinstance(speculation_backoff, int)
            or speculation_backoff < 0
        ):
            raise ValueError(
                f"speculation_backoff must be an integer >= 0 (steps), got {speculation_backoff!r}"
            )
        self.speculation_backoff = speculation_backoff
        if not isinstance(diagnostics, bool):
            raise ValueError(f"diagnostics must be True or False, got {diagnostics!r}")
        self.diagnostics = diagnostics
        # Replays of each layer's fixed-iteration CG solve (proxoptim.graphs), CUDA only.
        if cuda_graphs is False:
            self._graphs = None
        else:
            self._graphs = SolveGraphs(None if cuda_graphs is True else cuda_graphs)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.tau_prox = float(tau_prox)
        self.solver = solver
        self.cg_iters = int(cg_iters)
        self.cg_tol = None if cg_tol is None else float(cg_tol)
        self.exclude_last = bool(exclude_last)
        self.solver_form = solver_form
        self.distributed = default_mode(distributed)
        self._communicator = Communicator(process_group) if self.distributed else None
        model = unwrap(model)

        self._layers = find_layers(model, resolve_exclusions(model, exclude))
        self._parameter_names = {param: name for name, param in model.named_parameters()}
        claim(self._layers)
        if isinstance(optimizer, Optimizer):
            inner = optimizer
        else:
            trainable = [p for p in model.parameters() if p.requires_grad]
            inner = optimizer(trainable, **optimizer_kwargs)
        self.inner = inner

        # What torch.optim.Optimizer.__init__ would set, but sharing the inner optimizer's
        # containers instead of building our own.
        self.defaults = inner.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

        self.last_stats: dict[str, LayerStats] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._buffers: dict[Tensor, tuple[Tensor, Tensor | None]] = {}
        self._workspace = Workspace()
        self._speculation_backoff: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._capture = Capture(
            (index, module, not layer.excluded, layer.kind.uses_output_grad)
            for index, layer in enumerate(self._layers)
            for module in layer.modules
        )
        adopt(self._layers, self._capture)

    # The inner optimizer's containers, always read through so that load_state_dict on the
    # inner optimizer (which may rebind them) can never leave us holding stale copies.
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers ProxProp tracks (tied modules appear under their first name)."""
        return [layer.name for layer in self._layers]

    def __repr__(self) -> str:
        return (
            f"ProxPropOptimizer(tau_prox={self.tau_prox}, solver={self.solver!r}, "
            f"cg_iters={self.cg_iters}, cg_tol={self.cg_tol}, exclude_last={self.exclude_last}, "
            f"solver_form={self.solver_form!r}, layers={len(self._layers)},\n"
            f"  inner={self.inner!r})"
        )

    @property
    def speculation_countdown(self) -> dict[str, int]:
        """{layer name: steps left} for layers whose speculative δ probe failed and that
        run the general form until their count reaches 0 (``cuda_graphs`` only); a copy."""
        return {name: steps for name, steps in self._speculation_backoff.items() if steps > 0}

    @property
    def captured_graphs(self) -> int:
        """How many layer solves are replayed as CUDA graphs (``cuda_graphs=True``)."""
        return 0 if self._graphs is None else len(self._graphs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients (through the inner optimizer) and drops captured inputs."""
        self.inner.zero_grad(set_to_none=set_to_none)
        self._capture.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads the inner optimizer's state, after checking it fits this model.

        Raises ValueError naming the mismatch (group count, group sizes, a state tensor whose
        shape differs from its parameter's) and leaves this optimizer as it was.
        """
        self._check_state_dict(state_dict)
        try:
            self.inner.load_state_dict(state_dict)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
            raise ValueError(f"could not load the optimizer state_dict: {error}") from error

    def _check_state_dict(self, state_dict: Any) -> None:
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(
                "load_state_dict expects what state_dict() returned: a dict with 'state' and "
                f"'param_groups', got {type(state_dict).__name__}"
                + (f" with keys {sorted(state_dict)}" if isinstance(state_dict, dict) else "")
            )
        saved_groups, groups = state_dict["param_groups"], self.inner.param_groups
        if len(saved_groups) != len(groups):
            raise ValueError(
                f"the state_dict has {len(saved_groups)} parameter group(s), this optimizer "
                f"{len(groups)}: was it saved for a different model or optimizer?"
            )
        for number, (saved, group) in enumerate(zip(saved_groups, groups, strict=True)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {number} of the state_dict holds "
                    f"{len(saved['params'])} parameters, this optimizer's "
                    f"{len(group['params'])}: it was saved for a different model"
                )
            for saved_id, param in zip(saved["params"], group["params"], strict=True):
                for key, value in state_dict["state"].get(saved_id, {}).items():
                    if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                        name = self._parameter_names.get(param, f"parameter {saved_id}")
                        raise ValueError(
                            f"state {key!r} of {name!r} has shape {tuple(value.shape)} in the "
                            f"state_dict but the parameter has {tuple(param.shape)}"
                        )

    def remove_hooks(self) -> None:
        """Detaches ProxProp from the model (idempotent); later steps use the plain gradient."""
        self._capture.remove()
        release(self._layers, self._capture)
        if self._graphs is not None:
            self._graphs.clear()  # their static copies and memory pools are of no more use

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Preconditions the captured layers' gradients, then takes the inner step.

        The closure, if given, is evaluated once (with grad enabled) before the solve.
        Every direction is computed before any ``.grad`` is touched: if a solve raises,
        parameters, gradients, optimizer state and the captured inputs are left as they
        were (the step can be retried); if the inner step raises, the original gradients
        are put back, but the captured inputs are already released (a retry needs a new
        backward).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        directions: dict[Tensor, Tensor] = {}
        stats: dict[str, LayerStats] = {}
        calls = self._capture.calls()
        if self.solver != "none":
            directions, stats = self._directions(calls)
            if self.distributed == "local" and directions:
                average_over_ranks(list(directions.values()), self._communicator)
        with _phase("ProxProp.nonfinite_check"):
            problem = self._nonfinite_problem(directions, calls)
        if problem is not None:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"ProxProp: {problem}; parameters, gradients and optimizer state are "
                    "unchanged (pass nonfinite='skip' to skip such steps instead)"
                )
            warnings.warn(f"ProxProp: {problem}; step skipped", stacklevel=2)
            self.skipped_steps += 1
            self.last_stats = {}
            self._capture.clear()
            return loss

        # The captured inputs and output gradients have served: release them before the
        # inner step, whose temporaries make a training step's memory peak (backprop would
        # have freed the inputs at the end of backward).
        self._capture.clear()
        del calls
        originals = {param: param.grad for param in directions}
        for param, direction in directions.items():
            param.grad = direction
        try:
            self.inner.step()
        finally:
            for param, grad in originals.items():
                param.grad = grad
        self.last_stats = stats
        return loss

    def _directions(
        self, calls: dict[int, list[CapturedCall]]
    ) -> tuple[dict[Tensor, Tensor], dict[str, LayerStats]]:
        """v for every layer to precondition, keyed by parameter, and per-layer stats.

        In passes over the layers: every layer's system is set up, then probed for δ (the
        numbers stay on the device; under CUDA graphs the probe is part of a speculative
        δ-form solve), then all probes are read back in one host sync (not one per layer),
        then every layer solves (or keeps its speculative solve, where its probe held).
        """
        output_layer = None
        if self.exclude_last and calls:
            # The layer backward reached first: the one that ran last in the forward pass.
            output_layer = min(calls, key=lambda key: min(call.confirmation for call in calls[key]))
        stepped = {param for group in self.inner.param_groups for param in group["params"]}
        directions: dict[Tensor, Tensor] = {}
        pending: dict[str, PendingStats] = {}
        # (position, owner rank, layer, directions): broadcast in layer order on every rank.
        spread: list[tuple[int, int, Layer, dict[Tensor, Tensor]]] = []
        prepared: list[tuple[int, int | None, _Prepared]] = []
        owned = 0
        for index, layer in enumerate(self._layers):
            weight = layer.weight
            if layer.excluded or index == output_layer:
                continue
            if weight.grad is None or weight not in stepped:
                continue
            if index not in calls:
                self._warn_uncaptured(layer.name)
                continue
            owner = None
            if self.distributed == "global" and not layer.kind.im2col:
                # Round-robin over the ranks, in layer order (the same on every rank).
                owner = owned % self._communicator.world_size
                owned += 1
            with _phase(f"ProxProp.prepare#{layer.name}"):
                setup = self._prepare(layer, calls[index], owner)
            if isinstance(setup, dict):  # another rank solves this layer
                spread.append((index, owner, layer, setup))
                directions.update(setup)
            else:
                prepared.append((index, owner, setup))
        speculations = []
        for _, _, setup in prepared:
            with _phase(f"ProxProp.probe#{setup.layer.name}"):
                speculations.append(self._probe(setup))
        with _phase("ProxProp.probe_verdicts"):
            scales = probe_verdicts(
                [setup.probe for _, _, setup in prepared],
                [setup.dtype for _, _, setup in prepared],
            )
        for (index, owner, setup), scale, speculation in zip(
            prepared, scales, speculations, strict=True
        ):
            with _phase(f"ProxProp.solve#{setup.layer.name}"):
                if speculation is not None and scale is not None:  # the speculation held
                    layer_directions, layer_stats = self._graph_result(
                        setup, "dual", speculation, setup.seconds, scale
                    )
                else:
                    if speculation is not None:  # the probe failed: the general form
                        self._speculation_backoff[setup.layer.name] = self.speculation_backoff
                    layer_directions, layer_stats = self._solve(setup, scale)
            if owner is not None:
                spread.append((index, owner, setup.layer, layer_directions))
            pending[setup.layer.name] = layer_stats
            directions.update(layer_directions)
        with _phase("ProxProp.resolve_stats"):
            stats = resolve_stats(pending)
        for _, owner, layer, layer_directions in sorted(spread, key=lambda entry: entry[0]):
            for direction in layer_directions.values():
                self._communicator.broadcast_(direction, owner)
            packed = pack(stats.get(layer.name))
            if dist.get_backend(self._communicator.group) == "nccl":
                packed = packed.cuda()
            stats[layer.name] = unpack(self._communicator.broadcast_(packed, owner))
        return {param: v.to(param.dtype) for param, v in directions.items()}, stats

    def _prepare(
        self, layer: Layer, calls: list[CapturedCall], owner: int | None = None
    ) -> _Prepared | dict[Tensor, Tensor]:
        """One layer's system and gradient in the solve dtype. With an ``owner`` rank other
        than this one, only the gathers run here and the buffers the owner's direction will
        be broadcast into are returned instead."""
        started = time.perf_counter()
        weight, bias = layer.weight, layer.bias
        has_bias = bias is not None and bias.requires_grad
        layout = RowLayout(
            weight.shape, layer.kind.groups(layer.modules[0]), has_bias, layer.kind.rows_axis
        )
        # Solve in at least float32 whatever the parameter (or autocast input) dtype.
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = weight.grad.to(dtype)
        grad_bias = None
        if has_bias:
            grad_bias = (
                bias.grad.to(dtype)
                if bias.grad is not None
                else torch.zeros_like(bias, dtype=dtype)
            )
        raw_calls = [(c.module, layer.kind, c.input, c.output_grad) for c in calls]
        communicator = None
        if self.distributed == "global":
            if layer.kind.im2col:
                communicator = self._communicator  # all-reduce the Gram or each product
            else:
                raw_calls = gathered_linear_calls(raw_calls, dtype, self._communicator)
        system = LayerSystem(layout, raw_calls, dtype, communicator)
        if owner is not None and owner != self._communicator.rank:
            buffers = self._direction_buffers(weight, grad_weight, grad_bias)
            waiting = {weight: buffers[0]}
            if has_bias and bias.grad is not None:
                waiting[bias] = buffers[1]
            return waiting
        return _Prepared(
            layer,
            calls,
            layout,
            system,
            dtype,
            grad_weight,
            grad_bias,
            None,
            time.perf_counter() - started,
        )

    def _probe(self, setup: _Prepared) -> _GraphOutputs | None:
        """Starts the layer's δ probe (its numbers stay on the device, in ``setup.probe``).

        Where the layer's solve replays as a graph and the δ form is its cheapest, the
        probe runs inside the δ-form solve's graph, speculatively: the direction is computed
        before the verdict is known, and redone in the general form if the probe fails
        (then the layer runs the general form for :data:`SPECULATION_BACKOFF` steps before
        trying again). Returns that graph's outputs, or None where the probe ran eagerly
        (or not at all)."""
        started = time.perf_counter()
        system, weight = setup.system, setup.layer.weight
        exact = self.solver == "exact"
        if not system.supports_dual or any(call.output_grad is None for call in system.calls):
            return None
        speculates = self._speculates(setup, exact)
        if not speculates and not (
            self._dual_if_delta(setup, exact) and DualKernel.should_probe(system, exact)
        ):
            return None
        probe = draw_probe(setup.grad_weight, setup.grad_bias, self._probe_generator(weight.device))
        speculation = None
        if speculates:
            graphed = self._graphed_solve(setup, "dual", probe, speculative=True)
            if graphed is not None:
                (weight_v, bias_v, values, setup.probe), iterations = graphed
                speculation = _GraphOutputs(weight_v, bias_v, values, iterations)
        if speculation is None:  # eagerly (a graph's first sighting runs eagerly too)
            setup.probe = probe_numbers_for(system, setup.grad_weight, setup.grad_bias, probe)
        setup.seconds += time.perf_counter() - started
        return speculation

    def _dual_if_delta(self, setup: _Prepared, exact: bool) -> bool:
        """Whether the layer would run the dual form if its probe held. Only the dual form
        uses δ, and knowing δ only makes the dual form cheaper: where it would not run
        even then, the probe's operators (and its host sync) are spent for nothing."""
        graphed = self._graphs_apply(setup, exact) and not exact
        setup.form_if_delta = choose_form(
            setup.system, exact, self.cg_iters, self.solver_form, True, graphed
        )
        return setup.form_if_delta == "dual"

    def _speculates(self, setup: _Prepared, exact: bool) -> bool:
        """Whether this step's solve of the layer is a speculative δ-form graph."""
        name = setup.layer.name
        backoff = self._speculation_backoff.get(name, 0)
        if backoff > 0:
            self._speculation_backoff[name] = backoff - 1
            return False
        if not self._graphs_apply(setup, exact):
            return False
        form = choose_form(
            setup.system, exact, self.cg_iters, self.solver_form, True, graphed=not exact
        )
        return form == "dual"

    def _graphs_apply(self, setup: _Prepared, exact: bool) -> bool:
        """Whether this layer's solve may replay as a CUDA graph: fixed work (no ``cg_tol``
        for CG), no communicator, a device the runner supports."""
        return (
            self._graphs is not None
            and (exact or self.cg_tol is None)
            and setup.system.communicator is None
            and self._graphs.runner.supports(setup.layer.weight.device)
        )

    def _solve(
        self, setup: _Prepared, scale: float | None
    ) -> tuple[dict[Tensor, Tensor], PendingStats]:
        """v = M⁻¹g (or k CG iterations) for one prepared layer, as {parameter: direction}
        in the solve dtype, and its pending stats; ``scale``: the probe's verdict."""
        started = time.perf_counter()
        layer, system = setup.layer, setup.system
        exact = self.solver == "exact"
        graphs_apply = self._graphs_apply(setup, exact)
        if scale is not None and setup.form_if_delta is not None:
            form = setup.form_if_delta  # priced already, with the same arguments
        else:
            form = choose_form(
                system,
                exact,
                self.cg_iters,
                self.solver_form,
                scale is not None,
                graphed=graphs_apply and not exact,
            )
        if exact and form == "matrix_free":
            self._warn_once(
                layer.name,
                f"ProxProp: layer {layer.name!r} has no Gram within the memory limit "
                f"(d = {setup.layout.row_dim}{'' if system.has_patches else ', no patches'}): "
                "its exact solve runs CG to convergence instead. This warning is shown once.",
            )
        graphed = None
        # Exact solves replay only in the dual form: the others read values back mid-solve.
        if graphs_apply and (not exact or form == "dual"):
            graphed = self._graphed_solve(setup, form, None if scale is None else setup.probe)
        if graphed is not None:
            (weight_v, bias_v, values), iterations = graphed
            seconds = setup.seconds + time.perf_counter() - started
            outputs = _GraphOutputs(weight_v, bias_v, values, iterations)
            return self._graph_result(setup, form, outputs, seconds, scale)
        solution = solve(
            system,
            setup.grad_weight,
            setup.grad_bias,
            self.tau_prox,
            exact=exact,
            cg_iters=self.cg_iters,
            cg_tol=self.cg_tol,
            form=form,
            output_grad_scale=scale,
            out=self._direction_buffers(layer.weight, setup.grad_weight, setup.grad_bias),
            workspace=self._workspace,
            diagnostics=self.diagnostics,
        )
        seconds = setup.seconds + time.perf_counter() - started
        stats = layer_stats(
            form,
            solution,
            setup.grad_weight,
            setup.grad_bias,
            seconds,
            system,
            scale,
            self.diagnostics,
        )
        return _layer_directions(setup, solution.weight, solution.bias), stats

    def _graph_result(
        self,
        setup: _Prepared,
        form: str,
        outputs: _GraphOutputs,
        seconds: float,
        scale: float | None,
    ) -> tuple[dict[Tensor, Tensor], PendingStats]:
        """A graph's outputs as the layer's directions and pending stats. The graph owns
        the directions: the layer's eager direction buffers are of no more use."""
        self._buffers.pop(setup.layer.weight, None)
        stats = PendingStats(
            form, outputs.iterations, outputs.values, seconds, setup.system.num_columns, scale
        )
        return _layer_directions(setup, outputs.weight, outputs.bias), stats

    def _graphed_solve(
        self, setup: _Prepared, form: str, probe: Tensor | None, speculative: bool = False
    ) -> tuple[list[Tensor | None], int] | None:
        """The layer's solve through :class:`SolveGraphs`: (v weight, v bias, the stats'
        numbers) and the iteration count, or None where it runs eagerly this step (a key
        not yet captured, or one whose capture failed). ``probe``: the layer's probe
        numbers when its verdict was δ; the scale then stays on the device, one of the
        graph's inputs, and the graph runs the δ form. With ``speculative``, ``probe`` is
        the probe vector ω instead: the graph computes the probe's numbers itself, runs the
        δ form with their scale and returns the numbers as a fourth output."""
        modules = [call.module for call in setup.calls]
        inputs = [call.input for call in setup.calls]
        if probe is not None:
            inputs += [call.output_grad for call in setup.calls] + [probe]
        inputs.append(setup.grad_weight)
        if setup.grad_bias is not None:
            inputs.append(setup.grad_bias)
        exact = self.solver == "exact"
        key = (
            setup.layer.name,
            form,
            "speculative" if speculative else probe is not None,
            exact,
            self.cg_iters,
            self.tau_prox,
            setup.dtype,
            tuple((tuple(value.shape), value.dtype, value.stride()) for value in inputs),
        )
        kind, layout, dtype = setup.layer.kind, setup.layout, setup.dtype
        tau_prox, cg_iters, calls = self.tau_prox, self.cg_iters, len(modules)
        diagnostics = self.diagnostics

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
            )
            numbers = probed
            if speculative:
                numbers = probe_numbers_for(system, static_weight, static_bias, probed)
            solution = solve(
                system,
                static_weight,
                static_bias,
                tau_prox,
                exact=exact,
                cg_iters=cg_iters,
                cg_tol=None,
                form=form,
                output_grad_scale=None if numbers is None else numbers[1],
                workspace=Workspace(),  # the graph's own: shared slots could be reallocated
                diagnostics=diagnostics,
            )
            pending = layer_stats(
                form, solution, static_weight, static_bias, 0.0, system, None, diagnostics
            )
            outputs = [solution.weight, solution.bias, pending.values]
            if speculative:
                outputs.append(numbers)
            return outputs, solution.iterations

        return self._graphs.run(key, inputs, solve_static)

    def _direction_buffers(
        self, weight: Tensor, grad_weight: Tensor, grad_bias: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The layer's buffers for v, kept across steps: allocating a layer-sized tensor
        every step costs page faults (CPU) or allocator churn (GPU)."""
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

    def _probe_generator(self, device: torch.device) -> torch.Generator:
        # A private, seeded stream: probing must never consume the user's random numbers.
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(0x5EED)
            self._generators[device] = generator
        return generator

    def _nonfinite_problem(
        self, directions: dict[Tensor, Tensor], calls: dict[int, list[CapturedCall]]
    ) -> str | None:
        """What is non-finite, naming the layer and the quantity, or None.

        One fused check serves the step: the largest 2-norm over every gradient the inner
        optimizer will see and every direction (a NaN or inf in a captured input reaches
        the direction through the solve), three operators and one host sync whatever the
        number of layers. The culprit is looked for only when that fails (or when finite
        values overflow a norm: then it finds none).
        """
        stepped = [
            param
            for group in self.inner.param_groups
            for param in group["params"]
            if param.grad is not None
        ]
        if _all_finite([param.grad for param in stepped] + list(directions.values())):
            return None
        for index, layer in enumerate(self._layers):
            if layer.weight not in directions:
                continue
            for param in (layer.weight, layer.bias):
                if param is not None and param.grad is not None and not _finite(param.grad):
                    return (
                        f"non-finite gradient of {self._parameter_names.get(param, layer.name)!r}"
                    )
            for call in calls.get(index, []):
                if call.input is not None and not _finite(call.input):
                    return f"non-finite captured input of layer {layer.name!r}"
            for param in (layer.weight, layer.bias):
                if param in directions and not _finite(directions[param]):
                    return (
                        f"the solve for layer {layer.name!r} produced a non-finite direction "
                        f"(tau_prox={self.tau_prox} may be too large for its inputs)"
                    )
        culprit = next((p for p in stepped if p not in directions and not _finite(p.grad)), None)
        if culprit is not None:
            return f"non-finite gradient of {self._parameter_names.get(culprit, 'a parameter')!r}"
        return None

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
        warnings.warn(message, stacklevel=4)


def _layer_directions(
    setup: _Prepared, weight_v: Tensor, bias_v: Tensor | None
) -> dict[Tensor, Tensor]:
    """{parameter: direction} for a solved layer (the bias only where it has a gradient)."""
    directions = {setup.layer.weight: weight_v}
    if setup.grad_bias is not None and setup.layer.bias.grad is not None:
        directions[setup.layer.bias] = bias_v
    return directions


def _phase(name: str) -> contextlib.AbstractContextManager[Any]:
    """A profiler range named ``name`` for one phase of a step, when a profiler is running
    (``torch.profiler.profile``); otherwise nothing: each range costs two operators
    dispatched, a dozen per layer and step."""
    if autograd_profiler._is_profiler_enabled:
        return autograd_profiler.record_function(name)
    return contextlib.nullcontext()


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every element of every tensor is finite, in one host sync per device.

    A tensor's 2-norm is NaN or inf when an element is, so one ``_foreach_norm`` and a
    max per device and precision decide for all tensors at once. The 2-norm of finite
    values can overflow too (float32 elements above ~1e19): that reads as non-finite here,
    and the caller's per-tensor search then finds nothing to name. (The infinity norm would
    never overflow, but its ``_foreach_norm`` runs 6× slower on a CPU: 634 against 104 µs
    over the digits MLP's gradients and directions.)
    """
    groups: dict[tuple[torch.device, bool], list[Tensor]] = {}
    for tensor in tensors:
        if tensor.numel():
            groups.setdefault((tensor.device, tensor.dtype == torch.float64), []).append(tensor)
    maxima = [
        torch.stack(torch._foreach_norm(group, 2, dtype=None if wide else torch.float32))
        .max()
        .reshape(1)
        for (_, wide), group in groups.items()
    ]
    return all(math.isfinite(row[0]) for row in read_back(maxima))


def _same_layout(buffer: Tensor, like: Tensor) -> bool:
    return (buffer.shape, buffer.dtype, buffer.device) == (like.shape, like.dtype, like.device)


def _validate(
    model: Any,
    optimizer: Any,
    tau_prox: Any,
    solver: Any,
    cg_iters: Any,
    cg_tol: Any,
    solver_form: Any,
    optimizer_kwargs: dict[str, Any],
) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model "
            "itself (not model.parameters()): ProxProp hooks its layers"
        )
    if isinstance(optimizer, ProxPropOptimizer):
        raise ValueError("optimizer is already a ProxPropOptimizer; pass the optimizer it wraps")
    if isinstance(optimizer, Optimizer):
        if optimizer_kwargs:
            raise ValueError(
                f"optimizer is an instance, so keyword arguments {sorted(optimizer_kwargs)} "
                "have nowhere to go; pass the optimizer class (e.g. torch.optim.Adam) instead"
            )
        optimizer_class = type(optimizer)
    elif isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        optimizer_class = optimizer
    else:
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer subclass or instance, got {optimizer!r}; "
            "e.g. ProxPropOptimizer(model, torch.optim.Adam, lr=1e-3)"
        )
    if issubclass(optimizer_class, torch.optim.LBFGS):
        raise ValueError(
            "LBFGS re-evaluates its closure inside step(), which would bypass ProxProp's "
            "direction; use a first-order optimizer such as SGD or Adam"
        )
    if (
        isinstance(tau_prox, bool)
        or not isinstance(tau_prox, (int, float))
        or not (math.isfinite(tau_prox) and tau_prox > 0)
    ):
        raise ValueError(
            f"tau_prox must be a finite number > 0 (e.g. 0.05 or 1.0), got {tau_prox!r}"
        )
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; pass one of {SOLVERS}")
    if isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 1:
        raise ValueError(f"cg_iters must be an integer >= 1 (e.g. 3), got {cg_iters!r}")
    if cg_tol is not None and (
        isinstance(cg_tol, bool)
        or not isinstance(cg_tol, (int, float))
        or not (math.isfinite(cg_tol) and cg_tol >= 0)
    ):
        raise ValueError(f"cg_tol must be None or a finite number >= 0 (e.g. 1e-3), got {cg_tol!r}")
    if solver_form not in SOLVER_FORMS:
        raise ValueError(f"unknown solver_form {solver_form!r}; pass one of {SOLVER_FORMS}")
    if solver == "exact" and solver_form == "matrix_free":
        raise ValueError(
            "solver='exact' needs the primal Gram; use solver_form='auto' or 'primal', or "
            "solver='cg' with cg_tol for an iterative solve"
        )
