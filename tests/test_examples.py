"""The README's usage example and the scripts in examples/ run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["opt"].last_stats["0"].iterations == 3


def test_quickstart_runs_and_reports_both_optimizers():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "backprop/Adam" in result.stdout and "proxprop-cg3/Adam" in result.stdout


def test_ddp_example_runs_under_torchrun_with_identical_replicas():
    # --standalone: torchrun picks a free port on localhost (no clash with other runs).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / "ddp_train.py"),
            "--steps",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replicas identical: True" in result.stdout


def test_resnet18_example_swaps_only_the_optimizer():
    shared = ROOT.parent / "shared" / "data"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "resnet18_cifar10.py"),
            "--data-dir",
            str(shared),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--train-subset",
            "32",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert "Adam " in result.stdout and "ProxProp(Adam), cg3" in result.stdout


def test_amp_example_runs_with_grad_scaler():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "amp_train.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "cosine(v, g) of layer 0" in result.stdout
