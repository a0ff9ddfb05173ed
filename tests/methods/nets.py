"""Small models and counters shared by the per-method tests."""

from __future__ import annotations

import torch
from torch import nn

# the parametrized layers of ``conv_net``
CONV_NET_LAYERS = ["0", "2", "4"]


def conv_net(seed: int = 0) -> nn.Module:
    """Two convolutions and a classifier for (N, 3, 8, 8) inputs, seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 10)
    )


def count_zeros(module: nn.Module) -> int:
    """How many entries of ``module.weight`` are exactly zero."""
    return int((module.weight == 0).sum())
