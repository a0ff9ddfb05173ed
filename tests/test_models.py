"""Tests for the model zoo: registry errors, shapes, layouts, counts, sparsify round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import strsparse
from strsparse.models import classifier_name, create_model, list_models, model_options
from strsparse.models.cifar_resnet import PadShortcut
from strsparse.models.registry import register_model

IMAGENET = {"resnet18", "resnet50", "mobilenet_v1"}
CIFAR = {"resnet20", "resnet56"}
SMALL = {"lenet5", "lenet_300_100"}


def _input_size(name: str) -> int:
    """Spatial size for a fast forward pass: ImageNet models pool adaptively, so 32 suffices
    (their last stage is then 1x1, which BatchNorm accepts for a batch of 2)."""
    return 28 if name in SMALL else 32


def _default_in_channels(name: str) -> int:
    return 1 if name in SMALL else 3


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.ndim >= 2
    }


def _weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in _weight_layers(model).values())


def _macs(model: nn.Module, size: int, *, include_pool: bool) -> int:
    """Multiply-accumulates of a (1, 3, size, size) input, in the STR paper's convention."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += module.weight.numel() * output.shape[-2] * output.shape[-1]
        elif isinstance(module, nn.Linear):
            total += module.weight.numel()
        elif isinstance(module, nn.AdaptiveAvgPool2d) and include_pool:
            total += inputs[0][0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.empty(1, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    return total


def test_list_models_has_the_zoo() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) >= IMAGENET | CIFAR | SMALL


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_options(name: str) -> None:
    torch.manual_seed(0)
    size = _input_size(name)
    model = create_model(name)
    out = model(torch.randn(2, _default_in_channels(name), size, size))
    assert out.shape == (2, 1000 if name in IMAGENET else 10)
    assert torch.isfinite(out).all()

    model = create_model(name, num_classes=7, in_channels=2)
    out = model(torch.randn(2, 2, size, size))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", list_models())
def test_classifier_name_points_at_the_head(name: str) -> None:
    model = create_model(name, num_classes=7)
    head = model.get_submodule(classifier_name(model))
    assert isinstance(head, nn.Linear)
    assert head.out_features == 7


def test_classifier_name_fallback_and_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2), nn.ReLU())
    assert classifier_name(model) == "2"
    with pytest.raises(ValueError, match="classifier"):
        classifier_name(nn.Sequential(nn.ReLU()))


@pytest.mark.filterwarnings("ignore:STR layer")  # -5.0 is deliberately aggressive here
@pytest.mark.parametrize("name", list_models())
def test_sparsify_finalize_state_dict_loads_into_fresh_model(name: str) -> None:
    torch.manual_seed(0)
    size = _input_size(name)
    x = torch.randn(2, _default_in_channels(name), size, size)
    model = create_model(name)
    expected_layers = set(_weight_layers(model))
    handle = strsparse.sparsify(model, "str", init_threshold=-5.0)
    assert set(handle.layers) == expected_layers
    model(x).sum().backward()  # gradients flow through the parametrized weights
    strsparse.finalize(model)
    state = model.state_dict()
    assert not any("parametrizations" in k for k in state)

    zeros = sum(int((state[f"{n}.weight"] == 0).sum()) for n in expected_layers)
    assert zeros > 0  # the soft threshold was baked into the plain weights

    fresh = create_model(name)
    fresh.load_state_dict(state, strict=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


# --- ImageNet ResNets: torchvision layout -------------------------------------------------


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
    assert _weight_count(model) == 25_502_912
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
    assert _macs(model, 224, include_pool=True) == 4_089_284_608


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


# --- MobileNetV1 --------------------------------------------------------------------------


def test_mobilenet_v1_layout_and_counts() -> None:
    model = create_model("mobilenet_v1")
    layers = _weight_layers(model)
    expected_names = (
        ["conv1"] + [f"blocks.{i}.{part}" for i in range(13) for part in ("dw", "pw")] + ["fc"]
    )
    assert list(layers) == expected_names
    assert len(layers) == 28
    assert _weight_count(model) == 4_209_088
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
    assert _macs(model, 224, include_pool=False) == 568_740_352


def test_mobilenet_v1_width_multiplier() -> None:
    model = create_model("mobilenet_v1", width_multiplier=0.5, num_classes=10)
    assert model.conv1.out_channels == 16
    assert model.blocks[12].pw.out_channels == 512
    assert model.fc.in_features == 512
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# --- CIFAR ResNets ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_params"), [("resnet20", 269_722), ("resnet56", 853_018)])
def test_cifar_resnet_param_counts(name: str, n_params: int) -> None:
    assert sum(p.numel() for p in create_model(name).parameters()) == n_params


def test_cifar_resnet_option_a_and_b_shortcuts() -> None:
    model = create_model("resnet20")
    assert isinstance(model.layer2[0].downsample, PadShortcut)
    assert model.layer1[0].downsample is None
    assert not any("downsample" in k for k in model.state_dict())

    model_b = create_model("resnet20", shortcut="B")
    assert model_b.layer2[0].downsample[0].weight.shape == (32, 16, 1, 1)
    assert model_b(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="'C'"):
        create_model("resnet20", shortcut="C")


def test_pad_shortcut_subsamples_and_zero_pads() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.all(y[:, :8] == 0) and torch.all(y[:, 24:] == 0)


# --- 28x28 models -------------------------------------------------------------------------


def test_lenet5_layout() -> None:
    model = create_model("lenet5")
    assert list(_weight_layers(model)) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
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
    shapes = {n: tuple(m.weight.shape) for n, m in _weight_layers(model).items()}
    assert shapes == {"fc1": (300, 3 * 28 * 28), "fc2": (100, 300), "fc3": (10, 100)}
    assert sum(p.numel() for p in create_model("lenet_300_100").parameters()) == 266_610


# --- registry errors ----------------------------------------------------------------------


def test_unknown_model_lists_names_and_closest_match() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet_50'") as info:
        create_model("resnet_50")
    message = str(info.value)
    assert "did you mean 'resnet50'" in message
    assert all(name in message for name in list_models())
    with pytest.raises(ValueError, match="did you mean 'mobilenet_v1'"):
        model_options("mobilenetv1")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"num_classes": 0}, "num_classes .* got 0"),
        ({"num_classes": 2.5}, "num_classes .* got 2.5"),
        ({"num_classes": True}, "num_classes .* got True"),
        ({"in_channels": -1}, "in_channels .* got -1"),
        ({"width_multiplier": 0}, "width_multiplier .* got 0"),
        ({"width_multiplier": -0.5}, "width_multiplier .* got -0.5"),
        ({"width_multiplier": float("nan")}, "width_multiplier .* got nan"),
        ({"width_multiplier": "1.0"}, "width_multiplier .* got '1.0'"),
        ({"width_mult": 0.5}, "unknown option 'width_mult'.*did you mean 'width_multiplier'"),
    ],
)
def test_bad_kwargs_raise_value_error(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        create_model("mobilenet_v1", **kwargs)


def test_bad_kwargs_on_classes_too() -> None:
    from strsparse.models import CifarResNet, MobileNetV1

    with pytest.raises(ValueError, match="width_multiplier"):
        MobileNetV1(width_multiplier=0.0)
    with pytest.raises(ValueError, match="depth must be 6n"):
        CifarResNet(21)


def test_model_options_and_duplicate_registration() -> None:
    assert model_options("mobilenet_v1") == {
        "num_classes": 1000,
        "in_channels": 3,
        "width_multiplier": 1.0,
    }

    def resnet50() -> nn.Module:  # same name as a registered model
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet50)
