"""ProxProp with automatic mixed precision and a GradScaler.

    python examples/amp_train.py                 # CPU: bfloat16 autocast
    python examples/amp_train.py --device cuda   # GPU: float16 autocast

Inputs are captured in the autocast dtype; ProxProp solves in float32. The scaler
unscales the gradients before ProxProp sees them, and skips steps with inf/NaN.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from proxoptim import ProxPropOptimizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.bfloat16

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 5)
    ).to(args.device)
    # diagnostics=True: last_stats reports the cosine between direction and gradient.
    opt = ProxPropOptimizer(
        model, torch.optim.Adam, lr=1e-3, tau_prox=1.0, cg_iters=3, diagnostics=True
    )
    scaler = torch.amp.GradScaler(args.device)
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(32, 5, generator=generator)
    for step in range(args.steps):
        x = torch.randn(128, 32, generator=generator)
        y = (x @ teacher).argmax(1)
        x, y = x.to(args.device), y.to(args.device)
        opt.zero_grad()
        with torch.autocast(args.device, dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if step % 50 == 0 or step == args.steps - 1:
            stats = opt.last_stats.get("0")
            cosine = f"{stats.cosine:.3f}" if stats else "–"
            print(f"step {step:4d}  loss {loss.item():.4f}  cosine(v, g) of layer 0 {cosine}")


if __name__ == "__main__":
    main()
