"""Sparse Linear and Conv2d layers that run the native kernels.

``SparseConv2d`` works on channel-major activations, ``(C, N, H, W)`` contiguous: each
channel's pixels (all images of the batch) are one contiguous run, so the kernel's pixel
dimension is ``N * H * W`` and a 1x1 conv is a plain sparse-times-dense product. A k x k conv
reads its input through per-nonzero offsets into the zero-padded input (split into parity
planes when strided) and computes a few junk columns, which its epilogue skips when it writes
the output, so no im2col is built. A layer whose output only feeds such a conv writes it
straight into the zero-padded planes that conv reads (a ``PlanarActivation``), so no pass pads
it either. A stride-1 conv given an unpadded input reads it as it is, each load masked to the
pixels whose window lies inside the image (AVX-512), instead of padding a copy. A depthwise
conv has a kernel of its own, which pads one (channel, image) plane at a time into a buffer
that stays in cache and writes its output without junk columns. BatchNorm is folded into the
weights and bias, and the residual add and the activation (a clamp: ReLU, ReLU6) are fused into
the kernel's epilogue.

Weights are stored in CSR by output channel: ``values`` (float32), ``indices`` (the column in
the flattened ``(C_in / groups, kH, kW)`` weight; int16 where it fits, else int32) and
``row_ptr`` (int32). The input offsets of the nonzeros depend on the input's size, so they are
computed per input shape and cached, never stored.

A layer whose sparsity would not pay (see ``to_sparse``'s per-layer rule) holds a dense
``weight`` and runs PyTorch's kernel instead (``mode == "dense"``)."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from strsparse.errors import OptionError
from strsparse.inference._native import backend

__all__ = [
    "PlanarActivation",
    "SparseConv2d",
    "SparseLinear",
    "channel_major_max_pool2d",
    "csr_from_dense",
    "plane_geometry",
]

_INT32_MAX = 2**31 - 1
_CACHE_SIZE = 8  # offsets and output maps a layer keeps (a few input shapes)
_MAX_MAPPED_STRIDE = 4  # the native output map handles strides up to this
_MAX_WINDOWS = 4096  # more distinct input windows than this are never copied (see _windows)
_MAX_TAPS = 64  # kernel positions a shifted product handles (SS_MAX_TAPS)
# ops that act on each value alone, the same on any layout: what may run between layers
# that keep their activations channel-major
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.SiLU,
    nn.GELU,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Identity,
    nn.Dropout,
)
ELEMENTWISE_FUNCTIONS = {
    F.relu,
    torch.relu,
    F.relu6,
    F.hardtanh,
    torch.sigmoid,
    torch.tanh,
    F.silu,
    F.gelu,
    F.leaky_relu,
    F.hardswish,
}
# input features a Linear layer on several tokens reads in one run (see SparseLinear._runs):
# a 128-token tile of 1024 of them takes 512 KB, which stays in L2
_RUN_FEATURES = 1024
# the densest layer that reads an unpadded input as it is rather than padding a copy. Single
# 3x3 convs (64-512 channels on 56x56-7x7, batch 1, 1 thread) ran 1.09-1.18x faster than
# with padding at 3% density, 1.04-1.11x at 5%, 1.00-1.08x at 10% and 0.87-1.08x at 25%; but
# in whole networks at 90-95%, where the padding pass reads an input still in cache, the read
# gained nothing (ResNet-18 0.97-1.01x, ResNet-20 0.96x)
SHIFTED_MAX_DENSITY = 0.04


def plane_geometry(
    n: int, h: int, w: int, padding: tuple[int, int], stride: int
) -> tuple[int, int, int, int]:
    """``(hq, wq, plane, ch_stride)`` of a (C, N, h, w) activation zero-padded by ``padding``
    and split into ``stride**2`` parity planes of ``n * hq * wq`` values each (one channel:
    ``ch_stride`` values): where the k x k conv kernel reads its input."""
    hq, wq = -(-(h + 2 * padding[0]) // stride), -(-(w + 2 * padding[1]) // stride)
    plane = n * hq * wq
    return hq, wq, plane, stride * stride * plane


def _windows(offsets: Tensor) -> tuple[Tensor, Tensor] | None:
    """The distinct values of a conv's input offsets (its windows: one per input channel and
    kernel position) and, per nonzero, the index of its own (int32): the kernel may copy each
    window once per tile into an aligned buffer where many nonzeros read it
    (``ss_spmm_windows``). ``None`` for too many windows."""
    distinct, slots = torch.unique(offsets, return_inverse=True)
    if distinct.numel() > _MAX_WINDOWS:
        return None
    return distinct.to(torch.int32).contiguous(), slots.to(torch.int32).contiguous()


_STATE_TENSORS = frozenset({"values", "indices", "row_ptr", "weight", "bias"})

# bumped whenever a sparse layer's tensors may have changed (a state loaded, a tensor
# replaced, a move or cast): what a recorded forward pass (see replay.py) checks before it
# replays
_state_generation = 0


def state_generation() -> int:
    """A count that changes whenever any sparse layer's tensors may have changed."""
    return _state_generation


def _state_changed() -> None:
    global _state_generation
    _state_generation += 1


# per thread, the tensors of the last product that may have returned early (see
# SparseConv2d.returns_early): the next native call from the thread finishes that product
_in_flight = threading.local()


class PlanarActivation(NamedTuple):
    """A channel-major activation already zero-padded and split into the parity planes a k x
    k conv reads (``ss_pad_planes``'s layout): what a layer whose output feeds only that conv
    returns, so that the conv needs no padding pass."""

    data: Tensor  # flat: C * ch_stride values
    shape: tuple[int, int, int, int]  # (C, N, H, W) of the activation itself
    padding: tuple[int, int]
    stride: int

    def unpack(self) -> Tensor:
        """The activation as a contiguous (C, N, H, W) tensor."""
        c, n, h, w = self.shape
        (pt, pl), s = self.padding, self.stride
        hq, wq, plane, ch_stride = plane_geometry(n, h, w, self.padding, s)
        planes = self.data.view(c, ch_stride)[:, : s * s * plane].view(c, s, s, n, hq, wq)
        full = planes.permute(0, 3, 4, 1, 5, 2).reshape(c, n, hq * s, wq * s)
        return full[:, :, pt : pt + h, pl : pl + w].contiguous()


def csr_from_dense(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(values, indices, row_ptr)`` of a dense weight flattened to ``(C_out, K)``.

    ``indices`` is int16 when ``K`` fits, which makes a stored nonzero 6 bytes.
    """
    w2 = weight.detach().reshape(weight.shape[0], -1).float()
    mask = w2 != 0
    counts = mask.sum(dim=1)
    row_ptr = torch.zeros(w2.shape[0] + 1, dtype=torch.int32)
    row_ptr[1:] = counts.cumsum(0).to(torch.int32)
    cols = mask.nonzero()[:, 1]  # row-major: sorted by output channel, then column
    index_dtype = torch.int16 if w2.shape[1] <= 2**15 - 1 else torch.int32
    return w2[mask].contiguous(), cols.to(index_dtype).contiguous(), row_ptr


def _csr_rows(row_ptr: Tensor) -> Tensor:
    """Each nonzero's row (int64), from a CSR row pointer."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def _dense_from_csr(
    values: Tensor, indices: Tensor, row_ptr: Tensor, shape: tuple[int, ...]
) -> Tensor:
    c_out = shape[0]
    k = math.prod(shape[1:])
    rows = _csr_rows(row_ptr)
    dense = torch.zeros(c_out, k)
    dense[rows, indices.long()] = values
    return dense.view(shape)


class _SparseBase(nn.Module):
    """CSR storage, the dense/sparse mode, the fused clamp and the offsets cache."""

    values: Tensor
    indices: Tensor
    row_ptr: Tensor
    weight: Tensor
    bias: Tensor | None

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        weight: Tensor | None,
        bias: Tensor | None,
        mode: str,
        clamp: tuple[float, float],
    ) -> None:
        super().__init__()
        if mode not in ("sparse", "dense"):
            raise OptionError(f"mode must be 'sparse' or 'dense', got {mode!r}")
        self.mode = mode
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.clamp = (float(clamp[0]), float(clamp[1]))
        c_out = self.weight_shape[0]
        if weight is None:  # structure only: the tensors come from a saved state
            weight = torch.zeros(0)
        if mode == "sparse":
            if weight.numel():
                values, indices, row_ptr = csr_from_dense(weight)
            else:
                values = torch.zeros(0)
                indices = torch.zeros(0, dtype=torch.int16)
                row_ptr = torch.zeros(c_out + 1, dtype=torch.int32)
            self.register_buffer("values", values)
            self.register_buffer("indices", indices)
            self.register_buffer("row_ptr", row_ptr)
        else:
            self.register_buffer("weight", weight.detach().float().contiguous())
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float().contiguous().clone()
        )
        self._offsets: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._steps: dict[tuple[Any, ...], Callable] = {}  # direct kernel calls, by input

    @property
    def nnz(self) -> int:
        return (
            int(self.values.numel()) if self.mode == "sparse" else int(self.weight.count_nonzero())
        )

    @property
    def density(self) -> float:
        return self.nnz / math.prod(self.weight_shape)

    def dense_weight(self) -> Tensor:
        """The layer's weight as a dense tensor (BatchNorm folded in)."""
        if self.mode == "dense":
            return self.weight
        return _dense_from_csr(self.values, self.indices, self.row_ptr, self.weight_shape)

    def _cached(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        hit = self._offsets.get(key)
        if hit is None:
            hit = build()
            self._offsets[key] = hit
            if len(self._offsets) > _CACHE_SIZE:
                self._offsets.popitem(last=False)
        else:
            self._offsets.move_to_end(key)
        return hit

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # CSR tensors change size with the weights: take the stored ones as they are
        for name in ("values", "indices", "row_ptr", "weight"):
            key = prefix + name
            if key in state_dict and name in self._buffers:
                self._buffers[name] = state_dict[key].clone()
        if prefix + "bias" in state_dict:
            self._buffers["bias"] = state_dict[prefix + "bias"].clone()
        self._offsets.clear()
        self._steps.clear()
        _state_changed()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Any:
        _state_changed()
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _STATE_TENSORS:  # a tensor replaced: prepared calls would read the old one
            _state_changed()
            for cache in ("_steps", "_offsets"):
                if cache in self.__dict__:
                    self.__dict__[cache].clear()
        super().__setattr__(name, value)

    def _apply_clamp(self, y: Tensor) -> Tensor:
        lo, hi = self.clamp
        if lo == -math.inf and hi == math.inf:
            return y
        return y.clamp_(min=None if lo == -math.inf else lo, max=None if hi == math.inf else hi)


class SparseLinear(_SparseBase):
    """``clamp(x @ W.T + b)`` on a standard ``(..., in_features)`` input."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        mode: str = "sparse",
        clamp: tuple[float, float] = (-math.inf, math.inf),
    ) -> None:
        super().__init__((out_features, in_features), weight, bias, mode, clamp)
        self.in_features = in_features
        self.out_features = out_features

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, mode={self.mode}, "
            f"density={self.density:.3f}, clamp={self.clamp}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dense":
            return self._apply_clamp(F.linear(x, self.weight, self.bias))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        m = x2.shape[0]
        if self.in_features * m > _INT32_MAX:
            return self._apply_clamp(F.linear(x, self.dense_weight(), self.bias))
        # (in_features, M): channel-major
        xt = backend().swap01(x2) if x2.is_contiguous() else x2.t().contiguous()
        out = self._product(xt, m)
        if m == 1:
            return out.view(*lead, self.out_features)
        return backend().swap01(out).view(*lead, self.out_features)

    def forward_channel_major(self, xt: Tensor) -> Tensor:
        """The layer on a channel-major input, ``(in_features, M)`` -> ``(out_features, M)``:
        ``forward`` without its two transposes, for layers that feed each other (a
        transformer's projections and feed-forward pair)."""
        if xt.dim() != 2 or xt.shape[0] != self.in_features:
            raise OptionError(
                f"this layer takes ({self.in_features}, tokens) channel-major inputs, got "
                f"{tuple(xt.shape)}"
            )
        m = xt.shape[1]
        if self.mode == "dense" or self.in_features * m > _INT32_MAX:
            w = self.weight if self.mode == "dense" else self.dense_weight()
            out = w @ xt if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, xt)
            return self._apply_clamp(out)
        return self._product(xt.float().contiguous(), m)

    def _product(self, xt: Tensor, m: int) -> Tensor:
        """(out_features, M) from a contiguous (in_features, M) input, on the kernel."""
        out = torch.empty(self.out_features, m)
        lo, hi = self.clamp
        # nn.Module.__getattr__ is slow next to a one-sample product; a sparse layer has these
        buffers: dict[str, Tensor] = self._buffers  # type: ignore[assignment]
        if m > 1 and self._in_runs and backend().native:
            runs: tuple[Tensor, Tensor, Tensor, int] = self._cached(("runs",), self._runs)
            values, indices, row_ptr, n_runs = runs
            run_offsets = self._cached(("runs", m), lambda: (indices * m).contiguous())
            backend().spmm(
                xt, out, values, run_offsets, row_ptr, buffers["bias"], None, m, m, 0, lo, hi,
                chunks=n_runs,
            )  # fmt: skip
            return out
        offsets: Tensor | None = self._offsets.get((m,))  # _cached's hit, without a closure
        if offsets is None:
            offsets = self._cached((m,), lambda: (self.indices.int() * m).contiguous())
        backend().spmm(
            xt, out, buffers["values"], offsets, buffers["row_ptr"], buffers["bias"], None, m,
            m, 0, lo, hi,
        )  # fmt: skip
        return out

    @property
    def _in_runs(self) -> bool:
        """Whether the product goes run by run (see ``_runs``): more than one run, with 32
        nonzeros a row in each on average, which pay for adding to the partial sums (at 99%,
        a 4096->4096 layer on 2-8 tokens ran 0.67-0.69x as fast in runs)."""
        n_runs = self._n_runs
        return n_runs > 1 and self.values.numel() >= 32 * n_runs * self.out_features

    @property
    def _n_runs(self) -> int:
        return -(-self.in_features // _RUN_FEATURES)

    def _runs(self) -> tuple[Tensor, Tensor, Tensor, int]:
        """The nonzeros reordered into runs of ``_RUN_FEATURES`` input features, each in CSR
        order: (values, int32 columns, a row pointer of out_features + 1 entries per run,
        flat, absolute; the number of runs). The kernel computes a tile run by run, so that
        the inputs one run reads stay in cache: with all 3072 inputs of a layer read at once,
        a tile's 1.5 MB did not (3072->768 at 70%, 1,024 tokens, 1 thread: 1.8-2.1x faster
        in runs)."""
        cols = self.indices.long()
        n_runs = self._n_runs
        key = cols // _RUN_FEATURES * self.out_features + _csr_rows(self.row_ptr)  # run, row
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=n_runs * self.out_features)
        ends = counts.cumsum(0).view(n_runs, self.out_features)
        row_ptr = torch.cat([torch.zeros(n_runs, 1, dtype=torch.long), ends], dim=1)
        row_ptr[1:, 0] = ends[:-1, -1]
        return (
            self.values[order].contiguous(),
            cols[order].int().contiguous(),
            row_ptr.reshape(-1).int().contiguous(),
            n_runs,
        )


class SparseConv2d(_SparseBase):
    """``clamp(conv2d(x) + b (+ residual))`` on channel-major ``(C, N, H, W)`` activations;
    the output is channel-major too. A layer kept dense may work on standard ``(N, C, H, W)``
    activations instead (``channel_major=False``), so that it costs no transposes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: int,
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        weight: Tensor | None,
        bias: Tensor | None,
        *,
        mode: str = "sparse",
        clamp: tuple[float, float] = (-math.inf, math.inf),
        channel_major: bool = True,
    ) -> None:
        if mode == "sparse" and not channel_major:
            raise ValueError("a sparse SparseConv2d works on channel-major activations")
        shape = (out_channels, in_channels // groups, *kernel_size)
        super().__init__(shape, weight, bias, mode, clamp)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = int(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.channel_major = channel_major
        # (padding, stride) of the k x k conv that alone reads this layer's output: the output
        # is then written into that conv's padded planes (set by to_sparse)
        self.output_planes: tuple[tuple[int, int], int] | None = None
        # whether a product on several threads may return before it is done, its workers
        # finishing it while Python prepares the next call: only for a layer whose output only
        # sparse convs read, each of which finishes it first (set by to_sparse)
        self.returns_early = False

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, mode={self.mode}, density={self.density:.3f}, "
            f"clamp={self.clamp}"
        )

    @property
    def pointwise(self) -> bool:
        return self.kernel_size == (1, 1) and self.padding == (0, 0)

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels

    @property
    def reads_planes(self) -> bool:
        """Whether the layer reads its input as padded parity planes (a sparse k x k conv
        that the depthwise kernel does not run), so a ``PlanarActivation`` can feed it."""
        return (
            self.mode == "sparse"
            and self.channel_major
            and not self.pointwise
            and not self.depthwise
            and self.stride <= _MAX_MAPPED_STRIDE
        )

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (ph, pw), (dh, dw), s = self.kernel_size, self.padding, self.dilation, self.stride
        return (h + 2 * ph - dh * (kh - 1) - 1) // s + 1, (w + 2 * pw - dw * (kw - 1) - 1) // s + 1

    def _nonzero_coords(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per nonzero: input channel, kernel row, kernel column (int64)."""
        kh, kw = self.kernel_size
        c_out = self.out_channels
        rows = _csr_rows(self.row_ptr)
        cols = self.indices.long()
        per_group_in = self.in_channels // self.groups
        per_group_out = c_out // self.groups
        ci = (rows // per_group_out) * per_group_in + cols // (kh * kw)
        r = (cols % (kh * kw)) // kw
        t = cols % kw
        return ci, r, t, rows

    def _geometry(self, n: int, h: int, w: int) -> tuple[Any, ...] | None:
        ho, wo = self._output_size(h, w)
        ci, r, t, _ = self._nonzero_coords()
        if self.pointwise:
            count = n * ho * wo
            if self.in_channels * count > _INT32_MAX:
                return None
            offsets = (ci * count).to(torch.int32).contiguous()
            return (offsets, ho, wo, _windows(offsets))
        (dh, dw), s = self.dilation, self.stride
        hq, wq, plane, ch_stride = plane_geometry(n, h, w, (self.padding[0], self.padding[1]), s)
        if self.in_channels * ch_stride > _INT32_MAX or self.out_channels * plane > _INT32_MAX:
            return None
        dy, dx = r * dh, t * dw
        offsets = ci * ch_stride + ((dy % s) * s + dx % s) * plane + (dy // s) * wq + dx // s
        offsets = offsets.to(torch.int32).contiguous()
        return (offsets, ho, wo, hq, wq, plane, ch_stride, _windows(offsets))

    def _shifted_geometry(self, n: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """For a stride-1 conv whose output grid is its input's, read unpadded
        (``ss_spmm_shifted``): each nonzero's offset (its input channel's start + dy*w + dx),
        its tap (kernel position) and each tap's (dy, dx) (int32). ``None`` where that product
        cannot run the layer: it then pads its input."""
        kh, kw = self.kernel_size
        count = n * h * w
        if (
            self.stride != 1
            or self._output_size(h, w) != (h, w)
            or kh * kw > _MAX_TAPS
            or max(self.in_channels, self.out_channels) * count > _INT32_MAX
        ):
            return None
        (ph, pw), (dh, dw) = self.padding, self.dilation
        ci, r, t, _ = self._nonzero_coords()
        offsets = ci * count + (r * dh - ph) * w + (t * dw - pw)
        ky, kx = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
        shifts = torch.stack([ky.reshape(-1) * dh - ph, kx.reshape(-1) * dw - pw], dim=1)
        return (
            offsets.to(torch.int32).contiguous(),
            (r * kw + t).to(torch.int32).contiguous(),
            shifts.to(torch.int32).contiguous(),
        )

    def _shifted(self, n: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """``_shifted_geometry``, cached, where the shifted product beats padding: with the
        native AVX-512 kernels (the portable ones check each pixel), in a layer at most
        ``SHIFTED_MAX_DENSITY`` dense."""
        if (
            backend().isa != "avx512"
            or self.pointwise
            or self.depthwise
            or self.density > SHIFTED_MAX_DENSITY
        ):
            return None
        return self._cached(("shifted", n, h, w), lambda: self._shifted_geometry(n, h, w))

    def _depthwise_geometry(self, h: int, w: int) -> tuple[Any, ...] | None:
        """The nonzeros' offsets in one (channel, image) plane padded and split into parity
        planes (``ss_depthwise``), and the plane sizes."""
        ho, wo = self._output_size(h, w)
        (ph, pw), (dh, dw), s = self.padding, self.dilation, self.stride
        hq, wq = -(-(h + 2 * ph) // s), -(-(w + 2 * pw) // s)
        if ho <= 0 or wo <= 0 or s * s * hq * wq > _INT32_MAX:
            return None
        _, r, t, _ = self._nonzero_coords()
        dy, dx = r * dh, t * dw
        taps = ((dy % s) * s + dx % s) * (hq * wq) + (dy // s) * wq + dx // s
        return (taps.to(torch.int32).contiguous(), ho, wo, hq, wq)

    def forward(
        self, x: Tensor | PlanarActivation, residual: Tensor | None = None
    ) -> Tensor | PlanarActivation:
        if not self.channel_major:  # a dense layer between standard-layout ops
            assert isinstance(x, Tensor)
            y = F.conv2d(
                x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
            )
            if residual is not None:
                y = y + residual
            return self._apply_clamp(y)
        step = self._steps.get((type(x), x.shape, residual is None))
        if step is not None:
            out = step(x, residual)
            if out is not None:
                return out
        elif self.channel_major and len(self._steps) < _CACHE_SIZE:
            step = self._step(x)
            if step is not None:
                self._steps[(type(x), x.shape, residual is None)] = step
                out = step(x, residual)
                if out is not None:
                    return out
        backend().sync()  # the general path reads its inputs with PyTorch too
        planar = x if isinstance(x, PlanarActivation) else None
        if planar is not None and not (
            self.reads_planes and planar.padding == self.padding and planar.stride == self.stride
        ):
            x, planar = planar.unpack(), None
        if planar is not None:
            c, n, h, w = planar.shape
        else:
            assert isinstance(x, Tensor)
            if x.dim() != 4:
                raise OptionError(
                    "SparseConv2d takes channel-major (C, N, H, W) input, got shape "
                    f"{tuple(x.shape)}"
                )
            x = x.contiguous().float()
            c, n, h, w = x.shape
        lo, hi = self.clamp
        if self.mode == "sparse" and self.depthwise and residual is None:
            assert isinstance(x, Tensor)
            out = self._depthwise_forward(x)
            if out is not None:
                return self._emit(out)
        geometry = None
        if self.mode == "sparse":
            geometry = self._cached((n, h, w), lambda: self._geometry(n, h, w))
        if geometry is None:  # dense layer, or too large for 32-bit offsets
            if planar is not None:
                x = planar.unpack()
            assert isinstance(x, Tensor)
            return self._emit(self._dense_forward(x, residual))
        if residual is not None:
            residual = residual.contiguous().float()
        native = backend().native
        if self.pointwise:
            assert isinstance(x, Tensor)
            offsets, ho, wo, windows = geometry
            if self.stride > 1:
                x = backend().subsample(x, self.stride)
            count = n * ho * wo
            shape = (self.out_channels, n, ho, wo)
            if residual is not None and tuple(residual.shape) != shape:
                out = self._spmm(x, torch.empty(shape), offsets, count, count)
                return self._emit(self._apply_clamp_residual(out, residual))
            if self.output_planes is not None and native:
                return self._mapped(x, offsets, count, n, ho, wo, ho, wo, residual, windows)
            out = torch.empty(shape)
            backend().spmm(
                x, out, self.values, offsets, self.row_ptr, self.bias, residual, count, count,
                count, lo, hi, windows=windows if native else None,
            )  # fmt: skip
            return self._emit(out)
        offsets, ho, wo, hq, wq, plane, ch_stride, windows = geometry
        shape = (self.out_channels, n, ho, wo)
        shifted = self._shifted(n, h, w) if planar is None and native else None
        if shifted is not None and (residual is None or tuple(residual.shape) == shape):
            assert isinstance(x, Tensor)
            count = n * h * w
            taps = (shifted[1], shifted[2], h, w)
            if self.output_planes is not None:
                return self._mapped(x, shifted[0], count, n, h, w, h, w, residual, shifted=taps)
            out = torch.empty(shape)
            backend().spmm(
                x, out, self.values, shifted[0], self.row_ptr, self.bias, residual, count, count,
                count, lo, hi, shifted=taps,
            )  # fmt: skip
            return out
        if planar is not None:
            planes = planar.data
        else:
            assert isinstance(x, Tensor)
            pad = (self.padding[0], self.padding[1])
            planes = backend().pad_planes(x, pad, self.stride, hq, wq, ch_stride)
        n_pix = (n - 1) * hq * wq + (ho - 1) * wq + wo
        if native and (residual is None or tuple(residual.shape) == shape):
            # the epilogue skips the junk columns and rows
            return self._mapped(planes, offsets, n_pix, n, hq, wq, ho, wo, residual, windows)
        y = torch.empty(self.out_channels * plane)
        fused = residual is None
        backend().spmm(
            planes, y, self.values, offsets, self.row_ptr, self.bias, None, n_pix, plane, 0,
            lo if fused else -math.inf, hi if fused else math.inf,
        )  # fmt: skip
        if residual is not None and tuple(residual.shape) != shape:
            out = backend().compact(y, shape, hq, wq, plane, None, -math.inf, math.inf)
            return self._emit(self._apply_clamp_residual(out, residual))
        return self._emit(backend().compact(y, shape, hq, wq, plane, residual, lo, hi))

    def _output_map(
        self, n: int, src_h: int, src_w: int, ho: int, wo: int
    ) -> tuple[Tensor, int, tuple[int, int, int, int] | None]:
        """The native output map (``ss_spmm_mapped``) from the kernel's pixel grid (``src_h``
        rows of ``src_w`` pixels an image, the first ``ho`` x ``wo`` real) to this layer's
        output, the output's channel stride, and its planes' (hq, wq, plane, ch_stride)."""
        if self.output_planes is None:
            count = n * ho * wo
            fields = [src_h, src_w, ho, wo, 1, 0, 0, ho, wo, count]
            return torch.tensor(fields, dtype=torch.int64), count, None
        padding, s = self.output_planes
        geometry = plane_geometry(n, ho, wo, padding, s)
        hq, wq, plane, ch_stride = geometry
        fields = [src_h, src_w, ho, wo, s, padding[0], padding[1], hq, wq, plane]
        return torch.tensor(fields, dtype=torch.int64), ch_stride, geometry

    def _mapped(
        self,
        inp: Tensor,
        offsets: Tensor,
        n_pix: int,
        n: int,
        src_h: int,
        src_w: int,
        ho: int,
        wo: int,
        residual: Tensor | None,
        windows: tuple[Tensor, Tensor] | None = None,
        shifted: tuple[Tensor, Tensor, int, int] | None = None,
    ) -> Tensor | PlanarActivation:
        """The product written through the output map: the compact output, or the next
        conv's planes."""
        out_map, ld_out, planes = self._cached(
            ("map", n, src_h, src_w, ho, wo), lambda: self._output_map(n, src_h, src_w, ho, wo)
        )
        shape = (self.out_channels, n, ho, wo)
        # planes: a fresh zeroed buffer, whose padding stays zero (a buffer kept from call to
        # call measured slower: it is no longer in cache when the next call comes)
        out = torch.empty(shape) if planes is None else backend().zeros(shape[0] * ld_out)
        lo, hi = self.clamp
        backend().spmm(
            inp, out, self.values, offsets, self.row_ptr, self.bias, residual, n_pix, ld_out,
            n * ho * wo, lo, hi, out_map, windows, shifted,
        )  # fmt: skip
        if self.output_planes is None:
            return out
        padding, s = self.output_planes
        return PlanarActivation(out, shape, padding, s)

    def _step(self, x: Tensor | PlanarActivation) -> Callable | None:
        """For the commonest calls (a 1x1 conv on a tensor, a k x k conv on planes or, shifted,
        on a tensor), a function
        that calls the kernel directly, with every argument but the activations prepared: a
        layer of a network at batch 1 runs in tens of microseconds, so Python counts.
        ``None`` for every other call, which takes the general path."""
        be = backend()
        lib = be._lib
        if lib is None or self.mode != "sparse" or self.depthwise:
            return None
        planar = isinstance(x, PlanarActivation)
        if planar:
            assert isinstance(x, PlanarActivation)
            if not (self.reads_planes and x.padding == self.padding and x.stride == self.stride):
                return None
        elif not (isinstance(x, Tensor) and x.dim() == 4):
            return None
        _, n, h, w = x.shape
        shifted = None
        if not planar and not (self.pointwise and self.stride == 1):
            shifted = self._shifted(n, h, w)
            if shifted is None:
                return None
        geometry = self._cached((n, h, w), lambda: self._geometry(n, h, w))
        if geometry is None:
            return None
        offsets, ho, wo = geometry[:3]
        count = n * ho * wo
        windows = geometry[-1]
        if shifted is not None:
            offsets, windows = shifted[0], None
        if planar:
            hq, wq = geometry[3:5]
            n_pix, src_h, src_w = (n - 1) * hq * wq + (ho - 1) * wq + wo, hq, wq
        else:
            n_pix, src_h, src_w = count, ho, wo
        mapped = planar or self.output_planes is not None
        out_shape = (self.out_channels, n, ho, wo)
        ld_out, size = count, 0
        out_map = None
        if mapped:
            out_map, ld_out, planes = self._cached(
                ("map", n, src_h, src_w, ho, wo),
                lambda: self._output_map(n, src_h, src_w, ho, wo),
            )
            if planes is not None:
                size = self.out_channels * ld_out
        values: Tensor = self._buffers["values"]  # type: ignore[assignment]
        bias = self._buffers["bias"]
        # alive while used
        keep = (values, offsets, self._buffers["row_ptr"], bias, out_map, windows, shifted)
        head = [t.data_ptr() if t is not None else None for t in keep[:4]]
        tail = [self.out_channels, n_pix, ld_out, count, *self.clamp]
        buffers = self._buffers
        planes_out = self.output_planes
        get_threads = torch.get_num_threads
        early = self.returns_early
        in_flight = _in_flight
        empty = torch.empty
        zero = lib.ss_zero
        extra: list[int | None] = []
        if mapped:
            assert out_map is not None
            fn = lib.ss_spmm_mapped
            extra = [out_map.data_ptr()]
        else:
            fn = lib.ss_spmm
        if windows is not None:
            fn = lib.ss_spmm_windows
            extra = [extra[0] if extra else None]
            extra += [windows[0].data_ptr(), windows[1].data_ptr(), windows[0].numel()]
        if shifted is not None:
            fn = lib.ss_spmm_shifted
            extra = [extra[0] if extra else None]
            extra += [shifted[1].data_ptr(), shifted[2].data_ptr(), shifted[2].shape[0], h, w]

        def step(x: Any, residual: Tensor | None) -> Tensor | PlanarActivation | None:
            if buffers["values"] is not keep[0]:  # the module's tensors were replaced
                return None
            if planar:
                data = x.data
            else:
                if not x.is_contiguous() or x.dtype != torch.float32:
                    return None
                data = x
            res = None
            if residual is not None:
                if residual.shape != out_shape or not residual.is_contiguous():
                    return None
                res = residual.data_ptr()
            threads = get_threads()
            if size:  # the next conv's planes, whose padding stays zero
                out = empty(size)
                zero(out.data_ptr(), size, threads)
            else:
                out = empty(out_shape)
            # negative: the product may return early
            n_threads = -threads if early and threads > 1 else threads
            args = [data.data_ptr(), out.data_ptr(), *head, res, *tail, n_threads, *extra]
            if fn(*args):  # a map the kernel refuses: the general path says why
                return None
            if early:  # the tensors a product that returned early uses live until it is done
                in_flight.tensors = (data, residual, out)
            if size:
                assert planes_out is not None
                return PlanarActivation(out, out_shape, *planes_out)
            return out

        return step

    def _emit(self, out: Tensor) -> Tensor | PlanarActivation:
        """A compact (C, N, H, W) output in this layer's output layout."""
        if self.output_planes is None:
            return out
        padding, s = self.output_planes
        c, n, h, w = out.shape
        hq, wq, _, ch_stride = plane_geometry(n, h, w, padding, s)
        data = backend().pad_planes(out.contiguous(), padding, s, hq, wq, ch_stride)
        return PlanarActivation(data, (c, n, h, w), padding, s)

    def _depthwise_forward(self, x: Tensor) -> Tensor | None:
        """The native depthwise kernel on contiguous channel-major ``x``; ``None`` where it
        cannot run. Kept short: at batch 1 the late layers take a few microseconds each."""
        be = backend()
        if not be.native:
            return None
        _, _, h, w = x.shape
        geometry = self._offsets.get((h, w))  # the hit path of _cached, without its closure
        if geometry is None:
            geometry = self._cached((h, w), lambda: self._depthwise_geometry(h, w))
            if geometry is None:
                return None
        taps, ho, wo, hq, wq = geometry
        # nn.Module.__getattr__ costs more than the smallest kernels; a sparse layer has these
        buffers: dict[str, Tensor] = self._buffers  # type: ignore[assignment]
        return be.depthwise(
            x, buffers["values"], taps, buffers["row_ptr"], buffers["bias"],
            (self.padding[0], self.padding[1]), self.stride, hq, wq, ho, wo, *self.clamp,
        )  # fmt: skip

    def _spmm(self, x: Tensor, out: Tensor, offsets: Tensor, n_pix: int, ld: int) -> Tensor:
        backend().spmm(
            x, out, self.values, offsets, self.row_ptr, self.bias, None, n_pix, ld, 0,
            -math.inf, math.inf,
        )  # fmt: skip
        return out

    def _apply_clamp_residual(self, out: Tensor, residual: Tensor) -> Tensor:
        return self._apply_clamp(out + residual)

    def _dense_forward(self, x: Tensor, residual: Tensor | None) -> Tensor:
        y = F.conv2d(
            x.transpose(0, 1),
            self.dense_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        y = y.transpose(0, 1)
        if residual is not None:
            y = y + residual
        return self._apply_clamp(y.contiguous())


def channel_major_max_pool2d(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """``max_pool2d`` of a (C, N, H, W) or (N, C, H, W) tensor, natively where possible
    (PyTorch's kernel is slow on the planes of the first, and not fast on the second)."""
    if x.dtype == torch.float32 and x.is_contiguous():
        out = backend().maxpool(x, kernel_size, stride, padding)
        if out is not None:
            return out
    return F.max_pool2d(x, kernel_size, stride, padding)


def global_avg_pool2d(x: Tensor) -> Tensor:
    """``adaptive_avg_pool2d(x, 1)`` of a (C, N, H, W) or (N, C, H, W) tensor, natively where
    possible: PyTorch's kernel takes several times longer on the small planes of a network's
    last stage, on threads of its own that the kernels' threads then compete with."""
    if x.dim() == 4 and x.dtype == torch.float32 and x.is_contiguous():
        out = backend().plane_mean(x)
        if out is not None:
            return out
    return F.adaptive_avg_pool2d(x, 1)
