"""The prepared device check: CUDA correctness and the GPU figures, in one short run.

    python benchmarks/gpu_check.py                                      # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu --sections correctness  # dry run on the CPU

1. Directions on the device (float32) against a float64 CPU reference, per layer, for the
   paper MLP and CNN, every solve form, within a bound per kind of solve (the errors seen so
   far, below); the correlation-form Gram likewise.
2. cuda_graphs=True directions against eager ones, with every layer's solve replayed; bf16
   autocast (and, on CUDA, fp16 autocast with a GradScaler) directions against fp32.
3. Host-device synchronisations in one step of the paper MLP (CUDA sync debug mode), eager
   and replayed as CUDA graphs: none inside a solve (so none inside the fixed-iteration CG
   loop), each read a step makes by design once, and no more in all than
   docs/performance.md claims.
4. The step-time table of benchmarks/targets.py, and ResNet-18 step times.
5. Every solve form's step time per method (what the cost model should pick on the device),
   the dense factorisations' times, and a profiler summary of one MLP step.

Wherever cuda_graphs=True runs, a solve that a failed capture left eager (proxoptim.graphs
warns and carries on) fails the check, and so does a layer whose solve never replayed.
Prints everything as Markdown, the provenance comment (commit and dirty flag) first, the
failed checks and a summary line last; exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torchvision
from step_ratio import measure
from torch import nn

import proxoptim
from proxoptim import ProxPropOptimizer, costs
from proxoptim.conv_gram import conv_gram
from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.graphs import EagerRunner

# Worst relative error of one parameter's float32 direction against float64 (TF32 off), as
# seen in this check's first table (docs/results/gpu-check-h200*.md on an H200; the CPU dry
# run, --device cpu):
#   CG, any form: 8.8e-4 on the CPU (MLP, dual form; 7.8e-4 matrix-free and primal) and
#     6.5e-4 to 7e-4 on the H200 (MLP, matrix-free and primal); the CNN's 1e-5 to 5e-5.
#   exact, dual form on the MLP's Linear layers (a float64 Cholesky of the n×n system):
#     8.8e-6 to 9.1e-6 on the CPU, 5.4e-6 to 5.6e-6 on the H200.
#   exact on the CNN's convolutions (their Gram or kernel in float32): 1.8e-4 on the CPU
#     (primal), 3.6e-4 on the H200 (dual and primal).
# Each bound sits 2-6× above the worst seen: run-to-run rounding passes, a loss of accuracy
# like the 1e-2 this check once allowed does not.
FLOAT32_BOUND = 2e-3
EXACT_DUAL_BOUND = 5e-5
MIN_COSINE = 0.9999

# docs/performance.md: "One cg3 step of the MLP syncs 3 times (sync debug mode): the
# statistics, the non-finite check of the gradients that are not preconditioned, and one
# inside torch; none inside the CG loops. Where the δ probe runs ..., there is one more by
# construction: all layers' probes at once."
CLAIMED_SYNCS = 3
# The reads a step makes by design, each one host sync per step whatever the number of
# layers or CG iterations: the function on the stack names the read.
BY_DESIGN = {
    "resolve_stats": "statistics",
    "probe_verdicts": "δ probes",
    "_nonfinite_problem": "finiteness check",
}
# ProxProp's modules that set up and run a layer's solve (the CG loops among them): a sync
# from any of them, the δ probes' read-back aside, is one the docs say does not happen.
SOLVE_MODULES = frozenset(
    (
        "solvers.py",
        "dual.py",
        "rowwise.py",
        "conv_gram.py",
        "graphs.py",
        "operators.py",
        "workspace.py",
    )
)
PACKAGE = Path(proxoptim.__file__).resolve().parent
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's, in sync debug mode "warn"
CAPTURE_FAILED = "ProxProp: a solve could not be captured as a CUDA graph"  # proxoptim.graphs


@dataclasses.dataclass
class Checks:
    """Every check's outcome: the failures listed at the end, the summary line, the exit
    status."""

    count: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)

    def __call__(self, name: str, problems: Sequence[str]) -> str:
        """Records the check ``name`` (failed if there are ``problems``); returns its table
        cell."""
        self.count += 1
        if problems:
            self.failed.append(f"{name}: {'; '.join(problems)}")
            return "**FAILED**"
        return "ok"

    def summary(self) -> str:
        if self.failed:
            return f"gpu_check: FAILED {len(self.failed)} of {self.count} checks"
        return f"gpu_check: all {self.count} checks passed"


@contextlib.contextmanager
def recorded_warnings(prefix: str) -> Iterator[list[tuple[str, traceback.StackSummary]]]:
    """Every warning raised inside whose message starts with ``prefix`` (each occurrence,
    not once per place), with the Python stack it was raised from, outermost frame first;
    other warnings are shown as usual. torch raises its C++ warnings (a sync in sync
    debug mode) while the Python call that caused them is still on the stack."""
    records: list[tuple[str, traceback.StackSummary]] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=re.escape(prefix))
        show = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if str(message).startswith(prefix):
                stack = traceback.extract_stack()[:-1]
                while stack and Path(stack[-1].filename) == Path(warnings.__file__):
                    stack.pop()  # the warnings module's own frames
                records.append((str(message), stack))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        yield records


def place(frame: traceback.FrameSummary) -> str:
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def sync_site(stack: Sequence[traceback.FrameSummary]) -> str:
    """Which read a host sync was: one of :data:`BY_DESIGN`'s, ``"in a solve: …"`` (a frame
    of :data:`SOLVE_MODULES` on the stack, the innermost named) or ``"other: …"`` (elsewhere
    in ProxProp, the inner optimizer, torch: the innermost frame, and ProxProp's innermost
    where that is another)."""
    ours = [frame for frame in stack if Path(frame.filename).resolve().is_relative_to(PACKAGE)]
    for frame in ours:
        if frame.name in BY_DESIGN:
            return BY_DESIGN[frame.name]
    solving = [frame for frame in ours if Path(frame.filename).name in SOLVE_MODULES]
    if solving:
        return f"in a solve: {place(solving[-1])}"
    via = f" via {place(ours[-1])}" if ours and ours[-1] is not stack[-1] else ""
    return f"other: {place(stack[-1])}{via}"


def sync_problems(sites: Sequence[str]) -> list[str]:
    """What in one step's syncs (their :func:`sync_site`) contradicts docs/performance.md:
    a sync inside a solve, a by-design read done more than once, more syncs in all than
    :data:`CLAIMED_SYNCS` (one more where the δ probes were read)."""
    counts = collections.Counter(sites)
    problems = [
        f"{counts[label]} syncs for the {label} (one per step)"
        for label in BY_DESIGN.values()
        if counts[label] > 1
    ]
    inside = sorted({site for site in sites if site.startswith("in a solve")})
    if inside:
        problems.append(f"syncs inside a solve ({', '.join(inside)})")
    allowed = CLAIMED_SYNCS + (counts[BY_DESIGN["probe_verdicts"]] > 0)
    if len(sites) > allowed:
        problems.append(f"{len(sites)} syncs, more than the {allowed} claimed")
    return problems


def graphed_layers(opt: ProxPropOptimizer) -> int:
    """How many of the last step's layers should replay a graph under cuda_graphs=True:
    every CG solve (this check never sets cg_tol) and exact solves in the dual form
    (proxoptim/graphs.py)."""
    exact = opt.solver == "exact"
    return sum(1 for stats in opt.last_stats.values() if not exact or stats.form == "dual")


def graph_problems(
    opt: ProxPropOptimizer, failures: Sequence[tuple[str, object]] = ()
) -> list[str]:
    """Why ``opt`` (built with cuda_graphs=True, stepped at least three times on the same
    shapes) did not replay every solve it should: captures that failed and stayed eager
    (``failures``: their warnings), fewer graphs than layers that should replay."""
    problems = []
    if failures:
        problems.append(f"{len(failures)} failed capture(s) left solves eager: {failures[0][0]}")
    expected = graphed_layers(opt)
    if opt.captured_graphs < expected:
        problems.append(
            f"{opt.captured_graphs} graphs for {expected} layers whose solves should replay"
        )
    return problems


class Recorder(torch.optim.Optimizer):
    """Takes no step; keeps every step's directions ({parameter: tensor}, on the device)."""

    def __init__(self, params):
        super().__init__(params, {})
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(
            {
                p: p.grad.clone()
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )


def directions(model, x, y, autocast_dtype=None, scaler=None, **kwargs):
    """{parameter index: direction (float64, CPU)} of one step, and each layer's form."""
    opt = ProxPropOptimizer(model, Recorder, **kwargs)
    device = x.device.type
    with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
    else:
        loss.backward()
        opt.step()
    params = list(model.parameters())
    seen = opt.inner.seen[-1]
    result = {i: seen[p].double().cpu() for i, p in enumerate(params) if p in seen}
    forms = {name: s.form for name, s in opt.last_stats.items()}
    opt.remove_hooks()
    model.zero_grad()
    return result, forms


def cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def float32_bound(network: str, solver: str, forms: Sequence[str]) -> float:
    """The bound on a row's worst relative error to float64 (see :data:`FLOAT32_BOUND`)."""
    if solver == "exact" and network == "mlp" and set(forms) == {"dual"}:
        return EXACT_DUAL_BOUND
    return FLOAT32_BOUND


def correctness(device: str, checks: Checks) -> None:
    print("## Directions on the device against a float64 CPU reference\n")
    print(
        "float32 with TF32 off: the check of proxoptim's own arithmetic, each row within its\n"
        f"bound (exact dual solves of the MLP's Linear layers {EXACT_DUAL_BOUND:.0e}, the rest "
        f"{FLOAT32_BOUND:.0e}: the worst\nerrors seen so far lie 2-6× below) and cosine ≥ "
        f"{MIN_COSINE}. The rows marked TF32 run the\nconvolutions as PyTorch does by default "
        "on Ampere and later GPUs (cuDNN in TF32): their\ngradients carry ~1e-3 relative "
        "errors, which the preconditioner can amplify; those rows\nare reported, not checked.\n"
    )
    print("| network | solver | form | worst relative error | bound | worst cosine | check |")
    print("|---|---|---|---|---|---|---|")
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    cases = [("mlp", 64, False), ("cnn", 32, False)]
    if device.startswith("cuda"):
        cases.append(("cnn", 32, True))
    for network, batch, tf32 in cases:
        torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(0)
        reference_model = build_model(network, (3, 32, 32), 10).double()
        x = torch.rand(batch, 3, 32, 32, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,))
        forms = ["matrix_free", "primal"] + (["dual"] if network == "mlp" else [])
        for solver, form in [("cg", f) for f in forms] + [("exact", "auto")]:
            expected, _ = directions(
                copy.deepcopy(reference_model), x, y, solver=solver, solver_form=form
            )
            model = copy.deepcopy(reference_model).float().to(device)
            actual, used = directions(
                model, x.float().to(device), y.to(device), solver=solver, solver_form=form
            )
            error = max(
                float((actual[i] - expected[i]).norm() / expected[i].norm()) for i in expected
            )
            worst_cosine = min(cosine(actual[i], expected[i]) for i in expected)
            used_forms = sorted(set(used.values()))
            bound, cell = float32_bound(network, solver, used_forms), "reported"
            if not tf32:
                problems = []
                if error > bound:
                    problems.append(f"relative error {error:.2e} > {bound:.0e}")
                if worst_cosine < MIN_COSINE:
                    problems.append(f"cosine {worst_cosine:.6f} < {MIN_COSINE}")
                cell = checks(f"float32 directions, {network} {solver} {form}", problems)
            print(
                f"| {network}{' (TF32)' if tf32 else ''} | {solver} | {used_forms} | "
                f"{error:.2e} | {'–' if tf32 else f'{bound:.0e}'} | {worst_cosine:.6f} | "
                f"{cell} |"
            )
    torch.backends.cudnn.allow_tf32 = cudnn_tf32

    print("\n## Correlation-form Gram (proxoptim.conv_gram) on the device, float32\n")
    print("| input | kernel, padding, dilation, groups | relative error to float64 CPU | check |")
    print("|---|---|---|---|")
    for shape, kernel, padding, dilation, groups in (
        ((16, 3, 32, 32), (5, 5), ((2, 2), (2, 2)), (1, 1), 1),
        ((16, 16, 16, 16), (5, 5), ((2, 2), (2, 2)), (1, 1), 1),
        ((8, 64, 28, 28), (3, 3), ((1, 1), (1, 1)), (1, 1), 1),
        ((4, 8, 9, 10), (3, 2), ((2, 0), (1, 3)), (2, 1), 2),
        ((4, 4, 6, 5, 7), (3, 3, 3), ((1, 1), (1, 1), (1, 1)), (1, 1, 1), 1),
    ):
        torch.manual_seed(0)
        x = torch.rand(shape, dtype=torch.float64)
        reference, _ = conv_gram(x, kernel, dilation, padding, groups)
        gram, _ = conv_gram(x.float().to(device), kernel, dilation, padding, groups)
        error = float((gram.double().cpu() - reference).norm() / reference.norm())
        cell = checks(
            f"correlation Gram {tuple(shape)}",
            [f"relative error {error:.2e} > 1e-05"] if error > 1e-5 else [],
        )
        print(
            f"| {tuple(shape)} | {kernel}, {padding}, {dilation}, {groups} | {error:.2e} | {cell} |"
        )

    print("\n## CUDA graphs (cuda_graphs=True) against eager solves on the device\n")
    if not device.startswith("cuda"):
        print(
            "Not on CUDA: the 'graphed' run replays through proxoptim.graphs.EagerRunner (the\n"
            "same bookkeeping, reruns instead of CUDA graphs), so that its captures are counted.\n"
        )
    print(
        "| network | solver | form | steps | layers | graphs captured "
        "| worst relative difference | check |"
    )
    print("|---|---|---|---|---|---|---|---|")
    # Forms are pinned: under "auto" a graphed solve may choose another form than an eager
    # one (graphed operators cost less), and two forms agree only to float32 rounding.
    for network, solver, form, probe in (
        ("mlp", "cg", "matrix_free", False),
        ("mlp", "cg", "dual", False),
        ("mlp", "cg", "dual", True),
        ("mlp", "exact", "dual", False),
        ("cnn", "cg", "primal", False),
        ("cnn", "cg", "matrix_free", False),
    ):
        difference, opt, failures = graph_difference(network, form, device, solver, probe)
        problems = graph_problems(opt, failures)
        if difference > 1e-4:
            problems.append(f"difference {difference:.2e} > 1e-4")
        label = f"{solver}{' (δ probed)' if probe else ''}"
        cell = checks(f"graphs against eager, {network} {label} {form}", problems)
        print(
            f"| {network} | {label} | {form} | 4 | {len(opt.last_stats)} | "
            f"{opt.captured_graphs} | {difference:.2e} | {cell} |"
        )
        opt.remove_hooks()

    print("\n## Mixed precision against fp32 on the device (paper MLP, batch 64)\n")
    print("| autocast | cosine of the whole direction to fp32 | worst single tensor | check |")
    print("|---|---|---|---|")
    torch.manual_seed(0)
    model = build_model("mlp", (3, 32, 32), 10).to(device)
    x = torch.rand(64, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    full, _ = directions(model, x, y)
    cases = [("bf16", torch.bfloat16, None)]
    if device.startswith("cuda"):
        cases.append(("fp16 + GradScaler", torch.float16, torch.amp.GradScaler("cuda")))
    for label, dtype, scaler in cases:
        mixed, _ = directions(model, x, y, autocast_dtype=dtype, scaler=scaler)
        whole = cosine(
            torch.cat([mixed[i].flatten() for i in full]),
            torch.cat([full[i].flatten() for i in full]),
        )
        worst = min(cosine(mixed[i], full[i]) for i in full)
        problems = [f"cosine {whole:.5f} < 0.99"] if whole < 0.99 else []
        cell = checks(f"{label} against fp32", problems)
        print(f"| {label} | {whole:.5f} | {worst:.5f} | {cell} |")


def graph_difference(
    network: str, form: str, device: str, solver: str = "cg", probe: bool = False
) -> tuple[float, ProxPropOptimizer, list]:
    """Worst relative difference between cuda_graphs=True and eager directions over four
    steps on different batches (step 1 eager, 2 captures, 3-4 replay), the graphed
    optimizer and the warnings of its failed captures.
    ``probe``: CG probes for δ too (the δ-form graphs, fed each step's scale)."""
    torch.manual_seed(0)
    template = build_model(network, (3, 32, 32), 10).to(device)
    runs = []
    # cuDNN may pick other (TF32) convolution algorithms inside a capture than outside:
    # with TF32 on, the paper CNN's matrix-free directions differed by 1.6e-3 (H200).
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with recorded_warnings(CAPTURE_FAILED) as failures:
        for graphs in (True, False):
            model = copy.deepcopy(template)
            if graphs and not device.startswith("cuda"):
                # The dry run: CUDA graphs need CUDA; EagerRunner replays by rerunning the
                # solve, through the same keys, captures and counts (tests/test_graphs.py).
                graphs = EagerRunner()
            opt = ProxPropOptimizer(
                model, Recorder, solver=solver, solver_form=form, cuda_graphs=graphs
            )
            generator = torch.Generator(device=device).manual_seed(1)
            for step in range(4):
                x = torch.rand(64, 3, 32, 32, device=device, generator=generator)
                y = torch.randint(0, 10, (64,), device=device, generator=generator)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                for param in model.parameters():
                    param.grad.mul_(0.5**step)  # as clipping would: the δ scale changes
                with always_probing(probe):
                    opt.step()
            runs.append(opt)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    runs[1].remove_hooks()
    worst = 0.0
    for step_graphs, step_eager in zip(runs[0].inner.seen, runs[1].inner.seen, strict=True):
        for a, b in zip(step_graphs.values(), step_eager.values(), strict=True):
            worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst, runs[0], failures


def ready_step(opt, model, x, y, warmup: int) -> None:
    """``warmup`` full steps, then a backward: the next ``opt.step()`` is the one to watch."""
    for _ in range(warmup):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def synchronisations(device: str, checks: Checks) -> None:
    print("\n## Host-device synchronisations in one step (paper MLP, batch 500)\n")
    if not device.startswith("cuda"):
        print("Skipped: sync debug mode needs CUDA.")
        return
    print(
        f"Checked against docs/performance.md: {CLAIMED_SYNCS} per step (the statistics, the "
        "finiteness check, one\ninside torch), one more where the δ probes are read; none "
        "inside a solve. The step\nwatched is the third: with cuda_graphs=True the first "
        "ran eagerly, the second captured.\n"
    )
    print("| method | cuda_graphs | forms | syncs | where | check |")
    print("|---|---|---|---|---|---|")
    for method, graphs in (
        ("cg3", False),
        ("cg10", False),
        ("exact", False),
        ("cg3", True),
        ("cg10", True),
        ("exact", True),
    ):
        torch.manual_seed(0)
        model = build_model("mlp", (3, 32, 32), 10).to(device)
        x = torch.rand(500, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (500,), device=device)
        solver, iterations = ("exact", 3) if method == "exact" else ("cg", int(method[2:]))
        with recorded_warnings(CAPTURE_FAILED) as failures:
            opt = ProxPropOptimizer(
                model,
                torch.optim.SGD,
                lr=1e-6,
                momentum=0.9,
                nesterov=True,
                solver=solver,
                cg_iters=iterations,
                cuda_graphs=graphs,
            )
            ready_step(opt, model, x, y, warmup=2)
            with recorded_warnings(SYNC_WARNING) as syncs:
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
        sites = [sync_site(stack) for _, stack in syncs]
        problems = sync_problems(sites)
        if graphs:
            problems += graph_problems(opt, failures)
        cell = checks(f"host syncs, {method}{' graphed' if graphs else ''}", problems)
        where = ", ".join(f"{site} ×{n}" for site, n in sorted(collections.Counter(sites).items()))
        forms = "/".join(stats.form for stats in opt.last_stats.values())
        print(f"| {method} | {graphs} | {forms} | {len(sites)} | {where or 'none'} | {cell} |")
        opt.remove_hooks()


def timings(device: str, repeats: int, checks: Checks) -> None:
    print("\n## Step time against backprop (same process, interleaved, batch 500)\n")
    print("| network | method | step [ms] | backprop [ms] | ratio |")
    print("|---|---|---|---|---|")
    with recorded_warnings(CAPTURE_FAILED) as failures:
        for network, optimizer, methods in (
            (
                "mlp",
                "nesterov",
                ["cg3", "exact", "cg10", "cg3-graphs", "exact-graphs", "cg10-graphs"],
            ),
            ("cnn", "adam", ["cg3", "cg10", "cg3-graphs", "cg10-graphs"]),
        ):
            times = measure(network, optimizer, methods, 500, repeats, 2, device)
            base = statistics.median(times["backprop"])
            for name in methods:
                median = statistics.median(times[name])
                print(
                    f"| {network} | {name} | {1000 * median:.1f} | {1000 * base:.1f} | "
                    f"{median / base:.2f} |"
                )
    if device.startswith("cuda"):
        problems = [f"{len(failures)} failed capture(s): {failures[0][0]}"] if failures else []
        cell = checks("step-time table: no capture of a -graphs row failed", problems)
        print(f"\nNo capture of a -graphs row failed (they would time eager solves): {cell}")

    print("\n## ResNet-18 (torchvision, 32×32 inputs, batch 128, Adam)\n")
    print("| method | step [ms] | layers | graphs captured | check |")
    print("|---|---|---|---|---|")
    torch.manual_seed(0)
    template = torchvision.models.resnet18(num_classes=10).to(device)
    x = torch.rand(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    for name in ("backprop", "cg3", "cg3-graphs"):
        model = copy.deepcopy(template)
        graphs = name == "cg3-graphs"
        if name == "backprop":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = ProxPropOptimizer(
                model, torch.optim.Adam, lr=1e-3, cg_iters=3, cuda_graphs=graphs
            )
        samples = []
        with recorded_warnings(CAPTURE_FAILED) as failures:
            for step in range(2 + repeats):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if step >= 2:
                    samples.append(time.perf_counter() - started)
        layers, captured, cell = "–", "–", "–"
        if name != "backprop":
            layers, captured = len(opt.last_stats), opt.captured_graphs
            if graphs and device.startswith("cuda"):
                cell = checks(f"ResNet-18 {name} replayed", graph_problems(opt, failures))
        print(
            f"| {name} | {1000 * statistics.median(samples):.1f} | {layers} | {captured} | {cell} |"
        )


def forms(device: str, repeats: int, checks: Checks) -> None:
    """Step time of each forced solve form against backprop, interleaved, batch 500; on
    CUDA each CG form also with ``cuda_graphs=True``."""
    print("\n## Step time per solve form (batch 500; form: what ran per layer)\n")
    print("| network | method | requested form | forms that ran | step [ms] | ratio | check |")
    print("|---|---|---|---|---|---|---|")
    for network, inner, kwargs, cases in (
        (
            "mlp",
            torch.optim.SGD,
            {"momentum": 0.9, "nesterov": True},
            [("cg", 3), ("exact", 0), ("cg", 10)],
        ),
        ("cnn", torch.optim.Adam, {}, [("cg", 3), ("exact", 0), ("cg", 10)]),
    ):
        torch.manual_seed(0)
        template = build_model(network, (3, 32, 32), 10).to(device)
        x = torch.rand(500, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (500,), device=device)
        models = {"backprop": copy.deepcopy(template)}
        optimizers = {"backprop": inner(models["backprop"].parameters(), lr=1e-6, **kwargs)}
        graph_choices = (False, True) if device.startswith("cuda") else (False,)
        for solver, iters in cases:
            for form in ("auto", "matrix_free", "primal", "dual"):
                for graphs in graph_choices:
                    if solver == "exact" and form == "matrix_free":
                        continue
                    model = copy.deepcopy(template)
                    key = (solver, iters, form, graphs)
                    models[key] = model
                    optimizers[key] = ProxPropOptimizer(
                        model,
                        inner,
                        lr=1e-6,
                        solver=solver,
                        cg_iters=max(iters, 1),
                        solver_form=form,
                        cuda_graphs=graphs,
                        **kwargs,
                    )
        samples = {key: [] for key in optimizers}
        with recorded_warnings(CAPTURE_FAILED) as failures:
            for turn in range(2 + repeats):
                for key, opt in optimizers.items():
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    started = time.perf_counter()
                    opt.zero_grad()
                    nn.functional.cross_entropy(models[key](x), y).backward()
                    opt.step()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    if turn >= 2:
                        samples[key].append(time.perf_counter() - started)
        if failures:  # which optimizer's capture failed is not known: every graphed row fails
            print(f"\n{len(failures)} failed capture(s), the first: {failures[0][0]}\n")
        base = statistics.median(samples["backprop"])
        print(f"| {network} | backprop | – | – | {1000 * base:.2f} | 1.00 | – |")
        for key, opt in optimizers.items():
            if key == "backprop":
                continue
            solver, iters, form, graphs = key
            used = "/".join(s.form for s in opt.last_stats.values())
            median = statistics.median(samples[key])
            method = "exact" if solver == "exact" else f"cg{iters}"
            cell = "–"
            if graphs:
                method += f"-graphs ({opt.captured_graphs} captured)"
                cell = checks(
                    f"forms table, {network} {method} {form} replayed",
                    graph_problems(opt, failures),
                )
            print(
                f"| {network} | {method} | {form} | {used} | {1000 * median:.2f} | "
                f"{median / base:.2f} | {cell} |"
            )
            opt.remove_hooks()
        del optimizers, models


@contextlib.contextmanager
def always_probing(enabled: bool):
    """The accelerator cost table with ``always_probe`` on, while ``enabled``."""
    if not enabled:
        yield
        return
    original = costs.ACCELERATOR
    costs.ACCELERATOR = dataclasses.replace(original, always_probe=True)
    try:
        yield
    finally:
        costs.ACCELERATOR = original


def factorisations(device: str) -> None:
    """Milliseconds of the dense n × n operations the dual and primal forms use."""
    print("\n## Dense factorisations on the device [ms, median of 5]\n")
    print("| n | eigh fp32 | eigh fp64 | cholesky fp64 | cholesky fp32 | n×n×n matmul fp32 |")
    print("|---|---|---|---|---|---|")

    def timed(fn, *args) -> float:
        samples = []
        for repeat in range(7):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            fn(*args)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if repeat >= 2:
                samples.append(time.perf_counter() - started)
        return 1000 * statistics.median(samples)

    for n in (128, 256, 500, 1000, 2000):
        a = torch.rand(n, 4 * n, device=device)
        spd = a @ a.T + torch.eye(n, device=device)
        spd64 = spd.double()
        cells = [
            timed(torch.linalg.eigh, spd),
            timed(torch.linalg.eigh, spd64),
            timed(torch.linalg.cholesky, spd64),
            timed(torch.linalg.cholesky, spd),
            timed(torch.mm, spd, spd),
        ]
        print(f"| {n} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


def profile(device: str, checks: Checks) -> None:
    """Where the time of one step goes on the device: the host time of each phase of
    ProxProp's step (its ``record_function`` ranges) and the top kernels (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    graphs = device.startswith("cuda")
    for network, solver, graphed in (
        ("mlp", "cg", graphs),
        ("mlp", "exact", graphs),
        ("mlp", "cg", False),
        ("cnn", "cg", graphs),
    ):
        torch.manual_seed(0)
        model = build_model(network, (3, 32, 32), 10).to(device)
        x = torch.rand(500, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (500,), device=device)
        if network == "mlp":
            inner, kwargs = torch.optim.SGD, {"lr": 1e-6, "momentum": 0.9, "nesterov": True}
        else:
            inner, kwargs = torch.optim.Adam, {"lr": 1e-6}
        with recorded_warnings(CAPTURE_FAILED) as failures:
            opt = ProxPropOptimizer(model, inner, solver=solver, cuda_graphs=graphed, **kwargs)
            ready_step(opt, model, x, y, warmup=3)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            with run_profiler(activities=activities) as prof:
                started = time.perf_counter()
                opt.step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                wall = time.perf_counter() - started
        label = f"{solver}{' with graphs' if graphed else ''}"
        forms = "/".join(stats.form for stats in opt.last_stats.values())
        print(f"\n## Profile of one {network} {label} step ({forms}; after backward)\n")
        if graphed:
            cell = checks(f"profiled {network} {label} replayed", graph_problems(opt, failures))
            print(f"{opt.captured_graphs} graphs for {len(opt.last_stats)} layers: {cell}\n")
        print(f"Step {1000 * wall:.2f} ms under the profiler; host time per phase:\n")
        print("| phase | host ms | calls |\n|---|---|---|")
        phases: dict[str, list[float]] = {}
        for event in prof.key_averages():
            if event.key.startswith(("ProxProp.", "Optimizer.step#")):
                name = event.key.split("#")[0] if event.key.startswith("ProxProp.") else event.key
                totals = phases.setdefault(name, [0.0, 0])
                totals[0] += event.cpu_time_total / 1000
                totals[1] += event.count
        for name, (milliseconds, count) in phases.items():
            print(f"| {name} | {milliseconds:.2f} | {count} |")
        print(f"\nTop operators by {sort}:\n")
        print("```")
        print(prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=40))
        print("```")


SECTIONS = ("correctness", "syncs", "timings", "forms", "factorisations", "profile")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated, of: {', '.join(SECTIONS)}",
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(sections - set(SECTIONS)))}")
    print(provenance_comment())
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# Device check: {name}, torch {torch.__version__}\n")
    checks = Checks()
    if "correctness" in sections:
        correctness(args.device, checks)
    if "syncs" in sections:
        synchronisations(args.device, checks)
    if "timings" in sections:
        timings(args.device, args.repeats, checks)
    if "forms" in sections:
        forms(args.device, args.repeats, checks)
    if "factorisations" in sections:
        factorisations(args.device)
    if "profile" in sections:
        profile(args.device, checks)
    print("\n## Checks\n")
    print("\n".join(f"- FAILED {failure}" for failure in checks.failed) or "None failed.")
    print(f"\n{checks.summary()}")
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
