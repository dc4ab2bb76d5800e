"""``proxoptim report``: merge compare runs of one protocol into one table, figure and file.

Researchers run methods apart (one per GPU or job, ``--methods`` any subset) and merge the
results afterwards. A merge is only meaningful when every run followed the same protocol:
the same data (dataset, split sizes, input shape, training subset), model and width, inner
optimizer and its momentum, τθ, epochs, batch size and seed, and the same learning rate
for each family of methods that two runs both contain. :func:`merge` checks exactly that
and refuses runs that differ, naming the setting, both values and both folders.

What does not define a protocol is allowed to differ: the output folder, progress bars,
the device, where the data was read from, and the learning rate of a family a run does not
contain (``lr_backprop`` of a run without backprop is never used). The commit and the
machine may differ too; each source is recorded, and the table's step-time ratio against
backprop is only given for runs timed on the same machine (CPU or GPU model and thread
count) as the backprop run, since a ratio across machines would measure the machines.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxoptim.experiments.provenance import provenance
from proxoptim.experiments.training import EpochRecord, Method, RunResult

# Settings that do not change what is trained or measured.
NOT_PROTOCOL = ("methods", "out", "quiet", "device", "data_dir", "download", "preset")
# Learning rates belong to the protocol only for the family of methods a run contains.
FAMILY_LR = {"backprop": "lr_backprop", "proxprop": "lr_proxprop"}


class ReportError(ValueError):
    """The runs cannot be merged; the message says which folder and which setting."""


@dataclass(frozen=True)
class SourceRun:
    """One compare run folder as read back from its results.json."""

    folder: Path
    results: dict[str, Any]
    runs: tuple[RunResult, ...]

    @property
    def machine_key(self) -> tuple[Any, ...]:
        machine = self.results.get("machine") or {}
        return (machine.get("gpu") or machine.get("cpu"), machine.get("cpu_threads"))

    def protocol(self) -> dict[str, Any]:
        """The settings that define what was trained and measured (see the module doc)."""
        config = self.results["config"]
        families = {
            "backprop" if Method.parse(run.method).is_backprop else "proxprop" for run in self.runs
        }
        unused_lrs = {lr for family, lr in FAMILY_LR.items() if family not in families}
        settings = {
            key: value
            for key, value in config.items()
            if key not in NOT_PROTOCOL and key not in unused_lrs
        }
        dataset = self.results.get("dataset") or {}
        for key in ("name", "train", "val", "test", "input_shape"):
            settings[f"dataset.{key}"] = dataset.get(key)
        return settings


@dataclass(frozen=True)
class MergedReport:
    """The merged runs (backprop first, then in the order given) and where each came from."""

    protocol: dict[str, Any]
    runs: tuple[RunResult, ...]
    sources: tuple[SourceRun, ...]
    source_of: dict[str, SourceRun]

    def comparable_timing(self) -> list[bool]:
        """Per run: whether its step time was measured on the backprop run's machine."""
        backprop = next((r for r in self.runs if r.method == "backprop"), None)
        if backprop is None:
            return [False] * len(self.runs)
        reference = self.source_of[backprop.method].machine_key
        return [self.source_of[run.method].machine_key == reference for run in self.runs]


def run_from_json(record: dict[str, Any]) -> RunResult:
    """A :class:`RunResult` back from :meth:`RunResult.to_json` (JSON nulls become NaN)."""

    def number(value: float | None) -> float:
        return math.nan if value is None else float(value)

    epochs = [
        EpochRecord(
            epoch=int(e["epoch"]),
            train_loss=number(e["train_loss"]),
            val_accuracy=number(e["val_accuracy"]),
            test_accuracy=number(e["test_accuracy"]),
            seconds=number(e["seconds"]),
        )
        for e in record["epochs"]
    ]
    return RunResult(
        method=record["method"],
        optimizer=record["optimizer"],
        lr=float(record["lr"]),
        tau_prox=record["tau_prox"],
        epochs=epochs,
        step_seconds=[number(s) for s in record["step_seconds"]],
        diverged=bool(record["diverged"]),
        diverged_at_epoch=record["diverged_at_epoch"],
    )


def load_run(folder: str | Path) -> SourceRun:
    """The finished compare run in ``folder``.

    Raises:
        ReportError: ``folder`` holds no finished compare run (no results.json: it may still
            be running or was interrupted; ``proxoptim compare --resume`` finishes it), or a
            sweep's results.
    """
    folder = Path(folder)
    path = folder / "results.json"
    if not path.is_file():
        hint = (
            "it was interrupted or is still running; finish it with proxoptim compare "
            f"--resume {folder}"
            if (folder / "config.json").is_file()
            else "pass the folder of a finished proxoptim compare run"
        )
        raise ReportError(f"{folder} has no results.json: {hint}")
    results = json.loads(path.read_text())
    if results.get("subcommand") not in ("compare", "report"):
        raise ReportError(
            f"{path} is a {results.get('subcommand')!r} result; report merges compare runs"
        )
    runs = tuple(run_from_json(record) for record in results["runs"])
    return SourceRun(folder, results, runs)


def merge(sources: list[SourceRun]) -> MergedReport:
    """The union of the sources' methods, checked to share one protocol.

    Raises:
        ReportError: no sources; two sources differ in a protocol setting (named, with both
            values and folders); or a method appears in two sources.
    """
    if not sources:
        raise ReportError("no runs to report; pass one or more compare run folders")
    folders = [source.folder.resolve() for source in sources]
    for index, folder in enumerate(folders):
        if folder in folders[:index]:
            raise ReportError(f"{sources[index].folder} is given twice; pass each run once")
    protocol: dict[str, Any] = {}
    origin: dict[str, SourceRun] = {}
    for source in sources:
        for key, value in source.protocol().items():
            if key in protocol and protocol[key] != value:
                raise ReportError(
                    f"{origin[key].folder} and {source.folder} ran different protocols: "
                    f"{key} is {protocol[key]!r} in the first and {value!r} in the second; "
                    "only runs of one protocol can be merged"
                )
            if key not in protocol:
                protocol[key], origin[key] = value, source
    source_of: dict[str, SourceRun] = {}
    for source in sources:
        for run in source.runs:
            if run.method in source_of:
                raise ReportError(
                    f"{run.method} was run in both {source_of[run.method].folder} and "
                    f"{source.folder}; pass only one of them"
                )
            source_of[run.method] = source
    runs = [run for source in sources for run in source.runs]
    runs.sort(key=lambda run: run.method != "backprop")  # stable: backprop first
    return MergedReport(protocol, tuple(runs), tuple(sources), source_of)


def report_json(report: MergedReport, command: str) -> dict[str, Any]:
    """The merged results.json: this command's provenance, the shared protocol, every
    source's own provenance (folder, command, commit, machine, wall time) and the runs."""
    info = provenance(command)
    first = report.sources[0].results
    config = dict(first["config"])
    config.update({key: value for key, value in report.protocol.items() if key in config})
    config["methods"] = [run.method for run in report.runs]
    config.pop("out", None)  # (a source's folder; the sources are listed below)
    return {
        "command": info["command"],
        "subcommand": "report",
        "created": info["created"],
        "commit": info["commit"],
        "dirty": info["dirty"],
        "machine": info["machine"],
        "wall_seconds": sum(s.results.get("wall_seconds") or 0.0 for s in report.sources),
        "config": config,
        "versions": info["versions"],
        "dataset": first.get("dataset"),
        "sources": [
            {
                "folder": str(source.folder),
                "methods": [run.method for run in source.runs],
                **{
                    key: source.results.get(key)
                    for key in ("command", "created", "commit", "dirty", "machine", "wall_seconds")
                },
                **(
                    {"sessions": source.results["sessions"]} if "sessions" in source.results else {}
                ),
            }
            for source in report.sources
        ],
        "runs": [run.to_json() for run in report.runs],
    }
