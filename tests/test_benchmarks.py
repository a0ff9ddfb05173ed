"""The benchmark scripts run: the Fashion-MNIST comparison end to end in its tiny
configuration, the thread-distance probe's round trip."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
SCRIPT = BENCHMARKS / "fashion_mnist_comparison.py"


def _load(script: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(script.stem, script)
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


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler"
)
@pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two CPUs",
)
def test_the_thread_distance_probe_measures_a_round_trip(tmp_path: Path) -> None:
    bench = _load(BENCHMARKS / "thread_distance.py")
    binary = bench.build_ping_pong(tmp_path)
    out = subprocess.run([str(binary)], capture_output=True, text=True, check=True).stdout
    assert 1.0 < float(out) < 1e6  # nanoseconds
