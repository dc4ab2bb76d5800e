"""Where a result came from: the code (git commit and whether the tree was dirty), the
machine and the versions.

Every results file the experiments and benchmarks write starts from :func:`provenance`, so a
number in the docs can always be traced to the commit and command that produced it. A
result from a dirty tree is still recorded, but says so: it cannot be reproduced from the
commit alone.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_model", "git_state", "provenance", "provenance_comment"]


# Changes that cannot change a number: prose, and the results a reproduction run writes as
# it goes (benchmarks/reproduce_cpu.sh rewrites docs/results/ between its own steps).
_NOT_CODE = (":(top)", ":(exclude,top)docs", ":(exclude,top)*.md")


def git_state(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The commit checked out at ``path`` (default: this package's source tree) and whether
    tracked code differs from it (``docs/`` and Markdown files do not count). ``{"commit":
    None, "dirty": None}`` outside a git checkout (an installed wheel) or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *_NOT_CODE],
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` is often empty
    on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(command: str | None = None) -> dict[str, Any]:
    """The code, machine and versions a result was produced with.

    Args:
        command: the command line that produced it; default this process's own
            (``sys.argv``).
    """
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    from proxoptim import __version__

    info: dict[str, Any] = {
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "machine": {
            "cpu": cpu_model(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {
            "proxoptim": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    return info


def provenance_comment(command: str | None = None, info: dict[str, Any] | None = None) -> str:
    """:func:`provenance` as one Markdown comment line, for the first line of a results table:
    ``<!-- commit 0123abc (clean), 2026-12-03T10:00:00+00:00, `python benchmarks/x.py` ... -->``.

    ``info``: a :func:`provenance` taken earlier (a long run takes it when it starts: the
    checkout may move on while it runs, and its code is what it imported then)."""
    info = provenance(command) if info is None else info
    if info["commit"] is None:
        code = "commit unknown (not a git checkout)"
    else:
        code = f"commit {info['commit'][:12]} ({'dirty' if info['dirty'] else 'clean'})"
    machine = info["machine"]
    where = machine["gpu"] or machine["cpu"]
    return (
        f"<!-- {code}, {info['created']}, `{info['command']}`; {where}, "
        f"{machine['cpu_threads']} threads, torch {info['versions']['torch']} -->"
    )
