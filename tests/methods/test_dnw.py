"""DNW (strsparse.methods.dnw): exact layer sparsity, straight-through gradient."""

from __future__ import annotations

import torch
from torch import nn

import strsparse
from strsparse.methods import get_parametrization, raw_weight


def test_dnw_exact_layer_sparsity_and_straight_through_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 3))
    budget = {"0": 0.3, "1": 0.62}
    handle = strsparse.sparsify(model, "dnw", budget=budget)
    for name, module in handle.layers.items():
        n = module.weight.numel()
        assert int((module.weight == 0).sum()) == int(budget[name] * n)
        # kept weights are the largest magnitudes, unchanged
        raw = raw_weight(module)
        kept = module.weight != 0
        torch.testing.assert_close(module.weight[kept], raw[kept])
        assert raw[~kept].abs().max() <= raw[kept].abs().min()

    x = torch.randn(5, 10)
    model(x).sum().backward()
    first = handle.layers["0"]
    pruned = first.weight.detach() == 0
    assert (raw_weight(first).grad[pruned] != 0).any()
    # straight-through: the raw gradient is the gradient w.r.t. the effective weight
    effective = first.weight.detach().requires_grad_()
    hidden = nn.functional.linear(x, effective, first.module.bias)
    handle.layers["1"].module(hidden).sum().backward()
    torch.testing.assert_close(raw_weight(first).grad, effective.grad)


def test_dnw_mask_follows_the_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    strsparse.sparsify(layer, "dnw", sparsity=0.5)
    with torch.no_grad():
        raw = raw_weight(layer)
        smallest = raw.abs().flatten().argmin()
        raw.view(-1)[smallest] = 100.0  # a pruned weight becomes the largest
    assert layer.weight.view(-1)[smallest] == 100.0
    assert int((layer.weight == 0).sum()) == 12


def test_dnw_prunes_int_p_n_weights_rounding_down() -> None:
    layer = nn.Linear(5, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, 11.0).view(2, 5))
    strsparse.sparsify(layer, "dnw", sparsity=0.38)  # 0.38 * 10 = 3.8 -> 3 (round: 4)
    assert int((layer.weight == 0).sum()) == 3
    assert torch.equal(layer.weight.flatten()[:3], torch.zeros(3))
    assert get_parametrization(layer).threshold() == 3.0
