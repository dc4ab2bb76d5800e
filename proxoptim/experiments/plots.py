"""Figures: the paper's Figure 2/3 layout for comparisons, and the Table 1 sweep picture."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from proxoptim.experiments.training import RunResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: Sequence[RunResult], path: str | Path, title: str = "") -> Path:
    """Full-batch training loss vs epoch and vs seconds, validation accuracy vs epoch.

    Diverged runs are drawn up to their last finite epoch and marked in the legend.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        epochs = [e.epoch for e in run.epochs]
        losses = [e.train_loss for e in run.epochs]
        seconds = [e.seconds for e in run.epochs]
        accuracy = [100 * e.val_accuracy for e in run.epochs]
        label = run.method + (" (diverged)" if run.diverged else "")
        style = "--" if run.method == "backprop" else "-"
        axes[0].plot(epochs, losses, style, label=label)
        axes[1].plot(seconds, losses, style, label=label)
        axes[2].plot(epochs, accuracy, style, label=label)
    axes[0].set(xlabel="epoch", ylabel="full-batch training loss", yscale="log")
    axes[1].set(xlabel="training time [s]", ylabel="full-batch training loss", yscale="log")
    axes[2].set(xlabel="epoch", ylabel="validation accuracy [%]")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    return _save(plt, figure, path)


def plot_sweep(
    methods: Sequence[str],
    lrs: Sequence[float],
    final_loss: dict[str, dict[float, float | None]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Final full-batch loss against learning rate, one line per method (log-log).

    Diverged runs (``None``) are drawn as crosses on the top edge.
    """
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    finite = [v for table in final_loss.values() for v in table.values() if v is not None]
    top = max(finite) * 3 if finite else 10.0
    for method in methods:
        xs = [lr for lr in lrs if final_loss[method].get(lr) is not None]
        ys = [final_loss[method][lr] for lr in xs]
        (line,) = axis.plot(xs, ys, "--o" if method == "backprop" else "-o", label=method)
        diverged = [lr for lr in lrs if final_loss[method].get(lr) is None]
        if diverged:
            axis.plot(diverged, [top] * len(diverged), "x", color=line.get_color(), ms=10)
    axis.set(xscale="log", xlabel="learning rate τ", ylabel="final full-batch training loss")
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(title="× = diverged")
    if title:
        axis.set_title(title)
    return _save(plt, figure, path)


def _save(plt, figure, path: str | Path) -> Path:
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def format_loss(value: float | None) -> str:
    """A table cell: the loss to three significant digits, or an en dash for divergence."""
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:.3g}"
