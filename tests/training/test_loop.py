"""The training loop (strsparse.training.loop): evaluation and end-to-end runs."""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import strsparse
from strsparse.methods.structured import structure_report
from strsparse.training import (
    CheckpointError,
    TrainingDiverged,
    evaluate,
    learning_rate,
    load_checkpoint,
    restore_model,
    save_checkpoint,
    train,
)
from strsparse.training import loop as training_loop
from strsparse.training.recorder import CSV_COLUMNS
from tests.training.runs import nan_at_step, synthetic_config


def test_evaluate_counts_top1_top5_and_loss() -> None:
    # logits = one-hot-ish scores: sample i ranks classes 0..5 in a known order
    logits = torch.tensor(
        [
            [6.0, 5, 4, 3, 2, 1],  # ranks: 0,1,2,3,4,5
            [1.0, 6, 5, 4, 3, 2],  # ranks: 1,2,3,4,5,0
            [1.0, 2, 3, 4, 5, 6],  # ranks: 5,4,3,2,1,0
            [6.0, 5, 4, 3, 2, 1],
        ]
    )
    targets = torch.tensor([0, 0, 1, 0])  # top1: yes, no, no, yes; top5: yes, no, yes, yes
    loader = DataLoader(TensorDataset(logits, targets), batch_size=3)
    metrics = evaluate(nn.Identity(), loader, device="cpu")
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["top5"] == pytest.approx(75.0)
    expected = nn.functional.cross_entropy(logits, targets).item()
    assert metrics["loss"] == pytest.approx(expected, rel=1e-6)


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send ``signum`` (SIGINT: Ctrl-C) during the forward of training step ``step``
    (1-based)."""
    original = training_loop.build_model
    calls = {"n": 0}

    def build_with_hook(cfg, info=None, *, loading_weights=False):
        assert not loading_weights  # a fresh run: nothing to resume from
        model, handle, info = original(cfg, info, loading_weights=loading_weights)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == step:
                    signal.raise_signal(signum)

        model.register_forward_hook(hook)
        return model, handle, info

    monkeypatch.setattr(training_loop, "build_model", build_with_hook)


@pytest.mark.slow
def test_train_synthetic_writes_the_run_directory(tmp_path: Path) -> None:
    cfg = synthetic_config(tmp_path)
    result = train(cfg)
    run = tmp_path / "run"
    assert result.run_dir == run and result.summary_path == run / "summary.json"
    num_classes = 10
    assert result.final["top1"] > 100 / num_classes + 20  # well above chance
    assert 0.0 <= result.final["sparsity"] < 1.0
    assert result.best["top1"] >= result.final["top1"]

    assert (run / "config.yaml").is_file()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {"epoch", "lr", "train_loss", "val_top1", "val_top5", "sparsity", "time"} <= set(rows[0])
    assert float(rows[-1]["val_top1"]) == pytest.approx(result.final["top1"], abs=1e-3)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["final"]["top1"] == pytest.approx(result.final["top1"])
    assert summary["flops"]["dense"] > summary["flops"]["sparse"] > 0
    layers = {row["name"]: row for row in summary["layers"]}
    assert set(layers) == set(strsparse.sparse_layers(_restored(run)))
    assert all(row["threshold"] is not None for row in layers.values())

    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for png in ("layer_sparsity.png", "thresholds.png", "metrics.png"):
        assert (run / "plots" / png).stat().st_size > 1000
    last = load_checkpoint(run)
    assert last["epoch"] == 2 and last["step"] == 2 * 8 and last["batch"] == 0
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["format"]
    assert "epoch 2/2" in (run / "train.log").read_text()

    # the run directory holds a finished run: training again resumes and has nothing to do
    again = train(cfg)
    assert again.final == result.final
    assert load_checkpoint(run)["step"] == 2 * 8
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2


@pytest.mark.slow
def test_threshold_plot_starts_at_the_initial_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from strsparse import plots

    calls = []
    monkeypatch.setattr(plots, "plot_thresholds", lambda *a, **kw: calls.append((a, kw)))
    train(synthetic_config(tmp_path, **{"train.epochs": 1}))
    initial = float(torch.sigmoid(torch.tensor(-6.0)))  # g(s) of init_threshold=-6
    history = load_checkpoint(tmp_path / "run")["history"]
    assert history["initial_threshold"] and all(
        v == pytest.approx(initial) for v in history["initial_threshold"].values()
    )
    ((series, _path), kwargs) = calls[0]
    assert kwargs["epochs"] == [0, 1]
    for layer, values in series.items():
        assert values == [history["initial_threshold"][layer], history["layer_threshold"][layer][0]]


def _restored(run: Path) -> nn.Module:
    from strsparse.training import restore_model

    model, _, _ = restore_model(run)
    return model


@pytest.mark.slow
def test_train_one_epoch_on_a_fashion_mnist_slice(tmp_path: Path) -> None:
    cfg = synthetic_config(
        tmp_path,
        **{
            "data.name": "fashion_mnist",
            "data.train_limit": 2000,
            "data.val_limit": 1000,
            "data.batch_size": 64,
            "train.epochs": 1,
            "sparsity.options": {"init_threshold": -3200.0},
        },
    )
    result = train(cfg)
    assert result.final["top1"] > 40.0  # chance is 10%


def _model_state(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run)["model"]


GMP = {"sparsity.method": "gmp", "sparsity.options": {"sparsity": 0.8, "frequency": 2}}
STR_TARGET = {"sparsity.options": {"sparsity": 0.8}}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("interrupt_step", "method", "signum"),
    [
        (8, {}, signal.SIGINT),
        (11, {}, signal.SIGINT),
        (11, GMP, signal.SIGINT),
        (11, {}, signal.SIGTERM),
        (11, STR_TARGET, signal.SIGINT),
    ],
    ids=[
        "str-epoch-boundary",
        "str-mid-epoch",
        "gmp-mid-epoch",
        "str-mid-epoch-sigterm",
        "str-target-mid-epoch",
    ],
)
def test_resume_after_ctrl_c_equals_uninterrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interrupt_step: int, method: dict, signum
) -> None:
    full = train(synthetic_config(tmp_path, "full", **method))
    with monkeypatch.context() as patch:
        _interrupt_at(patch, interrupt_step, signum)
        with pytest.raises(KeyboardInterrupt):
            train(synthetic_config(tmp_path, "resumed", **method))
    saved = load_checkpoint(tmp_path / "resumed")
    assert saved["step"] == interrupt_step
    assert saved["batch"] == interrupt_step % 8
    # picks up checkpoints/last.pt of the run directory, building the model to load it into
    loading = []
    original = training_loop.build_model

    def build_recording(cfg, info=None, *, loading_weights=False):
        loading.append(loading_weights)
        return original(cfg, info, loading_weights=loading_weights)

    with monkeypatch.context() as patch:
        patch.setattr(training_loop, "build_model", build_recording)
        resumed = train(synthetic_config(tmp_path, "resumed", **method))
    assert loading == [True]

    expected, got = _model_state(tmp_path / "full"), _model_state(tmp_path / "resumed")
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.final == full.final
    assert resumed.final["sparsity"] > (0.5 if method else 0.0)
    rows = list(csv.DictReader((tmp_path / "resumed" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_a_repeated_sigterm_waits_for_the_checkpoint_a_second_ctrl_c_does_not() -> None:
    # a scheduler and torchrun may each send SIGTERM to a worker: the second must not cut
    # the checkpoint short; a second Ctrl-C is someone who wants out now
    with training_loop._InterruptFlag() as interrupt:
        assert interrupt.active and not interrupt.raised
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert interrupt.raised
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers put back


@pytest.mark.slow
def test_a_checkpoint_of_another_number_of_processes_resumes_at_an_epoch_end_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    quick = {"train.max_steps_per_epoch": 2, "train.tensorboard": False}  # 2 epochs x 2 steps
    for name, step in (("inside", 3), ("boundary", 2)):
        with monkeypatch.context() as patch:
            _interrupt_at(patch, step)
            with pytest.raises(KeyboardInterrupt):
                train(synthetic_config(tmp_path, name, **quick))
        last = tmp_path / name / "checkpoints" / "last.pt"
        save_checkpoint({**load_checkpoint(last), "world_size": 2}, last)  # as if from torchrun

    inside = tmp_path / "inside" / "checkpoints" / "last.pt"
    before = inside.read_bytes()
    with pytest.raises(CheckpointError, match=r"inside epoch 2 by 2 .*nproc_per_node=2"):
        train(synthetic_config(tmp_path, "inside", **quick))
    assert inside.read_bytes() == before

    result = train(synthetic_config(tmp_path, "boundary", **quick))  # each rank reseeds
    assert "not exactly" in caplog.text
    assert load_checkpoint(result.run_dir)["epoch"] == 2


def test_a_target_reaches_the_run_files(tmp_path: Path) -> None:
    result = train(synthetic_config(tmp_path, **STR_TARGET, **{"train.epochs": 3}))
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [float(r["target"]) for r in rows] == [0.8, 0.8, 0.8]
    assert float(rows[0]["scheduled"]) < float(rows[-1]["scheduled"]) == pytest.approx(0.8)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["target"]["kind"] == "sparsity" and summary["target"]["target"] == 0.8
    assert summary["slim"] is None and summary["structure"] is None  # unstructured
    assert summary["target"]["achieved"] == pytest.approx(result.final["sparsity"])
    assert result.final["sparsity"] == pytest.approx(0.8, abs=0.05)  # 24 steps only
    # without a target the columns are empty
    train(synthetic_config(tmp_path, "plain", **{"train.epochs": 1}))
    plain = list(csv.DictReader((tmp_path / "plain" / "metrics.csv").open()))
    assert plain[0]["target"] == "" and plain[0]["scheduled"] == ""


def test_a_filter_target_reaches_the_run_files(tmp_path: Path) -> None:
    # 3 epochs of 32 steps, the threshold started at e^-1 of the importance values' start
    options = {"sparsity": 0.5, "structure": "filter", "init_threshold": -1.0}
    data = {"num_train": 1024, "num_val": 128, "num_classes": 10}
    changes = {"sparsity.options": options, "data.synthetic": data, "train.epochs": 3}
    train(synthetic_config(tmp_path, **changes))
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["target"]["kind"] == "filters" and summary["target"]["target"] == 0.5
    # achieved: the fraction of the gated filters at zero, as the structure column shows
    counts = [field.split("=")[1].split("/") for field in rows[-1]["structure"].split()]
    alive, total = (sum(int(c[i]) for c in counts) for i in (0, 1))
    assert 0 < alive < total
    assert summary["target"]["achieved"] == pytest.approx(1 - alive / total)
    assert summary["target"]["achieved"] == pytest.approx(0.5, abs=0.01)
    # the slim model's size, as strsparse convert --slim writes it: smaller than the
    # zeros alone say, since a removed filter takes the next layer's inputs with it
    model, _, _ = restore_model(tmp_path / "run")
    small = strsparse.slim(model)
    assert summary["slim"]["params"] == sum(p.numel() for p in small.parameters())
    slim_flops = strsparse.flops.profile(small, (1, 28, 28)).overall.flops
    assert summary["slim"]["flops"] == slim_flops < summary["flops"]["sparse"]
    assert summary["structure"] == {name: list(n) for name, n in structure_report(model).items()}


def test_a_structured_flops_target_reaches_the_run_files(tmp_path: Path) -> None:
    options = {"flops": 0.5, "structure": "filter", "init_threshold": -1.0}
    data = {"num_train": 1024, "num_val": 128, "num_classes": 10}
    changes = {"sparsity.options": options, "data.synthetic": data, "train.epochs": 3}
    train(synthetic_config(tmp_path, **changes))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["target"]["kind"] == "flops" and summary["target"]["target"] == 0.5
    # achieved: the slim model's FLOPs, which the zeros in the weights understate
    assert summary["target"]["achieved"] == summary["slim"]["flops"] / summary["flops"]["dense"]
    assert summary["target"]["achieved"] < summary["flops"]["sparse"] / summary["flops"]["dense"]
    assert summary["target"]["achieved"] == pytest.approx(0.5, abs=0.05)  # 96 steps only


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps_per_epoch = 8
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    snapshot = nan_at_step(monkeypatch, steps_per_epoch + 3, last)  # third step of epoch 2
    with pytest.raises(TrainingDiverged, match="loss is nan.*kept as it was"):
        train(synthetic_config(tmp_path))
    assert last.read_bytes() == snapshot["bytes"]
    state = load_checkpoint(last)
    assert state["epoch"] == 1 and state["step"] == steps_per_epoch
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_max_steps_per_epoch_caps_epochs_and_the_schedules(tmp_path: Path) -> None:
    # 8 batches per epoch, cut to 3: the cosine LR and GMP's sparsity ramp span 2 x 3 steps
    cfg = synthetic_config(
        tmp_path, **GMP, **{"train.max_steps_per_epoch": 3, "train.tensorboard": False}
    )
    result = train(cfg)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 6 and state["history"]["step"] == [3, 6]
    expected_lr = [
        learning_rate(step - 1, base_lr=0.05, total_steps=6, steps_per_epoch=3) for step in (3, 6)
    ]
    assert state["history"]["lr"] == pytest.approx(expected_lr)
    # GMP reaches its final sparsity (at 75% of the run) only if total_steps is the capped 6
    assert result.final["sparsity"] == pytest.approx(0.8, abs=0.01)


@pytest.mark.slow
def test_grad_clip_bounds_the_gradient_norm_at_each_optimizer_step(tmp_path: Path) -> None:
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def grad_norms(**changes) -> list[float]:
        norms: list[float] = []

        def record(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            norms.append(
                float(
                    torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None])
                    )
                )
            )

        hook = register_optimizer_step_pre_hook(record)
        try:
            train(
                synthetic_config(
                    tmp_path,
                    f"clip-{changes.get('train.grad_clip')}",
                    **{"train.epochs": 1, "train.max_steps_per_epoch": 3},
                    **{"train.tensorboard": False},
                    **changes,
                )
            )
        finally:
            hook.remove()
        return norms

    clip = 0.01
    unclipped = grad_norms()
    assert len(unclipped) == 3 and min(unclipped) > 10 * clip
    clipped = grad_norms(**{"train.grad_clip": clip})
    assert clipped == pytest.approx([clip] * 3, rel=1e-4)


@pytest.mark.parametrize(
    ("amp", "dtype"), [("off", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_train_amp_sets_the_autocast_dtype_on_cuda_only(
    tmp_path: Path, amp: str, dtype: torch.dtype | None
) -> None:
    train_cfg = synthetic_config(tmp_path, **{"train.amp": amp, "train.channels_last": True}).train
    # reads the config only: no CUDA is touched
    assert training_loop._precision(train_cfg, torch.device("cuda")) == (amp, dtype, True)
    assert training_loop._precision(train_cfg, torch.device("cpu")) == ("off", None, False)


def _optimizer_lrs(run: Callable[[], object]) -> list[float]:
    """The learning rate of every parameter group at every optimizer step of ``run()``."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    lrs: list[float] = []

    def record(optimizer, args, kwargs):
        (lr,) = {group["lr"] for group in optimizer.param_groups}
        lrs.append(lr)

    hook = register_optimizer_step_pre_hook(record)
    try:
        run()
    finally:
        hook.remove()
    return lrs


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "cosine", "warmup_epochs": 1.0, "min_lr": 0.01},
        {"name": "multistep", "warmup_epochs": 0.5, "milestones": [2], "gamma": 0.5},
        {"name": "step", "step_size": 1, "gamma": 0.3},
    ],
    ids=["cosine-warmup", "multistep-warmup", "step"],
)
def test_every_step_uses_the_configured_schedule(tmp_path: Path, schedule: dict) -> None:
    # 3 epochs x 4 steps: each optimizer step's LR is the schedule's value at that step
    changes = {"train.epochs": 3, "train.max_steps_per_epoch": 4, "train.tensorboard": False}
    cfg = synthetic_config(tmp_path, **changes, **{f"schedule.{k}": v for k, v in schedule.items()})
    lrs = _optimizer_lrs(lambda: train(cfg))
    expected = [
        learning_rate(step, base_lr=0.05, total_steps=12, steps_per_epoch=4, **schedule)
        for step in range(12)
    ]
    assert lrs == pytest.approx(expected)
    if schedule.get("warmup_epochs"):  # linear per step from base_lr / warmup_steps
        warmup_steps = round(4 * schedule["warmup_epochs"])
        assert lrs[0] == pytest.approx(0.05 / warmup_steps)
        assert lrs[: warmup_steps - 1] == sorted(lrs[: warmup_steps - 1])


def test_best_checkpoint_is_the_epoch_with_the_highest_top1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top1 = iter([60.0, 80.0, 70.0])  # epoch 2 is the best; the last is not
    evaluate_model = training_loop._evaluate

    def scripted(run):
        metrics = evaluate_model(run)
        return {**metrics, "top1": next(top1)}

    monkeypatch.setattr(training_loop, "_evaluate", scripted)
    changes = {"train.epochs": 3, "train.max_steps_per_epoch": 2, "train.tensorboard": False}
    result = train(synthetic_config(tmp_path, **changes))
    run = tmp_path / "run"
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["epoch"] == 2 and best["best"]["top1"] == 80.0 and best["best"]["epoch"] == 2
    assert result.best["top1"] == 80.0 and result.final["top1"] == 70.0
    assert json.loads((run / "summary.json").read_text())["best"]["top1"] == 80.0
    assert load_checkpoint(run)["epoch"] == 3


# Fashion-MNIST with augmentation drawn in a loader worker: 256 images, 8 steps an epoch
AUGMENTED_IN_A_WORKER = {
    "data.name": "fashion_mnist",
    "data.train_limit": 256,
    "data.val_limit": 128,
    "data.augment": True,
    "data.num_workers": 1,
}


@pytest.mark.slow
@pytest.mark.parametrize("data", [{}, AUGMENTED_IN_A_WORKER], ids=["synthetic", "worker"])
def test_a_step_interval_checkpoint_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: dict
) -> None:
    full = train(synthetic_config(tmp_path, "full", **data))
    every = {"train.checkpoint_every_steps": 3, **data}  # steps 3, 6 | 9, 12, 15 (8 an epoch)
    original = training_loop.build_model

    def build_then_die(cfg, info=None, *, loading_weights=False):
        model, handle, info = original(cfg, info, loading_weights=loading_weights)
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += module.training
            if calls["n"] == 14:  # killed in step 14: no chance to save
                raise SystemExit("killed")

        model.register_forward_hook(hook)
        return model, handle, info

    with monkeypatch.context() as patch:
        patch.setattr(training_loop, "build_model", build_then_die)
        with pytest.raises(SystemExit):
            train(synthetic_config(tmp_path, "cut", **every))
    saved = load_checkpoint(tmp_path / "cut")
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, 12, 4)
    # a write killed half-way leaves its temporary file: the next run removes it
    stale = tmp_path / "cut" / "checkpoints" / ".last.pt.999999999.0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")

    resumed = train(synthetic_config(tmp_path, "cut", **every))
    assert not stale.exists()
    expected, got = _model_state(tmp_path / "full"), _model_state(tmp_path / "cut")
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.final == full.final


def test_linear_lr_scaling_multiplies_by_the_number_of_processes(tmp_path: Path) -> None:
    plain = synthetic_config(tmp_path)
    linear = synthetic_config(tmp_path, **{"optim.lr_scaling": "linear"})
    assert training_loop._base_lr(plain, 4) == 0.05
    assert training_loop._base_lr(linear, 4) == pytest.approx(0.2)
    assert training_loop._base_lr(linear, 1) == 0.05


def test_a_structured_run_that_slim_cannot_follow_still_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("a forward slim cannot follow")

    monkeypatch.setattr(training_loop, "slim", fail)
    options = {"structure": "filter", "init_threshold": -1.0}
    result = train(synthetic_config(tmp_path, **{"sparsity.options": options, "train.epochs": 1}))
    summary = json.loads(result.summary_path.read_text())
    assert summary["slim"] is None and summary["structure"] is not None
    assert "slim model's size is left out (RuntimeError: a forward slim cannot follow)" in (
        caplog.text
    )
