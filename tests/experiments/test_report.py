"""``proxoptim report``: compare runs made apart merge into the run made at once, and runs of
different protocols are refused by name (proxoptim.experiments.report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxoptim.experiments.cli import main
from proxoptim.experiments.report import ReportError, load_run, merge

TINY = ["--epochs", "2", "--width", "0.05", "--batch-size", "200", "--quiet"]
TINY += ["--train-subset", "400"]


def _compare(out: Path, methods: str, *flags: str) -> Path:
    assert main(["compare", *TINY, "--methods", methods, *flags, "--out", str(out)]) == 0
    return out


def _curves(folder: Path) -> dict[str, list[tuple]]:
    results = json.loads((folder / "results.json").read_text())
    return {
        run["method"]: [
            (e["epoch"], e["train_loss"], e["val_accuracy"], e["test_accuracy"])
            for e in run["epochs"]
        ]
        for run in results["runs"]
    }


@pytest.fixture(scope="module")
def apart(tmp_path_factory) -> dict[str, Path]:
    """backprop, cg3 and exact run together, and the same run in two parts."""
    root = tmp_path_factory.mktemp("runs")
    return {
        "together": _compare(root / "together", "backprop,cg3,exact"),
        "first": _compare(root / "first", "cg3"),
        "second": _compare(root / "second", "exact,backprop"),
    }


def test_runs_made_apart_merge_into_the_run_made_together(apart, tmp_path, capsys):
    out = tmp_path / "merged"
    argv = ["report", str(apart["first"]), str(apart["second"]), "--out", str(out)]
    assert main(argv) == 0
    # Every method trains from the same seed and batch order whichever run it is in, so
    # the merged curves are the joint run's bit for bit; backprop comes first.
    assert _curves(out) == _curves(apart["together"])
    results = json.loads((out / "results.json").read_text())
    assert [run["method"] for run in results["runs"]] == ["backprop", "cg3", "exact"]
    assert results["subcommand"] == "report"
    assert results["config"]["methods"] == ["backprop", "cg3", "exact"]
    assert [s["methods"] for s in results["sources"]] == [["cg3"], ["exact", "backprop"]]
    for source in results["sources"]:
        assert {"commit", "machine", "wall_seconds", "command", "sessions"} <= set(source)
    assert results["wall_seconds"] == pytest.approx(
        sum(s["wall_seconds"] for s in results["sources"])
    )
    assert (out / "curves.png").stat().st_size > 10_000
    table = (out / "summary.md").read_text()
    assert table.startswith("<!-- commit")
    assert "| backprop | 0.05 |" in table and "| cg3 | 1 |" in table
    assert str(apart["first"]) in table and str(apart["second"]) in table
    assert "| cg3 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "setting"),
    [
        (["--tau-prox", "0.3"], "tau_prox"),
        (["--epochs", "1"], "epochs"),
        (["--seed", "1"], "seed"),
        (["--batch-size", "100"], "batch_size"),
        (["--width", "0.1"], "width"),
        (["--train-subset", "300"], "train_subset"),
        (["--optimizer", "adam"], "optimizer"),
        (["--lr-proxprop", "0.5"], "lr_proxprop"),
    ],
)
def test_runs_of_different_protocols_are_refused_by_name(apart, flags, setting, tmp_path, capsys):
    other = _compare(tmp_path / "other", "cg1", *flags)
    out = tmp_path / "merged"
    assert main(["report", str(apart["second"]), str(other), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"ran different protocols: {setting} is" in error
    assert str(apart["second"]) in error and str(other) in error
    assert not (out / "results.json").exists()


def test_a_learning_rate_of_a_family_a_run_lacks_is_not_its_protocol(apart, tmp_path):
    # This run has no backprop, so its --lr-backprop was never used; it merges.
    other = _compare(tmp_path / "other", "cg1", "--lr-backprop", "0.5")
    merged = merge([load_run(apart["second"]), load_run(other)])
    assert [run.method for run in merged.runs] == ["backprop", "exact", "cg1"]
    assert merged.protocol["lr_backprop"] == 0.05


def test_a_method_in_two_runs_or_a_folder_twice_is_refused(apart):
    with pytest.raises(ReportError, match="cg3 was run in both"):
        merge([load_run(apart["together"]), load_run(apart["first"])])
    with pytest.raises(ReportError, match="is given twice"):
        merge([load_run(apart["first"]), load_run(apart["first"])])
    with pytest.raises(ReportError, match="no runs"):
        merge([])


def test_an_unfinished_run_is_refused_with_the_resume_command(apart, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((apart["first"] / "config.json").read_text())
    with pytest.raises(ReportError, match="--resume"):
        load_run(unfinished)
    with pytest.raises(ReportError, match="finished proxoptim compare run"):
        load_run(tmp_path)


def test_a_sweep_is_not_a_compare_run(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.json").write_text(json.dumps({"subcommand": "sweep", "runs": []}))
    with pytest.raises(ReportError, match="'sweep' result"):
        load_run(sweep)


def test_step_ratios_are_given_only_for_runs_timed_on_the_backprop_runs_machine(apart, tmp_path):
    # A run from another machine keeps its step time, but its ratio to a backprop step
    # timed elsewhere would compare machines: the table shows an en dash instead.
    moved = tmp_path / "moved"
    moved.mkdir()
    results = json.loads((apart["first"] / "results.json").read_text())
    results["machine"] = {"cpu": "another CPU", "cpu_threads": 64, "gpu": None}
    (moved / "results.json").write_text(json.dumps(results))
    out = tmp_path / "merged"
    assert main(["report", str(apart["second"]), str(moved), "--out", str(out)]) == 0
    rows = {line.split(" | ")[0]: line for line in (out / "summary.md").read_text().splitlines()}
    assert rows["| cg3"].endswith("| – |")
    assert not rows["| exact"].endswith("| – |")
    assert rows["| backprop"].endswith("| 1.00 |")
