"""τθ and the batch size: the digits grids at batch 25, 100 and 400 against τθ·B.

    python benchmarks/tuning_batch_size.py         # after benchmarks/tuning_sweeps.sh

Under the paper's sum convention M = I/τθ + Σ over the batch, so M = (1/τθ)(I + τθ·B·C)
with C the batch's mean second moment: with Adam, which ignores a direction's overall
scale, the direction depends on τθ only through τθ·B. This script reads the three
``digits-mlp-adam-batch<B>`` sweeps of ``docs/results/tuning`` and draws each learning
rate's final training loss against τθ (left) and against τθ·B (right): if the rule holds,
the curves of the three batch sizes line up on the right. It writes
``docs/results/tuning/batch-size.png`` and prints, per batch size and lr, the τθ·B of the
best run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from proxoptim.experiments.plots import _pyplot, _save
from proxoptim.experiments.provenance import provenance_comment

ROOT = Path(__file__).resolve().parents[1] / "docs" / "results" / "tuning"
BATCHES = (25, 100, 400)


def main() -> None:
    plt = _pyplot()
    sweeps = {
        b: json.loads((ROOT / f"digits-mlp-adam-batch{b}" / "sweep.json").read_text())
        for b in BATCHES
    }
    lrs = sweeps[BATCHES[0]]["lrs"]
    figure, axes = plt.subplots(len(lrs), 2, figsize=(10, 3.2 * len(lrs)), squeeze=False)
    print(provenance_comment("python benchmarks/tuning_batch_size.py"))
    print("| lr | " + " | ".join(f"best τθ·B at B = {b}" for b in BATCHES) + " |")
    print("|---" * (len(BATCHES) + 1) + "|")
    for row, lr in enumerate(lrs):
        best = []
        for batch, sweep in sweeps.items():
            cells = [
                c for c in sweep["grid"] if c["lr"] == lr and c["final_train_loss"] is not None
            ]
            cells = [c for c in cells if math.isfinite(c["final_train_loss"])]
            taus = [c["tau_prox"] for c in cells]
            losses = [c["final_train_loss"] for c in cells]
            axes[row][0].plot(taus, losses, "-o", label=f"B = {batch}")
            axes[row][1].plot([t * batch for t in taus], losses, "-o", label=f"B = {batch}")
            winner = min(cells, key=lambda c: c["final_train_loss"])
            best.append(f"{winner['tau_prox'] * batch:g}")
        print(f"| {lr:g} | " + " | ".join(best) + " |")
        for column, label in enumerate(("τθ", "τθ · batch size")):
            axis = axes[row][column]
            axis.set(xscale="log", yscale="log", xlabel=label, ylabel="final training loss")
            axis.set_title(f"Adam lr {lr:g}, exact, 20 epochs")
            axis.grid(alpha=0.3)
            axis.legend()
    figure.suptitle("MLP on digits: the same τθ·B gives the same direction (sum convention)")
    _save(plt, figure, ROOT / "batch-size.png")
    print(f"\nwrote {ROOT / 'batch-size.png'}")


if __name__ == "__main__":
    main()
