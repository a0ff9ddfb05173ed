"""GMP (strsparse.methods.gmp): the cubic schedule, update points, scopes, budgets and resume."""

from __future__ import annotations

import pytest
import torch

import strsparse
from strsparse import Budget, cubic_sparsity
from strsparse.methods import get_parametrization, raw_weight
from tests.methods.nets import CONV_NET_LAYERS, conv_net, count_zeros


def _sparsity_at(handle: strsparse.SparsityHandle, step: int, total: int) -> dict[str, int]:
    handle.step(step, total)
    return {name: count_zeros(m) for name, m in handle.layers.items()}


def test_gmp_layer_scope_follows_the_cubic_schedule_and_ends_exactly() -> None:
    model = conv_net()
    handle = strsparse.sparsify(model, "gmp", sparsity=0.8, start=10, end=30, frequency=1)
    numel = {n: m.weight.numel() for n, m in handle.layers.items()}

    assert _sparsity_at(handle, 9, 100) == dict.fromkeys(CONV_NET_LAYERS, 0)  # dense before t0
    assert _sparsity_at(handle, 10, 100) == dict.fromkeys(CONV_NET_LAYERS, 0)  # s_i = 0 at t0
    mid = 0.8 * (1 - 0.5**3)  # s_f + (s_i - s_f) (1 - 1/2)^3
    assert cubic_sparsity(20, 10, 30, 0.8) == pytest.approx(mid)
    assert _sparsity_at(handle, 20, 100) == {n: round(mid * numel[n]) for n in CONV_NET_LAYERS}
    for module in handle.layers.values():
        assert float(get_parametrization(module).target) == pytest.approx(mid)
    final = {n: round(0.8 * numel[n]) for n in CONV_NET_LAYERS}
    assert _sparsity_at(handle, 30, 100) == final
    assert _sparsity_at(handle, 70, 100) == final


def test_gmp_initial_sparsity_applies_from_start() -> None:
    handle = strsparse.sparsify(conv_net(), "gmp", sparsity=0.9, initial_sparsity=0.2, end=0.5)
    numel = {n: m.weight.numel() for n, m in handle.layers.items()}
    assert _sparsity_at(handle, 0, 100) == {n: round(0.2 * numel[n]) for n in CONV_NET_LAYERS}
    # end=0.5 of 100 steps is step 50: the last update is exactly there
    assert _sparsity_at(handle, 50, 100) == {n: round(0.9 * numel[n]) for n in CONV_NET_LAYERS}


def test_gmp_masks_only_change_at_update_points() -> None:
    model = conv_net()
    handle = strsparse.sparsify(model, "gmp", sparsity=0.7, start=0, end=20, frequency=7)
    handle.step(7, 100)
    masks = {n: get_parametrization(m).mask.clone() for n, m in handle.layers.items()}
    with torch.no_grad():
        for module in handle.layers.values():
            raw_weight(module).copy_(torch.randn_like(raw_weight(module)))
    for step in (8, 10, 13):  # same update point (7): masks are fixed
        handle.step(step, 100)
        for name, module in handle.layers.items():
            assert torch.equal(get_parametrization(module).mask, masks[name])
    expected = cubic_sparsity(14, 0, 20, 0.7)
    handle.step(14, 100)
    for module in handle.layers.values():
        assert count_zeros(module) == round(expected * module.weight.numel())
    handle.step(20, 100)  # end is always an update, though 20 is not 0 + k * 7
    for module in handle.layers.values():
        assert count_zeros(module) == round(0.7 * module.weight.numel())


def test_gmp_skipped_calls_give_the_same_masks() -> None:
    every = strsparse.sparsify(conv_net(), "gmp", sparsity=0.6, end=40, frequency=5)
    skipping = strsparse.sparsify(conv_net(), "gmp", sparsity=0.6, end=40, frequency=5)
    for step in range(28):
        every.step(step, 100)
    skipping.step(27, 100)
    for name in CONV_NET_LAYERS:
        assert torch.equal(
            get_parametrization(every.layers[name]).mask,
            get_parametrization(skipping.layers[name]).mask,
        )


def test_gmp_target_is_resumed_from_the_state_dict() -> None:
    model = conv_net()
    handle = strsparse.sparsify(model, "gmp", sparsity=0.5, end=40, frequency=10)
    handle.step(25, 100)
    resumed = conv_net(seed=3)
    strsparse.sparsify(resumed, "gmp", sparsity=0.5, end=40, frequency=10)
    resumed.load_state_dict(model.state_dict())
    for name in CONV_NET_LAYERS:
        p = get_parametrization(resumed.get_submodule(name))
        assert float(p.target) == pytest.approx(cubic_sparsity(20, 0, 40, 0.5))
        assert int(p.update_step) == 20


def test_gmp_global_scope_hits_the_global_target_exactly() -> None:
    model = conv_net()
    with torch.no_grad():
        model[4].weight.mul_(0.1)  # a small-magnitude layer loses more in a global ranking
    handle = strsparse.sparsify(model, "gmp", sparsity=0.75, scope="global", end=10, frequency=3)
    total = sum(m.weight.numel() for m in handle.layers.values())
    mid = cubic_sparsity(6, 0, 10, 0.75)
    assert sum(_sparsity_at(handle, 6, 20).values()) == round(mid * total)
    zeros = _sparsity_at(handle, 10, 20)
    assert sum(zeros.values()) == round(0.75 * total)
    assert zeros["4"] / model[4].weight.numel() > zeros["0"] / model[0].weight.numel()
    report = strsparse.sparsity_report(model)
    assert report.sparsity == pytest.approx(round(0.75 * total) / total)


def test_gmp_budget_scales_each_layers_schedule() -> None:
    budget = Budget({"0": 0.3, "2": 0.6, "4": 0.95})
    handle = strsparse.sparsify(conv_net(), "gmp", budget=budget, start=0, end=10, frequency=1)
    numel = {n: m.weight.numel() for n, m in handle.layers.items()}
    assert _sparsity_at(handle, 5, 20) == {
        n: round(cubic_sparsity(5, 0, 10, budget[n]) * numel[n]) for n in CONV_NET_LAYERS
    }
    assert _sparsity_at(handle, 10, 20) == {n: round(budget[n] * numel[n]) for n in CONV_NET_LAYERS}


def test_budget_transfer_from_str_to_gmp() -> None:
    learned = conv_net()
    handle = strsparse.sparsify(learned, "str", init_threshold=-3200.0)
    with torch.no_grad():  # give each layer its own threshold, as training would
        for s, value in zip(handle.threshold_parameters(), (-2.5, -3.5, -3.0), strict=True):
            s.fill_(value)
    budget = Budget.from_model(learned)
    assert len(set(budget.values())) == 3 and all(0 < v < 1 for v in budget.values())

    fresh = conv_net(seed=7)
    gmp = strsparse.sparsify(fresh, "gmp", budget=budget, end=1.0, frequency=25)
    for step in range(100):
        gmp.step(step, 100)
    for name, module in gmp.layers.items():
        assert count_zeros(module) == count_zeros(learned.get_submodule(name))
    assert Budget.from_model(fresh) == budget
