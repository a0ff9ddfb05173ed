"""ST-3 (strsparse.methods.st3): the weight formula, the schedule, the fix and freezing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import strsparse
from strsparse import cubic_sparsity
from strsparse.methods import get_parametrization, raw_weight
from strsparse.methods.st3 import (
    StraightThroughSoftThreshold,
    interpolated_quantile,
    st3_weight,
)
from tests.lookalikes import Conv1D
from tests.methods.nets import CONV_NET_LAYERS, conv_net, count_zeros


def _global_quantile(handle: strsparse.SparsityHandle, sparsity: float) -> float:
    flat = torch.cat([raw_weight(m).detach().abs().flatten() for m in handle.layers.values()])
    return float(torch.quantile(flat, sparsity))


def _count(sparsity: float, n: int) -> int:
    """Weights at or below the interpolated quantile of n distinct magnitudes."""
    return math.floor(sparsity * (n - 1)) + 1 if sparsity > 0 else 0


def test_st3_schedule_values_and_exact_final_sparsity() -> None:
    model = conv_net()
    handle = strsparse.sparsify(model, "st3", sparsity=0.9, start=10, end=30, freeze=30)
    total = sum(m.weight.numel() for m in handle.layers.values())

    handle.step(5, 100)  # dense before t_start: the forward weight is the raw weight
    for module in handle.layers.values():
        assert torch.equal(module.weight, raw_weight(module))
        assert get_parametrization(module).threshold() == 0.0

    for step in (10, 20, 29):
        target = cubic_sparsity(step, 10, 30, 0.9)
        handle.step(step, 100)
        expected = _global_quantile(handle, target) if target > 0 else 0.0
        for module in handle.layers.values():
            p = get_parametrization(module)
            assert float(p.target) == pytest.approx(target)
            assert p.threshold() == pytest.approx(expected)
        zeros = sum(count_zeros(m) for m in handle.layers.values())
        assert zeros == _count(target, total)
    assert float(get_parametrization(model[0]).target) == pytest.approx(0.9 * (1 - 0.05**3))

    handle.step(30, 100)  # p_max exactly, then the fix
    assert sum(count_zeros(m) for m in handle.layers.values()) == _count(0.9, total)
    assert all(bool(get_parametrization(m).frozen) for m in handle.layers.values())


def test_st3_normalized_variant_scales_the_layer_thresholds() -> None:
    model = conv_net()
    handle = strsparse.sparsify(model, "st3", sparsity=0.6, normalize=True, end=10)
    total = sum(m.weight.numel() for m in handle.layers.values())
    handle.step(10, 20)
    thresholds = {}
    for name, module in handle.layers.items():
        shape = raw_weight(module).shape
        thresholds[name] = get_parametrization(module).threshold() * sum(shape) ** 0.5
    # one quantile q of |w| * sqrt(sum(shape)) over all layers; th_l = q / sqrt(sum(shape))
    assert len({round(v, 5) for v in thresholds.values()}) == 1
    assert sum(count_zeros(m) for m in handle.layers.values()) == _count(0.6, total)


def test_st3_budget_uses_per_layer_quantiles() -> None:
    budget = {"0": 0.2, "2": 0.5, "4": 0.9}
    handle = strsparse.sparsify(conv_net(), "st3", budget=budget, start=0, end=10, rescale=False)
    numel = {n: m.weight.numel() for n, m in handle.layers.items()}
    handle.step(5, 20)
    for name in CONV_NET_LAYERS:
        target = cubic_sparsity(5, 0, 10, budget[name])
        assert count_zeros(handle.layers[name]) == _count(target, numel[name])
    handle.step(10, 20)
    assert {n: count_zeros(m) for n, m in handle.layers.items()} == {
        n: _count(budget[n], numel[n]) for n in CONV_NET_LAYERS
    }


def test_st3_resume_before_the_fix_continues_identically() -> None:
    def mlp(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))

    def train(m: nn.Module, h: strsparse.SparsityHandle, o: torch.optim.Optimizer, step: int):
        h.step(step, 40)
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    x = torch.randn(5, 12)
    model = mlp(0)
    handle = strsparse.sparsify(model, "st3", sparsity=0.7, end=20, freeze=20)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(8):
        train(model, handle, opt, step)
    resumed = mlp(5)
    resumed_handle = strsparse.sparsify(resumed, "st3", sparsity=0.7, end=20, freeze=20)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05)
    for step in range(8, 24):  # through the fix at step 20 and beyond
        train(model, handle, opt, step)
        train(resumed, resumed_handle, resumed_opt, step)
    torch.testing.assert_close(resumed(x), model(x))
    for name in ("0", "2"):
        assert torch.equal(
            get_parametrization(resumed.get_submodule(name)).mask,
            get_parametrization(model.get_submodule(name)).mask,
        )


def test_st3_weight_matches_the_formula_channel_by_channel() -> None:
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 2, 2)
    th = 0.6
    out = st3_weight(weight, th)
    for c in range(5):
        w = weight[c]
        keep = w.abs() > th
        expected = (w - w.sign() * th) * keep
        r = ((w.abs() * keep).mean() + 1e-6) / (w.abs().mean() + 1e-6)
        torch.testing.assert_close(out[c], expected * 1.01 / (r + 0.01))
    torch.testing.assert_close(
        st3_weight(weight, th, rescale=False), (weight - weight.sign() * th) * (weight.abs() > th)
    )
    torch.testing.assert_close(st3_weight(weight, 0.0), weight, rtol=0, atol=0)


def _st3_linear(**options) -> tuple[nn.Linear, strsparse.SparsityHandle]:
    torch.manual_seed(0)
    layer = nn.Linear(9, 6)
    return layer, strsparse.sparsify(layer, "st3", **options)


def test_st3_is_straight_through_before_the_fix_and_masked_after() -> None:
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=5, freeze=5, rescale=False)
    x = torch.randn(4, 9)
    handle.step(3, 10)
    pruned = layer.weight.detach() == 0
    assert pruned.any()
    layer(x).sum().backward()
    expected = x.sum(0).expand(6, 9)  # d(sum(x W^T))/dW for every weight, pruned or not
    torch.testing.assert_close(raw_weight(layer).grad, expected)

    raw_weight(layer).grad = None
    handle.step(5, 10)  # the fix
    param = get_parametrization(layer)
    assert bool(param.frozen)
    mask = param.mask
    assert int((~mask).sum()) == round(0.5 * 54)
    layer(x).sum().backward()
    torch.testing.assert_close(raw_weight(layer).grad, expected * mask)

    # fine-tuning keeps the pruned weights at zero
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(6, 9):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
        handle.step(step, 10)
        assert torch.equal(layer.weight == 0, ~mask)


def test_st3_fix_writes_the_forward_weights_into_the_raw_ones() -> None:
    layer, handle = _st3_linear(sparsity=0.4, start=0, end=4, freeze=4)
    handle.step(3, 10)
    raw_before = raw_weight(layer).detach().clone()
    handle.step(4, 10)  # threshold at p_max, then the fix
    threshold = get_parametrization(layer).threshold()
    assert threshold == pytest.approx(float(torch.quantile(raw_before.abs(), 0.4)))
    w = raw_weight(layer).detach()
    torch.testing.assert_close(w, st3_weight(raw_before, threshold))
    assert int((w == 0).sum()) == round(0.4 * 54)
    torch.testing.assert_close(layer.weight.detach(), w)


def test_st3_freeze_on_demand_keeps_outputs() -> None:
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=8)
    x = torch.randn(3, 9)
    handle.step(4, 10)
    before = layer(x).detach()
    StraightThroughSoftThreshold.freeze(handle.layers)
    torch.testing.assert_close(layer(x), before)
    handle.step(5, 10)  # frozen layers ignore the schedule
    torch.testing.assert_close(layer(x), before)
    strsparse.finalize(layer)
    torch.testing.assert_close(layer(x), before)


def test_st3_frozen_state_survives_a_round_trip() -> None:
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=3, freeze=3)
    for step in range(5):
        handle.step(step, 10)
    fresh, _ = _st3_linear(sparsity=0.5, start=0, end=3, freeze=3)
    fresh.load_state_dict(layer.state_dict())
    param = get_parametrization(fresh)
    assert param._frozen and bool(param.frozen)
    with torch.no_grad():
        raw_weight(fresh).add_(1.0)  # frozen: the mask, not a threshold, decides
    assert torch.equal(fresh.weight == 0, ~param.mask)


def test_st3_freeze_rejects_other_methods() -> None:
    handle = strsparse.sparsify(conv_net(), "gmp", sparsity=0.5)
    with pytest.raises(ValueError, match="freeze expects layers sparsified with 'st3'"):
        StraightThroughSoftThreshold.freeze(handle.layers)


@pytest.mark.parametrize(
    "layer", [nn.ConvTranspose2d(4, 6, 3), Conv1D(6, 5)], ids=["conv_transpose", "conv1d"]
)
def test_st3_rescales_along_the_output_axis(layer: nn.Module) -> None:
    torch.manual_seed(0)
    handle = strsparse.sparsify(layer, "st3", sparsity=0.6, rescale=True)
    handle.step(5, 10)
    p = get_parametrization(layer)
    assert p.axis == 1
    raw = raw_weight(layer).detach()
    # the same rescaling as on the weight transposed to (out, in, ...)
    expected = st3_weight(raw.transpose(0, 1), p.current_threshold).transpose(0, 1)
    torch.testing.assert_close(layer.weight.detach(), expected)
    assert not torch.allclose(layer.weight.detach(), st3_weight(raw, p.current_threshold))


def test_st3_threshold_is_the_linearly_interpolated_quantile() -> None:
    values = torch.tensor([1.6, 0.1, 0.8, 0.2, 0.4])  # sorted: 0.1 0.2 0.4 0.8 1.6
    # pos = q * (n - 1): 0.5 -> 2 (0.4); 0.3 -> 1.2 (0.2 + 0.2 * 0.2); 0.9 -> 3.6 (0.8 + 0.6 * 0.8)
    for q, expected in [(0.0, 0.0), (0.5, 0.4), (0.3, 0.24), (0.9, 1.28), (1.0, 1.6)]:
        assert float(interpolated_quantile(values, q)) == pytest.approx(expected)
    big = torch.rand(1000)
    for q in (0.13, 0.5, 0.977):
        assert float(interpolated_quantile(big, q)) == pytest.approx(float(big.quantile(q)))

    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():  # magnitudes sorted: 0.05 0.1 0.2 0.4 0.8 1.6
        layer.weight.copy_(torch.tensor([[0.1, -0.2, 0.4], [-0.8, 1.6, 0.05]]))
    handle = strsparse.sparsify(layer, "st3", sparsity=0.5, start=0, end=2, rescale=False)
    handle.step(2, 10)  # p_max = 0.5: pos 2.5 -> 0.2 + 0.5 * (0.4 - 0.2) = 0.3
    assert get_parametrization(layer).threshold() == pytest.approx(0.3)
    expected = torch.tensor([[0.0, 0.0, 0.1], [-0.5, 1.3, 0.0]])
    torch.testing.assert_close(layer.weight.detach(), expected)


def test_st3_freeze_is_its_own_point_after_the_ramp() -> None:
    # the authors' default: the mask keeps moving at p_max until the last step
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=4)
    for step in range(9):
        handle.step(step, 10)
        assert not get_parametrization(layer)._frozen
    assert float(get_parametrization(layer).target) == 0.5
    zeros_before = int((layer.weight[0] == 0).sum())
    with torch.no_grad():  # the mask still follows the weights after the ramp
        raw_weight(layer)[0].mul_(10.0)
    handle.step(8, 10)
    assert int((layer.weight[0] == 0).sum()) < zeros_before
    handle.step(9, 10)
    assert get_parametrization(layer)._frozen

    layer, handle = _st3_linear(sparsity=0.5, start=0, end=4, freeze=0.6)  # step 6 of 10
    for step in range(6):
        handle.step(step, 10)
    assert not get_parametrization(layer)._frozen
    handle.step(6, 10)
    assert get_parametrization(layer)._frozen
    with pytest.raises(ValueError, match="freeze=0.5 comes before end=0.8"):
        strsparse.sparsify(nn.Linear(3, 3), "st3", sparsity=0.5, end=0.8, freeze=0.5)
