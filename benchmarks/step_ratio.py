"""ProxProp step time / backprop step time, measured in one process, interleaved.

Every repeat times one full training step (zero_grad, forward, backward, step) of each
method in turn on identical copies of the network, so that machine noise hits all methods
alike; the ratio is of medians over the repeats after warm-up.

    python benchmarks/step_ratio.py                       # paper MLP, Nesterov SGD, batch 500
    python benchmarks/step_ratio.py --network cnn --optimizer adam --methods cg3,cg10
    python benchmarks/step_ratio.py --network resnet18 --optimizer adam --batch-size 128 \
        --methods cg3
    python benchmarks/step_ratio.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from proxoptim.experiments.models import build_model
from proxoptim.experiments.provenance import provenance_comment
from proxoptim.experiments.training import Method, make_optimizer

NETWORKS = ("mlp", "cnn", "cnn-reference", "resnet18")


def build_network(network: str, width: float) -> nn.Module:
    """The paper's networks, or torchvision's ResNet-18 (CIFAR-10-sized inputs, 10 classes)."""
    if network == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    return build_model(network, (3, 32, 32), 10, width)


# The pseudo-method "floor": backprop plus, for every Linear layer ProxProp would
# precondition (all but the output layer), one product of the weight gradient's size
# (coefficients (m, n) times the captured input (n, d), into a kept buffer): the least work
# any dual-form ProxProp step adds (docs/performance.md, "The floor").
FLOOR = "floor"


def make_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def make_floor_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> Callable[[], None]:
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)][:-1]
    if not linears or any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        raise ValueError("the floor is defined for networks of Linear layers only")
    inputs: dict[nn.Module, torch.Tensor] = {}
    for module in linears:
        module.register_forward_hook(
            lambda module, args, output: inputs.__setitem__(module, args[0].detach())
        )
    generator = torch.Generator(device=x.device).manual_seed(0)
    coefficients = {
        module: torch.randn(module.out_features, x.shape[0], generator=generator, device=x.device)
        for module in linears
    }
    buffers = {module: torch.empty_like(module.weight) for module in linears}

    def step() -> None:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for module in linears:
            batch_input = inputs[module].reshape(x.shape[0], -1)
            torch.mm(coefficients[module], batch_input, out=buffers[module])
        opt.step()

    return step


def measure(
    network: str,
    optimizer: str,
    methods: list[str],
    batch_size: int,
    repeats: int,
    warmup: int,
    device: str,
    tau_prox: float = 1.0,
    width: float = 1.0,
    block: int = 1,
) -> dict[str, list[float]]:
    """Seconds per step of backprop and each method, ``repeats`` interleaved samples each.

    ``block`` > 1 runs each method for ``block`` consecutive steps per turn and times the
    steps after the first of each turn: methods still alternate, but each timed step finds
    its own data in cache, as in a real training run (strict alternation, ``block=1``,
    evicts every method's working set between its steps).
    """
    torch.manual_seed(0)
    template = build_network(network, width).to(device)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    steps = {}
    for name in ["backprop", *methods]:
        model = copy.deepcopy(template)
        # A tiny learning rate keeps the weights (and so the work per step) stationary.
        method = Method.parse("backprop" if name == FLOOR else name)
        opt = make_optimizer(model, method, optimizer, 1e-6, tau_prox)
        steps[name] = (make_floor_step if name == FLOOR else make_step)(model, opt, x, y)
    return interleaved_times(steps, repeats, warmup, block, device)


def interleaved_times(
    steps: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    block: int = 1,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each step, ``repeats`` samples each, the steps taking turns
    (every turn runs each once, or ``block`` times with the first untimed) after
    ``warmup`` untimed turns; on a CUDA device each call is synchronised."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    turns = warmup + -(-repeats // max(block - 1, 1)) if block > 1 else warmup + repeats
    for turn in range(turns):
        for name, step in steps.items():
            for position in range(block):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = time.perf_counter()
                step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                timed = turn >= warmup and (block == 1 or position > 0)
                if timed and len(times[name]) < repeats:
                    times[name].append(time.perf_counter() - started)
    return times


def peak_memory(
    network: str,
    optimizer: str,
    method: str,
    batch_size: int,
    steps: int,
    device: str,
    tau_prox: float,
    width: float,
    tensors: bool = False,
) -> float:
    """Peak memory in MiB of ``steps`` training steps of one method, alone in a fresh process.

    CPU: the child's peak resident set size (VmHWM; ru_maxrss would include the parent's
    peak, which survives fork and exec), so the baseline includes the Python and torch
    runtime, as a user's process does; with ``tensors``, the peak of live CPU tensors
    instead (:func:`peak_tensor_mib`). CUDA: torch.cuda.max_memory_allocated.
    """
    command = [
        sys.executable,
        __file__,
        "--network",
        network,
        "--optimizer",
        optimizer,
        "--batch-size",
        str(batch_size),
        "--device",
        device,
        "--tau-prox",
        str(tau_prox),
        "--width",
        str(width),
        "--memory-child",
        method,
        "--repeats",
        str(steps),
    ]
    if tensors:
        command.append("--tensor-memory")
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.strip().splitlines()[-1])


def peak_tensor_mib(run: Callable[[], object]) -> float:
    """Peak MiB of live CPU tensors while ``run`` runs: every allocation and free the
    profiler records, summed in time order. This is the accounting
    torch.cuda.max_memory_allocated does on a GPU (tensors only, no runtime), so it shows
    what a method holds beyond backprop, which the CPU's peak RSS dilutes with the
    Python and torch runtime. Tensors that exist before ``run`` are not counted."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events = [e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def _memory_child(args: argparse.Namespace) -> None:
    def run() -> None:
        torch.manual_seed(0)
        model = build_network(args.network, args.width).to(args.device)
        x = torch.rand(args.batch_size, 3, 32, 32, device=args.device)
        y = torch.randint(0, 10, (args.batch_size,), device=args.device)
        opt = make_optimizer(
            model, Method.parse(args.memory_child), args.optimizer, 1e-6, args.tau_prox
        )
        step = make_step(model, opt, x, y)
        for _ in range(args.repeats):
            step()

    if args.tensor_memory:
        print(peak_tensor_mib(run))
        return
    run()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        with open("/proc/self/status") as status:
            peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
        print(peak_kib / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=NETWORKS, default="mlp")
    parser.add_argument("--optimizer", choices=("nesterov", "adam"), default="nesterov")
    parser.add_argument("--methods", default="cg3,exact,cg10")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tau-prox", type=float, default=1.0)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure peak memory, each method in a fresh process",
    )
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--tensor-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw times here")
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args)
        return
    print(provenance_comment())
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    times = measure(
        args.network,
        args.optimizer,
        methods,
        args.batch_size,
        args.repeats,
        args.warmup,
        args.device,
        args.tau_prox,
        args.width,
    )
    baseline = statistics.median(times["backprop"])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"{args.network}, {args.optimizer}, batch {args.batch_size}, {device_name}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} after {args.warmup} warm-up"
    )
    memory = {}
    if args.memory:
        for name in times:
            memory[name] = peak_memory(
                args.network,
                args.optimizer,
                name,
                args.batch_size,
                3,
                args.device,
                args.tau_prox,
                args.width,
            )
    kind = "max RSS" if args.device == "cpu" else "max allocated"
    header = "| method | step [ms] | ratio to backprop |"
    rule = "|---|---|---|"
    if memory:
        header += f" peak memory ({kind}) [MiB] | memory ratio |"
        rule += "---|---|"
    print(header)
    print(rule)
    for name, samples in times.items():
        median = statistics.median(samples)
        line = f"| {name} | {1000 * median:.1f} | {median / baseline:.2f} |"
        if memory:
            line += f" {memory[name]:.0f} | {memory[name] / memory['backprop']:.2f} |"
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "seconds": times, "peak_mib": memory}, handle, indent=2)


if __name__ == "__main__":
    main()
