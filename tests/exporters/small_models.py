"""Small real PyTorch classifiers for the exporter tests (no download, seconds to export). Needs torch."""

from __future__ import annotations

import torch
from torch import nn

from service.core.card import ModelCard, Source


class SmallNet(nn.Module):
    """Conv with TF-"SAME" padding computed from the input shape (timm's, as in lite), BN, pool, linear."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        from timm.layers import Conv2dSame

        self.conv = Conv2dSame(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_small_net(seed: int = 0) -> SmallNet:
    """A SmallNet in eval mode with non-trivial BN statistics (so eval mode matters)."""
    torch.manual_seed(seed)
    net = SmallNet()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def small_card(name: str = "small", classes: int = 4, resolution: int = 64) -> ModelCard:
    return ModelCard(
        name=name,
        labels=tuple(f"c{i}" for i in range(classes)),
        train_resolution=resolution,
        crop_pct=0.875,
        interpolation="bilinear",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        source=Source(kind="module", architecture="SmallNet"),
    )
