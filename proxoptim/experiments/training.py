"""One training loop for every experiment: any model × {backprop, cgK, exact} × {Nesterov, Adam}.

Per epoch it records the full-batch training loss, validation and test accuracy and the
cumulative training wall time (evaluation excluded); per step, the step time. A non-finite
loss marks the run as diverged and ends it, instead of crashing the comparison.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.data import Splits

OPTIMIZERS = ("nesterov", "adam")


@dataclass(frozen=True)
class Method:
    """A way to compute the update direction: ``backprop``, ``cg<k>`` or ``exact``;
    ``-graphs`` replays their solves as CUDA graphs (``cuda_graphs=True``), ``-bw`` solves
    in backward where a layer's plan allows (``solve_in_backward=True``), e.g. ``exact-bw``
    or ``cg3-graphs-bw``."""

    name: str
    solver: str
    cg_iters: int = 3
    cuda_graphs: bool = False
    solve_in_backward: bool = False

    @property
    def is_backprop(self) -> bool:
        return self.solver == "none"

    @classmethod
    def parse(cls, name: str) -> Method:
        name = name.strip().lower()
        if name in ("backprop", "bp"):
            return cls("backprop", "none")
        match = re.fullmatch(r"(exact|cg(\d+))(-graphs)?(-bw)?", name)
        if match and (match.group(2) is None or int(match.group(2)) >= 1):
            solver = "exact" if match.group(2) is None else "cg"
            cg_iters = 3 if match.group(2) is None else int(match.group(2))
            return cls(
                name, solver, cg_iters, match.group(3) is not None, match.group(4) is not None
            )
        raise ValueError(
            f"unknown method {name!r}; use backprop, exact, cg<k> such as cg3, either with "
            "-graphs (cuda_graphs=True) and/or -bw (solve_in_backward=True), e.g. exact-bw"
        )


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_accuracy: float
    test_accuracy: float
    seconds: float


@dataclass
class RunResult:
    """Everything one training run measured."""

    method: str
    optimizer: str
    lr: float
    tau_prox: float | None
    epochs: list[EpochRecord] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    diverged: bool = False
    diverged_at_epoch: int | None = None

    @property
    def final_train_loss(self) -> float:
        return math.nan if self.diverged or not self.epochs else self.epochs[-1].train_loss

    @property
    def best_val_accuracy(self) -> float:
        return max((e.val_accuracy for e in self.epochs), default=math.nan)

    @property
    def test_at_best_val(self) -> float:
        if not self.epochs:
            return math.nan
        return max(self.epochs, key=lambda e: e.val_accuracy).test_accuracy

    @property
    def median_step_seconds(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else math.nan

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(
            final_train_loss=self.final_train_loss,
            best_val_accuracy=self.best_val_accuracy,
            test_at_best_val=self.test_at_best_val,
            median_step_seconds=self.median_step_seconds,
        )
        return _finite_or_none(record)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(item) for item in value]
    return value


def make_optimizer(
    model: nn.Module,
    method: Method,
    optimizer: str,
    lr: float,
    tau_prox: float,
    momentum: float = 0.95,
) -> torch.optim.Optimizer:
    """The inner optimizer (Nesterov SGD or Adam), wrapped in ProxProp unless backprop."""
    if optimizer == "nesterov":
        inner_class, kwargs = torch.optim.SGD, {"lr": lr, "momentum": momentum, "nesterov": True}
    elif optimizer == "adam":
        inner_class, kwargs = torch.optim.Adam, {"lr": lr}
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if method.is_backprop:
        return inner_class(model.parameters(), **kwargs)
    return ProxPropOptimizer(
        model,
        inner_class,
        tau_prox=tau_prox,
        solver=method.solver,
        cg_iters=method.cg_iters,
        cuda_graphs=method.cuda_graphs,
        solve_in_backward=method.solve_in_backward,
        **kwargs,
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the whole set, in chunks."""
    if len(x) == 0:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    model.train(was_training)
    return total_loss / len(x), correct / len(x)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model_factory: Callable[[], nn.Module],
    splits: Splits,
    method: Method,
    *,
    optimizer: str,
    lr: float,
    tau_prox: float,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    momentum: float = 0.95,
    device: str | torch.device = "cpu",
    progress: bool = True,
    description: str | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    optimizer_factory: Callable[[nn.Module], Any] | None = None,
) -> RunResult:
    """Trains a fresh model (seeded) and records the per-epoch metrics.

    Args:
        model_factory: builds the model; called after seeding, so every method starts from
            the same weights.
        splits: the data, already on any device (moved to ``device`` here).
        method: backprop, cgK or exact.
        optimizer: "nesterov" (SGD with Nesterov momentum ``momentum``) or "adam".
        lr: the inner optimizer's learning rate.
        tau_prox: τθ for ProxProp (ignored for backprop).
        epochs: passes over the training set; epoch 0 in the record is the initial model.
        batch_size: minibatch size; the order is seeded and identical across methods.
        checkpoint: a file written after every epoch (model, optimizer state, the batch
            order's and torch's random states, the record so far; atomically).
        resume: continue from ``checkpoint`` where it exists: the resumed run's record
            equals an uninterrupted one's (step times aside); a finished run just returns.
        optimizer_factory: builds the optimizer from the model instead of
            ``make_optimizer`` (a benchmark training a variant kept outside the library); it
            needs ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict``.
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = model_factory().to(device)
    if optimizer_factory is None:
        opt = make_optimizer(model, method, optimizer, lr, tau_prox, momentum)
    else:
        opt = optimizer_factory(model)
    train_x, train_y = splits.train_x.to(device), splits.train_y.to(device)
    val_x, val_y = splits.val_x.to(device), splits.val_y.to(device)
    test_x, test_y = splits.test_x.to(device), splits.test_y.to(device)
    result = RunResult(method.name, optimizer, lr, None if method.is_backprop else tau_prox)
    generator = torch.Generator().manual_seed(seed)
    elapsed = 0.0
    first_epoch = 1
    if resume and checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        result, elapsed = saved["result"], saved["elapsed"]
        if saved["finished"]:
            if isinstance(opt, ProxPropOptimizer):
                opt.remove_hooks()
            return result
        first_epoch = result.epochs[-1].epoch + 1

    def save(finished: bool) -> None:
        if checkpoint is None:
            return
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "result": result,
            "elapsed": elapsed,
            "finished": finished,
        }
        partial = checkpoint.with_name(checkpoint.name + ".partial")
        torch.save(state, partial)
        partial.replace(checkpoint)  # (a run killed mid-write keeps the last whole one)

    def record(epoch: int) -> bool:
        train_loss, _ = evaluate(model, train_x, train_y)
        _, val_accuracy = evaluate(model, val_x, val_y)
        _, test_accuracy = evaluate(model, test_x, test_y)
        result.epochs.append(EpochRecord(epoch, train_loss, val_accuracy, test_accuracy, elapsed))
        return math.isfinite(train_loss)

    if first_epoch == 1:
        record(0)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    bar = _progress_bar(
        (epochs - first_epoch + 1) * steps_per_epoch, description or method.name, progress
    )
    try:
        for epoch in range(first_epoch, epochs + 1):
            order = torch.randperm(len(train_x), generator=generator).to(device)
            for start in range(0, len(train_x), batch_size):
                index = order[start : start + batch_size]
                _synchronize(device)
                began = time.perf_counter()
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(train_x[index]), train_y[index])
                loss.backward()
                finite = math.isfinite(loss.item())
                if finite:
                    try:
                        opt.step()
                    except FloatingPointError:  # ProxProp refused a non-finite step
                        finite = False
                _synchronize(device)
                step_time = time.perf_counter() - began
                if not finite:
                    result.diverged, result.diverged_at_epoch = True, epoch
                    save(finished=True)
                    return result
                result.step_seconds.append(step_time)
                elapsed += step_time
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if not record(epoch):
                result.diverged, result.diverged_at_epoch = True, epoch
                save(finished=True)
                return result
            save(finished=epoch == epochs)
            if bar is not None:
                last = result.epochs[-1]
                bar.set_postfix(loss=f"{last.train_loss:.3f}", val=f"{last.val_accuracy:.3f}")
    finally:
        if bar is not None:
            bar.close()
        if isinstance(opt, ProxPropOptimizer):
            opt.remove_hooks()
    return result


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="step", leave=True, dynamic_ncols=True)
