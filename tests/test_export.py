"""Dense export: the exported weights load strictly into the plain architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import strsparse
from strsparse.export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    DenseModelSpec,
    dense_state_dict,
    export_dense,
    load_dense,
    read_spec,
)
from strsparse.models import create_model


def _str_sparsified(model: torch.nn.Module, s: float = -3.0) -> torch.nn.Module:
    """STR on every layer with threshold g(s) = sigmoid(s) (-3: ~0.047, prunes a lot)."""
    handle = strsparse.sparsify(model, "str", init_threshold=-3200.0)
    with torch.no_grad():
        for param in handle.threshold_parameters():
            param.fill_(s)
    return model.eval()


def _sparse_lenet(s: float = -3.0) -> tuple[torch.nn.Module, DenseModelSpec]:
    torch.manual_seed(0)
    spec = DenseModelSpec("lenet5", num_classes=10, in_channels=1)
    return _str_sparsified(spec.create(), s), spec


def test_dense_state_dict_has_the_plain_keys_and_the_sparse_weights() -> None:
    model, spec = _sparse_lenet()
    state = dense_state_dict(model)
    assert set(state) == set(spec.create().state_dict())
    for name, module in strsparse.sparse_layers(model).items():
        torch.testing.assert_close(state[f"{name}.weight"], module.weight.detach())
    # the model itself is untouched: still sparsified
    assert strsparse.sparse_layers(model)


class _Scale(torch.nn.Module):
    """A foreign parametrization with state of its own (not a strsparse method)."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_dense_state_dict_walks_every_parametrization() -> None:
    """Parametrizations on the root module, on a bias, chained ones: each tensor's effective
    value under its plain key, and none of the parametrizations' own state."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    plain = torch.nn.Linear(3, 2)
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(plain.state_dict())
    parametrize.register_parametrization(model, "bias", _Scale())
    parametrize.register_parametrization(model, "weight", _Scale())
    parametrize.register_parametrization(model, "weight", _Scale())  # chained: 4x
    state = dense_state_dict(model)
    assert set(state) == set(plain.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(state["weight"], 4 * plain.weight.detach())
    torch.testing.assert_close(state["bias"], 2 * plain.bias.detach())
    nested = torch.nn.Sequential(torch.nn.Linear(3, 3), model)
    assert set(dense_state_dict(nested)) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_convert_loads_strictly_into_the_plain_model_with_the_same_outputs(
    tmp_path: Path,
) -> None:
    model, spec = _sparse_lenet()
    sparsity = strsparse.sparsity_report(model).sparsity
    assert sparsity > 0.1  # the export has zeros to keep
    out = export_dense(model, spec, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]

    plain = create_model("lenet5", num_classes=10, in_channels=1)
    plain.load_state_dict(load_file(str(out / WEIGHTS_FILE)), strict=True)
    plain.eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))
        torch.testing.assert_close(load_dense(out)(x), model(x))
    zeros = sum(
        int((plain.get_submodule(n).weight == 0).sum()) for n in strsparse.sparse_layers(model)
    )
    assert (
        zeros == strsparse.sparsity_report(model).params - strsparse.sparsity_report(model).nonzero
    )

    document = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert document["model"] == {
        "name": "lenet5",
        "num_classes": 10,
        "in_channels": 1,
        "kwargs": {},
    }
    assert document["source"]["sparsity"] == pytest.approx(sparsity, abs=1e-6)
    assert read_spec(out) == spec


def test_export_keeps_model_kwargs(tmp_path: Path) -> None:
    spec = DenseModelSpec("lenet5", num_classes=3, in_channels=2, kwargs={"batch_norm": False})
    model = _str_sparsified(spec.create())
    out = export_dense(model, spec, tmp_path / "e")
    loaded = load_dense(out)
    assert read_spec(out).kwargs == {"batch_norm": False}
    x = torch.randn(2, 2, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_export_of_a_plain_model_round_trips(tmp_path: Path) -> None:
    spec = DenseModelSpec("lenet_300_100", num_classes=10, in_channels=1)
    model = spec.create().eval()
    out = export_dense(model, spec, tmp_path / "plain")
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_dense(out)(x), model(x))


def test_export_refuses_to_overwrite_and_force_replaces_only_an_export(tmp_path: Path) -> None:
    model, spec = _sparse_lenet()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        export_dense(model, spec, out)
    with pytest.raises(FileExistsError, match="no previous export"):
        export_dense(model, spec, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"  # user data untouched

    first = export_dense(model, spec, tmp_path / "e")
    before = load_file(str(first / WEIGHTS_FILE))
    with pytest.raises(FileExistsError, match="--force"):
        export_dense(model, spec, first)
    other, _ = _sparse_lenet(-2.5)
    export_dense(other, spec, first, force=True)
    after = load_file(str(first / WEIGHTS_FILE))
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        export_dense(model, spec, a_file, force=True)


def test_export_into_an_empty_directory(tmp_path: Path) -> None:
    model, spec = _sparse_lenet()
    (tmp_path / "empty").mkdir()
    out = export_dense(model, spec, tmp_path / "empty")
    assert (out / WEIGHTS_FILE).is_file()


def test_a_wrong_spec_fails_before_writing(tmp_path: Path) -> None:
    model, _ = _sparse_lenet()
    wrong = DenseModelSpec("lenet5", num_classes=100, in_channels=1)
    with pytest.raises(ValueError, match="do not fit 'lenet5' with num_classes=100"):
        export_dense(model, wrong, tmp_path / "e")
    assert not (tmp_path / "e").exists()
    assert not list(tmp_path.iterdir())


def test_load_dense_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_dense(tmp_path / "missing")
    (tmp_path / CONFIG_FILE).write_text("format: something-else\n")
    with pytest.raises(ValueError, match="not a strsparse dense-model config"):
        load_dense(tmp_path)
    model, spec = _sparse_lenet()
    out = export_dense(model, spec, tmp_path / "e")
    (out / WEIGHTS_FILE).write_bytes(b"truncated")
    with pytest.raises(ValueError, match="cannot read"):
        load_dense(out)


def test_export_files_get_the_users_umask(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o027)
    try:
        out = export_dense(create_model("lenet5"), DenseModelSpec("lenet5", 10, 1), tmp_path / "e")
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o750
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert (out / name).stat().st_mode & 0o777 == 0o640
