"""Provenance of results: the commit, whether code differed from it, the machine."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from proxoptim.experiments.provenance import git_state, provenance, provenance_comment

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@needs_git
def test_dirty_means_code_differs_from_the_commit_not_docs(tmp_path):
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "docs" / "results" / "table.md").write_text("| a |\n")
    (tmp_path / "README.md").write_text("hello\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "start")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()

    # Asked from a subfolder, as the package asks from its own source folder.
    assert git_state(tmp_path / "pkg") == {"commit": head, "dirty": False}
    # A reproduction run rewrites docs/results and the docs are edited beside it: not code.
    (tmp_path / "docs" / "results" / "table.md").write_text("| b |\n")
    (tmp_path / "README.md").write_text("changed\n")
    (tmp_path / "pkg" / "new_untracked.py").write_text("y = 2\n")
    assert git_state(tmp_path / "pkg") == {"commit": head, "dirty": False}
    # A changed tracked source file anywhere in the tree is.
    (tmp_path / "code_at_top.py").write_text("z = 3\n")
    _git(tmp_path, "add", "code_at_top.py")
    assert git_state(tmp_path / "pkg")["dirty"] is True


def test_outside_a_checkout_commit_and_dirty_are_unknown(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}


def test_provenance_names_command_machine_and_versions():
    info = provenance("proxoptim compare --epochs 1")
    assert info["command"] == "proxoptim compare --epochs 1"
    assert info["machine"]["cpu"] and info["machine"]["cpu_threads"] >= 1
    assert info["versions"]["torch"]
    comment = provenance_comment("python benchmarks/targets.py")
    assert comment.startswith("<!-- ") and comment.endswith(" -->")
    assert "`python benchmarks/targets.py`" in comment
    if info["commit"] is not None:
        assert re.search(r"commit [0-9a-f]{12} \((clean|dirty)\)", comment)
