"""The paper's networks (DESIGN.md §7) and width / input-size variants of them.

All models take images ``(N, C, H, W)`` with pixels in [0, 1] and return logits
``(N, classes)``; they use PyTorch's default initialisation, as the paper does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

PAPER_MLP_HIDDEN = (4000, 1000, 4000)
CNN_VARIANTS = ("paper", "reference")


def mlp(
    input_shape: Sequence[int],
    hidden: Sequence[int] = PAPER_MLP_HIDDEN,
    classes: int = 10,
) -> nn.Sequential:
    """Fully connected ReLU network: flatten → Linear → ReLU → … → Linear(classes).

    With ``input_shape=(3, 32, 32)`` and the default ``hidden`` this is the paper's
    3072-4000-1000-4000-10 MLP (Fig. 2, Table 1).
    """
    sizes = [math.prod(input_shape), *hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-1], classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: Sequence[int],
    variant: str = "paper",
    channels: Sequence[int] = (16, 20, 20),
    classes: int = 10,
) -> nn.Sequential:
    """The paper's CNN (Fig. 3): three 5×5 conv (padding 2) + ReLU + 2×2 max-pool stages.

    ``variant="paper"`` pools after every stage, as the paper's text describes (CIFAR-10:
    Linear(320 → 10)); ``variant="reference"`` drops the third pooling, as the authors'
    published code does (Linear(1280 → 10)). The classifier's fan-in follows from
    ``input_shape`` so the same network runs on small inputs such as 8×8 digits.
    """
    if variant not in CNN_VARIANTS:
        raise ValueError(f"unknown CNN variant {variant!r}; expected one of {CNN_VARIANTS}")
    layers: list[nn.Module] = []
    in_channels = input_shape[0]
    for stage, out_channels in enumerate(channels):
        layers += [nn.Conv2d(in_channels, out_channels, 5, padding=2), nn.ReLU()]
        if variant == "paper" or stage < len(channels) - 1:
            layers.append(nn.MaxPool2d(2))
        in_channels = out_channels
    layers.append(nn.Flatten())
    features = nn.Sequential(*layers)
    with torch.no_grad():
        fan_in = features(torch.zeros(1, *input_shape)).shape[1]
    return nn.Sequential(*layers, nn.Linear(fan_in, classes))


def build_model(name: str, input_shape: Sequence[int], classes: int = 10, width: float = 1.0):
    """A model by name: ``"mlp"``, ``"cnn"`` (paper text) or ``"cnn-reference"``.

    ``width`` scales every hidden size (rounded, at least 1), e.g. ``width=0.1`` gives an
    MLP 400-100-400 for quick CPU runs.
    """

    def scaled(sizes: Sequence[int]) -> tuple[int, ...]:
        return tuple(max(1, round(size * width)) for size in sizes)

    if name == "mlp":
        return mlp(input_shape, scaled(PAPER_MLP_HIDDEN), classes)
    if name in ("cnn", "cnn-reference"):
        variant = "paper" if name == "cnn" else "reference"
        return cnn(input_shape, variant, scaled((16, 20, 20)), classes)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


MODEL_NAMES = ("mlp", "cnn", "cnn-reference")
