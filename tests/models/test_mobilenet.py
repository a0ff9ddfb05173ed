"""MobileNetV1 (strsparse.models.mobilenet): layout, counts, the paper's MACs, width."""

from __future__ import annotations

import torch
from torch import nn

from strsparse.models import create_model
from tests.models.counting import macs, weight_count, weight_layers


def test_mobilenet_v1_layout_and_counts() -> None:
    model = create_model("mobilenet_v1")
    layers = weight_layers(model)
    expected_names = (
        ["conv1"] + [f"blocks.{i}.{part}" for i in range(13) for part in ("dw", "pw")] + ["fc"]
    )
    assert list(layers) == expected_names
    assert len(layers) == 28
    assert weight_count(model) == 4_209_088
    assert model.fc.weight.numel() == 1_024_000
    assert model.conv1.weight.shape == (32, 3, 3, 3)
    assert model.conv1.stride == (2, 2)
    block = model.blocks[1]
    assert block.dw.groups == 64 and block.dw.stride == (2, 2)
    assert block.dw.weight.shape == (64, 1, 3, 3)
    assert block.pw.weight.shape == (128, 64, 1, 1)
    assert isinstance(block.dw_bn, nn.BatchNorm2d) and isinstance(block.pw_bn, nn.BatchNorm2d)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    strides = [b.dw.stride[0] for b in model.blocks]
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]


def test_mobilenet_v1_macs_match_the_paper() -> None:
    with torch.device("meta"):
        model = create_model("mobilenet_v1")
    # STR paper, Table 8: 568,740,352 FLOPs, without the average pool.
    assert macs(model, 224, include_pool=False) == 568_740_352


def test_mobilenet_v1_width_multiplier() -> None:
    model = create_model("mobilenet_v1", width_multiplier=0.5, num_classes=10)
    assert model.conv1.out_channels == 16
    assert model.blocks[12].pw.out_channels == 512
    assert model.fc.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
