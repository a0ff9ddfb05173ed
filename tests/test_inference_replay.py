"""Replayed forward passes (``strsparse.inference.replay``): a network made only of native
calls is recorded once per input shape and then runs in one native call, with outputs equal
to the layer-by-layer pass; anything it cannot replay runs as before."""

from __future__ import annotations

import copy
import ctypes
import threading

import pytest
import torch
from torch import nn

from strsparse.inference import backend, layers, replay, to_sparse
from strsparse.inference.replay import _layout
from tests.test_inference import _Bottleneck, _prune

needs_native = pytest.mark.skipif(
    not backend().native, reason="the native kernels could not be built on this machine"
)


def _net(seed: int = 0, depthwise: bool = True) -> nn.Module:
    """A stem, max pooling, bottlenecks with a downsample branch, a depthwise conv, global
    pooling and a Linear layer: every kind of native call a replay makes."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        _Bottleneck(16, 8, 32, 1),
        _Bottleneck(32, 16, 64, 2),
    ]
    if depthwise:
        layers += [nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU6()]
    return _prune(_Classifier(nn.Sequential(*layers), nn.Linear(64, 10)), 0.8, seed)


class _Classifier(nn.Module):
    def __init__(self, features: nn.Module, fc: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.fc = fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.fc(torch.flatten(pooled, 1))


def _eager(sparse: nn.Module, x: torch.Tensor) -> torch.Tensor:
    saved = sparse.replay
    sparse.replay = False
    try:
        with torch.inference_mode():
            return sparse(x)
    finally:
        sparse.replay = saved


def _calls(module: nn.Module) -> list[int]:
    """A list that grows by one at each call of ``module`` (its ``forward`` wrapped: a hook
    would turn replay off)."""
    seen: list[int] = []
    forward = module.forward

    def counted(*args: object) -> object:
        seen.append(1)
        return forward(*args)

    module.forward = counted  # type: ignore[method-assign]
    return seen


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
def test_a_native_forward_pass_is_replayed_with_the_same_outputs(batch: int) -> None:
    sparse = to_sparse(_net(), max_density=1.0)
    x = torch.randn(batch, 3, 40, 36)
    expected = _eager(sparse, x)
    stem = _calls(sparse.net.get_submodule("features.0"))
    with torch.inference_mode():
        first, second = sparse(x), sparse(x)  # fills the caches, then records
        assert sparse._replay_net.plan_for(x.shape) is True
        assert len(stem) == 2
        replayed = [sparse(x) for _ in range(3)]
        other = torch.randn_like(x)
        assert torch.equal(sparse(other), _eager(sparse, other))
    assert len(stem) == 3  # the replays called no module; only the eager check above did
    for out in (first, second, *replayed):
        assert torch.equal(out, expected)
    assert replayed[0].data_ptr() != replayed[1].data_ptr()  # the caller owns each output


@needs_native
def test_a_wide_linear_layer_in_runs_is_replayed() -> None:
    model = _prune(nn.Sequential(nn.Linear(2100, 64), nn.ReLU(), nn.Linear(64, 5)), 0.6)
    sparse = to_sparse(model, max_density=1.0)
    assert sparse.net.get_submodule("0")._in_runs
    x = torch.randn(3, 2100)
    with torch.inference_mode():
        sparse(x), sparse(x)  # fills the caches, then records
        assert sparse._replay_net.plan_for(x.shape) is True
        torch.testing.assert_close(sparse(x), _eager(sparse, x), rtol=0, atol=0)
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-4, atol=1e-4)


@needs_native
def test_convs_reading_unpadded_inputs_are_replayed(monkeypatch) -> None:
    """3x3 convs on the network's input and after max pooling read them unpadded (the shifted
    product, with AVX-512): recorded and replayed like every other call."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )
    monkeypatch.setattr(layers, "SHIFTED_MAX_DENSITY", 1.0)
    sparse = to_sparse(_prune(model, 0.6), max_density=1.0)
    x = torch.randn(2, 3, 17, 15)
    expected = _eager(sparse, x)
    with torch.inference_mode():
        first, second = sparse(x), sparse(x)
        assert sparse._replay_net.plan_for(x.shape) is True
        replayed = sparse(x)
    for out in (first, second, replayed):
        assert torch.equal(out, expected)
    if backend().isa == "avx512":
        assert ("shifted", 2, 8, 7) in sparse.net.get_submodule("3")._offsets


@needs_native
def test_the_longest_run_of_native_layers_is_replayed_and_the_ops_around_it_run() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 8, 1)
            self.conv3 = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.sigmoid(self.conv2(self.conv1(x)) * 2.0)  # ops no kernel fuses
            return torch.softmax(self.conv3(y).flatten(1), dim=1)

    model = _prune(Gated(), 0.8)
    sparse = to_sparse(model, max_density=1.0)
    x = torch.randn(2, 3, 12, 12)
    expected = _eager(sparse, x)
    conv1, conv3 = (_calls(sparse.net.get_submodule(n)) for n in ("conv1", "conv3"))
    with torch.inference_mode():
        outs = [sparse(x) for _ in range(4)]
        torch.testing.assert_close(outs[0], model(x), rtol=1e-4, atol=1e-5)
    assert sparse._replay_net.plan_for(x.shape) is True  # conv1 and conv2
    assert len(conv1) == 2  # until recorded
    assert len(conv3) == 4  # after the sigmoid: layer by layer
    for out in outs:
        assert torch.equal(out, expected)


@needs_native
def test_a_network_without_native_layers_runs_layer_by_layer() -> None:
    model = _prune(_Classifier(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Linear(8, 4)), 0.5)
    sparse = to_sparse(model, max_density=0.0)  # every layer kept dense
    x = torch.randn(1, 3, 9, 9)
    with torch.inference_mode():
        outs = [sparse(x) for _ in range(3)]
        expected = model(x)
    assert sparse._replay_net.plan_for(x.shape) is False
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("batch", [1, 2])
def test_what_follows_the_last_pytorch_op_is_replayed(batch: int) -> None:
    class Stem(nn.Module):  # a first conv kept dense, then an op no kernel fuses
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 5, padding=2)
            self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
            self.conv3 = nn.Conv2d(24, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.sigmoid(self.conv1(x))
            return self.conv3(torch.relu(self.conv2(y)))

    model = _prune(Stem(), 0.8)
    sparse = to_sparse(model, max_density={"stem": 0.01, "conv": 1.0, "pointwise": 1.0})
    assert sparse.sparse_plan == {"conv1": "dense", "conv2": "sparse", "conv3": "sparse"}
    x = torch.randn(batch, 3, 12, 10)
    expected = _eager(sparse, x)
    conv1 = _calls(sparse.net.get_submodule("conv1"))
    conv2 = _calls(sparse.net.get_submodule("conv2"))
    with torch.inference_mode():
        outs = [sparse(x) for _ in range(4)]
    assert sparse._replay_net.plan_for((batch, 16, 12, 10)) is True  # the sigmoid's output
    assert len(conv1) == 4  # the part before runs every time
    assert len(conv2) == 2  # the rest only until it is recorded
    for out in outs:
        assert torch.equal(out, expected)


@needs_native
def test_new_weights_drop_the_recorded_plans() -> None:
    sparse, other = to_sparse(_net(0)), to_sparse(_net(1))
    x = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        for _ in range(3):
            sparse(x)
        assert sparse._replay_net.plan_for(x.shape) is True
        sparse.load_state_dict(other.state_dict())
        expected = _eager(other, x)
        for _ in range(4):  # eager, recorded, replayed, replayed
            assert torch.equal(sparse(x), expected)
    assert sparse._replay_net.plan_for(x.shape) is True
    with torch.inference_mode():
        fc = sparse.net.get_submodule("fc")
        fc.bias = fc.bias + 1.0  # a tensor replaced, not changed in place
        torch.testing.assert_close(sparse(x), expected + 1.0, rtol=0, atol=1e-6)
        conv = sparse.net.get_submodule("features.5.conv3")
        conv.bias = conv.bias + 1.0
        moved = sparse(x)
        assert not torch.allclose(moved, expected + 1.0)
        for _ in range(3):  # eager, recorded, replayed: all with the new bias
            assert torch.equal(sparse(x), moved)
    other.net.get_submodule("fc").bias = other.net.get_submodule("fc").bias + 1.0
    other.net.get_submodule("features.5.conv3").bias = conv.bias
    torch.testing.assert_close(moved, _eager(other, x), rtol=0, atol=1e-6)


@needs_native
def test_slices_on_two_threads_replay_their_passes() -> None:
    sparse = to_sparse(_net(depthwise=False), max_density=1.0)
    assert sparse.per_sample and sparse._split is not None
    x = torch.randn(4, 3, 160, 160)  # 76,800 values a sample: slices of one sample
    expected = _eager(sparse, x)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            outs = [sparse(x) for _ in range(3)]
    finally:
        torch.set_num_threads(saved)
    # each slice's thread runs one-thread kernels: its plans are those of one thread
    assert sparse._replay_head.plan_for((1, 3, 160, 160), threads=1) is True
    for out in outs:
        assert torch.equal(out, expected)


@needs_native
def test_two_python_threads_replay_the_same_plan_at_once() -> None:
    sparse = to_sparse(_net(), max_density=1.0)
    inputs = [torch.randn(1, 3, 40, 36) for _ in range(6)]
    expected = [_eager(sparse, x) for x in inputs]
    with torch.inference_mode():
        for _ in range(2):
            sparse(inputs[0])
    errors: list[str] = []

    def run(offset: int) -> None:
        with torch.inference_mode():
            for i in range(30):
                k = (i + offset) % len(inputs)
                if not torch.equal(sparse(inputs[k]), expected[k]):
                    errors.append(f"input {k}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@needs_native
def test_a_replaying_model_copies_and_turns_replay_off() -> None:
    sparse = to_sparse(_net(), max_density=1.0)
    x = torch.randn(1, 3, 40, 36)
    with torch.inference_mode():
        for _ in range(3):
            sparse(x)
        expected = _eager(sparse, x)
        clone = copy.deepcopy(sparse)
        assert clone._replay_net.plan_for(x.shape) is None  # plans are not copied
        for _ in range(3):
            assert torch.equal(clone(x), expected)
    sparse.replay = False
    assert not sparse.replay
    stem = _calls(sparse.net.get_submodule("features.0"))
    with torch.inference_mode():
        sparse(x)
    assert len(stem) == 1


def test_the_arena_reuses_memory_only_between_buffers_that_never_meet() -> None:
    # start -> (size in bytes, first call, last call)
    spans = {
        100: (1000, 0, 1),
        200: (640, 1, 3),
        300: (1000, 2, 4),
        400: (64, 4, 6),
        500: (3000, 5, 6),
        600: (1, 0, 6),
    }
    offsets, size = _layout(spans)
    for a, (size_a, first_a, last_a) in spans.items():
        assert offsets[a] % 64 == 0
        assert offsets[a] + size_a <= size
        for b, (size_b, first_b, last_b) in spans.items():
            if a < b and first_a <= last_b and first_b <= last_a:  # alive at the same time
                apart = offsets[a] + size_a <= offsets[b] or offsets[b] + size_b <= offsets[a]
                assert apart, (a, b)
    assert size < sum(s for s, _, _ in spans.values())  # some bytes serve two buffers


@needs_native
def test_the_kernels_refuse_a_malformed_plan() -> None:
    lib = backend()._lib
    for words in ([999, 0], [1, 40], [4, 2, 0, 0, 0, 0], [4]):
        plan = (ctypes.c_int64 * len(words))(*words)
        assert lib.ss_run_plan(plan, len(words), None, None) == -1


@needs_native
def test_a_forward_hook_sees_every_call() -> None:
    sparse = to_sparse(_net(), max_density=1.0)
    x = torch.randn(1, 3, 40, 36)
    expected = _eager(sparse, x)
    with torch.inference_mode():
        for _ in range(3):
            sparse(x)  # replayed from the third call on
        seen: list[tuple[int, ...]] = []
        handle = sparse.net.get_submodule("fc").register_forward_hook(
            lambda m, args, out: seen.append(tuple(out.shape))
        )
        outs = [sparse(x) for _ in range(3)]
        assert seen == [(1, 10)] * 3  # a hook turns replay off: it sees every call
        handle.remove()
        calls = _calls(sparse.net.get_submodule("fc"))
        outs.append(sparse(x))
        assert calls == []  # replayed again once the hook is gone
        with nn.modules.module.register_module_forward_hook(lambda m, a, o: None):
            outs.append(sparse(x))  # a global hook too
        assert calls == [1]
    for out in outs:
        assert torch.equal(out, expected)


@needs_native
def test_a_classifier_kept_dense_runs_after_the_replayed_features() -> None:
    limits = {"linear": 0.0, "pointwise": 1.0, "conv": 1.0, "depthwise": 1.0, "stem": 1.0}
    sparse = to_sparse(_net(), max_density=limits)
    assert sparse.sparse_plan["fc"] == "dense"
    x = torch.randn(1, 3, 40, 36)
    expected = _eager(sparse, x)
    stem, fc = (_calls(sparse.net.get_submodule(n)) for n in ("features.0", "fc"))
    with torch.inference_mode():
        outs = [sparse(x) for _ in range(4)]
    assert len(stem) == 2 and len(fc) == 4
    for out in outs:
        assert torch.equal(out, expected)


@needs_native
def test_a_large_input_runs_layer_by_layer(monkeypatch) -> None:
    monkeypatch.setattr(replay, "_MAX_VALUES", 3 * 40 * 36)  # one sample, not two
    sparse = to_sparse(_net(), max_density=1.0)
    small, large = torch.randn(1, 3, 40, 36), torch.randn(2, 3, 40, 36)
    with torch.inference_mode():
        for _ in range(3):
            assert torch.equal(sparse(large), _eager(sparse, large))
            sparse(small)
    assert sparse._replay_net.plan_for(large.shape) is None  # never recorded
    assert sparse._replay_net.plan_for(small.shape) is True
