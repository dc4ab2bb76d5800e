"""ProxPropOptimizer: the torch.optim face of proximal backpropagation."""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from proxoptim.backward_solve import BackwardSolves, gradient_sync
from proxoptim.capture import Capture
from proxoptim.checks import nonfinite_problem
from proxoptim.costs import DeviceCosts
from proxoptim.distributed import (
    SHARDED,
    Communicator,
    agreed_problem,
    average_over_ranks,
    layer_row_shards,
    placement,
    refuse_fsdp1,
)
from proxoptim.graphs import GraphRunner, SolveGraphs
from proxoptim.layers import adopt, claim, find_layers, release, resolve_exclusions, unwrap
from proxoptim.pipeline import SPECULATION_BACKOFF, StepPipeline, profiler_range
from proxoptim.plan import BASES, LayerPlan, SolveOptions
from proxoptim.solvers import FORMS
from proxoptim.stats import LayerStats

SOLVERS = ("cg", "exact", "none")
NONFINITE = ("raise", "skip")
SOLVER_FORMS = ("auto", *FORMS)
PROBES = ("auto", "eager", "never")
DUAL_BASES = ("auto", *BASES)


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
            trajectory, with the non-finite check; no hooks run).
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
        probe: when ``.grad`` is probed for s·δᵀŨᵀ (the gradient backward leaves,
            verified with a random vector, never assumed), which lets the dual form skip
            one product of the layer's size and, for exact solves, avoids cancellation in
            float32. Only layers whose cheapest form with δ known is the dual form are
            probed. ``"auto"``: by the device's cost rule (exact solves always; with
            ``cuda_graphs``, speculatively inside the δ form's graph); ``"eager"``: every
            such layer, before its solve; ``"never"``: the general form always.
        dual_basis: the dual-form CG's basis: ``"auto"`` (the cheaper on the device),
            ``"eigenbasis"`` (one eigendecomposition of the n × n kernel, then O(m·n) per
            iteration) or ``"coefficient"`` (two (m × n)(n × n) products per iteration).
        max_gram_elements: the largest Gram or kernel (all groups together, in elements)
            the cost model may build (default :data:`proxoptim.plan.MAX_GRAM_ELEMENTS`,
            2^26: 256 MiB in float32); larger ones rule their form out.
        device_costs: the cost table forms are priced with (default: the one of each
            layer's device, :func:`proxoptim.costs.device_costs`); e.g. a table measured
            on your own machine.
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
        solve_in_backward: compute the direction during backward, in place of the weight
            gradient, for every layer whose plan solves in the dual form with δ (Linear
            layers with fewer batch rows than fan-in; proxoptim.backward_solve): the
            weight-gradient product is never computed, and after ``backward`` those
            layers' ``.grad`` holds v (``clip_grad_norm_`` then clips v; GradScaler
            unscales it). Other layers, layers with several calls in a step and a layer's
            first step keep the default path; ``last_stats`` tells which is which. Needs
            ``distributed`` None or ``"local"`` (where each rank solves its own batch and
            DDP averages the directions).
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
        probe: str = "auto",
        dual_basis: str = "auto",
        max_gram_elements: int | None = None,
        device_costs: DeviceCosts | None = None,
        cuda_graphs: bool | GraphRunner = False,
        speculation_backoff: int = SPECULATION_BACKOFF,
        distributed: str | None = None,
        process_group: Any = None,
        solve_in_backward: bool = False,
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
        if probe not in PROBES:
            raise ValueError(f"unknown probe policy {probe!r}; pass one of {PROBES}")
        if dual_basis not in DUAL_BASES:
            raise ValueError(f"unknown dual_basis {dual_basis!r}; pass one of {DUAL_BASES}")
        if max_gram_elements is not None and (
            isinstance(max_gram_elements, bool)
            or not isinstance(max_gram_elements, int)
            or max_gram_elements < 1
        ):
            raise ValueError(
                f"max_gram_elements must be None or an integer >= 1 (elements of the "
                f"largest Gram or kernel to build, e.g. 1 << 26), got {max_gram_elements!r}"
            )
        if device_costs is not None and not isinstance(device_costs, DeviceCosts):
            raise ValueError(
                "device_costs must be None or a proxoptim.costs.DeviceCosts (e.g. "
                f"dataclasses.replace(proxoptim.costs.CPU, ...)), got {device_costs!r}"
            )
        if not isinstance(solve_in_backward, bool):
            raise ValueError(f"solve_in_backward must be True or False, got {solve_in_backward!r}")
        self.options = SolveOptions(
            solver=solver,
            cg_iters=int(cg_iters),
            cg_tol=None if cg_tol is None else float(cg_tol),
            tau_prox=float(tau_prox),
            form=solver_form,
            diagnostics=diagnostics,
            probe=probe,
            dual_basis=dual_basis,
            max_gram_elements=max_gram_elements,
            device_costs=device_costs,
        )
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.exclude_last = bool(exclude_last)
        wrapper = model
        refuse_fsdp1(model)
        model = unwrap(model)
        self._layers = find_layers(model, resolve_exclusions(model, exclude))
        self.distributed, process_group = placement(
            distributed,
            process_group,
            [
                param
                for layer in self._layers
                if not layer.excluded
                for param in (layer.weight, layer.bias)
                if param is not None
            ],
        )
        row_shards = None
        if self.distributed == SHARDED:
            if solve_in_backward or cuda_graphs is not False:
                raise ValueError(
                    "solve_in_backward and cuda_graphs are not supported on fully_shard-ed "
                    "(FSDP2) models; leave them at their defaults"
                )
            row_shards = layer_row_shards(self._layers)
        if solve_in_backward and solver == "none":
            raise ValueError(
                "solve_in_backward=True has nothing to solve with solver='none'; pass "
                "solver='exact' or 'cg'"
            )
        if solve_in_backward and self.distributed == "global":
            raise ValueError(
                "solve_in_backward=True solves each rank's own batch during backward, which "
                "distributed='global' (the single-process direction over all ranks' "
                "batches) cannot; pass distributed='local', or solve_in_backward=False"
            )
        self._communicator = Communicator(process_group) if self.distributed else None
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
        # Replays of each layer's fixed-work solve (proxoptim.graphs).
        graphs = None
        if cuda_graphs is not False:
            graphs = SolveGraphs(None if cuda_graphs is True else cuda_graphs)
        self._pipeline = StepPipeline(
            self._layers,
            self.options,
            self._communicator,
            self.distributed,
            graphs,
            speculation_backoff,
            row_shards,
        )
        # solver="none" takes the plain gradient: nothing captured would ever be read, so
        # no hooks run (the layers are still claimed: a second optimizer is still refused).
        self._capture = Capture(
            (index, module, not layer.excluded, layer.kind.uses_output_grad)
            for index, layer in enumerate(self._layers)
            for module in layer.modules
            if solver != "none"
        )
        adopt(self._layers, self._capture)
        self._backward = None
        if solve_in_backward:
            self._backward = BackwardSolves(
                self._layers,
                self._pipeline,
                self.options,
                self._capture,
                self.exclude_last,
                gradient_sync(wrapper),
                self._communicator if self.distributed == "local" else None,
            )

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

    # The solve settings, fixed at construction (every plan was made under them).
    @property
    def tau_prox(self) -> float:
        return self.options.tau_prox

    @property
    def solver(self) -> str:
        return self.options.solver

    @property
    def cg_iters(self) -> int:
        return self.options.cg_iters

    @property
    def cg_tol(self) -> float | None:
        return self.options.cg_tol

    @property
    def solver_form(self) -> str:
        return self.options.form

    @property
    def diagnostics(self) -> bool:
        return self.options.diagnostics

    @property
    def solve_in_backward(self) -> bool:
        return self._backward is not None

    @property
    def tapped_layers(self) -> list[str]:
        """Names of the layers whose next calls are solved in backward
        (``solve_in_backward=True``; decided after each step from the plans)."""
        if self._backward is None:
            return []
        return [self._layers[index].name for index in sorted(self._backward.tapped)]

    @property
    def speculation_countdown(self) -> dict[str, int]:
        """{layer name: steps left} for layers whose speculative δ probe failed and that
        run the general form until their count reaches 0 (``cuda_graphs`` only); a copy."""
        return {name: steps for name, steps in self._pipeline.backoff.items() if steps > 0}

    @property
    def captured_graphs(self) -> int:
        """How many layer solves are replayed as CUDA graphs (``cuda_graphs=True``)."""
        graphs = self._pipeline.graphs
        return 0 if graphs is None else len(graphs)

    @property
    def plans(self) -> dict[str, LayerPlan]:
        """{layer name: its most recently used plan} (proxoptim.plan): the form, probe
        and graph decisions each layer's steps follow; a copy."""
        plans = {}
        for index, layer in enumerate(self._layers):
            plan = self._pipeline.plans.latest(index)
            if plan is not None:
                plans[layer.name] = plan
        return plans

    @property
    def plans_cached(self) -> int:
        """How many plans are kept (at most ``proxoptim.plan.PLANS_PER_LAYER`` per layer)."""
        return len(self._pipeline.plans)

    @property
    def plans_made(self) -> int:
        """How many plans the cost model has made (once per new layer signature)."""
        return self._pipeline.plans.made

    @property
    def captured_calls(self) -> int:
        """Confirmed forward calls captured since the last step or ``zero_grad``."""
        return sum(len(calls) for calls in self._capture.calls().values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zeroes the gradients (through the inner optimizer) and drops captured inputs."""
        self.inner.zero_grad(set_to_none=set_to_none)
        self._clear_captures()

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
        if self._backward is not None:
            self._backward.remove()
        release(self._layers, self._capture)
        self._pipeline.clear()

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
        stepped = [p for group in self.inner.param_groups for p in group["params"]]
        if self.solver != "none":
            output_layer = self._output_layer(calls)
            # The outcomes stay until the step succeeds (a step that raises can be retried);
            # no reference outlives the run, so that the inputs and δ they keep are freed
            # with the captures, before the inner step's temporaries.
            if self._backward is not None:
                self._backward.check_agreement()
            result = self._pipeline.run(
                calls,
                set(stepped),
                output_layer,
                None if self._backward is None else dict(self._backward.outcomes),
            )
            directions, stats = result.directions, result.stats
            if self._backward is not None:
                self._backward.plan_taps(calls, output_layer)
            if self.distributed == "local" and directions:
                average_over_ranks(list(directions.values()), self._communicator)
        with profiler_range("ProxProp.nonfinite_check"):
            problem = nonfinite_problem(
                self._layers,
                [param for param in stepped if param.grad is not None],
                directions,
                calls,
                self._parameter_names,
                self.tau_prox,
            )
        if self.distributed == SHARDED:
            # Each rank checked its own shards: all must raise or skip alike.
            problem = agreed_problem(problem, self._communicator)
        if problem is not None:
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    f"ProxProp: {problem}; parameters, gradients and optimizer state are "
                    "unchanged (pass nonfinite='skip' to skip such steps instead)"
                )
            warnings.warn(f"ProxProp: {problem}; step skipped", stacklevel=2)
            self.skipped_steps += 1
            self.last_stats = {}
            self._clear_captures()
            return loss

        # The captured inputs and output gradients have served: release them before the
        # inner step, whose temporaries make a training step's memory peak (backprop would
        # have freed the inputs at the end of backward).
        self._clear_captures()
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

    def _clear_captures(self) -> None:
        self._capture.clear()
        if self._backward is not None:
            self._backward.clear()

    def _output_layer(self, calls: dict[int, list[Any]]) -> int | None:
        """The index of the layer that keeps its plain gradient as the output layer (the
        one backward reached first: it ran last in the forward pass), or None."""
        if not self.exclude_last or not calls:
            return None
        return min(calls, key=lambda key: min(call.confirmation for call in calls[key]))


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
