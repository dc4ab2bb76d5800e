"""ProxProp against ISAAC and backprop: step time and peak memory, side by side in one process.

    python benchmarks/peers.py                        # paper MLP, with and without biases
    python benchmarks/peers.py --variants bias-free --methods isaac,exact-bw
    python benchmarks/peers.py --quick --no-memory    # a tiny network in seconds: checks it runs

ISAAC (Petersen et al., ICLR 2023; ``pip install isaac``) replaces a Linear layer's weight
gradient δᵀX by δᵀ(I + XXᵀ/(bλ))⁻¹X in its backward (b, the batch, smaller than the fan-in).
With λ = 1/(τθ·b) that is τθ⁻¹ times ProxProp's exact direction v = τθ·δᵀ(I + τθ·XXᵀ)⁻¹X
on a bias-free layer (ProxProp's M sums over the batch; docs/design.md); with a bias,
ProxProp preconditions weight and bias jointly (K = XXᵀ + 1) and ISAAC leaves the bias's
gradient plain. So the bias-free variant of the network is the like-for-like case; the
paper's MLP (with biases) is the one ProxProp is trained on. Before timing, the script
checks the like-for-like claim: on the bias-free network, τθ times ISAAC's weight gradient
against the direction ``solve_in_backward=True`` leaves in ``.grad``, layer by layer.

Network: the paper's MLP 3072-4000-1000-4000-10 (``--width`` scales the hidden sizes), batch
500, Nesterov SGD (lr 1e-6, momentum 0.95: the weights, and so the work per step, stay put),
τθ = 0.05 (the paper's MLP runs, ``proxoptim compare --preset fig2``), CPU, 2 threads. Every
method steps its own copy of one network from the same weights, on the same batch, timed
interleaved (benchmarks/step_ratio.py's ``interleaved_times``): medians over the repeats
after warm-up, and their ratio to backprop's. Methods:

* ``backprop``: plain Nesterov SGD;
* ``isaac``: every hidden Linear an ``isaac.Linear`` (la = 1/(τθ·b), ``inv_type="inverse"``:
  its "cholesky_inverse" passes the matrix itself, not its Cholesky factor, to
  torch.cholesky_inverse), the output layer a plain nn.Linear, as ProxProp's
  ``exclude_last`` keeps it; the same Nesterov SGD on the gradients it leaves;
* ``exact``, ``cg<k>``: ProxPropOptimizer with that solver, the default path;
* ``exact-bw``, ``cg<k>-bw``: the same with ``solve_in_backward=True``.

Peak memory, on the CPU: each method alone in a fresh process, from building the network
through a few steps (``--memory-steps``, default 3; ``-bw`` methods solve in backward from
the second), as a ratio to backprop's: the peak of live tensors (step_ratio.peak_tensor_mib,
the accounting torch.cuda.max_memory_allocated does on a GPU: weights, gradients, momentum,
activations and every temporary; deterministic, so the memory targets are judged on it),
and the process's peak resident set size (VmHWM, as benchmarks/resnet_exact_memory.py
measures it; it includes the Python and torch runtime, several hundred MiB, and varies by
a few MiB from run to run).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys

import isaac
import torch
from step_ratio import interleaved_times, make_step, peak_tensor_mib
from torch import nn

from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.experiments.training import Method, make_optimizer

VARIANTS = ("paper", "bias-free")
IN_BACKWARD = "-bw"  # Method.parse's suffix for solve_in_backward=True
DEFAULT_METHODS = "isaac,exact,exact-bw,cg3,cg3-bw"
TAU_PROX = 0.05  # the paper's MLP runs (proxoptim.experiments.cli PRESETS["compare"]["fig2"])
LR, MOMENTUM = 1e-6, 0.95
# Issue 15's targets, on the paper's MLP at batch 500: step / backprop step.
RATIO_TARGETS = {"exact-bw": 1.25, "cg3-bw": 1.4}


def build_network(variant: str, width: float) -> nn.Sequential:
    """The paper's MLP (seeded: every call gives the same weights), or the same network with
    bias-free Linear layers (the same weights, the biases dropped)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    torch.manual_seed(0)
    model = build_model("mlp", (3, 32, 32), 10, width)
    if variant == "bias-free":
        for index, module in enumerate(model):
            if isinstance(module, nn.Linear):
                plain = nn.Linear(module.in_features, module.out_features, bias=False)
                with torch.no_grad():
                    plain.weight.copy_(module.weight)
                model[index] = plain
    return model


def with_isaac(model: nn.Sequential, tau_prox: float, batch_size: int) -> nn.Sequential:
    """A copy of ``model`` whose Linear layers but the last are ``isaac.Linear`` with
    la = 1/(τθ·b) and the same weights."""
    model = copy.deepcopy(model)
    linears = [index for index, module in enumerate(model) if isinstance(module, nn.Linear)]
    for index in linears[:-1]:
        plain = model[index]
        replacement = isaac.Linear(
            plain.in_features,
            plain.out_features,
            la=1.0 / (tau_prox * batch_size),
            inv_type="inverse",
            bias=plain.bias is not None,
        )
        replacement.load_state_dict(plain.state_dict())
        model[index] = replacement
    return model


def build_method(
    template: nn.Sequential, name: str, tau_prox: float, batch_size: int
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One method's own copy of ``template`` and its optimizer."""
    if name == "isaac":
        model = with_isaac(template, tau_prox, batch_size)
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True)
        return model, opt
    model = copy.deepcopy(template)
    return model, make_optimizer(model, Method.parse(name), "nesterov", LR, tau_prox, MOMENTUM)


def batch(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(batch_size, 3, 32, 32, generator=generator)
    return x, torch.randint(0, 10, (batch_size,), generator=generator)


def isaac_versus_in_backward(
    width: float, batch_size: int, tau_prox: float
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """τθ × ISAAC's weight gradient against the exact direction v ``solve_in_backward=True``
    leaves in ``.grad``, on the bias-free network: ‖τθ·g_ISAAC − v‖ / ‖v‖ per hidden layer
    solved in backward, for ISAAC in float64 (``"float64"``: the identity itself, up to
    ProxProp's float32 rounding) and as timed, in float32 (``"float32"``: adds ISAAC's own
    rounding); and the hidden layers that were not solved in backward.

    ProxProp solves in backward from its second step (the first plans), so the peers get the
    weights ProxProp's second step starts from."""
    template = build_network("bias-free", width)
    x, y = batch(batch_size)
    model, opt = build_method(template, "exact-bw", tau_prox, batch_size)
    step = make_step(model, opt, x, y)
    step()
    peers = {
        "float64": with_isaac(model, tau_prox, batch_size).double(),
        "float32": with_isaac(model, tau_prox, batch_size),
    }
    step()
    for dtype, peer in peers.items():
        nn.functional.cross_entropy(peer(x.to(getattr(torch, dtype))), y).backward()
    differences: dict[str, dict[str, float]] = {dtype: {} for dtype in peers}
    not_solved = []
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    for name, module in linears[:-1]:
        stats = opt.last_stats.get(name)
        if stats is None or not stats.solved_in_backward:
            not_solved.append(name)
            continue
        direction = module.weight.grad.double()
        for dtype, peer in peers.items():
            scaled = tau_prox * peer.get_submodule(name).weight.grad.double()
            differences[dtype][name] = float((scaled - direction).norm() / direction.norm())
    return differences, not_solved


def measure(
    variant: str,
    methods: list[str],
    batch_size: int,
    repeats: int,
    warmup: int,
    tau_prox: float,
    width: float,
) -> dict[str, list[float]]:
    """Seconds per training step of backprop and each method, interleaved."""
    template = build_network(variant, width)
    x, y = batch(batch_size)
    steps = {}
    for name in ["backprop", *methods]:
        model, opt = build_method(template, name, tau_prox, batch_size)
        steps[name] = make_step(model, opt, x, y)
    return interleaved_times(steps, repeats, warmup)


def peak_memory(args: argparse.Namespace, variant: str, method: str) -> dict[str, float]:
    """Peak memory, MiB, of ``args.memory_steps`` steps of one method alone in a fresh
    process (:func:`_memory_child`)."""
    command = [
        sys.executable,
        __file__,
        "--memory-child",
        method,
        "--variants",
        variant,
        "--batch-size",
        str(args.batch_size),
        "--tau-prox",
        str(args.tau_prox),
        "--width",
        str(args.width),
        "--threads",
        str(args.threads),
        "--memory-steps",
        str(args.memory_steps),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def _memory_child(args: argparse.Namespace) -> None:
    """Prints, as JSON: ``tensors``, the peak of live tensors from building the network to
    the last step (step_ratio.peak_tensor_mib: what torch.cuda.max_memory_allocated counts
    on a GPU; deterministic); ``rss``, the process's peak resident set size (VmHWM, with the
    Python and torch runtime; varies by a few MiB from run to run)."""

    def run() -> None:
        template = build_network(args.variants, args.width)
        x, y = batch(args.batch_size)
        model, opt = build_method(template, args.memory_child, args.tau_prox, args.batch_size)
        del template
        step = make_step(model, opt, x, y)
        for _ in range(args.memory_steps):
            step()

    tensors = peak_tensor_mib(run)
    print(json.dumps({"tensors": tensors, "rss": _status_mib("VmHWM")}))


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


def targets(
    medians: dict[str, float], memory: dict[str, dict[str, float]], paper_size: bool
) -> list[str]:
    """Issue 15's targets, where the methods they name were measured."""
    lines = []
    baseline = medians["backprop"]
    for name, bound in RATIO_TARGETS.items():
        if name in medians:
            ratio = medians[name] / baseline
            verdict = _verdict(ratio <= bound)
            lines.append(f"{name} ≤ {bound:.2f}x backprop: {ratio:.2f}x, {verdict}")
    if "exact-bw" in medians and "isaac" in medians:
        ours, peer = medians["exact-bw"], medians["isaac"]
        lines.append(
            f"exact-bw no slower than isaac: {1000 * ours:.1f} vs {1000 * peer:.1f} ms, "
            f"{_verdict(ours <= peer)}"
        )
    for name in medians:
        default = name.removesuffix(IN_BACKWARD)
        if name.endswith(IN_BACKWARD) and name in memory and default in memory:
            ours, theirs = memory[name]["tensors"], memory[default]["tensors"]
            lines.append(
                f"{name} peak memory (tensors) no higher than {default}'s: {ours:.1f} vs "
                f"{theirs:.1f} MiB, {_verdict(ours <= theirs)}"
            )
    if not paper_size:
        lines = [f"{line} (not the paper's MLP at batch 500: for information)" for line in lines]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="paper, bias-free")
    parser.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="isaac, exact, cg<k>, each of the last two also with -bw (solve_in_backward)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default 500")
    parser.add_argument("--width", type=float, default=None, help="hidden sizes' scale; default 1")
    parser.add_argument("--tau-prox", type=float, default=TAU_PROX)
    parser.add_argument("--repeats", type=int, default=None, help="default 21")
    parser.add_argument("--warmup", type=int, default=None, help="default 3")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="width 0.02, batch 16, 2 repeats after 1 warm-up: checks the script (in seconds "
        "with --no-memory; each method's memory takes a fresh process)",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quick = {"batch_size": 16, "width": 0.02, "repeats": 2, "warmup": 1}
    full = {"batch_size": 500, "width": 1.0, "repeats": 21, "warmup": 3}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args)
        return

    print(provenance_comment())
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip() not in ("", "backprop")]
    hidden = [
        m.out_features for m in build_network("paper", args.width) if isinstance(m, nn.Linear)
    ]
    sizes = "-".join(str(size) for size in [3072, *hidden])
    paper_size = (args.width, args.batch_size) == (1.0, 500)
    print(
        f"MLP {sizes}, batch {args.batch_size}, Nesterov SGD (lr {LR:g}, momentum {MOMENTUM}), "
        f"τθ {args.tau_prox:g}, ISAAC la = 1/(τθ·b) = {1 / (args.tau_prox * args.batch_size):g}; "
        f"CPU, {torch.get_num_threads()} threads; median of {args.repeats} interleaved steps "
        f"after {args.warmup} warm-up"
    )

    differences, not_solved = isaac_versus_in_backward(args.width, args.batch_size, args.tau_prox)
    found = []
    for dtype, per_layer in differences.items():
        worst = max(per_layer.values(), default=float("nan"))
        layers = ", ".join(f"layer {name} {value:.1e}" for name, value in per_layer.items())
        found.append(f"ISAAC in {dtype} max {worst:.2e} ({layers})")
    print(
        "correctness (bias-free, step 2): relative difference ‖τθ·g_ISAAC − v‖/‖v‖, v = "
        f"exact-bw's .grad: {'; '.join(found)}; "
        + (
            f"hidden layers not solved in backward: {', '.join(not_solved)}"
            if not_solved
            else "every hidden layer solved in backward"
        )
    )

    for variant in variants:
        times = measure(
            variant,
            methods,
            args.batch_size,
            args.repeats,
            args.warmup,
            args.tau_prox,
            args.width,
        )
        medians = {name: statistics.median(samples) for name, samples in times.items()}
        memory = {}
        if not args.no_memory:
            memory = {name: peak_memory(args, variant, name) for name in medians}
        print()
        print(
            f"{variant}:"
            if not memory
            else f"{variant}: peak memory: the peak of live tensors from building the network "
            f"through {args.memory_steps} steps, each method alone in a fresh process (CPU); "
            "peak RSS: that process's peak resident set size (with the runtime; ± a few MiB)"
        )
        print("| method | step [ms] | ratio | peak memory vs backprop | peak RSS vs backprop |")
        print("|---|---|---|---|---|")
        for name, median in medians.items():
            cells = ["–", "–"]
            if memory:
                cells = [
                    f"{memory[name][kind] / memory['backprop'][kind]:.3f} "
                    f"({memory[name][kind]:.1f} MiB)"
                    for kind in ("tensors", "rss")
                ]
            print(
                f"| {name} | {1000 * median:.1f} | {median / medians['backprop']:.2f} | "
                f"{cells[0]} | {cells[1]} |"
            )
        for line in targets(medians, memory, paper_size):
            print(f"- target: {line}")


if __name__ == "__main__":
    main()
