"""STR's parametrization (strsparse.methods.soft_threshold): granularities, init, eq. 6, and
the batched computation of all layers' weights against each layer computing its own."""

from __future__ import annotations

import gc
import warnings
import weakref
from copy import deepcopy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import strsparse
from strsparse.methods import get_parametrization, raw_weight
from strsparse.methods.soft_threshold import InitThresholdWarning
from tests.lookalikes import Conv1D


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


@pytest.mark.parametrize(
    ("granularity", "shapes"),
    [
        ("layer", [(), ()]),
        ("channel", [(8, 1, 1, 1), (5, 1)]),
        ("weight", [(8, 3, 3, 3), (5, 128)]),
        ("global", [(), ()]),
    ],
)
def test_str_granularities(granularity: str, shapes: list[tuple[int, ...]]) -> None:
    model = _net()
    handle = strsparse.sparsify(model, "str", granularity=granularity)
    params = [get_parametrization(m) for m in handle.layers.values()]
    with torch.no_grad():  # a threshold that prunes some weights and has g'(s) != 0
        for s in handle.threshold_parameters():
            s.fill_(-3.0)
    assert [tuple(p.s.shape) for p in params] == shapes
    thresholds = handle.threshold_parameters()
    if granularity == "global":
        assert params[0].s is params[1].s
        assert len(thresholds) == 1
        assert len([p for p in model.parameters() if p.dim() == 0]) == 1
    else:
        assert len(thresholds) == 2
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    for s in thresholds:
        assert s.grad is not None and s.grad.shape == s.shape and s.grad.abs().sum() > 0


def test_str_init_warning() -> None:
    torch.manual_seed(0)
    # sigmoid(-3.2) = 0.039 > 1/sqrt(784) = 0.036: every weight of the layer is pruned
    with pytest.warns(UserWarning, match="init_threshold"):
        strsparse.sparsify(nn.Linear(784, 300), "str", init_threshold=-3.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strsparse.sparsify(nn.Linear(784, 300), "str", init_threshold=-3200.0)


def test_str_weight_decay_alone_moves_s_as_eq6_predicts() -> None:
    """With g'(s) = 0 (s = -3200 in float32) the loss cannot move s: s <- s - lr * wd * s."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    handle = strsparse.sparsify(layer, "str", init_threshold=-3200.0)
    (s,) = handle.threshold_parameters()
    lr, wd = 0.1, 5e-4
    opt = torch.optim.SGD([s], lr=lr, weight_decay=wd)
    x = torch.randn(3, 6)
    for _ in range(3):
        before = s.detach().clone()
        opt.zero_grad()
        layer(x).square().sum().backward()
        assert float(s.grad) == 0.0
        opt.step()
        assert torch.equal(s.detach(), before - lr * (wd * before))


def test_str_one_sgd_step_on_s_matches_eq6() -> None:
    """s <- s + lr g'(s) P - lr wd s with P = <dL/dW_hat, sign(W) 1{W_hat != 0}>."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    handle = strsparse.sparsify(layer, "str")
    (s,) = handle.threshold_parameters()
    with torch.no_grad():
        s.fill_(-2.0)  # g(s) = 0.12: part of the layer is pruned
    lr, wd = 0.5, 1e-2
    opt = torch.optim.SGD([s], lr=lr, weight_decay=wd)
    x, c = torch.randn(5, 8), torch.randn(5, 4)

    weight = raw_weight(layer).detach()
    w_hat = layer.weight.detach().clone().requires_grad_()
    assert (w_hat == 0).any() and (w_hat != 0).any()
    (nn.functional.linear(x, w_hat, layer.bias) * c).sum().backward()
    p = float((w_hat.grad * weight.sign() * (w_hat != 0)).sum())
    s0 = float(s.detach())
    g_prime = torch.sigmoid(torch.tensor(s0)) * (1 - torch.sigmoid(torch.tensor(s0)))
    expected = s0 + lr * float(g_prime) * p - lr * wd * s0

    opt.zero_grad()
    (layer(x) * c).sum().backward()
    opt.step()
    assert float(s.detach()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("layer", "s_shape"),
    [(nn.ConvTranspose2d(4, 6, 3), (1, 6, 1, 1)), (Conv1D(6, 5), (1, 6))],
    ids=["conv_transpose", "conv1d_in_x_out"],
)
def test_str_channel_thresholds_follow_the_output_axis(layer: nn.Module, s_shape: tuple) -> None:
    handle = strsparse.sparsify(layer, "str", granularity="channel")
    (s,) = handle.threshold_parameters()
    assert tuple(s.shape) == s_shape
    with torch.no_grad():
        s.view(-1)[2] = 10.0  # threshold ~1 for output channel 2 only: that channel is zero
        nn.init.normal_(layer.bias, std=1.0)
    x = torch.randn(2, 4, 3, 3) if isinstance(layer, nn.ConvTranspose2d) else torch.randn(2, 5)
    out = layer(x)
    channel = out[:, 2]  # (B, H, W) or (B,)
    torch.testing.assert_close(channel, torch.full_like(channel, float(layer.bias.detach()[2])))
    assert (out[:, 3] != layer.bias.detach()[3]).any()


# -- one batched computation per forward against each layer computing its own ---------------
class _Net(nn.Module):
    """Conv, a Linear used twice in one forward, and input/output weights tied."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.embed = nn.Linear(8 * 4 * 4, 6, bias=False)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 8 * 4 * 4, bias=False)
        self.head = nn.Linear(8 * 4 * 4, 6, bias=False)
        self.head.weight = self.embed.weight  # tied: one layer with two users

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(torch.relu(self.conv(x)).flatten(1))
        h = self.mid(torch.relu(self.mid(h)))
        return self.head(self.out(h))


def _pair(granularity: str, **options: object) -> tuple[nn.Module, nn.Module]:
    """The same sparsified net twice: batched, and with each layer computing its own weight."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = _Net()
        handle = strsparse.sparsify(model, "str", granularity=granularity, **options)
        with torch.no_grad():  # a threshold that prunes part of each layer, g'(s) != 0
            for s in handle.threshold_parameters():
                s.fill_(-2.5)
        models.append(model)
    for layer in strsparse.sparse_layers(models[1]).values():
        get_parametrization(layer).release()
    return models[0], models[1]


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in model.named_parameters()}
    return out.detach(), grads


def _assert_same(a: tuple, b: tuple, exact: bool = True) -> None:
    """Equal outputs and gradients. Where one weight is used several times (``mid`` twice,
    the tied ``embed``/``head``), or ``s`` is shared, per-layer calls add several gradient
    contributions to ``s`` where the batch adds the uses first: ``s`` is then only close."""
    _equal(a[0], b[0]) if exact else torch.testing.assert_close(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        if a[1][name] is None or b[1][name] is None:
            assert a[1][name] is None and b[1][name] is None, name
        elif exact and not (name.endswith(".s") and not name.startswith(("conv", "out"))):
            _equal(a[1][name], b[1][name])
        else:
            torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-7)


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("granularity", ["layer", "channel", "weight", "global"])
def test_batched_weights_equal_per_layer_ones(granularity: str) -> None:
    batched, per_layer = _pair(granularity)
    x = torch.randn(4, 3, 6, 6)
    _assert_same(_step(batched, x), _step(per_layer, x), exact=granularity != "global")


def test_the_batch_is_one_autograd_node_and_the_fallback_one_per_layer() -> None:
    batched, per_layer = _pair("layer")
    x = torch.randn(2, 3, 6, 6)
    # mid runs twice: per layer it computes its weight twice
    for model, distinct in ((batched, 1), (per_layer, 5)):
        nodes: list = []
        hooks = [
            m.register_forward_pre_hook(lambda m, args, seen=nodes: seen.append(m.weight.grad_fn))
            for m in (model.conv, model.embed, model.mid, model.out)
        ]
        model(x)
        for hook in hooks:
            hook.remove()
        assert len({id(node) for node in nodes}) == distinct


def test_training_steps_match_and_the_cache_follows_the_updated_weights() -> None:
    batched, per_layer = _pair("channel")
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (batched, per_layer)
    ]
    for _ in range(3):
        x = torch.randn(4, 3, 6, 6)
        results = [_step(m, x) for m in (batched, per_layer)]
        _assert_same(*results)
        for opt in optimizers:
            opt.step()
    for a, b in zip(batched.parameters(), per_layer.parameters(), strict=True):
        _equal(a, b)


def _triple_mid(model: nn.Module, args: object) -> None:
    with torch.no_grad():
        model.mid.parametrizations.weight.original.mul_(3.0)


def test_a_weight_changed_during_the_forward_is_not_served_stale() -> None:
    batched, per_layer = _pair("layer")
    for model in (batched, per_layer):
        model.register_forward_pre_hook(_triple_mid)  # runs after the batch was computed
    x = torch.randn(2, 3, 6, 6)
    _assert_same(_step(batched, x), _step(per_layer, x))


def test_two_forwards_in_one_step_and_two_backwards() -> None:
    batched, per_layer = _pair("layer")
    x1, x2 = torch.randn(2, 3, 6, 6), torch.randn(3, 3, 6, 6)
    grads = []
    for model in (batched, per_layer):
        out1, out2 = model(x1), model(x2)
        out1.square().sum().backward()
        out2.sum().backward()  # each forward has its own graph
        grads.append((torch.zeros(()), {n: p.grad for n, p in model.named_parameters()}))
    _assert_same(*grads)


@pytest.mark.parametrize("mode", ["no_grad", "eval", "cached", "inference_mode"])
def test_batched_weights_outside_training(mode: str) -> None:
    batched, per_layer = _pair("weight")
    x = torch.randn(2, 3, 6, 6)
    outs = []
    for model in (batched, per_layer):
        if mode == "eval":
            model.eval()
            outs.append(model(x).detach())
        elif mode == "cached":
            with parametrize.cached():
                outs.append(model(x).detach())
                model(x).sum().backward()  # grads still reach raw weights and s
            assert model.conv.parametrizations.weight[0].s.grad is not None
        else:
            context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
            with context:
                out = model(x)
            assert not out.requires_grad
            outs.append(out)
    _equal(outs[0], outs[1])


def test_grad_enabled_inside_a_no_grad_forward() -> None:
    batched, per_layer = _pair("layer")

    class Wrapper(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                return self.net(x)

    # the batch hangs on the net: here it is computed under no_grad, then used with grad
    # enabled, where it must not be served
    wrapped = Wrapper(batched)
    with torch.no_grad():
        out = wrapped(torch.randn(2, 3, 6, 6))
    assert out.requires_grad


def test_nothing_outlives_the_forward() -> None:
    batched, _ = _pair("layer")
    seen = []
    batched.mid.register_forward_pre_hook(lambda m, args: seen.append(weakref.ref(m.weight)))
    out = batched(torch.randn(2, 3, 6, 6))
    out.sum().backward()
    del out
    gc.collect()
    assert seen and all(ref() is None for ref in seen)


def test_submodules_copies_and_finalize() -> None:
    batched, per_layer = _pair("layer")
    h = torch.randn(2, 6)
    _equal(batched.mid(h), per_layer.mid(h))  # called alone: the layer computes its own

    copy = deepcopy(batched)
    with torch.no_grad():
        copy.mid.parametrizations.weight.original.mul_(2.0)
    x = torch.randn(2, 3, 6, 6)
    _equal(batched(x), per_layer(x))  # the copy's batch reads the copy's weights only
    assert not torch.equal(copy(x), batched(x))

    keys = list(batched.state_dict())
    assert "conv.parametrizations.weight.original" in keys
    assert "conv.parametrizations.weight.0.s" in keys
    assert keys == list(per_layer.state_dict())
    expected = batched(x)
    strsparse.finalize(batched)
    assert not batched._forward_pre_hooks and not batched._forward_hooks
    _equal(batched(x), expected)


def test_channels_last_and_autocast() -> None:
    batched, per_layer = _pair("channel")
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    for model in (batched, per_layer):
        model.to(memory_format=torch.channels_last)
    _assert_same(_step(batched, x), _step(per_layer, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [m(x) for m in (batched, per_layer)]
    assert outs[0].dtype == torch.bfloat16
    _equal(outs[0], outs[1])


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    batched, _ = _pair("channel")
    compiled = torch.compile(deepcopy(batched), backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 6, 6)
    _assert_same(_step(compiled, x), _step(batched, x), exact=False)


@pytest.mark.parametrize("structure", ["weight", "filter"])
@pytest.mark.parametrize("granularity", ["layer", "channel", "global"])
def test_threshold_is_created_in_the_weights_dtype(granularity: str, structure: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)).double()
    handle = strsparse.sparsify(
        model, "str", granularity=granularity, structure=structure, init_threshold=-5.0
    )
    assert {p.dtype for p in model.parameters()} == {torch.float64}  # a gate's m too
    for s in handle.threshold_parameters():  # a structured gate's m decays with its s
        assert s.dtype == torch.float64
    for p in handle.parametrizations.values():
        assert float(p.s.detach().flatten()[0]) == -5.0
    out = model(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    assert out.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_threshold_is_created_on_the_weights_device() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).cuda()
    handle = strsparse.sparsify(model, "str", init_threshold=-5.0)
    assert all(s.is_cuda for s in handle.threshold_parameters())
    assert model(torch.randn(3, 8, device="cuda")).is_cuda


@pytest.mark.slow
def test_traced_and_exported_models_follow_s() -> None:
    batched, _ = _pair("layer")
    x = torch.randn(2, 3, 6, 6)
    traced = torch.jit.trace(batched, (x,))
    exported = torch.export.export(batched, (x,)).module()
    with torch.no_grad():  # s is an input of the recorded graphs, not a constant
        get_parametrization(batched.conv).s.fill_(-1.0)
    expected = batched(x)
    torch.testing.assert_close(traced(x), expected)
    torch.testing.assert_close(exported(x), expected)


def test_a_weight_changed_in_place_before_the_backward_is_an_error() -> None:
    batched, _ = _pair("layer")
    out = batched(torch.randn(2, 3, 6, 6))
    with torch.no_grad():
        batched.mid.parametrizations.weight.original.mul_(2.0)
    with pytest.raises(RuntimeError, match="in-place"):
        out.sum().backward()


def test_auto_init_threshold_starts_each_layer_from_its_weights() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.mul_(0.05)  # a pretrained layer of a much smaller scale
    fixed = deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InitThresholdWarning)
        handle = strsparse.sparsify(model, "str", init_threshold="auto")
    params = handle.parametrizations
    for layer in handle.layers.values():  # about 1% of each layer starts at zero
        assert 0.005 <= float((layer.weight == 0).float().mean()) <= 0.03
    assert params["0"].threshold() < params["1"].threshold() / 5  # follows each layer's scale
    with pytest.warns(InitThresholdWarning, match="init_threshold='auto'"):
        strsparse.sparsify(deepcopy(fixed), "str", init_threshold=-4.0)

    # a short fine-tune with weight decay: auto prunes more, the paper's -3200 stays dense
    dense = strsparse.sparsify(fixed, "str", init_threshold=-3200.0)
    x, y = torch.randn(32, 64), torch.randn(32, 8)
    for m in (model, fixed):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.01)
        for _ in range(30):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    before = 0.01
    assert strsparse.sparsity_report(model).sparsity > before
    assert strsparse.sparsity_report(fixed).sparsity == 0.0 and dense.layers


def test_auto_init_threshold_is_recomputed_from_pretrained_weights() -> None:
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))
    with torch.no_grad():
        pretrained[0].weight.mul_(0.1)
    loaded_first = deepcopy(pretrained)
    reference = strsparse.sparsify(loaded_first, "str", init_threshold="auto")
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3))
    handle = strsparse.sparsify(model, "str", init_threshold="auto")
    strsparse.load_pretrained(model, pretrained.state_dict(), handle=handle)
    for name, p in handle.parametrizations.items():
        torch.testing.assert_close(p.s, reference.parametrizations[name].s)


def test_auto_init_threshold_needs_unstructured_str() -> None:
    with pytest.raises(strsparse.errors.OptionError, match="init_threshold='auto'"):
        strsparse.sparsify(nn.Linear(4, 3), "str", structure="filter", init_threshold="auto")
    with pytest.raises(strsparse.errors.OptionError, match="or 'auto'"):
        strsparse.sparsify(nn.Linear(4, 3), "str", init_threshold="automatic")
