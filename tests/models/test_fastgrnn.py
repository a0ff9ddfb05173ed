"""FastGRNN: forward against the equations, low-rank factors, and STR on the rank vectors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import strsparse
from strsparse.layers import LowRankLinear
from strsparse.methods.structured import StructuredSoftThreshold, structure_report


def test_forward_matches_a_hand_checked_example() -> None:
    # one hidden unit, one feature, two steps: W = 0.5, U = -1, b_z = b_h = 0,
    # zeta = nu = 0 (sigmoid 0.5), x = (2, 1), h_0 = 0.
    # t=1: a = 1, z = sigmoid(1) = 0.7310586, h~ = tanh(1) = 0.7615942,
    #      h_1 = (0.5 (1 - z) + 0.5) h~ = 0.6344707 * 0.7615942 = 0.4832092
    # t=2: a = 0.5 - 0.4832092 = 0.0167908, z = 0.5041976, h~ = 0.0167892,
    #      h_2 = z h_1 + (0.5 (1 - z) + 0.5) h~ = 0.2436321 + 0.0131575 = 0.2561896
    # classifier y = 2 h_2 + 0.25 = 0.7623792
    model = strsparse.create_model("fastgrnn", num_classes=1, input_size=1, hidden_size=1)
    with torch.no_grad():
        model.w.weight.fill_(0.5)
        model.u.weight.fill_(-1.0)
        model.bias_z.zero_()
        model.bias_h.zero_()
        model.zeta.zero_()
        model.nu.zero_()
        model.fc.weight.fill_(2.0)
        model.fc.bias.fill_(0.25)
    x = torch.tensor([[[2.0], [1.0]]])  # (batch 1, time 2, features 1)
    states = model.hidden_states(x)
    torch.testing.assert_close(states, torch.tensor([[[0.4832092], [0.2561896]]]))
    torch.testing.assert_close(model(x), torch.tensor([[0.7623792]]))


def _reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The equations, written out with the effective W and U matrices."""
    w, u = model.w.weight, model.u.weight  # (H, F), (H, H)
    h = torch.zeros(x.shape[0], w.shape[0])
    for t in range(x.shape[1]):
        a = x[:, t] @ w.T + h @ u.T
        z = torch.sigmoid(a + model.bias_z)
        h_tilde = torch.tanh(a + model.bias_h)
        h = z * h + (torch.sigmoid(model.zeta) * (1 - z) + torch.sigmoid(model.nu)) * h_tilde
    return model.fc(h)


def test_low_rank_forward_matches_the_equations_and_defaults() -> None:
    torch.manual_seed(0)
    model = strsparse.create_model(
        "fastgrnn", num_classes=3, input_size=5, hidden_size=7, rank_w=2, rank_u=3
    )
    assert isinstance(model.w, LowRankLinear) and model.w.weight1.shape == (7, 2)
    assert model.w.weight2.shape == (2, 5) and model.u.rank == 3
    assert model.ranks() == (2, 3)
    torch.testing.assert_close(model.w.weight, model.w.weight1 @ model.w.weight2)
    assert model.zeta.item() == 1.0 and model.nu.item() == -4.0
    assert torch.all(model.bias_z == 1) and torch.all(model.bias_h == 1)
    x = torch.randn(4, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(model, x))
    with pytest.raises(ValueError, match=r"\(batch, time, 5\)"):
        model(torch.randn(4, 5))


def test_builder_options() -> None:
    model = strsparse.create_model("fastgrnn", in_channels=9, num_classes=2)
    assert model.input_size == 9 and isinstance(model.w, nn.Linear)
    with pytest.raises(ValueError, match="same thing"):
        strsparse.create_model("fastgrnn", in_channels=9, input_size=8)
    with pytest.raises(ValueError, match="rank_u"):
        strsparse.create_model("fastgrnn", rank_u=0)


def test_rank_structure_attaches_exp_gates_to_the_factors() -> None:
    model = strsparse.create_model("fastgrnn", hidden_size=8, rank_w=4, rank_u=6)
    handle = strsparse.sparsify(model, "str", structure="rank", init_threshold=-10.0)
    assert set(handle.layers) == {"w.weight2", "u.weight2"}
    gate = strsparse.get_parametrization(model.u, "weight2")
    assert isinstance(gate, StructuredSoftThreshold) and gate.g_name == "exp"
    assert gate.m.shape == (6,)
    # the threshold weight decay acts on m and s of both gates
    params = handle.threshold_parameters()
    assert len(params) == 4 and any(p is gate.m for p in params)
    assert structure_report(model) == {"w": (4, 4), "u": (6, 6)}
    with torch.no_grad():  # W = W1 diag(S(m)) W2
        gate.m[1] = 0.0
        expected = model.u.parametrizations.weight2.original.clone()
        expected[1] = 0.0
        scale = gate.scale()
        torch.testing.assert_close(model.u.weight2, scale[:, None] * expected)
    assert structure_report(model)["u"] == (5, 6)
    with pytest.raises(ValueError, match="LowRankLinear"):
        strsparse.sparsify(strsparse.create_model("fastgrnn"), "str", structure="rank")
    with pytest.raises(ValueError, match="granularity='weight'"):
        strsparse.sparsify(model, "str", structure="rank", granularity="weight")


def test_strong_decay_zeroes_rank_components_and_slim_cuts_them() -> None:
    torch.manual_seed(0)
    model = strsparse.create_model(
        "fastgrnn", num_classes=3, input_size=5, hidden_size=8, rank_w=5, rank_u=8
    )
    strsparse.sparsify(model, "str", structure="rank", init_threshold=-4.0)
    gates = [
        strsparse.get_parametrization(model.w, "weight2"),
        strsparse.get_parametrization(model.u, "weight2"),
    ]
    with torch.no_grad():  # components of distinct importance: the weakest go first
        for gate in gates:
            gate.m.copy_(torch.linspace(0.1, 1.0, gate.m.numel()))
    opt = torch.optim.SGD(
        [
            {"params": [g.m for g in gates], "weight_decay": 0.0},
            {"params": [g.s for g in gates], "weight_decay": 0.2},  # strong decay on s
        ],
        lr=0.5,
    )
    x, y = torch.randn(16, 6, 5), torch.randint(0, 3, (16,))
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ranks = structure_report(model)
    assert 0 < ranks["w"][0] < 5 and 0 < ranks["u"][0] < 8  # decay removed components
    dead = gates[1].scale() == 0
    assert torch.all(model.u.weight2[dead] == 0)  # each zero removes a whole component

    model.eval()
    slim = strsparse.slim(model)
    assert slim.ranks() == (ranks["w"][0], ranks["u"][0])
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-5, rtol=1e-5)
    assert model.w.parametrizations.weight2.original.shape == (5, 5)  # the original is intact
