"""This tree's step against another commit's, side by side in one process.

    python benchmarks/versus_commit.py 68cda8a                  # digits MLP, batch 100
    python benchmarks/versus_commit.py 68cda8a --methods exact,cg3 --repeats 61

Timing two versions in two processes on a noisy machine compares the machine's moods as
much as the code. Here the other commit's ``proxoptim`` package is extracted with
``git archive`` into a temporary folder under another name (``proxoptim_at_<commit>``,
its imports rewritten), imported beside this tree's, and both step the same network from
the same weights on the same batch, interleaved with plain backprop: every turn runs each
variant once. It prints each method's median step time and its ratio to backprop's, for
both versions. The network is the one ``proxoptim compare`` trains (MLP 64-400-100-400-10
on 8×8 inputs, Nesterov SGD, τθ = 0.05).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from step_ratio import interleaved_times
from torch import nn

import proxoptim
from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment

METHODS = {
    "none": {"solver": "none"},
    "exact": {"solver": "exact"},
    "cg3": {"solver": "cg", "cg_iters": 3},
    "cg10": {"solver": "cg", "cg_iters": 10},
}


def import_commit(commit: str, into: Path) -> object:
    """The ``proxoptim`` package of ``commit`` as a module of another name."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "archive", commit, "proxoptim"], cwd=root, capture_output=True, check=True
    ).stdout
    name = "proxoptim_at_" + re.sub(r"\W", "_", commit)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "proxoptim"
    for source in package.rglob("*.py"):
        text = source.read_text()
        text = re.sub(r"\bproxoptim\b(?=[.\s])", name, text)
        source.write_text(text)
    package.rename(into / name)
    sys.path.insert(0, str(into))
    return importlib.import_module(name)


def make_step(model: nn.Module, optimizer_class: type | None, x, y, **kwargs) -> Callable:
    inner = {"lr": 1e-6, "momentum": 0.95, "nesterov": True}
    if optimizer_class is None:
        opt = torch.optim.SGD(model.parameters(), **inner)
    else:
        opt = optimizer_class(model, torch.optim.SGD, tau_prox=0.05, **inner, **kwargs)

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("commit", help="the other commit (any git revision)")
    parser.add_argument("--methods", default="none,exact,cg3,cg10")
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(2)
    methods = args.methods.split(",")
    print(provenance_comment(f"python benchmarks/versus_commit.py {' '.join(sys.argv[1:])}"))
    with tempfile.TemporaryDirectory() as folder:
        other = import_commit(args.commit, Path(folder))
        torch.manual_seed(0)
        template = build_model("mlp", (1, 8, 8), 10, 0.1)
        x = torch.rand(args.batch_size, 1, 8, 8)
        y = torch.randint(0, 10, (args.batch_size,))
        steps = {"backprop": make_step(copy.deepcopy(template), None, x, y)}
        for method in methods:
            for label, package in ((args.commit, other), ("this tree", proxoptim)):
                steps[f"{method} ({label})"] = make_step(
                    copy.deepcopy(template), package.ProxPropOptimizer, x, y, **METHODS[method]
                )
        times = interleaved_times(steps, args.repeats, args.warmup)
    backprop = statistics.median(times["backprop"])
    print(f"digits MLP, batch {args.batch_size}, CPU 2 threads; median of {args.repeats} turns")
    print("| method | step [ms] | ratio to backprop |")
    print("|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {1000 * median:.2f} | {median / backprop:.2f} |")


if __name__ == "__main__":
    main()
