"""strsparse.budgets.budget: uniform, ERK, CSV and from-model budgets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import strsparse
from strsparse import Budget

SHAPES = {"stem": (4, 3, 3, 3), "body": (64, 64, 3, 3), "head": (10, 256)}


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


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
