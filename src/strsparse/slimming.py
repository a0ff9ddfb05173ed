"""``slim``: turn zeroed filters and rank-one components into a physically smaller model.

Structured STR (``sparsify(model, "str", structure="filter" | "rank")``) zeroes whole filters
and rank-one components; ``slim`` removes them, so parameters, FLOPs and latency shrink, not
only the count of nonzeros. It works on a copy: the sparsity parametrizations are baked in
(``finalize``), then

- every ``LowRankLinear`` is cut to the components whose row of W2 and column of W1 are
  nonzero;
- channels are followed through the ``torch.fx`` graph of the model. Each channel of each
  tensor belongs to a class of channels that must be kept or removed together: channel-wise
  operations (BatchNorm, activations, pooling, depthwise convs, additions, the CIFAR ResNets'
  zero-padding shortcut) tie their input and output channels, so a channel an addition needs
  on either side is kept. Every channel's zeros are derived from the weights (an all-zero
  filter and bias, a BatchNorm with zero weight and bias, zeros passed on by ReLU, pooling and
  depthwise convs, an addition of two zeros). A class is removed when every tensor of it that
  a conv or Linear reads is exactly zero, so the removal changes no output; the model's input
  and output channels are kept. Convs, Linear layers and BatchNorms are then rebuilt with the
  surviving channels (the next layer loses the matching input channels).

Outputs in eval mode are unchanged up to floating-point reordering. A graph ``torch.fx``
cannot trace, or an operation that mixes channels in a way slim does not know, is an error
naming the layer, when it stands between zeroed filters and their removal.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from strsparse import flops
from strsparse.errors import OptionError, StrsparseError
from strsparse.layers import LowRankLinear
from strsparse.methods.base import get_parametrization
from strsparse.methods.structured import (
    StructuredSoftThreshold,
    TraceFailure,
    has_channel_rule,
    trace,
)
from strsparse.methods.target import ChannelFlops, register_channel_flops
from strsparse.sparsify import finalize

__all__ = ["SlimError", "describe_layers", "rebuild_layers", "slim"]

logger = logging.getLogger(__name__)


class SlimError(StrsparseError, ValueError):
    """A model cannot be slimmed safely; the message names the layer and why."""


# modules and functions that act on each channel separately and map 0 to 0
_ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Tanh,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.ELU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
# channel-wise but not zero-preserving (sigmoid(0) = 0.5)
_CHANNELWISE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
_ZERO_PRESERVING_FUNCTIONS: set[Any] = {
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    torch.tanh,
    F.gelu,
    F.silu,
    F.dropout,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}


_IO_REASONS = ("the model's input", "the model's output")


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    """Argument ``index`` of call ``node``, or its keyword ``name``, or ``default``."""
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclass
class _Channels:
    """The tracked channels of one tensor: union-find ids and provable zeros, one per channel
    (dim 1); after flattening, one per feature (each channel's id repeated)."""

    ids: list[int]
    zero: list[bool]


class _Analysis:
    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.graph = graph
        self.modules = dict(model.named_modules())
        self.uf = _UnionFind()
        self.channels: dict[fx.Node, _Channels] = {}
        self.frozen: dict[int, str] = {}  # id -> why it must stay
        self.observed: list[_Channels] = []  # inputs of convs / Linear layers
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        self.calls = calls

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _shape(node: Any) -> tuple[int, ...] | None:
        meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
        shape = getattr(meta, "shape", None)
        return tuple(shape) if shape is not None else None

    def _fresh(self, node: fx.Node, zero: Sequence[bool] | None = None) -> _Channels | None:
        shape = self._shape(node)
        if shape is None or len(shape) < 2:
            return None
        ids = self.uf.new(shape[1])
        return _Channels(ids, list(zero) if zero is not None else [False] * shape[1])

    def _freeze(self, ch: _Channels | None, why: str) -> None:
        if ch is not None:
            for i in ch.ids:
                self.frozen.setdefault(i, why)

    def _tracked_inputs(self, node: fx.Node) -> list[_Channels]:
        found = []
        for arg in node.all_input_nodes:
            ch = self.channels.get(arg)
            if ch is not None:
                found.append(ch)
        return found

    def _same(self, ch: _Channels, zero: Sequence[bool] | None = None) -> _Channels:
        return _Channels(list(ch.ids), list(ch.zero) if zero is None else list(zero))

    def _unknown(self, node: fx.Node, what: str) -> _Channels | None:
        for ch in self._tracked_inputs(node):
            self._freeze(ch, what)
        out = self._fresh(node)
        self._freeze(out, what)
        return out

    # -- rules -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "placeholder":
                out = self._fresh(node)
                self._freeze(out, "the model's input")
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    self._freeze(self.channels.get(arg), "the model's output")
                continue
            elif node.op == "call_module":
                out = self._module(node)
            elif node.op == "call_function":
                out = self._function(node, node.target)
            elif node.op == "call_method":
                out = self._method(node)
            else:  # get_attr: a constant tensor
                out = None
            if out is not None:
                self.channels[node] = out

    def _input(self, node: fx.Node) -> _Channels | None:
        arg = node.args[0] if node.args else None
        return self.channels.get(arg) if isinstance(arg, fx.Node) else None

    def _module(self, node: fx.Node) -> _Channels | None:
        name = str(node.target)
        module = self.modules[name]
        x = self._input(node)
        stateful = has_channel_rule(module) or any(True for _ in module.parameters())
        if stateful and self.calls.get(name, 0) > 1:
            return self._unknown(node, f"{name!r} (called more than once)")
        if isinstance(module, _ConvNd) and not isinstance(module, _ConvTransposeNd):
            return self._conv(node, module, x)
        if isinstance(module, nn.Linear):
            if x is None or len(self._shape(node.args[0]) or ()) != 2:
                return self._unknown(node, f"{name!r} (a Linear on a tensor that is not 2-D)")
            self.observed.append(x)
            return self._fresh(node, _zero_rows(module.weight, module.bias))
        if isinstance(module, _BatchNorm):
            if x is None:
                return self._unknown(node, repr(name))
            return self._same(x, _batchnorm_zero(module, x.zero))
        if isinstance(module, _ZERO_PRESERVING_MODULES):
            return None if x is None else self._same(x)
        if isinstance(module, _CHANNELWISE_MODULES):
            return None if x is None else self._same(x, [False] * len(x.ids))
        if isinstance(module, nn.Flatten):
            return self._flatten(node, x, module.start_dim, module.end_dim)
        if has_channel_rule(module) and x is not None:
            out_ids, out_zero = [], []
            for src in module.channel_sources():
                if src is None:
                    out_ids.extend(self.uf.new(1))
                    out_zero.append(True)
                else:
                    out_ids.append(x.ids[src])
                    out_zero.append(x.zero[src])
            return _Channels(out_ids, out_zero)
        return self._unknown(node, f"{name!r} ({type(module).__name__})")

    def _conv(self, node: fx.Node, conv: _ConvNd, x: _Channels | None) -> _Channels | None:
        if x is None:
            return self._unknown(node, repr(str(node.target)))
        weight = conv.weight.detach()
        rows = weight.flatten(1).ne(0).any(dim=1).tolist()
        bias = [False] * conv.out_channels if conv.bias is None else conv.bias.ne(0).tolist()
        if conv.groups == 1:
            self.observed.append(x)
            return self._fresh(node, [not (r or b) for r, b in zip(rows, bias, strict=True)])
        if conv.groups == conv.in_channels == conv.out_channels:  # depthwise: channel-wise
            zero = [(z or not r) and not b for z, r, b in zip(x.zero, rows, bias, strict=True)]
            return self._same(x, zero)
        return self._unknown(node, f"{str(node.target)!r} (a grouped conv)")

    def _flatten(
        self, node: fx.Node, x: _Channels | None, start: int, end: int = -1
    ) -> _Channels | None:
        in_shape = self._shape(node.args[0])
        if x is None or in_shape is None:
            return None
        if start != 1 or end not in (-1, len(in_shape) - 1):
            return self._unknown(node, f"{node.name} (flatten from dim {start})")
        per_channel = math.prod(in_shape[2:])
        ids = [i for i in x.ids for _ in range(per_channel)]
        zero = [z for z in x.zero for _ in range(per_channel)]
        return _Channels(ids, zero)

    def _elementwise(self, node: fx.Node, combine: Callable[[bool, bool], bool]) -> Any:
        a, b = (node.args + (None, None))[:2]
        ca = self.channels.get(a) if isinstance(a, fx.Node) else None
        cb = self.channels.get(b) if isinstance(b, fx.Node) else None
        shape_a, shape_b, shape_out = self._shape(a), self._shape(b), self._shape(node)
        if ca is not None and cb is not None:
            if shape_a != shape_b or len(ca.ids) != len(cb.ids):
                return self._unknown(node, f"{node.name} (broadcasting {shape_a} with {shape_b})")
            for i, j in zip(ca.ids, cb.ids, strict=True):
                self.uf.union(i, j)
            return self._same(ca, [combine(p, q) for p, q in zip(ca.zero, cb.zero, strict=True)])
        one = ca if ca is not None else cb
        other = b if ca is not None else a
        if one is None:
            return None
        if isinstance(other, (int, float)) or (other is None and shape_out is not None):
            keeps_zero = combine is _mul or other == 0
            return self._same(one, one.zero if keeps_zero else [False] * len(one.ids))
        return self._unknown(node, f"{node.name} (an operation with an untracked tensor)")

    def _function(self, node: fx.Node, target: Any) -> _Channels | None:
        x = self._input(node)
        if target in _ADD:
            return self._elementwise(node, _add)
        if target in _MUL:
            return self._elementwise(node, _mul)
        if target in _ZERO_PRESERVING_FUNCTIONS:
            return None if x is None else self._same(x)
        if target is torch.flatten:
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return self._flatten(node, x, int(start), int(end))
        if target is torch.cat:
            tensors, dim = _arg(node, 0, "tensors", ()), _arg(node, 1, "dim", 0)
            parts = [self.channels.get(t) for t in tensors]
            if dim == 1 and all(p is not None for p in parts):
                return _Channels(
                    [i for p in parts for i in p.ids],  # type: ignore[union-attr]
                    [z for p in parts for z in p.zero],  # type: ignore[union-attr]
                )
        if not self._tracked_inputs(node):
            return None
        return self._unknown(node, f"{node.name} ({getattr(target, '__name__', target)})")

    def _method(self, node: fx.Node) -> _Channels | None:
        x = self._input(node)
        method = str(node.target)
        if method in ("size", "dim"):
            return None
        if x is None:
            return None if not self._tracked_inputs(node) else self._unknown(node, node.name)
        if method in _ZERO_PRESERVING_METHODS:
            return self._same(x)
        if method == "flatten":
            start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
            return self._flatten(node, x, int(start), int(end))
        if method in ("view", "reshape"):
            in_shape, out_shape = self._shape(node.args[0]), self._shape(node)
            if (
                in_shape is not None
                and out_shape is not None
                and len(out_shape) == 2
                and out_shape[0] == in_shape[0]
            ):
                return self._flatten(node, x, 1)
        return self._unknown(node, f"{node.name} (.{method})")

    # -- decision --------------------------------------------------------------------------
    def removable(self, keep_one: bool = True) -> set[int]:
        """Roots of the channel classes that can go (``keep_one``: but never every channel
        of a tensor)."""
        find = self.uf.find
        blocked = {find(i) for i in self.frozen}
        for ch in self.observed:
            blocked.update(find(i) for i, z in zip(ch.ids, ch.zero, strict=True) if not z)
        every = {find(i) for ch in self.channels.values() for i in ch.ids}
        removable = every - blocked
        # never leave a tensor without channels: keep its first channel's class
        changed = keep_one
        while changed:
            changed = False
            for ch in self.channels.values():
                if ch.ids and all(find(i) in removable for i in ch.ids):
                    removable.discard(find(ch.ids[0]))
                    changed = True
        return removable

    def keep(self, node: fx.Node, removable: set[int]) -> list[bool] | None:
        ch = self.channels.get(node)
        if ch is None:
            return None
        return [self.uf.find(i) not in removable for i in ch.ids]


def _add(a: bool, b: bool) -> bool:
    return a and b


def _mul(a: bool, b: bool) -> bool:
    return a or b


@torch.no_grad()
def _zero_rows(weight: Tensor, bias: Tensor | None) -> list[bool]:
    rows = weight.flatten(1).ne(0).any(dim=1)
    if bias is not None:
        rows = rows | bias.ne(0)
    return (~rows).tolist()


@torch.no_grad()
def _batchnorm_zero(bn: _BatchNorm, zero_in: list[bool]) -> list[bool]:
    """Channels a BatchNorm (eval mode) outputs as exact zeros: gamma = beta = 0, or a zero
    input mapped to beta - gamma * mean / sqrt(var + eps) = 0."""
    n = bn.num_features
    weight = bn.weight if bn.weight is not None else torch.ones(n)
    bias = bn.bias if bn.bias is not None else torch.zeros(n)
    out = (weight == 0) & (bias == 0)
    if bn.running_mean is not None and bn.running_var is not None:
        const = bias - weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        out = out | (torch.tensor(zero_in) & (const == 0))
    return out.tolist()


# -- rebuilding ----------------------------------------------------------------------------


def _index(keep: list[bool]) -> Tensor:
    return torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long)


@torch.no_grad()
def _slim_conv(conv: _ConvNd, in_keep: list[bool], out_keep: list[bool]) -> _ConvNd:
    out_idx = _index(out_keep)
    depthwise = conv.groups > 1
    in_idx = out_idx if depthwise else _index(in_keep)
    n_in, n_out = len(in_idx), len(out_idx)
    new = type(conv)(  # type: ignore[call-arg]  # a concrete ConvNd, not _ConvNd itself
        n_in,
        n_out,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=n_out if depthwise else 1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    weight = conv.weight[out_idx]
    new.weight.copy_(weight if depthwise else weight[:, in_idx])
    if conv.bias is not None and new.bias is not None:
        new.bias.copy_(conv.bias[out_idx])
    return new


@torch.no_grad()
def _slim_linear(linear: nn.Linear, in_keep: list[bool], out_keep: list[bool]) -> nn.Linear:
    out_idx, in_idx = _index(out_keep), _index(in_keep)
    new = nn.Linear(
        len(in_idx),
        len(out_idx),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    new.weight.copy_(linear.weight[out_idx][:, in_idx])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[out_idx])
    return new


@torch.no_grad()
def _slim_batchnorm(bn: _BatchNorm, keep: list[bool]) -> _BatchNorm:
    idx = _index(keep)
    new = type(bn)(
        len(idx),
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device=bn.running_mean.device if bn.running_mean is not None else None,
    )
    if bn.affine:
        new.weight.copy_(bn.weight[idx])
        new.bias.copy_(bn.bias[idx])
    if bn.track_running_stats:
        # buffers that exist whenever running statistics are tracked
        for buffer in ("running_mean", "running_var"):
            cast(Tensor, getattr(new, buffer)).copy_(cast(Tensor, getattr(bn, buffer))[idx])
        cast(Tensor, new.num_batches_tracked).copy_(cast(Tensor, bn.num_batches_tracked))
    return new


@torch.no_grad()
def _slim_low_rank(layer: LowRankLinear) -> LowRankLinear:
    alive = layer.weight2.ne(0).any(dim=1) & layer.weight1.ne(0).any(dim=0)  # (r,)
    idx = torch.nonzero(alive).flatten()
    if len(idx) == layer.rank:
        return layer
    if len(idx) == 0:  # keep one (zero) component: the layer's output is zero either way
        idx = torch.zeros(1, dtype=torch.long)
    new = LowRankLinear(layer.in_features, layer.out_features, len(idx))
    new.to(layer.weight1.device, layer.weight1.dtype)
    new.weight1.copy_(layer.weight1[:, idx] if alive.any() else torch.zeros_like(new.weight1))
    new.weight2.copy_(layer.weight2[idx])
    return new


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _example_input(model: nn.Module, example_inputs: Any) -> tuple[Tensor, ...]:
    if example_inputs is not None:
        return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise SlimError(
            f"slim needs an example input to follow the channels of {type(model).__name__}: "
            "pass example_inputs=torch.randn(1, C, H, W) (the model declares no input_shape)"
        )
    return (torch.randn(1, *shape, device=_device(model)),)


def _has_zero_filters(model: nn.Module) -> bool:
    for module in model.modules():
        is_layer = isinstance(module, (_ConvNd, nn.Linear))
        if is_layer and not isinstance(module, _ConvTransposeNd):
            zero = any(_zero_rows(cast(Tensor, module.weight), cast("Tensor | None", module.bias)))
        elif isinstance(module, _BatchNorm) and module.affine:
            zero = bool(((module.weight == 0) & (module.bias == 0)).any())
        else:
            zero = False
        if zero:
            return True
    return False


@torch.no_grad()
def slim(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...] | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` without its zeroed filters and rank-one
    components, giving the same outputs in eval mode; ``model`` itself is left as it is.

    ``example_inputs``: an input batch used to follow tensor shapes through the graph (default:
    a random batch of one of the model's ``input_shape``). The copy is returned in eval mode,
    with plain weights (no sparsity parametrizations). Raises ``SlimError`` naming the layer
    when zeroed filters sit behind an operation slim cannot follow channel by channel, or
    behind a forward ``torch.fx`` cannot trace.
    """
    work = finalize(copy.deepcopy(model)).eval()
    for name, module in list(work.named_modules()):
        if isinstance(module, LowRankLinear):
            slimmed = _slim_low_rank(module)
            if slimmed is not module:
                _replace(work, name, slimmed)
    if not _has_zero_filters(work):
        return work
    inputs = _example_input(work, example_inputs)
    analysis = _analyse(
        work,
        lambda graph: ShapeProp(graph).propagate(*inputs),
        lambda exc: SlimError(
            f"cannot slim {type(model).__name__}: {exc}. Slim follows channels through a "
            f"torch.fx trace; make that layer traceable or leave it out of sparsify"
        ),
    )
    removable = analysis.removable()
    _check_blocked(analysis, removable)

    removed = 0
    for node in analysis.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = analysis.modules[name]
        out_keep = analysis.keep(node, removable)
        arg = node.args[0] if node.args else None
        in_keep = analysis.keep(arg, removable) if isinstance(arg, fx.Node) else None
        if out_keep is None or in_keep is None or (all(out_keep) and all(in_keep)):
            continue
        if isinstance(module, _ConvNd):
            new: nn.Module = _slim_conv(module, in_keep, out_keep)
        elif isinstance(module, nn.Linear):
            new = _slim_linear(module, in_keep, out_keep)
        elif isinstance(module, _BatchNorm):
            new = _slim_batchnorm(module, out_keep)
        elif has_channel_rule(module):
            new = module.slimmed(in_keep, out_keep)
        else:
            continue  # parameter-free and channel-agnostic (ReLU, pooling, ...)
        removed += out_keep.count(False)
        _replace(work, name, new)
    logger.info("slim removed %d output channels in total", removed)
    return work.eval()


def _check_blocked(analysis: _Analysis, removable: set[int]) -> None:
    """A zeroed filter that an unknown operation keeps is an error naming both."""
    find = analysis.uf.find
    why_of_root: dict[int, str] = {}
    for i, why in analysis.frozen.items():
        if why not in _IO_REASONS:
            why_of_root.setdefault(find(i), why)
    for node in analysis.graph.nodes:
        if node.op != "call_module":
            continue
        module = analysis.modules[str(node.target)]
        ch = analysis.channels.get(node)
        if ch is None or not isinstance(module, (_ConvNd, nn.Linear, _BatchNorm)):
            continue
        for i, zero in zip(ch.ids, ch.zero, strict=True):
            root = find(i)
            if zero and root not in removable and root in why_of_root:
                raise SlimError(
                    f"cannot slim layer {str(node.target)!r}: its zeroed output channels reach "
                    f"{why_of_root[root]}, which slim cannot follow channel by channel; "
                    "remove that operation from the path or leave the layer out of "
                    "sparsify(..., structure='filter')"
                )


# -- the slim architecture as data -------------------------------------------------------------

# the layer types a slim model's architecture is rebuilt from: name -> (class, constructor
# arguments read from the instance)
_REBUILDABLE: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    **{
        cls.__name__: (
            cls,
            (
                "in_channels",
                "out_channels",
                "kernel_size",
                "stride",
                "padding",
                "dilation",
                "groups",
                "bias",
                "padding_mode",
            ),
        )
        for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    },
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    **{
        cls.__name__: (cls, ("num_features", "eps", "momentum", "affine", "track_running_stats"))
        for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    },
    "LowRankLinear": (LowRankLinear, ("in_features", "out_features", "rank")),
}


def _plain_arg(module: nn.Module, arg: str) -> Any:
    value = getattr(module, arg)
    if arg == "bias":
        return value is not None
    if isinstance(value, tuple):
        return list(value)
    return value


def describe_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The shape-bearing layers of ``model`` as plain data: name -> {"type", constructor
    arguments}. With the model's name and options this rebuilds a slim architecture
    (``rebuild_layers``), with no pickled code."""
    layers: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if kind in _REBUILDABLE and type(module) is _REBUILDABLE[kind][0]:
            _, args = _REBUILDABLE[kind]
            layers[name] = {"type": kind, **{a: _plain_arg(module, a) for a in args}}
        elif has_channel_rule(module) and callable(getattr(module, "describe", None)):
            layers[name] = {"type": kind, **module.describe()}
    return layers


def rebuild_layers(
    model: nn.Module,
    layers: dict[str, dict[str, Any]],
    channel_rules: dict[str, Callable[..., nn.Module]] | None = None,
) -> nn.Module:
    """Replace ``model``'s layers by ones built from ``describe_layers`` data (in place);
    ``channel_rules``: builders of the channel-rule modules by type name."""
    builders = dict(channel_rules or {})
    names = dict(model.named_modules())
    for name, entry in layers.items():
        if not isinstance(entry, dict) or "type" not in entry:
            raise SlimError(f"layer {name!r}: expected a mapping with a 'type', got {entry!r}")
        if name not in names:
            raise SlimError(f"layer {name!r} does not exist in {type(model).__name__}")
        kind, args = entry["type"], {k: v for k, v in entry.items() if k != "type"}
        if kind in _REBUILDABLE:
            cls, _ = _REBUILDABLE[kind]
            new: nn.Module
            if cls is LowRankLinear:
                new = LowRankLinear(args["in_features"], args["out_features"], args["rank"])
            else:
                new = cls(**args)
        elif kind in builders:
            new = builders[kind](**args)
        else:
            valid = ", ".join(sorted([*_REBUILDABLE, *builders]))
            raise SlimError(f"layer {name!r} has unknown type {kind!r}; known: {valid}")
        _replace(model, name, new)
    return model


# -- what a structured FLOPs target counts -----------------------------------------------------


class _Terms:
    """The counted layers of a ``ChannelFlops`` as they are found: FLOPs and the classes of
    their input and output channels."""

    def __init__(self) -> None:
        self.flops: list[float] = []
        self.sides: tuple[list[int], list[int]] = ([], [])  # classes of inputs, outputs
        self.terms: tuple[list[int], list[int]] = ([], [])

    def add(self, flops: float, inputs: Sequence[int] = (), outputs: Sequence[int] = ()) -> None:
        term = len(self.flops)
        self.flops.append(flops)
        for side, classes in enumerate((inputs, outputs)):
            self.sides[side].extend(classes)
            self.terms[side].extend([term] * len(classes))

    def build(
        self,
        classes: dict[str, list[int]],
        cuts: dict[str, list[int]],
        base: list[bool],
        frozen: list[bool],
        total: float,
        tensors: Sequence[Sequence[int]] = (),
    ) -> ChannelFlops:
        def pair(side: int) -> tuple[Tensor, Tensor]:
            return (
                torch.tensor(self.sides[side], dtype=torch.long),
                torch.tensor(self.terms[side], dtype=torch.long),
            )

        def index(groups: dict[str, list[int]]) -> dict[str, Tensor]:
            return {n: torch.tensor(c, dtype=torch.long) for n, c in groups.items()}

        return ChannelFlops(
            index(classes),
            index(cuts),
            torch.tensor(base, dtype=torch.bool),
            torch.tensor(frozen, dtype=torch.bool),
            torch.tensor(self.flops, dtype=torch.float64),
            pair(0),
            pair(1),
            [torch.tensor(t, dtype=torch.long) for t in tensors],
            total - sum(self.flops),
            total,
        )


@torch.no_grad()
def channel_flops(
    model: nn.Module, layers: Any, input_shape: tuple[int, ...], structure: str
) -> ChannelFlops:
    """The FLOPs of ``slim(model)`` as a function of the gated filters alive (see
    ``ChannelFlops``), for a FLOPs target on structured STR: the channels are followed
    through the model as ``slim`` follows them, once, with every gated filter removed but
    the depthwise ones, to find the classes that could go at all."""
    profile = flops.profile(model, input_shape)
    records = {r.name: float(r.flops) for r in profile.layers}
    total = float(profile.overall.flops)
    if structure == "rank":
        terms, classes, start = _Terms(), {}, 0
        for name, layer in layers.items():
            rank = cast(LowRankLinear, layer.module).rank
            classes[name] = list(range(start, start + rank))
            start += rank
            if name in records:  # a low-rank layer's record: both factors, every call
                terms.add(records[name], inputs=classes[name])
        return terms.build(classes, {}, [False] * start, [False] * start, total)

    work = copy.deepcopy(model)
    for name, module in work.named_modules():
        gate = get_parametrization(module) if name in layers else None
        if isinstance(gate, StructuredSoftThreshold) and not _depthwise(module):
            gate.m.zero_()  # the filter, its bias and the BatchNorm after it: zero
    work = finalize(work).eval()
    device = _device(work)
    analysis = _analyse(
        work,
        lambda graph: _propagate(graph, input_shape, device),
        lambda exc: OptionError(
            f"a FLOPs target with structure={structure!r} follows the channels as slim does: "
            f"{exc}; make that layer traceable, or give sparsity= (a fraction of filters)"
        ),
    )
    can_go = analysis.removable(keep_one=False)
    find = analysis.uf.find
    index: dict[int, int] = {}

    def classes_of(ch: _Channels | None) -> list[int]:
        if ch is None:
            return []
        return [index.setdefault(find(i), len(index)) for i in ch.ids]

    terms = _Terms()
    gated: dict[str, list[int]] = {}
    cuts: dict[str, list[int]] = {}
    counted: set[str] = set()
    for node in analysis.graph.nodes:
        if node.op != "call_module":
            continue
        name = str(node.target)
        module = analysis.modules[name]
        out = analysis.channels.get(node)
        if name in layers:
            (cuts if _depthwise(module) else gated)[name] = classes_of(out)
        if name not in records or name in counted:
            continue
        counted.add(name)
        arg = node.args[0] if node.args else None
        x = analysis.channels.get(arg) if isinstance(arg, fx.Node) else None
        if isinstance(module, _ConvNd) and module.groups > 1:
            terms.add(records[name], inputs=classes_of(x))  # channel-wise (or frozen)
        elif isinstance(module, (_ConvNd, nn.Linear)):
            terms.add(records[name], inputs=classes_of(x), outputs=classes_of(out))
        else:  # pooling: the size of its input
            terms.add(records[name], inputs=classes_of(x))
    missing = sorted(set(layers) - set(gated) - set(cuts))
    if missing:
        raise OptionError(
            f"a FLOPs target with structure={structure!r} cannot follow layers "
            f"{', '.join(missing[:5])} through the model's graph; give sparsity= instead"
        )
    # every tensor's classes, in graph order, once each: slim keeps one channel of a
    # tensor that would lose them all
    tensors = list(dict.fromkeys(tuple(classes_of(ch)) for ch in analysis.channels.values()))
    roots = sorted(index, key=index.__getitem__)
    frozen = {find(i) for i in analysis.frozen}
    return terms.build(
        gated, cuts, [r not in can_go for r in roots], [r in frozen for r in roots], total, tensors
    )


def _analyse(
    work: nn.Module,
    propagate: Callable[[fx.GraphModule], None],
    error: Callable[[TraceFailure], Exception],
) -> _Analysis:
    """The channel analysis of ``work``: traced, its shapes propagated by ``propagate``; a
    trace that fails raises ``error(failure)``."""
    try:
        graph_module = fx.GraphModule(work, trace(work))
    except TraceFailure as exc:
        raise error(exc) from exc
    propagate(graph_module)
    analysis = _Analysis(work, graph_module.graph)
    analysis.run()
    return analysis


def _propagate(graph: fx.GraphModule, shape: tuple[int, ...], device: Any) -> None:
    """Shapes through ``graph``: ``shape`` is one sample's, or, as ``flops.profile`` also
    reads it, a whole batch's."""
    try:
        ShapeProp(graph).propagate(torch.zeros(1, *shape, device=device))
    except Exception:
        if len(shape) < 2:
            raise
        ShapeProp(graph).propagate(torch.zeros(*shape, device=device))


def _depthwise(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd) and module.groups == module.in_channels > 1


def _device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return param.device if param is not None else None


register_channel_flops(channel_flops)
