"""Building the model, its sparsity and its budget from a config (strsparse.training.build)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import strsparse
from strsparse.training import (
    train,
)
from tests.training.runs import synthetic_config


def test_model_num_classes_and_in_channels_override_the_dataset(tmp_path: Path) -> None:
    from strsparse.training import build_model

    model, _, info = build_model(synthetic_config(tmp_path))
    assert (info.num_classes, info.in_channels) == (10, 1)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    cfg = synthetic_config(tmp_path, **{"model.num_classes": 12, "model.in_channels": 3})
    model, handle, _ = build_model(cfg)
    assert model(torch.zeros(2, 3, 28, 28)).shape == (2, 12)
    assert handle is not None and handle.method == "str"


@pytest.mark.slow
def test_resolve_budget_from_csv_checkpoint_and_errors(tmp_path: Path) -> None:
    from strsparse.models import create_model
    from strsparse.training import resolve_budget

    model = create_model("lenet5")
    csv_path = strsparse.Budget.uniform(model, 0.5).to_csv(tmp_path / "budget.csv")
    assert resolve_budget(str(csv_path), model) == strsparse.Budget.uniform(model, 0.5)

    train(synthetic_config(tmp_path, "source", **{"train.epochs": 1}))
    from_run = resolve_budget(tmp_path / "source", model)
    assert from_run == strsparse.Budget.from_model(_restored(tmp_path / "source"))

    with pytest.raises(ValueError, match="neither a CSV file, a checkpoint nor a paper budget"):
        resolve_budget("no-such-budget", model)
    other = strsparse.Budget({"encoder.proj": 0.5}).to_csv(tmp_path / "other.csv")
    with pytest.raises(ValueError, match="another architecture"):
        resolve_budget(other, model)


def _restored(run: Path) -> nn.Module:
    from strsparse.training import restore_model

    model, _, _ = restore_model(run)
    return model


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"sparsity.method": "gmp", "sparsity.options": {"sparsity": 1.5}}, "sparsity=1.5"),
        ({"sparsity.options": {"granularity": "chanel"}}, "did you mean 'channel'"),
        ({"model.kwargs": {"image_size": 8}}, "image_size"),
        ({"sparsity.method": "gmp", "sparsity.budget": "no-such-budget"}, "no-such-budget"),
        ({"sparsity.include": ["layer9.*"]}, "include pattern 'layer9.*'"),
        ({"sparsity.exclude": ["nope"]}, "exclude pattern 'nope'"),
        (
            {"sparsity.options": {"structure": "filter"}, "sparsity.include": ["nope"]},
            "include pattern 'nope'",
        ),
    ],
    ids=["sparsity", "granularity", "model-option", "budget", "include", "exclude", "filter"],
)
def test_option_errors_come_before_any_data_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict, match: str
) -> None:
    from strsparse.errors import StrsparseError
    from strsparse.training import loop

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the options were checked")

    monkeypatch.setattr(loop, "build_datasets", no_data)
    with pytest.raises(StrsparseError, match=match):
        train(synthetic_config(tmp_path / "runs", **changes))
    assert not (tmp_path / "runs").exists()  # no run directory left behind


def test_a_checkpoint_that_does_not_fit_is_summarised_not_dumped(tmp_path: Path) -> None:
    from strsparse.models import create_model
    from strsparse.training import CheckpointError, load_checkpoint, restore_model, save_checkpoint

    train(synthetic_config(tmp_path, **{"train.epochs": 1, "train.max_steps_per_epoch": 1}))
    state = load_checkpoint(tmp_path / "run")
    other = create_model("lenet_300_100")
    strsparse.sparsify(other, "str")
    state["model"] = other.state_dict()  # another model's weights under lenet5's config
    path = save_checkpoint(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError) as info:
        restore_model(path)
    message = str(info.value)
    assert "holds a lenet5 with str model" in message
    assert re.search(r"\d+ missing \(e\.g\. conv1\.", message)
    assert re.search(r"\d+ with another shape \(e\.g\. fc1\.", message)
    assert len(message) < 600 and "\n" not in message
