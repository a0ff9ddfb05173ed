"""Every sparsity method on every layer type, plus each method's own contract and its errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import strsparse
from strsparse.methods import get_parametrization, raw_weight
from strsparse.methods.st3 import StraightThroughSoftThreshold, st3_weight

TOTAL_STEPS = 10

# Options giving each method a visibly sparse model after a few steps.
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


# -- the cross-method matrix ---------------------------------------------------------------
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


# -- DNW ------------------------------------------------------------------------------------
def test_dnw_exact_layer_sparsity_and_straight_through_gradient() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7), nn.Linear(7, 3))
    budget = {"0": 0.3, "1": 0.62}
    handle = strsparse.sparsify(model, "dnw", budget=budget)
    for name, module in handle.layers.items():
        n = module.weight.numel()
        assert int((module.weight == 0).sum()) == round(budget[name] * n)
        # kept weights are the largest magnitudes, unchanged
        raw = raw_weight(module)
        kept = module.weight != 0
        torch.testing.assert_close(module.weight[kept], raw[kept])
        assert raw[~kept].abs().max() <= raw[kept].abs().min()

    x = torch.randn(5, 10)
    model(x).sum().backward()
    first = handle.layers["0"]
    pruned = first.weight.detach() == 0
    assert (raw_weight(first).grad[pruned] != 0).any()
    # straight-through: the raw gradient is the gradient w.r.t. the effective weight
    effective = first.weight.detach().requires_grad_()
    hidden = nn.functional.linear(x, effective, first.bias)
    handle.layers["1"](hidden).sum().backward()
    torch.testing.assert_close(raw_weight(first).grad, effective.grad)


def test_dnw_mask_follows_the_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    strsparse.sparsify(layer, "dnw", sparsity=0.5)
    with torch.no_grad():
        raw = raw_weight(layer)
        smallest = raw.abs().flatten().argmin()
        raw.view(-1)[smallest] = 100.0  # a pruned weight becomes the largest
    assert layer.weight.view(-1)[smallest] == 100.0
    assert int((layer.weight == 0).sum()) == 12


# -- ST-3 -----------------------------------------------------------------------------------
def test_st3_weight_matches_the_formula_channel_by_channel() -> None:
    torch.manual_seed(0)
    weight = torch.randn(5, 3, 2, 2)
    th = 0.6
    out = st3_weight(weight, th)
    for c in range(5):
        w = weight[c]
        keep = w.abs() > th
        expected = (w - w.sign() * th) * keep
        r = ((w.abs() * keep).mean() + 1e-6) / (w.abs().mean() + 1e-6)
        torch.testing.assert_close(out[c], expected * 1.01 / (r + 0.01))
    torch.testing.assert_close(
        st3_weight(weight, th, rescale=False), (weight - weight.sign() * th) * (weight.abs() > th)
    )
    torch.testing.assert_close(st3_weight(weight, 0.0), weight, rtol=0, atol=0)


def _st3_linear(**options) -> tuple[nn.Linear, strsparse.SparsityHandle]:
    torch.manual_seed(0)
    layer = nn.Linear(9, 6)
    return layer, strsparse.sparsify(layer, "st3", **options)


def test_st3_is_straight_through_before_the_fix_and_masked_after() -> None:
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=5, rescale=False)
    x = torch.randn(4, 9)
    handle.step(3, 10)
    pruned = layer.weight.detach() == 0
    assert pruned.any()
    layer(x).sum().backward()
    expected = x.sum(0).expand(6, 9)  # d(sum(x W^T))/dW for every weight, pruned or not
    torch.testing.assert_close(raw_weight(layer).grad, expected)

    raw_weight(layer).grad = None
    handle.step(5, 10)  # the fix
    param = get_parametrization(layer)
    assert bool(param.frozen)
    mask = param.mask
    assert int((~mask).sum()) == round(0.5 * 54)
    layer(x).sum().backward()
    torch.testing.assert_close(raw_weight(layer).grad, expected * mask)

    # fine-tuning keeps the pruned weights at zero
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for step in range(6, 9):
        opt.zero_grad()
        layer(x).square().sum().backward()
        opt.step()
        handle.step(step, 10)
        assert torch.equal(layer.weight == 0, ~mask)


def test_st3_fix_writes_the_forward_weights_into_the_raw_ones() -> None:
    layer, handle = _st3_linear(sparsity=0.4, start=0, end=4)
    handle.step(3, 10)
    raw_before = raw_weight(layer).detach().clone()
    handle.step(4, 10)  # threshold at p_max, then the fix
    threshold = get_parametrization(layer).threshold()
    assert threshold == pytest.approx(float(raw_before.abs().flatten().kthvalue(22).values))
    w = raw_weight(layer).detach()
    torch.testing.assert_close(w, st3_weight(raw_before, threshold))
    assert int((w == 0).sum()) == round(0.4 * 54)
    torch.testing.assert_close(layer.weight.detach(), w)


def test_st3_freeze_on_demand_keeps_outputs() -> None:
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=8)
    x = torch.randn(3, 9)
    handle.step(4, 10)
    before = layer(x).detach()
    StraightThroughSoftThreshold.freeze(handle.layers)
    torch.testing.assert_close(layer(x), before)
    handle.step(5, 10)  # frozen layers ignore the schedule
    torch.testing.assert_close(layer(x), before)
    strsparse.finalize(layer)
    torch.testing.assert_close(layer(x), before)


def test_st3_frozen_state_survives_a_round_trip() -> None:
    layer, handle = _st3_linear(sparsity=0.5, start=0, end=3)
    for step in range(5):
        handle.step(step, 10)
    fresh, _ = _st3_linear(sparsity=0.5, start=0, end=3)
    fresh.load_state_dict(layer.state_dict())
    param = get_parametrization(fresh)
    assert param._frozen and bool(param.frozen)
    with torch.no_grad():
        raw_weight(fresh).add_(1.0)  # frozen: the mask, not a threshold, decides
    assert torch.equal(fresh.weight == 0, ~param.mask)


# -- magnitude ------------------------------------------------------------------------------
def test_magnitude_layer_scope_equals_torch_prune() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(11, 7), nn.Linear(7, 5))
    reference = nn.Sequential(nn.Linear(11, 7), nn.Linear(7, 5))
    reference.load_state_dict(model.state_dict())
    handle = strsparse.sparsify(model, "magnitude", sparsity=0.37)
    for name, module in handle.layers.items():
        ref = reference.get_submodule(name)
        prune.l1_unstructured(ref, "weight", amount=0.37)
        assert torch.equal(get_parametrization(module).mask, ref.weight_mask.bool())
        assert int((module.weight == 0).sum()) == round(0.37 * module.weight.numel())
        torch.testing.assert_close(module.weight, ref.weight)


def test_magnitude_global_scope_equals_torch_global_unstructured() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(11, 7), nn.Linear(7, 5))
    with torch.no_grad():
        model[1].weight.mul_(3.0)  # different scales: the global ranking favours layer 1
    reference = nn.Sequential(nn.Linear(11, 7), nn.Linear(7, 5))
    reference.load_state_dict(model.state_dict())
    strsparse.sparsify(model, "magnitude", sparsity=0.6, scope="global")
    prune.global_unstructured(
        [(reference[0], "weight"), (reference[1], "weight")],
        pruning_method=prune.L1Unstructured,
        amount=0.6,
    )
    zeros = [int((model[i].weight == 0).sum()) for i in (0, 1)]
    assert sum(zeros) == round(0.6 * (77 + 35))
    assert zeros[0] / 77 > zeros[1] / 35
    for i in (0, 1):
        assert torch.equal(get_parametrization(model[i]).mask, reference[i].weight_mask.bool())


def test_magnitude_mask_is_fixed_and_reports_its_cutoff() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    original = layer.weight.detach().clone()
    strsparse.sparsify(layer, "magnitude", sparsity=0.25)
    mask = layer.weight != 0
    cutoff = get_parametrization(layer).threshold()
    assert cutoff == pytest.approx(float(original.abs()[~mask].max()))
    assert cutoff < float(original.abs()[mask].min())
    with torch.no_grad():
        raw_weight(layer).mul_(-2.0)
    assert torch.equal(layer.weight != 0, mask)
    assert strsparse.sparsify(nn.Linear(3, 3), "magnitude", sparsity=0.0).layers
    assert get_parametrization(nn.Linear(3, 3)) is None


# -- errors ---------------------------------------------------------------------------------
def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


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


def test_include_or_exclude_matching_nothing() -> None:
    with pytest.raises(ValueError, match="include pattern 'fc' matches no"):
        strsparse.sparsify(_model(), "gmp", include=["fc"], sparsity=0.5)
    with pytest.raises(ValueError, match="exclude pattern 'layer1.*' matches no"):
        strsparse.sparsify(_model(), "magnitude", exclude=["layer1.*"], sparsity=0.5)


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


def test_st3_freeze_rejects_other_methods() -> None:
    handle = strsparse.sparsify(_model(), "gmp", sparsity=0.5)
    with pytest.raises(ValueError, match="freeze expects layers sparsified with 'st3'"):
        StraightThroughSoftThreshold.freeze(handle.layers)
