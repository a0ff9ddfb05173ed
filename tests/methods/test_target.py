"""STR with a target: the controller reaches the sparsity asked for, keeps a learned budget,
resumes exactly, and leaves STR without a target as it was."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import strsparse
from strsparse.functional import initial_threshold, threshold_to_s
from strsparse.methods import get_parametrization
from strsparse.methods.target import TargetController, density_error, layer_floor


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def _train(
    model: nn.Module,
    handle: strsparse.SparsityHandle,
    steps: int,
    *,
    seed: int = 0,
    lr: float = 0.1,
    first: int = 0,
    last: int | None = None,
    opt: torch.optim.Optimizer | None = None,
) -> torch.optim.Optimizer:
    """A user's own loop: SGD with momentum and weight decay on everything (``s`` included),
    cosine LR, ``handle.step`` before each forward; a fixed random teacher labels the data."""
    teacher = torch.Generator().manual_seed(1234)
    w1 = torch.randn(32, 64, generator=teacher)
    w2 = torch.randn(64, 10, generator=teacher)
    data = torch.Generator().manual_seed(seed)
    return _loop(
        model,
        handle,
        steps,
        lambda: torch.randn(64, 32, generator=data),
        lambda x: (torch.relu(x @ w1) @ w2).argmax(1),
        lr=lr,
        first=first,
        last=last,
        opt=opt,
    )


def _loop(
    model: nn.Module,
    handle: strsparse.SparsityHandle,
    steps: int,
    draw: Callable[[], torch.Tensor],
    label: Callable[[torch.Tensor], torch.Tensor],
    *,
    lr: float,
    first: int,
    last: int | None,
    opt: torch.optim.Optimizer | None,
) -> torch.optim.Optimizer:
    """The loop both data sets share: a batch drawn every step (skipped ones too, so a run
    resumed at ``first`` sees the same data), cosine LR, ``handle.step`` before the forward."""
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for step in range(steps if last is None else last):
        x = draw()
        if step < first:
            continue
        y = label(x)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        handle.step(step, steps)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "granularity", "steps", "seed"),
    [
        (0.5, "layer", 400, 0),
        (0.9, "layer", 400, 1),
        (0.99, "layer", 400, 2),
        (0.95, "channel", 300, 0),
        (0.8, "weight", 300, 1),
        (0.98, "global", 400, 0),
    ],
)
def test_target_is_reached_and_the_budget_stays_learned(
    target: float, granularity: str, steps: int, seed: int
) -> None:
    torch.manual_seed(seed)
    model = _mlp()
    handle = strsparse.sparsify(model, "str", sparsity=target, granularity=granularity)
    _train(model, handle, steps, seed=seed)
    report = strsparse.sparsity_report(model)
    assert report.sparsity == pytest.approx(target, abs=0.005)
    layer_sparsity = [row.sparsity for row in report.layers]
    # each layer found its own threshold: not one quantile for all
    assert max(layer_sparsity) - min(layer_sparsity) > 0.01
    status = handle.target_status()
    assert status["kind"] == "sparsity" and status["target"] == target
    assert status["scheduled"] == pytest.approx(target)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_drift_does_not_push_a_threshold_onto_the_flat_of_the_sigmoid(seed: int) -> None:
    # the drift fades with g'(s) as the task gradient does, so a small layer that the loss
    # needs (the classifier) is balanced by its task gradient, as with plain STR, instead of
    # being pushed to t -> k where nothing can pull it back (it then ended sparser than the
    # wide hidden layer, with sigmoid(s) up to 0.99)
    torch.manual_seed(seed)
    model = _mlp()
    handle = strsparse.sparsify(model, "str", sparsity=0.95)
    _train(model, handle, 300, seed=seed)
    report = strsparse.sparsity_report(model)
    assert report.sparsity == pytest.approx(0.95, abs=0.005)
    hidden, classifier = report.layers[1], report.layers[2]
    assert classifier.sparsity < hidden.sparsity
    for layer in (model[0], model[2], model[4]):
        p = get_parametrization(layer)
        assert p is not None
        assert float(torch.sigmoid(p.s.detach()).max()) < 0.6


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sparsity", "flops", "filters", "filter flops"])
def test_a_resumed_run_with_a_target_equals_the_uninterrupted_one(kind: str) -> None:
    steps, cut = 200, 90
    build, train, target = {
        "sparsity": (_mlp, _train, {"sparsity": 0.9}),
        "flops": (_cnn, _train_cnn, {"flops": 0.1, "input_shape": (1, 8, 8)}),
        "filters": (_bn_cnn, _train_pooled, {"sparsity": 0.5, "structure": "filter"}),
        "filter flops": (
            _bn_cnn,
            _train_pooled,
            {"flops": 0.4, "structure": "filter", "input_shape": (1, 8, 8)},
        ),
    }[kind]

    def opt_for(model: nn.Module) -> torch.optim.Optimizer:
        lr = 0.1 if kind == "sparsity" else 0.05
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    torch.manual_seed(0)
    full = build()
    train(full, strsparse.sparsify(full, "str", **target), steps, opt=opt_for(full))

    torch.manual_seed(0)
    first = build()
    opt = train(
        first, strsparse.sparsify(first, "str", **target), steps, last=cut, opt=opt_for(first)
    )
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    torch.manual_seed(99)  # a different fresh init: everything must come from the state
    resumed = build()
    handle = strsparse.sparsify(resumed, "str", **target)
    resumed.load_state_dict(saved_model)
    opt = opt_for(resumed)
    opt.load_state_dict(saved_opt)
    train(resumed, handle, steps, first=cut, opt=opt)

    expected, got = full.state_dict(), resumed.state_dict()
    assert any("target_controller" in key for key in expected)
    assert (
        float(got[next(k for k in got if k.endswith("target_controller.last_step"))]) == steps - 1
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_without_a_target_str_is_unchanged() -> None:
    model = _mlp()
    handle = strsparse.sparsify(model, "str")
    assert handle.controller is None and handle.target_status() is None
    assert all(float(s.detach()) == -3200.0 for s in handle.threshold_parameters())
    assert not any("target_controller" in key for key in model.state_dict())


def test_the_default_init_threshold_comes_from_the_weights() -> None:
    torch.manual_seed(0)
    model = _mlp()
    weights = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    handle = strsparse.sparsify(model, "str", sparsity=0.9)
    for w, p in zip(weights, handle.parametrizations.values(), strict=True):
        threshold = float(p.threshold_tensor().detach())
        assert threshold == pytest.approx(initial_threshold(w), rel=1e-4)
        assert 0.005 < float((w.abs() <= threshold).float().mean()) < 0.02  # ~1% start at 0
    # an explicit init_threshold wins
    handle = strsparse.sparsify(_mlp(), "str", sparsity=0.9, init_threshold=-7.0)
    assert all(float(s.detach()) == -7.0 for s in handle.threshold_parameters())


def test_pure_helpers() -> None:
    assert density_error(0.2, 0.1) == pytest.approx(math.log(2))
    assert density_error(0.1, 0.1) == 0.0
    assert torch.sigmoid(torch.tensor(threshold_to_s(0.01, "sigmoid"))) == pytest.approx(0.01)
    assert math.exp(threshold_to_s(0.3, "exp")) == pytest.approx(0.3)


def test_target_option_errors() -> None:
    with pytest.raises(ValueError, match="both sparsity"):
        strsparse.sparsify(_mlp(), "str", sparsity=0.9, flops=0.1)
    with pytest.raises(ValueError, match="fraction"):
        strsparse.sparsify(_mlp(), "str", sparsity=90)
    with pytest.raises(ValueError, match="flops=2"):
        strsparse.sparsify(_mlp(), "str", flops=2)
    with pytest.raises(ValueError, match="granularity='global'"):
        strsparse.sparsify(_mlp(), "str", flops=0.1, granularity="global", input_shape=(32,))
    with pytest.raises(ValueError, match="before start"):
        strsparse.sparsify(_mlp(), "str", sparsity=0.9, start=0.5, end=0.2)


def test_controller_state_lives_in_the_state_dict_and_moves_with_the_model() -> None:
    model = _mlp()
    handle = strsparse.sparsify(model, "str", sparsity=0.9)
    assert isinstance(handle.controller, TargetController)
    keys = [k for k in model.state_dict() if "target_controller" in k]
    # one shared module, registered under each layer's parametrization
    assert {k.rsplit(".", 1)[1] for k in keys} == {
        "integral",
        "last_step",
        "scheduled",
        "achieved",
        "rate",
    }
    for layer in handle.layers.values():
        assert get_parametrization(layer).target_controller is handle.controller
    strsparse.finalize(model)
    assert not any("target_controller" in k for k in model.state_dict())


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _train_cnn(
    model: nn.Module,
    handle: strsparse.SparsityHandle,
    steps: int,
    *,
    first: int = 0,
    opt: torch.optim.Optimizer | None = None,
    last: int | None = None,
    pool: int = 1,
    lr: float = 0.05,
) -> torch.optim.Optimizer:
    """A user's loop on 8x8 images labelled by a fixed linear teacher (as ``_train``) of
    their pixels, or with ``pool`` of the means of their ``pool`` x ``pool`` blocks."""
    teacher = torch.Generator().manual_seed(5)
    w = torch.randn(64 // pool**2, 10, generator=teacher)
    data = torch.Generator().manual_seed(0)
    return _loop(
        model,
        handle,
        steps,
        lambda: torch.randn(32, 1, 8, 8, generator=data),
        lambda x: (nn.functional.avg_pool2d(x, pool).flatten(1) @ w).argmax(1),
        lr=lr,
        first=first,
        last=last,
        opt=opt,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fraction", "granularity"),
    [
        (0.3, "layer"),
        (0.1, "layer"),
        (0.03, "layer"),
        (0.1, "channel"),
        (0.05, "weight"),
    ],
)
def test_flops_target_is_reached_without_emptying_a_layer(
    fraction: float, granularity: str
) -> None:
    from strsparse import flops

    torch.manual_seed(0)
    model = _cnn()
    handle = strsparse.sparsify(
        model, "str", flops=fraction, granularity=granularity, input_shape=(1, 8, 8)
    )
    costs = handle.controller.costs
    assert costs["0"] == 64 and costs["2"] == 16 and costs["5"] == 1  # output positions
    _train_cnn(model, handle, 400)
    profile = flops.profile(model, (1, 8, 8))
    achieved = profile.overall.sparse_flops / profile.overall.flops
    assert achieved == pytest.approx(fraction, abs=0.005)
    assert handle.target_status()["kind"] == "flops"
    assert handle.target_status()["achieved"] == pytest.approx(achieved, abs=0.005)
    report = strsparse.sparsity_report(model)
    # no layer emptied, and each layer found its own sparsity
    assert all(row.nonzero > 0 for row in report.layers)
    layer_sparsity = [row.sparsity for row in report.layers]
    assert max(layer_sparsity) - min(layer_sparsity) > 0.01


def test_a_flops_target_gives_an_emptied_layer_its_floor_back() -> None:
    torch.manual_seed(0)
    model = _cnn()
    handle = strsparse.sparsify(model, "str", flops=0.1, input_shape=(1, 8, 8))
    conv = get_parametrization(handle.layers["2"])
    assert conv.g_name == "exp"  # a FLOPs target's default: thresholds not capped at k
    with torch.no_grad():
        conv.s.fill_(5.0)  # threshold e^5: every weight of the layer is zeroed
    handle.step(0, 100)
    kept = int((model[2].weight != 0).sum())
    floor = handle.controller.min_kept["2"]
    assert floor == layer_floor(576, 0.1) == 6
    assert floor <= kept < 2 * floor  # the largest weights come back, no more


@pytest.mark.parametrize("g", ["exp", "sigmoid"])
def test_a_flops_target_keeps_a_thrown_threshold_within_reach(g: str) -> None:
    """One optimizer step can throw a threshold hundreds of units of s down (a conv before
    BatchNorm left with a few weights gets huge gradients there); below every weight it is
    dense anyway, so the controller lifts it back to REACH times the largest weight, where
    the drift can bring the layer back within a few steps."""
    from strsparse.methods.target import REACH

    torch.manual_seed(0)
    model = _cnn()
    handle = strsparse.sparsify(model, "str", flops=0.1, g=g, input_shape=(1, 8, 8))
    conv = get_parametrization(handle.layers["2"])
    other = get_parametrization(handle.layers["5"])
    before = other.s.detach().clone()
    with torch.no_grad():
        conv.s.fill_(-400.0)
    handle.step(0, 100)
    top = float(model[2].parametrizations.weight.original.abs().max())
    t = float(conv.threshold_tensor().max())
    assert t == pytest.approx(REACH * top, rel=1e-4)
    assert int((model[2].weight != 0).sum()) == model[2].weight.numel()  # still dense
    # a threshold within reach is moved by the drift alone, as without the guard
    assert float(other.threshold_tensor().min()) > REACH * float(
        model[5].parametrizations.weight.original.abs().max()
    )
    assert not torch.equal(other.s, before)


def test_layer_floor() -> None:
    assert layer_floor(400, 0.02) == 4  # 1% of the layer
    assert layer_floor(400, 0.01) == 2  # half a uniform budget's density when that is less
    assert layer_floor(10, 0.02) == 1  # never empty


def test_a_flops_target_needs_an_input_shape() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        strsparse.sparsify(_mlp(), "str", flops=0.1)


# -- structured STR: a target as the fraction of filters or rank-one components removed ---


def _bn_cnn() -> nn.Module:
    """Convs followed by BatchNorm (the gate sits after it) and a Linear without (the gate
    scales the layer itself): 16 + 32 + 32 filters under the target, the classifier aside."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _train_pooled(
    model: nn.Module, handle: strsparse.SparsityHandle, steps: int, **kwargs: Any
) -> torch.optim.Optimizer:
    """``_train_cnn`` labelled by the means of the images' four 4x4 quarters: a task
    ``_bn_cnn`` learns, so its filters come to matter unequally."""
    return _train_cnn(model, handle, steps, pool=4, lr=0.1, **kwargs)


def _removed(model: nn.Module) -> tuple[float, int]:
    """(fraction of the structured layers' filters / components at zero, their number)."""
    report = strsparse.structure_report(model)
    total = sum(n for _, n in report.values())
    return 1.0 - sum(alive for alive, _ in report.values()) / total, total


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "granularity"), [(0.5, "layer"), (0.7, "channel"), (0.4, "global")]
)
def test_a_filter_target_is_reached_and_slim_keeps_the_outputs(
    target: float, granularity: str
) -> None:
    torch.manual_seed(0)
    model = _bn_cnn()
    handle = strsparse.sparsify(
        model, "str", structure="filter", sparsity=target, granularity=granularity
    )
    _train_pooled(model, handle, 400)
    removed, total = _removed(model)
    assert total == 80
    assert abs(removed - target) <= 1 / total + 1e-9  # within one filter
    status = handle.target_status()
    assert status["kind"] == "filters" and status["target"] == target
    assert status["achieved"] == pytest.approx(removed, abs=1 / total + 1e-9)
    # the budget is learned: the layers keep different shares of their filters
    shares = [alive / n for alive, n in strsparse.structure_report(model).values()]
    assert max(shares) - min(shares) > 0.1
    assert min(shares) > 0  # no layer emptied: that would cut the network
    model.eval()
    x = torch.randn(4, 1, 8, 8)
    slim = strsparse.slim(model, x[:1])
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), atol=1e-5, rtol=1e-5)
    kept = slim[0].out_channels + slim[3].out_channels + slim[8].out_features
    assert kept == round((1 - removed) * total)


def _train_fastgrnn(**target: Any) -> tuple[nn.Module, strsparse.SparsityHandle]:
    """A small FastGRNN with a rank ``target`` (``sparsity=`` or ``flops=``), 400 steps on
    sequences of 6 steps of 5 features, labelled by a fixed linear teacher of their mean."""
    torch.manual_seed(0)
    model = strsparse.create_model(
        "fastgrnn", num_classes=3, input_size=5, hidden_size=16, rank_w=5, rank_u=16
    )
    handle = strsparse.sparsify(model, "str", structure="rank", **target)
    teacher = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    data = torch.Generator().manual_seed(0)
    _loop(
        model,
        handle,
        400,
        lambda: torch.randn(32, 6, 5, generator=data),
        lambda x: (x.mean(1) @ teacher).argmax(1),
        lr=0.05,
        first=0,
        last=None,
        opt=None,
    )
    return model, handle


@pytest.mark.slow
def test_a_rank_target_is_reached_on_fastgrnn() -> None:
    model, handle = _train_fastgrnn(sparsity=0.5)
    removed, total = _removed(model)
    assert total == 21
    assert abs(removed - 0.5) <= 1 / total + 1e-9
    assert handle.target_status()["kind"] == "ranks"
    ranks = strsparse.structure_report(model)
    model.eval()
    assert strsparse.slim(model).ranks() == (ranks["w"][0], ranks["u"][0])


def test_a_structured_target_starts_below_the_importance_values() -> None:
    model = _bn_cnn()
    handle = strsparse.sparsify(model, "str", structure="filter", sparsity=0.5)
    assert set(handle.layers) == {"0", "3", "8"}  # the classifier keeps its classes
    for gate in handle.parametrizations.values():
        # exp: a threshold that can pass the importance values' start (a sigmoid's stops
        # at k = 1); 1% of that start, so every filter begins alive
        assert gate.g_name == "exp"
        assert float(gate.threshold_tensor().detach()) == pytest.approx(0.01)
        assert gate.alive() == gate.m.numel()
    assert handle.controller is not None and handle.controller.kind == "filters"
    handle.step(0, 100)  # a first step moves the thresholds and prunes nothing yet
    assert _removed(model)[0] == 0.0
    # an explicit init_threshold wins; without a target the decay steers, as before
    handle = strsparse.sparsify(
        _bn_cnn(), "str", structure="filter", sparsity=0.5, g="sigmoid", init_threshold=-3.0
    )
    assert all(float(p.s.detach()) == -3.0 for p in handle.parametrizations.values())
    assert strsparse.sparsify(_bn_cnn(), "str", structure="filter").controller is None


@pytest.mark.slow
@pytest.mark.parametrize(("target", "granularity"), [(0.4, "layer"), (0.25, "channel")])
def test_a_structured_flops_target_counts_the_slim_model(target: float, granularity: str) -> None:
    from strsparse import flops

    torch.manual_seed(0)
    model = _bn_cnn()
    handle = strsparse.sparsify(
        model,
        "str",
        structure="filter",
        flops=target,
        granularity=granularity,
        input_shape=(1, 8, 8),
    )
    _train_pooled(model, handle, 400)
    status = handle.target_status()
    assert status["kind"] == "flops" and status["target"] == target
    # what the controller counted is what the slim model costs: the filters removed and
    # the next layers' inputs they take with them
    model.eval()
    dense = flops.profile(model, (1, 8, 8)).overall.flops
    slim = strsparse.slim(model, torch.zeros(1, 1, 8, 8))
    reached = flops.profile(slim, (1, 8, 8)).overall.flops / dense
    assert status["achieved"] == pytest.approx(reached, abs=1e-12)
    # within one filter of average cost (80 filters share the FLOPs)
    assert abs(reached - target) <= 1 / 80
    report = strsparse.structure_report(model)
    assert min(alive for alive, _ in report.values()) > 0  # no layer emptied
    shares = [alive / n for alive, n in report.values()]
    assert max(shares) - min(shares) > 0.1  # a learned budget, not a uniform one


@pytest.mark.parametrize(
    ("name", "shape"),
    [("resnet20", (3, 32, 32)), ("resnet18", (3, 32, 32)), ("mobilenet_v1", (3, 32, 32))],
)
def test_the_structured_flops_count_is_the_slim_models(name: str, shape: tuple[int, ...]) -> None:
    # residual additions keep a channel while any of its producers lives, and a depthwise
    # conv removes a channel whatever produced it: the count follows both, as slim does
    from strsparse import flops

    model = strsparse.create_model(name, num_classes=10)
    handle = strsparse.sparsify(model, "str", structure="filter", flops=0.5, input_shape=shape)
    channel_flops = handle.controller.channel_flops
    model.eval()
    draw = torch.Generator().manual_seed(0)
    for kept in (0.5, 0.3, 0.1):
        with torch.no_grad():
            for gate in handle.parametrizations.values():
                gate.m.copy_((torch.rand(gate.m.shape, generator=draw) < kept).float())
                gate.m[0] = 1.0
        alive = {n: gate.scale().detach() != 0 for n, gate in handle.parametrizations.items()}
        slim = strsparse.slim(model, torch.zeros(1, *shape))
        expected = flops.profile(slim, shape).overall.flops / channel_flops.total
        assert channel_flops.fraction(alive) == pytest.approx(expected, abs=1e-12)
        assert expected < 0.9


@pytest.mark.slow
def test_a_rank_flops_target_is_reached_on_fastgrnn() -> None:
    from strsparse import flops

    model, handle = _train_fastgrnn(flops=0.5, input_shape=(6, 5))
    model.eval()
    dense = flops.profile(model, (6, 5)).overall.flops
    reached = flops.profile(strsparse.slim(model), (6, 5)).overall.flops / dense
    assert handle.target_status()["achieved"] == pytest.approx(reached, abs=1e-12)
    # within half of the costliest component: one of U's 16 costs 3072 / 16 of 3750 FLOPs
    assert abs(reached - 0.5) <= 0.5 * 3072 / 16 / dense
    ranks = strsparse.structure_report(model)
    assert ranks["u"][0] < 16


def test_a_structured_flops_target_on_a_forward_fx_cannot_trace_names_the_fix() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            if x.sum() > 0:  # data-dependent control flow
                x = torch.relu(x)
            return self.fc(x.mean((2, 3)))

    with pytest.warns(UserWarning), pytest.raises(ValueError, match="give sparsity="):
        strsparse.sparsify(Branchy(), "str", structure="filter", flops=0.5, input_shape=(1, 8, 8))
    # a batch's shape, as flops.profile takes it, works as one sample's does
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3))
    one = strsparse.sparsify(model, "str", structure="filter", flops=0.5, input_shape=(1, 8, 8))
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 3))
    batch = strsparse.sparsify(
        model, "str", structure="filter", flops=0.5, input_shape=(4, 1, 8, 8)
    )
    assert batch.controller.channel_flops.total == one.controller.channel_flops.total


def test_a_rank_flops_target_counts_the_slim_ranks() -> None:
    from strsparse import flops

    model = strsparse.create_model(
        "fastgrnn", num_classes=3, input_size=5, hidden_size=16, rank_w=5, rank_u=16
    )
    handle = strsparse.sparsify(model, "str", structure="rank", flops=0.5, input_shape=(6, 5))
    assert handle.target_status()["kind"] == "flops"
    with torch.no_grad():
        for gate in handle.parametrizations.values():
            gate.m[::2] = 0.0
    alive = {n: gate.scale().detach() != 0 for n, gate in handle.parametrizations.items()}
    model.eval()
    channel_flops = handle.controller.channel_flops
    slim = strsparse.slim(model)
    expected = flops.profile(slim, (6, 5)).overall.flops / channel_flops.total
    assert channel_flops.fraction(alive) == pytest.approx(expected, abs=1e-12)
    assert expected < 0.6


def test_a_structured_flops_target_below_what_the_ungated_layers_cost_is_refused() -> None:
    with pytest.raises(ValueError, match=r"flops=0.001 is below .* at its fewest filters"):
        strsparse.sparsify(_bn_cnn(), "str", structure="filter", flops=0.001, input_shape=(1, 8, 8))


def test_a_structured_target_lands_on_the_nearest_count() -> None:
    # 7 filters of distinct, fixed importance and a target of 4.3 alive: the last filter to
    # go moves ln D by more than the gap left (ln 5/4.3 < ln 5/4), and 4 is still the count
    # nearest the target, so the controller must take it, and then hold
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.ReLU(), nn.Linear(7, 3))
    handle = strsparse.sparsify(
        model, "str", structure="filter", sparsity=1 - 4.3 / 7, start=0, end=1
    )
    gate = get_parametrization(model[0])
    with torch.no_grad():
        gate.m.copy_(torch.linspace(0.1, 0.7, 7))
    alive = []
    for step in range(200):
        handle.step(step, 200)
        alive.append(gate.alive())
    assert alive[-1] == 4 and alive[-50:] == [4] * 50
    assert min(alive) == 4  # never past it
