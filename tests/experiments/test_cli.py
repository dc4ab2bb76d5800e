"""The main job end to end on digits with tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proxoptim.experiments.cli import PRESETS, build_parser, main, resolve_config

TINY = ["--epochs", "2", "--width", "0.05", "--batch-size", "200", "--quiet"]


def test_compare_writes_results_curves_and_table(tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", *TINY, "--methods", "backprop,cg2,exact", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| backprop |" in printed and "| cg2 |" in printed and "| exact |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "compare"
    assert results["config"]["methods"] == ["backprop", "cg2", "exact"]
    assert results["config"]["dataset"] == "digits"
    assert {"torch", "proxoptim", "python"} <= set(results["versions"])
    assert (
        results["dataset"]["train"] + results["dataset"]["val"] + results["dataset"]["test"] == 1797
    )
    for run in results["runs"]:
        assert [e["epoch"] for e in run["epochs"]] == [0, 1, 2]
        for epoch in run["epochs"]:
            assert set(epoch) == {"epoch", "train_loss", "val_accuracy", "test_accuracy", "seconds"}
            assert 0 <= epoch["val_accuracy"] <= 1 and epoch["train_loss"] > 0
        assert run["diverged"] is False and len(run["step_seconds"]) == 2 * 7
        assert run["median_step_seconds"] > 0
    by_method = {run["method"]: run for run in results["runs"]}
    assert by_method["backprop"]["lr"] == 0.05 and by_method["cg2"]["lr"] == 1.0
    assert by_method["cg2"]["tau_prox"] == 0.05 and by_method["backprop"]["tau_prox"] is None
    png = (out / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (out / "summary.md").read_text().startswith("| method |")


def test_sweep_records_divergence(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(
        ["sweep", *TINY, "--methods", "backprop,cg1", "--lrs", "1e4,0.1", "--out", str(out)]
    )
    assert code == 0
    results = json.loads((out / "sweep.json").read_text())
    assert results["lrs"] == [1e4, 0.1]
    backprop_losses = results["final_train_loss"]["backprop"]
    assert backprop_losses[0] is None  # diverged at lr = 1e4
    assert backprop_losses[1] is not None and backprop_losses[1] > 0
    diverged = [r for r in results["runs"] if r["method"] == "backprop" and r["lr"] == 1e4]
    assert diverged[0]["diverged"] is True and diverged[0]["final_train_loss"] is None
    table = (out / "table.md").read_text()
    assert "| backprop | – |" in table
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "– = diverged" in capsys.readouterr().out


def test_missing_cifar10_gives_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["compare", *TINY, "--dataset", "cifar10", "--data-dir", str(missing)])
    assert code == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "cifar-10-batches-py" in error
    assert "Traceback" not in error


def test_presets_carry_the_paper_settings_and_flags_override_them():
    parser = build_parser()
    fig2 = resolve_config(parser.parse_args(["compare", "--preset", "fig2"]))
    assert fig2["dataset"] == "cifar10" and fig2["batch_size"] == 500 and fig2["epochs"] == 50
    assert (fig2["lr_backprop"], fig2["lr_proxprop"], fig2["tau_prox"]) == (0.05, 1.0, 0.05)
    assert fig2["momentum"] == 0.95 and fig2["methods"] == [
        "backprop",
        "exact",
        "cg3",
        "cg5",
        "cg10",
    ]
    fig3 = resolve_config(parser.parse_args(["compare", "--preset", "fig3", "--epochs", "3"]))
    assert fig3["model"] == "cnn" and fig3["optimizer"] == "adam" and fig3["epochs"] == 3
    table1 = resolve_config(parser.parse_args(["sweep", "--preset", "table1"]))
    assert table1["lrs"] == [50, 10, 5, 1, 0.5, 0.1, 0.05, 5e-3, 5e-4]
    assert table1["tau_prox"] == 1.0 and table1["methods"] == ["backprop", "cg1", "cg3", "cg5"]
    assert set(PRESETS["compare"]) == {"fig2", "fig3"}


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--methods", "cg0"],
        ["compare", "--methods", "adam"],
        ["compare", "--epochs", "0"],
        ["sweep", "--lrs", "-1"],
    ],
)
def test_bad_flags_are_reported_not_raised(argv, capsys):
    assert main([*argv, "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err


def test_module_and_console_entry_points():
    help_text = subprocess.run(
        [sys.executable, "-m", "proxoptim", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "compare" in help_text and "sweep" in help_text
