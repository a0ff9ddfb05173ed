"""ImageNet ResNets (strsparse.models.resnet): torchvision's layout, counts, MACs, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from strsparse.models import create_model
from tests.models.counting import macs, weight_count


def _torchvision_resnet_shapes(bottleneck: bool, layers: tuple[int, ...]) -> dict[str, tuple]:
    """Expected state_dict of torchvision's resnet18/50, written from its architecture.

    Stem conv1 (64, 3, 7, 7) + bn1; stage i has planes 64 * 2**i, its first block strides by 2
    (except stage 1) and gets ``downsample.0`` (1x1 conv) + ``downsample.1`` (BN) when the
    shape changes; a BN contributes weight, bias, running_mean, running_var (C,) and
    num_batches_tracked (); fc is Linear(512 * expansion, 1000) with bias.
    """
    shapes: dict[str, tuple] = {}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{k}"] = (c,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    expansion = 4 if bottleneck else 1
    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for i, n_blocks in enumerate(layers, start=1):
        planes = 64 * 2 ** (i - 1)
        for j in range(n_blocks):
            p = f"layer{i}.{j}"
            stride = 2 if (j == 0 and i > 1) else 1
            out = planes * expansion
            if bottleneck:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                bn(f"{p}.bn3", out)
            else:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            if stride != 1 or inplanes != out:
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                bn(f"{p}.downsample.1", out)
            inplanes = out
    shapes["fc.weight"] = (1000, 512 * expansion)
    shapes["fc.bias"] = (1000,)
    return shapes


@pytest.mark.parametrize(
    ("name", "bottleneck", "layers", "n_keys", "representative"),
    [
        (
            "resnet18",
            False,
            (2, 2, 2, 2),
            122,
            {
                "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                "layer4.1.conv2.weight": (512, 512, 3, 3),
                "layer3.0.downsample.1.num_batches_tracked": (),
                "fc.weight": (1000, 512),
            },
        ),
        (
            "resnet50",
            True,
            (3, 4, 6, 3),
            320,
            {
                "layer1.0.downsample.0.weight": (256, 64, 1, 1),
                "layer2.0.conv2.weight": (128, 128, 3, 3),
                "layer3.5.bn2.running_var": (256,),
                "layer4.2.conv3.weight": (2048, 512, 1, 1),
                "fc.weight": (1000, 2048),
            },
        ),
    ],
)
def test_resnet_state_dict_matches_torchvision(
    name: str, bottleneck: bool, layers: tuple[int, ...], n_keys: int, representative: dict
) -> None:
    state = create_model(name).state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = _torchvision_resnet_shapes(bottleneck, layers)
    assert len(got) == n_keys == len(expected)
    assert list(got) == list(expected)  # same names, same order as torchvision
    assert got == expected
    for key, shape in representative.items():
        assert got[key] == shape
    assert "layer1.0.downsample.0.weight" in got if bottleneck else "layer1.0.downsample" not in got


def test_resnet50_counts_and_v1_5_stride() -> None:
    model = create_model("resnet50")
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    assert weight_count(model) == 25_502_912
    # v1.5: a downsampling Bottleneck strides on its 3x3 conv, not on the first 1x1.
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_resnet50_macs_match_the_paper() -> None:
    with torch.device("meta"):
        model = create_model("resnet50")
    # STR paper convention: conv params x H_out x W_out, fc params, pool = 2048 x 7 x 7.
    assert macs(model, 224, include_pool=True) == 4_089_284_608


def test_resnet18_count() -> None:
    assert sum(p.numel() for p in create_model("resnet18").parameters()) == 11_689_512


def test_resnet_init_and_zero_init_residual() -> None:
    model = create_model("resnet50")
    assert torch.all(model.layer1[0].bn3.weight == 1)
    assert torch.all(model.bn1.bias == 0)
    # kaiming_normal fan_out: std = sqrt(2 / (C_out * kH * kW)) = sqrt(2 / (64 * 49)) for conv1.
    std = model.conv1.weight.std().item()
    assert math.isclose(std, math.sqrt(2 / (64 * 49)), rel_tol=0.05)

    model = create_model("resnet50", zero_init_residual=True)
    assert all(
        torch.all(b.bn3.weight == 0) for stage in (model.layer1, model.layer4) for b in stage
    )
    assert torch.all(model.layer1[0].bn1.weight == 1)
    model = create_model("resnet18", zero_init_residual=True)
    assert torch.all(model.layer2[1].bn2.weight == 0)


def test_in_channels_changes_only_conv1() -> None:
    model = create_model("resnet18", in_channels=1)
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    assert model.layer1[0].conv1.weight.shape == (64, 64, 3, 3)
