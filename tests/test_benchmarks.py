"""The Fashion-MNIST comparison runs end to end in its tiny configuration."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "fashion_mnist_comparison.py"


def _load():
    spec = importlib.util.spec_from_file_location("fashion_mnist_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_in_its_tiny_configuration(tmp_path: Path) -> None:
    bench = _load()
    argv = ["--tiny", "--models", "lenet5", "--targets", "0.9", "--seeds", "0"]
    assert bench.main([*argv, "--jobs", "1", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "fashion_mnist.csv").open()))
    assert tuple(rows[0]) == bench.COLUMNS
    assert {r["method"] for r in rows} == set(bench.METHODS)
    by_method = {r["method"]: r for r in rows if r["method"] != "str_lambda"}
    assert float(by_method["dense"]["sparsity"]) == 0.0
    assert float(by_method["dense"]["train_time_rel"]) == 1.0
    for method in ("gmp", "gmp_global", "dnw", "magnitude_finetune"):
        assert float(by_method[method]["sparsity"]) == pytest.approx(0.9, abs=0.01), method
    # GMP with STR's budget ends at the sparsity STR reached
    assert float(by_method["gmp_str_budget"]["sparsity"]) == pytest.approx(
        float(by_method["str_target"]["sparsity"]), abs=0.01
    )
    assert float(by_method["str_flops"]["flops"]) < float(by_method["dense"]["flops"])
    assert len([r for r in rows if r["method"] == "str_lambda"]) == 3
    table = (tmp_path / "fashion_mnist.md").read_text()
    assert "| lenet5 | 0.9 | str_target |" in table
    for png in ("top1_vs_sparsity.png", "top1_vs_flops.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # a second call finds the finished runs and trains nothing again
    assert bench.main([*argv, "--jobs", "1", "--out", str(tmp_path)]) == 0
