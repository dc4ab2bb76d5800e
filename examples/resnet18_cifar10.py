"""An unmodified torchvision ResNet-18 on CIFAR-10: Adam, then ProxProp wrapping Adam.

    python examples/resnet18_cifar10.py --download                  # fetch into ./data, 300 steps
    python examples/resnet18_cifar10.py --data-dir ~/datasets/cifar10 --steps 3 --batch-size 8

``--data-dir`` (default ``./data``) may hold torchvision's ``cifar-10-batches-py/``, an
ImageFolder tree ``train/<class>/...`` and ``test/<class>/...``, or a ``.tar.gz`` of either, or
be the path of such an archive; ``--download`` fetches the official files (about 170 MB) there
if none is found. Decoded images are cached under ``$PROXOPTIM_CACHE`` (default
``~/.cache/proxoptim``).

The only change from a plain Adam training script is the optimizer line.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision
from torch import nn

from proxoptim import ProxPropOptimizer
from proxoptim.experiments.data import DatasetError, load_cifar10


def train(make_optimizer, data, steps: int, batch_size: int, device: str) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).to(device)
    opt = make_optimizer(model)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        index = torch.randint(0, len(data.train_x), (batch_size,), generator=generator)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(
            model(data.train_x[index].to(device)), data.train_y[index].to(device)
        )
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - started) / steps
    model.eval()
    with torch.no_grad():
        logits = model(data.val_x[:1000].to(device))
        accuracy = (logits.argmax(1).cpu() == data.val_y[:1000]).float().mean().item()
    return accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--data-dir",
        default="data",
        help="CIFAR-10 batches, ImageFolder tree or .tar.gz (default ./data)",
    )
    parser.add_argument(
        "--download", action="store_true", help="fetch CIFAR-10 into --data-dir if missing"
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-subset", type=int)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    try:
        data = load_cifar10(args.data_dir, download=args.download, progress=False)
    except DatasetError as error:  # no dataset there: say what to do, without a traceback
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.train_subset:
        data = data.subset(train=args.train_subset)

    for name, make_optimizer in (
        ("Adam", lambda model: torch.optim.Adam(model.parameters(), lr=1e-3)),
        (
            "ProxProp(Adam), cg3",
            lambda model: ProxPropOptimizer(
                model, torch.optim.Adam, lr=1e-3, tau_prox=1.0, cg_iters=3
            ),
        ),
    ):
        accuracy, seconds = train(make_optimizer, data, args.steps, args.batch_size, args.device)
        print(
            f"{name:22s} validation accuracy {100 * accuracy:5.1f}%   {1000 * seconds:7.1f} ms/step"
        )


if __name__ == "__main__":
    main()
