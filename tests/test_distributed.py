"""Real multi-process DistributedDataParallel runs (gloo on CPU) against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from distributed_worker import PER_RANK, make_model, optimizer_for, train
from oracle import relative_error

from proxoptim import ProxPropOptimizer

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(script: Path, args: list[str], world_size: int) -> None:
    """Runs ``script`` with ``args`` as ``world_size`` gloo ranks on localhost (one thread
    each) and waits for all of them; fails with a rank's output if it fails."""
    port = str(free_port())
    processes = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(script), *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output


def run_ranks(
    tmp_path: Path, world_size: int, mode: str, steps: int, solver: str = "cg", bare: bool = False
):
    args = [str(tmp_path), mode, str(steps), solver] + (["bare"] if bare else [])
    launch_ranks(WORKER, args, world_size)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]


def single_process(world_size: int, steps: int, solver: str = "cg"):
    model = make_model()
    opt = optimizer_for(model, solver=solver)
    train(model, opt, steps, world_size)
    return opt.inner.seen[0], [p.detach() for p in model.parameters()], opt


@pytest.mark.parametrize(
    ("world_size", "solver", "bare"), [(2, "cg", False), (3, "cg", False), (2, "exact", True)]
)
def test_global_mode_equals_one_process_on_the_concatenated_batch(
    tmp_path, world_size, solver, bare
):
    ranks = run_ranks(tmp_path, world_size, "global", steps=6, solver=solver, bare=bare)
    expected, expected_params, opt = single_process(world_size, steps=6, solver=solver)
    assert {"0", "3", "5"} <= set(opt.last_stats)  # conv, and Linear layers preconditioned
    for result in ranks:
        for direction, reference in zip(result["directions"], expected, strict=True):
            assert relative_error(direction, reference) <= 1e-6
        forms = {name: s.form for name, s in opt.last_stats.items()}
        if forms["0"] == "dual":
            # A convolution's dual form needs every rank's patches: across ranks the conv
            # runs the cheapest of the other forms (the same direction).
            assert result["forms"].pop("0") in ("primal", "matrix_free")
            forms.pop("0")
        assert result["forms"] == forms
    # Replicas stay bit-identical, and on the single-process trajectory.
    for result in ranks[1:]:
        for mine, theirs in zip(result["parameters"], ranks[0]["parameters"], strict=True):
            assert torch.equal(mine, theirs)
    for mine, reference in zip(ranks[0]["parameters"], expected_params, strict=True):
        assert relative_error(mine, reference) <= 1e-6


def test_local_mode_averages_per_rank_directions(tmp_path):
    ranks = run_ranks(tmp_path, 2, "local", steps=4)
    for result in ranks[1:]:
        for mine, theirs in zip(result["parameters"], ranks[0]["parameters"], strict=True):
            assert torch.equal(mine, theirs)
        for mine, theirs in zip(result["directions"], ranks[0]["directions"], strict=True):
            assert torch.equal(mine, theirs)
    # A different preconditioner from the global one, and still a descent direction.
    global_directions, _, _ = single_process(2, steps=1)
    gradients, _, _ = single_process(2, steps=1, solver="none")
    local = ranks[0]["directions"]
    assert any(
        relative_error(mine, reference) > 1e-6
        for mine, reference in zip(local, global_directions, strict=True)
    )
    assert sum(float((v * g).sum()) for v, g in zip(local, gradients, strict=True)) > 0


def test_distributed_modes_need_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        ProxPropOptimizer(make_model(), torch.optim.SGD, lr=0.1, distributed="global")
    with pytest.raises(ValueError, match="distributed mode"):
        ProxPropOptimizer(make_model(), torch.optim.SGD, lr=0.1, distributed="everywhere")
    assert ProxPropOptimizer(make_model(), torch.optim.SGD, lr=0.1).distributed is None
    assert PER_RANK >= 1


class _Ranks:
    def __init__(self, world_size):
        self.world_size = world_size


def test_solving_ranks_spread_linear_layers_round_robin_in_global_mode_only():
    """Linear layers (no communication once gathered) go round-robin over the ranks in
    layer order; convolutions (which all-reduce) are solved by every rank alike."""
    from proxoptim.distributed import solving_ranks

    communicates = [True, False, False, True, False]
    assert solving_ranks(communicates, "global", _Ranks(2)) == [None, 0, 1, None, 0]
    assert solving_ranks(communicates, "global", _Ranks(3)) == [None, 0, 1, None, 2]
    assert solving_ranks(communicates, "local", _Ranks(2)) == [None] * 5
    assert solving_ranks(communicates, None, None) == [None] * 5
