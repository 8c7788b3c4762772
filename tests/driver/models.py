"""Small models local to the driver tests (the big zoo lives in tests/zoo.py)."""

from __future__ import annotations

import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv + BN + ReLU, pooling, then an MLP head: touches conv/bn folding and linear fusion."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = y.mean((2, 3))
        return self.fc2(torch.nn.functional.gelu(self.fc1(y)))


class TwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x)
        return torch.softmax(h, -1), h.sum(-1)


def small_net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return SmallNet().eval(), (torch.randn(2, 3, 12, 12),)
