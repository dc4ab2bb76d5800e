"""Table 1's large step sizes trained with the authors' published CG (issue 16).

Our Table 1 (docs/results.md) agrees with the paper's but for one column: at τ = 50 our
cg3 and cg5 diverge, the paper's stay finite (losses 95 and 67). ``reference_cg_eps.py``
found why that might be: the published CG (github.com/tfrerix/proxprop, ``ProxProp.py``,
``conjugate_gradient_block``) adds eps = 1e-6 to α's and β's denominators and stops
early, which shortens the paper MLP's cg3-cg10 directions 3-25× at initialisation. This
script tests the explanation by training: the cells of ``proxoptim sweep --preset table1``
at the size of docs/results' Table 1 (5,000 images, 6 epochs), the same seeds, batches,
network and Nesterov SGD, with each Linear layer but the last preconditioned by the
published recurrences instead of the library's textbook CG. The direction is solved in
float64, exactly in the Gram's eigenbasis (``DualRowSystems``: from the 500×500 kernel).

A control cell trains the same harness with eps = 0 and no early stop (textbook CG): it
must retrace the library's own cell of the sweep given with ``--textbook`` (same loss up to
float32 rounding), or the harness, not the eps, would be what differs. The table prints
the library's textbook cells, read from that sweep.json, beside the reference ones.

Usage:
    python benchmarks/reference_cg_table1.py DATA_DIR [--lrs 50,10,5,1] [--methods cg1,cg3,cg5]
        [--textbook docs/results/cifar-table1-5000/sweep.json] [--control cg3 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from reference_cg_eps import (
    REFERENCE_EPS,
    REFERENCE_TOL,
    DualRowSystems,
    diagonal_cg,
    patches_of,
    row_gradient,
)
from torch import Tensor, nn

from proxoptim.experiments.data import load_dataset
from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.experiments.training import Method, RunResult, train

ROOT = Path(__file__).resolve().parent.parent
TABLE1 = ROOT / "docs/results/cifar-table1-5000/sweep.json"


class ReferenceProxProp:
    """Nesterov SGD on ProxProp directions from the published CG: every nn.Linear but the
    last (which keeps its gradient, as in both codes) gets v = K iterations of
    ``diagonal_cg(eps, tol)`` on (I/τθ + ŨᵀŨ) v = g from v = 0, Ũ its input summed over
    the batch as in the library. ``eps=0, tol=None`` is textbook CG, the library's ``cgK``.

    What ``train`` needs of an optimizer, and no more: the model is thrown away after a run,
    so the hooks are never removed.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        tau_prox: float,
        cg_iters: int,
        eps: float,
        tol: float | None,
        momentum: float = 0.95,
    ) -> None:
        self.inner = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True)
        self.tau_prox, self.cg_iters, self.eps, self.tol = tau_prox, cg_iters, eps, tol
        self.inputs: dict[nn.Linear, Tensor] = {}
        linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
        for module in linears[:-1]:
            module.register_forward_hook(self._keep_input)

    def _keep_input(self, module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> None:
        if torch.is_grad_enabled():  # training forward passes, not evaluation
            self.inputs[module] = args[0].detach()

    def direction(self, module: nn.Linear, inputs: Tensor) -> Tensor:
        """v, (out, in + 1): weight and bias of each output unit, one row each."""
        rows = DualRowSystems(patches_of(module, inputs), row_gradient(module))
        solution = diagonal_cg(rows, self.tau_prox, self.cg_iters, self.eps, self.tol)
        return rows.direction(solution)

    def zero_grad(self) -> None:
        self.inner.zero_grad()

    def step(self) -> None:
        originals = {}
        for module, inputs in self.inputs.items():
            direction = self.direction(module, inputs)
            originals[module] = (module.weight.grad, module.bias.grad)
            module.weight.grad = direction[:, :-1].to(module.weight.dtype).contiguous()
            module.bias.grad = direction[:, -1].to(module.bias.dtype).contiguous()
        self.inputs.clear()
        try:
            self.inner.step()
        finally:
            for module, (weight, bias) in originals.items():
                module.weight.grad, module.bias.grad = weight, bias

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def train_cell(splits, config: dict, method: str, lr: float, eps: float, tol: float | None):
    """One Table 1 cell as ``proxoptim sweep`` trains it, but with ``ReferenceProxProp``."""
    parsed = Method.parse(method)

    def factory() -> nn.Module:
        return build_model(config["model"], splits.input_shape, splits.num_classes, config["width"])

    return train(
        factory,
        splits,
        parsed,
        optimizer="nesterov",
        lr=lr,
        tau_prox=config["tau_prox"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        momentum=config["momentum"],
        progress=False,
        optimizer_factory=lambda model: ReferenceProxProp(
            model, lr, config["tau_prox"], parsed.cg_iters, eps, tol, config["momentum"]
        ),
    )


def loss_cell(result: RunResult | float | None) -> str:
    loss = result.final_train_loss if isinstance(result, RunResult) else result
    return "–" if loss is None or not math.isfinite(loss) else f"{loss:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--lrs", default="50,10,5,1")
    parser.add_argument("--methods", default="cg1,cg3,cg5")
    parser.add_argument("--textbook", type=Path, default=TABLE1, help="the library's sweep.json")
    parser.add_argument("--control", nargs=2, default=["cg3", "1"], metavar=("METHOD", "LR"))
    args = parser.parse_args()
    sweep = json.loads(args.textbook.read_text())
    config = sweep["config"]
    lrs = [float(value) for value in args.lrs.split(",")]
    methods = args.methods.split(",")
    splits = load_dataset("cifar10", data_dir=args.data_dir, seed=config["seed"], progress=False)
    if config.get("train_subset"):
        splits = splits.subset(train=config["train_subset"])
    print(provenance_comment())
    print(
        f"Table 1 cells (final full-batch training loss, – diverged), {len(splits.train_x)} "
        f"images, {config['epochs']} epochs, τθ = {config['tau_prox']:g}, batch "
        f"{config['batch_size']}; textbook: {args.textbook} (commit "
        f"{sweep['commit'][:7]}); reference: eps {REFERENCE_EPS:g}, tol {REFERENCE_TOL:g}\n"
    )

    def library_loss(method: str, lr: float) -> float | None:
        return sweep["final_train_loss"][method][sweep["lrs"].index(lr)]

    control_method, control_lr = args.control[0], float(args.control[1])
    began = time.perf_counter()
    control = train_cell(splits, config, control_method, control_lr, 0.0, None)
    library = loss_cell(library_loss(control_method, control_lr))
    print(
        f"control, {control_method} at τ = {control_lr:g}, textbook CG in this harness: loss "
        f"{loss_cell(control)} (the library's cell: {library}); per epoch "
        f"{[round(e.train_loss, 4) for e in control.epochs]}\n"
    )
    print("| method | CG | " + " | ".join(f"{lr:g}" for lr in lrs) + " |")
    print("|---|---|" + "---|" * len(lrs))
    for method in methods:
        textbook = [loss_cell(library_loss(method, lr)) for lr in lrs]
        print(f"| {method} | textbook (library) | " + " | ".join(textbook) + " |")
        reference = [
            loss_cell(train_cell(splits, config, method, lr, REFERENCE_EPS, REFERENCE_TOL))
            for lr in lrs
        ]
        print(f"| {method} | published (eps, tol) | " + " | ".join(reference) + " |", flush=True)
    print(f"\n{time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
