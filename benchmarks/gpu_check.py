"""The prepared device check: CUDA correctness and the GPU figures, in one short run.

    python benchmarks/gpu_check.py                 # on a machine with a GPU
    python benchmarks/gpu_check.py --device cpu    # dry run of the same code on the CPU

1. Directions on the device (float32) against a float64 CPU reference, per layer, for the
   paper MLP and CNN, every solve form.
2. cuda_graphs=True directions against eager ones; bf16 autocast (and, on CUDA, fp16
   autocast with a GradScaler) directions against fp32.
3. Host-device synchronisations inside a fixed-iteration step (CUDA sync debug mode).
4. The step-time table of benchmarks/targets.py, and ResNet-18 step times.
5. Every solve form's step time per method (what the cost model should pick on the device),
   the dense factorisations' times, and a profiler summary of one MLP step.

Prints everything as Markdown; exits non-zero if a correctness check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import sys
import time
import warnings

import torch
import torchvision
from step_ratio import measure
from torch import nn

from proxoptim import ProxPropOptimizer, costs
from proxoptim.conv_gram import conv_gram
from proxoptim.experiments.models import build_model


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
    """{parameter index: direction (float64, CPU)} of one step."""
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


def correctness(device: str) -> bool:
    ok = True
    print("## Directions on the device against a float64 CPU reference\n")
    print(
        "float32 with TF32 off: the check of proxoptim's own arithmetic. The rows marked TF32\n"
        "run the convolutions as PyTorch does by default on Ampere and later GPUs (cuDNN in\n"
        "TF32): their gradients carry ~1e-3 relative errors, which the preconditioner can\n"
        "amplify; those rows are reported, not checked.\n"
    )
    print("| network | solver | form | worst relative error | worst cosine |")
    print("|---|---|---|---|---|")
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
            errors = [
                float((actual[i] - expected[i]).norm() / expected[i].norm()) for i in expected
            ]
            cosines = [cosine(actual[i], expected[i]) for i in expected]
            if not tf32:
                ok &= max(errors) <= 1e-2 and min(cosines) >= 0.9999
            print(
                f"| {network}{' (TF32)' if tf32 else ''} | {solver} | "
                f"{sorted(set(used.values()))} | {max(errors):.2e} | {min(cosines):.6f} |"
            )
    torch.backends.cudnn.allow_tf32 = cudnn_tf32

    print("\n## Correlation-form Gram (proxoptim.conv_gram) on the device, float32\n")
    print("| input | kernel, padding, dilation, groups | relative error to float64 CPU |")
    print("|---|---|---|")
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
        ok &= error <= 1e-5
        print(f"| {tuple(shape)} | {kernel}, {padding}, {dilation}, {groups} | {error:.2e} |")

    print("\n## CUDA graphs (cuda_graphs=True) against eager solves on the device\n")
    print("| network | solver | form | steps | graphs captured | worst relative difference |")
    print("|---|---|---|---|---|---|")
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
        difference, captured = graph_difference(network, form, device, solver, probe)
        ok &= difference <= 1e-4 and (captured > 0 or not device.startswith("cuda"))
        label = f"{solver}{' (δ probed)' if probe else ''}"
        print(f"| {network} | {label} | {form} | 4 | {captured} | {difference:.2e} |")

    print("\n## Mixed precision against fp32 on the device (paper MLP, batch 64)\n")
    print("| autocast | cosine of the whole direction to fp32 | worst single tensor |")
    print("|---|---|---|")
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
        ok &= whole >= 0.99
        print(f"| {label} | {whole:.5f} | {worst:.5f} |")
    return ok


def graph_difference(
    network: str, form: str, device: str, solver: str = "cg", probe: bool = False
) -> tuple[float, int]:
    """Worst relative difference between cuda_graphs=True and eager directions over four
    steps on different batches (step 1 eager, 2 captures, 3-4 replay), and graphs captured.
    ``probe``: CG probes for δ too (the δ-form graphs, fed each step's scale)."""
    torch.manual_seed(0)
    template = build_model(network, (3, 32, 32), 10).to(device)
    runs = []
    # cuDNN may pick other (TF32) convolution algorithms inside a capture than outside:
    # with TF32 on, the paper CNN's matrix-free directions differed by 1.6e-3 (H200).
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    for graphs in (True, False):
        model = copy.deepcopy(template)
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
    worst = 0.0
    for step_graphs, step_eager in zip(runs[0].inner.seen, runs[1].inner.seen, strict=True):
        for a, b in zip(step_graphs.values(), step_eager.values(), strict=True):
            worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return worst, runs[0].captured_graphs


def ready_step(opt, model, x, y, warmup: int) -> None:
    """``warmup`` full steps, then a backward: the next ``opt.step()`` is the one to watch."""
    for _ in range(warmup):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def synchronisations(device: str) -> None:
    if not device.startswith("cuda"):
        return
    print("\n## Host-device synchronisations in one cg3 step (paper MLP)\n")
    torch.manual_seed(0)
    model = build_model("mlp", (3, 32, 32), 10).to(device)
    x = torch.rand(500, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (500,), device=device)
    opt = ProxPropOptimizer(model, torch.optim.SGD, lr=1e-6, momentum=0.9, nesterov=True)
    ready_step(opt, model, x, y, warmup=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        opt.step()
        torch.cuda.set_sync_debug_mode("default")
    places = sorted({str(w.filename).rsplit("/", 1)[-1] + ":" + str(w.lineno) for w in caught})
    print(f"{len(caught)} synchronising calls, at: {', '.join(places) or 'none'}")


def timings(device: str, repeats: int) -> None:
    print("\n## Step time against backprop (same process, interleaved, batch 500)\n")
    print("| network | method | step [ms] | backprop [ms] | ratio |")
    print("|---|---|---|---|---|")
    for network, optimizer, methods in (
        ("mlp", "nesterov", ["cg3", "exact", "cg10", "cg3-graphs", "exact-graphs", "cg10-graphs"]),
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

    print("\n## ResNet-18 (torchvision, 32×32 inputs, batch 128, Adam)\n")
    print("| method | step [ms] |")
    print("|---|---|")
    torch.manual_seed(0)
    template = torchvision.models.resnet18(num_classes=10).to(device)
    x = torch.rand(128, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    for name in ("backprop", "cg3", "cg3-graphs"):
        model = copy.deepcopy(template)
        if name == "backprop":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = ProxPropOptimizer(
                model, torch.optim.Adam, lr=1e-3, cg_iters=3, cuda_graphs=name == "cg3-graphs"
            )
        samples = []
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
        print(f"| {name} | {1000 * statistics.median(samples):.1f} |")


def forms(device: str, repeats: int) -> None:
    """Step time of each forced solve form against backprop, interleaved, batch 500; on
    CUDA each CG form also with ``cuda_graphs=True``."""
    print("\n## Step time per solve form (batch 500; form: what ran per layer)\n")
    print("| network | method | requested form | forms that ran | step [ms] | ratio |")
    print("|---|---|---|---|---|---|")
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
        base = statistics.median(samples["backprop"])
        print(f"| {network} | backprop | – | – | {1000 * base:.2f} | 1.00 |")
        for key, opt in optimizers.items():
            if key == "backprop":
                continue
            solver, iters, form, graphs = key
            used = "/".join(s.form for s in opt.last_stats.values())
            median = statistics.median(samples[key])
            method = "exact" if solver == "exact" else f"cg{iters}"
            if graphs:
                method += f"-graphs ({opt.captured_graphs} captured)"
            print(
                f"| {network} | {method} | {form} | {used} | {1000 * median:.2f} | "
                f"{median / base:.2f} |"
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


def profile(device: str) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--sections", default="correctness,syncs,timings,forms,factorisations,profile"
    )
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# Device check: {name}, torch {torch.__version__}\n")
    sections = set(args.sections.split(","))
    ok = correctness(args.device) if "correctness" in sections else True
    if "syncs" in sections:
        synchronisations(args.device)
    if "timings" in sections:
        timings(args.device, args.repeats)
    if "forms" in sections:
        forms(args.device, args.repeats)
    if "factorisations" in sections:
        factorisations(args.device)
    if "profile" in sections:
        profile(args.device)
    print(f"\ncorrectness checks: {'passed' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
