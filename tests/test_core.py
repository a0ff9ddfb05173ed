"""The pure math, STR's parametrization, the report and budgets."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import strsparse
from strsparse import Budget
from strsparse.functional import (
    THRESHOLD_FUNCTIONS,
    cubic_sparsity,
    global_magnitude_masks,
    magnitude_mask,
    resolve_threshold_function,
    soft_threshold,
    straight_through,
)
from strsparse.methods import get_parametrization, raw_weight


# -- soft_threshold -------------------------------------------------------------------------
def _away_from_kinks(threshold: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Weights whose magnitudes are at least 0.05 from the threshold and from 0, so finite
    differences never cross a kink of relu(|w| - t)."""
    threshold = threshold.expand(shape)
    side = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()
    offset = 0.05 + 0.04 * torch.rand(shape, dtype=torch.float64)
    sign = torch.where(torch.rand(shape) < 0.5, -1.0, 1.0).double()
    return sign * (threshold + side * offset)


@pytest.mark.parametrize(
    "threshold_shape", [(), (4, 1, 1, 1), (4, 3, 2, 2)], ids=["layer", "channel", "weight"]
)
def test_soft_threshold_gradcheck(threshold_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    threshold = (0.1 + 0.3 * torch.rand(threshold_shape, dtype=torch.float64)).requires_grad_()
    weight = _away_from_kinks(threshold.detach(), (4, 3, 2, 2)).requires_grad_()
    assert torch.autograd.gradcheck(soft_threshold, (weight, threshold))


def test_soft_threshold_matches_the_naive_formula_and_its_gradients() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 5, requires_grad=True)
    threshold = torch.full((6, 1), 0.4, requires_grad=True)
    naive_weight = weight.detach().clone().requires_grad_()
    naive_threshold = threshold.detach().clone().requires_grad_()
    upstream = torch.randn(6, 5)

    out = soft_threshold(weight, threshold)
    naive = naive_weight.sign() * torch.relu(naive_weight.abs() - naive_threshold)
    torch.testing.assert_close(out, naive)
    (out * upstream).sum().backward()
    (naive * upstream).sum().backward()
    torch.testing.assert_close(weight.grad, naive_weight.grad)
    torch.testing.assert_close(threshold.grad, naive_threshold.grad)
    assert (out == 0).sum() > 0 and (weight.grad[out == 0] == 0).all()


def test_soft_threshold_accepts_a_float() -> None:
    w = torch.tensor([-1.0, -0.2, 0.0, 0.3, 2.0])
    torch.testing.assert_close(soft_threshold(w, 0.5), torch.tensor([-0.5, 0.0, 0.0, 0.0, 1.5]))


def test_straight_through_passes_the_gradient_unchanged() -> None:
    w = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    out = straight_through(w, lambda t: t * (t.abs() > 1))
    torch.testing.assert_close(out, torch.tensor([0.0, -2.0, 3.0]))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_threshold_functions() -> None:
    s = torch.tensor([-3.0, 0.0, 1.5])
    torch.testing.assert_close(resolve_threshold_function("sigmoid")(s), torch.sigmoid(s))
    torch.testing.assert_close(resolve_threshold_function("exp")(s), torch.exp(s))
    assert set(THRESHOLD_FUNCTIONS) == {"sigmoid", "exp"}
    with pytest.raises(ValueError, match="'sigmod' \\(did you mean 'sigmoid'\\?\\)"):
        resolve_threshold_function("sigmod")
    # the paper's s_init: g and g' are exactly 0 in float32, so only weight decay moves s
    assert float(torch.sigmoid(torch.tensor(-3200.0))) == 0.0


# -- schedules and masks ---------------------------------------------------------------------
def test_cubic_sparsity_values() -> None:
    assert cubic_sparsity(0, 10, 20, 0.9) == 0.0
    assert cubic_sparsity(5, 10, 20, 0.9, initial=0.1) == 0.1
    assert cubic_sparsity(10, 10, 20, 0.9, initial=0.1) == pytest.approx(0.1)
    assert cubic_sparsity(15, 10, 20, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(20, 10, 20, 0.9) == 0.9  # exactly s_f at t1
    assert cubic_sparsity(25, 10, 20, 0.9) == 0.9
    assert cubic_sparsity(10, 10, 10, 0.9) == 0.9  # end <= start: a jump at start


def test_magnitude_mask_exact_count_with_ties() -> None:
    weight = torch.ones(7, 9)
    for sparsity in (0.0, 0.25, 0.5, 0.999, 1.0):
        mask = magnitude_mask(weight, sparsity)
        assert int((~mask).sum()) == round(sparsity * 63)
    torch.manual_seed(0)
    w = torch.randn(50)
    mask = magnitude_mask(w, 0.3)
    assert w.abs()[~mask].max() < w.abs()[mask].min()


def test_global_magnitude_masks_drop_the_smallest_of_all_layers() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(4, 5), 3 * torch.randn(10)]
    flat = torch.cat([w.abs().flatten() for w in weights])
    th = float(flat.kthvalue(12).values)
    assert all(bool(m.all()) for m in global_magnitude_masks(weights, 0.0))
    masks = global_magnitude_masks(weights, 0.4)
    assert sum(int((~m).sum()) for m in masks) == 12
    for w, m in zip(weights, masks, strict=True):
        assert m.shape == w.shape
        assert (w.abs()[~m] <= th).all() and (w.abs()[m] > th).all()


# -- STR ------------------------------------------------------------------------------------
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


# -- report ---------------------------------------------------------------------------------
def test_sparsity_report_rows_totals_and_csv(tmp_path: Path) -> None:
    model = _net()
    handle = strsparse.sparsify(model, "str", init_threshold=-3200.0)
    with torch.no_grad():
        for s in handle.threshold_parameters():
            s.fill_(-3.0)
    report = strsparse.sparsity_report(model)
    assert [r.name for r in report.layers] == ["0", "3"]
    assert [r.shape for r in report.layers] == [(8, 3, 3, 3), (5, 128)]
    assert [r.params for r in report.layers] == [216, 640]
    for row, module in zip(report.layers, handle.layers.values(), strict=True):
        assert row.nonzero == int((module.weight != 0).sum())
        assert row.sparsity == pytest.approx(1 - row.nonzero / row.params)
        assert row.threshold == pytest.approx(float(torch.sigmoid(torch.tensor(-3.0))))
    assert report.params == 856
    assert report.nonzero == sum(r.nonzero for r in report.layers)
    assert report.sparsity == pytest.approx(1 - report.nonzero / 856)
    assert 0 < report.sparsity < 1

    text = report.to_csv(tmp_path / "report.csv")
    lines = text.strip().splitlines()
    assert lines[0] == "layer,shape,params,nonzero,sparsity_%,threshold"
    assert lines[1].startswith("0,8x3x3x3,216,")
    assert lines[-1].startswith(f"total,,856,{report.nonzero},{100 * report.sparsity:.2f}")
    assert (tmp_path / "report.csv").read_text() == text
    table = report.to_table()
    assert "total" in table and "8x3x3x3" in table and str(report) == table


# -- budgets --------------------------------------------------------------------------------
SHAPES = {"stem": (4, 3, 3, 3), "body": (64, 64, 3, 3), "head": (10, 256)}


def test_budget_uniform() -> None:
    budget = Budget.uniform(_net(), 0.8)
    assert dict(budget) == {"0": 0.8, "3": 0.8}
    assert budget.overall(_net()) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="fraction"):
        Budget.uniform(_net(), 80)


def test_budget_erk_overall_proportions_and_dense_cap() -> None:
    budget = Budget.erk(SHAPES, 0.9)
    assert budget.overall(SHAPES) == pytest.approx(0.9)
    assert budget["stem"] == 0.0  # 108 weights would exceed density 1: kept dense
    ratios = [(1 - budget[n]) / (sum(SHAPES[n]) / math.prod(SHAPES[n])) for n in ("body", "head")]
    assert ratios[0] == pytest.approx(ratios[1])
    assert all(0 <= v < 1 for v in budget.values())

    mild = Budget.erk(SHAPES, 0.5)
    assert mild.overall(SHAPES) == pytest.approx(0.5)
    assert mild["body"] > mild["head"]  # the larger layer is sparser


def test_budget_csv_round_trip_and_errors(tmp_path: Path) -> None:
    budget = Budget.erk(SHAPES, 0.9)
    path = budget.to_csv(tmp_path / "budget.csv")
    assert Budget.from_csv(path) == budget

    with pytest.raises(FileNotFoundError, match="missing.csv"):
        Budget.from_csv(tmp_path / "missing.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\nfc,0.5\n")
    with pytest.raises(ValueError, match="needs the columns 'layer' and 'sparsity'"):
        Budget.from_csv(bad)
    bad.write_text("layer,sparsity\nfc,0.5\nconv1,high\n")
    with pytest.raises(ValueError, match="bad.csv:3: sparsity 'high' of layer 'conv1'"):
        Budget.from_csv(bad)
    bad.write_text("layer,sparsity\nfc,90\n")
    with pytest.raises(ValueError, match="budget\\['fc'\\]=90.0 must be a fraction"):
        Budget.from_csv(bad)


def test_budget_from_model() -> None:
    plain = _net()
    assert dict(Budget.from_model(plain)) == {"0": 0.0, "3": 0.0}
    model = _net()
    strsparse.sparsify(model, "magnitude", budget={"0": 0.25, "3": 0.5})
    budget = Budget.from_model(model)
    assert budget["0"] == pytest.approx(round(0.25 * 216) / 216)
    assert budget["3"] == 0.5
    assert budget.overall(model) == pytest.approx(strsparse.sparsity_report(model).sparsity)
