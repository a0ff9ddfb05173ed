"""The model registry (strsparse.models.registry): every model's shapes, head and sparse
round trip, and the registry's errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strsparse
from strsparse.models import classifier_name, create_model, list_models, model_options
from strsparse.models.registry import register_model
from tests.models.counting import weight_layers

IMAGENET = {"resnet18", "resnet50", "mobilenet_v1"}
CIFAR = {"resnet20", "resnet56"}
SMALL = {"lenet5", "lenet_300_100"}
SEQUENCE = {"fastgrnn"}  # (batch, time, features) inputs
MODELS = list_models()


def _input_size(name: str) -> int:
    """Spatial size for a fast forward pass: ImageNet models pool adaptively, so 32 suffices
    (their last stage is then 1x1, which BatchNorm accepts for a batch of 2)."""
    return 28 if name in SMALL else 32


def _default_in_channels(name: str) -> int:
    return 28 if name in SEQUENCE else 1 if name in SMALL else 3


def _example(name: str, in_channels: int | None = None) -> torch.Tensor:
    """A batch of 2 inputs for model ``name``: images, or 28-step sequences."""
    channels = _default_in_channels(name) if in_channels is None else in_channels
    if name in SEQUENCE:
        return torch.randn(2, 28, channels)
    size = _input_size(name)
    return torch.randn(2, channels, size, size)


def test_list_models_has_the_zoo() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) >= IMAGENET | CIFAR | SMALL


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_options(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name)
    out = model(_example(name))
    assert out.shape == (2, 1000 if name in IMAGENET else 10)
    assert torch.isfinite(out).all()

    model = create_model(name, num_classes=7, in_channels=2)
    out = model(_example(name, 2))
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
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n for n in MODELS]
)
def test_sparsify_finalize_state_dict_loads_into_fresh_model(name: str) -> None:
    torch.manual_seed(0)
    x = _example(name)
    model = create_model(name)
    expected_layers = set(weight_layers(model))
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
