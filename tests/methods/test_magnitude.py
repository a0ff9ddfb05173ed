"""One-shot magnitude pruning (strsparse.methods.magnitude) against torch.nn.utils.prune."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import strsparse
from strsparse.methods import get_parametrization, raw_weight


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
