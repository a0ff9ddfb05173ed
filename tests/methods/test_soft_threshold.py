"""STR's parametrization (strsparse.methods.soft_threshold): granularities, init, eq. 6."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import strsparse
from strsparse.methods import get_parametrization, raw_weight
from tests.lookalikes import Conv1D


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


@pytest.mark.parametrize(
    ("granularity", "shapes"),
    [
        ("layer", [(), ()]),
        ("channel", [(8, 1, 1, 1), (5, 1)]),
        ("weight", [(8, 3, 3, 3), (5, 128)]),
        ("global", [(), ()]),
    ],
)
def test_str_granularities(granularity: str, shapes: list[tuple[int, ...]]) -> None:
    model = _net()
    handle = strsparse.sparsify(model, "str", granularity=granularity)
    params = [get_parametrization(m) for m in handle.layers.values()]
    with torch.no_grad():  # a threshold that prunes some weights and has g'(s) != 0
        for s in handle.threshold_parameters():
            s.fill_(-3.0)
    assert [tuple(p.s.shape) for p in params] == shapes
    thresholds = handle.threshold_parameters()
    if granularity == "global":
        assert params[0].s is params[1].s
        assert len(thresholds) == 1
        assert len([p for p in model.parameters() if p.dim() == 0]) == 1
    else:
        assert len(thresholds) == 2
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    for s in thresholds:
        assert s.grad is not None and s.grad.shape == s.shape and s.grad.abs().sum() > 0


def test_str_init_warning() -> None:
    torch.manual_seed(0)
    # sigmoid(-3.2) = 0.039 > 1/sqrt(784) = 0.036: every weight of the layer is pruned
    with pytest.warns(UserWarning, match="init_threshold"):
        strsparse.sparsify(nn.Linear(784, 300), "str", init_threshold=-3.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strsparse.sparsify(nn.Linear(784, 300), "str", init_threshold=-3200.0)


def test_str_weight_decay_alone_moves_s_as_eq6_predicts() -> None:
    """With g'(s) = 0 (s = -3200 in float32) the loss cannot move s: s <- s - lr * wd * s."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    handle = strsparse.sparsify(layer, "str", init_threshold=-3200.0)
    (s,) = handle.threshold_parameters()
    lr, wd = 0.1, 5e-4
    opt = torch.optim.SGD([s], lr=lr, weight_decay=wd)
    x = torch.randn(3, 6)
    for _ in range(3):
        before = s.detach().clone()
        opt.zero_grad()
        layer(x).square().sum().backward()
        assert float(s.grad) == 0.0
        opt.step()
        assert torch.equal(s.detach(), before - lr * (wd * before))


def test_str_one_sgd_step_on_s_matches_eq6() -> None:
    """s <- s + lr g'(s) P - lr wd s with P = <dL/dW_hat, sign(W) 1{W_hat != 0}>."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    handle = strsparse.sparsify(layer, "str")
    (s,) = handle.threshold_parameters()
    with torch.no_grad():
        s.fill_(-2.0)  # g(s) = 0.12: part of the layer is pruned
    lr, wd = 0.5, 1e-2
    opt = torch.optim.SGD([s], lr=lr, weight_decay=wd)
    x, c = torch.randn(5, 8), torch.randn(5, 4)

    weight = raw_weight(layer).detach()
    w_hat = layer.weight.detach().clone().requires_grad_()
    assert (w_hat == 0).any() and (w_hat != 0).any()
    (nn.functional.linear(x, w_hat, layer.bias) * c).sum().backward()
    p = float((w_hat.grad * weight.sign() * (w_hat != 0)).sum())
    s0 = float(s.detach())
    g_prime = torch.sigmoid(torch.tensor(s0)) * (1 - torch.sigmoid(torch.tensor(s0)))
    expected = s0 + lr * float(g_prime) * p - lr * wd * s0

    opt.zero_grad()
    (layer(x) * c).sum().backward()
    opt.step()
    assert float(s.detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("layer", "s_shape"),
    [(nn.ConvTranspose2d(4, 6, 3), (1, 6, 1, 1)), (Conv1D(6, 5), (1, 6))],
    ids=["conv_transpose", "conv1d_in_x_out"],
)
def test_str_channel_thresholds_follow_the_output_axis(layer: nn.Module, s_shape: tuple) -> None:
    handle = strsparse.sparsify(layer, "str", granularity="channel")
    (s,) = handle.threshold_parameters()
    assert tuple(s.shape) == s_shape
    with torch.no_grad():
        s.view(-1)[2] = 10.0  # threshold ~1 for output channel 2 only: that channel is zero
        nn.init.normal_(layer.bias, std=1.0)
    x = torch.randn(2, 4, 3, 3) if isinstance(layer, nn.ConvTranspose2d) else torch.randn(2, 5)
    out = layer(x)
    channel = out[:, 2]  # (B, H, W) or (B,)
    torch.testing.assert_close(channel, torch.full_like(channel, float(layer.bias.detach()[2])))
    assert (out[:, 3] != layer.bias.detach()[3]).any()
