"""Train a small MLP with ProxProp-wrapped Adam and with plain Adam on the same data.

Needs only torch. Run: python examples/quickstart.py
"""

import torch
from torch import nn

from proxoptim import ProxPropOptimizer


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 200) -> float:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(512, 20, generator=generator)
    targets = (inputs[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        opt.step()
    return nn.functional.cross_entropy(model(inputs), targets).item()


if __name__ == "__main__":
    model = make_model()
    backprop = train(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    model = make_model()
    # diagnostics=True: last_stats also reports each layer's residual and cosine to g.
    opt = ProxPropOptimizer(
        model, torch.optim.Adam, lr=1e-3, tau_prox=1.0, solver="cg", cg_iters=3, diagnostics=True
    )
    proxprop = train(model, opt)
    print(f"final training loss  backprop/Adam: {backprop:.4f}   proxprop-cg3/Adam: {proxprop:.4f}")
    for name, stats in opt.last_stats.items():
        print(
            f"layer {name}: form={stats.form} iterations={stats.iterations} "
            f"residual={stats.relative_residual:.3g} cosine={stats.cosine:.3f}"
        )
