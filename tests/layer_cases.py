"""Tiny float64 layers of every supported kind and configuration, with matching inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerCase:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]

    def make(self, seed: int = 0) -> tuple[nn.Module, Callable[[int], Tensor]]:
        torch.manual_seed(seed)
        module = self.build().double()
        generator = torch.Generator().manual_seed(seed + 1)

        def sample(batch: int) -> Tensor:
            return torch.rand(batch, *self.input_shape, generator=generator, dtype=torch.float64)

        return module, sample


LAYER_CASES = [
    LayerCase("linear", lambda: nn.Linear(5, 3), (5,)),
    LayerCase("linear-nobias-leading-dims", lambda: nn.Linear(4, 3, bias=False), (2, 4)),
    LayerCase(
        "conv1d-stride-groups-nobias",
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, bias=False),
        (4, 9),
    ),
    LayerCase(
        "conv1d-same-circular",
        lambda: nn.Conv1d(3, 2, 4, padding="same", padding_mode="circular"),
        (3, 7),
    ),
    LayerCase(
        "conv2d-dilation-reflect-groups",
        lambda: nn.Conv2d(
            4,
            4,
            (3, 2),
            stride=(2, 1),
            padding=(1, 2),
            dilation=(2, 1),
            groups=2,
            padding_mode="reflect",
        ),
        (4, 6, 5),
    ),
    LayerCase(
        "conv2d-same-replicate",
        lambda: nn.Conv2d(3, 5, 3, padding="same", padding_mode="replicate"),
        (3, 4, 4),
    ),
    LayerCase("conv2d-depthwise", lambda: nn.Conv2d(3, 6, 3, groups=3), (3, 5, 5)),
    LayerCase(
        "conv3d-stride-dilation",
        lambda: nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(1, 1, 2)),
        (2, 3, 5, 4),
    ),
    LayerCase("conv3d-same-even-kernel", lambda: nn.Conv3d(2, 2, 2, padding="same"), (2, 3, 3, 3)),
]
