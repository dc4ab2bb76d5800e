"""How loss and step time move with the number of CG iterations k.

Trains the same network from the same initialisation with backprop, cg<k> for each k and
the exact solve, and prints final full-batch training loss, best validation accuracy and
the median step time relative to backprop (all in this process).

    python benchmarks/cg_iterations.py                                  # digits, seconds
    python benchmarks/cg_iterations.py --dataset cifar10 --data-dir DATA_DIR \\
        --train-subset 5000 --epochs 5 --width 1 --batch-size 500
"""

from __future__ import annotations

import argparse
import json
import math

from proxoptim.experiments.data import load_dataset
from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.experiments.training import Method, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("digits", "cifar10"), default="digits")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--model", default="mlp")
    parser.add_argument("--width", type=float, default=0.1)
    parser.add_argument("--iterations", default="1,2,3,5,10,20")
    parser.add_argument("--optimizer", choices=("nesterov", "adam"), default="nesterov")
    parser.add_argument("--lr-backprop", type=float, default=0.05)
    parser.add_argument("--lr-proxprop", type=float, default=1.0)
    parser.add_argument("--tau-prox", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write every run here")
    args = parser.parse_args()
    print(provenance_comment())

    splits = load_dataset(args.dataset, data_dir=args.data_dir)
    if args.train_subset:
        splits = splits.subset(train=args.train_subset)
    methods = ["backprop", *(f"cg{k}" for k in args.iterations.split(",")), "exact"]

    def factory():
        return build_model(args.model, splits.input_shape, splits.num_classes, args.width)

    runs = []
    for name in methods:
        lr = args.lr_backprop if name == "backprop" else args.lr_proxprop
        runs.append(
            train(
                factory,
                splits,
                Method.parse(name),
                optimizer=args.optimizer,
                lr=lr,
                tau_prox=args.tau_prox,
                epochs=args.epochs,
                batch_size=args.batch_size,
                device=args.device,
                progress=False,
            )
        )
    baseline = runs[0].median_step_seconds
    print(
        f"{args.model} (width {args.width:g}) on {splits.name}, {len(splits.train_x)} training "
        f"images, {args.epochs} epochs, batch {args.batch_size}, {args.optimizer}, "
        f"τθ={args.tau_prox:g}, lr backprop {args.lr_backprop:g} / ProxProp {args.lr_proxprop:g}"
    )
    print("| method | final train loss | best val acc | step [ms] | step / backprop |")
    print("|---|---|---|---|---|")
    for run in runs:
        loss = "–" if not math.isfinite(run.final_train_loss) else f"{run.final_train_loss:.4g}"
        print(
            f"| {run.method} | {loss} | {100 * run.best_val_accuracy:.2f}% "
            f"| {1000 * run.median_step_seconds:.2f} | {run.median_step_seconds / baseline:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([run.to_json() for run in runs], handle, indent=2)


if __name__ == "__main__":
    main()
