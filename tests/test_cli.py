"""The ``strsparse`` command line, run in-process through ``strsparse.cli.main``."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from strsparse.cli import build_parser, main
from tests.training.runs import nan_at_step

pytestmark = pytest.mark.filterwarnings("ignore:STR layer:UserWarning")  # restored runs

COMMANDS = ("train", "eval", "convert", "report", "budget", "flops", "plot-budgets", "list")


# -- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_complete_help(command: str, capsys: pytest.CaptureFixture) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: strsparse {command}")
    assert "examples:\n  strsparse " in out  # an example in the epilog
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    sub_parser = sub.choices[command]
    assert sub_parser.description and len(sub_parser.description) > 40
    for action in sub_parser._actions:
        assert action.help, f"{command}: {action.option_strings or action.dest} has no help"
        for opt in action.option_strings:
            assert opt in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    assert "usage: strsparse" in capsys.readouterr().err


def test_unknown_command_and_option_are_usage_errors(capsys: pytest.CaptureFixture) -> None:
    assert main(["trian"]) == 2
    assert "invalid choice: 'trian'" in capsys.readouterr().err
    assert main(["report", "x.pt", "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["flops", "--model", "resnet50", "stray=1"]) == 2
    assert "unrecognized arguments: stray=1" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_entry_point_runs() -> None:
    exe = shutil.which("strsparse") or str(Path(sys.executable).with_name("strsparse"))
    if not Path(exe).exists():
        pytest.skip("the strsparse console script is not installed")
    done = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: strsparse" in done.stdout and "plot-budgets" in done.stdout


@pytest.mark.slow
def test_python_dash_m_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "strsparse", "list", "models"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "resnet50" in done.stdout.split()


# -- list -----------------------------------------------------------------------------------


def test_list_models_and_methods(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"resnet50", "lenet5", "mobilenet_v1"} <= set(names)
    assert main(["list", "methods"]) == 0
    assert {"str", "dense"} <= set(capsys.readouterr().out.split())


def test_list_everything_grouped(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in ("configs:", "models:", "methods:", "budgets:"):
        assert f"\n{kind}\n" in f"\n{out}"
    assert "  fashion_mnist_str\n" in out and "  resnet50-str-90.23\n" in out


def test_list_rejects_an_unknown_kind(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "modles"]) == 2
    assert "invalid choice: 'modles'" in capsys.readouterr().err


# -- errors ---------------------------------------------------------------------------------


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("strsparse: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


@pytest.mark.parametrize("command", ["eval", "report", "budget", "convert"])
def test_a_missing_checkpoint_is_one_error_line(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = [command, str(tmp_path / "nope.pt")]
    if command in ("budget", "convert"):
        argv += ["-o", str(tmp_path / "out")]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "nope.pt" in line and "does not exist" in line


def test_a_foreign_checkpoint_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import torch

    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    assert main(["report", str(path)]) == 2
    assert "not a strsparse checkpoint" in _one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from strsparse.training import CheckpointError

    with pytest.raises(CheckpointError):
        main(["--debug", "report", str(tmp_path / "nope.pt")])
    with pytest.raises(CheckpointError):
        main(["report", str(tmp_path / "nope.pt"), "--debug"])


@pytest.mark.parametrize(
    "error",
    [
        KeyError("internal"),
        ValueError("an unchecked value deep inside"),
        ImportError("a missing internal module"),
        RuntimeError("a tensor shape bug"),
    ],
)
def test_a_library_bug_keeps_its_traceback(
    error: Exception, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Only user errors (StrsparseError, OSError) become one line; a bug is not hidden."""
    from strsparse import flops

    def broken(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(flops, "profile", broken)
    with pytest.raises(type(error)):
        main(["flops", "--model", "lenet5"])
    assert "strsparse: error" not in capsys.readouterr().err


def test_any_strsparse_error_is_one_line_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from strsparse import StrsparseError, flops

    class Custom(StrsparseError):
        pass

    def refuse(*args: object, **kwargs: object) -> None:
        raise Custom("bad input:\n  change this")

    monkeypatch.setattr(flops, "profile", refuse)
    assert main(["flops", "--model", "lenet5"]) == 2
    assert _one_error_line(capsys.readouterr().err) == "strsparse: error: bad input: change this"


def test_a_bad_device_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["eval", "run", "--device", "gpu"]) == 2
    assert "'gpu' is not a device" in capsys.readouterr().err


def test_unknown_model_names_the_closest(capsys: pytest.CaptureFixture) -> None:
    assert main(["flops", "--model", "resnet5O"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "resnet5O" in line and "resnet50" in line


# -- flops ----------------------------------------------------------------------------------


def test_flops_resnet50_prints_the_paper_totals(tmp_path: Path, capsys) -> None:
    out_csv = tmp_path / "r50.csv"
    assert main(["flops", "--model", "resnet50", "--csv", str(out_csv)]) == 0
    out = capsys.readouterr().out
    assert "input 3x224x224" in out
    assert "25,502,912" in out  # conv + fc weights (paper's convention)
    assert "4,089,284,608" in out  # multiply-accumulates including the average pool
    rows = list(csv.DictReader(out_csv.open()))
    by_name = {r["layer"]: r for r in rows}
    assert int(by_name["conv1"]["flops"]) == 118_013_952  # 9,408 x 112 x 112
    assert int(by_name["fc"]["params"]) == 2_048_000


# -- end to end: train on synthetic data, then every checkpoint command ----------------------

SYNTHETIC = [
    "data.name=synthetic",
    "data.train_limit=256",
    "data.val_limit=128",
    "data.batch_size=32",
    "device=cpu",
    "train.epochs=1",
    "optim.lr=0.05",
    "schedule.warmup_epochs=0",
    "seed=0",
]


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr captured (for module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _train(argv: list[str]) -> str:
    """``strsparse train`` on one intra-op thread (tiny models run fastest so); its stdout.
    The run must succeed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, out, err = _run(["train", *argv])
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def str_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 1-epoch STR run of LeNet-5 on 256 synthetic images, trained through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    out = _train(
        [
            "--config",
            "fashion_mnist_str",
            f"output_dir={root}",
            "name=str_run",
            *SYNTHETIC,
            "--quiet",
            # an override after an option, with a negative number
            "sparsity.options.init_threshold=-4.5",
        ]
    )
    return root / "str_run", out


def test_train_prints_the_summary(str_run: tuple[Path, str]) -> None:
    run, out = str_run
    import strsparse
    from strsparse.training import load_checkpoint, restore_model

    model, cfg, _ = restore_model(run)
    assert cfg.sparsity.options["init_threshold"] == -4.5
    assert load_checkpoint(run)["epoch"] == 1
    for name in strsparse.sparse_layers(model):  # the per-layer table
        assert re.search(rf"^{re.escape(name)}\s", out, re.MULTILINE), out
    assert re.search(r"^top-1 \d+\.\d\d%", out, re.MULTILINE)
    report = strsparse.sparsity_report(model)
    assert f"sparsity {100 * report.sparsity:.2f}%" in out
    assert re.search(r"^FLOPs dense [\d,]+ .*sparse [\d,]+", out, re.MULTILINE)
    assert f"run directory: {run}" in out
    assert f"plots: {run / 'plots'}" in out


def test_train_report_and_eval_print_what_a_structured_run_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import strsparse
    from strsparse.training import restore_model

    # 64 steps, the thresholds started at e^-1 of the importance values' start
    out = _train(
        ["--config", "fashion_mnist_str_filters", f"output_dir={tmp_path}", *SYNTHETIC]
        + ["--quiet", "data.train_limit=2048", "sparsity.options.init_threshold=-1"]
    )
    model, _, _ = restore_model(tmp_path / "fashion_mnist_str_filters")
    report = strsparse.structure_report(model)
    kept = ", ".join(f"{n} {alive}/{total}" for n, (alive, total) in report.items())
    assert f"kept (filters or rank-one components): {kept}\n" in out
    assert sum(alive for alive, _ in report.values()) < 432
    params = sum(p.numel() for p in strsparse.slim(model).parameters())
    assert f"slim model: {params:,} parameters" in out
    # report says the same of the saved run, beside the zeros' count
    run = tmp_path / "fashion_mnist_str_filters"
    assert main(["report", str(run)]) == 0
    report = capsys.readouterr().out
    assert f"kept (filters or rank-one components): {kept}\n" in report
    assert f"slim model: {params:,} parameters" in report
    assert f"strsparse convert {run} -o OUT --slim" in report
    assert main(["eval", str(run)]) == 0  # and eval, after its accuracy
    evaluated = capsys.readouterr().out
    assert evaluated.index("top-1") < evaluated.index(f"slim model: {params:,} parameters")


def test_two_targets_name_the_override_that_drops_one(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["train", "-c", "fashion_mnist_str_filters", f"output_dir={tmp_path}", *SYNTHETIC]
    assert main([*argv, "sparsity.options.flops=0.3"]) == 2
    err = capsys.readouterr().err
    assert "both sparsity=0.5 and flops=0.3" in err
    assert "sparsity.options.sparsity=null" in err
    assert not (tmp_path / "fashion_mnist_str_filters").exists()  # nothing half-made


def test_eval(str_run: tuple[Path, str], capsys) -> None:
    run, _ = str_run
    assert main(["eval", str(run), "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    top1 = float(re.search(r"top-1 (\d+\.\d+)%", out).group(1))
    assert top1 == pytest.approx(summary["final"]["top1"], abs=0.01)
    assert re.search(r"top-5 \d+\.\d+%\s+loss \d+\.\d+", out)
    assert f"sparsity {100 * summary['sparsity']:.2f}%" in out
    assert re.search(r"overall\s+params [\d,]+.*FLOPs dense [\d,]+.*sparse [\d,]+", out)


def test_report_joins_sparsity_and_flops(str_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    import strsparse
    from strsparse.training import restore_model

    run, _ = str_run
    path = tmp_path / "layers.csv"
    assert main(["report", str(run / "checkpoints" / "last.pt"), "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    model, _, _ = restore_model(run)
    report = strsparse.sparsity_report(model)
    rows = {r["layer"]: r for r in csv.DictReader(path.open())}
    assert list(rows) == [*(row.name for row in report.layers), "total"]
    for row in report.layers:
        got = rows[row.name]
        assert int(got["params"]) == row.params and int(got["nonzero"]) == row.nonzero
        assert float(got["threshold"]) == pytest.approx(row.threshold)
        flops, sparse = int(got["flops"]), int(got["sparse_flops"])
        assert sparse == pytest.approx((1 - row.sparsity) * flops, abs=1)
        assert row.name in out
    assert int(rows["total"]["nonzero"]) == report.nonzero
    assert "overall" in out and "backbone" in out


def test_budget_then_flops_and_plot(str_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    from strsparse import Budget
    from strsparse.training import restore_model

    run, _ = str_run
    path = tmp_path / "budget.csv"
    assert main(["budget", str(run), "-o", str(path)]) == 0
    model, _, _ = restore_model(run)
    learned = Budget.from_model(model)
    assert Budget.from_csv(path) == learned
    capsys.readouterr()

    assert main(["flops", "--model", "lenet5", "--budget", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input 1x28x28" in out
    dense, sparse = map(
        lambda s: int(s.replace(",", "")),
        re.search(r"overall\s.*FLOPs dense ([\d,]+) .*sparse ([\d,]+)", out).groups(),
    )
    assert sparse < dense

    png = tmp_path / "budgets.png"
    assert main(["plot-budgets", str(run), str(path), "--model", "lenet5", "-o", str(png)]) == 0
    assert png.stat().st_size > 1000


def test_convert_loads_strictly_into_the_plain_model(
    str_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    from safetensors.torch import load_file

    from strsparse.models import create_model
    from strsparse.training import restore_model

    run, _ = str_run
    out = tmp_path / "dense"
    assert main(["convert", str(run), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    sparse_model, cfg, _ = restore_model(run)
    plain = create_model(cfg.model.name, num_classes=10, in_channels=1, **cfg.model.kwargs)
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), sparse_model(x))

    before = (out / "model.safetensors").read_bytes()
    assert main(["convert", str(run), "-o", str(out)]) == 2  # refuses to overwrite
    line = _one_error_line(capsys.readouterr().err)
    assert "not empty" in line and "--force" in line
    assert (out / "model.safetensors").read_bytes() == before
    assert main(["convert", str(run), "-o", str(out), "--force"]) == 0


def test_convert_to_sparse_and_onnx(str_run: tuple[Path, str], tmp_path: Path, capsys) -> None:
    import strsparse
    from strsparse.training import restore_model

    run, _ = str_run
    model, _, _ = restore_model(run)
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        expected = model.eval()(x)
    out = tmp_path / "sparse"
    assert main(["convert", str(run), "-o", str(out), "--format", "sparse"]) == 0
    assert "load_sparse" in capsys.readouterr().out
    with torch.inference_mode():
        torch.testing.assert_close(strsparse.load_sparse(out)(x), expected, rtol=1e-4, atol=1e-4)
    assert main(["convert", str(run), "-o", str(out), "--format", "sparse"]) == 2  # not empty
    assert "--force" in _one_error_line(capsys.readouterr().err)
    argv = ["convert", str(run), "-o", str(tmp_path / "x"), "--format", "sparse", "--slim"]
    assert main(argv) == 2
    assert "--slim" in _one_error_line(capsys.readouterr().err)
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (pip install 'strsparse[onnx]')")
    out = tmp_path / "onnx"
    assert main(["convert", str(run), "-o", str(out), "--format", "onnx"]) == 0
    assert "onnxruntime" in capsys.readouterr().out
    assert (out / "model.onnx").stat().st_size > 1000


def test_config_errors_are_one_line_naming_the_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name: lenet5\noptim:\n  lrr: 0.1\n")
    assert main(["train", "--config", str(path)]) == 2
    assert "optim.lrr" in _one_error_line(capsys.readouterr().err)

    path.write_text("model:\n  name: lenet5\n")
    assert main(["train", "--config", str(path), "train.epochs=-3"]) == 2
    assert "train.epochs" in _one_error_line(capsys.readouterr().err)
    assert main(["train", "--config", str(path), "sparsity.methd=gmp"]) == 2
    assert "sparsity.methd" in _one_error_line(capsys.readouterr().err)
    assert main(["train", "--config", "no_such_config"]) == 2
    assert "no_such_config" in _one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_budget_transfer_from_str_to_gmp(str_run: tuple[Path, str], tmp_path: Path) -> None:
    import strsparse
    from strsparse import Budget
    from strsparse.training import restore_model

    run, _ = str_run
    str_model, _, _ = restore_model(run)
    budget = Budget.from_model(str_model)
    code, out, err = _run(
        [
            "train",
            "--config",
            "fashion_mnist_gmp",  # its uniform 90% target gives way to the budget
            f"output_dir={tmp_path}",
            "name=gmp_run",
            *SYNTHETIC,
            "--budget",
            str(run),
            "--quiet",
        ]
    )
    assert code == 0, err
    gmp_model, cfg, handle = restore_model(tmp_path / "gmp_run")
    assert handle.method == "gmp"
    layers = strsparse.sparse_layers(gmp_model)
    assert set(layers) == set(budget)
    for name, module in layers.items():
        zeros = int((module.weight == 0).sum())
        assert abs(zeros - budget[name] * module.weight.numel()) <= 1, name


def test_budget_needs_a_method_that_takes_one(tmp_path: Path, capsys) -> None:
    code = main(["train", "--config", "fashion_mnist_str", "--budget", "resnet50-str-90.23"])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--budget" in line and "'str'" in line and "sparsity.method=gmp" in line


def test_resume_alone_continues_the_run_with_its_own_config(
    str_run: tuple[Path, str], tmp_path: Path, capsys
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(str_run[0], run)
    last = (run / "checkpoints" / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert f"run directory: {run}" in capsys.readouterr().out
    assert (run / "checkpoints" / "last.pt").read_bytes() == last  # finished: unchanged
    assert main(["train", "--resume", str(run), "optim.lr=0.5", "--quiet"]) == 2
    assert "optim.lr 0.05 -> 0.5" in _one_error_line(capsys.readouterr().err)
    assert main(["train"]) == 2
    assert "train needs --config" in _one_error_line(capsys.readouterr().err)


def test_divergence_is_one_line_and_exit_status_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from strsparse.training import load_checkpoint

    last = tmp_path / "nan" / "checkpoints" / "last.pt"
    kept = nan_at_step(monkeypatch, 8 + 3, last)  # third step of epoch 2 (8 steps per epoch)
    argv = ["train", "-c", "fashion_mnist_str", f"output_dir={tmp_path}", "name=nan", *SYNTHETIC]
    assert main([*argv, "train.epochs=2", "--quiet"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "training diverged: the loss is nan at epoch 2, step 11" in line
    assert f"{last} (epoch 1) is kept as it was" in line
    assert last.read_bytes() == kept["bytes"]
    assert load_checkpoint(last)["epoch"] == 1


def test_under_torchrun_only_rank_0_prints(
    str_run: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "copy"
    shutil.copytree(str_run[0], run)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--resume", str(run)]) == 0  # finished: nothing to train
    captured = capsys.readouterr()
    assert captured.out == ""
    assert " INFO " not in captured.err
