"""CIFAR ResNets (strsparse.models.cifar_resnet): counts and option A/B shortcuts."""

from __future__ import annotations

import pytest
import torch

from strsparse.models import create_model
from strsparse.models.cifar_resnet import PadShortcut


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
