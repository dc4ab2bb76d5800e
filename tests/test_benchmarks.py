"""Every benchmark script imports against the current library (they run outside CI), writes
its provenance first, and the device check's own checks fail when they should."""

from __future__ import annotations

import importlib
import json
import pathlib
import re
import subprocess
import sys
import traceback

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
# The scripts (each with a main()); bench_*.py are pytest-benchmark files.
SCRIPTS = sorted(
    path.stem
    for path in BENCHMARKS.glob("*.py")
    if path.stem != "conftest" and not path.stem.startswith(("test_", "bench_"))
)
PROVENANCE = re.compile(
    r"<!-- commit ([0-9a-f]{12} \((clean|dirty)\)|unknown \(not a git checkout\)), \S+, `"
)


@pytest.fixture
def benchmark_module(monkeypatch):
    """Imports a benchmark script by name (as a script sees its siblings) and forgets it
    afterwards."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    imported = []

    def load(name):
        imported.append(name)
        return importlib.import_module(name)

    yield load
    for name in imported:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_script_imports(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    assert callable(getattr(module, "main", None))
    monkeypatch.delitem(sys.modules, name)


def test_dual_budget_captures_each_preconditioned_layers_input_delta_and_gradient(monkeypatch):
    """The budget times products of the real X, δ and g: g must be δᵀX (no bias column
    in these products; the bias gradient is δ's column sums) for every layer but the
    output layer, and every piece must run on them."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    budget = importlib.import_module("dual_budget")
    try:
        torch.manual_seed(0)
        model = budget.build_network("mlp", 0.02)
        x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
        layers = budget.captured_layers(model, x, y)
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(layers) == len(linears) - 1
        for (inputs, deltas, grad), linear in zip(layers, linears, strict=False):
            assert inputs.shape == (12, linear.in_features)
            assert deltas.shape == (12, linear.out_features)
            torch.testing.assert_close(grad, deltas.T @ inputs, rtol=1e-4, atol=1e-6)
            pieces = budget.layer_pieces(inputs, deltas, grad, tau_prox=1.0)
            assert set(pieces) == set(budget.PIECES)
            for piece in pieces.values():
                piece()
    finally:
        monkeypatch.delitem(sys.modules, "dual_budget")


def test_peak_tensor_memory_counts_live_tensors_not_their_sum(monkeypatch):
    """The CPU stand-in for max_memory_allocated: 4 MiB and 2 MiB alive together peak at
    6 MiB; freed before a 5 MiB tensor, the peak stays 6 (not 11)."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    step_ratio = importlib.import_module("step_ratio")
    try:

        def run() -> None:
            first = torch.ones(1 << 20)  # 4 MiB of float32
            second = torch.ones(1 << 19)  # 2 MiB
            del first, second
            third = torch.ones(5 << 18)  # 5 MiB
            del third

        assert abs(step_ratio.peak_tensor_mib(run) - 6.0) < 0.1
    finally:
        monkeypatch.delitem(sys.modules, "step_ratio")


def run_main(module, argv, monkeypatch, capsys) -> tuple[list[str], int]:
    """The lines ``module.main()`` prints with ``argv``, and its exit status."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    status = 0
    try:
        module.main()
    except SystemExit as stopped:
        status = stopped.code
    return capsys.readouterr().out.splitlines(), status


@pytest.mark.parametrize(
    ("name", "argv"),
    [
        ("dual_cg_block", ["--processes", "0"]),
        (
            "step_ratio",
            ["--width", "0.02", "--batch-size", "4", "--repeats", "1", "--warmup", "0"]
            + ["--methods", "cg1"],
        ),
        (
            "profile_step",
            ["--network", "cnn", "--optimizer", "adam", "--method", "cg1"]
            + ["--batch-size", "2", "--steps", "1"],
        ),
        ("step_ops", ["--batch-size", "8", "--repeats", "1", "--warmup", "1"]),
    ],
)
def test_a_benchmarks_output_starts_with_its_provenance(
    name, argv, benchmark_module, monkeypatch, capsys
):
    lines, status = run_main(benchmark_module(name), argv, monkeypatch, capsys)
    assert status == 0
    assert PROVENANCE.match(lines[0]), lines[0]
    assert f"`{name}.py {argv[0]}" in lines[0]


def test_the_targets_table_starts_with_its_provenance(benchmark_module, monkeypatch, capsys):
    targets = benchmark_module("targets")

    def measure(network, optimizer, methods, *args, **kwargs):
        return {name: [0.01] for name in ["backprop", *methods]}

    monkeypatch.setattr(targets, "measure", measure)
    lines, _ = run_main(targets, ["--no-memory"], monkeypatch, capsys)
    assert PROVENANCE.match(lines[0]), lines[0]
    assert any(line.startswith("| mlp (nesterov) | cg3 |") for line in lines)


def test_the_step_time_benchmark_is_collected_when_named(tmp_path):
    """bench_step_time.py is no test file by name; pytest collects it when given its path."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        + [str(BENCHMARKS / "bench_step_time.py"), "--rootdir", str(BENCHMARKS.parent)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test_step_time[mlp-cg3-cpu]" in result.stdout


def frames(package, *places):
    """A stack, outermost frame first, from (file in ``package`` or a path, function)."""
    stack = [traceback.FrameSummary(str(BENCHMARKS / "gpu_check.py"), 1, "synchronisations")]
    for file, function in places:
        path = file if file.startswith("/") else str(package / file)
        stack.append(traceback.FrameSummary(path, 10, function))
    return stack


def test_gpu_check_places_each_sync_and_holds_it_to_the_docs(benchmark_module):
    gpu_check = benchmark_module("gpu_check")
    package, step, directions = (
        gpu_check.PACKAGE,
        ("optimizer.py", "step"),
        ("optimizer.py", "_directions"),
    )
    statistics = frames(
        package, step, directions, ("stats.py", "resolve_stats"), ("readback.py", "read_back")
    )
    probes = frames(
        package, step, directions, ("dual.py", "probe_verdicts"), ("readback.py", "read_back")
    )
    finite = frames(package, step, ("optimizer.py", "_nonfinite_problem"))
    torch_own = frames(package, step, ("/usr/lib/torch/optim/sgd.py", "step"))
    loop = frames(
        package,
        step,
        ("optimizer.py", "_solve"),
        ("solvers.py", "solve"),
        ("dual.py", "_diagonal_cg"),
    )
    sites = [gpu_check.sync_site(stack) for stack in (statistics, probes, finite, torch_own, loop)]
    assert sites[:3] == ["statistics", "δ probes", "finiteness check"]
    assert sites[3] == "other: sgd.py:10 (step) via optimizer.py:10 (step)"
    assert sites[4] == "in a solve: dual.py:10 (_diagonal_cg)"

    assert gpu_check.sync_problems(sites[:4]) == []  # 3 claimed, one more for the probes
    assert gpu_check.sync_problems([sites[0], sites[2], sites[3]]) == []
    assert gpu_check.sync_problems([sites[0], sites[2], sites[3], sites[3]]) == [
        "4 syncs, more than the 3 claimed"
    ]
    assert gpu_check.sync_problems([sites[0], sites[0]]) == [
        "2 syncs for the statistics (one per step)"
    ]
    assert gpu_check.sync_problems([sites[4]]) == [
        "syncs inside a solve (in a solve: dual.py:10 (_diagonal_cg))"
    ]


def test_gpu_check_records_torchs_cpp_warnings_with_the_stack_that_raised_them(
    benchmark_module,
):
    """As torch raises a sync in sync debug mode: a C++ warning, here a resized output."""
    import torch

    gpu_check = benchmark_module("gpu_check")

    def resize_an_output():
        torch.add(torch.ones(3), 1, out=torch.empty(2))

    with gpu_check.recorded_warnings("An output with one or more elements was resized") as seen:
        resize_an_output()
        resize_an_output()
    assert len(seen) == 2  # every one, not once per place
    assert all(stack[-1].name == "resize_an_output" for _, stack in seen)


def test_gpu_check_fails_solves_a_graphed_run_left_eager(benchmark_module):
    """A capture that failed (proxoptim.graphs warns and stays eager) and a layer whose solve
    never replayed (here: the CUDA runner on CPU tensors) each fail the check."""
    import torch
    from torch import nn

    from proxoptim import ProxPropOptimizer
    from proxoptim.graphs import EagerRunner

    gpu_check = benchmark_module("gpu_check")

    class Failing(EagerRunner):
        def capture(self, entry):
            raise RuntimeError("operation not permitted when stream is capturing")

    def run(runner):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)
        )
        graphs = True if runner is None else runner
        opt = ProxPropOptimizer(model, torch.optim.SGD, lr=0.1, cuda_graphs=graphs)
        with gpu_check.recorded_warnings(gpu_check.CAPTURE_FAILED) as failures:
            for _ in range(3):
                opt.zero_grad()
                nn.functional.cross_entropy(
                    model(torch.rand(8, 6)), torch.randint(0, 3, (8,))
                ).backward()
                opt.step()
        return gpu_check.graph_problems(opt, failures)

    assert run(EagerRunner()) == []
    failed = run(Failing())
    assert len(failed) == 2
    assert failed[0].startswith("2 failed capture(s) left solves eager: ProxProp: a solve")
    assert failed[1] == "0 graphs for 2 layers whose solves should replay"
    assert run(None) == ["0 graphs for 2 layers whose solves should replay"]


def test_gpu_check_exits_non_zero_with_a_summary_when_a_check_fails(
    benchmark_module, monkeypatch, capsys
):
    gpu_check = benchmark_module("gpu_check")
    argv = ["--device", "cpu", "--sections", "correctness"]

    def passing(device, checks):
        checks("one", [])

    monkeypatch.setattr(gpu_check, "correctness", passing)
    lines, status = run_main(gpu_check, argv, monkeypatch, capsys)
    assert status == 0
    assert PROVENANCE.match(lines[0]), lines[0]
    assert lines[-1] == "gpu_check: all 1 checks passed"

    def failing(device, checks):
        checks("one", [])
        checks("two", ["relative error 3.00e-03 > 2e-03"])

    monkeypatch.setattr(gpu_check, "correctness", failing)
    lines, status = run_main(gpu_check, argv, monkeypatch, capsys)
    assert status == 1
    assert "- FAILED two: relative error 3.00e-03 > 2e-03" in lines
    assert lines[-1] == "gpu_check: FAILED 1 of 2 checks"


def test_step_ops_counts_each_dispatched_operator_and_a_whole_training_step(benchmark_module):
    """The counter sees every aten operator once, in-place and backward ones included, so
    the extra operators per layer it reports are the step's own."""
    import torch
    from torch import nn

    step_ops = benchmark_module("step_ops")

    def arithmetic():
        a = torch.ones(3)
        b = a + 1
        b.mul_(2)
        return b.sum()

    assert step_ops.count_operators(arithmetic) == {
        "aten.ones.default": 1,
        "aten.add.Tensor": 1,
        "aten.mul_.Tensor": 1,
        "aten.sum.default": 1,
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = step_ops.make_step(model, opt, torch.rand(5, 4), torch.randint(0, 2, (5,)))
    counts = step_ops.count_operators(step)
    # Forward: two addmm; backward: an mm for each weight gradient and one for the hidden
    # layer's input gradient (the network's input needs none).
    assert counts["aten.addmm.default"] == 2
    assert counts["aten.mm.default"] == 3
    assert counts["aten.threshold_backward.default"] == 1
    assert step_ops.preconditioned_layers(model) == 1


def test_versus_commit_imports_another_commit_beside_this_tree(benchmark_module, tmp_path):
    """The other commit's package is a separate module (its own classes), importable
    beside this tree's; HEAD against this tree steps both."""
    import proxoptim

    versus = benchmark_module("versus_commit")
    other = versus.import_commit("HEAD", tmp_path)
    assert other.__name__ == "proxoptim_at_HEAD"
    assert other.ProxPropOptimizer is not proxoptim.ProxPropOptimizer
    assert pathlib.Path(other.__file__).is_relative_to(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    x, y = torch.rand(5, 4), torch.randint(0, 2, (5,))
    step = versus.make_step(model, other.ProxPropOptimizer, x, y, solver="exact")
    step()
    sys.path.remove(str(tmp_path))


def test_the_cost_models_operator_counts_are_the_codes(benchmark_module):
    """proxoptim.costs' operator counts are what benchmarks/form_operators.py measures
    on the code as it is: a leaner (or heavier) form must update the cost model."""
    from proxoptim import costs

    counter = benchmark_module("form_operators")
    for form in ("matrix_free", "primal"):
        measured = counter.base_and_per_iteration(solver="cg", solver_form=form, probe="never")
        assert measured == costs.OPERATOR_CALLS[form], form
    assert counter.probe_operators() == costs.PROBE_CALLS
    exact_primal = counter.extra_operators(solver="exact", solver_form="primal")
    assert exact_primal == costs.EXACT_OPERATOR_CALLS["primal"]
    exact_dual = counter.extra_operators(solver="exact", solver_form="dual", probe="eager")
    assert exact_dual - costs.PROBE_CALLS == costs.EXACT_OPERATOR_CALLS["dual"]
    for basis in ("eigenbasis", "coefficient"):
        for probe, known in (("eager", True), ("never", False)):
            _, per_iteration = counter.base_and_per_iteration(
                solver="cg", solver_form="dual", dual_basis=basis, probe=probe
            )
            assert per_iteration == costs.DUAL_CG_CALLS[(basis, known)], (basis, known)


PEERS_METHODS = ("backprop", "isaac", "exact", "exact-bw", "cg3", "cg3-bw")


@pytest.fixture
def torch_threads():
    """Restores torch's thread count, which benchmark scripts set."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_peers_compares_isaac_with_proxprop_like_for_like(
    benchmark_module, monkeypatch, capsys, torch_threads
):
    """On the bias-free network τθ times ISAAC's weight gradient is exact-bw's direction
    (float64 ISAAC: the identity, up to ProxProp's float32 rounding; float32 ISAAC adds its
    own), every hidden layer solved in backward; each variant's table has every method."""
    peers = benchmark_module("peers")
    lines, status = run_main(peers, ["--quick", "--no-memory"], monkeypatch, capsys)
    assert status == 0
    assert PROVENANCE.match(lines[0]), lines[0]
    correctness = next(line for line in lines if line.startswith("correctness"))
    float64 = float(re.search(r"ISAAC in float64 max (\S+)", correctness).group(1))
    float32 = float(re.search(r"ISAAC in float32 max (\S+)", correctness).group(1))
    assert float64 < 1e-5, correctness
    assert float32 < 1e-3, correctness
    assert correctness.endswith("every hidden layer solved in backward"), correctness
    rows = [line.split(" | ")[0].removeprefix("| ") for line in lines if line.startswith("| ")]
    assert rows == ["method", *PEERS_METHODS] * 2  # the paper MLP and its bias-free twin
    assert any(line.startswith("- target: exact-bw no slower than isaac") for line in lines)


def test_peers_memory_child_reports_tensor_and_rss_peaks(
    benchmark_module, monkeypatch, capsys, torch_threads
):
    peers = benchmark_module("peers")
    argv = ["--quick", "--memory-child", "exact-bw", "--variants", "bias-free"]
    lines, status = run_main(peers, argv + ["--memory-steps", "2"], monkeypatch, capsys)
    assert status == 0
    peaks = json.loads(lines[-1])
    # At least the gradients and momentum of the tiny MLP (3072·80 + 80·20 + 20·80 + 80·10
    # float32 weights: about 1 MiB each).
    assert peaks["tensors"] > 1.5
    assert peaks["rss"] > peaks["tensors"]


def _dense_published_cg(matrix, grad, iterations, eps, tol, joint):
    """The published recurrences on the explicit M, all rows at once (``joint``: one α and
    β for all rows, as for a Conv2d layer): eps in both denominators, the early stop once
    the worst row has ‖r‖² < tol² · mean ‖g‖²."""

    def dot(u, v):
        per_row = (u * v).sum(1, keepdim=True)
        return per_row.sum().expand_as(per_row) if joint else per_row

    x, r = torch.zeros_like(grad), grad.clone()
    p, rr = r.clone(), dot(r, r)
    threshold = tol**2 * rr.mean()
    for step in range(1, iterations + 1):
        mp = p @ matrix
        alpha = rr / (dot(p, mp) + eps)
        x = x + alpha * p
        if step == iterations:
            break
        r = r - alpha * mp
        next_rr = dot(r, r)
        if next_rr.max() < threshold:
            break
        p = r + next_rr / (rr + eps) * p
        rr = next_rr
    return x


@pytest.mark.parametrize("joint", [False, True])
def test_reference_cg_eps_solves_every_row_as_the_dense_recurrences(benchmark_module, joint):
    """The script's eigenbasis CGs give, per row, the norms of the same recurrences run on
    the explicit M (textbook per row; the published one with eps and its early stop, per
    row or, as for a Conv2d layer, one CG over the layer), and per row the eps damps the
    small gradients most."""
    from oracle import relative_error, textbook_cg

    script = benchmark_module("reference_cg_eps")
    torch.manual_seed(0)
    patches = torch.randn(6, 9, dtype=torch.float64)  # rank 6 < 9: λ = 0 components too
    scales = torch.tensor([1.0, 1e-2, 1e-3, 1e-4], dtype=torch.float64)
    grad = torch.randn(4, 9, dtype=torch.float64) * scales[:, None]
    rows = script.RowSystems(patches.T @ patches, grad, joint=joint)
    tau_prox = 0.5
    matrix = torch.eye(9, dtype=torch.float64) / tau_prox + patches.T @ patches
    eps, tol = script.REFERENCE_EPS, script.REFERENCE_TOL

    for iterations in (1, 3, 5):
        textbook = torch.stack([textbook_cg(matrix, g, iterations) for g in grad])
        ours = script.textbook_cg(rows, tau_prox, iterations).norm(dim=1)
        assert relative_error(ours, textbook.norm(dim=1)) < 1e-12
        theirs = script.reference_cg(rows, tau_prox, iterations).norm(dim=1)
        published = _dense_published_cg(matrix, grad, iterations, eps, tol, joint)
        assert relative_error(theirs, published.norm(dim=1)) < 1e-12
        if joint:
            continue
        ratio = theirs / ours
        assert abs(ratio[0] - 1) < 1e-5  # ‖g‖² ≈ 9: eps is rounding
        assert (ratio[1:] < ratio[:-1]).all()  # the smaller the gradient, the more damped
        if iterations == 1:  # one step: α shrinks by gᵀMg / (gᵀMg + eps), exactly
            curvature = ((grad @ matrix) * grad).sum(1)
            expected = curvature / (curvature + script.REFERENCE_EPS)
            assert relative_error(ratio, expected) < 1e-12


@pytest.mark.parametrize("in_range", [False, True])
def test_dual_row_systems_give_the_dense_directions(benchmark_module, in_range):
    """From the n×n kernel, both CGs give the directions themselves (not only their norms)
    of the recurrences on the explicit d×d M: for a gradient with a part outside the
    inputs' span, and for a Linear layer's own δᵀŨ, which has none."""
    from oracle import relative_error, textbook_cg

    script = benchmark_module("reference_cg_eps")
    torch.manual_seed(1)
    patches = torch.randn(5, 8, dtype=torch.float64)  # n = 5 samples < d = 8
    scales = torch.tensor([1.0, 1e-2, 1e-3], dtype=torch.float64)[:, None]
    if in_range:
        grad = torch.randn(3, 5, dtype=torch.float64) @ patches * scales
    else:
        grad = torch.randn(3, 8, dtype=torch.float64) * scales
    rows = script.DualRowSystems(patches, grad)
    tau_prox = 2.0
    matrix = torch.eye(8, dtype=torch.float64) / tau_prox + patches.T @ patches
    eps, tol = script.REFERENCE_EPS, script.REFERENCE_TOL
    assert relative_error(rows.start.norm(dim=1), grad.norm(dim=1)) < 1e-14
    for iterations in (1, 2, 4, 9):
        textbook = torch.stack([textbook_cg(matrix, g, iterations) for g in grad])
        ours = rows.direction(script.textbook_cg(rows, tau_prox, iterations))
        assert relative_error(ours, textbook) < 1e-11
        published = _dense_published_cg(matrix, grad, iterations, eps, tol, False)
        theirs = rows.direction(script.reference_cg(rows, tau_prox, iterations))
        assert relative_error(theirs, published) < 1e-11
    # Nine iterations on eight unknowns: textbook CG has solved the system.
    assert relative_error(ours, torch.linalg.solve(matrix, grad.T).T) < 1e-10


def test_reference_harness_without_eps_takes_the_library_cg_steps(benchmark_module):
    """reference_cg_table1.py's optimizer with eps = 0 and no early stop is textbook CG: in
    float64 its three Nesterov steps on an MLP are the library's cg3 steps (every Linear
    but the last preconditioned, M summed over the batch), and with the published eps the
    tiny gradients of this network give other steps."""
    from oracle import relative_error

    from proxoptim import ProxPropOptimizer

    script = benchmark_module("reference_cg_table1")
    torch.manual_seed(0)
    # Small inputs, so that the first layer's rows have ‖g‖² ≤ 3e-3, where eps = 1e-6 tells.
    x, y = 0.1 * torch.randn(6, 10, dtype=torch.float64), torch.randint(0, 3, (6,))

    def model():
        torch.manual_seed(2)
        return torch.nn.Sequential(
            torch.nn.Linear(10, 12),
            torch.nn.ReLU(),
            torch.nn.Linear(12, 9),
            torch.nn.ReLU(),
            torch.nn.Linear(9, 3),
        ).double()

    def train(net, opt):
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in net.parameters()])

    settings = {"lr": 0.5, "momentum": 0.9, "nesterov": True}
    library_net = model()
    library = ProxPropOptimizer(
        library_net, torch.optim.SGD, tau_prox=3.0, solver="cg", cg_iters=3, **settings
    )
    expected = train(library_net, library)
    harness_net = model()
    harness = script.ReferenceProxProp(harness_net, 0.5, 3.0, 3, 0.0, None, momentum=0.9)
    start = torch.cat([p.detach().flatten() for p in model().parameters()])
    assert relative_error(train(harness_net, harness), expected) < 1e-12
    assert relative_error(expected, start) > 1e-2  # the steps moved the parameters
    published_net = model()
    published = script.ReferenceProxProp(
        published_net, 0.5, 3.0, 3, script.REFERENCE_EPS, script.REFERENCE_TOL, momentum=0.9
    )
    moved = train(published_net, published) - start
    first_layer = slice(0, 12 * 11)  # weight and bias of Linear(10, 12)
    difference = relative_error(moved[first_layer], (expected - start)[first_layer])
    assert difference > 0.02  # (0.08 here)
