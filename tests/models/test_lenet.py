"""The 28x28 models (strsparse.models.lenet): LeNet-5 and LeNet-300-100 layouts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strsparse.models import create_model
from tests.models.counting import weight_layers


def test_lenet5_layout() -> None:
    model = create_model("lenet5")
    assert list(weight_layers(model)) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None
    assert sum(p.numel() for p in model.parameters()) == 252_538

    plain = create_model("lenet5", batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert plain.conv1.bias is not None
    assert plain(torch.randn(1, 1, 28, 28)).shape == (1, 10)

    big = create_model("lenet5", image_size=32)
    assert big.fc1.in_features == 32 * 6 * 6
    with pytest.raises(ValueError, match="image_size"):
        create_model("lenet5", image_size=8)


def test_lenet_300_100_layout() -> None:
    model = create_model("lenet_300_100", in_channels=3)
    shapes = {n: tuple(m.weight.shape) for n, m in weight_layers(model).items()}
    assert shapes == {"fc1": (300, 3 * 28 * 28), "fc2": (100, 300), "fc3": (10, 100)}
    assert sum(p.numel() for p in create_model("lenet_300_100").parameters()) == 266_610
