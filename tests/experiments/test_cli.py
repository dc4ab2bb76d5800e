"""The main job end to end on digits with tiny settings."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cifar_fixtures import write_imagefolder

from proxoptim.experiments import cli
from proxoptim.experiments.cli import (
    PRESETS,
    ConfigError,
    build_parser,
    check_optimizers,
    main,
    resolve_config,
)

ROOT = Path(__file__).resolve().parents[2]

TINY = ["--epochs", "2", "--width", "0.05", "--batch-size", "200", "--quiet"]


def test_compare_writes_results_curves_and_table(tmp_path, capsys):
    out = tmp_path / "compare"
    code = main(["compare", *TINY, "--methods", "backprop,cg2,exact", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| backprop |" in printed and "| cg2 |" in printed and "| exact |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["subcommand"] == "compare"
    assert results["command"].startswith("proxoptim compare --epochs 2 ")
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
    summary = (out / "summary.md").read_text().splitlines()
    assert summary[0].startswith("<!-- commit ") and "proxoptim compare" in summary[0]
    assert summary[2].startswith("| method |")


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
    assert table.startswith("<!-- commit ") and "proxoptim sweep" in table.splitlines()[0]
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert "– = diverged" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_results_name_the_commit_the_run_started_from(command, tmp_path, monkeypatch):
    # A long run imports its code when it starts; the checkout may move on while it runs.
    # Its results must name the starting commit, not the one checked out at the end.
    from proxoptim.experiments import provenance as provenance_module

    real = provenance_module.provenance
    commits = iter(["a" * 40, "b" * 40, "c" * 40, "d" * 40])

    def moving_checkout(command=None):
        return {**real(command), "commit": next(commits), "dirty": False}

    monkeypatch.setattr(cli, "provenance", moving_checkout)
    monkeypatch.setattr(provenance_module, "provenance", moving_checkout)
    out = tmp_path / command
    flags = ["--methods", "cg1", "--epochs", "1", "--train-subset", "200", "--out", str(out)]
    if command == "sweep":
        flags += ["--lrs", "0.1"]
    assert main([command, *TINY[2:], *flags]) == 0
    name, table = (
        ("results.json", "summary.md") if command == "compare" else ("sweep.json", "table.md")
    )
    assert json.loads((out / name).read_text())["commit"] == "a" * 40
    assert (out / table).read_text().startswith("<!-- commit aaaaaaaaaaaa (clean)")


def test_a_tau_grid_sweep_runs_every_proxprop_method_at_every_tau(tmp_path, capsys):
    # Backprop runs once per lr (τθ does not reach it); each ProxProp cell of the grid is
    # the run a one-τθ sweep at that τθ makes, bit for bit: the grid's τθ reaches the
    # optimizer, and the cells are not mixed up.
    flags = [*TINY, "--methods", "backprop,cg1", "--lrs", "1,0.1", "--train-subset", "300"]
    grid = tmp_path / "grid"
    assert main(["sweep", *flags, "--tau-proxes", "0.02,2", "--out", str(grid)]) == 0
    results = json.loads((grid / "sweep.json").read_text())
    assert results["tau_proxes"] == [0.02, 2.0]
    planned = [(c["method"], c["tau_prox"], c["lr"]) for c in results["grid"]]
    assert planned == [
        ("backprop", None, 1.0),
        ("backprop", None, 0.1),
        ("cg1", 0.02, 1.0),
        ("cg1", 0.02, 0.1),
        ("cg1", 2.0, 1.0),
        ("cg1", 2.0, 0.1),
    ]
    assert len(results["runs"]) == 6
    for tau in (0.02, 2.0):
        single = tmp_path / f"tau{tau}"
        assert main(["sweep", *flags, "--tau-prox", str(tau), "--out", str(single)]) == 0
        alone = json.loads((single / "sweep.json").read_text())["final_train_loss"]["cg1"]
        cells = [c["final_train_loss"] for c in results["grid"] if c["tau_prox"] == tau]
        assert cells == alone
    losses = {
        tau: [c["final_train_loss"] for c in results["grid"] if c["tau_prox"] == tau]
        for tau in (0.02, 2.0)
    }
    assert losses[0.02] != losses[2.0]  # τθ changes the run
    table = (grid / "table.md").read_text()
    assert "| method | τθ | 1 | 0.1 |" in table and "| cg1 | 2 |" in table
    assert "Best validation accuracy" in table
    assert (grid / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert "heatmap.png" in capsys.readouterr().out
    # --replot redraws both figures from sweep.json alone, training nothing.
    (grid / "heatmap.png").unlink()
    (grid / "sweep.png").unlink()
    assert main(["sweep", "--replot", str(grid)]) == 0
    assert (grid / "heatmap.png").read_bytes().startswith(b"\x89PNG")
    assert (grid / "sweep.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((grid / "sweep.json").read_text()) == results
    assert main(["sweep", "--replot", str(tmp_path)]) == 2


def _git_head() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.mark.parametrize("command", ["compare", "sweep"])
def test_results_record_commit_machine_and_wall_time(command, tmp_path):
    out = tmp_path / command
    flags = ["--methods", "backprop,cg1", "--epochs", "1", "--train-subset", "200"]
    if command == "sweep":
        flags += ["--lrs", "0.1"]
    assert main([command, *TINY[2:], *flags, "--out", str(out)]) == 0
    name = "results.json" if command == "compare" else "sweep.json"
    results = json.loads((out / name).read_text())
    assert {"commit", "dirty", "machine", "wall_seconds", "created", "versions"} <= set(results)
    if _git_head() is not None:  # inside a git checkout (as the tests run from the repo)
        assert re.fullmatch(r"[0-9a-f]{40}", results["commit"])
        assert isinstance(results["dirty"], bool)
    else:
        assert results["commit"] is None
    assert results["machine"]["cpu"] and results["machine"]["cpu_threads"] >= 1
    assert "gpu" in results["machine"]
    assert results["wall_seconds"] > 0
    assert {"torch", "proxoptim", "python", "platform"} <= set(results["versions"])
    assert results["command"].startswith(f"proxoptim {command} ")
    assert results["subcommand"] == command


def test_compare_on_a_tiny_cifar10_imagefolder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROXOPTIM_CACHE", str(tmp_path / "cache"))
    write_imagefolder(tmp_path / "cifar", n_train=2, n_test=1, suffix=".jpg")
    out = tmp_path / "out"
    code = main(
        ["compare", *TINY, "--epochs", "1", "--batch-size", "6", "--methods", "backprop,cg1"]
        + ["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar"), "--out", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"]["input_shape"] == [3, 32, 32]
    assert (results["dataset"]["train"], results["dataset"]["val"]) == (18, 2)
    assert list((tmp_path / "cache" / "cifar10").glob("cifar10-*.pt"))


def test_missing_cifar10_gives_one_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["compare", *TINY, "--dataset", "cifar10", "--data-dir", str(missing)])
    assert code == 2
    error = capsys.readouterr().err
    assert str(missing) in error and "Traceback" not in error
    # What a user can do: download, or bring a copy in one of the accepted layouts.
    assert "--download" in error and "cifar-10-batches-py/" in error
    assert "train/<class>/" in error and "test/<class>/" in error and ".tar.gz" in error
    assert "/work/" not in error.replace(str(tmp_path), "")  # no development-machine path
    assert not list(tmp_path.iterdir())  # no run folder either


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


@pytest.fixture
def no_work(monkeypatch):
    """Loading data or training anything fails the test: bad flags must stop before both."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a bad flag got past the checks: data loaded or training began")

    monkeypatch.setattr(cli, "load_dataset", forbidden)
    monkeypatch.setattr(cli, "train", forbidden)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["compare", "--tau-prox", "-1"], "--tau-prox"),
        (["compare", "--tau-prox", "nan"], "--tau-prox"),
        (["compare", "--dataset", "cifar10", "--tau-prox", "0"], "--tau-prox"),
        (["compare", "--lr", "-1"], "--lr"),
        (["compare", "--lr-proxprop", "0"], "--lr-proxprop"),
        (["compare", "--lr-backprop", "inf"], "--lr-backprop"),
        (["compare", "--methods", "backprop,cg0"], "--methods"),  # 0 CG iterations
        (["compare", "--methods", "adam"], "--methods"),
        (["compare", "--methods", ","], "--methods"),
        (["compare", "--momentum", "0"], "--momentum"),
        (["compare", "--epochs", "0"], "--epochs"),
        (["compare", "--batch-size", "0"], "--batch-size"),
        (["compare", "--width", "0"], "--width"),
        (["compare", "--device", "tpu"], "--device"),
        (["sweep", "--tau-prox", "-1"], "--tau-prox"),
        (["sweep", "--lrs", "-1"], "--lrs"),
        (["sweep", "--lrs", "1,nan"], "--lrs"),
        (["sweep", "--lrs", "1,fast"], "--lrs"),
        (["sweep", "--tau-proxes", "0.1,0"], "--tau-proxes"),
        (["sweep", "--tau-proxes", "0.1,big"], "--tau-proxes"),
        (["sweep", "--methods", "cg0"], "--methods"),
        (["sweep", "--train-subset", "0"], "--train-subset"),
    ],
)
def test_bad_flags_fail_before_any_data_or_training(argv, flag, tmp_path, capsys, no_work):
    out = tmp_path / "run"
    assert main([*argv, "--quiet", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"proxoptim {argv[0]}: error: ") and flag in error
    assert "Traceback" not in error
    assert not out.exists()  # no run folder, no results


def test_every_optimizer_is_built_before_the_first_step(tmp_path, monkeypatch):
    events: list[tuple[str, ...]] = []
    real_build, real_load, real_train = cli.make_optimizer, cli.load_dataset, cli.train

    def build(model, method, *args):
        events.append(("build", method.name, str(args[1])))
        return real_build(model, method, *args)

    def load(*args, **kwargs):
        events.append(("load",))
        return real_load(*args, **kwargs)

    def train(factory, splits, method, **kwargs):
        events.append(("train", method.name, str(kwargs["lr"])))
        return real_train(factory, splits, method, **kwargs)

    monkeypatch.setattr(cli, "make_optimizer", build)
    monkeypatch.setattr(cli, "load_dataset", load)
    monkeypatch.setattr(cli, "train", train)
    argv = ["sweep", *TINY[2:], "--epochs", "1", "--train-subset", "100"]
    argv += ["--methods", "backprop,cg1", "--lrs", "0.1,0.01", "--out", str(tmp_path / "s")]
    assert main(argv) == 0
    runs = [("backprop", "0.1"), ("backprop", "0.01"), ("cg1", "0.1"), ("cg1", "0.01")]
    assert events == [
        *(("build", *run) for run in runs),
        ("load",),
        *(("train", *run) for run in runs),
    ]


def test_an_optimizer_that_refuses_its_arguments_is_named_by_flag(monkeypatch):
    config = resolve_config(build_parser().parse_args(["compare", "--methods", "backprop,cg3"]))
    config["tau_prox"] = -1.0  # past resolve_config's own checks: the optimizer refuses it
    with pytest.raises(ConfigError, match=r"^--tau-prox: .*cg3.*tau_prox must be"):
        check_optimizers(config, (1, 8, 8))
    config["tau_prox"], config["lr_proxprop"] = 1.0, -1.0
    with pytest.raises(ConfigError, match=r"^--lr: .*Invalid learning rate"):
        check_optimizers(config, (1, 8, 8))


def test_module_and_console_entry_points():
    help_text = subprocess.run(
        [sys.executable, "-m", "proxoptim", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "compare" in help_text and "sweep" in help_text


def _curves(
    out: Path, name: str = "results.json"
) -> list[tuple[str, float, list[tuple[float, float, float]], int]]:
    """Every run's epoch records (loss, val, test: exact floats) and its step count."""
    runs = json.loads((out / name).read_text())["runs"]
    return [
        (
            run["method"],
            run["lr"],
            [(e["train_loss"], e["val_accuracy"], e["test_accuracy"]) for e in run["epochs"]],
            len(run["step_seconds"]),
        )
        for run in runs
    ]


def _killed_at_second_write(monkeypatch, argv: list[str], name: str) -> None:
    """Runs ``main(argv)`` and kills it (KeyboardInterrupt) right after the second
    checkpoint file called ``name`` is written, before it replaces the previous one."""
    import torch

    save = torch.save
    written = []

    def killed(state, path, *args, **kwargs):
        save(state, path, *args, **kwargs)
        written.append(Path(path).name)
        if written.count(name) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(torch, "save", save)


def test_an_interrupted_compare_resumes_to_the_same_curves(tmp_path, monkeypatch):
    # The process is killed (here: KeyboardInterrupt) while the cg3 run's second epoch
    # checkpoint is written (after the .partial file, before it replaces the first one);
    # --resume then continues from the last whole checkpoint, finishes cg3 and runs the
    # methods after it. Every epoch's
    # loss and accuracies equal the uninterrupted run's bit for bit: model, optimizer
    # state, batch order and torch's random state all come back.
    argv = ["compare", *TINY, "--epochs", "3", "--methods", "backprop,cg3,exact"]
    main([*argv, "--out", str(tmp_path / "whole")])

    cut = tmp_path / "cut"
    _killed_at_second_write(monkeypatch, [*argv, "--out", str(cut)], "cg3.pt.partial")
    assert not (cut / "results.json").exists()
    written_files = {p.name for p in (cut / "checkpoints").iterdir()}
    assert written_files == {"backprop.pt", "cg3.pt", "cg3.pt.partial"}
    begun = (cut / "config.json").stat().st_mtime_ns

    assert main(["compare", "--resume", str(cut)]) == 0
    # The run's config.json stays as first written: its time dates the run's start.
    assert (cut / "config.json").stat().st_mtime_ns == begun
    assert _curves(cut) == _curves(tmp_path / "whole")
    # Both processes are on record, and the wall time is theirs together: the killed one
    # ended when it wrote its last whole checkpoint.
    results = json.loads((cut / "results.json").read_text())
    killed, resumed = results["sessions"]
    assert killed["started"] < killed["ended"] <= resumed["started"] <= resumed["ended"]
    assert {"commit", "dirty", "machine"} <= set(resumed)
    assert (
        results["wall_seconds"]
        >= (killed["ended"] - killed["started"]) + (resumed["ended"] - resumed["started"]) - 1e-3
    )
    # A finished run resumes to itself without training again.
    assert main(["compare", "--resume", str(cut)]) == 0
    assert _curves(cut) == _curves(tmp_path / "whole")


def test_an_interrupted_sweep_resumes_to_the_same_cells(tmp_path, monkeypatch):
    # Killed while the cg1 lr=0.1 cell writes its second epoch checkpoint, after two cells
    # (one diverged) have finished; --resume reads the finished cells back, continues the
    # interrupted one from its last whole checkpoint and runs the rest. Every cell's curve
    # equals the uninterrupted sweep's bit for bit.
    argv = ["sweep", *TINY, "--epochs", "3", "--methods", "backprop,cg1", "--lrs", "1e4,0.1"]
    main([*argv, "--out", str(tmp_path / "whole")])

    cut = tmp_path / "cut"
    _killed_at_second_write(monkeypatch, [*argv, "--out", str(cut)], "cg1_lr0.1_tau1.pt.partial")
    assert not (cut / "sweep.json").exists()
    assert {p.name for p in (cut / "cells").iterdir()} == {
        "backprop_lr10000.json",
        "backprop_lr0.1.json",
        "cg1_lr10000_tau1.json",
    }
    assert {p.name for p in (cut / "checkpoints").iterdir()} == {
        "cg1_lr0.1_tau1.pt",
        "cg1_lr0.1_tau1.pt.partial",
    }

    def trained(*args, **kwargs):
        calls.append(args[2:4])  # method, lr
        return run(*args, **kwargs)

    run, calls = cli._run, []
    monkeypatch.setattr(cli, "_run", trained)
    assert main(["sweep", "--resume", str(cut)]) == 0
    assert calls == [("cg1", 0.1)]  # only the interrupted cell trains again
    assert _curves(cut, "sweep.json") == _curves(tmp_path / "whole", "sweep.json")
    whole, resumed = (json.loads((d / "sweep.json").read_text()) for d in (tmp_path / "whole", cut))
    assert resumed["grid"] == whole["grid"]
    assert len(resumed["sessions"]) == 2
    # A finished cell's checkpoint is gone: only its record is kept.
    assert not any((cut / "checkpoints").glob("*.pt"))


def test_resume_of_a_folder_without_a_run_is_refused(tmp_path, capsys):
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_names_the_command_of_the_run_it_is_given(tmp_path, capsys):
    out = tmp_path / "sweep"
    flags = ["--methods", "backprop", "--lrs", "0.1", "--epochs", "1", "--out", str(out)]
    assert main(["sweep", *TINY[2:], *flags]) == 0
    capsys.readouterr()
    assert main(["compare", "--resume", str(out)]) == 2
    assert f"proxoptim sweep --resume {out}" in capsys.readouterr().err
