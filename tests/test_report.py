"""strsparse.report: the per-layer sparsity report, its totals and CSV."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import strsparse
from strsparse.flops import profile

CSV_HEADER = ["layer", "shape", "params", "nonzero", "sparsity_%", "threshold"]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


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
    assert lines[-1] == f"total,,856,{report.nonzero},{100 * report.sparsity:.4f},"
    assert (tmp_path / "report.csv").read_text() == text
    table = report.to_table()
    assert "total" in table and "8x3x3x3" in table and str(report) == table
    assert report.profile is None
    totals = report.model_totals()  # no FLOPs profile joined: every total is unknown
    assert set(totals) == {"flops", "sparse_flops", "params", "nonzero_params"}
    assert all(math.isnan(v) for v in totals.values())


def test_sparsity_report_joined_with_flops(tmp_path: Path) -> None:
    model = _net()
    handle = strsparse.sparsify(model, "str", init_threshold=-3200.0)
    with torch.no_grad():
        for s in handle.threshold_parameters():
            s.fill_(-3.0)
    prof = profile(model, (3, 6, 6))
    report = strsparse.sparsity_report(model, flops=prof)
    assert report.profile is prof
    for row in report.layers:
        assert row.flops == prof[row.name].flops
        assert row.sparse_flops == pytest.approx((1 - row.sparsity) * row.flops)
        assert row.as_dict()["flops"] == row.flops
    assert report.model_totals() == {
        "flops": float(prof.overall.flops),
        "sparse_flops": float(prof.overall.sparse_flops),
        "params": float(prof.overall.params),
        "nonzero_params": float(prof.overall.nonzero_params),
    }
    table = report.to_table()
    lines = table.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("total"))
    header, rule, *rows, rule2, total = lines[: end + 1]
    assert header.split() == [*CSV_HEADER, "flops", "sparse_flops"]
    assert set(rule) == {"-"} and rule == rule2
    assert [r.split()[0] for r in rows] == ["0", "3"]
    assert total.split()[-2] == f"{sum(r.flops for r in report.layers):,}"

    lines = report.to_csv(tmp_path / "layers.csv").splitlines()
    assert lines[0] == ",".join([*CSV_HEADER, "flops", "sparse_flops"])
    assert lines[1].split(",")[-2] == str(prof["0"].flops)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.csv"]  # no temp file left


def test_report_csv_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    path = tmp_path / "report.csv"
    path.write_text("old")

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        strsparse.sparsity_report(_net()).to_csv(path)
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"] and path.read_text() == "old"
