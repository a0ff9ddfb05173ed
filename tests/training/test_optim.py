"""Parameter groups by what a tensor is, and the optimizers (strsparse.training.optim)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strsparse
from strsparse.training import (
    build_optimizer,
    parameter_groups,
)


def _groups_by_name(groups: list[dict]) -> dict[str, dict]:
    return {g["name"]: g for g in groups}


def test_parameter_groups_by_type_include_downsample_batchnorm() -> None:
    from strsparse.models import create_model

    model = create_model("resnet18", num_classes=10)
    handle = strsparse.sparsify(model, "str", init_threshold=-3200.0)
    groups = _groups_by_name(
        parameter_groups(model, handle.threshold_parameters(), weight_decay=1e-4)
    )
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}

    downsample_bn = model.get_submodule("layer2.0.downsample.1")
    assert isinstance(downsample_bn, nn.BatchNorm2d)
    assert {id(downsample_bn.weight), id(downsample_bn.bias)} <= ids["norm"]
    assert id(model.bn1.weight) in ids["norm"]
    assert ids["thresholds"] == {id(p) for p in handle.threshold_parameters()}
    assert id(model.fc.bias) in ids["bias"]
    raw = strsparse.methods.raw_weight(model.get_submodule("layer2.0.downsample.0"))
    assert id(raw) in ids["weights"]
    # every trainable parameter exactly once
    all_ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    assert groups["weights"]["weight_decay"] == 1e-4
    assert groups["thresholds"]["weight_decay"] == 1e-4  # eq. 6: decay drives s
    assert groups["norm"]["weight_decay"] == 0.0
    assert groups["bias"]["weight_decay"] == 0.0


def test_parameter_groups_options() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    handle = strsparse.sparsify(model, "str", init_threshold=-3200.0)
    groups = _groups_by_name(
        parameter_groups(
            model,
            handle.threshold_parameters(),
            weight_decay=0.1,
            threshold_weight_decay=0.5,
            norm_bias_decay=True,
        )
    )
    assert groups["thresholds"]["weight_decay"] == 0.5
    assert groups["norm"]["weight_decay"] == 0.1
    assert groups["bias"]["weight_decay"] == 0.1
    assert len(groups["norm"]["params"]) == 2  # LayerNorm weight and bias
    dense = _groups_by_name(parameter_groups(nn.Linear(3, 3), weight_decay=0.1))
    assert set(dense) == {"weights", "bias"}


def test_build_optimizer_kinds() -> None:
    model = nn.Linear(3, 3)
    groups = parameter_groups(model, weight_decay=0.01)
    sgd = build_optimizer(groups, "sgd", lr=0.1, momentum=0.875, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]
    assert isinstance(build_optimizer(groups, "adam", lr=1e-3), torch.optim.Adam)
    assert isinstance(build_optimizer(groups, "AdamW", lr=1e-3), torch.optim.AdamW)
    with pytest.raises(ValueError, match="did you mean 'adam'"):
        build_optimizer(groups, "adamx", lr=1e-3)
    with pytest.raises(ValueError, match="momentum > 0"):
        build_optimizer(groups, "sgd", lr=0.1, momentum=0.0, nesterov=True)
