"""``proxoptim compare``, ``sweep`` and ``report``: ProxProp against backprop, on one command.

compare  trains several methods side by side (Figure 2 / 3 of the paper) and writes
         results.json, curves.png and a summary table; ``--resume RUN_DIR`` continues an
         interrupted run from its epoch checkpoints.
sweep    trains each method at each learning rate (Table 1) and writes table.md,
         sweep.json and sweep.png; with ``--tau-proxes`` each ProxProp method at every
         (τθ, lr) of a grid, and heatmap.png (docs/tuning.md); ``--resume RUN_DIR``
         keeps the finished cells and continues the interrupted one from its last epoch.
report   merges compare runs of one protocol (methods run apart) into one results.json,
         curves.png and summary table, and refuses runs whose protocols differ
         (proxoptim.experiments.report).

With no arguments both run offline on scikit-learn's digits in about a minute on 2 cores;
``--preset fig2|fig3|table1`` selects the paper's exact settings (CIFAR-10), which
``--epochs``, ``--train-subset`` and ``--width`` shrink for CPU runs.

Every flag, and every optimizer the command will build, is checked before the data is loaded
and before any method trains: a bad value fails at once, with exit status 2 and a message
naming the flag. The results files record the command line, the git commit (and whether the
tree was dirty), the machine and the wall time (proxoptim.experiments.provenance); the
Markdown tables start with the same as a comment line.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.data import INPUT_SHAPES, DatasetError, Splits, load_dataset
from proxoptim.experiments.models import MODEL_NAMES, build_model
from proxoptim.experiments.plots import (
    SweepGrid,
    format_loss,
    plot_curves,
    plot_heatmaps,
    plot_sweep,
)
from proxoptim.experiments.provenance import provenance, provenance_comment
from proxoptim.experiments.report import (
    ReportError,
    load_run,
    merge,
    report_json,
    run_from_json,
)
from proxoptim.experiments.training import OPTIMIZERS, Method, RunResult, make_optimizer, train

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
        "tau_proxes": None,
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
    commands = parser.add_subparsers(dest="command", metavar="{compare,sweep,report}")
    compare = commands.add_parser(
        "compare",
        help="several methods side by side: results.json, curves.png, a summary table",
        description="Train several methods on one dataset/model (the paper's Fig. 2 / 3).",
    )
    _common_arguments(compare, "compare")
    compare.add_argument("--lr", type=float, help="learning rate for every method")
    compare.add_argument("--lr-backprop", type=float, help="learning rate of backprop")
    compare.add_argument("--lr-proxprop", type=float, help="learning rate of ProxProp methods")
    compare.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted compare run in RUN_DIR from its last epoch checkpoints "
        "(its configuration is the run's own; other flags are ignored)",
    )

    sweep = commands.add_parser(
        "sweep",
        help="final training loss over learning rates: table.md, sweep.json, sweep.png",
        description="Final full-batch loss of each method at each learning rate (Table 1).",
    )
    _common_arguments(sweep, "sweep")
    sweep.add_argument("--lrs", help="comma-separated learning rates, e.g. 1,0.1,0.01")
    sweep.add_argument(
        "--tau-proxes",
        help="comma-separated τθ values, e.g. 0.01,0.1,1: every ProxProp method runs at every "
        "(τθ, lr) of the grid (backprop once per lr); adds heatmap.png",
    )
    sweep.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted sweep in RUN_DIR: finished cells are kept, the cell that "
        "was running continues from its last epoch checkpoint (its configuration is the "
        "sweep's own; other flags are ignored)",
    )
    sweep.add_argument(
        "--replot",
        metavar="RUN_DIR",
        help="redraw sweep.png (and heatmap.png) of the sweep in RUN_DIR from its sweep.json, "
        "training nothing (other flags are ignored)",
    )

    report = commands.add_parser(
        "report",
        help="merge compare runs of one protocol: results.json, curves.png, a summary table",
        description="Merge finished compare runs of one protocol (e.g. methods run apart) "
        "into one table, one curves.png and one results.json; runs whose protocols differ "
        "are refused, naming the difference.",
    )
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="compare run folders")
    report.add_argument("--out", help="output folder (default: a new folder under ./runs/)")
    report.add_argument("--title", help="the figure's title (default: from the protocol)")
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


class ConfigError(ValueError):
    """A flag's value cannot work; the message names the flag. Raised before any training."""


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """BASE[command], then the preset, then every flag given explicitly.

    Raises:
        ConfigError: a value is invalid (the message names its flag).
    """
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


def resume_config(run_dir: str, command: str = "compare") -> dict[str, Any]:
    """The configuration of the ``command`` run (compare or sweep) in ``run_dir``, to
    continue it there.

    Raises:
        ConfigError: ``run_dir`` holds no config.json, or that of the other command.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"--resume: {path} does not exist; pass the folder of a {command} run (it holds "
            "config.json and checkpoints/)"
        )
    config = json.loads(path.read_text())
    found = "sweep" if "lrs" in config else "compare"
    if found != command:
        raise ConfigError(
            f"--resume: {run_dir} holds a {found} run; continue it with "
            f"`proxoptim {found} --resume {run_dir}`"
        )
    config["out"] = str(Path(run_dir))
    _check(config)
    return config


def _check(config: dict[str, Any]) -> None:
    """Every value on its own (the optimizers built from them are checked by
    :func:`check_optimizers`); normalises ``methods`` and ``lrs`` to lists."""
    try:
        methods = [Method.parse(name) for name in _split(config["methods"])]
    except ValueError as error:
        raise ConfigError(f"--methods: {error}") from None
    if not methods:
        raise ConfigError("--methods is empty; pass e.g. backprop,cg3,exact")
    config["methods"] = [method.name for method in methods]
    uses_backprop = any(method.is_backprop for method in methods)
    uses_proxprop = not all(method.is_backprop for method in methods)
    if "lrs" in config:
        config["lrs"] = _positive_numbers(config["lrs"], "--lrs", "1,0.1,0.01")
    else:
        for key, used in (("lr_backprop", uses_backprop), ("lr_proxprop", uses_proxprop)):
            if used and not _positive(config[key]):
                raise ConfigError(
                    f"--{key.replace('_', '-')} (or --lr) must be a finite number > 0, "
                    f"got {config[key]!r}"
                )
    if config.get("tau_proxes") is not None:
        config["tau_proxes"] = _positive_numbers(config["tau_proxes"], "--tau-proxes", "0.01,0.1,1")
    if uses_proxprop and not _positive(config["tau_prox"]):
        raise ConfigError(
            f"--tau-prox must be a finite number > 0 (e.g. 0.05 or 1.0), got {config['tau_prox']!r}"
        )
    if config["optimizer"] == "nesterov" and not 0 < config["momentum"] < 1:
        raise ConfigError(
            f"--momentum must lie in (0, 1) for Nesterov momentum, got {config['momentum']!r}"
        )
    for key in ("epochs", "batch_size"):
        if config[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {config[key]}")
    if config.get("train_subset") is not None and config["train_subset"] < 1:
        raise ConfigError(f"--train-subset must be >= 1, got {config['train_subset']}")
    if not _positive(config["width"]):
        raise ConfigError(f"--width must be a finite number > 0, got {config['width']!r}")
    try:
        device = torch.device(config["device"])
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"--device: unknown device {config['device']!r}; use cpu, cuda, cuda:<index> or auto"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )


def _positive_numbers(value: str | Sequence[Any], flag: str, example: str) -> list[float]:
    """A comma-separated list (or a list) of finite numbers > 0.

    Raises:
        ConfigError: an entry is not a number, is not finite and > 0, or none is given.
    """
    try:
        numbers = [float(item) for item in _split(value)]
    except ValueError:
        raise ConfigError(f"{flag} must list numbers, e.g. {example}; got {value!r}") from None
    if not numbers or not all(_positive(number) for number in numbers):
        raise ConfigError(f"{flag} must list finite numbers > 0, e.g. {example}")
    return numbers


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _planned_runs(config: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Every (method, learning rate, τθ) the command trains, in order (backprop once per
    learning rate: τθ does not reach it)."""
    if "lrs" in config:
        return [
            (method, lr, tau)
            for tau_index, tau in enumerate(_tau_grid(config))
            for method in config["methods"]
            if tau_index == 0 or method != "backprop"
            for lr in config["lrs"]
        ]
    return [
        (
            method,
            config["lr_backprop"] if method == "backprop" else config["lr_proxprop"],
            config["tau_prox"],
        )
        for method in config["methods"]
    ]


def _tau_grid(config: dict[str, Any]) -> list[float]:
    """A sweep's τθ values: ``--tau-proxes``, or ``--tau-prox`` alone."""
    return config.get("tau_proxes") or [config["tau_prox"]]


# Words of an optimizer's error message and the flag that sets the value it complains about
# (ProxPropOptimizer names its arguments; torch says "Invalid learning rate: -1").
_FLAG_HINTS = (
    ("tau_prox", "--tau-prox"),
    ("cg_iters", "--methods"),
    ("solver", "--methods"),
    ("cuda_graphs", "--methods"),
    ("learning rate", "--lr"),
    ("momentum", "--momentum"),
)


def check_optimizers(config: dict[str, Any], input_shape: Sequence[int]) -> None:
    """Builds the optimizer of every planned run, on one throwaway model, before any training.

    Whatever the optimizers refuse (ProxPropOptimizer checks its hyperparameters at
    construction, torch's optimizers theirs) is reported now instead of after the earlier
    methods have trained. Training itself seeds and builds fresh models, so this changes no
    result.

    Raises:
        ConfigError: an optimizer or the model cannot be built; the message names the flag.
    """
    device = torch.device(config["device"])
    try:  # both datasets have 10 classes; the classifier's size changes no optimizer check
        model = build_model(config["model"], input_shape, 10, config["width"]).to(device)
    except (RuntimeError, ValueError) as error:
        raise ConfigError(
            f"--model {config['model']} --width {config['width']:g} --device {config['device']}: "
            f"cannot build the model ({error})"
        ) from None
    for method, lr, tau in _planned_runs(config):
        try:
            opt = make_optimizer(
                model, Method.parse(method), config["optimizer"], lr, tau, config["momentum"]
            )
        except (ValueError, TypeError, RuntimeError) as error:
            text = str(error)
            flag = next((flag for word, flag in _FLAG_HINTS if word in text), "--optimizer")
            raise ConfigError(
                f"{flag}: cannot build the optimizer of {method} (--optimizer "
                f"{config['optimizer']}, lr {lr:g}, --tau-prox {tau:g}, "
                f"--momentum {config['momentum']:g}): {text}"
            ) from None
        if isinstance(opt, ProxPropOptimizer):
            opt.remove_hooks()
    del model


def _split(value: str | Sequence[Any]) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item) for item in value]


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


def _run(
    config: dict[str, Any],
    splits: Splits,
    method: str,
    lr: float,
    label: str,
    checkpoint: Path | None = None,
    resume: bool = False,
    tau_prox: float | None = None,
) -> RunResult:
    shape, classes = splits.input_shape, splits.num_classes

    def factory() -> torch.nn.Module:
        return build_model(config["model"], shape, classes, config["width"])

    return train(
        factory,
        splits,
        Method.parse(method),
        optimizer=config["optimizer"],
        lr=lr,
        tau_prox=config["tau_prox"] if tau_prox is None else tau_prox,
        epochs=config["epochs"],
        batch_size=config["batch_size"],
        seed=config["seed"],
        momentum=config["momentum"],
        device=config["device"],
        progress=not config["quiet"],
        description=label,
        checkpoint=checkpoint,
        resume=resume,
    )


def summary_table(runs: Sequence[RunResult], timed_alike: Sequence[bool] | None = None) -> str:
    """A Markdown table: loss, accuracies, time and step-time ratio against backprop.

    ``timed_alike``: per run, whether its step time is comparable with backprop's (same
    machine); the ratio of a run that is not is shown as an en dash. Default: all are.
    """
    backprop = next((r for r in runs if r.method == "backprop"), None)
    baseline = backprop.median_step_seconds if backprop else math.nan
    timed_alike = [True] * len(runs) if timed_alike is None else timed_alike
    lines = [
        "| method | lr | final train loss | best val acc | test acc @ best val "
        "| train time [s] | step [ms] | step / backprop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run, alike in zip(runs, timed_alike, strict=True):
        seconds = run.epochs[-1].seconds if run.epochs else math.nan
        ratio = run.median_step_seconds / baseline if baseline > 0 and alike else math.nan
        lines.append(
            f"| {run.method}{' (diverged)' if run.diverged else ''} | {run.lr:g} "
            f"| {format_loss(run.final_train_loss)} | {_percent(run.best_val_accuracy)} "
            f"| {_percent(run.test_at_best_val)} | {seconds:.1f} "
            f"| {1000 * run.median_step_seconds:.1f} | {_ratio(ratio)} |"
        )
    return "\n".join(lines)


def _ratio(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2f}"


def _percent(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{100 * value:.2f}%"


def _command_line(subcommand: str, command: str | None) -> str:
    return command if command is not None else shlex.join(["proxoptim", subcommand])


def _provenance(
    subcommand: str,
    info: dict[str, Any],
    started: float,
    config: dict[str, Any],
    splits: Splits,
) -> dict[str, Any]:
    """What every results file starts with: the command line, when it started, the code it
    started from (git commit and whether the tree was dirty: ``info``, taken at the start),
    the machine, the wall time of the whole command, the configuration, the versions and the
    data it ran on."""
    return {
        "command": info["command"],
        "subcommand": subcommand,
        "created": info["created"],
        "commit": info["commit"],
        "dirty": info["dirty"],
        "machine": info["machine"],
        "wall_seconds": round(time.perf_counter() - started, 3),
        "config": config,
        "versions": info["versions"],
        "dataset": _describe(splits, config),
    }


def prepare(config: dict[str, Any]) -> Splits:
    """Checks every optimizer the command will build, then loads the data.

    The optimizers are built before loading (the input shape of each dataset is known in
    advance) so a bad flag fails in a moment, not after a long decode; should the data's
    shape differ, they are checked again on it, still before any training step.
    """
    expected = INPUT_SHAPES.get(config["dataset"])
    if expected is not None:
        check_optimizers(config, expected)
    splits = load_data(config)
    if splits.input_shape != expected:
        check_optimizers(config, splits.input_shape)
    return splits


def run_compare(
    config: dict[str, Any],
    *,
    command: str | None = None,
    started: float | None = None,
    resume: bool = False,
) -> Path:
    """Trains every method of ``config`` and writes results.json, curves.png, summary.md.

    Args:
        config: from :func:`resolve_config`.
        command: the command line, for the results' provenance (default ``proxoptim
            compare``).
        started: ``time.perf_counter()`` when the command began (default: now), for the
            recorded wall time.
        resume: continue each method from its checkpoint in ``config["out"]``
            (``--resume``); otherwise every method starts afresh.
    """
    started = time.perf_counter() if started is None else started
    code = provenance(_command_line("compare", command))  # what this run starts from
    splits = prepare(config)
    out, sessions = _begin_run(config, "compare", resume)
    checkpoints = out / "checkpoints"
    runs = []
    for method in config["methods"]:
        lr = config["lr_backprop"] if method == "backprop" else config["lr_proxprop"]
        label = f"{method} lr={lr:g}"
        checkpoint = checkpoints / f"{method}.pt"
        runs.append(_run(config, splits, method, lr, label, checkpoint, resume))
    title = f"{config['model']} on {splits.name}, {config['optimizer']}, τθ={config['tau_prox']:g}"
    results = {
        **_provenance("compare", code, started, config, splits),
        "runs": [run.to_json() for run in runs],
    }
    _close_session(out, sessions, results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(runs, out / "curves.png", title=title)
    table = summary_table(runs)
    comment = provenance_comment(info=code)
    (out / "summary.md").write_text(comment + "\n\n" + table + "\n")
    print(table)
    print(f"\nwrote {out / 'results.json'}, {out / 'curves.png'}, {out / 'summary.md'}")
    return out


SESSIONS = "sessions.json"


def _begin_run(
    config: dict[str, Any], command: str, resume: bool
) -> tuple[Path, list[dict[str, Any]]]:
    """The run's folder, set up for ``--resume``, and its sessions so far (this one last).

    The folder holds what ``--resume`` reads back: config.json and ``checkpoints/`` (one
    per method or sweep cell, written after every epoch). A resumed run keeps config.json
    as first written: its modification time dates the run's start for a run begun before
    sessions were recorded (:func:`_open_session`).
    """
    out = _output_dir(config, command)
    path = out / "config.json"
    if not (resume and path.is_file()):
        path.write_text(json.dumps(config, indent=2))
    (out / "checkpoints").mkdir(exist_ok=True)
    return out, _open_session(out, resume)


def _open_session(out: Path, resume: bool) -> list[dict[str, Any]]:
    """Records this invocation in ``out/sessions.json`` (when it started, the commit and
    machine it runs on) and returns every session of the run so far.

    A run resumed after an interruption spans several processes, perhaps on several commits
    or machines; results.json lists them all, and its wall time is their sum. An
    interrupted session never recorded its end: it ended when it last wrote a checkpoint.
    A run begun before sessions were recorded counts from its config.json to its latest
    checkpoint, commit unknown.
    """
    path = out / SESSIONS
    sessions: list[dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else []
    written = [
        p.stat().st_mtime
        for p in [*(out / "checkpoints").glob("*.pt"), *(out / CELLS).glob("*.json")]
    ]
    if sessions and sessions[-1]["ended"] is None:
        sessions[-1]["ended"] = max([sessions[-1]["started"], *written])
    elif not sessions and resume and written:
        begun = (out / "config.json").stat().st_mtime
        sessions.append(
            {
                "started": min([begun, *written]),
                "ended": max(written),
                "commit": None,
                "dirty": None,
            }
        )
    now = provenance()
    sessions.append(
        {
            "started": time.time(),
            "ended": None,
            "commit": now["commit"],
            "dirty": now["dirty"],
            "machine": now["machine"],
        }
    )
    path.write_text(json.dumps(sessions, indent=2))
    return sessions


def _close_session(out: Path, sessions: list[dict[str, Any]], results: dict[str, Any]) -> None:
    """Ends this session in ``out/sessions.json`` and records every session in ``results``,
    whose wall time becomes the whole run's: this invocation's and every earlier one's."""
    sessions[-1]["ended"] = time.time()
    (out / SESSIONS).write_text(json.dumps(sessions, indent=2))
    results["wall_seconds"] = round(
        results["wall_seconds"] + sum(s["ended"] - s["started"] for s in sessions[:-1]), 3
    )
    results["sessions"] = sessions


def run_report(
    run_dirs: Sequence[str], out: str | None, title: str | None, command: str | None = None
) -> Path:
    """Merges finished compare runs (:func:`proxoptim.experiments.report.merge`) and writes
    results.json, curves.png and summary.md into ``out``.

    Raises:
        ReportError: a folder holds no finished compare run, or the runs' protocols differ.
    """
    merged = merge([load_run(folder) for folder in run_dirs])
    results = report_json(merged, _command_line("report", command))
    destination = _output_dir({"out": out, "preset": None, "dataset": "merged"}, "report")
    config = results["config"]
    if title is None:
        title = (
            f"{config['model']} on {results['dataset']['name']}, {config['optimizer']}, "
            f"τθ={config['tau_prox']:g}"
        )
    (destination / "results.json").write_text(json.dumps(results, indent=2))
    plot_curves(merged.runs, destination / "curves.png", title=title)
    table = summary_table(merged.runs, merged.comparable_timing())
    sources = "\n".join(
        f"- {', '.join(s['methods'])}: `{s['folder']}`, commit "
        f"{(s['commit'] or 'unknown')[:12]}, {s['wall_seconds'] or 0:.0f} s"
        for s in results["sources"]
    )
    comment = provenance_comment(results["command"])
    text = f"{comment}\n\n{table}\n\nMerged from:\n{sources}\n"
    (destination / "summary.md").write_text(text)
    print(table + "\n\nMerged from:\n" + sources)
    print(
        f"\nwrote {destination / 'results.json'}, {destination / 'curves.png'}, "
        f"{destination / 'summary.md'}"
    )
    return destination


CELLS = "cells"


def run_sweep(
    config: dict[str, Any],
    *,
    command: str | None = None,
    started: float | None = None,
    resume: bool = False,
) -> Path:
    """Trains every method at every learning rate (and, with ``--tau-proxes``, every ProxProp
    method at every τθ); writes table.md, sweep.json, sweep.png and, for a τθ grid,
    heatmap.png.

    A sweep is long, so it survives interruption like a compare run. Every finished cell's
    record is kept in ``out/cells/`` and the running cell writes an epoch checkpoint. With
    ``resume`` the finished cells are read back, the interrupted one continues from its
    last epoch, and the sweep's records equal an uninterrupted one's (step times aside):
    every cell starts from the same seed, so cells do not depend on each other.

    Args: as :func:`run_compare`.
    """
    started = time.perf_counter() if started is None else started
    code = provenance(_command_line("sweep", command))  # what this run starts from
    splits = prepare(config)
    out, sessions = _begin_run(config, "sweep", resume)
    (out / CELLS).mkdir(exist_ok=True)
    methods, lrs, taus = config["methods"], config["lrs"], _tau_grid(config)
    cells: list[dict[str, Any]] = []
    records = []
    for method, lr, tau in _planned_runs(config):
        label = f"{method} lr={lr:g}" + ("" if method == "backprop" else f" τθ={tau:g}")
        run = _sweep_cell(config, splits, out, method, lr, tau, label, resume)
        cells.append(
            {
                "method": method,
                "tau_prox": None if method == "backprop" else tau,
                "lr": lr,
                "final_train_loss": run.final_train_loss,
                "best_val_accuracy": run.best_val_accuracy,
            }
        )
        records.append(run.to_json())
    grid = SweepGrid(methods, lrs, taus, cells)
    caption = (
        f"Final full-batch training loss after {config['epochs']} epochs, {config['model']} on "
        f"{splits.name} ({len(splits.train_x)} training images), {config['optimizer']}, "
        + (f"τθ={taus[0]:g}" if len(taus) == 1 else "τθ as given")
        + "; – = diverged."
    )
    results = {
        **_provenance("sweep", code, started, config, splits),
        "lrs": lrs,
        "tau_proxes": taus,
        "methods": methods,
        "final_train_loss": {m: grid.row("final_train_loss", m, taus[0]) for m in methods},
        "grid": [_finite_json(cell) for cell in cells],
        "runs": records,
    }
    _close_session(out, sessions, results)
    (out / "sweep.json").write_text(json.dumps(results, indent=2))
    table = grid.table("final_train_loss", format_loss)
    if len(taus) > 1:
        table += f"\n\nBest validation accuracy over {config['epochs']} epochs:\n\n" + grid.table(
            "best_val_accuracy", _percent
        )
    comment = provenance_comment(info=code)
    (out / "table.md").write_text(comment + "\n\n" + caption + "\n\n" + table + "\n")
    final = {
        m: dict(zip(lrs, grid.row("final_train_loss", m, taus[0]), strict=True)) for m in methods
    }
    plot_sweep(methods, lrs, final, out / "sweep.png", title=caption.split(",")[0])
    written = [out / "table.md", out / "sweep.json", out / "sweep.png"]
    if len(taus) > 1:
        written.append(plot_heatmaps(grid, out / "heatmap.png", title=_heatmap_title(results)))
    print(caption + "\n\n" + table)
    print(f"\nwrote {', '.join(str(path) for path in written)}")
    return out


def _sweep_cell(
    config: dict[str, Any],
    splits: Splits,
    out: Path,
    method: str,
    lr: float,
    tau: float,
    label: str,
    resume: bool,
) -> RunResult:
    """One cell of a sweep: its record read back from ``out/cells/`` when an earlier session
    finished it (``resume``), else trained with an epoch checkpoint that a finished record
    replaces (a sweep of the paper's MLP would otherwise keep 36 models and their momenta,
    about 6 GB)."""
    key = f"{method}_lr{lr:g}" + ("" if method == "backprop" else f"_tau{tau:g}")
    finished = out / CELLS / f"{key}.json"
    if resume and finished.is_file():
        return run_from_json(json.loads(finished.read_text()))
    checkpoint = out / "checkpoints" / f"{key}.pt"
    run = _run(config, splits, method, lr, label, checkpoint, resume, tau_prox=tau)
    partial = finished.with_name(finished.name + ".partial")
    partial.write_text(json.dumps(run.to_json(), indent=2))
    partial.replace(finished)  # (a process killed mid-write keeps no half record)
    checkpoint.unlink(missing_ok=True)
    return run


def _heatmap_title(results: dict[str, Any]) -> str:
    config = results["config"]
    return (
        f"{config['model']} on {results['dataset']['name']}, {config['optimizer']}, "
        f"{config['epochs']} epochs"
    )


def replot_sweep(run_dir: str) -> list[Path]:
    """Redraws sweep.png (and heatmap.png for a τθ grid) from ``run_dir``'s sweep.json.

    Raises:
        ConfigError: ``run_dir`` holds no sweep.json.
    """
    folder = Path(run_dir)
    path = folder / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"--replot: {path} does not exist; pass the folder of a sweep run")
    results = json.loads(path.read_text())
    methods, lrs = results["methods"], results["lrs"]
    taus = results.get("tau_proxes") or [results["config"]["tau_prox"]]
    cells = results.get("grid") or [  # (a sweep from before τθ grids: one τθ)
        {"method": m, "tau_prox": taus[0], "lr": lr, "final_train_loss": loss}
        for m in methods
        for lr, loss in zip(lrs, results["final_train_loss"][m], strict=True)
    ]
    grid = SweepGrid(methods, lrs, taus, cells)
    final = {
        m: dict(zip(lrs, grid.row("final_train_loss", m, taus[0]), strict=True)) for m in methods
    }
    title = f"Final full-batch training loss after {results['config']['epochs']} epochs"
    written = [plot_sweep(methods, lrs, final, folder / "sweep.png", title=title)]
    if len(taus) > 1:
        written.append(plot_heatmaps(grid, folder / "heatmap.png", title=_heatmap_title(results)))
    return written


def _finite_json(cell: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in cell.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """The ``proxoptim`` command. Returns the exit status: 0, or 2 (with a one-paragraph
    message on stderr, as argparse gives) for an invalid flag or a missing dataset.

    Every flag, and every optimizer the command will build, is checked before the data is
    loaded and before the first training step of any method.
    """
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        argv = ["compare", *argv]
        args = parser.parse_args(argv)
    command = shlex.join(["proxoptim", *argv])
    run = run_compare if args.command == "compare" else run_sweep
    try:
        resume = getattr(args, "resume", None)
        if args.command == "report":
            run_report(args.runs, args.out, args.title, command=command)
        elif getattr(args, "replot", None):
            print("wrote " + ", ".join(str(path) for path in replot_sweep(args.replot)))
        elif resume:
            config = resume_config(resume, args.command)
            run(config, command=command, started=started, resume=True)
        else:
            run(resolve_config(args), command=command, started=started)
    except (ConfigError, DatasetError, ReportError) as error:
        print(f"proxoptim {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
