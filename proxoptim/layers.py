"""Which modules of a model ProxProp preconditions: discovery, exclusion and ownership."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from proxoptim.capture import Capture
from proxoptim.operators import LayerKind, kind_for


@dataclass
class Layer:
    """One preconditioned parameter pair (W, b); several modules may share it."""

    name: str
    kind: LayerKind
    modules: list[nn.Module]
    excluded: bool

    @property
    def weight(self) -> nn.Parameter:
        return self.modules[0].weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.modules[0].bias


# Modules currently tracked by a live ProxPropOptimizer (weakly, both ways), so that a second
# one on the same model fails loudly instead of capturing every input twice.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Capture]] = weakref.WeakKeyDictionary()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile (names then
    match the user's model, and the wrappers' own hooks are left alone)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def resolve_exclusions(model: nn.Module, exclude: Iterable[str | nn.Module]) -> set[nn.Module]:
    """Every module covered by ``exclude`` (names cover the named module and its children)."""
    if isinstance(exclude, (str, nn.Module)):
        exclude = [exclude]
    named = dict(model.named_modules())
    in_model = {id(module) for module in named.values()}
    excluded: set[nn.Module] = set()
    for item in exclude:
        if isinstance(item, nn.Module):
            matches = [m for m in item.modules() if id(m) in in_model]
            if not matches:
                raise ValueError(
                    f"exclude: module {type(item).__name__} is not part of the model; pass a "
                    "submodule of the model or its name from model.named_modules()"
                )
        elif isinstance(item, str):
            if item not in named:
                close = [name for name in named if name and (item in name or name in item)]
                hint = f" (did you mean one of {close[:5]}?)" if close else ""
                raise ValueError(
                    f"exclude: no module named {item!r} in the model{hint}; pass names as "
                    "listed by model.named_modules(), or the module objects themselves"
                )
            matches = list(named[item].modules())
        else:
            raise ValueError(
                f"exclude takes module names or nn.Module objects, got {type(item).__name__}"
            )
        excluded.update(matches)
    return excluded


def find_layers(model: nn.Module, excluded: set[nn.Module]) -> list[Layer]:
    """The supported layers of ``model`` in registration order, tied weights merged."""
    layers: list[Layer] = []
    by_weight: dict[int, Layer] = {}
    for name, module in model.named_modules():
        kind = kind_for(module)
        if kind is None:
            continue
        layer = by_weight.get(id(module.weight))
        if layer is None:
            layer = Layer(name, kind, [module], module in excluded)
            by_weight[id(module.weight)] = layer
            layers.append(layer)
            continue
        first = layer.modules[0]
        if type(module) is not type(first) or module.bias is not first.bias:
            warnings.warn(
                f"ProxProp: {name!r} shares its weight with {layer.name!r} but not its kind or "
                "bias; both get the plain gradient",
                stacklevel=3,
            )
            layer.excluded = True
        layer.modules.append(module)
        layer.excluded = layer.excluded or module in excluded
    return layers


def claim(layers: list[Layer]) -> None:
    for layer in layers:
        for module in layer.modules:
            owner = _OWNERS.get(module)
            capture = owner() if owner is not None else None
            if capture is not None and capture.attached:
                raise ValueError(
                    f"layer {layer.name!r} is already tracked by another ProxPropOptimizer; "
                    "call remove_hooks() on that one first (two would capture every input twice)"
                )


def adopt(layers: list[Layer], capture: Capture) -> None:
    """Marks the layers' modules as tracked by ``capture``."""
    for layer in layers:
        for module in layer.modules:
            _OWNERS[module] = weakref.ref(capture)


def release(layers: list[Layer], capture: Capture) -> None:
    """Lets go of the modules ``capture`` tracked (other optimizers may then track them)."""
    for layer in layers:
        for module in layer.modules:
            owner = _OWNERS.get(module)
            if owner is not None and owner() is capture:
                del _OWNERS[module]
