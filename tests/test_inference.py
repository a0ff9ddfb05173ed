"""Sparse inference: to_sparse's outputs equal the dense model's, the per-layer rule, save/load,
the native kernels' instruction sets and the fallbacks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import strsparse
from strsparse.inference import (
    DEFAULT_MAX_DENSITY,
    _native,
    backend,
    layers,
    load_sparse,
    save_sparse,
    set_isa,
    to_sparse,
)
from strsparse.inference.layers import (
    PlanarActivation,
    SparseConv2d,
    SparseLinear,
    global_avg_pool2d,
    plane_geometry,
)

TOL = 1e-4

needs_native = pytest.mark.skipif(
    not backend().native, reason="the native kernels could not be built on this machine"
)


def _prune(model: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics; every layer magnitude-pruned to ``sparsity``."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    strsparse.sparsify(model, "magnitude", sparsity=sparsity)
    return strsparse.finalize(model).eval()


def _check_close(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        expected = dense(x)
        got = sparse(x)
    assert got.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOL * scale


CONVS = {
    "1x1": dict(in_channels=16, out_channels=24, kernel_size=1),
    "1x1-stride2": dict(in_channels=16, out_channels=24, kernel_size=1, stride=2),
    "3x3": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1),
    "3x3-stride2": dict(in_channels=16, out_channels=24, kernel_size=3, stride=2, padding=1),
    "5x5-nopad-bias": dict(in_channels=8, out_channels=12, kernel_size=5, bias=True),
    "7x7-stride2": dict(in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3),
    "grouped": dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, groups=4),
    "depthwise": dict(in_channels=16, out_channels=16, kernel_size=3, padding=1, groups=16),
    "depthwise-stride2": dict(
        in_channels=16, out_channels=16, kernel_size=3, stride=2, padding=1, groups=16
    ),
    "dilated": dict(in_channels=16, out_channels=24, kernel_size=3, padding=2, dilation=2),
    "rect-kernel": dict(in_channels=8, out_channels=8, kernel_size=(1, 3), padding=(0, 1)),
}


@needs_native
@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("batch", [1, 3])
def test_conv_bn_relu_matches_dense(name: str, batch: int) -> None:
    opts = dict(CONVS[name])
    opts.setdefault("bias", False)
    out_channels = opts["out_channels"]
    model = _prune(nn.Sequential(nn.Conv2d(**opts), nn.BatchNorm2d(out_channels), nn.ReLU()), 0.7)
    sparse = to_sparse(model, max_density=1.0)
    assert sparse.sparse_plan == {"0": "sparse"}
    layer = sparse.net.get_submodule("0")
    assert isinstance(layer, SparseConv2d) and layer.clamp == (0.0, math.inf)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())  # folded
    _check_close(model, sparse, torch.randn(batch, opts["in_channels"], 13, 11))


@needs_native
@pytest.mark.parametrize("shape", [(1, 50), (8, 50), (2, 3, 50)])
def test_linear_matches_dense(shape: tuple[int, ...]) -> None:
    model = _prune(nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 7)), 0.8)
    sparse = to_sparse(model, max_density=1.0)
    assert isinstance(sparse.net.get_submodule("0"), SparseLinear)
    assert sparse.net.get_submodule("0").clamp == (0.0, math.inf)
    _check_close(model, sparse, torch.randn(*shape))


@needs_native
@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("resnet20", {"shortcut": "B"}, 32),
        ("resnet20", {}, 32),
        ("resnet18", {}, 40),
        ("mobilenet_v1", {"width_multiplier": 0.25}, 64),
        ("lenet5", {}, 28),
    ],
)
def test_model_matches_dense(name: str, kwargs: dict, size: int) -> None:
    in_channels = 1 if name == "lenet5" else 3
    model = _prune(strsparse.create_model(name, in_channels=in_channels, **kwargs), 0.85)
    sparse = to_sparse(model, max_density=1.0)
    assert "sparse" in sparse.sparse_plan.values()
    _check_close(model, sparse, torch.randn(2, in_channels, size, size))


@needs_native
def test_resnet_downsample_and_residual_are_fused() -> None:
    model = _prune(strsparse.create_model("resnet18"), 0.9)
    sparse = to_sparse(model)
    # the second conv of a block takes the shortcut as its residual; the graph holds no BN
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())
    conv2 = sparse.net.get_submodule("layer2.0.conv2")
    assert conv2.clamp == (0.0, math.inf)
    calls = [
        n for n in sparse.net.graph.nodes if n.op == "call_module" and n.target == "layer2.0.conv2"
    ]
    assert len(calls) == 1 and len(calls[0].args) == 2  # input and fused residual
    _check_close(model, sparse, torch.randn(1, 3, 48, 48))


def _on_one_and_three_threads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``model(x)`` on one thread, then on three (torch's setting restored after)."""
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            with torch.inference_mode():
                outputs.append(model(x))
    finally:
        torch.set_num_threads(threads)
    return tuple(outputs)


@needs_native
@pytest.mark.parametrize("sparsity", [0.9, 0.98])
def test_threads_give_the_same_outputs(sparsity: float) -> None:
    """At 98% the blocks' first convs read their unpadded inputs (the shifted product)."""
    model = _prune(strsparse.create_model("resnet20", shortcut="B"), sparsity)
    sparse = to_sparse(model)
    x = torch.randn(4, 3, 32, 32)
    one, three = _on_one_and_three_threads(sparse, x)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-6)
    shifted = [
        name
        for name, m in sparse.net.named_modules()
        if isinstance(m, SparseConv2d)
        and any(key[0] == "shifted" and value is not None for key, value in m._offsets.items())
    ]
    assert bool(shifted) is (sparsity == 0.98 and backend().isa == "avx512")


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_every_instruction_set_matches_dense(isa: str) -> None:
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        model = _prune(
            nn.Sequential(nn.Conv2d(8, 20, 3, padding=1), nn.ReLU(), nn.Conv2d(20, 9, 1)), 0.6
        )
        sparse = to_sparse(model, max_density=1.0)
        # 37x29 pixels: full tiles and masked tails of every length
        _check_close(model, sparse, torch.randn(2, 8, 37, 29))
    finally:
        set_isa("auto")


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_a_wide_linear_layer_computed_in_runs_matches_dense(isa: str) -> None:
    """More than 1024 inputs: each tile is computed run by run over the inputs, the runs after
    the first adding to what the earlier left; bias and clamp once, at the end."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        model = _prune(nn.Sequential(nn.Linear(2500, 40), nn.ReLU(), nn.Linear(40, 3)), 0.7)
        sparse = to_sparse(model, max_density=1.0)
        wide = sparse.net.get_submodule("0")
        assert isinstance(wide, SparseLinear) and wide._in_runs
        # 129 tokens: a whole tile and a one-token tail; then one token, which takes no runs
        for tokens in (129, 7, 1):
            for threads in (1, 2):
                with _threads(threads):
                    _check_close(model, sparse, torch.randn(tokens, 2500))
        assert not SparseLinear(2500, 4, _prune(nn.Linear(2500, 4), 0.99).weight, None)._in_runs
    finally:
        set_isa("auto")


class _PointwiseResidual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.first = nn.Conv2d(channels, channels, 1)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x))
        return torch.relu(self.bn(self.conv(x)) + x)  # the add fused into conv


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_one_pixel_products_match_dense(isa: str) -> None:
    """One sample through a Linear layer, or a 1x1 image through a pointwise conv with a
    fused residual: the kernels gather a row's inputs; rows of 0 to 80 nonzeros cover full
    and partial vectors."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        torch.manual_seed(0)
        linear = nn.Linear(80, 33)
        with torch.no_grad():
            keep = torch.arange(80) < torch.randint(0, 81, (33, 1))  # row i: its first k_i
            linear.weight.mul_(keep[:, torch.randperm(80)])
        model = nn.Sequential(linear, nn.ReLU()).eval()
        sparse = to_sparse(model, max_density=1.0)
        assert sparse.sparse_plan == {"0": "sparse"}
        for batch in (1, 3):
            _check_close(model, sparse, torch.randn(batch, 80))
        conv = _prune(_PointwiseResidual(40), 0.6)
        sparse_conv = to_sparse(conv, max_density=1.0)
        assert sparse_conv.sparse_plan == {"first": "sparse", "conv": "sparse"}
        calls = [n for n in sparse_conv.net.graph.nodes if n.target == "conv"]
        assert len(calls[0].args) == 2  # input and fused residual
        _check_close(conv, sparse_conv, torch.randn(1, 40, 1, 1))
    finally:
        set_isa("auto")


DEPTHWISE = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-stride2": dict(kernel_size=3, stride=2, padding=1),
    "3x3-stride2-nopad": dict(kernel_size=3, stride=2),
    "5x5-stride2-pad2": dict(kernel_size=5, stride=2, padding=2),
    "3x3-nopad": dict(kernel_size=3),
    "3x3-pad3": dict(kernel_size=3, padding=3),
    "3x3-dilated": dict(kernel_size=3, padding=2, dilation=2),
    "5x5-stride2-dilated": dict(kernel_size=5, stride=2, padding=3, dilation=2),
    "3x5-stride3": dict(kernel_size=(3, 5), stride=3, padding=(0, 2)),
}


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("name", list(DEPTHWISE))
def test_native_depthwise_matches_dense(name: str, isa: str, monkeypatch) -> None:
    """The depthwise kernel (its own path: no parity planes of the whole input) on every
    instruction set, over small planes (computed as one shifted window) and wide ones (row by
    row), odd sizes and batches."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        conv = nn.Conv2d(12, 12, groups=12, bias=True, **DEPTHWISE[name])
        model = _prune(nn.Sequential(conv, nn.BatchNorm2d(12), nn.ReLU6()), 0.5)
        sparse = to_sparse(model, max_density=1.0)
        assert sparse.net.get_submodule("0").clamp == (0.0, 6.0)

        def no_planes(*args: object) -> None:
            raise AssertionError("the depthwise conv went through the generic path")

        monkeypatch.setattr(_native.Backend, "pad_planes", no_planes)
        for shape in [(1, 12, 7, 7), (3, 12, 9, 14), (2, 12, 41, 67)]:
            _check_close(model, sparse, torch.randn(*shape))
    finally:
        set_isa("auto")


PLANAR = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-stride2": dict(kernel_size=3, stride=2, padding=1),
    "3x3-stride2-nopad": dict(kernel_size=3, stride=2),
    "5x5-pad2": dict(kernel_size=5, padding=2),
    "3x3-dilated": dict(kernel_size=3, padding=2, dilation=2),
    "7x7-stride2-pad3": dict(kernel_size=7, stride=2, padding=3),
    "3x5-stride3": dict(kernel_size=(3, 5), stride=3, padding=(0, 2)),
}


def _planar_chain(opts: dict, first: int) -> nn.Module:
    """A conv (``first`` x ``first``) -> BN -> ReLU feeding a k x k conv (``opts``) -> BN ->
    ReLU -> 1x1 conv: the first conv writes the k x k conv's padded planes."""
    pad = first // 2
    return nn.Sequential(
        nn.Conv2d(6, 10, first, padding=pad, bias=False),
        nn.BatchNorm2d(10),
        nn.ReLU(),
        nn.Conv2d(10, 14, bias=False, **opts),
        nn.BatchNorm2d(14),
        nn.ReLU(),
        nn.Conv2d(14, 5, 1),
    )


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("first", [1, 3])
@pytest.mark.parametrize("name", list(PLANAR))
def test_outputs_written_into_the_next_convs_planes_match_dense(
    name: str, first: int, isa: str
) -> None:
    """A conv whose output only feeds a k x k conv writes it into that conv's padded parity
    planes, and a k x k conv's epilogue drops its junk columns; both on every instruction
    set, for strides, paddings, dilations, odd sizes and batches."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        model = _prune(_planar_chain(PLANAR[name], first), 0.6)
        sparse = to_sparse(model, max_density=1.0)
        producer, consumer = sparse.net.get_submodule("0"), sparse.net.get_submodule("3")
        assert producer.output_planes == (consumer.padding, consumer.stride)
        assert consumer.output_planes is None  # read by a 1x1 conv: compact
        for shape in [(1, 6, 9, 9), (3, 6, 13, 11), (2, 6, 37, 29)]:
            _check_close(model, sparse, torch.randn(*shape))
    finally:
        set_isa("auto")


@needs_native
def test_planar_fallbacks_match_dense(monkeypatch) -> None:
    """Without the native output map (the numba path) the producer pads its output itself,
    and a consumer that cannot read planes unpacks them."""
    model = _prune(_planar_chain(PLANAR["3x3-stride2"], 1), 0.6)
    sparse = to_sparse(model, max_density=1.0)
    x = torch.randn(2, 6, 11, 10)
    monkeypatch.setattr(_native.Backend, "native", property(lambda self: False))
    _check_close(model, sparse, x)
    monkeypatch.undo()
    consumer = sparse.net.get_submodule("3")
    consumer.stride = 1  # no longer what the planes were made for: they are unpacked
    consumer._offsets.clear()
    consumer._steps.clear()
    dense = nn.Conv2d(10, 14, 3, padding=1, bias=True)
    dense.weight.data.copy_(consumer.dense_weight())
    dense.bias.data.copy_(consumer.bias)
    producer = sparse.net.get_submodule("0")
    with torch.inference_mode():
        planar = producer(x.transpose(0, 1).contiguous())
        assert isinstance(planar, PlanarActivation)
        got = consumer(planar)
        expected = dense(planar.unpack().transpose(0, 1)).clamp(min=0).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


SHIFTED = {
    "3x3": dict(kernel_size=3, padding=1),
    "5x5": dict(kernel_size=5, padding=2),
    "dilated": dict(kernel_size=3, padding=2, dilation=2),
    "grouped": dict(kernel_size=3, padding=1, groups=2),
    "rect-kernel": dict(kernel_size=(1, 3), padding=(0, 1)),
}


class _ShiftedResidual(nn.Module):
    """A 1x1 conv whose output feeds both a k x k conv and that conv's residual add: the k x k
    conv reads an unpadded input and fuses the add."""

    def __init__(self, opts: dict) -> None:
        super().__init__()
        self.first = nn.Conv2d(6, 10, 1)
        self.conv = nn.Conv2d(10, 10, bias=False, **opts)
        self.bn = nn.BatchNorm2d(10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.first(x))
        return torch.relu(self.bn(self.conv(x)) + x)


def _no_padding(*args: object, **kwargs: object) -> None:
    raise AssertionError("the input was padded")


@needs_native
@pytest.mark.parametrize("name", list(SHIFTED))
def test_a_stride_one_conv_reads_an_unpadded_input_as_it_is(name: str, monkeypatch) -> None:
    """A stride-1 conv whose output has its input's size reads an unpadded input with masked
    loads (AVX-512) instead of padding a copy: outputs equal the dense conv's at the image's
    borders, between the images of a batch and in partial tiles; written compact, into the
    next conv's planes, or with the residual add fused."""
    if backend().isa != "avx512":
        pytest.skip("the shifted product runs with AVX-512 only")
    monkeypatch.setattr(layers, "SHIFTED_MAX_DENSITY", 1.0)  # every tap in use
    opts = SHIFTED[name]
    chain = _prune(
        nn.Sequential(
            nn.Conv2d(6, 10, bias=False, **opts),
            nn.BatchNorm2d(10),
            nn.ReLU(),
            nn.Conv2d(10, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 5, 1),
        ),
        0.6,
    )
    residual = _prune(_ShiftedResidual(opts), 0.6)
    sparse_chain = to_sparse(chain, max_density=1.0)
    sparse_residual = to_sparse(residual, max_density=1.0)
    first = sparse_chain.net.get_submodule("0")
    assert first.output_planes == ((1, 1), 1)  # written into the next conv's planes
    monkeypatch.setattr(_native.Backend, "pad_planes", _no_padding)
    for n, h, w in [(1, 1, 2), (1, 9, 9), (3, 13, 11), (2, 37, 29)]:
        _check_close(chain, sparse_chain, torch.randn(n, 6, h, w))
        _check_close(residual, sparse_residual, torch.randn(n, 6, h, w))
        for layer in (first, sparse_residual.net.get_submodule("conv")):
            assert ("shifted", n, h, w) in layer._offsets


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_the_shifted_product_matches_conv2d_on_every_instruction_set(isa: str) -> None:
    """The native shifted product itself: AVX-512 masks its loads, the other instruction sets
    check each pixel (what runs there only where a recorded pass is replayed)."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        torch.manual_seed(0)
        weight = torch.randn(7, 5, 3, 3) * (torch.rand(7, 5, 3, 3) < 0.4)
        bias = torch.randn(7)
        layer = SparseConv2d(5, 7, (3, 3), 1, (2, 2), (2, 2), 1, weight, bias)
        for n, h, w in [(1, 1, 1), (5, 2, 3), (2, 7, 5), (3, 21, 17), (2, 3, 40)]:
            x = torch.randn(n, 5, h, w)
            residual = torch.randn(7, n, h, w)
            offsets, taps, shifts = layer._shifted_geometry(n, h, w)
            out = torch.empty(7, n, h, w)
            count = n * h * w
            backend().spmm(
                x.transpose(0, 1).contiguous(), out, layer.values, offsets, layer.row_ptr,
                layer.bias, residual, count, count, count, 0.0, math.inf,
                shifted=(taps, shifts, h, w),
            )  # fmt: skip
            expected = F.conv2d(x, weight, bias, padding=2, dilation=2).transpose(0, 1)
            torch.testing.assert_close(out, (expected + residual).clamp(min=0))
    finally:
        set_isa("auto")


@needs_native
def test_only_very_sparse_convs_read_unpadded_inputs() -> None:
    """Where the loads' masks cost more than padding saves (denser layers), the input is
    padded."""
    dense = _prune(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()), 0.6)
    sparse = _prune(nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()), 0.99)
    x = torch.randn(1, 16, 10, 10)
    for model, shifted in [(dense, False), (sparse, backend().isa == "avx512")]:
        converted = to_sparse(model, max_density=1.0)
        _check_close(model, converted, x)
        layer = converted.net.get_submodule("0")
        assert (layer._offsets.get(("shifted", 1, 10, 10)) is not None) is shifted


@needs_native
def test_a_kernel_with_too_many_taps_is_padded_instead(monkeypatch) -> None:
    monkeypatch.setattr(layers, "SHIFTED_MAX_DENSITY", 1.0)
    model = _prune(nn.Sequential(nn.Conv2d(4, 6, 9, padding=4), nn.ReLU()), 0.6)
    sparse = to_sparse(model, max_density=1.0)
    _check_close(model, sparse, torch.randn(2, 4, 12, 10))
    layer = sparse.net.get_submodule("0")
    assert layer._shifted_geometry(2, 12, 10) is None  # 81 taps
    assert all(key[0] != "shifted" or value is None for key, value in layer._offsets.items())
    x, out = torch.randn(4), torch.zeros(4)
    values, offsets = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    row_ptr = torch.tensor([0, 1], dtype=torch.int32)
    shifts = torch.zeros(81, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="81 taps"):
        backend().spmm(
            x, out, values, offsets, row_ptr, None, None, 4, 4, 4, -math.inf, math.inf,
            shifted=(offsets, shifts, 2, 2),
        )  # fmt: skip


@needs_native
def test_an_output_map_the_kernel_cannot_handle_is_refused() -> None:
    x, out = torch.randn(4), torch.zeros(64)
    values, offsets = torch.ones(1), torch.zeros(1, dtype=torch.int32)
    row_ptr = torch.tensor([0, 1], dtype=torch.int32)
    # src 1 x 4, valid 1 x 4, stride 5 (at most 4 is mapped), no padding, planes of 1 x 4
    bad = torch.tensor([1, 4, 1, 4, 5, 0, 0, 1, 4, 4], dtype=torch.int64)
    with pytest.raises(ValueError, match="output map"):
        backend().spmm(x, out, values, offsets, row_ptr, None, None, 4, 16, 4, 0.0, 1.0, bad)
    assert not out.any()


def test_planar_activation_unpacks_to_the_activation() -> None:
    x = torch.randn(3, 2, 7, 6)
    for stride, pad in [(1, (1, 1)), (2, (1, 1)), (2, (3, 0)), (3, (2, 1))]:
        hq, wq, _, ch_stride = plane_geometry(2, 7, 6, pad, stride)
        data = _native.Backend("numba").pad_planes(x, pad, stride, hq, wq, ch_stride)
        torch.testing.assert_close(PlanarActivation(data, (3, 2, 7, 6), pad, stride).unpack(), x)


class _Bottleneck(nn.Module):
    """ResNet-50's block: 1x1, 3x3 (strided), 1x1, with a downsample branch."""

    def __init__(self, c_in: int, width: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + shortcut)


@needs_native
@pytest.mark.parametrize("batch", [1, 3])
def test_bottleneck_resnet_with_downsample_matches_dense(batch: int) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        _Bottleneck(16, 8, 32, 1),
        _Bottleneck(32, 16, 64, 2),
        _Bottleneck(64, 16, 64, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    model = _prune(model, 0.8)
    sparse = to_sparse(model, max_density=1.0)
    planar = [
        name
        for name, m in sparse.net.named_modules()
        if isinstance(m, SparseConv2d) and m.output_planes is not None
    ]
    assert planar == ["4.conv1", "5.conv1", "6.conv1"]
    assert sparse.net.get_submodule("5.conv1").output_planes == ((1, 1), 2)
    _check_close(model, sparse, torch.randn(batch, 3, 45, 38))


@needs_native
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_on_several_threads(stride: int) -> None:
    """Planes split over threads (each with its own padded buffer) give the one-thread output."""
    conv = nn.Conv2d(48, 48, 3, stride=stride, padding=1, groups=48)
    model = _prune(nn.Sequential(conv, nn.BatchNorm2d(48), nn.ReLU()), 0.5)
    sparse = to_sparse(model, max_density=1.0)
    x = torch.randn(2, 48, 61, 64)  # enough values for the kernel to use the threads
    one, three = _on_one_and_three_threads(sparse, x)
    torch.testing.assert_close(one, three, rtol=0, atol=0)
    _check_close(model, sparse, x)


def test_per_layer_rule_keeps_dense_layers_dense() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    model.eval()
    with torch.no_grad():  # the conv 0% sparse, the linear layer 95% sparse
        w = model[3].weight
        w[torch.rand_like(w) < 0.95] = 0.0
    sparse = to_sparse(model)
    assert sparse.sparse_plan["0"] == "dense"
    assert sparse.net.get_submodule("0").mode == "dense"
    assert sparse.sparse_plan["3"] == ("sparse" if backend().available else "dense")
    _check_close(model, sparse, torch.randn(2, 4, 8, 8))
    all_dense = to_sparse(model, max_density=0.0)
    assert set(all_dense.sparse_plan.values()) == {"dense"}
    _check_close(model, all_dense, torch.randn(2, 4, 8, 8))


@needs_native
def test_stem_convs_have_their_own_density_limit() -> None:
    """A large kernel on an image's few channels runs sparse up to the "stem" limit, which
    is looser than other k x k convs'."""
    torch.manual_seed(0)
    stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)
    rgb_3x3 = nn.Conv2d(8, 8, 3, padding=1)
    model = _prune(nn.Sequential(stem, nn.ReLU(), rgb_3x3), 0.7)  # density 0.3 each
    assert DEFAULT_MAX_DENSITY["conv"] < 0.3 < DEFAULT_MAX_DENSITY["stem"]
    sparse = to_sparse(model)
    assert sparse.sparse_plan == {"0": "sparse", "2": "dense"}
    _check_close(model, sparse, torch.randn(2, 3, 21, 17))
    assert to_sparse(model, max_density={"stem": 0.2}).sparse_plan["0"] == "dense"


def test_bad_max_density_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_density"):
        to_sparse(nn.Linear(2, 2), max_density=1.5)
    with pytest.raises(ValueError, match="unknown"):
        to_sparse(nn.Linear(2, 2), max_density={"lineer": 0.5})


def test_sparsified_model_is_finalized_on_a_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 4))
    strsparse.sparsify(model, "magnitude", sparsity=0.8)
    model.eval()
    sparse = to_sparse(model)
    assert strsparse.sparse_layers(model)  # unchanged
    _check_close(model, sparse, torch.randn(3, 30))


def test_untraceable_model_is_swapped_layer_by_layer() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if y.sum() > 0:  # data-dependent: torch.fx cannot trace this
                y = y * 2
            return self.fc(y.mean((2, 3)))

    model = _prune(Branchy(), 0.8)
    with pytest.warns(RuntimeWarning, match="could not trace"):
        sparse = to_sparse(model, max_density=1.0)
    _check_close(model, sparse, torch.randn(2, 3, 9, 9))


def test_save_and_load_round_trip(tmp_path) -> None:
    model = _prune(strsparse.create_model("resnet20", shortcut="B"), 0.9)
    sparse = to_sparse(model)
    arch = {"name": "resnet20", "num_classes": 10, "in_channels": 3, "kwargs": {"shortcut": "B"}}
    path = save_sparse(sparse, tmp_path / "sparse.safetensors", architecture=arch)
    loaded = load_sparse(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), sparse(x), rtol=0, atol=0)
    assert loaded.sparse_plan == sparse.sparse_plan
    # with the architecture passed in instead
    again = load_sparse(path, strsparse.create_model("resnet20", shortcut="B"))
    with torch.inference_mode():
        torch.testing.assert_close(again(x), sparse(x), rtol=0, atol=0)
    # in proportion to the density: 10% of the weights, 6 bytes each instead of 4
    from safetensors.torch import save_file

    dense_path = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dense_path))
    if backend().available:
        assert path.stat().st_size < 0.25 * dense_path.stat().st_size


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="save_sparse"):
        load_sparse(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="to_sparse"):
        save_sparse(nn.Linear(2, 2), tmp_path / "x.safetensors")
    sparse = to_sparse(nn.Sequential(nn.Linear(4, 2)))
    path = save_sparse(sparse, tmp_path / "noarch.safetensors")
    with pytest.raises(ValueError, match="pass the dense model"):
        load_sparse(path)


@needs_native
def test_torch_layout_helpers_match_native() -> None:
    """The layout helpers' PyTorch versions (used with numba) equal the native ones."""
    plain = _native.Backend("numba")
    x = torch.randn(3, 2, 7, 6)
    for stride, pad in [(1, (1, 1)), (2, (1, 1)), (2, (3, 0)), (3, (2, 1))]:
        hq, wq = -(-(7 + 2 * pad[0]) // stride), -(-(6 + 2 * pad[1]) // stride)
        ch_stride = stride * stride * 2 * hq * wq
        torch.testing.assert_close(
            plain.pad_planes(x, pad, stride, hq, wq, ch_stride),
            backend().pad_planes(x, pad, stride, hq, wq, ch_stride),
        )
    y = torch.randn(4 * 2 * 9 * 8)
    res = torch.randn(4, 2, 7, 6)
    for r in (None, res):
        torch.testing.assert_close(
            plain.compact(y, (4, 2, 7, 6), 9, 8, 2 * 9 * 8, r, 0.0, 6.0),
            backend().compact(y, (4, 2, 7, 6), 9, 8, 2 * 9 * 8, r, 0.0, 6.0),
        )


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2"])
def test_the_native_swap_is_a_transpose(isa: str) -> None:
    """In 8x8 tiles with scalar edges; sweeping input rows (1024 floats apart) or output rows."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        for shape in [(37, 29), (256, 1024), (1024, 256), (40, 24, 3), (9, 71), (64, 64)]:
            x = torch.randn(*shape)
            expected = x.transpose(0, 1).contiguous()
            assert torch.equal(backend().swap01(x), expected)
    finally:
        set_isa("auto")


@pytest.mark.parametrize("form", ["module", "function"])
def test_global_average_pooling_runs_natively_in_either_layout(form: str) -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 40, 3, padding=1)
            self.pool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(40, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            x = self.pool(x) if form == "module" else F.adaptive_avg_pool2d(x, output_size=1)
            return self.fc(torch.flatten(x, 1))

    for sparsity in (0.9, 0.0):  # channel-major after a sparse conv, standard after a dense one
        model = _prune(Head(), sparsity)
        sparse = to_sparse(model)
        targets = [n.target for n in sparse.net.graph.nodes if n.op == "call_function"]
        assert global_avg_pool2d in targets
        for size in (2, 7, 12):  # 4, 49 and 144 values a plane: eight running sums and a tail
            _check_close(model, sparse, torch.randn(3, 6, size, size))
    x = torch.randn(3, 5, 2, 7)  # an odd layout: the PyTorch fallback
    torch.testing.assert_close(global_avg_pool2d(x[:, ::2]), F.adaptive_avg_pool2d(x[:, ::2], 1))
    torch.testing.assert_close(global_avg_pool2d(x), F.adaptive_avg_pool2d(x, 1))


def test_without_native_kernels_everything_stays_dense(monkeypatch) -> None:
    monkeypatch.setenv("STRSPARSE_NATIVE", "0")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.warns(RuntimeWarning, match="keeps every layer dense"):
        fallback = _native._load()
    assert fallback.name == "none" and not fallback.available
    monkeypatch.setattr(_native, "_BACKEND", fallback)
    model = _prune(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)), 0.9)
    sparse = to_sparse(model)
    assert set(sparse.sparse_plan.values()) == {"dense"}
    _check_close(model, sparse, torch.randn(2, 3, 10, 10))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("numba") is None, reason="numba is not installed"
)
def test_numba_fallback_matches_dense(monkeypatch) -> None:
    monkeypatch.setattr(_native, "_BACKEND", _native.Backend("numba"))
    model = _prune(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Linear(4, 3)), 0.7)
    sparse = to_sparse(model, max_density=1.0)
    _check_close(model, sparse, torch.randn(2, 3, 9, 9))


def test_large_batches_run_in_slices_only_when_samples_are_independent() -> None:
    model = _prune(strsparse.create_model("resnet20", shortcut="B"), 0.9)
    sparse = to_sparse(model)
    assert sparse.per_sample
    x = torch.randn(50, 3, 32, 32)  # more than one slice of 2**17 values
    with torch.inference_mode():
        whole = sparse.net(x)
        torch.testing.assert_close(sparse(x), whole, rtol=0, atol=1e-6)

    class BatchCentred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x - x.mean(0))  # mixes the samples of a batch

    mixed = to_sparse(_prune(BatchCentred(), 0.5))
    assert not mixed.per_sample
    x = torch.randn(20000, 8)
    with torch.inference_mode():
        torch.testing.assert_close(mixed(x), mixed.net(x))


def test_a_sliced_batch_runs_its_linear_tail_once_on_the_whole_batch() -> None:
    class Net(nn.Module):
        def __init__(self, skip: bool) -> None:
            super().__init__()
            self.skip = skip
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2)
            )
            self.fc1 = nn.Linear(8 * 15 * 15, 32)
            self.drop = nn.Dropout(0.5)
            self.fc2 = nn.Linear(32, 10)
            self.fc3 = nn.Linear(8 * 15 * 15, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = torch.flatten(self.features(x), 1)
            out = self.fc2(self.drop(F.relu(self.fc1(flat))))
            return out + self.fc3(flat) if self.skip else out  # two branches: no single tail

    x = torch.randn(100, 3, 32, 32)  # 3072 values a sample: three slices
    for skip in (False, True):
        model = _prune(Net(skip), 0.9)
        sparse = to_sparse(model)
        sparse.replay = False  # the hook counts module calls, which a replayed pass skips
        assert sparse.per_sample
        rows: list[int] = []
        sparse.net.get_submodule("fc2").register_forward_pre_hook(
            lambda m, args, rows=rows: rows.append(args[0].shape[0])
        )
        _check_close(model, sparse, x)
        if skip:
            assert sparse._split is None
            assert sum(rows) == 100 and len(rows) == 3  # the fc runs once a slice
        else:
            assert sparse._split is not None
            head, tail = sparse._split
            assert [n.target for n in tail.graph.nodes if n.op == "call_module"] == [
                "fc1",
                "drop",
                "fc2",
            ]
            assert rows == [100]  # once, on the whole batch
            assert not any(n.target == "fc1" for n in head.graph.nodes)
            # the split keeps the state as it was: no layer is stored twice
            assert set(sparse.state_dict()) == set(to_sparse(model).state_dict())


def test_a_dense_model_stays_in_the_standard_layout() -> None:
    """At 0% sparsity every layer is dense and no activation is transposed; BatchNorm is still
    folded and the residual adds and ReLUs fused."""
    model = _prune(strsparse.create_model("resnet20", shortcut="B"), 0.0)
    sparse = to_sparse(model)
    assert set(sparse.sparse_plan.values()) == {"dense"}
    assert not sparse.per_sample  # PyTorch's dense kernels keep whole batches
    targets = [n.target for n in sparse.net.graph.nodes if n.op == "call_function"]
    assert not any(getattr(t, "__name__", "") == "_swap01" for t in targets)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in sparse.modules())
    _check_close(model, sparse, torch.randn(2, 3, 32, 32))


def test_a_layer_called_twice_is_left_alone() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.relu(self.conv(x)))

    model = _prune(Twice(), 0.8)
    sparse = to_sparse(model, max_density=1.0)
    assert sparse.sparse_plan == {}
    _check_close(model, sparse, torch.randn(2, 4, 8, 8))


@needs_native
@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("mode", ["on", "off", "auto"])
def test_window_copy_matches_dense(isa: str, mode: str) -> None:
    """Convs whose product copies each distinct input window once per tile into an aligned
    buffer (forced on for every conv; by default the stem-like 7x7 convs on RGB take it):
    stride 1 and 2, odd sizes, batches, tails, inputs in planes or not, k x k and 1x1 convs,
    outputs mapped or not."""
    try:
        set_isa(isa)
    except ValueError:
        pytest.skip(f"this CPU lacks {isa}")
    try:
        assert _native.set_window_copy(mode) == mode
        for stride in (1, 2):
            model = _prune(
                nn.Sequential(
                    nn.Conv2d(3, 40, 7, stride=stride, padding=3, bias=False),
                    nn.BatchNorm2d(40),
                    nn.ReLU(),
                    nn.Conv2d(40, 12, 3, padding=1),
                    nn.ReLU(),
                    nn.Conv2d(12, 20, 1),
                ),
                0.6,
            )
            sparse = to_sparse(model, max_density=1.0)
            stem = sparse.net.get_submodule("0")
            # the windows are known: 3 channels x 49 offsets, each read by about 16 nonzeros
            windows = stem._geometry(2, 37, 29)[7]
            assert windows is not None and windows[0].numel() <= 147
            offsets = stem._geometry(2, 37, 29)[0]
            assert torch.equal(windows[0][windows[1].long()], offsets)
            pointwise = sparse.net.get_submodule("5")._geometry(1, 7, 7)[-1]
            assert pointwise is not None and pointwise[0].numel() <= 12
            for shape in [(1, 3, 9, 9), (3, 3, 37, 29), (2, 3, 64, 50)]:
                x = torch.randn(*shape)
                # on several threads, a product of few tiles copies its windows once, whole,
                # into a buffer all threads read, instead of once per tile and channel block
                for threads in (1, 2, 3):
                    with _threads(threads):
                        _check_close(model, sparse, x)
    finally:
        _native.set_window_copy("auto")
        set_isa("auto")


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@needs_native
@pytest.mark.parametrize("mode", ["on", "off"])
def test_products_over_large_tensors_match_dense(mode: str) -> None:
    """Forced on for small tensors, the non-temporal stores and the next tile's prefetch
    (blocks of channels computed between prefetches) leave every output as it was: shifted,
    padded and 1x1 convs, on 1 to 3 threads."""
    try:
        assert _native.set_large_tensors(mode) == mode
        model = _prune(
            nn.Sequential(
                nn.Conv2d(24, 40, 3, padding=1), nn.ReLU(), nn.Conv2d(40, 19, 1), nn.ReLU(),
                nn.Conv2d(19, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 16, 1),
            ),
            0.98,
        )  # fmt: skip
        # the first 3x3 reads its input unpadded, the second, denser, its planes
        model[4].weight.data[:, :8] = torch.randn(24, 8, 3, 3)
        sparse = to_sparse(model, max_density=1.0)
        for shape in [(1, 24, 9, 9), (3, 24, 37, 29)]:
            x = torch.randn(*shape)
            for threads in (1, 2, 3):
                with _threads(threads):
                    _check_close(model, sparse, x)
    finally:
        _native.set_large_tensors("auto")


@needs_native
def test_a_product_over_large_tensors_matches_dense() -> None:
    """A 3x3 conv layer called on 128 channels of 56x56 at batch 8 (input and output 12.8 MB
    each; a whole model would run the batch in slices) takes the large tensors' path by size."""
    model = _prune(nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()), 0.99)
    layer = to_sparse(model, max_density=1.0).net.get_submodule("0")
    x = torch.randn(8, 128, 56, 56)
    with torch.inference_mode():
        got = layer(x.transpose(0, 1).contiguous()).transpose(0, 1)
        torch.testing.assert_close(got, model(x), atol=TOL, rtol=0)


def test_bad_large_tensor_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="'always'"):
        _native.set_large_tensors("always")


def test_bad_window_copy_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="'sometimes'"):
        _native.set_window_copy("sometimes")
