"""The README's usage example and the scripts in examples/ run as written."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

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


def _torchrun(script: str, *args: str) -> subprocess.CompletedProcess:
    # --standalone: torchrun picks a free port on localhost (no clash with other runs).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "examples" / script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_ddp_example_runs_under_torchrun_with_identical_replicas():
    assert "replicas identical: True" in _torchrun("ddp_train.py", "--steps", "5").stdout


def test_fsdp_example_runs_under_torchrun_and_matches_one_process():
    result = _torchrun("fsdp_train.py", "--steps", "5")
    assert "directions match single process: True" in result.stdout


def _cifar_fixtures() -> ModuleType:
    """tests/experiments/cifar_fixtures.py, the tiny-dataset writers shared with test_data.py
    (loaded by path: tests/experiments is not on sys.path when only this file runs)."""
    name = "cifar_fixtures"
    if name not in sys.modules:
        path = ROOT / "tests" / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


@pytest.fixture(scope="module")
def tiny_cifar10(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CIFAR-10 look-alike of 32x32 JPEGs, 3 train and 1 test image per class: as an
    ImageFolder tree (``folder/train/<class>/*.jpg``, ``folder/test/...``) and as a .tar.gz
    of it (with a top-level folder, as the JPEG copies are packed)."""
    fixtures = _cifar_fixtures()
    root = tmp_path_factory.mktemp("tiny_cifar10")
    fixtures.write_imagefolder(root / "folder", n_train=3, n_test=1, suffix=".jpg")
    archive = fixtures.make_tar(root / "cifar10-jpeg.tar.gz", root / "folder", "cifar10")
    return {"folder": root / "folder", "archive": archive}


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_resnet18_example_swaps_only_the_optimizer(layout, tiny_cifar10, tmp_path):
    cache = tmp_path / "cache"  # never ~/.cache: PROXOPTIM_CACHE points the decode cache here
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "resnet18_cifar10.py"),
            "--data-dir",
            str(tiny_cifar10[layout]),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PROXOPTIM_CACHE": str(cache)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Adam " in result.stdout and "ProxProp(Adam), cg3" in result.stdout
    assert len(list((cache / "cifar10").glob("cifar10-*.pt"))) == 1  # decoded once, cached


def test_resnet18_example_without_data_says_what_to_do(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "resnet18_cifar10.py"),
            "--data-dir",
            str(tmp_path / "empty"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PROXOPTIM_CACHE": str(tmp_path / "cache")},
    )
    assert result.returncode == 2
    assert "--download" in result.stderr and "cifar-10-batches-py" in result.stderr
    assert "Traceback" not in result.stderr


def test_amp_example_runs_with_grad_scaler():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "amp_train.py"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "cosine(v, g) of layer 0" in result.stdout
