"""Counting weights and multiply-accumulates the way the STR paper does, for the model tests."""

from __future__ import annotations

import torch
from torch import nn


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.ndim >= 2
    }


def weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in weight_layers(model).values())


def macs(model: nn.Module, size: int, *, include_pool: bool) -> int:
    """Multiply-accumulates of a (1, 3, size, size) input, in the STR paper's convention."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += module.weight.numel() * output.shape[-2] * output.shape[-1]
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, nn.AdaptiveAvgPool2d) and include_pool:
            total += inputs[0][0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    return total
