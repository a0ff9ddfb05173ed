"""The contract every registered method keeps (strsparse.methods.base), on every layer type,
and the option errors the methods share."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import strsparse
from strsparse.methods import get_parametrization, raw_weight
from strsparse.methods.base import schedule_window
from tests.lookalikes import Conv1D

TOTAL_STEPS = 10

METHOD_OPTIONS: dict[str, dict] = {
    "str": {"init_threshold": -3200.0},
    "st3": {"sparsity": 0.5, "start": 0, "end": 6},
    "gmp": {"sparsity": 0.5, "start": 0, "end": 6, "frequency": 2},
    "dnw": {"sparsity": 0.5},
    "magnitude": {"sparsity": 0.5},
}


def _linear() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))


def _conv1d() -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Conv1d(8, 4, 3))


def _conv2d() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))


ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear": (_linear, (4, 12)),
    "conv1d": (_conv1d, (2, 3, 10)),
    "conv2d": (_conv2d, (2, 3, 8, 8)),
}


def _sparse_model(
    method: str, arch: str, seed: int = 0, steps: int = 3
) -> tuple[nn.Module, strsparse.SparsityHandle, torch.Tensor]:
    """A sparsified model of ``arch`` (advanced to step ``steps - 1``) and an input for it."""
    factory, input_shape = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = factory()
    handle = strsparse.sparsify(model, method, **METHOD_OPTIONS[method])
    if method == "str":
        # a threshold g(s) ~ 0.047 that prunes part of each layer and has g'(s) != 0
        with torch.no_grad():
            for s in handle.threshold_parameters():
                s.fill_(-3.0)
    for step in range(steps):
        handle.step(step, TOTAL_STEPS)
    torch.manual_seed(1234)
    return model, handle, torch.randn(input_shape)


all_methods = pytest.mark.parametrize("method", strsparse.list_methods())


all_architectures = pytest.mark.parametrize("arch", list(ARCHITECTURES))


def test_every_method_is_in_the_matrix() -> None:
    assert set(strsparse.list_methods()) == set(METHOD_OPTIONS)


@all_methods
@all_architectures
def test_output_shape_sparsity_and_gradients(method: str, arch: str) -> None:
    model, handle, x = _sparse_model(method, arch)
    torch.manual_seed(0)
    dense_out = ARCHITECTURES[arch][0]()(x)
    out = model(x)
    assert out.shape == dense_out.shape

    for name, module in handle.layers.items():
        assert (module.weight == 0).any(), f"{method}: layer {name} has no zero weight"

    out.square().sum().backward()
    for name, module in handle.layers.items():
        grad = raw_weight(module).grad
        assert grad is not None and grad.abs().sum() > 0, f"{method}: no gradient in {name}"
    for s in handle.threshold_parameters():
        assert s.grad is not None and s.grad.abs().sum() > 0
    if method == "str":
        assert handle.threshold_parameters()


@all_methods
@all_architectures
def test_state_dict_round_trip(method: str, arch: str) -> None:
    model, handle, x = _sparse_model(method, arch, seed=0)
    state = model.state_dict()

    fresh, fresh_handle, _ = _sparse_model(method, arch, seed=1, steps=0)
    if method not in ("str", "dnw"):  # the fresh model's own state really differs
        assert not torch.equal(fresh(x), model(x))
    fresh.load_state_dict(state, strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)

    # resuming: the next steps act on both alike (schedules are functions of the step)
    for step in (3, 4, 6, 7):
        handle.step(step, TOTAL_STEPS)
        fresh_handle.step(step, TOTAL_STEPS)
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@all_methods
@all_architectures
def test_finalize_keeps_outputs_and_loads_into_the_plain_architecture(
    method: str, arch: str
) -> None:
    model, _, x = _sparse_model(method, arch)
    before = model(x).detach()
    strsparse.finalize(model)
    assert not strsparse.sparse_layers(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)

    plain = ARCHITECTURES[arch][0]()
    plain.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(plain(x), before, rtol=0, atol=0)
    assert any((m.weight == 0).any() for m in plain.modules() if hasattr(m, "weight"))


@all_methods
def test_threshold_is_a_float_or_none(method: str) -> None:
    model, handle, x = _sparse_model(method, "linear")
    model(x)
    for module in handle.layers.values():
        value = get_parametrization(module).threshold()
        assert value is None or (isinstance(value, float) and value >= 0)
    report = strsparse.sparsity_report(model)
    assert len(report.layers) == len(handle.layers)


def test_unknown_method_lists_the_valid_names_and_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'gmp'") as info:
        strsparse.sparsify(_model(), "gpm", sparsity=0.5)
    for name in strsparse.list_methods():
        assert name in str(info.value)


@pytest.mark.parametrize("method", ["st3", "gmp", "dnw", "magnitude"])
def test_unknown_option_names_the_closest(method: str) -> None:
    with pytest.raises(ValueError, match="'sparsty'.*did you mean 'sparsity'"):
        strsparse.sparsify(_model(), method, sparsty=0.5)


@pytest.mark.parametrize("method", ["st3", "gmp", "dnw", "magnitude"])
def test_sparsity_given_as_a_percentage_is_rejected(method: str) -> None:
    with pytest.raises(ValueError, match="sparsity=90.*fraction, not a percentage"):
        strsparse.sparsify(_model(), method, sparsity=90)
    with pytest.raises(ValueError, match="budget\\['0'\\]=90"):
        strsparse.sparsify(_model(), method, budget={"0": 90, "2": 0.5})


@pytest.mark.parametrize("method", ["st3", "gmp", "dnw", "magnitude"])
def test_exactly_one_of_sparsity_and_budget(method: str) -> None:
    with pytest.raises(ValueError, match="needs a target.*sparsity=.*budget="):
        strsparse.sparsify(_model(), method)
    with pytest.raises(ValueError, match="both sparsity=0.5 and a budget; give only one"):
        strsparse.sparsify(_model(), method, sparsity=0.5, budget={"0": 0.5, "2": 0.5})
    with pytest.raises(ValueError, match="must map layer names"):
        strsparse.sparsify(_model(), method, budget=0.5)


@pytest.mark.parametrize("method", ["st3", "gmp", "dnw", "magnitude"])
def test_budget_must_name_exactly_the_sparsified_layers(method: str) -> None:
    with pytest.raises(ValueError, match="no entry for layers 2"):
        strsparse.sparsify(_model(), method, budget={"0": 0.5})
    with pytest.raises(ValueError, match="not sparsified here: fc; check include/exclude"):
        strsparse.sparsify(_model(), method, budget={"0": 0.5, "2": 0.5, "fc": 0.1})
    with pytest.raises(ValueError, match="not sparsified here: 00 \\(did you mean '0'\\?\\)"):
        strsparse.sparsify(_model(), method, budget={"00": 0.5, "2": 0.5})
    # a budget for the included layers only is fine
    handle = strsparse.sparsify(_model(), method, include=["0"], budget={"0": 0.5})
    assert list(handle.layers) == ["0"]


@pytest.mark.parametrize("method", strsparse.list_methods())
def test_sparsify_twice(method: str) -> None:
    model = _model()
    strsparse.sparsify(model, method, **METHOD_OPTIONS[method])
    with pytest.raises(ValueError, match="already sparsified.*finalize"):
        strsparse.sparsify(model, "magnitude", sparsity=0.5)


@pytest.mark.parametrize("method", ["gmp", "magnitude"])
def test_budget_with_global_scope(method: str) -> None:
    with pytest.raises(ValueError, match="scope='global'.*use scope='layer' with a budget"):
        strsparse.sparsify(_model(), method, budget={"0": 0.5, "2": 0.5}, scope="global")
    with pytest.raises(ValueError, match="unknown scope 'globl'.*did you mean 'global'"):
        strsparse.sparsify(_model(), method, sparsity=0.5, scope="globl")


def test_schedule_option_errors() -> None:
    with pytest.raises(ValueError, match="frequency=0 must be a positive"):
        strsparse.sparsify(_model(), "gmp", sparsity=0.5, frequency=0)
    with pytest.raises(ValueError, match="end=10 comes before start=20"):
        strsparse.sparsify(_model(), "gmp", sparsity=0.5, start=20, end=10)
    with pytest.raises(ValueError, match="end=1.5 is a fraction of training"):
        strsparse.sparsify(_model(), "st3", sparsity=0.5, end=1.5)
    with pytest.raises(ValueError, match="initial_sparsity=0.6 exceeds layer '0'"):
        strsparse.sparsify(_model(), "gmp", sparsity=0.5, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="normalize=True.*no effect with a budget"):
        strsparse.sparsify(_model(), "st3", budget={"0": 0.5, "2": 0.5}, normalize=True)
    with pytest.raises(ValueError, match="rescale='yes' must be True or False"):
        strsparse.sparsify(_model(), "st3", sparsity=0.5, rescale="yes")

    handle = strsparse.sparsify(_model(), "gmp", sparsity=0.5, end=500)
    with pytest.raises(ValueError, match="end=500 is after the last step 99"):
        handle.step(0, 100)
    handle = strsparse.sparsify(_model(), "st3", sparsity=0.5, start=0.5, end=10)
    with pytest.raises(ValueError, match="comes before start=0.5 \\(step 50\\)"):
        handle.step(0, 100)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def test_schedule_window_resolves_fractions_and_ints() -> None:
    assert schedule_window(0.1, 0.5, 200) == (20, 100)
    assert schedule_window(0, 1.0, 200) == (0, 199)  # "at the last step"
    assert schedule_window(10, 199, 200) == (10, 199)


def test_output_axis_of_each_layer_type() -> None:
    from strsparse.methods.base import output_axis

    assert output_axis(nn.Linear(3, 4)) == 0
    assert output_axis(nn.Conv2d(3, 4, 3)) == 0
    assert output_axis(nn.ConvTranspose2d(3, 4, 3)) == 1  # (C_in, C_out, kH, kW)
    assert output_axis(Conv1D(4, 3)) == 1  # (in, out)
    sparsified = Conv1D(4, 3)
    strsparse.sparsify(sparsified, "magnitude", sparsity=0.5)
    assert output_axis(sparsified) == 1  # its class is now ParametrizedConv1D
    assert output_axis(nn.LSTM(3, 4), "weight_ih_l0") == 0  # (4H, in)
