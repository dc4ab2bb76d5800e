"""ProxProp on ``fully_shard`` (FSDP2) models, in real multi-process gloo runs on the CPU.

Each rank solves the rows it owns (proxoptim.distributed, "sharded" mode); its direction
must equal, row for row, the one a single process computes on the concatenation of all
ranks' batches, in every solve form, over several steps, with 2 and 3 ranks and row counts
that do not divide (tests/fsdp_worker.py makes a rank hold no row of two layers).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fsdp_worker import CASES, adaptive_optimizer_for, make_model, optimizer_for, train
from oracle import relative_error
from test_distributed import launch_ranks
from torch import nn

from proxoptim.distributed import ShardedRows, refuse_fsdp1

WORKER = Path(__file__).with_name("fsdp_worker.py")


def run_ranks(out: Path, world_size: int) -> list[dict]:
    launch_ranks(WORKER, [str(out)], world_size)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world_size = request.param
    return world_size, run_ranks(tmp_path_factory.mktemp(f"fsdp{world_size}"), world_size)


@pytest.mark.parametrize(("solver", "form"), CASES)
def test_each_rank_solves_its_rows_as_one_process_on_all_batches(ranks, solver, form):
    # float64: the forms agree to ~1e-12 (dual against primal); 1e-9 leaves room and still
    # fails on any wrong row, column of δ, or missing rank's batch (errors of order 1).
    world_size, results = ranks
    model = make_model()
    opt = optimizer_for(model, solver, form)
    train(model, opt, world_size)
    forms = {name: stats.form for name, stats in opt.last_stats.items()}
    for result in results:
        case = result["cases"][(solver, form)]
        assert len(case["seen"]) == len(opt.inner.seen) == 3
        for seen, expected in zip(case["seen"], opt.inner.seen, strict=True):
            for got, want in zip(seen, expected, strict=True):
                assert relative_error(got, want) <= 1e-9
        for got, want in zip(case["final"], model.parameters(), strict=True):
            assert relative_error(got, want.detach()) <= 1e-9
        # The form asked for ran, except on the convolutions: their rows split over ranks
        # can only use the all-reduced Gram. (Under "auto" each rank prices its own row
        # count, so its choice may differ from one process's; the direction may not.)
        if form != "auto":
            for name, ran in case["forms"].items():
                assert ran == ("primal" if name in ("0", "2") else forms[name]), (name, ran)


@pytest.mark.parametrize("inner", [torch.optim.Adam, torch.optim.AdamW])
def test_stateful_inner_optimizers_step_the_dtensor_parameters_alike(ranks, inner):
    world_size, results = ranks
    model = make_model()
    train(model, adaptive_optimizer_for(model, inner), world_size)
    for result in results:
        for got, want in zip(result[inner.__name__], model.parameters(), strict=True):
            assert relative_error(got, want.detach()) <= 1e-9


def test_gradient_accumulation_without_sync_is_the_summed_system(ranks):
    # Two micro-batches per step, the first under set_requires_gradient_sync(False): the
    # direction is that of one process over every rank's micro-batches together.
    world_size, results = ranks
    model = make_model()
    opt = optimizer_for(model, "exact", "auto")
    train(model, opt, world_size, micro_batches=2)
    for result in results:
        for seen, expected in zip(result["accumulation"]["seen"], opt.inner.seen, strict=True):
            for got, want in zip(seen, expected, strict=True):
                assert relative_error(got, want) <= 1e-9


def test_mixed_precision_policy_gives_the_float32_direction_to_bfloat16_accuracy(ranks):
    # bf16 parameters and forward (MixedPrecisionPolicy), float32 reduce: inputs, δ and the
    # gradient carry bf16's rounding (2^-9 relative), which the solve amplifies: measured
    # up to 0.15 relative on the first step (a dual-form layer, its kernel from bf16
    # inputs), about 1e-2 elsewhere. The plain gradient lies more than 1 away from the
    # direction on every preconditioned parameter, so the bound fails if a solve is
    # skipped or wrong by a factor.
    world_size, results = ranks
    model = make_model(torch.float32)
    opt = optimizer_for(model, "exact", "auto")
    train(model, opt, world_size, dtype=torch.float32)
    plain_model = make_model(torch.float32)
    plain = optimizer_for(plain_model, "none", "auto")
    train(plain_model, plain, world_size, dtype=torch.float32)
    first, gradients = opt.inner.seen[0], plain.inner.seen[0]
    preconditioned = len(first) - 2  # (the output layer, last, keeps its gradient)
    for gradient, want in zip(gradients[:preconditioned], first[:preconditioned], strict=True):
        assert relative_error(gradient, want) > 1.0
    for result in results:
        got = result["mixed_precision"]["seen"][0]
        for direction, want in zip(got, first, strict=True):
            assert relative_error(direction, want) <= 0.25


def test_unsupported_sharding_is_refused_clearly(ranks):
    _, results = ranks
    refusals = results[0]["refusals"]
    assert "2-D device mesh (HSDP" in refusals["hsdp"] and "1-D mesh" in refusals["hsdp"]
    assert "solve_in_backward" in refusals["in_backward"]
    assert "distributed='global' does not apply" in refusals["global"]
    assert "pass distributed=None" in refusals["global"]


def test_fsdp1_is_refused_with_a_pointer_to_fully_shard():
    from torch.distributed.fsdp import FullyShardedDataParallel

    # FSDP1 cannot be built without an accelerator; its type is what is refused.
    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    model = nn.Sequential(nn.Linear(3, 3))
    model.add_module("wrapped", wrapper)
    with pytest.raises(ValueError, match="FSDP1.*fully_shard"):
        refuse_fsdp1(model)
    refuse_fsdp1(nn.Sequential(nn.Linear(3, 3)))  # nothing to refuse


def test_sharded_rows_slice_delta_by_output_unit_or_channel():
    rows = ShardedRows(start=2, stop=4, total=5)
    linear_delta = torch.arange(15.0).reshape(3, 5)
    assert torch.equal(rows.columns_of(linear_delta, -1), linear_delta[:, 2:4])
    conv_delta = torch.arange(60.0).reshape(2, 5, 3, 2)
    assert torch.equal(rows.columns_of(conv_delta, 1), conv_delta[:, 2:4])
