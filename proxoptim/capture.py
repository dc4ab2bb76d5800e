"""Which calls of which layers fed the loss: forward hooks that keep each layer's input.

A forward hook on every tracked module looks at each call. When grad mode is on and the
layer's weight requires grad, it attaches a gradient hook to the call's output; the input
is then referenced only by that hook (and by the autograd graph, which keeps it anyway for
the weight gradient). Only when backward reaches the output does the call count
(*confirmed*) and its input move into the capture (DESIGN.md §3). Consequences:

* forwards that never meet ``backward`` (metrics computed with grad on, abandoned graphs,
  the recomputation inside activation checkpointing) cost nothing and never enter M, and
  nothing accumulates however many of them run;
* a module called several times (shared weights, micro-batches) contributes every
  confirmed call, each once, even if backward runs over the same graph twice;
* a gradient hook registered before an in-place op on the output (``ReLU(inplace=True)``)
  still fires with the gradient of the layer's own output.

Each confirmed call also records the order in which backward reached it: the output layer
is the first (its output gradient is the first backward computes). Forward order would
mislead under reentrant activation checkpointing, whose recomputation runs the
checkpointed layers again, during backward, after the head.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class CapturedCall:
    """A confirmed call: its forward-order number, the module that ran, its input (None
    for layers tracked only for their order) and, where asked for, the gradient its output
    received (δ, shaped like the output); ``confirmation`` numbers the calls in the order
    backward reached them; ``output_shape`` is the output's shape (what δ's would be)."""

    sequence: int
    module: nn.Module
    input: Tensor | None
    output_grad: Tensor | None = None
    confirmation: int = 0
    output_shape: tuple[int, ...] = ()


class Capture:
    """Forward hooks on a set of modules, each module mapped to a layer key.

    Args:
        modules: ``(key, module, keep_input, keep_output_grad)``. Several modules may share
            a key (tied weights); ``keep_input=False`` records only the forward order;
            ``keep_output_grad`` also keeps δ, the gradient of the call's output.
    """

    def __init__(self, modules: Iterable[tuple[Any, nn.Module, bool, bool]]) -> None:
        self._calls: dict[Any, list[CapturedCall]] = {}
        self._sequence = itertools.count()
        self._confirmations = itertools.count()
        self._handles: list[RemovableHandle] = []
        self_ref = weakref.ref(self)
        for key, module, keep_input, keep_output_grad in modules:
            hook = _make_forward_hook(self_ref, key, keep_input, keep_input and keep_output_grad)
            self._handles.append(module.register_forward_hook(hook))
        # The hooks hold only a weak reference to this object; once it is gone, remove them
        # so that a discarded optimizer leaves the model exactly as it found it.
        self._finalizer = weakref.finalize(self, _remove_handles, list(self._handles))

    def calls(self) -> dict[Any, list[CapturedCall]]:
        """The confirmed calls per key since the last :meth:`clear`, in confirmation order."""
        return self._calls

    def clear(self) -> None:
        self._calls = {}

    def remove(self) -> None:
        """Detaches every hook (idempotent) and drops the captured inputs."""
        self._finalizer()
        self.clear()

    @property
    def attached(self) -> bool:
        return self._finalizer.alive

    def _confirm(self, key: Any, call: CapturedCall) -> None:
        call = dataclasses.replace(call, confirmation=next(self._confirmations))
        self._calls.setdefault(key, []).append(call)

    def _next_sequence(self) -> int:
        return next(self._sequence)


def _remove_handles(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


def _make_forward_hook(
    capture_ref: Callable[[], Capture | None], key: Any, keep_input: bool, keep_output_grad: bool
) -> Callable[..., None]:
    def forward_hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        capture = capture_ref()
        if capture is None or not torch.is_grad_enabled():
            return
        weight = module._parameters.get("weight")
        if weight is None or not weight.requires_grad:
            return
        if not isinstance(output, Tensor) or not output.requires_grad or not args:
            return
        sequence = capture._next_sequence()
        layer_input = args[0] if keep_input else None
        output.register_hook(
            _make_confirm_hook(
                capture_ref, key, sequence, module, layer_input, keep_output_grad, output.shape
            )
        )

    return forward_hook


def _make_confirm_hook(
    capture_ref: Callable[[], Capture | None],
    key: Any,
    sequence: int,
    module: nn.Module,
    layer_input: Tensor | None,
    keep_output_grad: bool,
    output_shape: torch.Size,
) -> Callable[[Tensor], None]:
    confirmed = False

    def confirm(grad: Tensor) -> None:
        nonlocal confirmed
        capture = capture_ref()
        if confirmed or capture is None:
            return
        confirmed = True
        output_grad = grad if keep_output_grad else None
        capture._confirm(
            key,
            CapturedCall(
                sequence, module, layer_input, output_grad, output_shape=tuple(output_shape)
            ),
        )

    return confirm
