"""``proxoptim compare`` and ``proxoptim sweep``: ProxProp against backprop, on one command.

compare  trains several methods side by side (Figure 2 / 3 of the paper) and writes
         results.json, curves.png and a summary table.
sweep    trains each method at each learning rate (Table 1) and writes table.md,
         sweep.json and sweep.png.

With no arguments both run offline on scikit-learn's digits in about a minute on 2 cores;
``--preset fig2|fig3|table1`` selects the paper's exact settings (CIFAR-10), which
``--epochs``, ``--train-subset`` and ``--width`` shrink for CPU runs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import proxoptim
from proxoptim.experiments.data import DatasetError, Splits, load_dataset
from proxoptim.experiments.models import MODEL_NAMES, build_model
from proxoptim.experiments.plots import format_loss, plot_curves, plot_sweep
from proxoptim.experiments.training import OPTIMIZERS, Method, RunResult, train

# What each command runs with no flags: an offline comparison on digits.
_OFFLINE = {
    "dataset": "digits",
    "data_dir": "data",
    "model": "mlp",
    "width": 0.1,
    "optimizer": "nesterov",
    "momentum": 0.95,
    "batch_size": 100,
    "train_subset": None,
    "seed": 0,
    "device": "cpu",
}
BASE = {
    "compare": {
        **_OFFLINE,
        "methods": "backprop,cg3,cg10,exact",
        "lr_backprop": 0.05,
        "lr_proxprop": 1.0,
        "tau_prox": 0.05,
        "epochs": 50,
    },
    "sweep": {
        **_OFFLINE,
        "methods": "backprop,cg1,cg3,cg5",
        "lrs": "50,10,5,1,0.5,0.1,0.05,5e-3,5e-4",
        "tau_prox": 1.0,
        "epochs": 10,
    },
}

# The paper's protocols (DESIGN.md §7), on CIFAR-10.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "compare": {
        "fig2": {
            "dataset": "cifar10",
            "model": "mlp",
            "width": 1.0,
            "optimizer": "nesterov",
            "momentum": 0.95,
            "methods": "backprop,exact,cg3,cg5,cg10",
            "lr_backprop": 0.05,
            "lr_proxprop": 1.0,
            "tau_prox": 0.05,
            "epochs": 50,
            "batch_size": 500,
        },
        "fig3": {
            "dataset": "cifar10",
            "model": "cnn",
            "width": 1.0,
            "optimizer": "adam",
            "methods": "backprop,cg3,cg10",
            "lr_backprop": 1e-3,
            "lr_proxprop": 1e-3,
            "tau_prox": 1.0,
            "epochs": 50,
            "batch_size": 500,
        },
    },
    "sweep": {
        "table1": {
            "dataset": "cifar10",
            "model": "mlp",
            "width": 1.0,
            "optimizer": "nesterov",
            "momentum": 0.95,
            "methods": "backprop,cg1,cg3,cg5",
            "lrs": "50,10,5,1,0.5,0.1,0.05,5e-3,5e-4",
            "tau_prox": 1.0,
            "epochs": 50,
            "batch_size": 500,
        },
    },
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxoptim",
        description="Train with ProxProp and plain backprop side by side.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{compare,sweep}")
    compare = commands.add_parser(
        "compare",
        help="several methods side by side: results.json, curves.png, a summary table",
        description="Train several methods on one dataset/model (the paper's Fig. 2 / 3).",
    )
    _common_arguments(compare, "compare")
    compare.add_argument("--lr", type=float, help="learning rate for every method")
    compare.add_argument("--lr-backprop", type=float, help="learning rate of backprop")
    compare.add_argument("--lr-proxprop", type=float, help="learning rate of ProxProp methods")

    sweep = commands.add_parser(
        "sweep",
        help="final training loss over learning rates: table.md, sweep.json, sweep.png",
        description="Final full-batch loss of each method at each learning rate (Table 1).",
    )
    _common_arguments(sweep, "sweep")
    sweep.add_argument("--lrs", help="comma-separated learning rates, e.g. 1,0.1,0.01")
    return parser


def _common_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    base = BASE[command]
    presets = sorted(PRESETS[command])
    add = parser.add_argument
    add("--preset", choices=presets, help="the paper's exact settings (CIFAR-10)")
    add("--dataset", choices=("digits", "cifar10"), help=f"default {base['dataset']}")
    add("--data-dir", help="where CIFAR-10 lives (batches, ImageFolder or .tar.gz); default ./data")
    add("--download", action="store_true", default=None, help="fetch CIFAR-10 via torchvision")
    add("--model", choices=MODEL_NAMES, help=f"default {base['model']}")
    add("--width", type=float, help="scale of every hidden size (1 = the paper's)")
    add("--optimizer", choices=OPTIMIZERS, help=f"inner optimizer, default {base['optimizer']}")
    add("--momentum", type=float, help="Nesterov momentum (default 0.95)")
    add("--methods", help=f"comma-separated: backprop, exact, cg<k> (default {base['methods']})")
    add("--tau-prox", type=float, help="τθ of ProxProp")
    add("--epochs", type=int, help="training epochs")
    add("--batch-size", type=int, help="minibatch size")
    add("--train-subset", type=int, help="train on the first N training images only")
    add("--seed", type=int, help="seed for initialisation and batch order (default 0)")
    add("--device", help="cpu, cuda, cuda:1, … or auto (default cpu)")
    add("--out", help="output folder (default: a new folder under ./runs/)")
    add("--quiet", action="store_true", default=None, help="no progress bars")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """BASE[command], then the preset, then every flag given explicitly."""
    config = dict(BASE[args.command])
    if args.preset:
        config.update(PRESETS[args.command][args.preset])
    config["preset"] = args.preset
    given = {
        key: value
        for key, value in vars(args).items()
        if value is not None and key not in ("command", "preset")
    }
    lr = given.pop("lr", None)
    if lr is not None:
        config["lr_backprop"] = config["lr_proxprop"] = lr
    config.update(given)
    config["quiet"] = bool(config.get("quiet"))
    config["download"] = bool(config.get("download"))
    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    _check(config)
    return config


def _check(config: dict[str, Any]) -> None:
    config["methods"] = [Method.parse(name).name for name in _split(config["methods"])]
    if not config["methods"]:
        raise ValueError("--methods is empty; pass e.g. backprop,cg3,exact")
    if "lrs" in config:
        config["lrs"] = [float(value) for value in _split(config["lrs"])]
        if not config["lrs"] or any(not (lr > 0 and math.isfinite(lr)) for lr in config["lrs"]):
            raise ValueError("--lrs must list positive numbers, e.g. 1,0.1,0.01")
    for key in ("epochs", "batch_size"):
        if config[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1")
    if config.get("train_subset") is not None and config["train_subset"] < 1:
        raise ValueError("--train-subset must be >= 1")
    if not config["width"] > 0:
        raise ValueError("--width must be > 0")
    if config["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here; use --device cpu")


def _split(value: str | Sequence[Any]) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item) for item in value]


def versions() -> dict[str, str]:
    info = {
        "proxoptim": proxoptim.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def load_data(config: dict[str, Any]) -> Splits:
    splits = load_dataset(
        config["dataset"],
        data_dir=config["data_dir"],
        download=config["download"],
        seed=config["seed"],
        progress=not config["quiet"],
    )
    if config.get("train_subset"):
        splits = splits.subset(train=config["train_subset"])
    return splits


def _output_dir(config: dict[str, Any], command: str) -> Path:
    if config.get("out"):
        out = Path(config["out"])
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        stem = Path("runs") / f"{command}-{config['preset'] or config['dataset']}-{stamp}"
        out, suffix = stem, 1
        while out.exists():
            suffix += 1
            out = stem.with_name(f"{stem.name}_{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _describe(splits: Splits, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": splits.name,
        "train": len(splits.train_x),
        "val": len(splits.val_x),
        "test": len(splits.test_x),
        "input_shape": list(splits.input_shape),
        "data_dir": config["data_dir"] if splits.name == "cifar10" else None,
    }


def _run(config: dict[str, Any], splits: Splits, method: str, lr: float, label: str) -> RunResult:
    shape, classes = splits.input_shape, splits.num_classes

    def factory() -> torch.nn.Module:
        return build_model(config["model"], shape, classes, config["width"])

    return train(
        factory,
        splits,
        Method.parse(method),
        optimizer=config["optimizer"],
        lr=lr,
        tau_prox=config["tau_prox"],
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        momentum=config["momentum"],
        device=config["device"],
        progress=not config["quiet"],
        description=label,
    )


def summary_table(runs: Sequence[RunResult]) -> str:
    """A Markdown table: loss, accuracies, time and step-time ratio against backprop."""
    backprop = next((r for r in runs if r.method == "backprop"), None)
    baseline = backprop.median_step_seconds if backprop else math.nan
    lines = [
        "| method | lr | final train loss | best val acc | test acc @ best val "
        "| train time [s] | step [ms] | step / backprop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        seconds = run.epochs[-1].seconds if run.epochs else math.nan
        ratio = run.median_step_seconds / baseline if baseline > 0 else math.nan
        lines.append(
            f"| {run.method}{' (diverged)' if run.diverged else ''} | {run.lr:g} "
            f"| {format_loss(run.final_train_loss)} | {_percent(run.best_val_accuracy)} "
            f"| {_percent(run.test_at_best_val)} | {seconds:.1f} "
            f"| {1000 * run.median_step_seconds:.1f} | {ratio:.2f} |"
        )
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{100 * value:.2f}%"


def _provenance(command: str, config: dict[str, Any], splits: Splits) -> dict[str, Any]:
    """What every results file starts with: the command, when, the configuration, the
    versions and the data it ran on."""
    return {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(),
        "config": config,
        "versions": versions(),
        "dataset": _describe(splits, config),
    }


def run_compare(config: dict[str, Any]) -> Path:
    splits = load_data(config)
    out = _output_dir(config, "compare")
    runs = []
    for method in config["methods"]:
        lr = config["lr_backprop"] if method == "backprop" else config["lr_proxprop"]
        runs.append(_run(config, splits, method, lr, label=f"{method} lr={lr:g}"))
    title = f"{config['model']} on {splits.name}, {config['optimizer']}, τθ={config['tau_prox']:g}"
    results = {
        **_provenance("compare", config, splits),
        "runs": [run.to_json() for run in runs],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(runs, out / "curves.png", title=title)
    table = summary_table(runs)
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'curves.png'}, {out / 'summary.md'}")
    return out


def run_sweep(config: dict[str, Any]) -> Path:
    splits = load_data(config)
    out = _output_dir(config, "sweep")
    methods, lrs = config["methods"], config["lrs"]
    final: dict[str, dict[float, float | None]] = {method: {} for method in methods}
    records = []
    for method in methods:
        for lr in lrs:
            run = _run(config, splits, method, lr, label=f"{method} lr={lr:g}")
            loss = run.final_train_loss
            final[method][lr] = loss if math.isfinite(loss) else None
            records.append(run.to_json())
    header = "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |"
    lines = [header, "|---" * (len(lrs) + 1) + "|"]
    for method in methods:
        cells = " | ".join(format_loss(final[method][lr]) for lr in lrs)
        lines.append(f"| {method} | {cells} |")
    table = "\n".join(lines)
    caption = (
        f"Final full-batch training loss after {config['epochs']} epochs, {config['model']} on "
        f"{splits.name} ({len(splits.train_x)} training images), {config['optimizer']}, "
        f"τθ={config['tau_prox']:g}; – = diverged."
    )
    (out / "table.md").write_text(caption + "\n\n" + table + "\n")
    results = {
        **_provenance("sweep", config, splits),
        "lrs": lrs,
        "methods": methods,
        "final_train_loss": {m: [final[m][lr] for lr in lrs] for m in methods},
        "runs": records,
    }
    (out / "sweep.json").write_text(json.dumps(results, indent=2))
    plot_sweep(methods, lrs, final, out / "sweep.png", title=caption.split(",")[0])
    print(caption + "\n\n" + table)
    print(f"\nwrote {out / 'table.md'}, {out / 'sweep.json'}, {out / 'sweep.png'}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["compare", *(argv or [])])
    try:
        config = resolve_config(args)
        started = time.perf_counter()
        run = run_compare if args.command == "compare" else run_sweep
        run(config)
    except (ValueError, DatasetError) as error:
        print(f"proxoptim {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
