"""What the solve-form cost model charges for each kind of operation, per kind of device.

Every cost is in float32-GEMM-equivalent flops of the device it describes: a term ``c``
means "takes as long as a float32 matrix product of c flops would". Only ratios between
the forms matter (they all give the same direction), so each device needs its own table:
on a CPU, dense LAPACK calls and im2col copies are cheap next to the products and
dispatching an operator costs nothing worth counting; on a GPU the products are nearly
free at these sizes, and what a form costs is mostly how many operators it launches and
whether it calls an n × n eigendecomposition (milliseconds, whatever n).

Numbers and where they were measured:

* CPU: a 2-core AVX-512 VM (about 1e11 flop/s in float32 GEMM); see the comments below and
  ``python benchmarks/conv_gram_cost.py``.
* Accelerator: an NVIDIA H200 with torch 2.11 (``python benchmarks/gpu_check.py``, the
  "factorisations" and "forms" sections): float32 GEMM about 4e13 flop/s, one eager
  operator (dispatch and launch, host side) about 15 µs, float32 ``eigh`` of a 500 × 500
  matrix 12.6 ms (13 ms at 1000), a float64 Cholesky 0.3 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceCosts:
    """Cost-model constants of one kind of device, in float32-GEMM-equivalent flops.

    Attributes:
        name: "cpu" or "accelerator".
        operator_call: one eager tensor operation's fixed cost (dispatch, kernel launch).
        graph_operator_call: the same operation replayed inside a CUDA graph
            (``cuda_graphs=True``): no dispatch or launch, only the small kernel's own run.
        memory_byte: one byte read or written by an elementwise pass over a CG's vectors:
            0 on a CPU, where the fitted constants absorb it; on a GPU the products run so
            fast that the CG's passes over its layer-sized vectors cost as much.
        host_sync: reading one value back to the host mid-step (the device drains and
            then idles while the host queues the next work).
        eigh_fixed, eigh_per_square, eigh_per_cube: an n × n symmetric eigendecomposition
            costs ``eigh_fixed + eigh_per_square · n² + eigh_per_cube · n³``.
        cholesky_fixed: the fixed cost of a Cholesky factorisation (and solve) of any size.
        inverse_per_cube: the float64 Cholesky factorisation and inverse of an n × n
            kernel (the exact dual form), per n³.
        explicit_inverse: whether the exact dual form inverts I/τθ + K and multiplies
            (CPU: float64 triangular solves with thousands of right-hand sides are slow
            there) or solves for the coefficients with the Cholesky factor (accelerator:
            cuSOLVER's inverse takes about 1 ms at n = 500, the solves a tenth of that).
        conv_product_slowdown: a convolution (or its weight gradient) against a GEMM of the
            same flops.
        im2col_per_element: copying one element into an im2col patch matrix.
        float64_slowdown: a float64 GEMM against a float32 one of the same flops (the
            accelerator value is that of datacenter GPUs such as the H100/H200, whose
            float64 rate is about their non-TF32 float32 rate).
        row_blocks: whether the dual CG runs a block of rows at a time (its vectors stay in
            a CPU's caches; on an accelerator each block only adds launches).
        correlation_gram: whether the correlation-form Gram (proxoptim.conv_gram) may be
            chosen; its cost constants were fitted on a CPU, and on an accelerator its
            few hundred small operations cost more than one im2col GEMM.
        overlaps_host: whether the device works while the host dispatches (an
            accelerator's queue): an eager solve then costs the larger of its device work
            and its dispatching (:func:`combined`), not their sum as on a CPU.
        always_probe: whether the δ probe (proxoptim.dual) runs on every eligible layer;
            otherwise only where the product it can save outweighs its operators and host
            sync.
    """

    name: str
    operator_call: float
    graph_operator_call: float
    memory_byte: float
    host_sync: float
    eigh_fixed: float
    eigh_per_square: float
    eigh_per_cube: float
    cholesky_fixed: float
    inverse_per_cube: float
    explicit_inverse: bool
    conv_product_slowdown: float
    im2col_per_element: float
    float64_slowdown: float
    row_blocks: bool
    correlation_gram: bool
    overlaps_host: bool
    always_probe: bool


CPU = DeviceCosts(
    name="cpu",
    # About 5 µs per operator at about 1e11 flop/s: it matters only for tiny layers.
    operator_call=5e5,
    graph_operator_call=5e5,  # no graphs on a CPU
    memory_byte=0.0,
    host_sync=0.0,
    # eigh of n × n: far from n³ below n ≈ 300 (LAPACK's tridiagonal reduction is
    # memory-bound there). Fitted on the 2-core VM: 6e6 + 2000·n² + 6·n³ GEMM flops, within
    # 20% of `python benchmarks/cpu_kernels.py` from n = 32 to 300 and 40% above it at 500
    # (docs/results/cpu-kernels.md: 0.18, 0.93, 4.5 and 25 ms at n = 32, 100, 200 and 500,
    # float32 GEMM at 3.7e10 flop/s that day). The table before, 20·n³, was 1.7-10x too low
    # at n ≤ 100.
    eigh_fixed=6e6,
    eigh_per_square=2000.0,
    eigh_per_cube=6.0,
    # LAPACK's Cholesky factorisation and inverse, per n³.
    cholesky_fixed=0.0,
    inverse_per_cube=4.0,
    explicit_inverse=True,
    # Channels-last convolutions run at about 60% of GEMM speed for the channel counts
    # where matrix-free CG competes.
    conv_product_slowdown=1.7,
    # Building a Gram from patches copies every patch element once: about as long as 600
    # float32-GEMM flops per element.
    im2col_per_element=600.0,
    float64_slowdown=2.0,
    row_blocks=True,
    correlation_gram=True,
    overlaps_host=False,
    # The probe's O((m + n)·d) work and ~20 operators (at most about 0.1 ms) are noise
    # next to any CPU step.
    always_probe=True,
)

ACCELERATOR = DeviceCosts(
    name="accelerator",
    operator_call=6e8,  # 15 µs at 4e13 flop/s
    # A graphed dual cg3 step on the paper MLP ran ~250 small kernels at 2-4 µs each.
    graph_operator_call=1.6e8,
    memory_byte=10.0,  # about 4e12 bytes/s of elementwise traffic against 4e13 flop/s
    host_sync=2e10,  # 0.5 ms: the queue drains, then the device idles while the host works
    eigh_fixed=4e11,  # 10 ms
    eigh_per_square=0.0,
    eigh_per_cube=100.0,
    cholesky_fixed=1e10,  # 0.25 ms
    inverse_per_cube=4.0,
    explicit_inverse=False,
    # cuDNN at the paper CNN's 16-20 channels is far from GEMM speed (measured: im2col
    # primal CG beat matrix-free CG at every k there).
    conv_product_slowdown=4.0,
    im2col_per_element=5.0,  # a bandwidth-bound copy
    float64_slowdown=1.0,
    row_blocks=False,
    correlation_gram=False,
    overlaps_host=True,
    always_probe=False,
)


def device_costs(device: torch.device | str) -> DeviceCosts:
    """The cost table for tensors on ``device`` (every non-CPU device counts as an
    accelerator)."""
    return CPU if torch.device(device).type == "cpu" else ACCELERATOR


# Operators one training step dispatches for one preconditioned layer beyond backprop's, per
# form: (base, per CG iteration) for CG, and the exact solves' counts. Measured with a
# TorchDispatchMode counter by ``python benchmarks/form_operators.py`` (CPU; base and
# per-iteration fitted at 2 and 3 iterations: matrix-free 12 + 21 per iteration, primal
# 16 + 9, exact primal 26, exact dual 35 with its 13-operator δ probe; the dual CG's base,
# 25 in the eigenbasis without the probe, and its iterations are in DUAL_CG_CALLS). The
# step's own fixed operators (the fused finiteness check) are in every base;
# ``diagnostics=True`` adds about 30 per layer to every form alike. tests/test_benchmarks.py
# holds these to the code's counts.
OPERATOR_CALLS = {
    "matrix_free": (12, 21),
    "primal": (16, 9),
    "dual": (25, 0),
}
EXACT_OPERATOR_CALLS = {
    "primal": 26,
    "dual": 22,
}
# Per iteration and block of rows of the dual CG (proxoptim.plan.dual_cg_costs), by basis
# and by whether the δ form runs (True: proxoptim.cg.cg_recurrences on a diagonal) or the
# general one (False); measured as above.
DUAL_CG_CALLS = {
    ("eigenbasis", True): 9,
    ("eigenbasis", False): 36,
    ("coefficient", True): 17,
    ("coefficient", False): 36,
}
# Memory traffic of one CG iteration, in reads and writes per element of its large vectors
# (counted from the recurrences: each in-place update reads two and writes one, each row
# dot product reads two and writes a temporary, which the sum reads again), and the bytes
# of those elements: batched CG's (m, d) rows in the working dtype (matrix-free and primal
# forms), the dual CG's (m, n) coordinates (float64, but float32 in the eigenbasis δ form).
ROW_CG_ACCESSES = 23
DUAL_CG_ACCESSES = {
    ("eigenbasis", True): (20, 4),
    ("eigenbasis", False): (39, 8),
    ("coefficient", True): (24, 8),
    ("coefficient", False): (39, 8),
}
# Building a Gram from im2col patches: about five operators per chunk of patches.
PATCH_CHUNK_CALLS = 5
# The δ probe (proxoptim.dual.draw_probe and probe_numbers_for, read back with every
# layer's in one sync): 13 operators, the probe vector kept by the plan
# (benchmarks/form_operators.py).
PROBE_CALLS = 13
# A float32 primal exact solve reads back its accuracy check (two norms, one sync); in
# float64 nothing is read back.
PRIMAL_EXACT_SYNCS = 1


def form_operators(form: str, cg_iters: int, exact: bool = False) -> int:
    """Operators a step dispatches for one layer in ``form`` (without the dual CG's, see
    :data:`DUAL_CG_CALLS`): the exact solve's, or CG's with ``cg_iters`` iterations."""
    if exact:
        return EXACT_OPERATOR_CALLS[form]
    base, per_iteration = OPERATOR_CALLS[form]
    return base + per_iteration * cg_iters


def combined(costs: DeviceCosts, work: float, operators: float, graphed: bool = False) -> float:
    """The cost of ``work`` (device-side: products, factorisations, memory traffic) done by
    ``operators`` tensor operations. Replayed from a CUDA graph, each operation costs only
    its kernel's fixed run time on top of the work; eager on an accelerator, the host's
    dispatching and the device's work overlap, so the larger of the two counts; on a CPU
    they add up."""
    if graphed:
        return work + operators * costs.graph_operator_call
    dispatch = operators * costs.operator_call
    return max(work, dispatch) if costs.overlaps_host else work + dispatch
