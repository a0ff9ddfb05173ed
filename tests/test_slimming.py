"""Filter STR and ``slim``: whole filters reach zero, and the slim model keeps the outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import strsparse
from strsparse.export import DenseModelSpec, export_slim, load_slim
from strsparse.methods.structured import GateFollower, StructuredSoftThreshold
from strsparse.slimming import SlimError


def _randomize_batchnorm(model: nn.Module) -> None:
    """Running statistics away from (0, 1), so that a zero filter before BN would not give
    a zero channel: slim must be exact because of where the scale sits."""
    generator = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=generator) * 0.5)


def _zero_half_of_every_gate(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for gate in model.modules():  # the gates are submodules of the parametrized layers
        if isinstance(gate, StructuredSoftThreshold):
            with torch.no_grad():
                n = gate.m.numel()
                gate.m[torch.randperm(n, generator=generator)[: n // 2]] = 0.0


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CASES = [
    ("resnet20", {"shortcut": "B"}, (3, 32, 32)),  # 1x1 conv + BN downsample branches
    ("resnet20", {}, (3, 32, 32)),  # option-A zero-padding shortcuts
    ("resnet18", {}, (3, 64, 64)),
    ("mobilenet_v1", {"width_multiplier": 0.25}, (3, 64, 64)),  # depthwise convs
    ("lenet5", {}, (1, 28, 28)),
]


@pytest.mark.parametrize(("name", "kwargs", "shape"), CASES)
def test_slim_keeps_outputs_and_shrinks(name: str, kwargs: dict, shape: tuple) -> None:
    torch.manual_seed(0)
    model = strsparse.create_model(name, **kwargs)
    _randomize_batchnorm(model)
    strsparse.sparsify(model, "str", structure="filter")
    _zero_half_of_every_gate(model)
    model.eval()
    x = torch.randn(3, *shape)
    slim = strsparse.slim(model)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-5, rtol=1e-5)
    assert _params(slim) < 0.75 * _params(strsparse.finalize(model))
    assert not any("parametrizations" in k for k in slim.state_dict())


def test_filter_gate_sits_after_batchnorm_and_spares_the_classifier() -> None:
    model = strsparse.create_model("resnet18")
    handle = strsparse.sparsify(model, "str", structure="filter")
    assert "fc" not in handle.layers and "layer2.0.downsample.0" in handle.layers
    gate = strsparse.get_parametrization(model.layer1[0].conv1)
    assert isinstance(gate, StructuredSoftThreshold) and gate.mode == "mask"
    assert isinstance(model.layer1[0].bn1.parametrizations.weight[0], GateFollower)
    assert isinstance(model.layer1[0].bn1.parametrizations.bias[0], GateFollower)
    # a Linear layer without BN scales its weight and bias; naming the classifier gates it
    lenet = strsparse.create_model("lenet5")
    handle = strsparse.sparsify(lenet, "str", structure="filter", include=["fc*"])
    assert set(handle.layers) == {"fc1", "fc2", "fc3"}
    assert strsparse.get_parametrization(lenet.fc1).mode == "scale"
    assert isinstance(lenet.fc1.parametrizations.bias[0], GateFollower)
    # state_dict round trip into a model sparsified the same way
    again = strsparse.create_model("lenet5")
    strsparse.sparsify(again, "str", structure="filter", include=["fc*"])
    again.load_state_dict(lenet.state_dict(), strict=True)


def test_strong_decay_zeroes_whole_filters() -> None:
    torch.manual_seed(0)
    model = strsparse.create_model("lenet5")
    handle = strsparse.sparsify(model, "str", structure="filter", init_threshold=-3.0)
    gates = [strsparse.get_parametrization(model.get_submodule(n)) for n in handle.layers]
    with torch.no_grad():  # filters of distinct importance: the weakest go first
        for gate in gates:
            gate.m.copy_(torch.linspace(0.05, 1.0, gate.m.numel()))
    opt = torch.optim.SGD(
        [
            {"params": [p for n, p in model.named_parameters() if not n.endswith((".m", ".s"))]},
            {"params": [g.m for g in gates], "weight_decay": 0.0},
            {"params": [g.s for g in gates], "weight_decay": 0.3},
        ],
        lr=0.3,
    )
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    report = strsparse.structure_report(model)
    assert all(0 < alive < total for alive, total in report.values()), report
    dead = strsparse.get_parametrization(model.conv2).scale() == 0
    assert torch.all(model.conv2.weight[dead] == 0)  # whole filters, exactly zero
    assert torch.all(model.bn2.weight[dead] == 0) and torch.all(model.bn2.bias[dead] == 0)
    model.eval()
    slim = strsparse.slim(model)
    assert (
        slim.conv2.out_channels == report["conv2"][0]
        and slim.bn2.num_features == slim.conv2.out_channels
    )
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-5, rtol=1e-5)


def test_user_sequential_cnn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),  # no BN: the scale sits on weight and bias
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 5),
    )
    _randomize_batchnorm(model)
    strsparse.sparsify(model, "str", structure="filter")
    _zero_half_of_every_gate(model)
    model.eval()
    x = torch.randn(2, 3, 12, 12)
    slim = strsparse.slim(model, x[:1])
    assert slim[0].out_channels == 4 and slim[3].in_channels == 4 and slim[3].out_channels == 8
    assert slim[7].in_features == 32  # the flattened 2x2 blocks of the removed channels
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(SlimError, match="example input"):
        strsparse.slim(model)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return x.mean(dim=(2, 3))
        return x.amax(dim=(2, 3))


class _Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = y - y.mean(dim=1, keepdim=True)  # mixes channels: slim cannot follow
        return self.fc(y.mean(dim=(2, 3)))


def test_graphs_slim_cannot_follow_are_clear_errors() -> None:
    model = _Untraceable()
    with pytest.warns(UserWarning, match="cannot trace layer 'head'"):
        strsparse.sparsify(model, "str", structure="filter")
    _zero_half_of_every_gate(model)
    with pytest.raises(SlimError, match="cannot trace layer 'head'"):
        strsparse.slim(model, torch.randn(1, 3, 8, 8))

    mixer = _Mixer()
    strsparse.sparsify(mixer, "str", structure="filter", include=["conv"])
    _zero_half_of_every_gate(mixer)
    with pytest.raises(SlimError, match=r"cannot slim layer 'conv'.*mean"):
        strsparse.slim(mixer, torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("resnet20", {}, (3, 32, 32)),
        ("mobilenet_v1", {"width_multiplier": 0.25}, (3, 64, 64)),
        ("fastgrnn", {"hidden_size": 8, "rank_w": 4, "rank_u": 6}, (28, 28)),
    ],
)
def test_slim_models_save_and_reload(tmp_path: Path, name: str, kwargs: dict, shape: tuple) -> None:
    torch.manual_seed(0)
    model = strsparse.create_model(name, **kwargs)
    _randomize_batchnorm(model)
    structure = "rank" if name == "fastgrnn" else "filter"
    strsparse.sparsify(model, "str", structure=structure)
    _zero_half_of_every_gate(model)
    model.eval()
    in_channels = shape[-1] if name == "fastgrnn" else shape[0]
    spec = DenseModelSpec(name, num_classes=10, in_channels=in_channels, kwargs=kwargs)
    out = export_slim(model, spec, tmp_path / "slim")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded = load_slim(out)
    assert _params(loaded) == _params(strsparse.slim(model)) < _params(strsparse.finalize(model))
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileExistsError):
        export_slim(model, spec, out)
    with pytest.raises(ValueError, match="load_dense"):
        (out / "config.yaml").write_text("format: strsparse-dense-model\n")
        load_slim(out)
