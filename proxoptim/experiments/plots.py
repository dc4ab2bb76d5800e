"""Figures: the paper's Figure 2/3 layout for comparisons, and the Table 1 sweep picture."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class SweepGrid:
    """A sweep's results: one cell per (method, τθ, lr) run; backprop's cells have τθ None
    and stand for every τθ (τθ does not reach plain backprop)."""

    methods: Sequence[str]
    lrs: Sequence[float]
    taus: Sequence[float]
    cells: Sequence[dict[str, Any]]

    def value(self, metric: str, method: str, tau: float, lr: float) -> float | None:
        """The metric of one run; None for a diverged run (its loss is not finite)."""
        for cell in self.cells:
            if cell["method"] == method and cell["lr"] == lr and cell["tau_prox"] in (None, tau):
                loss = cell["final_train_loss"]
                if loss is None or not math.isfinite(loss):
                    return None
                return cell[metric]
        raise KeyError((method, tau, lr))

    def row(self, metric: str, method: str, tau: float) -> list[float | None]:
        return [self.value(metric, method, tau, lr) for lr in self.lrs]

    def table(self, metric: str, cell_text: Callable[[float], str]) -> str:
        """Markdown: one row per method (and τθ, for a grid), one column per lr."""
        grid = len(self.taus) > 1
        header = "| method |" + (" τθ |" if grid else "")
        header += " " + " | ".join(f"{lr:g}" for lr in self.lrs) + " |"
        lines = [header, "|---" * (len(self.lrs) + 1 + grid) + "|"]
        for method in self.methods:
            taus = self.taus[:1] if method == "backprop" else self.taus
            for tau in taus:
                values = self.row(metric, method, tau)
                text = " | ".join("–" if v is None else cell_text(v) for v in values)
                prefix = f"| {method} |" + (
                    (" – |" if method == "backprop" else f" {tau:g} |") if grid else ""
                )
                lines.append(f"{prefix} {text} |")
        return "\n".join(lines)


def plot_heatmaps(grid: SweepGrid, path: str | Path, title: str = "") -> Path:
    """Per ProxProp method, the final training loss (top, log colour scale) and the best
    validation accuracy (bottom) over the τθ × lr grid; diverged cells are crossed out.
    Backprop's best cell is named in the title, for reference."""
    import numpy as np
    from matplotlib import colormaps, patheffects
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    proxprop = [m for m in grid.methods if m != "backprop"]
    panel_width = 0.75 * len(grid.lrs) + 2
    figure, axes = plt.subplots(
        2,
        len(proxprop),
        figsize=(panel_width * len(proxprop), 1.1 * len(grid.taus) + 4.5),
        squeeze=False,
    )
    losses = [
        v
        for m in proxprop
        for t in grid.taus
        for v in grid.row("final_train_loss", m, t)
        if v is not None and v > 0
    ]
    # The colour scale spans four decades from the best loss: a few huge finite losses
    # would otherwise flatten every other cell into one colour (those saturate; every
    # cell's number is printed).
    norm = LogNorm(min(losses), min(max(losses), 1e4 * min(losses))) if losses else None
    panels = (("final_train_loss", "final training loss", norm, "viridis_r"),)
    panels += (("best_val_accuracy", "best validation accuracy [%]", None, "viridis"),)
    for column, method in enumerate(proxprop):
        for row, (metric, label, scale, colours) in enumerate(panels):
            axis = axes[row][column]
            values = np.array(
                [
                    [
                        np.nan if v is None else v * (100 if row else 1)
                        for v in grid.row(metric, method, t)
                    ]
                    for t in grid.taus
                ],
                dtype=float,
            )
            palette = colormaps[colours].with_extremes(bad="lightgrey")  # diverged
            image = axis.imshow(
                np.ma.masked_invalid(values),
                cmap=palette,
                norm=scale,
                vmin=None if scale else 0,
                vmax=None if scale else 100,
                aspect="auto",
            )
            for (i, j), value in np.ndenumerate(values):
                text = "×" if np.isnan(value) else (_short(value) if row == 0 else f"{value:.0f}")
                label_text = axis.text(
                    j, i, text, ha="center", va="center", fontsize=8, color="white"
                )
                label_text.set_path_effects(
                    [patheffects.withStroke(linewidth=2, foreground="black")]
                )
            axis.set_xticks(range(len(grid.lrs)), [f"{lr:g}" for lr in grid.lrs], rotation=45)
            axis.set_yticks(range(len(grid.taus)), [f"{t:g}" for t in grid.taus])
            axis.set(xlabel="learning rate", ylabel="τθ", title=f"{method}: {label}")
            figure.colorbar(image, ax=axis, shrink=0.8)
    if "backprop" in grid.methods:
        results = [
            (grid.value("final_train_loss", "backprop", grid.taus[0], lr), lr) for lr in grid.lrs
        ]
        finite = [(loss, lr) for loss, lr in results if loss is not None]
        if finite:
            loss, lr = min(finite)
            title += f" (backprop's best: loss {loss:.3g} at lr {lr:g})"
    if title:
        figure.suptitle(title)
    return _save(plt, figure, path)


def _short(value: float) -> str:
    """A loss in at most five characters: 0.031, 2.3, 4e-05, 6e+02."""
    if 0.01 <= value < 100:
        return f"{value:.2g}"
    return f"{value:.0e}"


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
